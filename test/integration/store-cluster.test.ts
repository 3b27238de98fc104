import t from 'tap'
import '../helpers/crash-guard.js'
import { createHash } from 'node:crypto'
import { setTimeout as sleep } from 'node:timers/promises'
import { Cluster, Redis, type ClusterOptions } from 'ioredis'
import { RedisStore } from '../../lib/stores/redis.js'
import { startRedisCluster, uniquePrefix, withRedis, type RedisCluster } from '../../support/redis.js'
import { BINARY, sampleResponse, storeContract } from '../helpers/store-contract.js'

const LONG = 60_000

/** Keys shaped like the plugin's (a hash of the request's parts): they spread over the slots. */
function hashedKey (i: number): string {
  return 'idem:' + createHash('sha256').update(`POST /orders ${i}`).digest('base64url')
}

withRedis(t, (t) => {
  let cluster: RedisCluster
  t.before(async () => { cluster = await startRedisCluster() })
  t.teardown(async () => { await cluster?.stop() })

  function connect (tt: Pick<typeof t, 'teardown'>, options: ClusterOptions = {}): Cluster {
    const client = new Cluster(cluster.nodes, options)
    tt.teardown(() => client.disconnect())
    return client
  }

  /** Each master directly, to change its configuration. */
  function masters (tt: Pick<typeof t, 'teardown'>): Redis[] {
    return cluster.ports.map((port) => {
      const node = new Redis({ host: '127.0.0.1', port })
      tt.teardown(() => node.disconnect())
      return node
    })
  }

  for (const protocol of [2, 3] as const) {
    t.test(`the store contract on a 3-node Cluster, RESP${protocol}`, async (t) => {
      const client = connect(t, { redisOptions: { protocol } })
      storeContract(t, {
        create: () => {
          const store = new RedisStore({ client, prefix: uniquePrefix(`cluster${protocol}`) })
          t.teardown(() => store.close())
          return store
        },
        advance: (ms) => sleep(ms),
        short: 150,
        expiresIn: true,
        lookup: true
      })
    })
  }

  t.test('records spread over every node, each one whole in its slot', async (t) => {
    const client = connect(t)
    const store = new RedisStore({ client, prefix: uniquePrefix('spread') })
    t.teardown(() => store.close())
    const keys = Array.from({ length: 60 }, (_, i) => hashedKey(i))
    for (const key of keys) {
      const token = (await store.claim(key, 'fp', LONG)).token as string
      t.ok(await store.renew(key, token, LONG), `renew ${key}`)
      t.ok(await store.complete(key, token, sampleResponse(), LONG), `complete ${key}`)
      const { record } = await store.claim(key, 'fp', LONG)
      if (record?.state !== 'completed' || !Buffer.isBuffer(record.response.body) || !record.response.body.equals(BINARY)) t.fail(`replay of ${key}`)
      const found = await store.lookup(key)
      if (found?.state !== 'completed') t.fail(`lookup of ${key}`)
    }
    const released = (await store.claim('to-release', 'fp', LONG)).token as string
    t.ok(await store.release('to-release', released))

    // Ask every master directly: a master answers only for its own slots (MOVED otherwise).
    const nodes = client.nodes('master')
    t.equal(nodes.length, 3)
    const counts = await Promise.all(nodes.map(async (node) => {
      let held = 0
      for (const key of keys) held += await node.exists(store.redisKey(key)).catch(() => 0)
      return held
    }))
    t.equal(counts.reduce((a, b) => a + b, 0), keys.length, 'every record is on exactly one master')
    t.ok(counts.every((count) => count > 0), `every master holds some (${counts.join(', ')})`)
  })

  t.test('lookup reads through a Cluster client of its own, closed by close()', async (t) => {
    const client = connect(t)
    const store = new RedisStore({ client, prefix: uniquePrefix('cluster-reader') })
    const token = (await store.claim('k', 'fp', LONG)).token as string
    t.strictSame(await store.lookup('k'), { state: 'in-flight', fingerprint: 'fp' })
    const reader = (store as unknown as { reader: { client: Cluster } }).reader.client
    t.ok(reader instanceof Cluster, 'a Cluster')
    t.not(reader, client, 'not the application\'s')
    t.equal(reader.status, 'ready')
    t.ok(await store.complete('k', token, sampleResponse(), LONG))
    t.equal((await store.lookup('k'))?.state, 'completed')
    store.close()
    for (let i = 0; i < 100 && reader.nodes().length > 0; i++) await sleep(10)
    t.equal(reader.nodes().length, 0, 'close() disconnected it from every node')
    t.not(reader.status, 'ready', `(${reader.status})`)
    t.equal(client.status, 'ready', 'and left the application\'s client alone')
  })

  t.test('verify() asks every master, on a Cluster that is still connecting', async (t) => {
    const client = connect(t)
    t.equal(client.status, 'connecting')
    const store = new RedisStore({ client, prefix: uniquePrefix('cluster-verify'), requireNoEviction: true })
    t.teardown(() => store.close())
    t.strictSame(await store.verify(), { policy: 'noeviction', maxmemory: 0 })

    const [, second] = masters(t)
    await second.config('SET', 'maxmemory-policy', 'allkeys-lru')
    t.teardown(() => second.config('SET', 'maxmemory-policy', 'noeviction'))
    await t.rejects(store.verify(), { code: 'FST_IDEMPOTENCY_REDIS_EVICTION', message: /maxmemory-policy allkeys-lru/ }, 'one master that evicts is enough')
    await t.rejects(store.claim('k', 'fp', LONG), { code: 'FST_IDEMPOTENCY_REDIS_EVICTION' }, 'and claims are refused')

    const warnings: string[] = []
    const lenient = new RedisStore({ client, prefix: uniquePrefix('cluster-verify-warn') })
    t.teardown(() => lenient.close())
    lenient.onWarning = (code, message) => warnings.push(`${code}: ${message}`)
    t.strictSame(await lenient.verify(), { policy: 'allkeys-lru', maxmemory: 0 })
    t.match(warnings, [/^FST_IDEMPOTENCY_REDIS_EVICTION: Redis runs with maxmemory-policy allkeys-lru/])
  })

  t.test('usage() adds up the masters: records, claims, memory bound, policy', async (t) => {
    const client = connect(t)
    const prefix = uniquePrefix('cluster-usage')
    const store = new RedisStore({ client, prefix })
    t.teardown(() => store.close())
    for (let i = 0; i < 30; i++) {
      const token = (await store.claim(hashedKey(i), 'fp', LONG)).token as string
      if (i < 20) t.ok(await store.complete(hashedKey(i), token, sampleResponse(), LONG))
    }
    const usage = await store.usage()
    t.match(usage, { records: 20, inFlight: 10, maxBytes: undefined, evictionPolicy: 'noeviction', estimated: false, warnings: [] })
    t.ok(usage.bytes! > 0)

    const nodes = masters(t)
    await nodes[0].config('SET', 'maxmemory', '100mb')
    t.teardown(() => Promise.all(nodes.map((node) => node.config('SET', 'maxmemory', '0'))))
    t.equal((await store.usage()).maxBytes, undefined, 'a master without maxmemory leaves the whole unbounded')
    await Promise.all(nodes.map((node) => node.config('SET', 'maxmemory', '100mb')))
    t.equal((await store.usage()).maxBytes, 3 * 100 * 1024 * 1024, 'the bounds of the masters, summed')
  })

  t.test('replicas are refused with a Cluster; queueWarning reads redisOptions.socketTimeout', async (t) => {
    const client = connect(t, { lazyConnect: true })
    t.throws(() => new RedisStore({ client, replicas: 1 }), { name: 'TypeError', message: /replicas is not supported with Redis Cluster/ })
    t.doesNotThrow(() => new RedisStore({ client, replicas: 0 }))
    t.match(RedisStore.queueWarning(client), /has no redisOptions\.socketTimeout/)
    t.equal(RedisStore.queueWarning(connect(t, { lazyConnect: true, redisOptions: { socketTimeout: 5000 } })), undefined)
  })
})
