/**
 * Exactly-once across processes: two Fastify servers in two child processes
 * share one Redis through RedisStore, and a real HTTP client sends every key
 * several times at once to both.
 */
import t from 'tap'
import '../helpers/crash-guard.js'
import { setTimeout as sleep } from 'node:timers/promises'
import { Redis } from 'ioredis'
import { startFixture, type FixtureProcess } from '../../support/fixture.js'
import { startRedis, uniquePrefix, withRedis, type RedisServer } from '../../support/redis.js'

interface Answer {
  status: number
  body: string
}

/** POSTs to `${base}/${route}/${key}` with the key as Idempotency-Key. */
async function post (base: string, route: string, key: string): Promise<Answer> {
  const response = await fetch(`${base}/${route}/${encodeURIComponent(key)}`, {
    method: 'POST',
    headers: { 'idempotency-key': key, 'content-type': 'application/json' },
    body: JSON.stringify({ key })
  })
  return { status: response.status, body: await response.text() }
}

withRedis(t, (t) => {
  let redis: RedisServer
  let client: Redis
  let servers: FixtureProcess[]
  const storePrefix = uniquePrefix('exactly-once-store')
  const counterPrefix = uniquePrefix('exactly-once-count')

  t.before(async () => {
    redis = await startRedis()
    client = new Redis({ host: '127.0.0.1', port: redis.port })
    const env = { REDIS_PORT: String(redis.port), STORE_PREFIX: storePrefix, COUNTER_PREFIX: counterPrefix }
    servers = await Promise.all([startFixture('exactly-once-server.ts', env), startFixture('exactly-once-server.ts', env)])
    // Warm up both processes (connections, script loading), so neither starts the race far behind.
    await Promise.all(servers.map((server) => post(server.url, 'once', `warm-up-${server.pid}`)))
  })
  t.teardown(async () => {
    await Promise.all((servers ?? []).map((server) => server.stop()))
    client?.disconnect()
    await redis?.stop()
  })

  t.test('200 requests over 50 keys, each key 4 times at once to alternating servers: one side effect per key', async (t) => {
    const keys = Array.from({ length: 50 }, (_, i) => `order-${i}-${Math.random().toString(36).slice(2)}`)
    // Alternating servers, starting with the other one every second key, so both processes win some keys.
    const sends = keys.flatMap((key, k) => [0, 1, 2, 3].map((i) => ({ key, server: servers[(k + i) % 2] })))
    t.equal(sends.length, 200)
    const answers = await Promise.all(sends.map(async ({ key, server }) => ({ key, ...await post(server.url, 'once', key) })))

    const byKey = new Map<string, Answer[]>()
    for (const answer of answers) byKey.set(answer.key, [...(byKey.get(answer.key) ?? []), answer])
    const counters = await client.mget(keys.map((key) => counterPrefix + key))
    const winners = new Set<number>()
    keys.forEach((key, i) => {
      const mine = byKey.get(key) as Answer[]
      t.equal(counters[i], '1', `${key}: the handler ran exactly once`)
      const ok = mine.filter((answer) => answer.status >= 200 && answer.status < 300)
      const others = mine.filter((answer) => answer.status < 200 || answer.status >= 300)
      t.ok(ok.length >= 1, `${key}: at least the original succeeded`)
      t.equal(new Set(ok.map((answer) => answer.body)).size, 1, `${key}: every 2xx answer carries the same body`)
      t.strictSame(others.map((answer) => answer.status).filter((status) => status !== 409), [], `${key}: the rest are 409 in-flight answers`)
      winners.add((JSON.parse(ok[0].body) as { pid: number }).pid)
    })
    t.comment(`handlers ran in ${winners.size} of the 2 processes`)

    // The exactly-once claim is about the handler: replays later still carry the first body.
    const replay = await post(servers[1].url, 'once', keys[0])
    t.equal(replay.body, (byKey.get(keys[0]) as Answer[]).find((answer) => answer.status === 200)?.body)
  })

  t.test('a handler slower than lockTtl runs once: its lease is renewed while duplicates hit the other process', async (t) => {
    const key = `slow-${Math.random().toString(36).slice(2)}`
    // lockTtl 1 s, handler 2.4 s: without renewal the claim would expire after 1 s.
    const original = post(servers[0].url, 'slow', key)
    const duplicates: Answer[] = []
    const start = Date.now()
    for (const at of [1200, 1700, 2200]) { // ms after the original was sent, all past the first lockTtl
      await sleep(Math.max(0, start + at - Date.now()))
      duplicates.push(await post(servers[1].url, 'slow', key))
    }
    const first = await original
    t.equal(first.status, 200)
    t.strictSame(duplicates.map((answer) => answer.status), [409, 409, 409], 'every duplicate found the key still held')
    t.equal(await client.get(counterPrefix + key), '1', 'the handler ran once')
    const replay = await post(servers[1].url, 'slow', key)
    t.equal(replay.status, 200)
    t.equal(replay.body, first.body, 'and the other process replays its response')
    t.equal(await client.get(counterPrefix + key), '1')
  })
})
