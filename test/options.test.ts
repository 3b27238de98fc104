/**
 * Plugin options: every invalid value is refused at registration with a coded
 * error naming the option, and every default is what the spec says.
 */
import { test } from 'tap'
import Fastify from 'fastify'
import fastifyIdempotency, { MemoryStore } from '../index.js'
import { OPTION_NAMES } from '../lib/options.js'
import type { FastifyIdempotencyOptions } from '../index.js'
import { build, capturingLogger, ERROR, FlakyStore, heldHandler, RecordingStore, until, type LogLine } from './helpers/app.js'

const HOUR = 60 * 60 * 1000

test('invalid options are refused at registration, naming the option', async (t) => {
  const cases: Array<[unknown, string, string]> = [
    [{ header: 'bad header' }, 'header', 'must be a valid HTTP header name'],
    [{ header: 42 }, 'header', 'must be a valid HTTP header name'],
    [{ methods: [] }, 'methods', 'must be a non-empty array of HTTP methods'],
    [{ methods: 'POST' }, 'methods', 'must be a non-empty array of HTTP methods'],
    [{ methods: ['POST', 'FOO'] }, 'methods.1', '"FOO" is not an HTTP method'],
    [{ methods: [1] }, 'methods.0', 'Expected string'],
    [{ mode: 'sometimes' }, 'mode', 'must be \'optional\', \'required\' or \'exempt\''],
    [{ endpoints: '/api/' }, 'endpoints', 'must be an array of strings'],
    [{ endpoints: ['/ok/', 'api/'] }, 'endpoints.1', '"api/" must be "/prefix", "METHOD /prefix" or "* /prefix"'],
    [{ endpoints: ['POST GET /x'] }, 'endpoints.0', '"POST GET /x" must be "/prefix", "METHOD /prefix" or "* /prefix"'],
    [{ endpoints: ['FOO /x'] }, 'endpoints.0', '"FOO" is not an HTTP method'],
    [{ endpoints: ['POST x'] }, 'endpoints.0', 'must be "/prefix"'],
    [{ ttl: 0 }, 'ttl', 'must be a positive duration (a number of ms or a string such as \'24h\', \'90s\' or \'500ms\'); got 0'],
    [{ ttl: -1 }, 'ttl', 'must be a positive duration'],
    [{ ttl: 1.5 }, 'ttl', 'must be a positive duration'],
    [{ ttl: 'a day' }, 'ttl', 'must be a positive duration (a number of ms or a string such as \'24h\', \'90s\' or \'500ms\'); got "a day"'],
    [{ ttl: '-5s' }, 'ttl', 'must be a positive duration'],
    [{ ttl: true }, 'ttl', 'must be a positive duration (a number of ms or a string such as \'24h\', \'90s\' or \'500ms\') or null'],
    [{ lockTtl: 999 }, 'lockTtl', 'must be a duration of at least 1000 ms'],
    [{ lockTtl: '0.5s' }, 'lockTtl', 'must be a duration of at least 1000 ms'],
    [{ lockTtl: null }, 'lockTtl', 'must be a duration of at least 1000 ms'],
    [{ store: 'redis', storeTimeout: 1000, lockTtl: 2999 }, 'lockTtl', 'must be a duration of at least 3000 ms'],
    [{ storeTimeout: 0 }, 'storeTimeout', 'must be a positive duration'],
    [{ storeTimeout: 'soon' }, 'storeTimeout', 'must be a positive duration'],
    [{ inFlight: 'wait' }, 'inFlight', 'Expected object'],
    [{ inFlight: { wait: -1 } }, 'inFlight.wait', 'must be a duration of at least 0'],
    [{ inFlight: { wait: 1.5 } }, 'inFlight.wait', 'must be a duration of at least 0'],
    [{ inFlight: { wait: [] } }, 'inFlight.wait', 'must be a duration of at least 0'],
    [{ inFlight: { statusCode: 500 } }, 'inFlight.statusCode', 'must be 409 or 423'],
    [{ inFlight: { statusCode: 429 } }, 'inFlight.statusCode', 'must be 409 or 423'],
    [{ inFlight: { retry: 1 } }, 'inFlight.retry', 'unknown option'],
    [{ storeOnStatuses: [] }, 'storeOnStatuses', 'must be a non-empty array of HTTP status codes'],
    [{ storeOnStatuses: [200, 99] }, 'storeOnStatuses.1', 'Expected integer to be greater or equal to 100'],
    [{ storeOnStatuses: [600] }, 'storeOnStatuses.0', 'Expected integer to be less or equal to 599'],
    [{ replayStatusCode: 199 }, 'replayStatusCode', 'must be an HTTP status code from 200 to 599, or null'],
    [{ replayStatusCode: 600 }, 'replayStatusCode', 'must be an HTTP status code from 200 to 599, or null'],
    [{ replayStatusCode: '409' }, 'replayStatusCode', 'must be an HTTP status code from 200 to 599, or null'],
    [{ conflictStatusCode: 409 }, 'conflictStatusCode', 'unknown option'],
    [{ replayHeader: true }, 'replayHeader', 'must be a valid HTTP header name or false'],
    [{ replayHeader: 'x replayed' }, 'replayHeader', 'must be a valid HTTP header name or false'],
    [{ fingerprint: 'sha256' }, 'fingerprint', 'must be a boolean or a function (request) => string'],
    [{ scope: 'user' }, 'scope', 'must be a function (request) => string | undefined'],
    [{ key: 5 }, 'key', 'Expected object'],
    [{ key: { maxLength: 0 } }, 'key.maxLength', 'must be an integer from 1 to 8192'],
    [{ key: { maxLength: 8193 } }, 'key.maxLength', 'must be an integer from 1 to 8192'],
    [{ key: { pattern: '^[a-z]+$' } }, 'key.pattern', 'must be a RegExp'],
    [{ key: { uuid: 'yes' } }, 'key.uuid', 'Expected boolean'],
    [{ key: { minLength: 3 } }, 'key.minLength', 'unknown option'],
    [{ keyEncoder: 'sha256' }, 'keyEncoder', 'must be a function (parts) => string'],
    [{ telemetry: 'yes' }, 'telemetry', 'Expected boolean'],
    [{ store: 'disk' }, 'store', 'must be \'memory\', \'redis\', \'postgres\' or an object with claim, complete, release and renew methods'],
    [{ redis: { replicas: -1 } }, 'redis.replicas', 'must be an integer of at least 0'],
    [{ redis: { replicaTimeout: 'never' } }, 'redis.replicaTimeout', 'must be a positive duration'],
    [{ redis: { requireNoEviction: 'yes' } }, 'redis.requireNoEviction', 'Expected boolean'],
    [{ redis: { replica: 1 } }, 'redis.replica', 'unknown option'],
    [{ replayCache: -1 }, 'replayCache', 'must be a number of bytes'],
    [{ replayCache: '16mb' }, 'replayCache', 'must be a number of bytes'],
    [{ namespace: '' }, 'namespace', 'must be a non-empty string without { or }'],
    [{ namespace: 'a{b}' }, 'namespace', 'must be a non-empty string without { or }'],
    [{ redisNamespace: '' }, 'redisNamespace', 'must be the non-empty name of a @fastify/redis namespace'],
    [{ pgNamespace: '' }, 'pgNamespace', 'must be the non-empty name of a @fastify/postgres database'],
    [{ store: { claim () {}, complete () {}, release () {} } }, 'store', 'an object with claim, complete, release and renew methods'],
    [{ onStoreError: 'ignore' }, 'onStoreError', 'must be \'fail-closed\', \'fail-open\' or a function (request, key, error) => policy'],
    [{ headr: 'idempotency-key' }, 'headr', 'unknown option']
  ]
  for (const [options, path, message] of cases) {
    const app = Fastify()
    t.teardown(() => app.close())
    await t.rejects(async () => { await app.register(fastifyIdempotency, options as FastifyIdempotencyOptions) }, {
      code: 'FST_IDEMPOTENCY_INVALID_OPTION',
      message: new RegExp(`^fastify-idempotency: invalid option "${path.replaceAll('.', '\\.')}": .*${escape(message)}`)
    }, JSON.stringify(options))
  }
})

