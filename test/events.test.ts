/**
 * Events: onReplay, onConflict and onMismatch are called once per duplicate
 * with the request and the client's key (never the saved body), per plugin or
 * per route; a callback that throws is logged and changes nothing. onStoreError
 * may be a function that picks the policy of each failure.
 */
import { test, type Test } from 'tap'
import type { FastifyBaseLogger, FastifyRequest } from 'fastify'
import type { FastifyIdempotencyOptions, IdempotencyRouteOptions, StoreErrorPolicy } from '../index.js'
import { build, capturingLogger, ERROR, FlakyStore, heldHandler, RecordingStore, until, type LogLine } from './helpers/app.js'

type Call = unknown[]

/** Records every call's arguments, and answers `result`. */
function spy<R = void> (result?: R) {
  const calls: Call[] = []
  const fn = (...args: unknown[]): R => {
    calls.push(args)
    return result as R
  }
  return Object.assign(fn, { calls })
}

/** An onStoreError function that answers `policy`. */
const answering = (policy: StoreErrorPolicy | undefined) => spy(policy)

/** An app whose POST /orders holds its first run until `held.open()`. */
async function eventsApp (t: Parameters<typeof build>[0], options: FastifyIdempotencyOptions, route: IdempotencyRouteOptions = {}, lines: LogLine[] = []) {
  const app = await build(t, options, capturingLogger(lines))
  const held = heldHandler(({ run, reply }) => {
    reply.code(201)
    return { order: run, secret: 'saved body' }
  }, { firstOnly: true })
  app.post('/orders', { config: { idempotency: route } }, held.handler)
  await app.ready()
  const send = (call: string, key: string, payload: object = { item: 'book' }) =>
    app.inject({ method: 'POST', url: '/orders', headers: { 'idempotency-key': key, 'x-call': call }, payload })
  return { app, held, send }
}

/** Runs an in-flight duplicate, a replay and a mismatch of key `key`, and checks the answers. */
async function duplicates (t: Test, { held, send }: Awaited<ReturnType<typeof eventsApp>>, key: string) {
  const original = send('original', key)
  await until(() => held.runs() === 1)
  const conflict = await send('conflict', key)
  t.equal(conflict.statusCode, 409)
  t.equal(conflict.json().code, 'FST_IDEMPOTENCY_IN_FLIGHT')
  t.equal(conflict.headers['retry-after'], '1')
  held.open()
  const first = await original
  t.equal(first.statusCode, 201)
  const replay = await send('replay', key)
  t.equal(replay.statusCode, 201)
  t.equal(replay.body, first.body, 'the saved response')
  t.equal(replay.headers['idempotent-replayed'], 'true')
  const mismatch = await send('mismatch', key, { item: 'pen' })
  t.equal(mismatch.statusCode, 422)
  t.equal(mismatch.json().code, 'FST_IDEMPOTENCY_FINGERPRINT_MISMATCH')
  t.equal((await send('fresh', `${key}-other`)).statusCode, 201, 'a first request: no event')
  t.equal(held.runs(), 2)
}

/** Checks that `calls` holds exactly one call, made with the request tagged `call` and the client's key. */
function calledOnce (t: Test, calls: Call[], call: string, key: string, name: string) {
  t.equal(calls.length, 1, `${name}: called once`)
  const [args] = calls
  t.equal(args?.length, 2, `${name}: (request, key), nothing more: never the saved body`)
  const request = args?.[0] as FastifyRequest
  t.equal(request.headers['x-call'], call, `${name}: that request`)
  t.equal(request.routeOptions.url, '/orders')
  t.equal(args?.[1], key, `${name}: the client's key, not the store key`)
}

test('onReplay, onConflict, onMismatch: each called once, with the request and the client\'s key', async (t) => {
  const onReplay = spy()
  const onConflict = spy()
  const onMismatch = spy()
  const ctx = await eventsApp(t, { onReplay, onConflict, onMismatch })
  await duplicates(t, ctx, 'order-42')
  calledOnce(t, onReplay.calls, 'replay', 'order-42', 'onReplay')
  calledOnce(t, onConflict.calls, 'conflict', 'order-42', 'onConflict')
  calledOnce(t, onMismatch.calls, 'mismatch', 'order-42', 'onMismatch')
})

