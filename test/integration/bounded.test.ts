/**
 * A flood of unique keys over real sockets (autocannon in a child process,
 * a new key per request): the memory store stays within `maxRecords` and
 * empties once its records expire; Redis holds only the records of the last
 * `ttl` and empties after it. 20 000 keys on each store always; 1 000 000 on
 * each with IDEMPOTENCY_LONG_TESTS=1, plus a heap check for the memory store
 * and a used_memory check for Redis.
 */
import { spawn } from 'node:child_process'
import { createRequire } from 'node:module'
import { runInNewContext } from 'node:vm'
import { setFlagsFromString } from 'node:v8'
import { setTimeout as sleep } from 'node:timers/promises'
import t, { type Test } from 'tap'
import type { FastifyInstance } from 'fastify'
import { Redis } from 'ioredis'
import { MemoryStore, RedisStore } from '../../index.js'
import { build } from '../helpers/app.js'
import { childEnv } from '../../support/processes.js'
import { startRedis, uniquePrefix, withRedis } from '../../support/redis.js'

const LONG = process.env.IDEMPOTENCY_LONG_TESTS === '1'
/**
 * The long runs take about 6 minutes on two shared cores, more than tap's
 * per-file timeout (.taprc): they need TAP_TIMEOUT of at least this (or 0).
 */
const LONG_TIMEOUT = 1200
const tapTimeout = Number(process.env.TAP_TIMEOUT ?? 0)
const longFits = tapTimeout === 0 || tapTimeout >= LONG_TIMEOUT
/** The 1 000 000-key runs are added only when asked for, and only when tap would let them finish. */
const RUN_LONG = LONG && longFits
if (!LONG) {
  t.comment('the 1 000 000-key runs take minutes and are not part of npm test: IDEMPOTENCY_LONG_TESTS=1 TAP_TIMEOUT=1200 npx tap test/bounded.test.ts runs them (.ci/run does)')
} else if (!longFits) {
  t.fail(`IDEMPOTENCY_LONG_TESTS=1 needs a longer tap timeout: run with TAP_TIMEOUT=${LONG_TIMEOUT} (it is ${tapTimeout} s)`)
}
const AUTOCANNON = createRequire(import.meta.url).resolve('autocannon/autocannon.js')
const CONNECTIONS = 32

/**
 * The load generator, run with `node -e` in its own process (another core): autocannon posts
 * `amount` requests to `url` over `connections` keep-alive connections, each with a new key.
 */
const LOAD = `
const autocannon = require(process.argv[1])
const [url, connections, amount] = process.argv.slice(2)
let key = 0
autocannon({
  url,
  connections: Number(connections),
  amount: Number(amount),
  requests: [{
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: '{"amount":1}',
    setupRequest: (request) => ({ ...request, headers: { ...request.headers, 'idempotency-key': 'key-' + (++key) } })
  }]
}, (err, result) => {
  if (err) throw err
  process.stdout.write(JSON.stringify({ ok: result['2xx'], other: result.non2xx + result.errors + result.timeouts }))
})
`

/** POSTs `count` requests with unique keys to the app's /orders, over real sockets. */
async function flood (t: Test, app: FastifyInstance, count: number): Promise<{ ok: number, other: number }> {
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as { port: number }
  const child = spawn(process.execPath, ['-e', LOAD, AUTOCANNON, `http://127.0.0.1:${port}/orders`, String(CONNECTIONS), String(count)],
    { env: childEnv(), stdio: ['ignore', 'pipe', 'pipe'] })
  const exited = new Promise((resolve) => child.once('exit', resolve))
  t.teardown(() => { child.kill('SIGKILL') })
  let stdout = ''
  let stderr = ''
  child.stdout.on('data', (chunk) => { stdout += chunk })
  child.stderr.on('data', (chunk) => { stderr += chunk })
  const code = await exited
  if (code !== 0) throw new Error(`the load generator exited with ${code}\n${stderr}`)
  return JSON.parse(stdout) as { ok: number, other: number }
}

/** The heap after a full collection (gc is exposed through a V8 flag). */
function heapAfterGc (): number {
  setFlagsFromString('--expose-gc')
  const gc = runInNewContext('gc') as () => void
  gc()
  gc()
  return process.memoryUsage().heapUsed
}