function escape (text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')
}

test('a valid option set with every field is accepted', async (t) => {
  const every: Required<FastifyIdempotencyOptions> = {
    header: 'X-Idempotency-Key',
    methods: ['post', 'Put'],
    mode: 'required',
    endpoints: ['/api/', 'post /pay/', '* /critical/'],
    ttl: '2h',
    lockTtl: '90s',
    inFlight: { wait: '250ms', statusCode: 423 },
    storeOnStatuses: [200],
    replayStatusCode: 409,
    replayHeader: false,
    fingerprint: false,
    scope: () => undefined,
    key: { maxLength: 8192, pattern: /./, uuid: false },
    keyEncoder: (parts) => parts.key,
    telemetry: true,
    replaySetCookie: true,
    store: new MemoryStore(),
    redis: { requireNoEviction: true, replicas: 1, replicaTimeout: '50ms' },
    postgres: { table: 'billing.idempotency', createTable: false },
    storeTimeout: '1s',
    replayCache: 0,
    onStoreError: 'fail-open',
    onReplay: () => {},
    onConflict: () => {},
    onMismatch: () => {},
    namespace: 'billing',
    redisNamespace: 'cache',
    pgNamespace: 'main',
    errors: 'problem+json',
    stats: { ttl: '1d', flushInterval: 500, route: '/stats', preHandler: async () => {}, warnRecords: 10 }
  }
  t.same(Object.keys(every).sort(), [...OPTION_NAMES].sort(), 'every option the schema knows, no more')
  const app = await build(t, every)
  await t.resolves(async () => { await app.ready() })
})

