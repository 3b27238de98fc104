/**
 * `errors: 'problem+json'`: every error of the plugin is an RFC 9457 document
 * (`type`, `title`, `status`, `detail`, `code`) sent as
 * `application/problem+json`, with the same status and Retry-After as
 * Fastify's shape, which stays the default.
 *
 * What we found about the application's hooks: problem documents are sent by
 * the plugin's hooks themselves, so `setErrorHandler` and `onError` hooks are
 * not involved (they cannot reshape them); `onSend` and `onResponse` hooks run
 * as for any reply. With `errors: 'fastify'` the errors go through the error
 * handler (see errors.test.ts).
 */
import { test, type Test } from 'tap'
import type { FastifyIdempotencyOptions } from '../index.js'
import { build, FlakyStore, heldHandler, until } from './helpers/app.js'

const TAG = 'tag:fastify-idempotency,2026:'

/** Every error of the plugin, in order: missing, invalid, in flight, mismatch, store unavailable. */
async function everyError (t: Test, options: FastifyIdempotencyOptions) {
  const store = new FlakyStore()
  t.teardown(() => store.close())
  const app = await build(t, { store, ...options })
  const hooks = { errorHandler: 0, onError: 0, onSend: 0, onResponse: 0 }
  app.setErrorHandler((error, _request, reply) => {
    hooks.errorHandler++
    reply.send(error)
  })
  app.addHook('onError', async () => { hooks.onError++ })
  app.addHook('onSend', async (_request, reply) => {
    hooks.onSend++
    reply.header('x-on-send', 'ran')
  })
  app.addHook('onResponse', async () => { hooks.onResponse++ })
  const held = heldHandler({ ok: true }, { firstOnly: true })
  app.post('/orders', { config: { idempotency: true } }, held.handler)
  app.post('/broken', async () => { throw new Error('the handler failed') })
  await app.ready()
  const send = (headers: Record<string, string>, payload: object = { item: 'book' }) =>
    app.inject({ method: 'POST', url: '/orders', headers, payload })

  const replies = [await send({}), await send({ 'idempotency-key': 'x'.repeat(300) })]
  const original = send({ 'idempotency-key': 'k' })
  await until(() => held.runs() === 1)
  replies.push(await send({ 'idempotency-key': 'k' }), await send({ 'idempotency-key': 'k' }, { item: 'pen' }))
  held.open()
  t.equal((await original).statusCode, 200)
  store.failing.claim = true
  replies.push(await send({ 'idempotency-key': 'k2' }))
  t.equal(held.runs(), 1, 'the handler ran only for the original')
  await until(() => hooks.onResponse === 6)
  t.equal(hooks.onResponse, 6, 'onResponse hooks ran for the five errors and the original')
  return { app, replies, hooks }
}

