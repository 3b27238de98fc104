import t from 'tap'
import '../helpers/crash-guard.js'
import { spawn, spawnSync } from 'node:child_process'
import { createConnection, createServer } from 'node:net'
import { createInterface } from 'node:readline'
import { setTimeout as sleep } from 'node:timers/promises'
import Fastify from 'fastify'
import { Redis, type RedisOptions } from 'ioredis'
import fastifyIdempotency from '../../index.js'
import { RedisStore } from '../../lib/stores/redis.js'
import { childEnv } from '../../support/processes.js'
import { startRedis, uniquePrefix, withRedis, type RedisServer } from '../../support/redis.js'
import { BINARY, sampleResponse, storeContract } from '../helpers/store-contract.js'

const LONG = 60_000

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
        create: () => new RedisStore({ client, prefix: uniquePrefix(name) }),
        advance: (ms) => sleep(ms),
        short: 150
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
    t.strictSame(inFlight, { s: 'i', t: token, f: 'fp' })
    const lockPttl = await client.pttl(redisKey)
    t.ok(lockPttl > 0 && lockPttl <= 5000, `the claim expires after lockTtl (pttl ${lockPttl})`)

    t.ok(await store.renew(key, token, 20_000))
    const renewedPttl = await client.pttl(redisKey)
    t.ok(renewedPttl > 5000 && renewedPttl <= 20_000, `renew is a PEXPIRE (pttl ${renewedPttl})`)

    t.ok(await store.complete(key, token, sampleResponse(), 30_000))
    const completed = await client.hgetallBuffer(redisKey)
    t.strictSame(Object.keys(completed).sort(), ['b', 'c', 'f', 'h', 's'], 'the token is gone once completed')
    t.equal(completed.s.toString(), 'c')
    t.equal(completed.c.toString(), '201')
    t.strictSame(JSON.parse(completed.h.toString()), sampleResponse().headers, 'headers as JSON')
    t.ok(completed.b.equals(BINARY), 'the body as raw bytes')
    const ttlPttl = await client.pttl(redisKey)
    t.ok(ttlPttl > 20_000 && ttlPttl <= 30_000, `the record expires after ttl (pttl ${ttlPttl})`)

    const forever = (await store.claim('forever', undefined, 5000)).token as string
    t.ok(await store.complete('forever', forever, sampleResponse(), null))
    t.equal(await client.pttl(store.redisKey('forever')), -1, 'ttl null: no expiry at all')
    t.equal(await client.hexists(store.redisKey('forever'), 'f'), 0, 'no fingerprint field without a fingerprint')
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
    const key = `defaults-${process.pid}-${Date.now()}`
    const token = (await store.claim(key, undefined, 1000)).token as string
    t.teardown(() => store.release(key, token))
    t.equal(await client.exists(`idempotency:{${key}}`), 1)
    store.close()
    t.equal(await client.ping(), 'PONG', 'the client still works after close()')
    t.equal(client.status, 'ready')
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

  t.test('tokens are unique across processes, without per-request randomness', async (t) => {
    const script = `
      import { Redis } from 'ioredis'
      import { RedisStore } from ${JSON.stringify(new URL('../../lib/stores/redis.ts', import.meta.url).pathname)}
      const client = new Redis({ host: '127.0.0.1', port: ${server.port} })
      const store = new RedisStore({ client, prefix: process.argv[1] })
      const a = await store.claim('a', undefined, 60000)
      const b = await store.claim('b', undefined, 60000)
      console.log(JSON.stringify([a.token, b.token]))
      client.disconnect()
    `
    const env = childEnv()
    const run = () => {
      const child = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script, uniquePrefix('tokens')], { encoding: 'utf8', env })
      t.equal(child.status, 0, child.stderr)
      return JSON.parse(child.stdout) as [string, string]
    }
    const [a1, b1] = run()
    const [a2] = run()
    t.not(a1, b1, 'two claims of one process differ')
    t.not(a1, a2, 'the first claims of two processes differ')
    t.not(a1.split('.')[0], a2.split('.')[0], 'each process has its own random part')
    t.equal(a1.split('.')[1], a2.split('.')[1], 'and the same counter: only the random part tells them apart')
  })

  t.test('a Redis error is passed on as it is', async (t) => {
    const client = connect(t)
    const store = new RedisStore({ client, prefix: uniquePrefix('wrongtype') })
    await client.set(store.redisKey('k'), 'not a hash')
    await t.rejects(store.claim('k', 'fp', LONG), { message: /WRONGTYPE/ })
  })

  t.test('every call fails with FST_IDEMPOTENCY_STORE_TIMEOUT when Redis does not answer', async (t) => {
    const doomed = await startRedis()
    t.teardown(() => doomed.stop())
    const client = new Redis({ host: '127.0.0.1', port: doomed.port })
    client.on('error', () => {}) // reconnection errors, expected here
    t.teardown(() => client.disconnect())
    const store = new RedisStore({ client, prefix: uniquePrefix('timeout'), timeout: 200 })
    const token = (await store.claim('k', 'fp', LONG)).token as string
    await doomed.stop()

    const timedOut = { code: 'FST_IDEMPOTENCY_STORE_TIMEOUT', message: /did not answer within 200 ms/ }
    await t.rejects(store.claim('k', 'fp', LONG), timedOut, 'claim')
    await t.rejects(store.complete('k', token, sampleResponse(), LONG), timedOut, 'complete')
    await t.rejects(store.release('k', token), timedOut, 'release')
    await t.rejects(store.renew('k', token, LONG), timedOut, 'renew')
    t.equal(store.timeout, 200)
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

  t.test('a claim resent after the connection dropped with its reply finds its own claim: claimed, not in flight', async (t) => {
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

  t.test('constructor validation', async (t) => {
    const client = connect(t, { lazyConnect: true })
    t.throws(() => new RedisStore(undefined as unknown as { client: Redis }), { name: 'TypeError', message: /client must be an ioredis/ })
    t.throws(() => new RedisStore({} as unknown as { client: Redis }), { message: /client must be an ioredis/ })
    t.throws(() => new RedisStore({ client: {} as unknown as Redis }), { message: /client must be an ioredis/ })
    t.throws(() => new RedisStore({ client, prefix: 5 as unknown as string }), { message: /prefix must be a string/ })
    t.throws(() => new RedisStore({ client, timeout: 0 }), { message: /timeout must be a positive integer/ })
    t.throws(() => new RedisStore({ client, timeout: 1.5 }), { message: /timeout must be a positive integer/ })
  })

  t.test('the plugin with a RedisStore replays across app instances, byte for byte', async (t) => {
    const prefix = uniquePrefix('plugin')
    let runs = 0
    const apps = await Promise.all([0, 1].map(async () => {
      const app = Fastify()
      t.teardown(() => app.close())
      await app.register(fastifyIdempotency, { store: new RedisStore({ client: connect(t), prefix }) })
      app.post('/orders', async () => ({ order: ++runs, at: Math.random() }))
      app.post('/blob', async (_request, reply) => {
        runs++
        return reply.type('application/octet-stream').header('x-multi', ['a', 'b']).send(BINARY)
      })
      await app.ready()
      return app
    }))
    const send = (i: number, url: string, key: string) =>
      apps[i].inject({ method: 'POST', url, headers: { 'idempotency-key': key }, payload: { n: 1 } })

    const first = await send(0, '/orders', 'order-1')
    t.equal(first.statusCode, 200)
    t.equal(first.headers['idempotent-replayed'], undefined)
    const replay = await send(1, '/orders', 'order-1')
    t.equal(replay.statusCode, 200)
    t.equal(replay.headers['idempotent-replayed'], 'true')
    t.equal(replay.body, first.body, 'the other instance replays the same body')
    t.equal(runs, 1, 'the handler ran once')

    const mismatch = await apps[1].inject({ method: 'POST', url: '/orders', headers: { 'idempotency-key': 'order-1' }, payload: { n: 2 } })
    t.equal(mismatch.statusCode, 422, 'the fingerprint travels through Redis')

    const blob = await send(0, '/blob', 'blob-1')
    const blobReplay = await send(1, '/blob', 'blob-1')
    t.equal(runs, 2)
    t.equal(blobReplay.headers['idempotent-replayed'], 'true')
    t.equal(blobReplay.headers['content-type'], 'application/octet-stream')
    t.strictSame(blobReplay.headers['x-multi'], ['a', 'b'])
    t.ok(blobReplay.rawPayload.equals(BINARY), 'binary body replayed byte for byte')
    t.ok(blob.rawPayload.equals(blobReplay.rawPayload))
  })

  t.test('round trips, counted with redis-cli monitor: a first request costs two, a replay one', async (t) => {
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

    const app = Fastify()
    t.teardown(() => app.close())
    await app.register(fastifyIdempotency, { store: new RedisStore({ client, prefix }) })
    app.post('/pay', async () => ({ paid: true }))
    const pay = (key: string) => app.inject({ method: 'POST', url: '/pay', headers: { 'idempotency-key': key }, payload: {} })

    await commandsSinceLastMark()
    t.equal((await pay('p1')).statusCode, 200)
    const first = await commandsSinceLastMark()
    t.equal(first.length, 2, 'first request: claim and complete', { commands: first })
    t.match(first[0], /"eval(sha)?"/)
    t.match(first[1], /"eval(sha)?"/)

    t.equal((await pay('p1')).headers['idempotent-replayed'], 'true')
    const replay = await commandsSinceLastMark()
    t.equal(replay.length, 1, 'replay: one claim-or-get', { commands: replay })
    t.match(replay[0], /^\S+ \[\d+ [^\]]+\] "evalsha" "[0-9a-f]{40}"/, 'called by SHA once the script is loaded on the connection')

    await pay('p2')
    const second = await commandsSinceLastMark()
    t.ok(second.every((line) => line.includes('"evalsha"')), 'later first requests use the SHA only')
    t.equal(second.length, 2)
  })
})