test('defaults: ttl 24 h and lockTtl 60 s are what the store is asked for', async (t) => {
  const store = new RecordingStore()
  t.teardown(() => store.close())
  const app = await build(t, { store })
  app.post('/', async () => ({ ok: true }))
  const res = await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  t.equal(res.statusCode, 200)
  t.equal(store.claims.length, 1)
  t.equal(store.claims[0].lockTtl, 60_000)
  t.equal(store.claims[0].key, 'idem:-|POST|1:/|k', 'default key encoder on the memory store: the parts, delimited, unhashed')
  t.type(store.claims[0].fingerprint, 'string', 'fingerprint on by default')
  t.equal(store.completes.length, 1)
  t.equal(store.completes[0].ttl, 24 * HOUR)
})

test('default ttl: a response is replayed until 24 h have passed, then the handler runs again', async (t) => {
  let now = 1_000_000
  const store = new MemoryStore({ now: () => now })
  t.teardown(() => store.close())
  const app = await build(t, { store })
  let runs = 0
  app.post('/', async () => ({ run: ++runs }))
  const send = () => app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  t.same((await send()).json(), { run: 1 })
  now += 24 * HOUR - 1
  const replay = await send()
  t.same(replay.json(), { run: 1 })
  t.equal(replay.headers['idempotent-replayed'], 'true')
  now += 1
  t.same((await send()).json(), { run: 2 })
  t.equal(runs, 2)
})

test('ttl: a custom ttl bounds the replay; null never expires', async (t) => {
  for (const [ttl, after, expectRuns] of [[1000, 999, 1], [1000, 1000, 2], [null, 1e12, 1]] as const) {
    let now = 0
    const store = new MemoryStore({ now: () => now })
    t.teardown(() => store.close())
    const app = await build(t, { store, ttl })
    let runs = 0
    app.post('/', async () => ({ run: ++runs }))
    await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
    now += after
    await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
    t.equal(runs, expectRuns, `ttl ${ttl}, second request after ${after} ms`)
  }
})

