/**
 * `store: 'redis'`: the plugin reads its client from @fastify/redis (default
 * or named namespace, per plugin or per route), fails at start-up without one,
 * and answers a Redis outage within `storeTimeout` by its `onStoreError` policy.
 */
import t from 'tap'
import '../helpers/crash-guard.js'
import Fastify, { type FastifyInstance } from 'fastify'
import fastifyRedis from '@fastify/redis'
import { Redis } from 'ioredis'
import fastifyIdempotency, { RedisStore, type FastifyIdempotencyOptions } from '../../index.js'
import { startRedis, withRedis, type RedisServer } from '../../support/redis.js'

withRedis(t, (t) => {
  let server: RedisServer
  let spare: RedisServer
  let admin: Redis
  let spareAdmin: Redis
  t.before(async () => {
    [server, spare] = await Promise.all([startRedis(), startRedis()])
    admin = new Redis(server.url)
    spareAdmin = new Redis(spare.url)
  })
  t.teardown(async () => {
    admin?.disconnect()
    spareAdmin?.disconnect()
    await Promise.all([server?.stop(), spare?.stop()])
  })

  let counter = 0
  /** An app with `redis` registered as @fastify/redis options, then the plugin, then a counting route. */
  async function build (tt: Pick<typeof t, 'teardown'>, redis: Array<Record<string, unknown>>, options: FastifyIdempotencyOptions, routeConfig?: object) {
    const app = Fastify()
    tt.teardown(() => app.close())
    for (const redisOptions of redis) await app.register(fastifyRedis, redisOptions)
    await app.register(fastifyIdempotency, options)
    const runs = { count: 0 }
    app.post('/orders', { config: routeConfig === undefined ? {} : { idempotency: routeConfig } }, async (_request, reply) => {
      runs.count++
      reply.code(201)
      return { order: ++counter }
    })
    await app.ready()
    return { app, runs }
  }

  function post (app: FastifyInstance, key: string) {
    return app.inject({ method: 'POST', url: '/orders', headers: { 'idempotency-key': key }, payload: { item: 'book' } })
  }

  t.test('store: redis uses fastify.redis: the record is in Redis and the retry is replayed from it', async (t) => {
    const { app, runs } = await build(t, [{ url: server.url }], { store: 'redis' })
    t.ok(app.idempotency.store instanceof RedisStore)
    const first = await post(app, 'redis-plugin-1')
    const again = await post(app, 'redis-plugin-1')
    t.equal(first.statusCode, 201)
    t.equal(again.statusCode, 201)
    t.equal(again.body, first.body)
    t.equal(again.headers['idempotent-replayed'], 'true')
    t.equal(runs.count, 1)
    const keys = await admin.keys('idempotency:{idem:*}')
    t.ok(keys.length >= 1, 'the record lives in Redis under the default prefix and a hash tag')
  })

  t.test('store: redis without @fastify/redis fails at start-up and says to register it', async (t) => {
    const app = Fastify()
    t.teardown(() => app.close())
    await t.rejects(async () => { await app.register(fastifyIdempotency, { store: 'redis' }) }, {
      code: 'FST_IDEMPOTENCY_INVALID_OPTION',
      message: /register @fastify\/redis before fastify-idempotency/
    })
  })

  t.test('redisNamespace picks a named @fastify/redis client', async (t) => {
    const { app, runs } = await build(t, [{ url: spare.url, namespace: 'payments' }], { store: 'redis', redisNamespace: 'payments' })
    await post(app, 'namespaced-1')
    await post(app, 'namespaced-1')
    t.equal(runs.count, 1)
    t.equal((await spareAdmin.keys('idempotency:*')).length >= 1, true, 'the record went to the namespace\'s Redis')
  })

  t.test('store: redis when only named clients exist says to set redisNamespace', async (t) => {
    const app = Fastify()
    t.teardown(() => app.close())
    await app.register(fastifyRedis, { url: server.url, namespace: 'other' })
    await t.rejects(async () => { await app.register(fastifyIdempotency, { store: 'redis' }) }, {
      code: 'FST_IDEMPOTENCY_INVALID_OPTION',
      message: /fastify\.redis is not a Redis client.*redisNamespace/
    })
  })

  t.test('a missing namespace fails at start-up, naming it', async (t) => {
    const app = Fastify()
    t.teardown(() => app.close())
    await app.register(fastifyRedis, { url: server.url, namespace: 'other' })
    await t.rejects(async () => { await app.register(fastifyIdempotency, { store: 'redis', redisNamespace: 'nope' }) }, {
      code: 'FST_IDEMPOTENCY_INVALID_OPTION',
      message: /fastify\.redis\.nope is not a Redis client: register @fastify\/redis with \{ namespace: 'nope' \}/
    })
  })

  t.test('a route picks its own namespace; the others keep the plugin store', async (t) => {
    const app = Fastify()
    t.teardown(() => app.close())
    await app.register(fastifyRedis, { url: server.url, namespace: 'main' })
    await app.register(fastifyRedis, { url: spare.url, namespace: 'audit' })
    await app.register(fastifyIdempotency, { store: 'redis', redisNamespace: 'main', keyEncoder: (p) => `route-ns:${p.path}:${p.key}` })
    let runs = 0
    app.post('/audit', { config: { idempotency: { redisNamespace: 'audit' } } }, async () => ({ run: ++runs }))
    app.post('/main', async () => ({ run: ++runs }))
    const audit1 = await app.inject({ method: 'POST', url: '/audit', headers: { 'idempotency-key': 'k' } })
    const audit2 = await app.inject({ method: 'POST', url: '/audit', headers: { 'idempotency-key': 'k' } })
    await app.inject({ method: 'POST', url: '/main', headers: { 'idempotency-key': 'k' } })
    t.equal(audit2.body, audit1.body)
    t.equal(runs, 2)
    t.equal(await spareAdmin.exists('idempotency:{route-ns:/audit:k}'), 1, '/audit is kept in the audit Redis')
    t.equal(await spareAdmin.exists('idempotency:{route-ns:/main:k}'), 0)
    t.equal(await admin.exists('idempotency:{route-ns:/main:k}'), 1, '/main is kept in the plugin\'s Redis')
  })

  t.test('a route naming a namespace that does not exist fails when the route is added', async (t) => {
    const app = Fastify()
    t.teardown(() => app.close())
    await app.register(fastifyIdempotency)
    t.throws(() => app.post('/x', { config: { idempotency: { redisNamespace: 'ghost' } } }, async () => 'ok'), {
      code: 'FST_IDEMPOTENCY_INVALID_ROUTE_CONFIG',
      message: /POST \/x: redisNamespace: the Redis store reads the client of @fastify\/redis: register @fastify\/redis with \{ namespace: 'ghost' \}/
    })
  })

  t.test('Redis down: fail-closed answers 503 within storeTimeout and never runs the handler; fail-open runs it', async (t) => {
    const dead = await startRedis()
    // Clients that retry forever, as a Redis outage looks to an app; the test disconnects them
    // (quitting a client that cannot reach its server would wait for it).
    const clients = [0, 1].map(() => new Redis(dead.url, { maxRetriesPerRequest: null }))
    for (const client of clients) client.on('error', () => {}) // every failed reconnection is reported
    t.teardown(() => { for (const client of clients) client.disconnect() })
    const closed = await build(t, [{ client: clients[0] }], { store: 'redis', storeTimeout: 200 })
    const open = await build(t, [{ client: clients[1], namespace: 'o' }], { store: 'redis', redisNamespace: 'o', storeTimeout: 200, onStoreError: 'fail-open' })
    await dead.stop()

    const refused = await post(closed.app, 'outage-1')
    t.equal(refused.statusCode, 503)
    t.equal(refused.json().code, 'FST_IDEMPOTENCY_STORE_UNAVAILABLE')
    t.equal(refused.headers['retry-after'], '1')
    t.equal(closed.runs.count, 0, 'fail-closed: the handler did not run')

    const served = await post(open.app, 'outage-1')
    t.equal(served.statusCode, 201)
    t.equal(open.runs.count, 1, 'fail-open: the handler ran without idempotency')
  })
})
