/**
 * `telemetry: true` adds x-request-start-time and x-request-duration-ms to
 * the responses of covered requests (replays and the plugin's own errors
 * included); they are never stored, so a replay carries its own.
 */
import { test } from 'tap'
import { build, RecordingStore, sleep } from './helpers/app.js'

test('telemetry headers on first responses, replays and errors; never stored', async (t) => {
  const store = new RecordingStore()
  t.teardown(() => store.close())
  const app = await build(t, { store, telemetry: true, mode: 'required' })
  app.post('/', async () => {
    await sleep(5)
    return { ok: true }
  })
  app.get('/', async () => 'get')
  app.post('/exempt', { config: { idempotency: false } }, async () => 'exempt')

  const check = (headers: Record<string, unknown>, before: number, after: number, name: string) => {
    const start = Number(headers['x-request-start-time'])
    t.ok(Number.isInteger(start), `${name}: start time is an integer (ms since the epoch)`)
    // A wide margin: the start time comes from the monotonic clock, which may drift a little from Date.now().
    t.ok(Math.abs(start - before) < 1000 && start <= after + 1000, `${name}: start time is now, in ms since the epoch`)
    t.match(headers['x-request-duration-ms'], /^\d+\.\d{3}$/, `${name}: duration in ms with 3 decimals`)
    t.ok(Number(headers['x-request-duration-ms']) <= after - before + 1, `${name}: duration within the request`)
  }

  let before = Date.now()
  const first = await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  check(first.headers, before, Date.now(), 'first')
  t.ok(Number(first.headers['x-request-duration-ms']) >= 4, 'the duration covers the handler')
  t.same(Object.keys(store.completes[0].response.headers), ['content-type'], 'not stored')

  await sleep(5)
  before = Date.now()
  const replay = await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  t.equal(replay.headers['idempotent-replayed'], 'true')
  check(replay.headers, before, Date.now(), 'replay')
  t.ok(Number(replay.headers['x-request-start-time']) >= Number(first.headers['x-request-start-time']), 'the replay has its own start time')

  before = Date.now()
  const missing = await app.inject({ method: 'POST', url: '/' })
  t.equal(missing.statusCode, 400)
  check(missing.headers, before, Date.now(), 'error')

  for (const [method, url] of [['GET', '/'], ['POST', '/exempt']] as const) {
    const res = await app.inject({ method, url, headers: { 'idempotency-key': 'k2' } })
    t.equal(res.headers['x-request-start-time'], undefined, `${method} ${url}: not covered`)
    t.equal(res.headers['x-request-duration-ms'], undefined)
  }
})

test('telemetry off (default): no such headers', async (t) => {
  const app = await build(t)
  app.post('/', async () => 'ok')
  const res = await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  t.equal(res.headers['x-request-start-time'], undefined)
  t.equal(res.headers['x-request-duration-ms'], undefined)
})
