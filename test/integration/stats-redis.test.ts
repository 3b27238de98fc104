/**
 * Stats on Redis: the counters of every instance add up in one hash (one
 * `addStats` script per flush, by the timer, by `stats()` and on close), the
 * hash expires `stats.ttl` after its last change, `lastDuplicateAt` keeps the
 * latest time, and `usage()` counts the plugin's records exactly on a small
 * keyspace and estimates them on a big one. Single server and 3-node Cluster.
 */
import t from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import Fastify, { type FastifyInstance } from 'fastify'
import { Cluster, Redis } from 'ioredis'
import fastifyIdempotency, { type FastifyIdempotencyOptions, type StatsOptions } from '../../index.js'
import { RedisStore } from '../../lib/stores/redis.js'
import { capturingLogger, ERROR, type LogLine, type Teardown } from '../helpers/app.js'
import { startRedis, startRedisCluster, uniquePrefix, withRedis, type RedisCluster, type RedisServer } from '../../support/redis.js'

const LONG = 60 * 60 * 1000

/** The counts of a route that saw nothing, without and with `lastDuplicateAt`. */
const NONE = { executed: 0, replayed: 0, conflicts: 0, mismatches: 0, missingKeys: 0, invalidKeys: 0, storeErrors: 0 }
const ZERO = { ...NONE, lastDuplicateAt: 0 }

/** Resolves once `check` resolves true; fails after `limit` ms. */
async function eventually (check: () => Promise<boolean>, limit = 5000): Promise<void> {
  const deadline = Date.now() + limit
  while (!await check()) {
    if (Date.now() > deadline) throw new Error('condition not met in time')
    await sleep(10)
  }
}

function post (app: FastifyInstance, key: string, payload: object = { item: 'book' }) {
  return app.inject({ method: 'POST', url: '/orders', headers: { 'idempotency-key': key }, payload })
}

/** An app on `client` with a RedisStore under `prefix` and a POST /orders route; closed (then the client disconnected) at teardown. */
async function instance (tt: Teardown, client: Redis | Cluster, prefix: string, stats: StatsOptions = {}, options: FastifyIdempotencyOptions = {}, lines: LogLine[] = [], timeout = 2000) {
  const app = Fastify(capturingLogger(lines))
  const store = new RedisStore({ client, prefix, timeout })
  tt.teardown(async () => {
    await app.close()
    store.close() // a store passed in is the application's to close (its read connection)
    client.disconnect()
  })
  await app.register(fastifyIdempotency, { store, stats: { flushInterval: LONG, ...stats }, ...options })
  let runs = 0
  app.post('/orders', async (_request, reply) => {
    reply.code(201)
    return { run: ++runs }
  })
  await app.ready()
  return { app, store }
}

