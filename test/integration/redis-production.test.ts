/**
 * The plugin on Redis as it fails in production, through real redis-server
 * processes and a fault-injecting proxy: an owner cut off from Redis learns
 * it (its signal aborts) before a duplicate can claim its key; evicting
 * policies are warned about or refused at start-up; a full Redis still takes
 * the saves of claims it holds; a dead connection with `socketTimeout` heals
 * within seconds; completed keys replay during a write pause; two services
 * on one Redis keep their records and stats apart by namespace; the stats
 * page shows Redis's memory, policy and in-flight claims; replicas are
 * waited for when asked.
 */
import t, { type Test } from 'tap'
import fastifyRedis from '@fastify/redis'
import Fastify, { type FastifyInstance } from 'fastify'
import { Redis, type RedisOptions } from 'ioredis'
import fastifyIdempotency from '../../index.js'
import type { FastifyIdempotencyOptions } from '../../index.js'
import { resetWarnings } from '../../lib/warnings.js'
import '../helpers/crash-guard.js'
import { capturingLogger, ERROR, gate, heldHandler, sleep, until, type LogLine } from '../helpers/app.js'
import { startProxy } from '../../support/proxy.js'
import { startRedis, uniquePrefix, withRedis, type RedisServer } from '../../support/redis.js'

/** An app with @fastify/redis on `port` (ioredis options added) and the plugin on `store: 'redis'`. */
async function redisApp (t: Test, port: number, options: FastifyIdempotencyOptions = {}, client: RedisOptions = {}, lines?: LogLine[]) {
  const app = Fastify(lines === undefined ? {} : capturingLogger(lines))
  // The test's own client, disconnected rather than QUIT at the end: a connection these tests
  // broke may not answer a QUIT (and @fastify/redis QUITs the clients it makes).
  const redis = new Redis({ host: '127.0.0.1', port, maxRetriesPerRequest: 1, socketTimeout: 1000, ...client })
  redis.on('error', () => {}) // outages are what these tests cause
  t.teardown(async () => {
    await app.close()
    redis.disconnect()
  })
  await app.register(fastifyRedis, { client: redis, closeClient: false })
  await app.register(fastifyIdempotency, { store: 'redis', namespace: uniquePrefix('prod').replace(/:$/, ''), storeTimeout: 300, lockTtl: 1000, scope: () => 'tenant', ...options })
  return app
}

const post = (app: FastifyInstance, key: string, url = '/pay') => app.inject({ method: 'POST', url, headers: { 'idempotency-key': key }, payload: { a: 1 } })

/** The plugin's process warnings emitted while `run` runs. */
async function warningsOf (run: () => Promise<unknown>): Promise<Array<{ code: string, message: string }>> {
  resetWarnings()
  const seen: Array<{ code: string, message: string }> = []
  const listener = (warning: Error & { code?: string }) => {
    if (warning.name === 'FastifyIdempotencyWarning') seen.push({ code: warning.code as string, message: warning.message })
  }
  process.on('warning', listener)
  try {
    await run()
    await sleep(5)
  } finally {
    process.off('warning', listener)
  }
  return seen
}

