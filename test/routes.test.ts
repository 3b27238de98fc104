/**
 * Which routes and methods the plugin covers: `mode`, `endpoints`, `methods`,
 * and the route's own `config.idempotency`, resolved once when the route is added.
 */
import { test } from 'tap'
import Fastify, { type FastifyInstance, type HTTPMethods } from 'fastify'
import fastifyIdempotency, { MemoryStore } from '../index.js'
import type { IdempotencyRouteOptions } from '../index.js'
import { build } from './helpers/app.js'

/** Registers a route that counts its runs and echoes what the plugin told it. */
function route (app: FastifyInstance, method: HTTPMethods | HTTPMethods[], url: string, idempotency?: boolean | IdempotencyRouteOptions) {
  const counter = { runs: 0 }
  app.route({
    method,
    url,
    config: idempotency === undefined ? {} : { idempotency },
    handler: async (_request, reply) => ({ run: ++counter.runs, key: reply.idempotency.key ?? null })
  })
  return counter
}

type Outcome = 'covered' | 'passes' | 'required'

/**
 * What the plugin does with `method url`: 'required' (400 without a key),
 * 'covered' (a duplicate is replayed) or 'passes' (untouched: the handler runs
 * twice, even with an invalid key).
 */
async function outcome (app: FastifyInstance, method: HTTPMethods, url: string): Promise<Outcome> {
  const key = `k-${Math.random()}`
  const bare = await app.inject({ method, url })
  if (bare.statusCode === 400) {
    if (bare.json().code !== 'FST_IDEMPOTENCY_KEY_MISSING') throw new Error(`unexpected ${bare.body}`)
    return 'required'
  }
  const first = await app.inject({ method, url, headers: { 'idempotency-key': key } })
  const second = await app.inject({ method, url, headers: { 'idempotency-key': key } })
  if (second.headers['idempotent-replayed'] === 'true' && second.body === first.body) return 'covered'
  if (method !== 'HEAD' && (first.json().key !== null || second.json().run !== first.json().run + 1)) throw new Error('neither covered nor untouched')
  // Untouched means untouched: not even an invalid key is noticed.
  const invalid = await app.inject({ method, url, headers: { 'idempotency-key': 'a,b' } })
  if (invalid.statusCode !== 200) throw new Error(`invalid key noticed: ${invalid.body}`)
  return 'passes'
}

test('mode optional (default): a key is used when present; no key runs the handler every time', async (t) => {
  const app = await build(t)
  const counter = route(app, 'POST', '/')
  t.equal((await app.inject({ method: 'POST', url: '/' })).statusCode, 200)
  t.equal((await app.inject({ method: 'POST', url: '/' })).statusCode, 200)
  t.equal(counter.runs, 2)
  t.equal(await outcome(app, 'POST', '/'), 'covered')
})

test('mode required: a missing key is a 400 FST_IDEMPOTENCY_KEY_MISSING and the handler does not run', async (t) => {
  const app = await build(t, { mode: 'required' })
  const counter = route(app, 'POST', '/')
  const res = await app.inject({ method: 'POST', url: '/', payload: { a: 1 } })
  t.equal(res.statusCode, 400)
  t.same(res.json(), {
    statusCode: 400,
    code: 'FST_IDEMPOTENCY_KEY_MISSING',
    error: 'Bad Request',
    message: 'The idempotency-key header is required on this route'
  })
  t.equal(counter.runs, 0)
  const ok = await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  t.equal(ok.statusCode, 200)
  t.equal(counter.runs, 1)
})

test('mode required names a custom header in its message', async (t) => {
  const app = await build(t, { mode: 'required', header: 'X-Key' })
  route(app, 'POST', '/')
  const res = await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  t.equal(res.json().message, 'The x-key header is required on this route')
})

test('modes and route config', async (t) => {
  const table: Array<[string, 'optional' | 'required' | 'exempt', boolean | IdempotencyRouteOptions | undefined, Outcome]> = [
    ['optional, no config', 'optional', undefined, 'covered'],
    ['optional, config true', 'optional', true, 'required'],
    ['optional, config {}', 'optional', {}, 'covered'],
    ['optional, config { required: true }', 'optional', { required: true }, 'required'],
    ['optional, config false', 'optional', false, 'passes'],
    ['required, no config', 'required', undefined, 'required'],
    ['required, config {}', 'required', {}, 'required'],
    ['required, config { required: false }', 'required', { required: false }, 'covered'],
    ['required, config false', 'required', false, 'passes'],
    ['exempt, no config', 'exempt', undefined, 'passes'],
    ['exempt, config {}', 'exempt', {}, 'covered'],
    ['exempt, config true', 'exempt', true, 'required'],
    ['exempt, config { manual: false }', 'exempt', { manual: false }, 'covered']
  ]
  for (const [name, mode, config, expected] of table) {
    const app = await build(t, { mode })
    route(app, 'POST', '/', config)
    t.equal(await outcome(app, 'POST', '/'), expected, name)
  }
})

