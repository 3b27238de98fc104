/**
 * Micro-benchmark of the memory store's hot operations:
 *
 *   npx tsx bench/micro/memory-store.ts [store module]
 *
 * The optional argument is the path of another module that exports
 * `MemoryStore` (an earlier version, say, from `git show`), measured the same
 * way. Each sample times a batch of calls and records their mean, since one
 * call is shorter than the timer resolves well; the work that puts the store
 * back in its state (saving or releasing the claims made) runs outside the
 * timed part.
 */
import { resolve } from 'node:path'
import { pathToFileURL } from 'node:url'
import { Bench } from 'tinybench'
import type { MemoryStore as Store, MemoryStoreOptions } from '../../lib/stores/memory.js'
import type { StoredResponse } from '../../types/index.js'
import { batch, print } from './helpers/measure.js'

const modulePath = process.argv[2]
const { MemoryStore } = (modulePath === undefined
  ? await import('../../lib/stores/memory.js')
  : await import(pathToFileURL(resolve(modulePath)).href)) as { MemoryStore: new (options?: MemoryStoreOptions) => Store }

const BATCH = 100
const RECORDS = 10_000
const LIVE_CLAIMS = 20_000
const REPLAYED = 4000
const LONG = 3_600_000
const RESPONSE: StoredResponse = {
  statusCode: 201,
  headers: { 'content-type': 'application/json; charset=utf-8' },
  body: JSON.stringify({ id: 'order_1', status: 'created', items: [1, 2, 3] })
}

let sequence = 0
const nextKeys = (): string[] => Array.from({ length: BATCH }, () => `idempotency:${(sequence++).toString(16).padStart(16, '0')}`)

const stores: Store[] = []

/** A store holding `RECORDS` completed records: as full as its default bound allows. */
function fullStore (): { store: Store, keys: string[] } {
  const store = new MemoryStore()
  stores.push(store)
  const keys: string[] = []
  for (let i = 0; i < RECORDS / BATCH; i++) {
    const batch = nextKeys()
    saveAll(store, batch, claimAll(store, batch))
    keys.push(...batch)
  }
  return { store, keys }
}

/** Claims every key of a batch, which must be free, and returns the tokens. */
function claimAll (store: Store, keys: string[]): string[] {
  const tokens = new Array<string>(keys.length)
  for (let i = 0; i < keys.length; i++) tokens[i] = store.claim(keys[i], 'fp', LONG).token as string
  return tokens
}

function saveAll (store: Store, keys: string[], tokens: string[]): void {
  for (let i = 0; i < keys.length; i++) {
    if (!store.complete(keys[i], tokens[i], RESPONSE, LONG)) throw new Error(`${keys[i]} was not saved`)
  }
}

const bench = new Bench({ name: `MemoryStore (${modulePath ?? 'lib/stores/memory.ts'})`, time: 1000, iterations: 20, warmupIterations: 4, warmupTime: 100 })

{
  const { store } = fullStore()
  bench.add(`claim of a new key (${RECORDS} records held)`, () => {
    const keys = nextKeys()
    let tokens: string[] = []
    const result = batch(BATCH, () => { tokens = claimAll(store, keys) })
    saveAll(store, keys, tokens)
    return result
  })
}

{
  const { store, keys } = fullStore()
  // The newest records: any store that keeps at least half its bound holds them, so another store module (argument) compares.
  const recent = keys.slice(-REPLAYED)
  let next = 0
  bench.add(`replay hit (${REPLAYED} keys replayed in turn, ${RECORDS} records held)`, () => {
    const replayed = Array.from({ length: BATCH }, () => recent[next++ % recent.length])
    return batch(BATCH, () => {
      for (const key of replayed) {
        if (store.claim(key, 'fp', LONG).record?.state !== 'completed') throw new Error(`${key} was not replayed`)
      }
    })
  })
}

{
  const { store } = fullStore()
  bench.add(`complete, evicting the oldest (${RECORDS} records held)`, () => {
    const keys = nextKeys()
    const tokens = claimAll(store, keys)
    return batch(BATCH, () => saveAll(store, keys, tokens))
  })
}

{
  const store = new MemoryStore({ maxClaims: LIVE_CLAIMS + BATCH })
  stores.push(store)
  for (let i = 0; i < LIVE_CLAIMS / BATCH; i++) claimAll(store, nextKeys())
  bench.add(`claim of a new key (${LIVE_CLAIMS} claims in flight)`, () => {
    const keys = nextKeys()
    let tokens: string[] = []
    const result = batch(BATCH, () => { tokens = claimAll(store, keys) })
    for (let i = 0; i < keys.length; i++) store.release(keys[i], tokens[i])
    return result
  })
}

await bench.run()
for (const store of stores) store.close()
print(bench, `${BATCH} calls per sample`)
