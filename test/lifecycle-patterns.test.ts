/**
 * The lifecycle patterns (test/helpers/patterns.ts) on the memory store, and
 * on a store whose every method answers asynchronously (as Redis does): the
 * plugin must behave the same whether the store answers at once or later.
 */
import t from 'tap'
import { setImmediate as tick } from 'node:timers/promises'
import { MemoryStore } from '../index.js'
import type { IdempotencyStore } from '../index.js'
import './helpers/crash-guard.js'
import { lifecyclePatterns } from './helpers/patterns.js'

/** A memory store behind a turn of the event loop per call. */
function asynchronous (inner: MemoryStore): IdempotencyStore {
  return {
    claim: async (...args) => { await tick(); return inner.claim(...args) },
    complete: async (...args) => { await tick(); return inner.complete(...args) },
    release: async (...args) => { await tick(); return inner.release(...args) },
    renew: async (...args) => { await tick(); return inner.renew(...args) }
  }
}

t.test('memory store', async (t) => {
  lifecyclePatterns(t, {
    store () {
      const store = new MemoryStore()
      t.teardown(() => store.close())
      return store
    }
  })
})

t.test('a store that answers asynchronously', async (t) => {
  lifecyclePatterns(t, {
    store () {
      const store = new MemoryStore()
      t.teardown(() => store.close())
      return asynchronous(store)
    }
  })
})