test('route-level events replace the plugin\'s; the others are inherited', async (t) => {
  const plugin = { onReplay: spy(), onConflict: spy(), onMismatch: spy() }
  const route = { onReplay: spy(), onMismatch: spy() }
  const ctx = await eventsApp(t, plugin, route)
  await duplicates(t, ctx, 'k')
  calledOnce(t, route.onReplay.calls, 'replay', 'k', 'the route\'s onReplay')
  calledOnce(t, route.onMismatch.calls, 'mismatch', 'k', 'the route\'s onMismatch')
  calledOnce(t, plugin.onConflict.calls, 'conflict', 'k', 'the plugin\'s onConflict, not overridden')
  t.equal(plugin.onReplay.calls.length, 0, 'the plugin\'s onReplay is not called')
  t.equal(plugin.onMismatch.calls.length, 0, 'nor its onMismatch')
})

test('a callback that throws is logged at error level, with the hashed key; the answers do not change', async (t) => {
  const lines: LogLine[] = []
  const thrower = (name: string) => () => { throw new Error(`${name} failed`) }
  const ctx = await eventsApp(t, { onReplay: thrower('onReplay'), onConflict: thrower('onConflict'), onMismatch: thrower('onMismatch') }, {}, lines)
  await duplicates(t, ctx, 'order-7')
  const logged = lines.filter((line) => line.msg === 'idempotency: an event callback threw')
  t.strictSame(logged.map((line) => line.err?.message), ['onConflict failed', 'onReplay failed', 'onMismatch failed'])
  for (const line of logged) {
    t.equal(line.level, ERROR)
    t.match(line.idempotencyKey, /^sha256:[\w-]{43}$/, 'a hash of the store key (the memory store\'s keys are not hashed)')
    t.notMatch(line.idempotencyKey, /order-7/, 'never the client\'s key')
  }
})

test('with a custom keyEncoder the logs carry a hash of the store key', async (t) => {
  const lines: LogLine[] = []
  const ctx = await eventsApp(t, { keyEncoder: ({ key }) => `plain:${key}`, onReplay: () => { throw new Error('no') } }, {}, lines)
  await duplicates(t, ctx, 'order-8')
  const logged = lines.find((line) => line.msg === 'idempotency: an event callback threw') as LogLine
  t.match(logged.idempotencyKey, /^sha256:[\w-]{43}$/)
})

test('inFlight.wait: onConflict once when the wait runs out; a wait that ends in a replay calls onReplay only', async (t) => {
  const onReplay = spy()
  const onConflict = spy()
  const store = new RecordingStore()
  t.teardown(() => store.close())
  const { held, send } = await eventsApp(t, { store, onReplay, onConflict, inFlight: { wait: 100 } })
  const original = send('original', 'k')
  await until(() => held.runs() === 1)
  t.equal((await send('conflict', 'k')).statusCode, 409)
  t.equal(onConflict.calls.length, 1, 'once, not once per look at the store')
  const looks = store.claims.length
  const waiting = send('waiter', 'k')
  await until(() => store.claims.length > looks)
  t.ok(store.claims.length > looks, 'the waiter found the original in flight: it waits')
  held.open()
  await original
  t.equal((await waiting).headers['idempotent-replayed'], 'true')
  t.equal(onConflict.calls.length, 1)
  t.equal(onReplay.calls.length, 1)
  t.equal((onReplay.calls[0][0] as FastifyRequest).headers['x-call'], 'waiter')
})

test('a manual route answers duplicates itself: onReplay is not called', async (t) => {
  const onReplay = spy()
  const app = await build(t, { onReplay })
  app.post('/manual', { config: { idempotency: { manual: true } } }, async (_request, reply) => {
    return { duplicate: reply.idempotency.exists }
  })
  const send = () => app.inject({ method: 'POST', url: '/manual', headers: { 'idempotency-key': 'k' } })
  t.strictSame((await send()).json(), { duplicate: false })
  t.strictSame((await send()).json(), { duplicate: true })
  t.equal(onReplay.calls.length, 0)
  t.equal((await app.idempotency.stats()).totals.replayed, 1, 'the stats count it as replayed')
})

