import t from 'tap'
import '../helpers/crash-guard.js'
import { spawn, spawnSync } from 'node:child_process'
import { createConnection, createServer } from 'node:net'
import { createInterface } from 'node:readline'
import { setTimeout as sleep } from 'node:timers/promises'
import { Redis, type RedisOptions } from 'ioredis'
import { RedisStore } from '../../lib/stores/redis.js'
import { childEnv } from '../../support/processes.js'
import { startRedis, uniquePrefix, withRedis, type RedisServer } from '../../support/redis.js'
import { BINARY, TEXT, sampleResponse, storeContract } from '../helpers/store-contract.js'
import type { RouteCounters } from '../../types/index.js'

const LONG = 60_000
const ZERO: RouteCounters = { executed: 0, replayed: 0, conflicts: 0, mismatches: 0, missingKeys: 0, invalidKeys: 0, storeErrors: 0, lastDuplicateAt: 0 }

/** What ioredis holds for a client: commands written and not answered, and commands waiting for a connection. */
function held (client: Redis): number {
  const internals = client as unknown as { commandQueue: { length: number }, offlineQueue: { length: number } }
  return internals.commandQueue.length + internals.offlineQueue.length
}

withRedis(t, (t) => {
  let server: RedisServer
  t.before(async () => { server = await startRedis() })
  t.teardown(async () => { await server?.stop() })

  /** A client on the shared server, disconnected when `t` ends. */
  function connect (tt: Pick<typeof t, 'teardown'>, options: RedisOptions = {}): Redis {
    const client = new Redis({ host: '127.0.0.1', port: server.port, ...options })
    tt.teardown(() => client.disconnect())
    return client
  }

  /** A store whose read connection is closed when `tt` ends. */
  function storeOn (tt: Pick<typeof t, 'teardown'>, client: Redis, name: string): RedisStore {
    const store = new RedisStore({ client, prefix: uniquePrefix(name) })
    tt.teardown(() => store.close())
    return store
  }

  for (const [name, options] of [
    ['RESP2', { protocol: 2 }],
    ['RESP3', { protocol: 3 }],
    ['RESP3, replyMapping resp3', { protocol: 3, replyMapping: 'resp3' }]
  ] as Array<[string, RedisOptions]>) {
    t.test(`the store contract, ${name}`, async (t) => {
      const client = connect(t, options)
      const info = String(await client.call('CLIENT', 'INFO'))
      t.match(info, new RegExp(` resp=${options.protocol}\\b`), `the client really speaks RESP${options.protocol}`)
      storeContract(t, {
        create: () => storeOn(t, client, name),
        advance: (ms) => sleep(ms),
        short: 150,
        expiresIn: true,
        lookup: true
      })
    })
  }

  t.test('data layout: one hash per record under a hash tag, expiring in Redis', async (t) => {
    const client = connect(t)
    const prefix = uniquePrefix('layout')
    const store = new RedisStore({ client, prefix })
    const key = 'idem:Zm9vYmFy_-'
    const redisKey = `${prefix}{${key}}`
    t.equal(store.redisKey(key), redisKey)

    const token = (await store.claim(key, 'fp', 5000)).token as string
    const inFlight = await client.hgetall(redisKey)
    t.strictSame(Object.keys(inFlight).sort(), ['f', 'n', 's', 't'])
    t.match(inFlight, { s: 'i', t: token, f: 'fp' })
    t.match(inFlight.n, /^[\w-]{16}\.[0-9a-z]+$/, 'the id of the claim call: a random part of the process and a counter')
    const lockPttl = await client.pttl(redisKey)
    t.ok(lockPttl > 0 && lockPttl <= 5000, `the claim expires after lockTtl (pttl ${lockPttl})`)

    t.ok(await store.renew(key, token, 20_000))
    const renewedPttl = await client.pttl(redisKey)
    t.ok(renewedPttl > 5000 && renewedPttl <= 20_000, `renew is a PEXPIRE (pttl ${renewedPttl})`)

    t.ok(await store.complete(key, token, sampleResponse(), 30_000))
    const completed = await client.hgetallBuffer(redisKey)
    t.strictSame(Object.keys(completed).sort(), ['b', 'c', 'f', 'h', 'k', 's'], 'the token and the claim id are gone once completed')
    t.equal(completed.s.toString(), 'c')
    t.equal(completed.c.toString(), '201')
    t.strictSame(JSON.parse(completed.h.toString()), sampleResponse().headers, 'headers as JSON')
    t.ok(completed.b.equals(BINARY), 'the body as raw bytes')
    t.equal(completed.k.toString(), 'b', 'kind: bytes')
    const ttlPttl = await client.pttl(redisKey)
    t.ok(ttlPttl > 20_000 && ttlPttl <= 30_000, `the record expires after ttl (pttl ${ttlPttl})`)

    const text = (await store.claim('text', undefined, 5000)).token as string
    t.ok(await store.complete('text', text, { statusCode: 200, headers: {}, body: TEXT }, null))
    t.equal(await client.hget(store.redisKey('text'), 'k'), 's', 'kind: string')
    t.equal(await client.hget(store.redisKey('text'), 'b'), TEXT, 'stored as its UTF-8 bytes')
    t.equal(await client.pttl(store.redisKey('text')), -1, 'ttl null: no expiry at all')
    t.equal(await client.hexists(store.redisKey('text'), 'f'), 0, 'no fingerprint field without a fingerprint')
  })

  t.test('a record written without a body kind (an earlier version of this store) comes back as bytes', async (t) => {
    const client = connect(t)
    const store = storeOn(t, client, 'old-layout')
    await client.hset(store.redisKey('old'), { s: 'c', c: '200', h: '{}', b: 'hello' })
    const { record } = await store.claim('old', undefined, LONG)
    t.ok(record?.state === 'completed' && Buffer.isBuffer(record.response.body) && record.response.body.toString() === 'hello')
    const found = await store.lookup('old')
    t.ok(found?.state === 'completed' && Buffer.isBuffer(found.response.body), 'lookup too')
  })

  t.test('tokens are the Redis clock in microseconds: one clock for every process', async (t) => {
    const client = connect(t)
    const store = new RedisStore({ client, prefix: uniquePrefix('clock') })
    const micros = async () => {
      const [seconds, us] = await client.time()
      return BigInt(seconds) * 1_000_000n + BigInt(us)
    }
    const before = await micros()
    const token = BigInt((await store.claim('k', undefined, LONG)).token as string)
    const after = await micros()
    t.ok(before <= token && token <= after, `${before} <= ${token} <= ${after}`)
  })

  t.test('tokens strictly increase even when a release and the next claim of the key run back to back', async (t) => {
    const client = connect(t)
    const store = new RedisStore({ client, prefix: uniquePrefix('back-to-back') })
    let previous = BigInt((await store.claim('k', undefined, LONG)).token as string)
    let increasing = 0
    for (let i = 0; i < 500; i++) {
      // Issued in one turn: one write, so Redis runs the release and the claim one right after the other.
      const [released, next] = await Promise.all([store.release('k', String(previous)), store.claim('k', undefined, LONG)])
      t.equal(released, true)
      const token = BigInt(next.token as string)
      if (token > previous) increasing++
      previous = token
    }
    t.equal(increasing, 500, 'every claim got a larger token than the one released just before it')
  })

  t.test('a record released is deleted from Redis', async (t) => {
    const client = connect(t)
    const store = new RedisStore({ client, prefix: uniquePrefix('release') })
    const token = (await store.claim('k', 'fp', LONG)).token as string
    t.equal(await client.exists(store.redisKey('k')), 1)
    t.ok(await store.release('k', token))
    t.equal(await client.exists(store.redisKey('k')), 0)
  })

  t.test('defaults, and close() leaves the client connected', async (t) => {
    const client = connect(t)
    const store = new RedisStore({ client })
    t.equal(store.prefix, 'idempotency:')
    t.equal(store.timeout, 2000)
    t.equal(store.requireNoEviction, false)
    t.equal(store.replicas, 0)
    t.equal(store.replicaTimeout, 100)
    t.equal(store.onWarning, undefined, 'the plugin sets onWarning')
    t.equal(store.client, client, 'the client, for RedisStore.queueWarning(store.client)')
    const key = `defaults-${process.pid}-${Date.now()}`
    const token = (await store.claim(key, undefined, 1000)).token as string
    t.teardown(() => store.release(key, token))
    t.equal(await client.exists(`idempotency:{${key}}`), 1)
    const listeners = client.listenerCount('ready')
    const others = Array.from({ length: 20 }, () => new RedisStore({ client }))
    t.equal(client.listenerCount('ready'), listeners, 'more stores on one client add no listeners: they share one pair')
    t.equal(client.listenerCount('close'), 1)
    for (const other of others) other.close()
    await store.verify()
    await store.verify()
    t.equal(client.listenerCount('ready'), listeners + 1, 'but one for reconnects, once verify() is called, however often')
    store.close()
    t.equal(client.listenerCount('ready'), listeners, 'and removes it on close()')
    t.equal(await client.ping(), 'PONG', 'the client still works after close()')
    t.equal(client.status, 'ready')
  })

  t.test('lookup reads on a connection of its own, opened on the first lookup and closed by close()', async (t) => {
    const name = `reader-test-${process.pid}`
    const client = connect(t, { connectionName: name })
    const store = new RedisStore({ client, prefix: uniquePrefix('reader') })
    const connections = async () => (await client.client('LIST') as string).split('\n').filter((line) => line.includes(`name=${name}`)).length
    t.equal(await connections(), 1)
    const token = (await store.claim('k', 'fp', LONG)).token as string
    t.equal(await connections(), 1, 'claims use the application\'s connection')
    t.strictSame(await store.lookup('k'), { state: 'in-flight', fingerprint: 'fp' })
    t.equal(await connections(), 2, 'the first lookup opened a second one (a duplicate of the client, with its name)')
    await store.complete('k', token, { statusCode: 200, headers: { a: 'b' }, body: TEXT }, 10_000)
    const found = await store.lookup('k')
    t.equal(found?.state, 'completed')
    if (found?.state !== 'completed') return
    t.equal(found.response.body, TEXT, 'a string body comes back as a string')
    t.ok(found.expiresIn !== undefined && found.expiresIn > 5000 && found.expiresIn <= 10_000, `expiresIn from PTTL (${found.expiresIn})`)
    t.equal(await connections(), 2, 'and reused it')
    store.close()
    for (let i = 0; i < 100 && await connections() > 1; i++) await sleep(10)
    t.equal(await connections(), 1, 'close() closed it')
    t.strictSame(await store.lookup('absent'), undefined, 'a lookup after close() opens a new one')
    store.close()
  })

  t.test('several stores on one client define each script once', async (t) => {
    const client = connect(t)
    const first = new RedisStore({ client, prefix: uniquePrefix('shared-a') })
    const scripts = (client as unknown as { scriptsSet: Record<string, unknown> }).scriptsSet
    const names = Object.keys(scripts)
    t.equal(names.length, 5, 'claim, complete, release, renew and the stats script')
    const defined = names.map((name) => scripts[name])
    const second = new RedisStore({ client, prefix: uniquePrefix('shared-b') })
    t.strictSame(Object.keys(scripts), names, 'no new command')
    t.ok(names.every((name, i) => scripts[name] === defined[i]), 'the same script objects')
    const a = (await first.claim('k', 'fp', LONG)).token as string
    const b = (await second.claim('k', 'fp', LONG)).token as string
    t.type(a, 'string')
    t.type(b, 'string', 'the prefixes keep the stores apart')
    t.ok(await second.complete('k', b, sampleResponse(), LONG))
    t.equal((await first.claim('k', 'fp', LONG)).record?.state, 'in-flight')
  })

  t.test('claims from many clients at once: exactly one wins', async (t) => {
    const prefix = uniquePrefix('many')
    const stores = Array.from({ length: 8 }, (_, i) => new RedisStore({ client: connect(t, { protocol: i % 2 === 0 ? 2 : 3 }), prefix }))
    for (let round = 0; round < 20; round++) {
      const results = await Promise.all(stores.flatMap((store) => [store.claim(`k${round}`, 'fp', LONG), store.claim(`k${round}`, 'fp', LONG)]))
      t.equal(results.filter((r) => r.token !== undefined).length, 1, `round ${round}: one winner`)
    }
  })

  t.test('two processes whose first claims share a counter value still tell their claims apart', async (t) => {
    // A claim that finds its own claim id is taken for a resent one: ids of two processes must never meet.
    const prefix = uniquePrefix('processes')
    const script = `
      import { Redis } from 'ioredis'
      import { RedisStore } from ${JSON.stringify(new URL('../../lib/stores/redis.ts', import.meta.url).pathname)}
      const client = new Redis({ host: '127.0.0.1', port: ${server.port} })
      const store = new RedisStore({ client, prefix: process.argv[1] })
      const result = await store.claim('shared', undefined, 60000)
      console.log(JSON.stringify(result))
      client.disconnect()
    `
    const env = childEnv()
    const run = () => {
      const child = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script, prefix], { encoding: 'utf8', env })
      t.equal(child.status, 0, child.stderr)
      return JSON.parse(child.stdout) as { token?: string, record?: unknown }
    }
    const first = run()
    const second = run()
    t.type(first.token, 'string', 'the first process claims the key')
    t.strictSame(second, { record: { state: 'in-flight' } }, 'the second finds it in flight (the fingerprint, undefined, is not in JSON)')
  })

  t.test('a Redis error is passed on as it is', async (t) => {
    const client = connect(t)
    const store = storeOn(t, client, 'wrongtype')
    await client.set(store.redisKey('k'), 'not a hash')
    await t.rejects(store.claim('k', 'fp', LONG), { message: /WRONGTYPE/ })
    await t.rejects(store.lookup('k'), { message: /WRONGTYPE/ }, 'lookup too')
  })

  t.test('every call fails with FST_IDEMPOTENCY_STORE_TIMEOUT when Redis does not answer', async (t) => {
    const doomed = await startRedis()
    t.teardown(() => doomed.stop())
    const client = new Redis({ host: '127.0.0.1', port: doomed.port })
    client.on('error', () => {}) // reconnection errors, expected here
    t.teardown(() => client.disconnect())
    const store = new RedisStore({ client, prefix: uniquePrefix('timeout'), timeout: 200 })
    t.teardown(() => store.close())
    const token = (await store.claim('k', 'fp', LONG)).token as string
    await doomed.stop()

    const timedOut = { code: 'FST_IDEMPOTENCY_STORE_TIMEOUT', message: /did not answer within 200 ms/ }
    await t.rejects(store.claim('k', 'fp', LONG), timedOut, 'claim')
    await t.rejects(store.complete('k', token, sampleResponse(), LONG), timedOut, 'complete')
    await t.rejects(store.release('k', token), timedOut, 'release')
    await t.rejects(store.renew('k', token, LONG), timedOut, 'renew')
    await t.rejects(store.lookup('k'), timedOut, 'lookup')
    await t.rejects(store.readStats(), timedOut, 'readStats')
    await t.rejects(store.usage(), timedOut, 'usage')
    await t.rejects(store.verify(), timedOut, 'verify')
    t.equal(store.timeout, 200)
    const underWay = store.claim('closing', 'fp', LONG)
    store.close()
    await t.rejects(underWay, timedOut, 'a call under way when the store closes still fails in time')
  })

  t.test('once Redis has been away for longer than the timeout, calls fail at once and queue nothing in ioredis', async (t) => {
    const away = await startRedis()
    t.teardown(() => away.stop())
    const client = new Redis({ host: '127.0.0.1', port: away.port, retryStrategy: () => 50 })
    client.on('error', () => {}) // reconnection errors, expected here
    t.teardown(() => client.disconnect())
    const store = new RedisStore({ client, prefix: uniquePrefix('away'), timeout: 200 })
    t.teardown(() => store.close())
    const token = (await store.claim('k', 'fp', LONG)).token as string
    t.strictSame(await store.lookup('k'), { state: 'in-flight', fingerprint: 'fp' }, 'the read connection is open too')
    await away.crash()

    await t.rejects(store.claim('first', 'fp', LONG), { code: 'FST_IDEMPOTENCY_STORE_TIMEOUT' }, 'within the first timeout: queued, then timed out')
    await t.rejects(store.lookup('first'), { code: 'FST_IDEMPOTENCY_STORE_TIMEOUT' })
    const queued = held(client)
    t.ok(queued >= 1, `ioredis holds the commands sent so far (${queued})`)
    const codes: string[] = []
    const outcome = (promise: Promise<unknown>) => promise.then(() => 'answered', (err) => err.code)
    for (let i = 0; i < 50; i++) {
      codes.push(await outcome(store.claim(`k${i}`, 'fp', LONG)))
      codes.push(await outcome(store.complete('k', token, sampleResponse(), LONG)))
      codes.push(await outcome(store.lookup(`k${i}`)))
    }
    t.ok(codes.every((code) => code === 'FST_IDEMPOTENCY_STORE_TIMEOUT'), '150 more calls failed with the store timeout')
    t.ok(held(client) <= queued + 1, `and added nothing to what ioredis holds (${held(client)})`)

    await away.restart()
    for (let i = 0; i < 200 && client.status !== 'ready'; i++) await sleep(20)
    await sleep(300)
    client.disconnect(true) // a blip, a while after the outage ended, when no call saw the client ready again
    t.type((await store.claim('after-blip', 'fp', LONG)).token, 'string', 'a call during a short reconnect waits for it, as ioredis queues it')
    t.type((await store.claim('after', 'fp', LONG)).token, 'string', 'once the client is ready again, calls go through')
    t.strictSame(await store.lookup('after'), { state: 'in-flight', fingerprint: 'fp' }, 'lookups too, once the read connection is back')
  })

  t.test('a claim that timed out while Redis was frozen, and ran when it woke, is released: no 409 for lockTtl', async (t) => {
    const frozen = await startRedis()
    t.teardown(() => frozen.stop())
    const client = new Redis({ host: '127.0.0.1', port: frozen.port })
    t.teardown(() => client.disconnect())
    const store = new RedisStore({ client, prefix: uniquePrefix('late-claim'), timeout: 100 })
    const held = (await store.claim('held', 'fp', LONG)).token as string // loads the script, and holds one key
    process.kill(frozen.pid, 'SIGSTOP') // Redis stops answering; ioredis keeps the commands it sent
    try {
      await t.rejects(store.claim('free', 'fp', LONG), { code: 'FST_IDEMPOTENCY_STORE_TIMEOUT' }, 'a free key')
      await t.rejects(store.claim('held', 'fp', LONG), { code: 'FST_IDEMPOTENCY_STORE_TIMEOUT' }, 'a held key')
    } finally {
      process.kill(frozen.pid, 'SIGCONT') // Redis now runs both claims
    }
    for (let i = 0; i < 100 && await client.exists(store.redisKey('free')) === 1; i++) await sleep(10)
    t.equal(await client.exists(store.redisKey('free')), 0, 'the claim nobody was told of is released once its reply arrives')
    t.type((await store.claim('free', 'fp', LONG)).token, 'string', 'so a retry claims the key at once')
    t.ok(await store.complete('held', held, sampleResponse(), LONG), 'a late claim that found the key held leaves it to its owner')
  })

  t.test('a claim resent after the connection dropped with its reply finds its own claim: claimed, with its token', async (t) => {
    // A proxy between the client and Redis that can drop a reply and cut the connection,
    // as a network failure does after Redis has run a command; ioredis then sends it again.
    let dropNextReply = false
    const sockets = new Set<import('node:net').Socket>()
    const proxy = createServer((downstream) => {
      const upstream = createConnection({ host: '127.0.0.1', port: server.port })
      for (const socket of [downstream, upstream]) {
        sockets.add(socket)
        socket.on('error', () => {})
        socket.on('close', () => { downstream.destroy(); upstream.destroy() })
      }
      downstream.on('data', (chunk) => upstream.write(chunk))
      upstream.on('data', (chunk) => {
        if (!dropNextReply) return downstream.write(chunk)
        dropNextReply = false
        downstream.destroy()
      })
    })
    await new Promise<void>((resolve) => proxy.listen(0, '127.0.0.1', resolve))
    t.teardown(() => {
      for (const socket of sockets) socket.destroy()
      proxy.close()
    })
    const client = connect(t, { port: (proxy.address() as { port: number }).port })
    client.on('error', () => {}) // the cut connection
    const store = new RedisStore({ client, prefix: uniquePrefix('resent'), timeout: 5000 })
    t.type((await store.claim('warm-up', undefined, LONG)).token, 'string')
    dropNextReply = true
    const claimed = await store.claim('k', 'fp', LONG)
    t.equal(dropNextReply, false, 'the first reply was dropped and the claim sent again')
    t.type(claimed.token, 'string', 'the request that claimed the key holds it')
    t.equal(claimed.token, await client.hget(store.redisKey('k'), 't'), 'with the token Redis gave the first time')
    t.ok(await store.complete('k', claimed.token as string, sampleResponse(), LONG), 'and can complete it')
  })

  t.test('a client that never connected fails with the timeout too', async (t) => {
    const gone = await startRedis()
    const port = gone.port
    await gone.stop()
    const client = new Redis({ host: '127.0.0.1', port })
    client.on('error', () => {}) // connection refused, expected here
    t.teardown(() => client.disconnect())
    const store = new RedisStore({ client, timeout: 100 })
    await t.rejects(store.claim('k', 'fp', LONG), { code: 'FST_IDEMPOTENCY_STORE_TIMEOUT' })
  })

  t.test('commands issued in one turn of the event loop reach the socket in one write', async (t) => {
    const client = connect(t)
    await client.ping()
    const store = new RedisStore({ client, prefix: uniquePrefix('cork') })
    const socket = client.stream
    const writes: number[] = []
    const write = socket._writev?.bind(socket)
    const single = socket._write.bind(socket)
    // Count what the socket hands to the system: one entry per write call, with its chunk count.
    socket._writev = (chunks, callback) => { writes.push(chunks.length); write!(chunks, callback) }
    socket._write = (chunk, encoding, callback) => { writes.push(1); single(chunk, encoding, callback) }
    t.teardown(() => { socket._writev = write; socket._write = single })

    const claims = Array.from({ length: 10 }, (_, i) => store.claim(`k${i}`, 'fp', LONG))
    t.equal(socket.writableCorked, 1, 'the connection holds its writes while this turn issues commands')
    const results = await Promise.all(claims)
    t.ok(results.every((result) => typeof result.token === 'string'), 'every claim is answered')
    t.strictSame(writes, [10], 'ten claims, one write of ten commands')
    t.equal(socket.writableCorked, 0, 'released after the turn')

    writes.length = 0
    await store.claim('k0', 'fp', LONG)
    t.strictSame(writes, [1], 'a lone command is one write too')
  })

  t.test('a client that is not ready yet is not held: its commands wait in the offline queue as usual', async (t) => {
    const client = connect(t, { lazyConnect: true })
    const store = new RedisStore({ client, prefix: uniquePrefix('lazy') })
    t.equal(client.status, 'wait')
    const claimed = await store.claim('k', 'fp', LONG)
    t.type(claimed.token, 'string', 'the claim connects the client and is answered')
    t.equal(client.stream.writableCorked, 0)
  })

  t.test('round trips, counted with redis-cli monitor: a first request costs two, a replay one, a lookup one', async (t) => {
    const prefix = uniquePrefix('monitor')
    const monitor = spawn('redis-cli', ['-h', '127.0.0.1', '-p', String(server.port), 'monitor'], { stdio: ['ignore', 'pipe', 'inherit'] })
    t.teardown(() => { monitor.kill() })
    const lines: string[] = []
    const waiting = new Map<string, () => void>()
    createInterface({ input: monitor.stdout }).on('line', (line) => {
      lines.push(line)
      for (const [marker, resolve] of waiting) if (line.includes(marker)) resolve()
    })
    const client = connect(t)
    /** Everything Redis received for our prefix since the last mark, up to a marker command it has surely logged. */
    let seen = 0
    async function commandsSinceLastMark (): Promise<string[]> {
      const marker = `mark-${Math.random()}`
      const logged = new Promise<void>((resolve) => waiting.set(marker, resolve))
      await client.echo(marker)
      await logged
      waiting.delete(marker)
      const commands = lines.slice(seen).filter((line) => line.includes(prefix) && !line.includes(' lua]'))
      seen = lines.length
      return commands
    }
    await new Promise<void>((resolve) => waiting.set('OK', resolve))
    waiting.delete('OK')

    const store = new RedisStore({ client, prefix })
    t.teardown(() => store.close())
    const firstRequest = async (key: string) => {
      const { token } = await store.claim(key, 'fp', LONG)
      t.ok(await store.complete(key, token as string, sampleResponse(), LONG))
    }

    await commandsSinceLastMark()
    await firstRequest('p1')
    const first = await commandsSinceLastMark()
    t.equal(first.length, 2, 'first request: claim and complete', { commands: first })
    t.match(first[0], /"eval(sha)?"/)
    t.match(first[1], /"eval(sha)?"/)

    t.equal((await store.claim('p1', 'fp', LONG)).record?.state, 'completed')
    const replay = await commandsSinceLastMark()
    t.equal(replay.length, 1, 'replay: one claim-or-get', { commands: replay })
    t.match(replay[0], /^\S+ \[\d+ [^\]]+\] "evalsha" "[0-9a-f]{40}"/, 'called by SHA once the script is loaded on the connection')

    await firstRequest('p2')
    const second = await commandsSinceLastMark()
    t.ok(second.every((line) => line.includes('"evalsha"')), 'later first requests use the SHA only')
    t.equal(second.length, 2)

    t.equal((await store.lookup('p1'))?.state, 'completed')
    const lookup = await commandsSinceLastMark()
    t.strictSame(lookup.map((line) => /"(\w+)"/.exec(line)?.[1]), ['hmget', 'pttl'], 'lookup: two plain reads, no script', { commands: lookup })
    const address = (line: string) => /\[\d+ ([^\]]+)\]/.exec(line)?.[1]
    t.equal(address(lookup[0]), address(lookup[1]), 'sent together on one connection')
    t.not(address(lookup[0]), address(first[0]), 'not the one of the scripts')
  })

  t.test('shared stats: counts add up per prefix, lastDuplicateAt keeps the latest, the hash expires', async (t) => {
    const client = connect(t)
    const store = new RedisStore({ client, prefix: uniquePrefix('stats') })
    const other = new RedisStore({ client, prefix: uniquePrefix('stats-other') })
    t.strictSame(await store.readStats(), {}, 'nothing yet')
    await store.addStats({ 'POST /a': { ...ZERO, executed: 2, lastDuplicateAt: 2000 }, 'POST /b': { ...ZERO, storeErrors: 1 } }, LONG)
    await store.addStats({ 'POST /a': { ...ZERO, executed: 1, replayed: 3, lastDuplicateAt: 1000 } }, 5000)
    await other.addStats({ 'POST /a': { ...ZERO, executed: 10 } }, LONG)
    t.strictSame(await store.readStats(), {
      'POST /a': { ...ZERO, executed: 3, replayed: 3, lastDuplicateAt: 2000 },
      'POST /b': { ...ZERO, storeErrors: 1 }
    })
    t.strictSame(await other.readStats(), { 'POST /a': { ...ZERO, executed: 10 } }, 'another prefix keeps its own')
    const statsKey = `${store.prefix}stats:{idempotency-stats}`
    const pttl = await client.pttl(statsKey)
    t.ok(pttl > 0 && pttl <= 5000, `the last ttl given counts (pttl ${pttl})`)
    await store.addStats({ 'POST /a': { ...ZERO, lastDuplicateAt: 3000 } }, LONG)
    t.equal((await store.readStats())['POST /a'].lastDuplicateAt, 3000, 'a later time replaces an earlier one')
  })

  t.test('usage(): exact on a small keyspace, completed records and claims apart', async (t) => {
    const own = await startRedis()
    t.teardown(() => own.stop())
    const client = new Redis({ host: '127.0.0.1', port: own.port })
    t.teardown(() => client.disconnect())
    const store = new RedisStore({ client, prefix: 'mine:' })
    const other = new RedisStore({ client, prefix: 'theirs:' })
    const keys = ['a', 'b', 'c', 'd', 'e']
    for (const key of keys) {
      const token = (await store.claim(key, 'fp', LONG)).token as string
      t.ok(await store.complete(key, token, sampleResponse(), LONG))
    }
    await store.claim('in-flight-1', undefined, LONG)
    await store.claim('in-flight-2', undefined, LONG)
    const released = (await store.claim('released', undefined, LONG)).token as string
    await store.release('released', released)
    await other.claim('a', 'fp', LONG)
    await client.set('mine:unrelated', 'x')
    await store.addStats({ 'POST /x': { ...ZERO, executed: 1 } }, LONG)
    let truth = 0
    for (const key of [...keys, 'in-flight-1', 'in-flight-2']) {
      // Redis resizes a hash's table a step at each access, and frees the old one at the last step: reads by
      // usage() could finish a resize that the last write left under way. Finish them first.
      for (let i = 0; i < 10; i++) await client.hget(store.redisKey(key), 's')
      truth += Number(await client.memory('USAGE', store.redisKey(key), 'SAMPLES', 0))
    }
    const evicted = Number(/evicted_keys:(\d+)/.exec(await client.info('stats'))?.[1])

    t.strictSame(await store.usage(), {
      records: 5,
      inFlight: 2,
      bytes: truth,
      maxBytes: undefined,
      evictions: evicted,
      evictionPolicy: 'noeviction',
      estimated: false,
      warnings: []
    }, 'not the released one, another prefix, the stats hash or other keys; no maxmemory: no bound')
    t.ok(truth > 0)

    // A record that expires between SCAN and its reads: counted nowhere, and no failure.
    const vanishing = store.redisKey('e')
    const vanishingBytes = Number(await client.memory('USAGE', vanishing, 'SAMPLES', 0))
    const pipeline = client.pipeline.bind(client)
    client.pipeline = ((...args: Parameters<Redis['pipeline']>) => {
      const made = pipeline(...args)
      const exec = made.exec.bind(made)
      made.exec = (async () => {
        await client.del(vanishing)
        return exec()
      }) as typeof made.exec
      return made
    }) as Redis['pipeline']
    t.match(await store.usage(), { records: 4, inFlight: 2, bytes: truth - vanishingBytes, estimated: false })
  })

  t.test('usage(): estimated from a sample above 1000 keys on a node', async (t) => {
    const own = await startRedis()
    t.teardown(() => own.stop())
    const client = new Redis({ host: '127.0.0.1', port: own.port })
    t.teardown(() => client.disconnect())
    const store = new RedisStore({ client, prefix: 'big:' })
    const batch = client.pipeline()
    for (let i = 0; i < 2000; i++) batch.hset(store.redisKey(`done-${i}`), { s: 'c', c: '201', h: '{}', b: 'x'.repeat(100), k: 'b' })
    for (let i = 0; i < 1000; i++) batch.hset(store.redisKey(`running-${i}`), { s: 'i', t: '1', n: 'x' })
    for (let i = 0; i < 600; i++) batch.set(`other:${i}`, 'y')
    await batch.exec()
    const oneRecord = Number(await client.memory('USAGE', store.redisKey('done-0'), 'SAMPLES', 0))

    const usage = await store.usage()
    t.equal(usage.estimated, true)
    // 100 random keys of 3600: records are 5/9 of them, claims 5/18; a standard deviation of about 5% and 4.5%.
    t.ok(usage.records > 2000 * 0.6 && usage.records < 2000 * 1.4, `records ≈ 2000 (${usage.records})`)
    t.ok(usage.inFlight! > 1000 * 0.4 && usage.inFlight! < 1000 * 1.6, `claims ≈ 1000 (${usage.inFlight})`)
    const bytes = usage.bytes as number
    t.ok(bytes > 2000 * oneRecord * 0.6, `bytes ≥ what 2000 records take (${bytes})`)
  })

  t.test('constructor validation', async (t) => {
    const client = connect(t, { lazyConnect: true })
    t.throws(() => new RedisStore(undefined as unknown as { client: Redis }), { name: 'TypeError', message: /client must be an ioredis/ })
    t.throws(() => new RedisStore({} as unknown as { client: Redis }), { message: /client must be an ioredis/ })
    t.throws(() => new RedisStore({ client: {} as unknown as Redis }), { message: /client must be an ioredis/ })
    t.throws(() => new RedisStore({ client, prefix: 5 as unknown as string }), { message: /prefix must be a string/ })
    t.throws(() => new RedisStore({ client, timeout: 0 }), { message: /timeout must be a positive integer/ })
    t.throws(() => new RedisStore({ client, timeout: 1.5 }), { message: /timeout must be a positive integer/ })
    t.throws(() => new RedisStore({ client, requireNoEviction: 'yes' as unknown as boolean }), { message: /requireNoEviction must be a boolean/ })
    t.throws(() => new RedisStore({ client, replicas: -1 }), { message: /replicas must be a non-negative integer/ })
    t.throws(() => new RedisStore({ client, replicas: 0.5 }), { message: /replicas must be a non-negative integer/ })
    t.throws(() => new RedisStore({ client, replicaTimeout: 0 }), { message: /replicaTimeout must be a positive integer/ })
    t.throws(() => new RedisStore({ client, replicas: 1, replicaTimeout: 2000 }), { message: /replicaTimeout must be below timeout/ })
    t.doesNotThrow(() => new RedisStore({ client, timeout: 50 }), 'without replicas, the default replicaTimeout does not bound timeout')
    t.doesNotThrow(() => new RedisStore({ client, replicas: 1, replicaTimeout: 1999 }))
  })

  t.test('queueWarning: a client that would queue commands without bound on a dead connection', async (t) => {
    const plain = connect(t, { lazyConnect: true })
    const warning = RedisStore.queueWarning(plain)
    t.match(warning, /has no socketTimeout: .* Set socketTimeout/, 'no socketTimeout: a warning saying what to set')
    t.equal(RedisStore.queueWarning(connect(t, { lazyConnect: true, socketTimeout: 5000 })), undefined, 'socketTimeout set: none')
    t.match(RedisStore.queueWarning(connect(t, { lazyConnect: true, commandTimeout: 1000 })), /no socketTimeout/,
      'commandTimeout rejects a command late but leaves it queued: still a warning')
  })
})
