/**
 * The plugin's request errors go through Fastify's error handler with stable
 * codes, so an application can reshape them; they never touch a stored record.
 */
import { test } from 'tap'
import { errors } from '../index.js'
import { build, heldHandler, RecordingStore, until } from './helpers/app.js'

test('an application error handler reshapes every plugin error by its code', async (t) => {
  const store = new RecordingStore()
  t.teardown(() => store.close())
  const app = await build(t, { store, key: { uuid: true } })
  app.setErrorHandler((error: Error & { code?: string, statusCode?: number }, _request, reply) => {
    reply.code(error.statusCode ?? 500).send({ problem: error.code, detail: error.message })
  })
  const slow = heldHandler({ ok: true }, { firstOnly: true })
  app.post('/', { config: { idempotency: true } }, slow.handler)
  const key = '3f2504e0-4f89-41d3-9a0c-0305e82c3301'
  const send = (headers: Record<string, string>, payload: object = { a: 1 }) => app.inject({ method: 'POST', url: '/', headers, payload })

  const missing = await send({})
  t.same([missing.statusCode, missing.json()], [400, { problem: 'FST_IDEMPOTENCY_KEY_MISSING', detail: 'The idempotency-key header is required on this route' }])
  const invalid = await send({ 'idempotency-key': 'nope' })
  t.same([invalid.statusCode, invalid.json()], [400, { problem: 'FST_IDEMPOTENCY_KEY_INVALID', detail: 'Invalid idempotency-key header: the key must be a UUID' }])

  const original = send({ 'idempotency-key': key })
  await until(() => slow.runs() === 1)
  const inFlight = await send({ 'idempotency-key': key })
  t.equal(inFlight.statusCode, 409)
  t.equal(inFlight.json().problem, 'FST_IDEMPOTENCY_IN_FLIGHT')
  t.equal(inFlight.headers['retry-after'], '1', 'Retry-After survives a custom error handler')
  const mismatch = await send({ 'idempotency-key': key }, { a: 2 })
  t.same([mismatch.statusCode, mismatch.json().problem], [422, 'FST_IDEMPOTENCY_FINGERPRINT_MISMATCH'])
  slow.open()
  await original

  t.equal(store.completes.length, 1)
  t.equal(store.releases.length, 0, 'the plugin\'s own errors never release or overwrite the claim')
  const replay = await send({ 'idempotency-key': key })
  t.same(replay.json(), { ok: true })
  t.equal(slow.runs(), 1)
})

test('the error classes are exported with their codes and statuses', async (t) => {
  const cases: Array<[Error & { code: string, statusCode?: number }, string, number | undefined]> = [
    [new errors.KeyMissingError('h'), 'FST_IDEMPOTENCY_KEY_MISSING', 400],
    [new errors.KeyInvalidError('h', 'why'), 'FST_IDEMPOTENCY_KEY_INVALID', 400],
    [new errors.FingerprintMismatchError(), 'FST_IDEMPOTENCY_FINGERPRINT_MISMATCH', 422],
    [new errors.InFlightError(), 'FST_IDEMPOTENCY_IN_FLIGHT', 409],
    [new errors.StoreUnavailableError(), 'FST_IDEMPOTENCY_STORE_UNAVAILABLE', 503],
    [new errors.InvalidOptionError('o', 'm'), 'FST_IDEMPOTENCY_INVALID_OPTION', 500],
    [new errors.InvalidRouteConfigError('r', 'p', 'm'), 'FST_IDEMPOTENCY_INVALID_ROUTE_CONFIG', 500]
  ]
  for (const [error, code, status] of cases) {
    t.equal(error.code, code)
    t.equal(error.statusCode, status, code)
    t.ok(error instanceof Error)
  }
  t.equal(new errors.KeyInvalidError('x-key', 'too long').message, 'Invalid x-key header: too long')
})