/** An app on a store whose claims fail, with a counting POST /orders. */
async function failingApp (t: Parameters<typeof build>[0], options: FastifyIdempotencyOptions, route: IdempotencyRouteOptions = {}, lines: LogLine[] = []) {
  const store = new FlakyStore()
  t.teardown(() => store.close())
  store.failing.claim = true
  const app = await build(t, { store, ...options }, capturingLogger(lines))
  const runs = { count: 0 }
  app.post('/orders', { config: { idempotency: route } }, async () => ({ run: ++runs.count }))
  await app.ready()
  const send = () => app.inject({ method: 'POST', url: '/orders', headers: { 'idempotency-key': 'order-1' }, payload: { item: 'book' } })
  return { runs, send }
}

test('onStoreError as a function: its answer picks the policy of each failure', async (t) => {
  const cases: Array<[string, unknown, number, number]> = [
    ['fail-open runs the handler', 'fail-open', 200, 1],
    ['fail-closed refuses', 'fail-closed', 503, 0],
    ['nothing refuses', undefined, 503, 0],
    ['anything else refuses', 'maybe', 503, 0]
  ]
  for (const [name, answer, status, runs] of cases) {
    const onStoreError = answering(answer as StoreErrorPolicy | undefined)
    const lines: LogLine[] = []
    const ctx = await failingApp(t, { onStoreError }, {}, lines)
    const reply = await ctx.send()
    t.equal(reply.statusCode, status, name)
    t.equal(ctx.runs.count, runs, `${name}: the handler ran ${runs} times`)
    if (status === 503) {
      t.equal(reply.json().code, 'FST_IDEMPOTENCY_STORE_UNAVAILABLE')
      t.equal(reply.headers['retry-after'], '1')
    }
    t.equal(onStoreError.calls.length, 1, `${name}: called once`)
    const [request, key, error] = onStoreError.calls[0]
    t.equal(onStoreError.calls[0].length, 3, 'request, key, error')
    t.equal((request as FastifyRequest).routeOptions.url, '/orders')
    t.equal(key, 'order-1')
    t.equal((error as Error).message, 'store down (claim)')
    const failure = lines.find((line) => line.msg.startsWith('idempotency: store failed')) as LogLine
    t.equal(failure.level, ERROR)
    t.equal(failure.msg, status === 200
      ? 'idempotency: store failed; running the handler without idempotency (fail-open)'
      : 'idempotency: store failed; request refused (fail-closed)')
    t.equal(failure.err?.message, 'store down (claim)')
  }
})

test('onStoreError that throws: logged, and the request is refused', async (t) => {
  const lines: LogLine[] = []
  const ctx = await failingApp(t, { onStoreError: () => { throw new Error('callback broke') } }, {}, lines)
  const reply = await ctx.send()
  t.equal(reply.statusCode, 503)
  t.equal(ctx.runs.count, 0)
  const thrown = lines.find((line) => line.msg === 'idempotency: an event callback threw') as LogLine
  t.equal(thrown.level, ERROR)
  t.equal(thrown.err?.message, 'callback broke')
  t.ok(lines.some((line) => line.msg === 'idempotency: store failed; request refused (fail-closed)'))
})

