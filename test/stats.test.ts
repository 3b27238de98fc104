/**
 * Stats with the memory store (counted in-process): the counters of a known
 * run, `stats: false`, `stats.ttl`, the store's size, and the optional stats
 * page (off by default, never without a preHandler, JSON or escaped HTML).
 */
import { test, type Test } from 'tap'
import { MemoryStore, type StatsCounts, type StoreUsage } from '../index.js'
import { Stats } from '../lib/stats.js'
import { build, capturingLogger, ERROR, FlakyStore, heldHandler, sleep, until, type LogLine } from './helpers/app.js'

const NONE = { executed: 0, replayed: 0, conflicts: 0, mismatches: 0, missingKeys: 0, invalidKeys: 0, storeErrors: 0 }
const ZERO = { ...NONE, lastDuplicateAt: 0 }

type Build = Parameters<typeof build>
type Options = Build[1]

/**
 * An app with POST /a (optional), POST /slow (held until `slow.open()`) and
 * POST /required (`idempotency: true`), ready.
 */
async function statsApp (t: Build[0], options: Options = {}, server: Build[2] = {}, more?: (app: Awaited<ReturnType<typeof build>>) => void) {
  const app = await build(t, options, server)
  more?.(app)
  const slow = heldHandler({ slow: true })
  const runs = { a: 0, required: 0 }
  app.post('/a', async () => ({ run: ++runs.a }))
  app.post('/slow', slow.handler)
  app.post('/required', { config: { idempotency: true } }, async () => ({ run: ++runs.required }))
  await app.ready()
  const send = (url: string, key: string | undefined, payload: object = { n: 1 }) =>
    app.inject({ method: 'POST', url, headers: key === undefined ? {} : { 'idempotency-key': key }, payload })
  return { app, slow, runs, send }
}

/** Runs the known mix: 3 first requests, 2 replays and a mismatch on /a; a conflict on /slow; a missing and an invalid key on /required. */
async function knownRun (t: Test, { slow, runs, send }: Awaited<ReturnType<typeof statsApp>>) {
  for (const key of ['k1', 'k2', 'k3']) t.equal((await send('/a', key)).statusCode, 200)
  t.equal((await send('/a', 'k1')).headers['idempotent-replayed'], 'true')
  t.equal((await send('/a', 'k2')).headers['idempotent-replayed'], 'true')
  t.equal((await send('/a', 'k3', { n: 2 })).statusCode, 422)
  const original = send('/slow', 'k4')
  await until(() => slow.runs() === 1)
  t.equal((await send('/slow', 'k4')).statusCode, 409)
  slow.open()
  t.equal((await original).statusCode, 200)
  t.equal((await send('/required', undefined)).statusCode, 400)
  t.equal((await send('/required', 'x'.repeat(300))).statusCode, 400)
  t.equal(runs.a, 3)
  t.equal(runs.required, 0)
}

test('a known run: the counters per route, the totals, the duplicates, routes by duplicates', async (t) => {
  const ctx = await statsApp(t)
  const from = Date.now()
  await knownRun(t, ctx)
  const to = Date.now()

  const stats = await ctx.app.idempotency.stats()
  const [a, slow, required] = stats.routes
  t.strictSame(stats.routes.map((r) => r.route), ['POST /a', 'POST /slow', 'POST /required'], 'most duplicates first')
  t.strictSame({ ...a, lastDuplicateAt: 0 }, { route: 'POST /a', ...ZERO, executed: 3, replayed: 2, mismatches: 1, duplicates: 3 })
  t.strictSame({ ...slow, lastDuplicateAt: 0 }, { route: 'POST /slow', ...ZERO, executed: 1, conflicts: 1, duplicates: 1 })
  t.strictSame(required, { route: 'POST /required', ...ZERO, missingKeys: 1, invalidKeys: 1, duplicates: 0 })
  t.ok(a.lastDuplicateAt >= from && a.lastDuplicateAt <= to, 'lastDuplicateAt within the run')
  t.ok(slow.lastDuplicateAt >= a.lastDuplicateAt, 'the conflict came last')
  t.strictSame(stats.totals, {
    ...ZERO, executed: 4, replayed: 2, conflicts: 1, mismatches: 1, missingKeys: 1, invalidKeys: 1, lastDuplicateAt: slow.lastDuplicateAt, duplicates: 4
  })
  t.match(stats.store, { records: 4, inFlight: 0, maxBytes: 64 * 1024 * 1024, evictions: 0, estimated: false }, 'the memory store holds k1 to k4')
  t.ok((stats.store.bytes as number) > 4 * 300 && (stats.store.bytes as number) < 4 * 1000, `and counts their bytes (${stats.store.bytes})`)
  t.equal(stats.warning, undefined)
  t.strictSame(await ctx.app.idempotency.stats(), stats, 'reading does not change them')
})

