/**
 * Start-up traps: configurations that run but protect less than meant print
 * a coded process warning (with the default `Fastify()`, whose logger is off),
 * and the plugin registered twice fails with a message saying what to do.
 */
import t from 'tap'
import Fastify from 'fastify'
import fastifyIdempotency from '../index.js'
import type { FastifyIdempotencyOptions } from '../index.js'
import { resetWarnings } from '../lib/warnings.js'
import './helpers/crash-guard.js'

interface Emitted { code: string, message: string }

/** The plugin's warnings emitted while `run` runs (each warning may be emitted again). */
async function warningsOf (run: () => Promise<unknown>): Promise<Emitted[]> {
  resetWarnings()
  const seen: Emitted[] = []
  const listener = (warning: Error & { code?: string }) => {
    if (warning.name === 'FastifyIdempotencyWarning') seen.push({ code: warning.code as string, message: warning.message })
  }
  process.on('warning', listener)
  try {
    await run()
    await new Promise((resolve) => setImmediate(resolve)) // warnings are emitted on the next tick
  } finally {
    process.off('warning', listener)
  }
  return seen
}

/** Registers the plugin with `options` on a default Fastify(), adds `routes`, and starts it. */
async function start (options: FastifyIdempotencyOptions, routes = (app: ReturnType<typeof Fastify>) => { app.post('/pay', async () => 'ok') }) {
  const app = Fastify()
  t.teardown(() => app.close())
  await app.register(fastifyIdempotency, options)
  routes(app)
  await app.ready()
  return app
}

const scoped = { scope: () => 'tenant' }

t.test('a correct set-up warns about nothing', async (t) => {
  t.same(await warningsOf(() => start(scoped)), [])
  t.same(await warningsOf(() => start({ ...scoped, mode: 'required', endpoints: ['/pay'], ttl: '1h', lockTtl: '30s' })), [])
  t.same(await warningsOf(() => start({ mode: 'exempt' })), [], 'exempt: routes opt in, no scope warning')
})

t.test('FSTIDEM001: no scope while routes are covered by default', async (t) => {
  const emitted = await warningsOf(() => start({}))
  t.same(emitted.map((w) => w.code), ['FSTIDEM001'])
  t.match(emitted[0].message, /keys are shared by every client.*scope: \(request\) => request\.user\?\.id/)
  t.same((await warningsOf(() => start({ mode: 'required' }))).map((w) => w.code), ['FSTIDEM001'])
})

t.test('FSTIDEM002: mode required covers no route (routes added before the plugin, a register without await)', async (t) => {
  const before = await warningsOf(async () => {
    const app = Fastify()
    t.teardown(() => app.close())
    app.post('/pay', async () => 'ok')
    await app.register(fastifyIdempotency, { ...scoped, mode: 'required' })
    await app.ready()
  })
  t.same(before.map((w) => w.code), ['FSTIDEM002'])
  t.match(before[0].message, /covers no route.*await app\.register\(fastifyIdempotency/)

  let reached = 0
  const unawaited = await warningsOf(async () => {
    const app = Fastify()
    t.teardown(() => app.close())
    app.register(fastifyIdempotency, { ...scoped, mode: 'required' })
    app.post('/pay', async () => { reached++; return 'ok' })
    await app.ready()
    const res = await app.inject({ method: 'POST', url: '/pay' })
    t.equal(res.statusCode, 200, 'indeed unprotected: a request without a key runs')
  })
  t.equal(reached, 1)
  t.same(unawaited.map((w) => w.code), ['FSTIDEM002'])
})

t.test('FSTIDEM003: an endpoints entry that covers no route, e.g. written without the prefix of its register', async (t) => {
  const emitted = await warningsOf(() => start({ ...scoped, endpoints: ['/payments', 'POST /v1/orders'] }, (app) => {
    app.register(async (v1: ReturnType<typeof Fastify>) => {
      v1.post('/payments', async () => 'ok')
      v1.post('/orders', async () => 'ok')
    }, { prefix: '/v1' })
  }))
  t.same(emitted.map((w) => w.code), ['FSTIDEM003'])
  t.match(emitted[0].message, /"\/payments" covers no route.*prefix/)
})

t.test('FSTIDEM004: ttl shorter than lockTtl', async (t) => {
  const emitted = await warningsOf(() => start({ ...scoped, ttl: '10s', lockTtl: '60s' }))
  t.same(emitted.map((w) => w.code), ['FSTIDEM004'])
  t.match(emitted[0].message, /`ttl` \(10000 ms\) is shorter than `lockTtl` \(60000 ms\)/)
})

t.test('FSTIDEM005: a ttl small enough to be seconds typed as ms; a string duration silences it', async (t) => {
  const emitted = await warningsOf(() => start({ ...scoped, ttl: 60 }))
  t.same(emitted.map((w) => w.code), ['FSTIDEM005', 'FSTIDEM004'])
  t.match(emitted[0].message, /`ttl` is 60 ms: durations given as numbers are milliseconds\. If you meant seconds, write '60s'/)
  t.same((await warningsOf(() => start({ ...scoped, ttl: '60s' }))).map((w) => w.code), [], '\'60s\': meant')
  const explicit = await warningsOf(() => start({ ...scoped, ttl: '900ms', lockTtl: '1s' }))
  t.same(explicit.map((w) => w.code), ['FSTIDEM004'], '\'900ms\': no FSTIDEM005 (still shorter than lockTtl)')
})

t.test('the plugin registered twice in one app: a start-up error that says what to do instead', async (t) => {
  const app = Fastify()
  t.teardown(() => app.close())
  await app.register(fastifyIdempotency, scoped)
  await t.rejects(async () => { await app.register(fastifyIdempotency, scoped) }, {
    code: 'FST_IDEMPOTENCY_REGISTERED_TWICE',
    message: /registered twice here.*config\.idempotency.*sibling plugins/
  })

  const nested = Fastify()
  t.teardown(() => nested.close())
  await nested.register(fastifyIdempotency, scoped)
  nested.register(async (child) => { await child.register(fastifyIdempotency, scoped) })
  await t.rejects(async () => { await nested.ready() }, { code: 'FST_IDEMPOTENCY_REGISTERED_TWICE' }, 'inside a plugin that inherits it')

  const siblings = Fastify()
  t.teardown(() => siblings.close())
  let runs = 0
  for (const prefix of ['/a', '/b']) {
    siblings.register(async (child) => {
      await child.register(fastifyIdempotency, scoped)
      child.post('/pay', async () => ({ run: ++runs }))
    }, { prefix })
  }
  await siblings.ready()
  for (const url of ['/a/pay', '/b/pay', '/a/pay']) await siblings.inject({ method: 'POST', url, headers: { 'idempotency-key': 'k' } })
  t.equal(runs, 2, 'siblings are fine: each route claims once, per its own plugin')
})
