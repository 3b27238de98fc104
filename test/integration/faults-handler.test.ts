/**
 * Handler faults on real sockets, against both stores: a handler that throws,
 * rejects or outlives `handlerTimeout`; a connection cut by `connectionTimeout`
 * or by the client; a request body that never arrives (`requestTimeout`). The
 * claim is always released or completed, never stuck, and a retry gets what the
 * README says. And a slow handler that outlives its lease (renewal disabled on
 * purpose): the fence refuses its late completion, so the new owner's saved
 * response stands.
 */
import { createServer, request as httpRequest } from 'node:http'
import { connect, type AddressInfo } from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'
import t, { type Test } from 'tap'
import type { FastifyInstance, FastifyServerOptions } from 'fastify'
import { Redis } from 'ioredis'
import { MemoryStore, RedisStore } from '../../index.js'
import type { ClaimResult, FastifyIdempotencyOptions, IdempotencyStore, StoredResponse } from '../../index.js'
import { build, capturingLogger, ERROR, gate, heldHandler, until, type LogLine } from '../helpers/app.js'
import { startRedis, uniquePrefix, withRedis } from '../../support/redis.js'

/**
 * Wraps a store and records what the plugin asked and what the store said.
 * With `renewal: false`, renew() answers true without renewing: the lease
 * runs out while the handler still works, as if the renewal timer had stalled.
 */
class Watched implements IdempotencyStore {
  claims: Array<{ key: string, result: ClaimResult }> = []
  completes: Array<{ key: string, token: string, saved: boolean }> = []
  releases: Array<{ key: string, released: boolean }> = []
  renewal = true

  constructor (readonly inner: IdempotencyStore) {}

  async claim (key: string, fingerprint: string | undefined, lockTtl: number) {
    const result = await this.inner.claim(key, fingerprint, lockTtl)
    this.claims.push({ key, result })
    return result
  }

  async complete (key: string, token: string, response: StoredResponse, ttl: number | null) {
    const saved = await this.inner.complete(key, token, response, ttl)
    this.completes.push({ key, token, saved })
    return saved
  }

  async release (key: string, token: string) {
    const released = await this.inner.release(key, token)
    this.releases.push({ key, released })
    return released
  }

  async renew (key: string, token: string, lockTtl: number) {
    return this.renewal ? await this.inner.renew(key, token, lockTtl) : true
  }

  /** What a new claim of `key` finds now: 'free' (and lets it go again), 'in-flight' or 'completed'. */
  async state (key: string): Promise<string> {
    const result = await this.inner.claim(key, undefined, 60_000)
    if (result.token === undefined) return result.record.state
    await this.inner.release(key, result.token)
    return 'free'
  }
}

interface Answer { status: number, body: string, replayed: boolean, error?: string }