test('a store error is counted on its route', async (t) => {
  const store = new FlakyStore()
  t.teardown(() => store.close())
  const app = await build(t, { store })
  app.post('/down', async () => ({ ok: true }))
  store.failing.claim = true
  t.equal((await app.inject({ method: 'POST', url: '/down', headers: { 'idempotency-key': 'k' } })).statusCode, 503)
  const stats = await app.idempotency.stats()
  t.strictSame(stats.routes, [{ route: 'POST /down', ...ZERO, storeErrors: 1, duplicates: 0 }])
  t.strictSame(stats.store, { records: 0, bytes: undefined, estimated: true }, 'a store without usage(): nothing known')
})

test('routes with as many duplicates: the latest duplicate first, then by name', async (t) => {
  const app = await build(t)
  for (const url of ['/c', '/b', '/a', '/d']) app.post(url, async () => ({ url }))
  await app.ready()
  const send = (url: string, key: string) => app.inject({ method: 'POST', url, headers: { 'idempotency-key': key } })
  for (const url of ['/c', '/b', '/a', '/d']) await send(url, 'k')
  await send('/b', 'k')
  await sleep(5)
  await send('/c', 'k')
  const names = (await app.idempotency.stats()).routes.map((r) => `${r.route} ${r.duplicates}`)
  t.strictSame(names, ['POST /c 1', 'POST /b 1', 'POST /a 0', 'POST /d 0'])
})

test('stats: false counts nothing', async (t) => {
  const ctx = await statsApp(t, { stats: false })
  await knownRun(t, ctx)
  const stats = await ctx.app.idempotency.stats()
  t.strictSame(stats.routes, [])
  t.strictSame(stats.totals, { ...ZERO, duplicates: 0 })
  t.equal(stats.store.records, 4, 'the store\'s size is still known')
})

/** Stats kept in-process over a memory store, on a clock that moves only when the test says so. */
function clocked (t: Test, ttl: number) {
  const clock = { now: 1_000_000 }
  const store = new MemoryStore()
  const stats = new Stats(store, { ttl, flushInterval: 60_000, warnRecords: 8000, counting: true, route: undefined, preHandler: [] }, (err) => { throw err }, () => clock.now)
  t.teardown(async () => {
    await stats.close()
    store.close()
  })
  return { stats, clock, counters: stats.counters('POST /a') }
}

test('stats.ttl: in-process counters are dropped ttl after their last change, even unread', async (t) => {
  const { stats, clock, counters } = clocked(t, 200)
  counters.executed++
  await stats.flush() // what the flush timer does
  clock.now += 201
  await stats.flush()
  t.strictSame((await stats.read()).routes, [], 'counted, never read, expired')
})

test('stats.ttl: counters that keep changing are kept, the older ones with them', async (t) => {
  const { stats, clock, counters } = clocked(t, 500)
  counters.executed++
  t.equal((await stats.read()).totals.executed, 1)
  clock.now += 300
  counters.executed++
  await stats.flush()
  clock.now += 350 // 650 ms after the first change, 350 ms after the last one
  t.equal((await stats.read()).totals.executed, 2)
  clock.now += 151
  t.strictSame((await stats.read()).routes, [], 'and dropped once ttl has passed since the last change')
})

test('stats: false counts nothing and runs no timer', async (t) => {
  const store = new MemoryStore()
  t.teardown(() => store.close())
  const stats = new Stats(store, { ttl: 1000, flushInterval: 1, warnRecords: 8000, counting: false, route: undefined, preHandler: [] }, () => {})
  t.equal((stats as unknown as { timer: unknown }).timer, undefined)
  await stats.close()
})

test('the stats route is off by default', async (t) => {
  const app = await build(t)
  t.equal((await app.inject('/idempotency/stats')).statusCode, 404)
})