withRedis(t, (t) => {
  let server: RedisServer
  t.before(async () => { server = await startRedis() })
  t.teardown(async () => { await server?.stop() })

  t.test('an owner cut off from Redis: its signal aborts before its lease can run out, so before a duplicate can claim the key', async (t) => {
    const proxy = await startProxy(server.port)
    t.teardown(() => proxy.stop())
    const namespace = uniquePrefix('cut').replace(/:$/, '')
    const lines: LogLine[] = []
    const owner = await redisApp(t, proxy.port, { namespace }, {}, lines)
    const other = await redisApp(t, server.port, { namespace, replayCache: 0 })
    let abortedAt = 0
    let ownerRuns = 0
    owner.post('/pay', async (_request, reply) => {
      ownerRuns++
      await new Promise<void>((resolve) => {
        reply.idempotency.signal.addEventListener('abort', () => { abortedAt = performance.now(); resolve() })
        setTimeout(resolve, 4000)
      })
      return { by: 'owner' }
    })
    let otherStartedAt = 0
    other.post('/pay', async () => {
      otherStartedAt = performance.now()
      return { by: 'other' }
    })
    await owner.ready()
    await other.ready()
    const original = post(owner, 'k')
    await until(() => ownerRuns === 1)
    proxy.blackhole() // a partition: the owner's renewals never reach Redis
    const tookOver = () => otherStartedAt > 0 // set by the other process's handler
    for (let i = 0; i < 100 && !tookOver(); i++) {
      const duplicate = await post(other, 'k')
      t.ok(duplicate.statusCode === 409 || duplicate.statusCode === 200, `the other process waits or takes over (${duplicate.statusCode})`)
      if (!tookOver()) await sleep(50)
    }
    t.ok(otherStartedAt > 0, 'the other process took the key over once the lease ran out')
    t.ok(abortedAt > 0 && abortedAt < otherStartedAt, `the owner's signal aborted ${Math.round(otherStartedAt - abortedAt)} ms before the duplicate started`)
    proxy.pass()
    await original
    await until(() => lines.some((line) => line.level === ERROR && /(could not be|was not) saved/.test(line.msg)), 600)

    const replay = await post(other, 'k')
    t.same(replay.json(), { by: 'other' }, 'the saved response is the new owner\'s')
  })

  t.test('evicting policies: a coded warning at start-up; redis.requireNoEviction refuses to start', async (t) => {
    const evicting = await startRedis({ maxmemory: '64mb', policy: 'volatile-ttl' })
    t.teardown(() => evicting.stop())
    const warned = await warningsOf(async () => { await (await redisApp(t, evicting.port)).ready() })
    t.same(warned.map((w) => w.code), ['FSTIDEM006'])
    t.match(warned[0].message, /volatile-ttl/)
    const refused = await redisApp(t, evicting.port, { redis: { requireNoEviction: true } })
    await t.rejects(async () => { await refused.ready() }, { code: 'FST_IDEMPOTENCY_REDIS_EVICTION' })
    t.same((await warningsOf(async () => { await (await redisApp(t, server.port)).ready() })).map((w) => w.code), [], 'noeviction: nothing to say')
  })

  t.test('a client without socketTimeout is warned about at start-up', async (t) => {
    const warned = await warningsOf(async () => { await (await redisApp(t, server.port, {}, { socketTimeout: undefined })).ready() })
    t.same(warned.map((w) => w.code), ['FSTIDEM007'])
    t.match(warned[0].message, /no socketTimeout/)
  })

  t.test('a full Redis (noeviction): a claim held before it filled up still saves; new keys are refused with 503', async (t) => {
    const full = await startRedis()
    t.teardown(() => full.stop())
    const admin = new Redis({ host: '127.0.0.1', port: full.port })
    t.teardown(() => admin.disconnect())
    const app = await redisApp(t, full.port, { replayCache: 0 })
    const held = heldHandler({ body: 'x'.repeat(16 * 1024) })
    app.post('/pay', held.handler)
    await app.ready()
    const original = post(app, 'held')
    await until(() => held.runs() === 1)
    const used = Number(/used_memory:(\d+)/.exec(await admin.info('memory'))?.[1])
    await admin.config('SET', 'maxmemory', String(used - 1024 * 1024))
    t.equal((await post(app, 'new')).statusCode, 503, 'a new claim does not fit')
    held.open()
    t.equal((await original).statusCode, 200)
    const replay = await post(app, 'held')
    t.equal(replay.headers['idempotent-replayed'], 'true', 'the 16 KB save fitted: it deletes the token first')
    t.equal(held.runs(), 1)
  })

  t.test('a connection that dies silently: with socketTimeout, 503 within storeTimeout meanwhile, served again seconds after the network heals', async (t) => {
    const proxy = await startProxy(server.port)
    t.teardown(() => proxy.stop())
    const app = await redisApp(t, proxy.port, { replayCache: 0 })
    let runs = 0
    app.post('/pay', async () => ({ run: ++runs }))
    await app.ready()
    t.equal((await post(app, 'before')).statusCode, 200)
    proxy.blackhole()
    for (let i = 0; i < 5; i++) {
      const started = performance.now()
      const res = await post(app, `during-${i}`)
      t.equal(res.statusCode, 503, 'fail-closed while Redis is unreachable')
      t.ok(performance.now() - started < 1500, 'within storeTimeout (and the fail-fast once the connection is known down)')
    }
    proxy.pass()
    const healedAt = performance.now()
    let served = 0
    for (let i = 0; i < 100 && served === 0; i++) {
      if ((await post(app, `after-${i}`)).statusCode === 200) served = performance.now() - healedAt
      else await sleep(100)
    }
    t.ok(served > 0 && served < 5000, `served again ${Math.round(served)} ms after the network healed`)
  })

  t.test('a write pause (CLIENT PAUSE WRITE): completed keys replay, in-flight ones answer 409, new ones follow the policy', async (t) => {
    const admin = new Redis({ host: '127.0.0.1', port: server.port })
    t.teardown(() => admin.disconnect())
    const namespace = uniquePrefix('pause').replace(/:$/, '')
    // A lease longer than the pause (renewals are writes: they wait too), and a socketTimeout longer
    // than the pause (or ioredis drops the connection whose scripts Redis holds, and sends them again).
    const pauseProof = { socketTimeout: 5000 }
    const closed = await redisApp(t, server.port, { namespace, replayCache: 0, storeTimeout: 300, lockTtl: 5000 }, pauseProof)
    const open = await redisApp(t, server.port, { namespace, replayCache: 0, storeTimeout: 300, lockTtl: 5000, onStoreError: 'fail-open' }, pauseProof)
    const slow = gate()
    let runs = 0
    for (const app of [closed, open]) {
      app.post('/pay', async (request) => {
        runs++
        if (request.headers['x-slow'] === '1') await slow.promise
        return { run: runs }
      })
      await app.ready()
    }
    const first = await post(closed, 'done')
    const running = closed.inject({ method: 'POST', url: '/pay', headers: { 'idempotency-key': 'running', 'x-slow': '1' }, payload: { a: 1 } })
    await until(() => runs === 2)
    await admin.call('CLIENT', 'PAUSE', '2000', 'WRITE')
    const replay = await post(closed, 'done')
    t.equal(replay.statusCode, 200, 'replayed during the pause')
    t.equal(replay.headers['idempotent-replayed'], 'true')
    t.equal(replay.body, first.body)
    t.equal((await post(open, 'done')).headers['idempotent-replayed'], 'true', 'fail-open too: the completed key is not run again')
    t.equal((await post(closed, 'running')).statusCode, 409, 'in flight: 409')
    t.equal((await post(open, 'running')).statusCode, 409, 'fail-open too: never beside the original')
    t.equal((await post(closed, 'absent')).statusCode, 503, 'an absent key follows the policy: fail-closed')
    t.equal((await post(open, 'absent-open')).statusCode, 200, 'fail-open')
    await admin.call('CLIENT', 'UNPAUSE')
    slow.open()
    await running
  })

  t.test('two services on one Redis: their own namespace keeps records and stats apart', async (t) => {
    const billing = await redisApp(t, server.port, { namespace: uniquePrefix('billing').replace(/:$/, ''), replayCache: 0 })
    const shipping = await redisApp(t, server.port, { namespace: uniquePrefix('shipping').replace(/:$/, ''), replayCache: 0 })
    billing.post('/orders', async () => ({ service: 'billing' }))
    shipping.post('/orders', async () => ({ service: 'shipping' }))
    await post(billing, 'same', '/orders')
    const theirs = await post(shipping, 'same', '/orders')
    t.same(theirs.json(), { service: 'shipping' }, 'shipping runs its own handler')
    t.equal(theirs.headers['idempotent-replayed'], undefined)
    await post(billing, 'same', '/orders')
    const billingStats = await billing.idempotency.stats()
    const shippingStats = await shipping.idempotency.stats()
    t.equal(billingStats.totals.replayed, 1, 'billing counts its own replay')
    t.equal(shippingStats.totals.replayed, 0, 'shipping none')
    t.equal(shippingStats.totals.executed, 1)

    const sameNamespace = uniquePrefix('shared').replace(/:$/, '')
    const a = await redisApp(t, server.port, { namespace: sameNamespace, replayCache: 0 })
    const b = await redisApp(t, server.port, { namespace: sameNamespace, replayCache: 0 })
    a.post('/orders', async () => ({ service: 'a' }))
    b.post('/orders', async () => ({ service: 'b' }))
    await post(a, 'same', '/orders')
    t.same((await post(b, 'same', '/orders')).json(), { service: 'a' }, 'one namespace is one set of records: why each service needs its own')
  })

  t.test('the stats page on Redis: memory against maxmemory, the eviction policy, in-flight claims apart', async (t) => {
    const bounded = await startRedis({ maxmemory: '64mb', policy: 'allkeys-lru' })
    t.teardown(() => bounded.stop())
    const app = await redisApp(t, bounded.port, { stats: { route: '/stats', preHandler: async () => {} } })
    const held = gate()
    app.post('/pay', async (request) => {
      if (request.headers['x-hold'] === '1') await held.promise
      return 'ok'
    })
    await app.ready()
    await post(app, 'a')
    const holding = app.inject({ method: 'POST', url: '/pay', headers: { 'idempotency-key': 'b', 'x-hold': '1' }, payload: { a: 1 } })
    await sleep(50)
    const stats = await app.idempotency.stats()
    t.match(stats.store, { records: 1, inFlight: 1, maxBytes: 64 * 1024 * 1024, evictionPolicy: 'allkeys-lru' })
    t.match(stats.warning, /allkeys-lru/)
    const html = (await app.inject({ url: '/stats', headers: { accept: 'text/html' } })).body
    t.match(html, '<dd id="in-flight">1</dd>')
    t.match(html, '<dd id="policy">allkeys-lru</dd>')
    t.match(html, /<dd id="bytes">[\d.]+ (B|KiB|MiB) of 64\.0 MiB<\/dd>/)
    held.open()
    await holding
  })

  t.test('redis.replicas: claims and saves wait for a replica; more replicas than exist refuse the claim (503)', async (t) => {
    const primary = await startRedis()
    t.teardown(() => primary.stop())
    const replica = await startRedis({ replicaOf: primary.port })
    t.teardown(() => replica.stop())
    const app = await redisApp(t, primary.port, { redis: { replicas: 1, replicaTimeout: 200 }, replayCache: 0 })
    let runs = 0
    app.post('/pay', async () => ({ run: ++runs }))
    await app.ready()
    t.equal((await post(app, 'k')).statusCode, 200)
    t.equal((await post(app, 'k')).headers['idempotent-replayed'], 'true')
    const onReplica = new Redis({ host: '127.0.0.1', port: replica.port })
    t.teardown(() => onReplica.disconnect())
    t.ok((await onReplica.keys('*')).some((key) => key.includes('{idem:')), 'the record is on the replica')
    const greedy = await redisApp(t, primary.port, { redis: { replicas: 2, replicaTimeout: 100 } })
    greedy.post('/pay', async () => ({ run: ++runs }))
    t.equal((await post(greedy, 'g')).statusCode, 503, 'one replica of the two asked for: refused')
    t.equal(runs, 1)
    const cluster = Fastify()
    t.teardown(() => cluster.close())
    // A real Cluster client, never connected: the store refuses it when it is made.
    cluster.decorate('redis', new Redis.Cluster([{ host: '127.0.0.1', port: primary.port }], { lazyConnect: true }) as never)
    await t.rejects(async () => {
      await cluster.register(fastifyIdempotency, { store: 'redis', redis: { replicas: 1 }, storeTimeout: 300 })
    }, { code: 'FST_IDEMPOTENCY_INVALID_OPTION', message: /invalid option "redis": replicas is not supported with Redis Cluster/ })
  })
})