withRedis(t, (t) => {
  let server: RedisServer
  let admin: Redis
  t.before(async () => {
    server = await startRedis()
    admin = new Redis(server.url)
  })
  t.teardown(async () => {
    admin?.disconnect()
    await server?.stop()
  })

  const connect = (db = 0) => new Redis({ host: '127.0.0.1', port: server.port, db })
  const statsKey = (prefix: string) => `${prefix}stats:{idempotency-stats}`

  t.test('two instances on one Redis: their counters add up; stats() sends the caller\'s pending counts; lastDuplicateAt keeps the latest', async (t) => {
    const prefix = uniquePrefix('sum')
    const a = await instance(t, connect(), prefix)
    const b = await instance(t, connect(), prefix)

    t.equal((await post(a.app, 'k1')).statusCode, 201)
    t.equal((await post(a.app, 'k2')).statusCode, 201)
    t.equal((await post(b.app, 'k3')).statusCode, 201)
    t.equal((await post(a.app, 'k1')).headers['idempotent-replayed'], 'true', 'A replays k1')
    const aDuplicateTo = Date.now()
    await sleep(5)
    const bDuplicateFrom = Date.now()
    t.equal((await post(b.app, 'k2')).headers['idempotent-replayed'], 'true', 'B replays k2, saved by A')
    t.equal((await post(b.app, 'k3', { item: 'pen' })).statusCode, 422, 'B: k3 reused with another body')
    const bDuplicateTo = Date.now()
    t.equal((await post(b.app, 'x'.repeat(300))).statusCode, 400, 'B: an invalid key')

    t.equal(await admin.exists(statsKey(prefix)), 0, 'nothing is written to Redis on the request path')

    const fromB = await b.app.idempotency.stats()
    t.strictSame(fromB.routes.map(({ lastDuplicateAt, ...counts }) => counts), [{
      route: 'POST /orders', ...NONE, executed: 1, mismatches: 1, replayed: 1, invalidKeys: 1, duplicates: 2
    }], 'B\'s stats() sent B\'s counts: A\'s are still pending in A')
    const bLast = fromB.totals.lastDuplicateAt
    t.ok(bLast >= bDuplicateFrom && bLast <= bDuplicateTo, 'lastDuplicateAt: B\'s last duplicate')

    const fromA = await a.app.idempotency.stats()
    t.strictSame(fromA.routes, [{
      route: 'POST /orders', ...ZERO, executed: 3, replayed: 2, mismatches: 1, invalidKeys: 1, lastDuplicateAt: bLast, duplicates: 3
    }], 'A\'s stats() added A\'s counts to B\'s; A\'s older duplicate time did not replace B\'s')
    t.ok(aDuplicateTo < bLast, 'A\'s duplicate came before B\'s: the hash kept the later time, not the last one sent')
    t.strictSame(fromA.totals, { ...ZERO, executed: 3, replayed: 2, mismatches: 1, invalidKeys: 1, lastDuplicateAt: bLast, duplicates: 3 })
    t.strictSame(fromA.store, (await b.app.idempotency.stats()).store, 'both see the same store')
    t.strictSame((await b.app.idempotency.stats()).routes, fromA.routes, 'and the same counters')
    t.strictSame(await admin.hgetall(statsKey(prefix)), {
      'POST /orders\nexecuted': '3',
      'POST /orders\nreplayed': '2',
      'POST /orders\nmismatches': '1',
      'POST /orders\ninvalidKeys': '1',
      'POST /orders\nlastDuplicateAt': String(bLast)
    }, 'one hash, one field per route and counter; counters that stayed 0 are not written')
  })

  t.test('the timer sends pending counts every flushInterval; the hash expires stats.ttl after its last change', async (t) => {
    const prefix = uniquePrefix('timer')
    const { app } = await instance(t, connect(), prefix, { flushInterval: 20, ttl: 60_000 })
    await post(app, 'k1')
    await post(app, 'k1')
    await eventually(async () => (await admin.hget(statsKey(prefix), 'POST /orders\nreplayed')) === '1')
    t.equal(await admin.hget(statsKey(prefix), 'POST /orders\nexecuted'), '1', 'sent without anyone calling stats()')
    const first = await admin.pttl(statsKey(prefix))
    t.ok(first > 50_000 && first <= 60_000, `PTTL ≈ stats.ttl (${first})`)
    await sleep(100)
    t.ok(await admin.pttl(statsKey(prefix)) <= first - 50, 'the PTTL runs down while nothing changes')
    await post(app, 'k2')
    await eventually(async () => (await admin.hget(statsKey(prefix), 'POST /orders\nexecuted')) === '2')
    const renewed = await admin.pttl(statsKey(prefix))
    t.ok(renewed > first - 50 && renewed <= 60_000, `a change sets it back to stats.ttl (${renewed})`)
  })

  t.test('a short stats.ttl: the counters are gone from Redis once it has passed', async (t) => {
    const prefix = uniquePrefix('expiry')
    const { app } = await instance(t, connect(), prefix, { flushInterval: 10, ttl: 150 })
    await post(app, 'k1')
    await eventually(async () => await admin.exists(statsKey(prefix)) === 1)
    t.equal((await app.idempotency.stats()).totals.executed, 1)
    await eventually(async () => await admin.exists(statsKey(prefix)) === 0)
    t.strictSame((await app.idempotency.stats()).routes, [], 'stats() finds nothing')
  })

  t.test('close() sends the pending counts', async (t) => {
    const prefix = uniquePrefix('close')
    const { app } = await instance(t, connect(), prefix)
    await post(app, 'k1')
    await post(app, 'k1')
    t.equal(await admin.exists(statsKey(prefix)), 0)
    await app.close()
    t.strictSame(await admin.hmget(statsKey(prefix), 'POST /orders\nexecuted', 'POST /orders\nreplayed'), ['1', '1'])
  })

  t.test('readStats() and usage() fail with FST_IDEMPOTENCY_STORE_TIMEOUT when Redis does not answer; so does stats()', async (t) => {
    const doomed = await startRedis()
    t.teardown(() => doomed.stop())
    const client = new Redis({ host: '127.0.0.1', port: doomed.port })
    client.on('error', () => {}) // reconnection errors, expected here
    const lines: LogLine[] = []
    const { app, store } = await instance(t, client, uniquePrefix('timeout'), { flushInterval: 20 }, {}, lines, 150)
    await doomed.stop()

    const timedOut = { code: 'FST_IDEMPOTENCY_STORE_TIMEOUT', message: /did not answer within 150 ms/ }
    await t.rejects(store.readStats(), timedOut, 'readStats')
    await t.rejects(store.usage(), timedOut, 'usage')
    await t.rejects(store.addStats({ 'POST /x': { ...ZERO, executed: 1 } }, LONG), timedOut, 'addStats')
    t.equal((await post(app, 'k1')).statusCode, 503, 'the claim timed out too: fail-closed')
    // The failed claim is a pending count; the timer's flush times out and is logged.
    await eventually(async () => lines.some((line) => line.msg === 'idempotency: stats could not be saved'))
    const failure = lines.find((line) => line.msg === 'idempotency: stats could not be saved') as LogLine
    t.equal(failure.level, ERROR)
    t.match(failure.err, { code: 'FST_IDEMPOTENCY_STORE_TIMEOUT' })
    await t.rejects(app.idempotency.stats(), timedOut, 'stats()')
  })

  t.test('a 3-node Cluster', async (t) => {
    let cluster: RedisCluster
    t.before(async () => { cluster = await startRedisCluster() })
    t.teardown(async () => { await cluster?.stop() })
    const connectCluster = () => new Cluster(cluster.nodes, { enableAutoPipelining: true })

    t.test('counters of two instances add up; usage() is exact across the masters', async (t) => {
      const prefix = uniquePrefix('cluster')
      const a = await instance(t, connectCluster(), prefix)
      const b = await instance(t, connectCluster(), prefix)
      const keys = Array.from({ length: 30 }, (_, i) => `order-${i}`)
      for (const key of keys) t.equal((await post(a.app, key)).statusCode, 201)
      for (const key of keys.slice(0, 10)) t.equal((await post(b.app, key)).headers['idempotent-replayed'], 'true')
      t.equal((await post(b.app, 'order-0', { item: 'pen' })).statusCode, 422)

      await b.app.idempotency.stats()
      const stats = await a.app.idempotency.stats()
      t.strictSame(stats.routes.map(({ lastDuplicateAt, ...counts }) => counts), [{
        route: 'POST /orders', ...NONE, executed: 30, replayed: 10, mismatches: 1, duplicates: 11
      }])
      t.strictSame(stats.store.estimated, false)
      t.equal(stats.store.records, 30, 'every record, whichever master holds it')
      t.ok((stats.store.bytes as number) > 0)

      const masters = (a.store as unknown as { redis: Cluster }).redis.nodes('master')
      const perMaster = await Promise.all(masters.map(async (node) => (await node.keys(`${prefix}{*`)).length))
      t.equal(masters.length, 3)
      t.ok(perMaster.every((held) => held > 0), `the records are spread over the 3 masters (${perMaster.join(', ')}), and all are counted`)
    })

    t.test('usage() estimates above 1000 keys on the nodes', async (t) => {
      const client = connectCluster()
      t.teardown(() => client.disconnect())
      const store = new RedisStore({ client, prefix: uniquePrefix('cluster-big') })
      const written = 4500
      await Promise.all(Array.from({ length: written }, (_, i) => client.hset(store.redisKey(`key-${i}`), { s: 'c', c: '201', h: '{}', b: 'x'.repeat(100) })))
      const sizes = await Promise.all(client.nodes('master').map((node) => node.dbsize()))
      t.ok(sizes.every((size) => size > 1000), `every master holds more than 1000 keys (${sizes.join(', ')})`)
      const usage = await store.usage()
      t.equal(usage.estimated, true)
      // Records are all but a few keys of each node (the other test's), so the estimate is close.
      t.ok(usage.records > written * 0.6 && usage.records < written * 1.4, `records ≈ ${written} (${usage.records})`)
      t.ok((usage.bytes as number) > 0)
    })
  })
})