test('stats.route without a preHandler fails at registration', async (t) => {
  await t.rejects(build(t, { stats: { route: '/idempotency/stats' } }), {
    code: 'FST_IDEMPOTENCY_INVALID_OPTION',
    message: /invalid option "stats.preHandler": is required with stats.route/
  })
  await t.rejects(build(t, { stats: { route: '/idempotency/stats', preHandler: [] } }), { code: 'FST_IDEMPOTENCY_INVALID_OPTION' }, 'nor with an empty list')
})

test('invalid stats options are refused, naming the option', async (t) => {
  const cases: Array<[unknown, string]> = [
    [true, 'stats: must be false or an object'],
    [null, 'stats: must be false or an object'],
    [[], 'stats: must be false or an object'],
    [{ route: 'stats' }, 'stats.route: must be a path starting with /'],
    [{ ttl: 0 }, 'stats.ttl: must be a positive duration'],
    [{ ttl: 'weekly' }, 'stats.ttl: must be a positive duration'],
    [{ flushInterval: 1.5 }, 'stats.flushInterval: must be a positive duration'],
    [{ warnRecords: -1 }, 'stats.warnRecords: must be an integer of at least 0'],
    [{ preHandler: 'auth' }, 'stats.preHandler: must be a preHandler hook or an array of them'],
    [{ page: true }, 'stats.page: unknown option']
  ]
  for (const [stats, message] of cases) {
    await t.rejects(build(t, { stats } as Options), { code: 'FST_IDEMPOTENCY_INVALID_OPTION', message: new RegExp(message.replace(/[.()]/g, '\\$&').replace(': ', '": ')) }, message)
  }
})

