/**
 * Micro-benchmark of the replay cache's lookup (lib/stores/cache.ts): a
 * `claim()` of a key whose completed record the cache holds answers at once,
 * without a promise; any other goes to the store. Measured: a hit among 1000
 * cached keys, and a miss.
 *
 *   npx tsx bench/micro/replay-cache.ts
 *
 * The store behind the cache answers at once: first with the completed
 * records that fill the cache, then with a claim in flight (which the cache
 * does not keep), so a miss measures what the cache adds to a store call,
 * not the store.
 */
import { randomUUID } from 'node:crypto'
import { Bench } from 'tinybench'
import { defaultKeyEncoder } from '../../lib/key-encoder.js'
import { ReplayCache } from '../../lib/stores/cache.js'
import type { ClaimResult, IdempotencyStore, StoredResponse } from '../../types/index.js'
import { batch, print } from './helpers/measure.js'

const BATCH = 1000
const KEYS = 1000
const LOCK_TTL = 30_000
const TTL = 86_400_000
/** The plugin's default bound (lib/options.ts). */
const BYTES = 16 * 1024 * 1024
/** About what the benchmark's route answers. */
const RESPONSE: StoredResponse = {
  statusCode: 201,
  headers: { 'content-type': 'application/json; charset=utf-8' },
  body: JSON.stringify({ id: 'ord_000000001a', status: 'accepted', item: 'sku-4711', quantity: 2, unitPrice: 1999, total: 3998, currency: 'EUR', customer: 'cus_8c1f3b', createdAt: new Date().toISOString() })
}
const IN_FLIGHT: ClaimResult = { record: { state: 'in-flight', fingerprint: undefined } }
const COMPLETED: ClaimResult = { record: { state: 'completed', fingerprint: undefined, response: RESPONSE, expiresIn: TTL } }
/** While filling, the store answers with the completed record (which the cache copies); then with a claim in flight. */
let filling = true

const store: IdempotencyStore = {
  claim: () => filling ? COMPLETED : IN_FLIGHT,
  complete: () => true,
  release: () => true,
  renew: () => true
}

/** Store keys as the plugin makes them. */
const storeKeys = (n: number) => Array.from({ length: n }, () => defaultKeyEncoder({ scope: undefined, method: 'POST', path: '/orders', key: randomUUID() }))
const cached = storeKeys(KEYS)
const missing = storeKeys(KEYS)
const cache = new ReplayCache(store, BYTES)
// A replay fetched from the store is what the cache copies.
for (const key of cached) cache.claim(key, undefined, LOCK_TTL)
filling = false
// Random order, drawn beforehand so that drawing it is not measured.
const order = Array.from({ length: BATCH }, () => Math.floor(Math.random() * KEYS))

const bench = new Bench({ name: 'ReplayCache.claim (lib/stores/cache.ts)', time: 1000, warmupTime: 200 })
bench.add(`hit (${KEYS} keys cached, picked at random)`, () => batch(BATCH, () => {
  for (let i = 0; i < BATCH; i++) {
    const result = cache.claim(cached[order[i]], undefined, LOCK_TTL) as ClaimResult
    if (result.record?.state !== 'completed') throw new Error('a cached key missed')
  }
}))
bench.add(`miss (${KEYS} keys cached, a store that answers at once)`, () => batch(BATCH, () => {
  for (let i = 0; i < BATCH; i++) {
    const result = cache.claim(missing[order[i]], undefined, LOCK_TTL) as ClaimResult
    if (result.record?.state !== 'in-flight') throw new Error('a missing key hit')
  }
}))

await bench.run()
print(bench, `${BATCH} calls per sample, ${cache.size} bytes cached`)
