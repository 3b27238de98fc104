/**
 * The replay cache over a store that answers synchronously (the memory
 * store): it answers from its copy at once, and passes every other answer on
 * as the store gave it, without a promise.
 */
import t from 'tap'
import { MemoryStore } from '../index.js'
import { ReplayCache } from '../lib/stores/cache.js'
import type { ClaimResult } from '../index.js'
import './helpers/crash-guard.js'

/** The memory store, answering with the remaining time as the shared stores do (the cache keeps only records that say it). */
class SharedLike extends MemoryStore {
  override claim (key: string, fingerprint: string | undefined, lockTtl: number): ClaimResult {
    const result = super.claim(key, fingerprint, lockTtl) as ClaimResult
    return result.record?.state === 'completed' ? { record: { ...result.record, expiresIn: 60_000 } } : result
  }
}

t.test('over a synchronous store: values in, values out; a record a claim returns is copied, its own saves are not', async (t) => {
  const store = new SharedLike()
  t.teardown(() => store.close())
  const cache = new ReplayCache(store, 100_000)
  const claimed = cache.claim('k', undefined, 60_000)
  t.notOk(claimed instanceof Promise, 'the store\'s own answer, not a promise')
  const token = (claimed as { token: string }).token
  t.equal(cache.renew('k', token, 60_000), true)
  t.equal(cache.complete('k', token, { statusCode: 200, headers: { 'content-type': 'text/plain' }, body: 'text body' }, 60_000), true)
  t.equal(cache.size, 0, 'its own save is not copied')
  const fetched = cache.claim('k', 'any', 60_000) as { record: { state: string } }
  t.equal(fetched.record.state, 'completed', 'the first replay is the store\'s answer')
  t.equal(cache.hits, 0)
  t.ok(cache.size > 200, 'and is copied')
  const replay = cache.claim('k', 'any', 60_000)
  t.same(replay, { record: { state: 'completed', fingerprint: undefined, response: { statusCode: 200, headers: { 'content-type': 'text/plain' }, body: 'text body' } } })
  t.equal(cache.hits, 1, 'the next one comes from the copy')
  t.equal(cache.renew('k', 'stale', 60_000), false, 'a renewal the store refuses')
  t.equal(cache.lookup?.('k'), (replay as { record: unknown }).record, 'lookup answers from the copy, synchronously')
  t.equal(cache.lookup?.('absent'), undefined, 'and passes what it has no copy of on to the store')
})
