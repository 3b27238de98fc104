/**
 * The Redis store with `replicas`: claims and saves wait for the replicas
 * (one WAIT per turn of the event loop), and what they acknowledged survives
 * the promotion of a replica.
 */
import t from 'tap'
import '../helpers/crash-guard.js'
import { spawn } from 'node:child_process'
import { createInterface } from 'node:readline'
import { setTimeout as sleep } from 'node:timers/promises'
import { Redis, type RedisOptions } from 'ioredis'
import { RedisStore, type RedisStoreOptions } from '../../lib/stores/redis.js'
import { startProxy } from '../../support/proxy.js'
import { startRedis, uniquePrefix, withRedis, type RedisServer } from '../../support/redis.js'
import { sampleResponse } from '../helpers/store-contract.js'
import { eventually } from '../helpers/app.js'

const LONG = 60_000

withRedis(t, (t) => {
  let primary: RedisServer
  let replica: RedisServer
  t.before(async () => {
    primary = await startRedis()
    replica = await startRedis({ replicaOf: primary.port })
  })
  t.teardown(async () => {
    await replica?.stop()
    await primary?.stop()
  })

  function connect (tt: Pick<typeof t, 'teardown'>, port: number, options: RedisOptions = {}): Redis {
    const client = new Redis({ host: '127.0.0.1', port, ...options })
    client.on('error', () => {}) // the failures these tests cause
    tt.teardown(() => client.disconnect())
    return client
  }

  function store (tt: Pick<typeof t, 'teardown'>, client: Redis, options: Partial<RedisStoreOptions> = {}): RedisStore {
    const made = new RedisStore({ client, prefix: uniquePrefix('replicas'), replicas: 1, replicaTimeout: 1000, timeout: 3000, ...options })
    tt.teardown(() => made.close())
    return made
  }

  /** Freezes the replica (it stops acknowledging) until `tt` ends or `thaw()`. */
  function freeze (tt: Pick<typeof t, 'teardown'>): () => void {
    process.kill(replica.pid, 'SIGSTOP')
    let frozen = true
    const thaw = () => {
      if (frozen) process.kill(replica.pid, 'SIGCONT')
      frozen = false
    }
    tt.teardown(thaw)
    return thaw
  }

  t.test('acknowledged claims and saves are on the replica', async (t) => {
    const s = store(t, connect(t, primary.port))
    const onReplica = connect(t, replica.port)
    const token = (await s.claim('k', 'fp', LONG)).token as string
    t.equal(await onReplica.hget(s.redisKey('k'), 't'), token, 'the claim, as soon as it is acknowledged')
    t.ok(await s.complete('k', token, sampleResponse(), LONG))
    t.equal(await onReplica.hget(s.redisKey('k'), 's'), 'c', 'the saved response')
    t.equal(s.replicas, 1)
    t.equal(s.replicaTimeout, 1000)
  })

  t.test('one WAIT for all the claims (or saves) of a turn, after them, in the same write', async (t) => {
    const client = connect(t, primary.port)
    await client.ping()
    const s = store(t, client)
    const monitor = spawn('redis-cli', ['-h', '127.0.0.1', '-p', String(primary.port), 'monitor'], { stdio: ['ignore', 'pipe', 'inherit'] })
    t.teardown(() => { monitor.kill() })
    const lines: string[] = []
    let started: () => void
    const monitoring = new Promise<void>((resolve) => { started = resolve })
    createInterface({ input: monitor.stdout }).on('line', (line) => {
      if (line === 'OK') started()
      else lines.push(line)
    })
    await monitoring

    const socket = client.stream
    const writes: number[] = []
    const writev = socket._writev?.bind(socket)
    const single = socket._write.bind(socket)
    socket._writev = (chunks, callback) => { writes.push(chunks.length); writev!(chunks, callback) }
    socket._write = (chunk, encoding, callback) => { writes.push(1); single(chunk, encoding, callback) }
    t.teardown(() => { socket._writev = writev; socket._write = single })

    const claims = await Promise.all(Array.from({ length: 10 }, (_, i) => s.claim(`k${i}`, 'fp', LONG)))
    t.strictSame(writes, [11], 'ten claims and one WAIT, in one write')
    writes.length = 0
    const saved = await Promise.all(claims.map(({ token }, i) => s.complete(`k${i}`, token as string, sampleResponse(), LONG)))
    t.ok(saved.every(Boolean))
    t.strictSame(writes, [11], 'ten saves and one WAIT')
    writes.length = 0
    await Promise.all([s.release('k0', 'not-the-token'), s.renew('k1', 'not-the-token', LONG)])
    t.strictSame(writes, [2], 'releases and renewals wait for nothing')

    const marker = `mark-${Math.random()}`
    await client.echo(marker)
    await eventually('the monitor to log everything', () => lines.some((line) => line.includes(marker)))
    // What the client sent (not what the scripts ran: ' lua]' lines), scripts by SHA or by source alike.
    const names = lines.filter((line) => !line.includes(' lua]') && (line.includes(s.prefix) || /"wait"/.test(line)))
      .map((line) => /\] "(\w+)"/.exec(line)?.[1]?.replace(/^evalsha$/, 'eval'))
    t.strictSame(names, [...Array(10).fill('eval'), 'wait', ...Array(10).fill('eval'), 'wait', 'eval', 'eval'],
      'WAIT comes after the commands it covers, on their connection')
    t.ok(lines.filter((line) => /"wait"/.test(line)).every((line) => line.includes('"wait" "1" "1000"')), 'WAIT replicas replicaTimeout')
  })

  t.test('fewer acknowledgements: the claim is released and fails; a replay of the same turn does not wait', async (t) => {
    const client = connect(t, primary.port)
    const s = store(t, client)
    const done = (await s.claim('done', 'fp', LONG)).token as string
    t.ok(await s.complete('done', done, sampleResponse(), LONG))
    const running = (await s.claim('running', 'fp', LONG)).token as string
    const thaw = freeze(t)

    const order: string[] = []
    const replay = s.claim('done', 'fp', LONG).then((result) => { order.push('replay'); return result })
    const claim = s.claim('new', 'fp', LONG).then(() => { order.push('claimed') }, (err) => { order.push('refused'); throw err })
    t.equal((await replay).record?.state, 'completed', 'the replay is answered')
    t.strictSame(order, ['replay'], 'at once, while the WAIT of its turn still waits')
    await t.rejects(claim, { code: 'FST_IDEMPOTENCY_NOT_REPLICATED', message: 'Redis acknowledged the write on 0 of 1 replicas within 1000 ms' })
    await eventually('the claim to be released', async () => await client.exists(s.redisKey('new')) === 0)
    t.pass('the unreplicated claim is let go: a retry can claim the key')

    await t.rejects(s.complete('running', running, sampleResponse(), LONG), { code: 'FST_IDEMPOTENCY_NOT_REPLICATED' },
      'a save that is not replicated fails (the plugin logs it)')
    t.equal(await client.hget(s.redisKey('running'), 's'), 'c', 'but it is saved on the primary, and replayed from there')
    t.equal(await s.complete('running', running, sampleResponse(), LONG), false, 'a refused save waits for nothing')
    thaw()
  })

  t.test('more replicas asked for than there are', async (t) => {
    const s = store(t, connect(t, primary.port), { replicas: 2, replicaTimeout: 200 })
    await t.rejects(s.claim('k', 'fp', LONG), { code: 'FST_IDEMPOTENCY_NOT_REPLICATED', message: /on 1 of 2 replicas within 200 ms/ })
  })

  t.test('a Redis that refuses WAIT: the claim is released and fails with its error', async (t) => {
    const server = await startRedis({ args: ['--rename-command', 'WAIT', ''] })
    t.teardown(() => server.stop())
    const client = connect(t, server.port)
    const s = store(t, client)
    await t.rejects(s.claim('k', 'fp', LONG), { message: /unknown command/i })
    await eventually('the claim to be released', async () => await client.exists(s.redisKey('k')) === 0)
    t.pass('released')
  })

  t.test('Redis away for longer than the timeout: calls fail at once, and no WAIT is queued either', async (t) => {
    const server = await startRedis()
    t.teardown(() => server.stop())
    const client = connect(t, server.port)
    const s = store(t, client, { timeout: 300, replicaTimeout: 100 })
    await t.rejects(s.claim('k', 'fp', LONG), { code: 'FST_IDEMPOTENCY_NOT_REPLICATED' }, 'no replica at all')
    await server.crash()
    await t.rejects(s.claim('k', 'fp', LONG), { code: 'FST_IDEMPOTENCY_STORE_TIMEOUT' })
    const queue = (client as unknown as { offlineQueue: { length: number } }).offlineQueue
    const queued = queue.length
    await t.rejects(s.claim('k', 'fp', LONG), { code: 'FST_IDEMPOTENCY_STORE_TIMEOUT' })
    await t.rejects(s.complete('k', '1', sampleResponse(), LONG), { code: 'FST_IDEMPOTENCY_STORE_TIMEOUT' })
    t.equal(queue.length, queued, 'nothing more was queued: neither the scripts nor a WAIT')
  })

  t.test('promotion: a replica promoted after the primary died holds every acknowledged record', async (t) => {
    // The replica reads the primary through a proxy that delays the stream, as a busy network does:
    // writes that the primary answered may not have reached it when the primary dies.
    const first = await startRedis()
    t.teardown(() => first.stop())
    const link = await startProxy(first.port)
    t.teardown(() => link.stop())
    const second = await startRedis({ replicaOf: link.port })
    t.teardown(() => second.stop())
    link.delay(100)

    const prefix = uniquePrefix('promotion')
    const acknowledged = new Map<string, 'in-flight' | 'completed'>()
    const unacknowledged = new Set<string>()
    let stopping = false
    /** A stream of requests: claim, then save every other one. `replicas` 0 as a control. */
    const worker = async (s: RedisStore, n: number, into: Map<string, 'in-flight' | 'completed'>) => {
      // eslint-disable-next-line no-unmodified-loop-condition -- set by the test while the workers run
      for (let i = 0; !stopping; i++) {
        const key = `w${n}-${i}-r${s.replicas}`
        const claimed = await s.claim(key, 'fp', LONG).catch(() => undefined)
        if (claimed?.token === undefined) continue
        into.set(key, 'in-flight')
        if (i % 2 === 1) continue
        if (await s.complete(key, claimed.token, sampleResponse(), LONG).catch(() => false)) into.set(key, 'completed')
      }
    }
    // Clients of their own: a reply on the connection of the WAIT comes only after the WAIT's.
    const replicated = store(t, connect(t, first.port, { retryStrategy: () => null }), { prefix })
    const control = store(t, connect(t, first.port, { retryStrategy: () => null }), { prefix, replicas: 0 })
    const answeredWithoutReplicas = new Map<string, 'in-flight' | 'completed'>()
    const workers = [
      ...Array.from({ length: 16 }, (_, n) => worker(replicated, n, acknowledged)),
      ...Array.from({ length: 2 }, (_, n) => worker(control, n, answeredWithoutReplicas))
    ]
    await sleep(1500)
    stopping = true // the requests under way when the primary dies are the ones at risk
    await first.crash()
    await Promise.all(workers)
    for (const key of answeredWithoutReplicas.keys()) unacknowledged.add(key)

    const promoted = connect(t, second.port)
    await promoted.replicaof('NO', 'ONE')
    const after = new RedisStore({ client: promoted, prefix })
    t.teardown(() => after.close())
    const missing: string[] = []
    for (const [key, state] of acknowledged) {
      const found = await after.lookup(key)
      if (found?.state !== state) missing.push(`${key}: ${state}, found ${found?.state}`)
    }
    t.ok(acknowledged.size > 20, `${acknowledged.size} acknowledged records`)
    t.strictSame(missing, [], 'every one of them on the promoted replica, in the state acknowledged')
    let lost = 0
    for (const key of unacknowledged) if (await after.lookup(key) === undefined) lost++
    t.ok(lost > 0, `the control: of ${unacknowledged.size} claims answered without waiting for the replica, ${lost} are lost`)
    t.comment(`figures: ${acknowledged.size} acknowledged, all found; control without replicas: ${lost} of ${unacknowledged.size} lost`)
  })
})
