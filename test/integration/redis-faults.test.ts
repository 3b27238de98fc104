/**
 * The Redis store under the failures of production, on real redis-server
 * processes: a Redis that may evict, a full one, a write pause (failover), and
 * a connection that dies without a reset.
 */
import t from 'tap'
import '../helpers/crash-guard.js'
import { setTimeout as sleep } from 'node:timers/promises'
import { Redis, type RedisOptions } from 'ioredis'
import { RedisStore } from '../../lib/stores/redis.js'
import { startProxy } from '../../support/proxy.js'
import { startRedis, uniquePrefix, withRedis, type RedisServer } from '../../support/redis.js'
import { BINARY, sampleResponse } from '../helpers/store-contract.js'
import type { RouteCounters } from '../../types/index.js'
import { eventually } from '../helpers/app.js'

const LONG = 60_000
const ZERO: RouteCounters = { executed: 0, replayed: 0, conflicts: 0, mismatches: 0, missingKeys: 0, invalidKeys: 0, storeErrors: 0, lastDuplicateAt: 0 }

/** What ioredis holds for a client: commands written and not answered, waiting for a connection, or to be sent again. */
function held (client: Redis): number {
  const internals = client as unknown as { commandQueue: { length: number }, offlineQueue: { length: number }, prevCommandQueue?: { length: number } | null }
  // Between a close and the next connect, the queue to send again is the command queue itself.
  const resend = internals.prevCommandQueue === internals.commandQueue ? 0 : internals.prevCommandQueue?.length ?? 0
  return internals.commandQueue.length + internals.offlineQueue.length + resend
}

/** The store's read connection, once a lookup opened it. */
function readerOf (store: RedisStore): Redis {
  return (store as unknown as { reader: { client: Redis } }).reader.client
}

/** Store calls waiting for their deadline, timed-out ones excluded. */
function pendingDeadlines (store: RedisStore): number {
  return (store as unknown as { deadlines: { size: number } }).deadlines.size
}

