/**
 * The replay cache over a store that answers synchronously (the memory
 * store): it answers from its copy at once, and passes every other answer on
 * as the store gave it, without a promise.
 */
import t from 'tap'
import { MemoryStore } from '../index.js'
import { ReplayCache } from '../lib/stores/cache.js'
import './helpers/crash-guard.js'

t.test('over a synchronous store: values in, values out; its own saves are copied, fingerprint or none', async (t) => {
  const store = new MemoryStore()
  t.teardown(() => store.close())
  const cache = new ReplayCache(store, 100_000)
  const claimed = cache.claim('k', undefined, 60_000)
  t.notOk(claimed instanceof Promise, 'the store\'s own answer, not a promise')
  const token = (claimed as { token: string }).token
  t.equal(cache.renew('k', token, 60_000), true)
  t.equal(cache.complete('k', token, { statusCode: 200, headers: { 'content-type': 'text/plain' }, body: 'text body' }, 60_000), true)
  t.ok(cache.size > 200, 'copied')
  const replay = cache.claim('k', 'any', 60_000)
  t.same(replay, { record: { state: 'completed', fingerprint: undefined, response: { statusCode: 200, headers: { 'content-type': 'text/plain' }, body: 'text body' } } })
  t.equal(cache.hits, 1)
  t.equal(cache.renew('k', 'stale', 60_000), false, 'a renewal the store refuses')
  t.equal(cache.lookup?.('k'), (replay as { record: unknown }).record, 'lookup answers from the copy, synchronously')
  t.equal(cache.lookup?.('absent'), undefined, 'and passes what it has no copy of on to the store')
})
