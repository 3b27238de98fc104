/**
 * The replay cache in front of the Redis store: once a replay has fetched a
 * record, later replays are answered without asking the store, with the
 * fingerprint check and scope as always; a copy never outlives the store's
 * record; in-flight claims are never cached; the cache is bounded by bytes
 * (least recently used first) and `replayCache: 0` turns it off.
 */
import t, { type Test } from 'tap'
import { Redis } from 'ioredis'
import { MemoryStore, RedisStore } from '../../index.js'
import type { StoredResponse } from '../../index.js'
import { ReplayCache } from '../../lib/stores/cache.js'
import { build, heldHandler, sleep, until } from '../helpers/app.js'
import { startRedis, uniquePrefix, withRedis, type RedisServer } from '../../support/redis.js'

/** A Redis store that counts what it is asked. */
class CountingStore extends RedisStore {
  /** `complete` counts a finished save (its answer is back), the others a call. */
  readonly calls = { claim: 0, complete: 0, release: 0, renew: 0, lookup: 0 }
  override claim (key: string, fingerprint: string | undefined, lockTtl: number) { this.calls.claim++; return super.claim(key, fingerprint, lockTtl) }
  override async complete (key: string, token: string, response: StoredResponse, ttl: number | null) {
    const saved = await super.complete(key, token, response, ttl)
    this.calls.complete++
    return saved
  }

  override release (key: string, token: string) { this.calls.release++; return super.release(key, token) }
  override renew (key: string, token: string, lockTtl: number) { this.calls.renew++; return super.renew(key, token, lockTtl) }
  override lookup (key: string) { this.calls.lookup++; return super.lookup(key) }
}

let client: Redis
/** A store on the test's Redis, under a prefix no other test uses, closed at the end. */
function sharedStore (t: Test, prefix = uniquePrefix('cache')): CountingStore {
  const store = new CountingStore({ client, prefix })
  t.teardown(() => store.close())
  return store
}

const post = (app: Awaited<ReturnType<typeof build>>, key: string, body: object = { a: 1 }, user = 'u1') =>
  app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': key, 'x-user': user }, payload: body })

async function cachedApp (t: Test, options: object = {}) {
  const store = sharedStore(t)
  const app = await build(t, { store, scope: (request) => String(request.headers['x-user']), ...options })
  let runs = 0
  app.post('/', async () => ({ run: ++runs }))
  await app.ready()
  return { app, store, runs: () => runs }
}

