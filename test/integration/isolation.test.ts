/**
 * Isolation and security, on both stores: with `scope` from a real auth hook,
 * one user never receives another's response; replays never carry another
 * request's cookies (unless `replaySetCookie`) or hop-by-hop headers; and on
 * Redis, client input only ever reaches the server hashed by the key encoder
 * or as a script argument, never as a raw key or inside a script, on every
 * path (first request, replay, mismatch, release, waits, renewals, fail-open
 * and fail-closed).
 */
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto'
import { setTimeout as sleep } from 'node:timers/promises'
import t, { type Test } from 'tap'
import '../helpers/crash-guard.js'
import fp from 'fastify-plugin'
import Fastify, { type FastifyInstance, type FastifyRequest } from 'fastify'
import fastifyRedis from '@fastify/redis'
import { Redis } from 'ioredis'
import fastifyIdempotency, { MemoryStore, defaultKeyEncoder } from '../../index.js'
import type { CompletedRecord, FastifyIdempotencyOptions, KeyParts } from '../../index.js'
import { localKeyEncoder } from '../../lib/key-encoder.js'
import { startRedis, withRedis, type RedisServer } from '../../support/redis.js'

declare module 'fastify' {
  interface FastifyRequest {
    user?: { id: string }
  }
}

/** A real auth plugin: `Authorization: Bearer <user>.<HMAC of user>`, checked in onRequest; 401 otherwise. */
const SECRET = randomBytes(32)
const tokenOf = (user: string) => `${user}.${createHmac('sha256', SECRET).update(user).digest('base64url')}`
const auth = fp(async (app: FastifyInstance) => {
  app.addHook('onRequest', async (request: FastifyRequest) => {
    const [user = '', mac = ''] = String(request.headers.authorization).replace(/^Bearer /, '').split('.')
    const expected = Buffer.from(tokenOf(user).split('.')[1])
    const given = Buffer.from(mac)
    if (user === '' || given.length !== expected.length || !timingSafeEqual(given, expected)) {
      throw Object.assign(new Error('unauthorized'), { statusCode: 401 })
    }
    request.user = { id: user }
  })
})

/** The store key the default encoder gives `parts` on `app`'s store: unhashed on the memory store, hashed on a shared one. */
function storeKeyOf (app: FastifyInstance, parts: KeyParts): string {
  return (app.idempotency.store instanceof MemoryStore ? localKeyEncoder : defaultKeyEncoder)(parts)
}

/** What a user's account holds: the data a leaked response would expose. */
const secretOf = (user: string) => createHmac('sha256', SECRET).update('account:' + user).digest('hex')

type StoreChoice = (t: Test) => Promise<{ register: (app: FastifyInstance, options: FastifyIdempotencyOptions) => Promise<void> }>