withRedis(t, (t) => {
  /** A redis-server of the test's own, stopped when it ends. */
  async function own (tt: Pick<typeof t, 'teardown'>, options: Parameters<typeof startRedis>[0] = {}): Promise<RedisServer> {
    const server = await startRedis(options)
    tt.teardown(() => server.stop())
    return server
  }

  function connect (tt: Pick<typeof t, 'teardown'>, port: number, options: RedisOptions = {}): Redis {
    const client = new Redis({ host: '127.0.0.1', port, ...options })
    client.on('error', () => {}) // the failures these tests cause
    tt.teardown(() => client.disconnect())
    return client
  }

  function store (tt: Pick<typeof t, 'teardown'>, client: Redis, options: Partial<ConstructorParameters<typeof RedisStore>[0]> = {}): RedisStore {
    const made = new RedisStore({ client, prefix: uniquePrefix('faults'), ...options })
    tt.teardown(() => made.close())
    return made
  }

  /** Reconnects the client, as a network blip would, and waits until it is ready again. */
  async function blip (client: Redis): Promise<void> {
    const ready = new Promise((resolve) => client.once('ready', resolve))
    client.disconnect(true)
    await ready
  }

  t.test('eviction policy', async (t) => {
    t.test('verify(): noeviction passes without a word', async (t) => {
      const server = await own(t)
      const s = store(t, connect(t, server.port))
      const warnings: string[] = []
      s.onWarning = (code, message) => warnings.push(`${code}: ${message}`)
      t.strictSame(await s.verify(), { policy: 'noeviction', maxmemory: 0 })
      t.strictSame(warnings, [])
    })

    t.test('verify(): allkeys-lru is reported through onWarning, with a code', async (t) => {
      const server = await own(t, { maxmemory: '50mb', policy: 'allkeys-lru' })
      const s = store(t, connect(t, server.port))
      const warnings: Array<[string, string]> = []
      s.onWarning = (code, message) => warnings.push([code, message])
      t.strictSame(await s.verify(), { policy: 'allkeys-lru', maxmemory: 50 * 1024 * 1024 })
      t.equal(warnings.length, 1)
      t.equal(warnings[0][0], 'FST_IDEMPOTENCY_REDIS_EVICTION')
      t.match(warnings[0][1], /maxmemory-policy allkeys-lru: it may evict idempotency records, in-flight claims included/)
      t.type((await s.claim('k', 'fp', LONG)).token, 'string', 'a warning only: claims go on')

      const silent = store(t, connect(t, server.port))
      t.strictSame(await silent.verify(), { policy: 'allkeys-lru', maxmemory: 50 * 1024 * 1024 }, 'without onWarning, nothing to call and no failure')

      const usage = await s.usage()
      t.match(usage, { evictionPolicy: 'allkeys-lru', maxBytes: 50 * 1024 * 1024, inFlight: 1, records: 0 })
      t.match(usage.warnings, [/maxmemory-policy allkeys-lru: it may evict idempotency records/], 'the stats page says so too')
      t.equal(usage.warnings!.length, 1, 'and nothing about memory: far from full')
    })

    t.test('verify() with requireNoEviction: volatile-ttl rejects, and claims are refused; saves, releases and reads go on', async (t) => {
      const server = await own(t, { maxmemory: '50mb', policy: 'volatile-ttl' })
      const s = store(t, connect(t, server.port), { requireNoEviction: true })
      const before = (await s.claim('before', 'fp', LONG)).token as string
      const other = (await s.claim('other', 'fp', LONG)).token as string
      await t.rejects(s.verify(), { code: 'FST_IDEMPOTENCY_REDIS_EVICTION', message: /maxmemory-policy volatile-ttl/ })
      await t.rejects(s.claim('k', 'fp', LONG), { code: 'FST_IDEMPOTENCY_REDIS_EVICTION' })
      t.ok(await s.renew('before', before, LONG), 'a request that got in renews its claim')
      t.ok(await s.complete('before', before, sampleResponse(), LONG), 'and saves its response')
      t.ok(await s.release('other', other), 'or releases it')
      t.equal((await s.lookup('before'))?.state, 'completed', 'lookup still answers')
      await t.rejects(s.claim('before', 'fp', LONG), { code: 'FST_IDEMPOTENCY_REDIS_EVICTION' }, 'claims of completed keys too: the plugin looks them up')
    })

    t.test('after every reconnect the policy is checked again: a warning each time', async (t) => {
      const server = await own(t)
      const client = connect(t, server.port)
      const admin = connect(t, server.port)
      const s = store(t, client)
      const warnings: string[] = []
      s.onWarning = (_code, message) => warnings.push(message)
      const unverified = store(t, client)
      unverified.onWarning = (_code, message) => warnings.push(`unverified: ${message}`)
      await s.verify()
      t.strictSame(warnings, [])

      await admin.config('SET', 'maxmemory-policy', 'allkeys-lru')
      await blip(client)
      await eventually('the warning', () => warnings.length === 1)
      t.match(warnings[0], /maxmemory-policy allkeys-lru/)
      await blip(client)
      await eventually('the second warning', () => warnings.length === 2)
      t.match(warnings[1], /maxmemory-policy allkeys-lru/, 'warned again')
      await admin.config('SET', 'maxmemory-policy', 'noeviction')
      await blip(client)
      await sleep(100)
      t.equal(warnings.length, 2, 'noeviction again: nothing; and a store whose verify() was never called checks nothing')
    })

    t.test('with requireNoEviction, a reconnect that finds an evicting policy refuses claims until one finds noeviction', async (t) => {
      const server = await own(t)
      const client = connect(t, server.port)
      const admin = connect(t, server.port)
      const s = store(t, client, { requireNoEviction: true })
      await s.verify()
      const held = (await s.claim('held', 'fp', LONG)).token as string

      await admin.config('SET', 'maxmemory-policy', 'volatile-lru')
      await blip(client)
      await eventually('claims to be refused', async () => await s.claim('k', 'fp', LONG).then(() => false, (err) => err.code === 'FST_IDEMPOTENCY_REDIS_EVICTION'))
      t.ok(await s.complete('held', held, sampleResponse(), LONG), 'the request that holds a claim still saves')

      await admin.config('SET', 'maxmemory-policy', 'noeviction')
      await blip(client)
      await eventually('claims to be accepted', async () => await s.claim('k2', 'fp', LONG).then((result) => result.token !== undefined, () => false))
      t.pass('accepted again')
    })

    t.test('a Redis that hides INFO: verify() fails with its error; after a reconnect, a warning says the check failed', async (t) => {
      const server = await own(t, { args: ['--rename-command', 'INFO', ''] })
      const client = connect(t, server.port, { enableReadyCheck: false }) // the ready check sends INFO too
      const s = store(t, client, { requireNoEviction: true })
      const warnings: string[] = []
      s.onWarning = (code, message) => warnings.push(`${code}: ${message}`)
      await t.rejects(s.verify(), { message: /unknown command/i })
      t.type((await s.claim('k', 'fp', LONG)).token, 'string', 'a failed check refuses nothing by itself: the plugin fails its start-up')
      await blip(client)
      await eventually('the warning', () => warnings.length === 1)
      t.match(warnings[0], /^FST_IDEMPOTENCY_REDIS_EVICTION: Could not check the maxmemory-policy of Redis after a reconnect: .*unknown command/i)

      const silent = store(t, client)
      await t.rejects(silent.verify())
      await blip(client)
      await sleep(100)
      t.equal(warnings.length, 2, 'the first store warned again; one without onWarning fails quietly')
    })
  })

  t.test('a full Redis (noeviction): claims fail; saves, releases, renewals, replays, reads and stats go on', async (t) => {
    const server = await own(t)
    const client = connect(t, server.port)
    const s = store(t, client)
    const tokens: Record<string, string> = {}
    for (const key of ['save', 'release', 'renew', 'replay']) tokens[key] = (await s.claim(key, 'fp', LONG)).token as string
    t.ok(await s.complete('replay', tokens.replay, sampleResponse(), LONG))

    // A big value, then a maxmemory 1 MB below what Redis uses: well over its limit.
    await client.set('filler', Buffer.alloc(2 * 1024 * 1024))
    const maxmemory = Number(/used_memory:(\d+)/.exec(await client.info('memory'))?.[1]) - 1024 * 1024
    await client.config('SET', 'maxmemory', String(maxmemory))
    await t.rejects(client.set('probe', 'x'), { message: /^OOM/ }, 'Redis refuses writes now')

    await t.rejects(s.claim('new', 'fp', LONG), { message: /OOM/ }, 'a new claim fails: the plugin answers 503')
    t.equal(await client.exists(s.redisKey('new')), 0, 'and left nothing')
    const replay = await s.claim('replay', 'fp', LONG)
    t.ok(replay.record?.state === 'completed' && Buffer.isBuffer(replay.record.response.body) && replay.record.response.body.equals(BINARY), 'a replay is answered')
    t.strictSame(await s.claim('save', 'fp', LONG), { record: { state: 'in-flight', fingerprint: 'fp' } }, 'a duplicate of a running request gets in-flight')
    t.ok(await s.complete('save', tokens.save, sampleResponse(), LONG), 'the running request saves its response')
    const saved = await s.claim('save', 'fp', LONG)
    t.ok(saved.record?.state === 'completed' && Buffer.isBuffer(saved.record.response.body) && saved.record.response.body.equals(BINARY), 'and its retries get it')
    t.ok(await s.renew('renew', tokens.renew, LONG), 'renewals go on')
    t.ok(await s.release('release', tokens.release), 'a failed request lets its key go')
    t.equal((await s.lookup('save'))?.state, 'completed', 'lookup answers')
    await s.addStats({ 'POST /x': { ...ZERO, storeErrors: 1 } }, LONG)
    t.equal((await s.readStats())['POST /x']?.storeErrors, 1, 'the stats go on counting (the store errors, first of all)')

    const usage = await s.usage()
    t.equal(usage.maxBytes, maxmemory)
    t.equal(usage.evictionPolicy, 'noeviction')
    t.match(usage.warnings, [/uses \d+% of its maxmemory/], 'usage() warns that Redis is nearly full (here: over)')

    await client.del('filler')
    t.type((await s.claim('new', 'fp', LONG)).token, 'string', 'room again: claims succeed')
  })

  t.test('a write pause (CLIENT PAUSE WRITE, as in a failover): lookup answers while the claim waits', async (t) => {
    const server = await own(t)
    const client = connect(t, server.port)
    const admin = connect(t, server.port)
    const s = store(t, client, { timeout: 5000 })
    const done = (await s.claim('done', 'fp', LONG)).token as string
    t.ok(await s.complete('done', done, sampleResponse(), LONG))
    await s.claim('running', 'fp', LONG)

    await admin.client('PAUSE', 1500, 'WRITE')
    let claimed = false
    const claim = s.claim('done', 'fp', LONG).then((result) => { claimed = true; return result })
    let read = false
    const sameConnection = client.hget(s.redisKey('done'), 's').then(() => { read = true })
    const found = await s.lookup('done')
    t.equal(found?.state, 'completed', 'the completed record, read on the store\'s read connection (opened during the pause)')
    t.strictSame(await s.lookup('running'), { state: 'in-flight', fingerprint: 'fp' }, 'an in-flight one too')
    t.notOk(claimed, 'while the claim script is held by the pause, even for a completed key')
    t.notOk(read, 'and so is a plain read sent after it on the same connection')
    t.equal((await claim).record?.state, 'completed', 'the claim is answered once the pause ends')
    await sameConnection
  })

  t.test('a connection that dies without a reset, with socketTimeout: calls fail in time, ioredis holds a bounded number of commands, the client recovers', async (t) => {
    const server = await own(t)
    const proxy = await startProxy(server.port)
    t.teardown(() => proxy.stop())
    const socketTimeout = 1000
    const timeout = 500
    const client = connect(t, proxy.port, { socketTimeout })
    t.equal(RedisStore.queueWarning(client), undefined)
    const s = store(t, client, { timeout })
    t.type((await s.claim('warm-up', 'fp', LONG)).token, 'string')
    await s.lookup('warm-up')
    const reader = readerOf(s)

    proxy.blackhole()
    const started = performance.now()
    const outcomes: Array<{ code: string | undefined, took: number }> = []
    const calls: Array<Promise<void>> = []
    let maxHeld = 0
    let maxPending = 0
    let sent = 0
    const track = (promise: Promise<unknown>) => {
      const at = performance.now()
      calls.push(promise.then(() => { outcomes.push({ code: 'answered', took: performance.now() - at }) },
        (err) => { outcomes.push({ code: err.code, took: performance.now() - at }) }))
    }
    // A steady stream, as requests keep coming: a claim and a lookup (the plugin's answer to a failed claim) every 10 ms.
    while (performance.now() - started < 6000) {
      track(s.claim(`during-${sent}`, 'fp', LONG))
      track(s.lookup(`during-${sent}`))
      sent++
      maxHeld = Math.max(maxHeld, held(client) + held(reader))
      maxPending = Math.max(maxPending, pendingDeadlines(s))
      await sleep(10)
    }
    await Promise.all(calls)
    const rate = sent / 6 // claims (and as many lookups) per second
    t.ok(outcomes.every(({ code }) => code === 'FST_IDEMPOTENCY_STORE_TIMEOUT'), 'every call failed with the store timeout')
    const slowest = Math.max(...outcomes.map(({ took }) => took))
    t.ok(slowest <= timeout + 1000, `each within the timeout, give or take the event loop (slowest ${Math.round(slowest)} ms)`)
    // Three commands a step (the claim script; HMGET and PTTL). They pile up while the connection looks alive
    // (socketTimeout), then while ioredis reconnects until the store has seen the outage last its timeout, then
    // no more: without that, the two connections would hold all the 3 × `sent` commands of the 6 s.
    const bound = 3 * rate * (socketTimeout + timeout + 500) / 1000
    t.ok(maxHeld <= bound, `ioredis held at most ${maxHeld} commands of ${3 * sent} sent (bound ${Math.round(bound)})`)
    t.ok(maxPending <= 2 * rate * (timeout + 500) / 1000, `at most ${maxPending} calls waited for their deadline`)

    proxy.pass()
    const healed = performance.now()
    await eventually('a claim to succeed again', async () => (await s.claim('after', 'fp', LONG).catch(() => ({ token: undefined }))).token !== undefined, 20_000)
    const recovery = performance.now() - healed
    t.pass(`recovered ${Math.round(recovery)} ms after the network healed`)
    await eventually('a lookup to succeed again', async () => (await s.lookup('after').catch(() => undefined))?.state === 'in-flight', 20_000)
    const admin = connect(t, server.port)
    // Claims that ioredis sent again after reconnecting ran late; their replies released them.
    await eventually('the late claims to be released', async () => (await admin.keys(`${s.prefix}{during-*`)).length === 0, 10_000)
    t.pass('no claim of the outage is left holding its key')
    t.comment(`figures: ${sent} claims and ${sent} lookups in 6 s (${Math.round(rate)}/s each); ioredis held at most ${maxHeld} commands; ` +
      `${maxPending} deadlines at most; slowest failure ${Math.round(slowest)} ms; recovery ${Math.round(recovery)} ms`)
  })

  t.test('the same without socketTimeout: queueWarning says so, and ioredis holds every command sent meanwhile', async (t) => {
    const server = await own(t)
    const proxy = await startProxy(server.port)
    t.teardown(() => proxy.stop())
    const client = connect(t, proxy.port)
    t.match(RedisStore.queueWarning(client), /no socketTimeout/)
    const s = store(t, client, { timeout: 300 })
    t.type((await s.claim('warm-up', 'fp', LONG)).token, 'string')

    proxy.blackhole()
    const calls: Array<Promise<unknown>> = []
    for (let i = 0; i < 200; i++) {
      for (let j = 0; j < 6; j++) calls.push(s.claim(`during-${i}-${j}`, 'fp', LONG).catch((err) => err.code))
      await sleep(10)
    }
    t.ok((await Promise.all(calls)).every((code) => code === 'FST_IDEMPOTENCY_STORE_TIMEOUT'), 'the store\'s calls still fail in time')
    t.equal(client.status, 'ready', 'but the client never notices the connection is dead')
    t.ok(held(client) >= 1200, `and holds all ${held(client)} commands, for as long as the socket lives`)
  })
})