test('the stats route: behind the preHandler, JSON by default, escaped HTML for browsers', async (t) => {
  const authorized: string[] = []
  const weird = "/tom&jerry's/<b>\""
  const ctx = await statsApp(t, {
    stats: {
      route: '/idempotency/stats',
      // Two hooks: an array is accepted, and both run.
      preHandler: [
        async (request) => { authorized.push(request.url) },
        async (request, reply) => {
          if (request.headers.authorization !== 'Bearer s3cret') return reply.code(401).send({ error: 'who are you?' })
        }
      ]
    }
  }, {}, (app) => app.post(weird, async () => ({ ok: true })))
  await knownRun(t, ctx)
  await ctx.app.inject({ method: 'POST', url: weird, headers: { 'idempotency-key': 'w' } })
  await ctx.app.inject({ method: 'POST', url: weird, headers: { 'idempotency-key': 'w' } })

  const denied = await ctx.app.inject({ url: '/idempotency/stats', headers: { accept: 'text/html' } })
  t.equal(denied.statusCode, 401)
  t.strictSame(denied.json(), { error: 'who are you?' }, 'the page is not served')
  t.equal(authorized.length, 1)

  const auth = { authorization: 'Bearer s3cret' }
  const json = await ctx.app.inject({ url: '/idempotency/stats', headers: auth })
  t.equal(json.statusCode, 200)
  t.match(json.headers['content-type'], /^application\/json/)
  t.strictSame(json.json(), JSON.parse(JSON.stringify(await ctx.app.idempotency.stats())), 'what stats() returns')
  t.equal(json.json().totals.duplicates, 5)
  t.equal((await ctx.app.inject({ url: '/idempotency/stats', headers: { ...auth, accept: 'application/json' } })).json().totals.executed, 5)

  const page = await ctx.app.inject({ url: '/idempotency/stats', headers: { ...auth, accept: 'text/html,application/xhtml+xml;q=0.9,*/*;q=0.8' } })
  t.equal(page.statusCode, 200)
  t.equal(page.headers['content-type'], 'text/html; charset=utf-8')
  const html = page.body
  t.match(html, /^<!doctype html>/)
  t.match(html, '<dd id="records">5</dd>')
  t.match(html, /<dd id="bytes">[\d.]+ (B|KiB) of 64\.0 MiB<\/dd>/)
  t.match(html, '<dd id="duplicates">5</dd>')
  t.match(html, '<dd id="executed">5</dd>')
  t.match(html, /<dd id="last-duplicate">\d{4}-\d\d-\d\dT[\d:.]+Z<\/dd>/)
  t.match(html, '<td><code>POST /tom&amp;jerry&#39;s/&lt;b&gt;&quot;</code></td><td>1</td>', 'the route name is escaped')
  t.notMatch(html, '<b>', 'nothing of the route name is markup')
  t.match(html, '<td><code>POST /a</code></td><td>3</td><td>2</td><td>0</td><td>1</td><td>3</td><td>0</td><td>0</td>')
  t.match(html, '<td><code>POST /required</code></td><td>0</td><td>0</td><td>0</td><td>0</td><td>0</td><td>2</td><td>0</td><td>never</td>')
  t.notMatch(html, 'id="warning"')
  t.notMatch(html, /<script|src=|href="(?!data:)/, 'self-contained, no script')
  t.match(html, '<link rel="icon" href="data:,">', 'an empty icon: the browser does not ask for /favicon.ico')

  t.equal((await ctx.app.inject({ method: 'POST', url: '/idempotency/stats', headers: auth })).statusCode, 404, 'GET only')
  const after = await ctx.app.idempotency.stats()
  t.notOk(after.routes.some((r) => r.route.includes('/idempotency/stats')), 'the stats route itself is not covered')
})

test('stats.warnRecords: a warning in stats() and on the page', async (t) => {
  const ctx = await statsApp(t, { stats: { warnRecords: 3, route: '/stats', preHandler: async () => {} } })
  await knownRun(t, ctx)
  const stats = await ctx.app.idempotency.stats()
  t.equal(stats.warning, 'The store holds 4 records, more than 3: check ttl, or that keys are not generated per attempt.')
  const html = (await ctx.app.inject({ url: '/stats', headers: { accept: 'text/html' } })).body
  t.match(html, `<p class="warning" id="warning">${stats.warning}</p>`)
  const exactly = await statsApp(t, { stats: { warnRecords: 4 } })
  await knownRun(t, exactly)
  t.equal((await exactly.app.idempotency.stats()).warning, undefined, 'not at the limit itself')
})

/** A MemoryStore that says what `usage()` returns. */
class SizedStore extends MemoryStore {
  constructor (private readonly said: StoreUsage) { super() }
  usage (): StoreUsage { return this.said }
}

test('the page: store sizes, estimates, an empty run', async (t) => {
  const cases: Array<[StoreUsage, string, string]> = [
    [{ records: 12, bytes: 900, estimated: false }, '12', '900 B'],
    [{ records: 1200, bytes: 1536, estimated: true }, '≈ 1200', '≈ 1.5 KiB'],
    [{ records: 1200, bytes: 1024 * 1024 - 1, estimated: false }, '1200', '1024.0 KiB'],
    [{ records: 9_000_000, bytes: 3.25 * 1024 * 1024, estimated: true }, '≈ 9000000', '≈ 3.3 MiB'],
    [{ records: 5, bytes: 950, maxBytes: 1000, estimated: false }, '5', '950 B of 1000 B']
  ]
  for (const [usage, records, bytes] of cases) {
    const store = new SizedStore(usage)
    t.teardown(() => store.close())
    const app = await build(t, { store, stats: { route: '/stats', preHandler: async () => {} } })
    const html = (await app.inject({ url: '/stats', headers: { accept: 'text/html' } })).body
    t.match(html, `<dd id="records">${records}</dd>`)
    t.match(html, `<dd id="bytes">${bytes}</dd>`)
    t.match(html, '<dd id="last-duplicate">never</dd>')
    t.match(html, '<tr><td colspan="9">No requests yet</td></tr>')
  }
})

test('the page and stats(): in-flight claims apart, evictions, the eviction policy, memory near its bound, with warnings', async (t) => {
  const usage: StoreUsage = {
    records: 10,
    inFlight: 3,
    bytes: 950,
    maxBytes: 1000,
    evictions: 7,
    evictionPolicy: 'allkeys-lru',
    estimated: false,
    warnings: ['Redis runs with maxmemory-policy allkeys-lru: it may evict records.']
  }
  const store = new SizedStore(usage)
  t.teardown(() => store.close())
  const app = await build(t, { store, stats: { route: '/stats', preHandler: async () => {} } })
  const stats = await app.idempotency.stats()
  t.match(stats.warning, /uses 95% of its memory bound/)
  t.match(stats.warning, /7 saved responses were evicted before their ttl: a retry of one of them runs the handler again/)
  t.match(stats.warning, /maxmemory-policy allkeys-lru/)
  const html = (await app.inject({ url: '/stats', headers: { accept: 'text/html' } })).body
  t.match(html, '<dd id="in-flight">3</dd>')
  t.match(html, '<dd id="evictions">7</dd>')
  t.match(html, '<dd id="policy">allkeys-lru</dd>')
  t.match(html, /<p class="warning" id="warning">[^<]*evicted before their ttl/)
  const quiet = new SizedStore({ records: 1, bytes: 10, maxBytes: 1000, evictions: 0, estimated: false })
  t.teardown(() => quiet.close())
  const calm = await build(t, { store: quiet })
  t.equal((await calm.idempotency.stats()).warning, undefined, 'nothing to warn about')
  const unknown = new SizedStore({ records: 1, bytes: undefined, estimated: true })
  t.teardown(() => unknown.close())
  const page = await build(t, { store: unknown, stats: { route: '/stats', preHandler: async () => {} } })
  const text = (await page.inject({ url: '/stats', headers: { accept: 'text/html' } })).body
  t.match(text, '<dd id="in-flight">unknown</dd>')
  t.match(text, '<dd id="evictions">unknown</dd>')
  t.notMatch(text, 'id="policy"')
})

/** A MemoryStore that keeps stats the way a shared store does: through addStats/readStats. */
class SharedStatsStore extends MemoryStore {
  added: StatsCounts[] = []
  failAdd = false
  addStats (counts: StatsCounts): void {
    if (this.failAdd) throw new Error('stats store down')
    this.added.push(structuredClone(counts))
  }

  readStats (): StatsCounts {
    const sum: StatsCounts = {}
    for (const counts of this.added) {
      for (const route in counts) {
        const into = sum[route] ??= { ...ZERO }
        for (const name of Object.keys(NONE) as Array<keyof typeof NONE>) into[name] += counts[route][name]
        into.lastDuplicateAt = Math.max(into.lastDuplicateAt, counts[route].lastDuplicateAt)
      }
    }
    return sum
  }
}

test('close() sends the pending counts to a store with addStats; a failing send is logged, never thrown', async (t) => {
  const store = new SharedStatsStore()
  t.teardown(() => store.close())
  const lines: LogLine[] = []
  const { app, send } = await statsApp(t, { store, stats: { flushInterval: 60 * 60 * 1000 } }, capturingLogger(lines))
  await send('/a', 'k1')
  await send('/a', 'k1')
  t.strictSame(store.added, [], 'nothing sent yet')
  await app.close()
  t.equal(store.added.length, 1, 'one call for everything pending')
  t.strictSame(Object.keys(store.added[0]), ['POST /a'], 'routes without counts are not sent')
  t.strictSame({ ...store.added[0]['POST /a'], lastDuplicateAt: 0 }, { ...ZERO, executed: 1, replayed: 1 })

  const failing = new SharedStatsStore()
  failing.failAdd = true
  t.teardown(() => failing.close())
  const other = await statsApp(t, { store: failing, stats: { flushInterval: 60 * 60 * 1000 } }, capturingLogger(lines))
  await other.send('/a', 'k1')
  await other.app.close()
  const logged = lines.filter((line) => line.msg === 'idempotency: stats could not be saved')
  t.equal(logged.length, 1)
  t.equal(logged[0].level, ERROR)
  t.equal(logged[0].err?.message, 'stats store down')
})

test('the timer sends pending counts every flushInterval; a failure is logged and counting goes on', async (t) => {
  const store = new SharedStatsStore()
  t.teardown(() => store.close())
  const lines: LogLine[] = []
  const { app, send } = await statsApp(t, { store, stats: { flushInterval: 10 } }, capturingLogger(lines))
  store.failAdd = true
  await send('/a', 'k1')
  await until(() => lines.some((line) => line.msg === 'idempotency: stats could not be saved'))
  t.equal(lines.find((line) => line.msg === 'idempotency: stats could not be saved')?.err?.message, 'stats store down')
  store.failAdd = false
  await send('/a', 'k1')
  await until(() => store.added.length > 0)
  t.strictSame(store.added.map((counts) => counts['POST /a'].replayed), [1], 'sent by the timer, without stats()')
  const stats = await app.idempotency.stats()
  t.strictSame(stats.routes.map((r) => [r.route, r.executed, r.replayed]), [['POST /a', 0, 1]],
    'read back through readStats(): the counts of the failed send are lost, later ones are not')
})