test('route-level onStoreError overrides the plugin\'s, string or function', async (t) => {
  const pluginOpen = answering('fail-open')
  const closedRoute = await failingApp(t, { onStoreError: pluginOpen }, { onStoreError: 'fail-closed' })
  t.equal((await closedRoute.send()).statusCode, 503, 'a route\'s fail-closed beats a plugin function that answers fail-open')
  t.equal(pluginOpen.calls.length, 0, 'the plugin\'s function is not called')

  const pluginNothing = answering(undefined)
  const openRoute = await failingApp(t, { onStoreError: pluginNothing }, { onStoreError: 'fail-open' })
  t.equal((await openRoute.send()).statusCode, 200, 'a route\'s fail-open beats a plugin function that answers nothing')
  t.equal(openRoute.runs.count, 1)
  t.equal(pluginNothing.calls.length, 0)

  const routeNothing = answering(undefined)
  const fnRoute = await failingApp(t, { onStoreError: 'fail-open' }, { onStoreError: routeNothing })
  t.equal((await fnRoute.send()).statusCode, 503, 'a route function that answers nothing is fail-closed, whatever the plugin\'s policy')
  t.equal(routeNothing.calls.length, 1)

  const pluginFn = answering('fail-closed')
  const routeFn = answering('fail-open')
  const both = await failingApp(t, { onStoreError: pluginFn }, { onStoreError: routeFn })
  t.equal((await both.send()).statusCode, 200, 'the route\'s function decides')
  t.strictSame([pluginFn.calls.length, routeFn.calls.length], [0, 1])

  const inherited = answering('fail-open')
  const plain = await failingApp(t, { onStoreError: inherited }, { ttl: 1000 })
  t.equal((await plain.send()).statusCode, 200, 'a route that says nothing inherits the plugin\'s function')
  t.equal(inherited.calls.length, 1)
})

test('event options that are not functions are refused, per plugin and per route', async (t) => {
  for (const name of ['onReplay', 'onConflict', 'onMismatch'] as const) {
    await t.rejects(build(t, { [name]: 'log' } as FastifyIdempotencyOptions), {
      code: 'FST_IDEMPOTENCY_INVALID_OPTION', message: `fastify-idempotency: invalid option "${name}": must be a function (request, key) => void`
    })
    const app = await build(t)
    t.throws(() => app.post('/x', { config: { idempotency: { [name]: 42 } as IdempotencyRouteOptions } }, async () => ({})), {
      code: 'FST_IDEMPOTENCY_INVALID_ROUTE_CONFIG', message: new RegExp(`${name}: must be a function \\(request, key\\) => void`)
    })
  }
})

test('a replay is logged at debug level, with the hashed key, only when debug lines are kept', async (t) => {
  const keyEncoder = ({ key }: { key: string }) => `plain:${key}`
  const replayLines = async (server: Parameters<typeof build>[2]) => {
    const app = await build(t, { keyEncoder }, server)
    app.post('/orders', async (_request, reply) => reply.code(201).send({ ok: true }))
    for (let i = 0; i < 2; i++) {
      const response = await app.inject({ method: 'POST', url: '/orders', headers: { 'idempotency-key': 'order-9' }, payload: {} })
      t.equal(response.statusCode, 201)
    }
  }
  const REPLAYED = 'idempotency: replayed a saved response'

  const debug: LogLine[] = []
  await replayLines(capturingLogger(debug, 'debug'))
  const logged = debug.filter((line) => line.msg === REPLAYED)
  t.equal(logged.length, 1, 'pino at debug: one line, for the replay')
  t.equal(logged[0].level, 20)
  t.match(logged[0].idempotencyKey, /^sha256:[\w-]{43}$/, 'the store key hashed (a custom encoder)')

  const info: LogLine[] = []
  await replayLines(capturingLogger(info, 'info'))
  t.equal(info.filter((line) => line.msg === REPLAYED).length, 0, 'pino at info: none')

  // A logger that cannot tell its level (not pino) is asked to log, and decides itself.
  const lines: Array<[string, unknown, unknown]> = []
  const logger = {
    level: 'debug',
    child: () => logger,
    ...Object.fromEntries(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'].map((level) =>
      [level, (fields: unknown, msg?: unknown) => { lines.push([level, fields, msg]) }]))
  }
  await replayLines({ loggerInstance: logger as unknown as FastifyBaseLogger })
  const custom = lines.filter(([, , msg]) => msg === REPLAYED)
  t.equal(custom.length, 1, 'a logger without isLevelEnabled gets the line')
  t.equal(custom[0][0], 'debug')
})