test('methods: only these are ever handled; others pass through untouched, even with a header', async (t) => {
  const app = await build(t, { mode: 'required' })
  for (const method of ['GET', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS'] as const) route(app, method, '/')
  t.equal(await outcome(app, 'GET', '/'), 'passes')
  t.equal(await outcome(app, 'HEAD', '/'), 'passes')
  t.equal(await outcome(app, 'OPTIONS', '/'), 'passes')
  for (const method of ['POST', 'PUT', 'PATCH', 'DELETE'] as const) t.equal(await outcome(app, method, '/'), 'required', method)

  const narrow = await build(t, { mode: 'required', methods: ['post'] })
  route(narrow, ['POST', 'PUT'], '/')
  t.equal(await outcome(narrow, 'POST', '/'), 'required')
  t.equal(await outcome(narrow, 'PUT', '/'), 'passes')
})

test('a multi-method route is covered for its handled methods only', async (t) => {
  const app = await build(t)
  route(app, ['GET', 'POST', 'DELETE'], '/multi', true)
  t.equal(await outcome(app, 'GET', '/multi'), 'passes')
  t.equal(await outcome(app, 'POST', '/multi'), 'required')
  t.equal(await outcome(app, 'DELETE', '/multi'), 'required')
})

test('endpoints: "METHOD /prefix", "/prefix" and "* /prefix"', async (t) => {
  const app = await build(t, { mode: 'required', endpoints: ['POST /pay/', '/orders/', '* /critical/'] })
  for (const url of ['/pay/:id', '/orders/:id', '/critical/:id', '/other', '/payments']) {
    route(app, ['GET', 'POST', 'PUT', 'OPTIONS'], url)
  }
  const expected: Array<[HTTPMethods, string, Outcome]> = [
    ['POST', '/pay/1', 'required'],
    ['PUT', '/pay/1', 'passes'], // the pattern names POST only
    ['GET', '/pay/1', 'passes'],
    ['POST', '/orders/1', 'required'],
    ['PUT', '/orders/1', 'required'],
    ['GET', '/orders/1', 'passes'], // any of `methods`, and GET is not one
    ['OPTIONS', '/orders/1', 'passes'],
    ['POST', '/critical/1', 'required'],
    ['GET', '/critical/1', 'required'], // '*': every method, even outside `methods`
    ['OPTIONS', '/critical/1', 'required'],
    ['POST', '/other', 'passes'],
    ['POST', '/payments', 'passes'] // '/pay/' is a prefix of the path, not of the string
  ]
  for (const [method, url, result] of expected) t.equal(await outcome(app, method, url), result, `${method} ${url}`)
})

test('endpoints: a GET covered by "*" replays, and its HEAD twin is tolerated', async (t) => {
  const app = await build(t, { endpoints: ['* /critical/'] })
  const counter = route(app, 'GET', '/critical/report')
  t.equal(await outcome(app, 'GET', '/critical/report'), 'covered')
  t.equal(counter.runs, 2, 'one run without a key, one with; the duplicate was replayed')
  const head = await app.inject({ method: 'HEAD', url: '/critical/report', headers: { 'idempotency-key': 'h' } })
  t.equal(head.statusCode, 200)
})

test('endpoints: routes outside every pattern are exempt unless their own config opts in', async (t) => {
  const app = await build(t, { mode: 'required', endpoints: ['/api/'] })
  route(app, 'POST', '/outside')
  route(app, 'POST', '/outside-opt-in', {})
  route(app, 'POST', '/outside-required', true)
  route(app, 'POST', '/api/exempt', false)
  route(app, 'POST', '/api/optional', { required: false })
  t.equal(await outcome(app, 'POST', '/outside'), 'passes')
  t.equal(await outcome(app, 'POST', '/outside-opt-in'), 'required', 'the plugin mode applies to a route that opts in')
  t.equal(await outcome(app, 'POST', '/outside-required'), 'required')
  t.equal(await outcome(app, 'POST', '/api/exempt'), 'passes')
  t.equal(await outcome(app, 'POST', '/api/optional'), 'covered')
})

test('endpoints match the full path, plugin prefixes included', async (t) => {
  const app = await build(t, { mode: 'required', endpoints: ['/v1/api/'] })
  await app.register(async (v1) => {
    route(v1, 'POST', '/api/thing')
    route(v1, 'POST', '/other')
  }, { prefix: '/v1' })
  t.equal(await outcome(app, 'POST', '/v1/api/thing'), 'required')
  t.equal(await outcome(app, 'POST', '/v1/other'), 'passes')
})

test('endpoints with mode exempt cover nothing by themselves', async (t) => {
  const app = await build(t, { mode: 'exempt', endpoints: ['/api/'] })
  route(app, 'POST', '/api/x')
  t.equal(await outcome(app, 'POST', '/api/x'), 'passes')
})

test('an empty endpoints list means every route', async (t) => {
  const app = await build(t, { mode: 'required', endpoints: [] })
  route(app, 'POST', '/anything')
  t.equal(await outcome(app, 'POST', '/anything'), 'required')
})

test('invalid route config throws when the route is added, naming the route and the field', async (t) => {
  const cases: Array<[unknown, string]> = [
    ['yes', 'config.idempotency: must be true, false or an object of route options'],
    [null, 'config.idempotency: must be true, false or an object of route options'],
    [1, 'config.idempotency: must be true, false or an object of route options'],
    [[], 'config.idempotency: must be true, false or an object of route options'],
    [{ ttl: 0 }, 'ttl: must be a positive duration (a number of ms or a string such as \'24h\', \'90s\' or \'500ms\'); got 0'],
    [{ ttl: '1 fortnight' }, 'ttl: must be a positive duration (a number of ms or a string such as \'24h\', \'90s\' or \'500ms\'); got "1 fortnight"'],
    [{ namespace: '{x}' }, 'namespace: must be a non-empty string without { or }'],
    [{ required: 'yes' }, 'required: Expected boolean'],
    [{ manual: 1 }, 'manual: Expected boolean'],
    [{ storeOnStatuses: [] }, 'storeOnStatuses: must be a non-empty array of HTTP status codes'],
    [{ storeOnStatuses: [200, 700] }, 'storeOnStatuses.1: Expected integer to be less or equal to 599'],
    [{ replayStatusCode: 100 }, 'replayStatusCode: must be an HTTP status code from 200 to 599, or null'],
    [{ conflictStatusCode: 409 }, 'conflictStatusCode: unknown option'],
    [{ fingerprint: 'body' }, 'fingerprint: must be a boolean or a function (request) => string'],
    [{ scope: 'tenant' }, 'scope: must be a function (request) => string | undefined'],
    [{ onStoreError: 'retry' }, 'onStoreError: must be \'fail-closed\', \'fail-open\' or a function (request, key, error) => policy'],
    [{ lockTtl: 10 }, 'lockTtl: unknown option']
  ]
  for (const [config, message] of cases) {
    const app = await build(t)
    t.throws(() => app.post('/pay', { config: { idempotency: config as boolean } }, async () => 'ok'), {
      code: 'FST_IDEMPOTENCY_INVALID_ROUTE_CONFIG',
      message: `fastify-idempotency: invalid config.idempotency on route POST /pay: ${message}`
    }, JSON.stringify(config))
  }
})

test('invalid route config in an encapsulated plugin fails app.ready()', async (t) => {
  const app = await build(t)
  app.register(async (child) => {
    child.put('/thing', { config: { idempotency: { ttl: -5 } } }, async () => 'ok')
  })
  await t.rejects(async () => { await app.ready() }, {
    code: 'FST_IDEMPOTENCY_INVALID_ROUTE_CONFIG',
    message: 'fastify-idempotency: invalid config.idempotency on route PUT /thing: ttl: must be a positive duration (a number of ms or a string such as \'24h\', \'90s\' or \'500ms\'); got -5'
  })
})

test('a route that opts in with none of its methods handled throws at start-up', async (t) => {
  const app = await build(t)
  for (const config of [true, {}, { required: false }]) {
    t.throws(() => app.get(`/get-${JSON.stringify(config)}`, { config: { idempotency: config } }, async () => 'ok'), {
      code: 'FST_IDEMPOTENCY_INVALID_ROUTE_CONFIG',
      message: /none of the route's methods is handled; add them to the plugin's `methods` option \(POST, PUT, PATCH, DELETE\)$/
    })
  }
  // Opting out needs no handled method, and '* /prefix' endpoints handle every method.
  t.doesNotThrow(() => app.get('/get-false', { config: { idempotency: false } }, async () => 'ok'))
  const star = await build(t, { endpoints: ['* /reports/'] })
  t.doesNotThrow(() => star.get('/reports/x', { config: { idempotency: true } }, async () => 'ok'))
  t.equal(await outcome(star, 'GET', '/reports/x'), 'required')
})

test('a route config override applies to that route only (ttl)', async (t) => {
  let now = 0
  const store = new MemoryStore({ now: () => now })
  t.teardown(() => store.close())
  const app = Fastify()
  t.teardown(() => app.close())
  await app.register(fastifyIdempotency, { store, ttl: 10_000 })
  const short = route(app, 'POST', '/short', { ttl: 1000 })
  const plain = route(app, 'POST', '/plain')
  const never = route(app, 'POST', '/never', { ttl: null })
  const all = async () => {
    for (const url of ['/short', '/plain', '/never']) await app.inject({ method: 'POST', url, headers: { 'idempotency-key': 'k' } })
  }
  await all()
  now += 1000
  await all()
  t.same([short.runs, plain.runs, never.runs], [2, 1, 1], 'after 1 s only the short route ran again')
  now += 1e9
  await all()
  t.same([short.runs, plain.runs, never.runs], [3, 2, 1], 'ttl: null on the route never expires')
})
