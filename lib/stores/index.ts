/** Picks the store that the `store` option names. */
import type { IdempotencyStore } from '../../types/index.js'
import { MemoryStore } from './memory.js'

export interface PickedStore {
  store: IdempotencyStore
  /** The plugin created the store, so it closes it on `onClose`. */
  owned: boolean
}

export function pickStore (option: 'memory' | IdempotencyStore): PickedStore {
  if (option === 'memory') return { store: new MemoryStore(), owned: true }
  return { store: option, owned: false }
}