/** The fault scenarios, on one kind of store (`make` gives a fresh one per app). */
function faults (t: Test, make: () => IdempotencyStore) {
  async function listen (t: Test, options: FastifyIdempotencyOptions, server: FastifyServerOptions = {}) {
    const store = new Watched(make())
    t.teardown(() => store.inner.close?.())
    const app = await build(t, { store, ...options }, server)
    return { app, store }
  }

  async function start (app: FastifyInstance) {
    await app.listen({ port: 0, host: '127.0.0.1' })
    const { port } = app.server.address() as AddressInfo
    /** POSTs to /pay with `key`, and a JSON body unless `body` is null. */
    const post = async (key: string, body: string | null = '{"amount":1}'): Promise<Answer> => {
      try {
        const res = await fetch(`http://127.0.0.1:${port}/pay`, {
          method: 'POST',
          headers: { 'idempotency-key': key, ...(body === null ? {} : { 'content-type': 'application/json' }) },
          ...(body === null ? {} : { body }),
          signal: AbortSignal.timeout(5000)
        })
        return { status: res.status, body: await res.text(), replayed: res.headers.get('idempotent-replayed') === 'true' }
      } catch (err) {
        return { status: 0, body: '', replayed: false, error: String(err) }
      }
    }
    return { port, post }
  }

  t.test('a handler that throws, or rejects: 500, the claim is released, a retry runs it again and is then replayed', async (t) => {
    const { app, store } = await listen(t, {})
    const runs = { sync: 0, async: 0 }
    app.post('/pay', (request, reply) => {
      const mode = (request.headers['idempotency-key'] as string).split('-')[0] as 'sync' | 'async'
      const run = ++runs[mode]
      if (mode === 'sync') {
        if (run === 1) throw new Error('thrown')
        return reply.send({ run })
      }
      return run === 1 ? Promise.reject(new Error('rejected')) : Promise.resolve({ run })
    })
    const { post } = await start(app)
    for (const key of ['sync-1', 'async-1']) {
      const failed = await post(key)
      t.equal(failed.status, 500, `${key}: the error answers`)
      t.equal(await store.state(store.claims[store.claims.length - 1].key), 'free', `${key}: the claim was released`)
      const retry = await post(key)
      t.equal(retry.status, 200, `${key}: the retry runs the handler again`)
      t.same(JSON.parse(retry.body), { run: 2 })
      const replay = await post(key)
      t.ok(replay.replayed, `${key}: and is replayed after that`)
      t.equal(replay.body, retry.body)
    }
    t.same(runs, { sync: 2, async: 2 })
  })

  // Without a body: Fastify 5.12 clears the handler timer when a request's body has been read on a
  // real socket (the IncomingMessage closes), so handlerTimeout only fires for body-less requests there.
  t.test('handlerTimeout: 503 at once, the claim held (409) until the handler ends, then released; the retry runs it', async (t) => {
    const { app, store } = await listen(t, {}, { handlerTimeout: 100 })
    const slow = gate()
    let runs = 0
    let running = 0
    app.post('/pay', async () => {
      running++
      try {
        if (++runs === 1) await slow.promise
        return { run: runs }
      } finally {
        running--
      }
    })
    const { post: postWithBody } = await start(app)
    const post = (key: string) => postWithBody(key, null)
    const timedOut = await post('k')
    t.equal(timedOut.status, 503)
    t.match(JSON.parse(timedOut.body), { code: 'FST_ERR_HANDLER_TIMEOUT' })
    t.equal(running, 1, 'the handler is still running')
    t.equal((await post('k')).status, 409, 'a retry meanwhile is refused, not run in parallel')
    t.equal(await store.state(store.claims[0].key), 'in-flight', 'the store holds the claim')
    slow.open()
    await until(() => store.releases.length === 1)
    t.strictSame(store.releases, [{ key: store.claims[0].key, released: true }], 'released when the handler ended')
    t.strictSame(store.completes, [], 'the late result is not saved: nobody received it')
    const retry = await post('k')
    t.equal(retry.status, 200)
    t.same(JSON.parse(retry.body), { run: 2 })
    t.ok((await post('k')).replayed)
    t.equal(runs, 2)
  })

  t.test('connectionTimeout cuts the connection while the handler runs: the result is saved, the retry replays it', async (t) => {
    const { app, store } = await listen(t, {}, { connectionTimeout: 150 })
    const slow = heldHandler(({ run, reply }) => {
      reply.code(201)
      return { charged: run }
    })
    app.post('/pay', slow.handler)
    const { post } = await start(app)
    const cut = await post('k')
    t.equal(cut.status, 0, `the client lost the connection (${cut.error})`)
    t.equal(slow.runs(), 1)
    t.equal((await post('k')).status, 409, 'the handler still runs: its claim is held')
    slow.open()
    await until(() => store.completes.length === 1)
    t.equal(store.completes[0].saved, true, 'the result was saved')
    const retry = await post('k')
    t.equal(retry.status, 201)
    t.ok(retry.replayed, 'the retry replays the result the client never received')
    t.same(JSON.parse(retry.body), { charged: 1 })
    t.equal(slow.runs(), 1)
  })

  t.test('the client disconnects before the reply: the result is saved, the retry replays it', async (t) => {
    const { app, store } = await listen(t, {})
    const slow = heldHandler(({ run }) => ({ charged: run }))
    app.post('/pay', slow.handler)
    const { port, post } = await start(app)
    const req = httpRequest({ host: '127.0.0.1', port, method: 'POST', path: '/pay', headers: { 'idempotency-key': 'k', 'content-type': 'application/json' } })
    const gone = new Promise((resolve) => req.on('error', resolve))
    req.end('{"amount":1}')
    await until(() => slow.runs() === 1)
    req.destroy()
    await gone
    t.equal((await post('k')).status, 409)
    slow.open()
    await until(() => store.completes.length === 1)
    const retry = await post('k')
    t.ok(retry.replayed)
    t.same(JSON.parse(retry.body), { charged: 1 })
    t.equal(slow.runs(), 1)
  })

  t.test('requestTimeout: a body that never arrives is answered 408; the key was never claimed, the retry runs once', async (t) => {
    // Node checks request timeouts every connectionsCheckingInterval (30 s by default); Fastify's own
    // `http` option does not reach it, so the server is made here.
    const { app, store } = await listen(t, {}, {
      requestTimeout: 200,
      serverFactory: (handler) => createServer({ requestTimeout: 200, connectionsCheckingInterval: 50 }, handler)
    })
    let runs = 0
    app.post('/pay', async () => ({ run: ++runs }))
    const { port, post } = await start(app)
    const answer = await new Promise<string>((resolve) => {
      const socket = connect({ host: '127.0.0.1', port })
      let text = ''
      socket.on('data', (chunk) => { text += chunk })
      socket.on('error', () => {})
      socket.on('close', () => resolve(text))
      // Headers, then half the body, then nothing.
      socket.write('POST /pay HTTP/1.1\r\nHost: x\r\nIdempotency-Key: k\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n{"amount"')
    })
    t.match(answer, /^HTTP\/1\.1 408/, 'Node answered 408 Request Timeout')
    t.equal(runs, 0)
    t.strictSame(store.claims, [], 'the claim step never ran: the body was never complete')
    const retry = await post('k')
    t.equal(retry.status, 200)
    t.equal((await post('k')).body, retry.body)
    t.equal(runs, 1)
  })

  t.test('renewal disabled: a handler that outlives its lease cannot save over the new owner\'s response (fenced)', async (t) => {
    for (const order of ['the stale owner ends first', 'the new owner ends first']) {
      const lines: LogLine[] = []
      const { app, store } = await listen(t, { lockTtl: 1000 }, capturingLogger(lines))
      store.renewal = false
      const stale = gate()
      const fresh = gate()
      let runs = 0
      app.post('/pay', async () => {
        const run = ++runs
        await (run === 1 ? stale.promise : fresh.promise)
        return { run }
      })
      const { post } = await start(app)
      const first = post('k')
      await until(() => runs === 1)
      await sleep(2000) // twice lockTtl: the lease is gone, and nothing renewed it
      const second = post('k')
      await until(() => runs === 2)
      t.equal(runs, 2, `${order}: the key was claimed again once the lease expired`)
      if (order === 'the stale owner ends first') {
        stale.open()
        t.same(JSON.parse((await first).body), { run: 1 }, `${order}: the stale owner still answers its client`)
        fresh.open()
      } else {
        fresh.open()
        await second
        stale.open()
        await first
      }
      t.same(JSON.parse((await second).body), { run: 2 })
      await until(() => store.completes.length === 2)
      const [byStale] = store.completes.filter((c) => c.token === store.claims[0].result.token)
      const [byFresh] = store.completes.filter((c) => c.token === store.claims[1].result.token)
      t.equal(byStale.saved, false, `${order}: the stale owner's completion was refused`)
      t.equal(byFresh.saved, true, `${order}: the new owner's was saved`)
      const replay = await post('k')
      t.ok(replay.replayed)
      t.same(JSON.parse(replay.body), { run: 2 }, `${order}: the saved response is the new owner's`)
      t.equal(runs, 2)
      const logged = lines.filter((l) => l.level === ERROR && /the response was not saved/.test(l.msg))
      t.equal(logged.length, 1, `${order}: the refusal is logged at error level`)
      t.match(logged[0]?.idempotencyKey, /^idem:[\w-]{43}$/, 'with the hashed store key')
      await app.close()
    }
  })
}

t.test('memory store', async (t) => {
  faults(t, () => new MemoryStore())
})

t.test('Redis store', async (t) => {
  withRedis(t, (t) => {
    const clients: Redis[] = []
    let port = 0
    t.before(async () => {
      const server = await startRedis()
      t.teardown(() => server.stop())
      port = server.port
    })
    t.teardown(() => { for (const client of clients) client.disconnect() })
    faults(t, () => {
      const client = new Redis({ host: '127.0.0.1', port })
      clients.push(client)
      return new RedisStore({ client, prefix: uniquePrefix('handler-faults') })
    })
  })
})