function isolation (t: Test, choose: StoreChoice) {
  async function bankApp (t: Test, options: FastifyIdempotencyOptions) {
    const { register } = await choose(t)
    const app = Fastify()
    t.teardown(() => app.close())
    await app.register(auth)
    await register(app, { stats: false, ...options })
    const runs: string[] = []
    app.post('/transfers', async (request, reply) => {
      const user = (request.user as { id: string }).id
      runs.push(user)
      reply.header('set-cookie', `session=${user}-${runs.length}; HttpOnly`)
      reply.code(201)
      return { owner: user, account: secretOf(user), run: runs.length }
    })
    await app.ready()
    const send = (user: string | undefined, key: string, payload: object = { amount: 100 }) => app.inject({
      method: 'POST',
      url: '/transfers',
      headers: { 'idempotency-key': key, ...(user === undefined ? {} : { authorization: user.includes('.') ? `Bearer ${user}` : `Bearer ${tokenOf(user)}` }) },
      payload
    })
    return { app, runs, send }
  }

  t.test('user B sending user A\'s key (same body) runs B\'s own request and never sees A\'s response', async (t) => {
    const { app, runs, send } = await bankApp(t, { scope: (request) => request.user?.id })
    const alice = await send('alice', 'shared-key')
    t.equal(alice.statusCode, 201)
    t.equal(alice.json().owner, 'alice')
    const bob = await send('bob', 'shared-key')
    t.equal(bob.statusCode, 201, 'not a replay, not a 409, not a 422')
    t.equal(bob.headers['idempotent-replayed'], undefined)
    t.same(bob.json(), { owner: 'bob', account: secretOf('bob'), run: 2 })
    t.notOk(bob.body.includes(secretOf('alice')), 'nothing of alice\'s response reaches bob')
    t.notOk(String(bob.headers['set-cookie']).includes('alice'), 'nor her cookie')
    const [aliceAgain, bobAgain] = await Promise.all([send('alice', 'shared-key'), send('bob', 'shared-key')])
    t.equal(aliceAgain.body, alice.body, 'each replays their own')
    t.equal(bobAgain.body, bob.body)
    t.same([aliceAgain.headers['idempotent-replayed'], bobAgain.headers['idempotent-replayed']], ['true', 'true'])

    // Both at once with a fresh key: two principals, two runs; neither is told the other is in flight.
    const both = await Promise.all([send('alice', 'race'), send('bob', 'race')])
    t.same(both.map((res) => [res.statusCode, res.json().owner]), [[201, 'alice'], [201, 'bob']])

    // A key that looks like alice's store key is only bob's key.
    const aliceStoreKey = storeKeyOf(app, { scope: 'alice', method: 'POST', path: '/transfers', key: 'shared-key' })
    const forged = await send('bob', aliceStoreKey)
    t.equal(forged.json().owner, 'bob')
    t.equal(forged.headers['idempotent-replayed'], undefined)

    // Without valid credentials nothing reaches the claim: 401, the handler does not run.
    const before = runs.length
    t.equal((await send(undefined, 'shared-key')).statusCode, 401)
    t.equal((await send(`alice.${'A'.repeat(43)}`, 'shared-key')).statusCode, 401, 'a forged token')
    t.equal(runs.length, before)
    t.strictSame(runs, ['alice', 'bob', 'alice', 'bob', 'bob'])
  })

  t.test('replays carry neither the first request\'s cookies nor its hop-by-hop headers', async (t) => {
    const { register } = await choose(t)
    const app = Fastify()
    t.teardown(() => app.close())
    await register(app, { stats: false })
    let runs = 0
    app.post('/orders', async (_request, reply) => {
      runs++
      reply.header('set-cookie', [`session=s${runs}; HttpOnly`, 'theme=dark'])
      // Connection names x-hop: it is hop-by-hop too (RFC 9110, 7.6.1).
      reply.header('connection', 'keep-alive, x-hop')
      reply.header('x-hop', 'for-this-hop-only')
      reply.header('keep-alive', 'timeout=5')
      reply.header('proxy-authenticate', 'Basic')
      reply.header('upgrade', 'h2c')
      reply.header('x-order', 'kept')
      return { order: runs }
    })
    await app.ready()
    const send = (key: string) => app.inject({ method: 'POST', url: '/orders', headers: { 'idempotency-key': key }, payload: {} })
    const first = await send('k')
    t.same(first.headers['set-cookie'], ['session=s1; HttpOnly', 'theme=dark'], 'the first client gets its cookies')
    const replay = await send('k')
    t.equal(replay.headers['idempotent-replayed'], 'true')
    t.equal(runs, 1)
    t.equal(replay.headers['set-cookie'], undefined, 'no cookie on the replay')
    t.equal(replay.headers['x-order'], 'kept')
    const storeKey = storeKeyOf(app, { scope: undefined, method: 'POST', path: '/orders', key: 'k' })
    const saved = (await app.idempotency.store.claim(storeKey, undefined, 1000)).record as CompletedRecord
    t.strictSame(Object.keys(saved.response.headers).sort(), ['content-type', 'x-order'],
      'only end-to-end headers are saved: no cookie, no hop-by-hop header, none that Connection names')
    t.equal(replay.headers['x-hop'], undefined)
    t.not(replay.headers['keep-alive'], 'timeout=5')
  })

  t.test('with replaySetCookie, the replay carries the first response\'s cookies (which is why it is off by default)', async (t) => {
    const { send } = await bankApp(t, { replaySetCookie: true })
    const alice = await send('alice', 'unscoped')
    const bob = await send('bob', 'unscoped')
    t.equal(bob.headers['idempotent-replayed'], 'true', 'no scope: the key is shared')
    t.equal(bob.headers['set-cookie'], alice.headers['set-cookie'], 'and so is the cookie')
    t.equal(bob.headers['set-cookie'], 'session=alice-1; HttpOnly', 'alice\'s session cookie, handed to bob')
  })
}