test('default lockTtl: the claim of a handler that stops renewing frees the key after 60 s', async (t) => {
  let now = 0
  const store = new MemoryStore({ now: () => now })
  t.teardown(() => store.close())
  const lines: LogLine[] = []
  const app = await build(t, { store }, capturingLogger(lines))
  const first = heldHandler(({ run }) => ({ run }), { firstOnly: true })
  app.post('/', first.handler)
  const send = () => app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  const original = send()
  await until(() => first.runs() === 1)
  // Lease renewal runs every lockTtl / 3 of real time (20 s), so within this test the claim is never renewed.
  now += 60_000 - 1
  t.equal((await send()).statusCode, 409, 'claim still held just before lockTtl')
  now += 1
  const takeover = await send()
  t.equal(takeover.statusCode, 200, 'claim expired after lockTtl: a duplicate claims the key')
  t.same(takeover.json(), { run: 2 })
  first.open()
  t.same((await original).json(), { run: 1 })
  t.equal(first.runs(), 2)
  t.ok(lines.some((l) => l.level === ERROR && /the response was not saved/.test(l.msg)), 'the late original logs that its response was not saved')
  t.same((await send()).json(), { run: 2 }, 'the stored response is the one of the request that held the claim')
})

test('defaults: methods, mode, header, statuses, replay header, key length, telemetry, store and store errors', async (t) => {
  const app = await build(t)
  let runs = 0
  app.route({
    method: ['GET', 'POST', 'PUT', 'PATCH', 'DELETE'],
    url: '/:status',
    handler: async (request, reply) => {
      reply.code(Number((request.params as { status: string }).status))
      return { run: ++runs }
    }
  })
  const send = (method: 'GET' | 'POST' | 'PUT' | 'PATCH' | 'DELETE', status: number, key: string | undefined) =>
    app.inject({ method, url: `/${status}`, headers: key === undefined ? {} : { 'Idempotency-Key': key } })

  for (const method of ['POST', 'PUT', 'PATCH', 'DELETE'] as const) {
    const first = await send(method, 201, method)
    const replay = await send(method, 201, method)
    t.equal(replay.statusCode, 201, `${method}: replayed with the original status (replayStatusCode null)`)
    t.equal(replay.body, first.body)
    t.equal(replay.headers['idempotent-replayed'], 'true', `${method}: replay header`)
    t.equal(first.headers['idempotent-replayed'], undefined, 'not on the first response')
    t.equal(first.headers['x-request-start-time'], undefined, 'telemetry off')
    t.equal(first.headers['x-request-duration-ms'], undefined, 'telemetry off')
  }
  t.equal(runs, 4)

  await send('GET', 200, 'g')
  const get = await send('GET', 200, 'g')
  t.equal(get.headers['idempotent-replayed'], undefined, 'GET is not handled')
  t.equal(runs, 6)

  await send('POST', 200, undefined)
  await send('POST', 200, undefined)
  t.equal(runs, 8, 'mode optional: no key, no idempotency')

  await send('POST', 207, 's207')
  t.equal((await send('POST', 207, 's207')).headers['idempotent-replayed'], 'true', '207 is stored')
  await send('POST', 208, 's208')
  t.equal((await send('POST', 208, 's208')).headers['idempotent-replayed'], undefined, '208 is not stored')
  t.equal(runs, 11)

  t.equal((await send('POST', 200, 'x'.repeat(255))).statusCode, 200, 'key.maxLength 255')
  t.equal((await send('POST', 200, 'x'.repeat(256))).statusCode, 400)
  t.equal((await send('POST', 200, 'not-a-uuid-nor-anything')).statusCode, 200, 'no uuid or pattern rule by default')

  t.ok(app.idempotency.store instanceof MemoryStore, 'store: memory')
})

test('default onStoreError is fail-closed', async (t) => {
  const store = new FlakyStore()
  t.teardown(() => store.close())
  store.failing.claim = true
  const app = await build(t, { store })
  let runs = 0
  app.post('/', async () => ({ run: ++runs }))
  const res = await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  t.equal(res.statusCode, 503)
  t.equal(runs, 0)
})