async function memoryFlood (t: Test, count: number, maxRecords: number, checkHeap: boolean) {
  const store = new MemoryStore({ maxRecords, sweepInterval: 100 })
  t.teardown(() => store.close())
  const app = await build(t, { store, ttl: 1000, stats: false })
  let runs = 0
  let heapAtTenth = 0
  app.post('/orders', async () => {
    if (++runs === count / 10 && checkHeap) heapAtTenth = heapAfterGc()
    return { order: runs }
  })
  let largest = 0
  let largestInFlight = 0
  const sampler = setInterval(() => {
    const usage = store.usage()
    largest = Math.max(largest, usage.records)
    largestInFlight = Math.max(largestInFlight, usage.inFlight ?? 0)
  }, 20)
  t.teardown(() => clearInterval(sampler))
  const { ok, other } = await flood(t, app, count)
  clearInterval(sampler)
  t.equal(ok, count, `${count} unique keys, every one answered 2xx`)
  t.equal(other, 0)
  t.equal(runs, count, 'and ran once')
  t.ok(largest <= store.maxRecords, `the store never held more completed records than maxRecords (largest ${largest} of ${store.maxRecords})`)
  t.ok(largest >= store.maxRecords / 2, 'and it did fill up: eviction kept it there')
  t.ok(largestInFlight <= CONNECTIONS, `claims in flight never more than the connections (largest ${largestInFlight})`)
  if (checkHeap) {
    const growth = heapAfterGc() - heapAtTenth
    t.ok(growth < 32 * 1024 * 1024, `the heap grew ${(growth / 1048576).toFixed(1)} MB over the last 90% of the keys`)
  }
  for (let i = 0; i < 60 && store.size > 0; i++) await sleep(100)
  t.equal(store.size, 0, 'once ttl has passed, the sweeper leaves nothing behind')
}

async function redisFlood (t: Test, port: number, count: number, checkMemory: boolean) {
  const client = new Redis({ host: '127.0.0.1', port })
  const probe = new Redis({ host: '127.0.0.1', port })
  t.teardown(() => { client.disconnect(); probe.disconnect() })
  await probe.flushall()
  const TTL = 1000
  const app = await build(t, { store: new RedisStore({ client, prefix: uniquePrefix('flood') }), ttl: TTL, stats: false })
  // Completions per 100 ms, as the server saw them.
  const completed = new Map<number, number>()
  let runs = 0
  let memoryAtTenth: Promise<number> | undefined
  const usedMemory = async () => Number(/used_memory:(\d+)/.exec(await probe.info('memory'))?.[1])
  app.post('/orders', async () => {
    if (++runs === count / 10 && checkMemory) memoryAtTenth = usedMemory()
    return { order: runs }
  })
  app.addHook('onResponse', async () => {
    const slot = Math.floor(Date.now() / 100)
    completed.set(slot, (completed.get(slot) ?? 0) + 1)
  })
  const samples: Array<{ at: number, size: number }> = []
  const sampling = { on: true }
  const sampler = (async () => {
    while (sampling.on) {
      samples.push({ at: Date.now(), size: await probe.dbsize() })
      await sleep(200)
    }
  })()
  const { ok, other } = await flood(t, app, count)
  sampling.on = false
  await sampler
  t.equal(ok, count, `${count} unique keys, every one answered 2xx`)
  t.equal(other, 0)
  t.equal(runs, count, 'and ran once')
  // At any moment Redis may hold the records completed in the last ttl, the claims in flight, and
  // records expired so recently that Redis's expiry cycle has not reached them yet (two seconds' grace:
  // Redis samples expired keys, it does not sweep them at their second).
  const completedSince = (from: number, to: number) => {
    let sum = 0
    for (let slot = Math.floor(from / 100); slot <= Math.floor(to / 100); slot++) sum += completed.get(slot) ?? 0
    return sum
  }
  const over = samples.filter(({ at, size }) => size > completedSince(at - TTL - 2000, at) + CONNECTIONS)
  t.strictSame(over, [], `DBSIZE stayed within the last ttl's records (largest ${Math.max(...samples.map((s) => s.size))}, ${samples.length} samples)`)
  if (checkMemory) {
    const growth = await usedMemory() - await (memoryAtTenth as Promise<number>)
    t.ok(growth < 32 * 1024 * 1024, `used_memory grew ${(growth / 1048576).toFixed(1)} MB over the last 90% of the keys`)
  }
  for (let i = 0; i < 50 && await probe.dbsize() > 0; i++) await sleep(100)
  t.equal(await probe.dbsize(), 0, 'once ttl has passed, Redis holds nothing')
}

t.test('memory store: 20 000 unique keys, maxRecords 2000', async (t) => {
  await memoryFlood(t, 20_000, 2000, false)
})

if (RUN_LONG) {
  t.test('memory store: 1 000 000 unique keys, maxRecords 10 000 (the default), and the heap', async (t) => {
    await memoryFlood(t, 1_000_000, 10_000, true)
  })
}

t.test('Redis', async (t) => {
  withRedis(t, (t) => {
    let port = 0
    t.before(async () => {
      const server = await startRedis()
      t.teardown(() => server.stop())
      port = server.port
    })
    t.test('20 000 unique keys with a 1 s ttl', async (t) => {
      await redisFlood(t, port, 20_000, false)
    })
    if (RUN_LONG) {
      t.test('1 000 000 unique keys with a 1 s ttl, and used_memory', async (t) => {
        await redisFlood(t, port, 1_000_000, true)
      })
    }
  })
})
