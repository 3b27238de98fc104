import t from 'tap'
import '../helpers/crash-guard.js'
import { setTimeout as sleep } from 'node:timers/promises'
import fastifyRedis from '@fastify/redis'
import Fastify from 'fastify'
import { Cluster, type ClusterOptions } from 'ioredis'
import fastifyIdempotency from '../../index.js'
import { defaultKeyEncoder } from '../../lib/key-encoder.js'
import { RedisStore } from '../../lib/stores/redis.js'
import { startRedisCluster, uniquePrefix, withRedis, type RedisCluster } from '../../support/redis.js'
import { BINARY, sampleResponse, storeContract } from '../helpers/store-contract.js'

const LONG = 60_000

withRedis(t, (t) => {
  let cluster: RedisCluster
  t.before(async () => { cluster = await startRedisCluster() })
  t.teardown(async () => { await cluster?.stop() })

  function connect (tt: Pick<typeof t, 'teardown'>, options: ClusterOptions = {}): Cluster {
    const client = new Cluster(cluster.nodes, options)
    tt.teardown(() => client.disconnect())
    return client
  }

  for (const protocol of [2, 3] as const) {
    t.test(`the store contract on a 3-node Cluster, RESP${protocol}`, async (t) => {
      const client = connect(t, { redisOptions: { protocol } })
      storeContract(t, {
        create: () => new RedisStore({ client, prefix: uniquePrefix(`cluster${protocol}`) }),
        advance: (ms) => sleep(ms),
        short: 150
      })
    })
  }

  t.test('records spread over every node, each one whole in its slot', async (t) => {
    const client = connect(t)
    const store = new RedisStore({ client, prefix: uniquePrefix('spread') })
    const keys = Array.from({ length: 60 }, (_, i) => defaultKeyEncoder({ scope: undefined, method: 'POST', path: '/orders', key: `order-${i}` }))
    for (const key of keys) {
      const token = (await store.claim(key, 'fp', LONG)).token as string
      t.ok(await store.renew(key, token, LONG), `renew ${key}`)
      t.ok(await store.complete(key, token, sampleResponse(), LONG), `complete ${key}`)
      const { record } = await store.claim(key, 'fp', LONG)
      if (record?.state !== 'completed' || !record.response.body.equals(BINARY)) t.fail(`replay of ${key}`)
    }
    const released = (await store.claim('to-release', 'fp', LONG)).token as string
    t.ok(await store.release('to-release', released))

    // Ask every master directly: a master answers only for its own slots (MOVED otherwise).
    const masters = client.nodes('master')
    t.equal(masters.length, 3)
    const counts = await Promise.all(masters.map(async (node) => {
      let held = 0
      for (const key of keys) held += await node.exists(store.redisKey(key)).catch(() => 0)
      return held
    }))
    t.equal(counts.reduce((a, b) => a + b, 0), keys.length, 'every record is on exactly one master')
    t.ok(counts.every((count) => count > 0), `every master holds some (${counts.join(', ')})`)
  })

  t.test('@fastify/redis with a Cluster client, and the plugin on top: replays work', async (t) => {
    const client = connect(t)
    const app = Fastify()
    t.teardown(() => app.close())
    await app.register(fastifyRedis, { client })
    await app.register(async (app) => {
      await app.register(fastifyIdempotency, { store: new RedisStore({ client: app.redis, prefix: uniquePrefix('plugin') }) })
      let runs = 0
      app.post('/orders', async () => ({ run: ++runs, at: Math.random() }))
    })
    const send = (key: string) => app.inject({ method: 'POST', url: '/orders', headers: { 'idempotency-key': key }, payload: { a: 1 } })
    const bodies = new Map<string, string>()
    for (let i = 0; i < 20; i++) bodies.set(`k${i}`, (await send(`k${i}`)).body)
    for (const [key, body] of bodies) {
      const replay = await send(key)
      t.equal(replay.headers['idempotent-replayed'], 'true', `${key} is replayed`)
      t.equal(replay.body, body)
    }
    t.equal(new Set(bodies.values()).size, 20, 'each key ran the handler once')
    t.equal(client.status, 'ready', 'closing nothing: the client belongs to the app')
  })
})