t.test('memory store', async (t) => {
  isolation(t, async () => ({
    register: async (app, options) => { await app.register(fastifyIdempotency, options) }
  }))
})

t.test('Redis store (@fastify/redis)', async (t) => {
  withRedis(t, (t) => {
    let server: RedisServer
    t.before(async () => { server = await startRedis() })
    t.teardown(() => server?.stop())
    isolation(t, async (t) => ({
      register: async (app, options) => {
        await app.register(fastifyRedis, { host: '127.0.0.1', port: server.port, closeClient: true })
        await app.register(fastifyIdempotency, { store: 'redis', ...options })
        t.teardown(() => app.redis.flushall())
      }
    }))

    t.test('client input reaches Redis only hashed into the key or as a script argument, on every path', async (t) => {
      const watcher = new Redis({ host: '127.0.0.1', port: server.port })
      t.teardown(() => watcher.disconnect())
      await watcher.ping()
      const watcherClient = `${watcher.stream.localAddress}:${watcher.stream.localPort}`
      const monitor = await watcher.monitor()
      t.teardown(() => monitor.disconnect())
      const seen: Array<{ args: string[], source: string }> = []
      monitor.on('monitor', (_time: string, args: string[], source: string) => { seen.push({ args, source }) })

      const app = Fastify()
      t.teardown(() => app.close())
      await app.register(fastifyRedis, { host: '127.0.0.1', port: server.port, closeClient: true })
      await app.register(fastifyIdempotency, {
        store: 'redis',
        storeTimeout: 150,
        lockTtl: 1000,
        inFlight: { wait: 2000 },
        // The worst case: the scope comes straight from a client header.
        scope: (request) => request.headers['x-tenant'] as string | undefined,
        stats: false
      })
      let runs = 0
      app.post('/pay', async (request) => {
        runs++
        const { ms = 0, fail = false } = request.body as { ms?: number, fail?: boolean }
        await sleep(ms)
        if (fail) throw new Error('declined')
        return { ok: true }
      })
      app.post('/open', { config: { idempotency: { onStoreError: 'fail-open' } } }, async () => ({ open: ++runs }))
      await app.ready()
      const appClient = `${app.redis.stream.localAddress}:${app.redis.stream.localPort}`

      // The keys as decoded; each is sent as a quoted sf-string.
      const hostileKeys = [
        ']]) redis.call(\'FLUSHALL\') --',
        'idempotency:{idem:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA}',
        '{x}{y} * ? [a] " \\ \'',
        '{'.repeat(255),
        'k'.repeat(255),
        'KEYS|*|SCAN|0'
      ]
      const hostileScopes = ['tenant\nFLUSHDB', '{evil}', 'x'.repeat(10_000)]
      const hostileQuery = "q=') redis.call('DEL','*')--"
      const send = (key: string, tenant: string, body: object, url = '/pay') => app.inject({
        method: 'POST',
        url: `${url}?${encodeURIComponent(hostileQuery)}`,
        headers: { 'idempotency-key': '"' + key.replace(/[\\"]/g, (c) => '\\' + c) + '"', 'x-tenant': tenant },
        payload: body
      })

      for (const [i, key] of hostileKeys.entries()) {
        const tenant = hostileScopes[i % hostileScopes.length]
        const first = await send(key, tenant, { note: key })
        t.equal(first.statusCode, 200, `first request, key ${i}`)
        t.equal((await send(key, tenant, { note: key })).headers['idempotent-replayed'], 'true', `replay, key ${i}`)
        t.equal((await send(key, tenant, { note: 'other' })).statusCode, 422, `mismatch, key ${i}`)
      }
      const failed = await send(hostileKeys[0], 'release-path', { fail: true })
      t.equal(failed.statusCode, 500, 'a failing handler: its claim is released')
      // A slow original (its lease renewed) and a duplicate that waits for it, polling.
      const [slow, waiter] = await Promise.all([
        send(hostileKeys[1], 'wait-path', { ms: 400 }),
        sleep(50).then(() => send(hostileKeys[1], 'wait-path', { ms: 400 }))
      ])
      t.same([slow.statusCode, waiter.statusCode], [200, 200])
      t.equal([slow, waiter].filter((res) => res.headers['idempotent-replayed'] === 'true').length, 1, 'one ran, the other waited and replays it')
      t.equal(waiter.body, slow.body)
      // Redis stops taking writes: the claim times out; fail-closed refuses, fail-open runs.
      await watcher.call('CLIENT', 'PAUSE', '400', 'WRITE')
      const closed = await send(hostileKeys[2], 'paused', {})
      const open = await send(hostileKeys[2], 'paused', {}, '/open')
      t.equal(closed.statusCode, 503, 'fail-closed while Redis is paused')
      t.equal(open.statusCode, 200, 'fail-open while Redis is paused')
      await sleep(600) // the pause ends, and the claims that timed out run (and are released)

      // The app's connections: its client, and the store's read connection (lookups after a failed claim);
      // not the commands that the scripts run (MONITOR shows them too, as from "lua").
      const fromApp = seen.filter((command) => command.source !== watcherClient && command.source !== 'lua')
      t.ok(fromApp.some((command) => command.source === appClient), 'the app\'s client was seen')
      const scripts = fromApp.filter((command) => ['evalsha', 'eval'].includes(command.args[0].toLowerCase()))
      t.ok(scripts.length >= 30, `${scripts.length} script calls seen (replays of this process's records are answered from its replay cache)`)
      const reads = fromApp.filter((command) => ['hmget', 'pttl'].includes(command.args[0].toLowerCase()))
      t.ok(reads.length >= 2, `the claims that timed out during the pause were followed by reads (${reads.length})`)
      const others = [...new Set(fromApp.filter((command) => !scripts.includes(command) && !reads.includes(command)).map((command) => command.args[0].toLowerCase()))]
      t.strictSame(others.filter((name) => !['info', 'client', 'hello', 'select', 'ping'].includes(name)), [],
        `no other command on the request path (connection set-up only: ${others.join(', ')})`)
      const recordKey = /^idempotency:\{idem:[A-Za-z0-9_-]{43}\}$/
      t.strictSame(scripts.filter((command) => command.args[2] !== '1' || !recordKey.test(command.args[3])).map((command) => command.args.slice(0, 4)), [],
        'every script call names one key: the prefix and a hashed store key, 62 characters')
      t.strictSame(reads.filter((command) => !recordKey.test(command.args[1])).map((command) => command.args.slice(0, 2)), [], 'and every read')
      const inputs = [...hostileKeys, ...hostileScopes, hostileQuery, encodeURIComponent(hostileQuery), 'FLUSHALL', 'FLUSHDB']
      const leaked = fromApp.filter((command) => command.args.slice(1).some((arg) => inputs.some((input) => arg.includes(input))))
      t.strictSame(leaked.map((command) => command.args.slice(0, 4)), [], 'no client input appears in any command (it reaches Redis as hashes only)')
      const sources = new Set(scripts.filter((command) => command.args[0].toLowerCase() === 'eval').map((command) => command.args[1]))
      t.ok(sources.size <= 4, `scripts are the module's own, never built from input (${sources.size} sources sent)`)
      const stored = await watcher.keys('*')
      t.ok(stored.length > 0 && stored.every((key) => recordKey.test(key)), `every key in Redis is a record key (${stored.length})`)
      t.equal(runs, hostileKeys.length + 3, 'each key ran once; the failing, slow and fail-open requests once each')
    })
  })
})