test('problem+json: every plugin error is an RFC 9457 document', async (t) => {
  const { app, replies, hooks } = await everyError(t, { errors: 'problem+json' })
  const expected = [
    [400, 'key-missing', 'Idempotency key missing', 'The idempotency-key header is required on this route', 'FST_IDEMPOTENCY_KEY_MISSING'],
    [400, 'key-invalid', 'Idempotency key invalid', 'Invalid idempotency-key header: the key is longer than 255 characters', 'FST_IDEMPOTENCY_KEY_INVALID'],
    [409, 'in-flight', 'Request with this idempotency key in progress', 'A request with this idempotency key is still being processed; retry later', 'FST_IDEMPOTENCY_IN_FLIGHT'],
    [422, 'fingerprint-mismatch', 'Idempotency key reused with a different request', 'This idempotency key was already used with a different request payload', 'FST_IDEMPOTENCY_FINGERPRINT_MISMATCH'],
    [503, 'store-unavailable', 'Idempotency store unavailable', 'The idempotency store is unavailable; the request was not processed, retry later', 'FST_IDEMPOTENCY_STORE_UNAVAILABLE']
  ] as const
  replies.forEach((reply, i) => {
    const [status, type, title, detail, code] = expected[i]
    t.equal(reply.statusCode, status, code)
    t.match(reply.headers['content-type'], /^application\/problem\+json(; charset=utf-8)?$/, `${code}: content-type`)
    t.strictSame(reply.json(), { type: TAG + type, title, status, detail, code }, `${code}: the document; status = the HTTP status`)
    t.equal(reply.headers['retry-after'], status === 409 || status === 503 ? '1' : undefined, `${code}: Retry-After`)
    t.equal(reply.headers['idempotent-replayed'], undefined)
  })

  t.equal(hooks.errorHandler, 0, 'the application\'s error handler is not involved')
  t.equal(hooks.onError, 0, 'nor its onError hooks')
  t.equal(hooks.onSend, 6, 'its onSend hooks run, for the five errors and the original')
  t.ok(replies.every((reply) => reply.headers['x-on-send'] === 'ran'))
  const broken = await app.inject({ method: 'POST', url: '/broken' })
  t.equal(broken.statusCode, 500)
  t.equal(hooks.errorHandler, 1, 'the application\'s own errors still reach its error handler')
  t.match(broken.headers['content-type'], /^application\/json/, 'and keep Fastify\'s shape')
})

test('problem+json: 423 when inFlight.statusCode is 423', async (t) => {
  const { replies } = await everyError(t, { errors: 'problem+json', inFlight: { statusCode: 423 } })
  t.equal(replies[2].statusCode, 423)
  t.match(replies[2].headers['content-type'], /^application\/problem\+json/)
  t.match(replies[2].json(), { type: TAG + 'in-flight', status: 423, code: 'FST_IDEMPOTENCY_IN_FLIGHT' })
  t.equal(replies[2].headers['retry-after'], '1')
})

test('the default, errors: fastify: Fastify\'s shape through the error handler, unchanged', async (t) => {
  for (const options of [{}, { errors: 'fastify' }] as FastifyIdempotencyOptions[]) {
    const { replies, hooks } = await everyError(t, options)
    t.strictSame(replies.map((reply) => reply.statusCode), [400, 400, 409, 422, 503])
    t.strictSame(replies.map((reply) => reply.json()), [
      { statusCode: 400, code: 'FST_IDEMPOTENCY_KEY_MISSING', error: 'Bad Request', message: 'The idempotency-key header is required on this route' },
      { statusCode: 400, code: 'FST_IDEMPOTENCY_KEY_INVALID', error: 'Bad Request', message: 'Invalid idempotency-key header: the key is longer than 255 characters' },
      { statusCode: 409, code: 'FST_IDEMPOTENCY_IN_FLIGHT', error: 'Conflict', message: 'A request with this idempotency key is still being processed; retry later' },
      { statusCode: 422, code: 'FST_IDEMPOTENCY_FINGERPRINT_MISMATCH', error: 'Unprocessable Entity', message: 'This idempotency key was already used with a different request payload' },
      { statusCode: 503, code: 'FST_IDEMPOTENCY_STORE_UNAVAILABLE', error: 'Service Unavailable', message: 'The idempotency store is unavailable; the request was not processed, retry later' }
    ])
    t.ok(replies.every((reply) => reply.headers['content-type'] === 'application/json; charset=utf-8'))
    t.strictSame(replies.map((reply) => reply.headers['retry-after']), [undefined, undefined, '1', undefined, '1'])
    t.equal(hooks.errorHandler, 5, 'each went through the application\'s error handler')
  }
})

test('errors: anything else is refused at registration', async (t) => {
  await t.rejects(build(t, { errors: 'rfc7807' } as unknown as FastifyIdempotencyOptions), {
    code: 'FST_IDEMPOTENCY_INVALID_OPTION',
    message: 'fastify-idempotency: invalid option "errors": must be \'fastify\' or \'problem+json\''
  })
})