withRedis(t, (t) => {
  let server: RedisServer
  t.before(async () => {
    server = await startRedis()
    client = new Redis({ host: '127.0.0.1', port: server.port })
  })
  t.teardown(async () => {
    client?.disconnect()
    await server?.stop()
  })

  t.test('a record this process saved: its first replay asks the store, the next ones do not; fingerprint and scope apply', async (t) => {
    const { app, store, runs } = await cachedApp(t)
    const first = await post(app, 'k')
    await until(() => store.calls.complete === 1)
    const claims = store.calls.claim
    for (let i = 0; i < 5; i++) {
      const replay = await post(app, 'k')
      t.equal(replay.headers['idempotent-replayed'], 'true')
      t.equal(replay.body, first.body)
    }
    t.equal(store.calls.claim, claims + 1, 'one store call for the five replays: the save was not copied, the first replay was')
    const mismatch = await post(app, 'k', { a: 2 })
    t.equal(mismatch.statusCode, 422, 'a different body is still a 422, from the copy')
    t.equal(store.calls.claim, claims + 1)
    const otherUser = await post(app, 'k', { a: 1 }, 'u2')
    t.equal(otherUser.headers['idempotent-replayed'], undefined, 'another scope is another key: it runs')
    t.equal(runs(), 2)
  })

  t.test('a replay from the copy is sent in the same turn as the route\'s preHandlers; one the store answers is not', async (t) => {
    const store = sharedStore(t)
    const app = await build(t, { store, scope: (request) => String(request.headers['x-user']) })
    type Marked = { sameTurn?: boolean }
    const sameTurn: boolean[] = []
    app.post('/', {
      preHandler (request, _reply, done) {
        (request as Marked).sameTurn = true
        queueMicrotask(() => { (request as Marked).sameTurn = false })
        done()
      },
      onSend (request, _reply, payload, done) {
        sameTurn.push((request as Marked).sameTurn === true)
        done(null, payload)
      }
    }, async () => ({ ok: true }))
    await app.ready()
    await post(app, 'k')
    await until(() => store.calls.complete === 1)
    const claims = store.calls.claim
    t.equal((await post(app, 'k')).headers['idempotent-replayed'], 'true', 'fetched from the store')
    t.equal((await post(app, 'k')).headers['idempotent-replayed'], 'true', 'replayed from the copy')
    t.equal(store.calls.claim, claims + 1)
    t.same(sameTurn, [false, false, true], 'the first run and the fetched replay waited for Redis; the copy answered at once')
  })

  t.test('a record another process saved is fetched once, then replayed from the copy', async (t) => {
    const { app, store } = await cachedApp(t)
    // Another process completes the key in the shared store.
    const other = await build(t, { store, scope: (request) => String(request.headers['x-user']), replayCache: 0 })
    other.post('/', async () => ({ by: 'other' }))
    const theirs = await post(other, 'k')
    await until(() => store.calls.complete === 1)
    const before = store.calls.claim
    const fetched = await post(app, 'k')
    t.equal(fetched.body, theirs.body)
    t.equal(store.calls.claim, before + 1, 'fetched once')
    await post(app, 'k')
    await post(app, 'k')
    t.equal(store.calls.claim, before + 1, 'then answered from the copy')
  })

  t.test('a copy never outlives the store\'s record', async (t) => {
    const { app, store, runs } = await cachedApp(t, { ttl: '300ms' })
    await post(app, 'k')
    await until(() => store.calls.complete === 1)
    t.equal((await post(app, 'k')).headers['idempotent-replayed'], 'true')
    const claims = store.calls.claim
    t.equal((await post(app, 'k')).headers['idempotent-replayed'], 'true')
    t.equal(store.calls.claim, claims, 'from the copy')
    await sleep(320)
    const after = await post(app, 'k')
    t.equal(after.headers['idempotent-replayed'], undefined, 'expired in the store and in the copy: it runs again')
    t.equal(runs(), 2)
  })

  t.test('ttl null: a copy never expires either (the record does not)', async (t) => {
    const { app, store } = await cachedApp(t, { ttl: null })
    await post(app, 'k')
    await until(() => store.calls.complete === 1)
    t.equal((await post(app, 'k')).headers['idempotent-replayed'], 'true', 'fetched')
    const claims = store.calls.claim
    t.equal((await post(app, 'k')).headers['idempotent-replayed'], 'true')
    t.equal(store.calls.claim, claims, 'answered from the copy')
  })

  t.test('in-flight claims are never cached', async (t) => {
    const store = sharedStore(t)
    const app = await build(t, { store })
    const slow = heldHandler('done')
    app.post('/', slow.handler)
    const original = post(app, 'k')
    await until(() => store.calls.claim === 1)
    t.equal((await post(app, 'k')).statusCode, 409)
    t.equal((await post(app, 'k')).statusCode, 409)
    t.equal(store.calls.claim, 3, 'each duplicate asked the store')
    slow.open()
    await original
  })

  t.test('replayCache: 0 turns it off; a memory store is never wrapped', async (t) => {
    const { app, store } = await cachedApp(t, { replayCache: 0 })
    await post(app, 'k')
    await until(() => store.calls.complete === 1)
    await post(app, 'k')
    await post(app, 'k')
    await post(app, 'k')
    t.equal(store.calls.claim, 4, 'every replay asked the store')
    const memory = await build(t)
    t.ok(memory.idempotency.store instanceof MemoryStore)
  })

  t.test('bounded by bytes, least recently used first; a response bigger than the bound is not copied', async (t) => {
    const store = sharedStore(t)
    const cache = new ReplayCache(store, 2000)
    /** Saves a response for `key`, then fetches it once, which copies it. */
    const save = async (key: string, size: number) => {
      const { token } = await cache.claim(key, 'fp', 60_000)
      await cache.complete(key, token as string, { statusCode: 200, headers: {}, body: Buffer.alloc(size) }, 60_000)
      await cache.claim(key, 'fp', 60_000)
    }
    await save('a', 500)
    await save('b', 500)
    t.ok(cache.size > 1000 && cache.size <= 2000, `two copies (${cache.size} bytes)`)
    await cache.claim('a', 'fp', 60_000) // a is now the most recently used
    await save('c', 500)
    t.ok(cache.size <= 2000, `within the bound (${cache.size} bytes)`)
    const claims = store.calls.claim
    await cache.claim('a', 'fp', 60_000)
    await cache.claim('c', 'fp', 60_000)
    t.equal(store.calls.claim, claims, 'a and c are copies')
    await cache.claim('b', 'fp', 60_000)
    t.equal(store.calls.claim, claims + 1, 'b, the least recently used, was dropped')
    await save('huge', 5000)
    await cache.claim('huge', 'fp', 60_000)
    t.equal(store.calls.claim, claims + 4, 'a response bigger than the bound is never copied')
    t.equal((await cache.lookup?.('b'))?.state, 'completed', 'lookup reads the copy too (b was fetched, so copied)')
    t.equal(store.calls.lookup, 0)
    t.equal((await cache.lookup?.('huge'))?.state, 'completed', 'and asks the store for what it has no copy of')
    t.equal(store.calls.lookup, 1)
  })

  t.test('two replays of one key fetched at once keep one copy, counted once', async (t) => {
    const store = sharedStore(t)
    const { token } = await store.claim('k', 'fp', 60_000)
    await store.complete('k', token as string, { statusCode: 200, headers: {}, body: Buffer.alloc(500) }, 60_000)
    const once = new ReplayCache(store, 10_000)
    await once.claim('k', 'fp', 60_000)
    const twice = new ReplayCache(store, 10_000)
    const [a, b] = await Promise.all([twice.claim('k', 'fp', 60_000), twice.claim('k', 'fp', 60_000)])
    t.same([a.record?.state, b.record?.state], ['completed', 'completed'])
    t.ok(once.size > 500)
    t.equal(twice.size, once.size, 'the second copy replaced the first')
  })

  t.test('a claim whose lease is lost leaves nothing behind', async (t) => {
    const store = sharedStore(t)
    const cache = new ReplayCache(store, 10_000)
    const { token } = await cache.claim('k', 'fp', 60_000)
    t.equal(await cache.renew('k', 'not-the-token', 60_000), false)
    t.equal(await cache.renew('k', token as string, 60_000), true)
    t.equal(await cache.release('k', token as string), true)
    t.equal(store.calls.renew, 2)
  })
})
