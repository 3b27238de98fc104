/**
 * OpenAPI: with @fastify/swagger registered before the plugin and the routes,
 * the generated spec shows the idempotency header and the plugin's responses
 * on every covered route, and nothing on the others; the route's own schemas
 * win and are never changed in place; requests are answered as without it.
 */
import { test } from 'tap'
import Fastify, { type FastifyInstance, type RouteOptions } from 'fastify'
import fastifySwagger from '@fastify/swagger'
import fastifyIdempotency, { type FastifyIdempotencyOptions } from '../index.js'
import { FlakyStore, heldHandler, until, type Teardown } from './helpers/app.js'

interface Parameter { in: string, name: string, required?: boolean, description?: string, schema: Record<string, unknown> }
interface Operation { parameters?: Parameter[], responses: Record<string, Record<string, unknown>> }
interface Spec { paths: Record<string, Record<string, Operation>>, components?: { schemas?: Record<string, Record<string, unknown>> } }

/** An app with @fastify/swagger (openapi) and then the plugin; `routes` adds the routes; returns the app, ready. */
async function documented (t: Teardown, options: FastifyIdempotencyOptions, routes: (app: FastifyInstance) => void, swagger = true) {
  const app = Fastify()
  t.teardown(() => app.close())
  if (swagger) await app.register(fastifySwagger, { openapi: { info: { title: 'test', version: '1.0.0' } } })
  await app.register(fastifyIdempotency, options)
  routes(app)
  await app.ready()
  return app
}

function operation (app: FastifyInstance, path: string, method = 'post'): Operation {
  const spec = app.swagger() as unknown as Spec
  return spec.paths[path][method]
}

/** The component a response's content refers to, resolved. */
function bodySchema (app: FastifyInstance, response: Record<string, unknown>, type = 'application/json'): Record<string, unknown> {
  const spec = app.swagger() as unknown as Spec
  const ref = (response.content as Record<string, { schema: { $ref: string } }>)[type].schema.$ref
  return spec.components?.schemas?.[ref.replace('#/components/schemas/', '')] as Record<string, unknown>
}

function header (op: Operation, name = 'idempotency-key'): Parameter | undefined {
  return op.parameters?.find((p) => p.in === 'header' && p.name === name)
}

const handler = async () => ({ ok: true })

test('a required route: the header is a required parameter that states the expiry policy and the key rules; 400, 409, 422 and 503 are documented', async (t) => {
  const app = await documented(t, { mode: 'required', key: { maxLength: 100 } }, (app) => app.post('/payments', handler))
  const op = operation(app, '/payments')
  t.match(header(op), {
    required: true,
    schema: { type: 'string' },
    description: /^Names the operation: retries with the same key get the saved response.*replayed for 1 day \(ttl 86400000 ms\).*at most 100 characters/
  })
  t.equal(header(op)?.schema.maxLength, undefined, 'no validating keyword: the plugin checks the key itself')
  t.notMatch(header(op)?.description, /Optional/)
  t.strictSame(Object.keys(op.responses).filter((status) => status !== '200').sort(), ['400', '409', '422', '503'])
  t.match(op.responses['400'].description, /missing or invalid.*FST_IDEMPOTENCY_KEY_MISSING.*FST_IDEMPOTENCY_KEY_INVALID/)
  t.match(op.responses['409'].description, /still being processed.*Retry-After.*FST_IDEMPOTENCY_IN_FLIGHT/)
  t.match(op.responses['422'].description, /different request.*FST_IDEMPOTENCY_FINGERPRINT_MISMATCH/)
  t.match(op.responses['503'].description, /store is unavailable.*FST_IDEMPOTENCY_STORE_UNAVAILABLE/)
  const retryAfter = { 'retry-after': { schema: { type: 'integer', minimum: 1 }, description: /Seconds/ } }
  t.match(op.responses['409'].headers, retryAfter)
  t.match(op.responses['503'].headers, retryAfter)
  t.equal(op.responses['400'].headers, undefined, 'no Retry-After on 400')
  t.equal(op.responses['422'].headers, undefined, 'nor on 422')
  const refs = new Set<string>()
  for (const status of ['400', '409', '422', '503']) {
    const content = op.responses[status].content as Record<string, { schema: { $ref: string } }>
    refs.add(content['application/json'].schema.$ref)
    t.match(bodySchema(app, op.responses[status]), {
      title: 'IdempotencyError',
      type: 'object',
      properties: { statusCode: { type: 'integer' }, code: { type: 'string' }, error: { type: 'string' }, message: { type: 'string' } }
    }, `${status}: Fastify's error shape`)
  }
  t.equal(refs.size, 1, 'one error schema, defined once and referenced')
})

test('the expiry policy and key rules follow the options and the route: ttl null, a route ttl, uuid, pattern', async (t) => {
  const app = await documented(t, { ttl: null, key: { uuid: true, pattern: /^[0-9a-f-]+$/ } }, (app) => {
    app.post('/forever', handler)
    app.post('/week', { config: { idempotency: { ttl: '7d' } } }, handler)
  })
  t.match(header(operation(app, '/forever'))?.description, /A saved response never expires\. The key: at most 255 characters, a UUID, matching \/\^\[0-9a-f-\]\+\$\//)
  t.match(header(operation(app, '/week'))?.description, /replayed for 7 days \(ttl 604800000 ms\)/)
})

test('2xx responses the route documents get the replay header; a route without them gets no body schema added', async (t) => {
  const app = await documented(t, {}, (app) => {
    app.post('/typed', { schema: { response: { 201: { type: 'object', properties: { id: { type: 'integer' } } }, 404: { type: 'object' } } } }, handler)
    app.post('/untyped', handler)
    app.post('/quiet', { config: { idempotency: true } }, handler)
  })
  const typed = operation(app, '/typed')
  t.match(typed.responses['201'].headers, { 'idempotent-replayed': { schema: { type: 'string', enum: ['true'] }, description: /replay/ } })
  t.equal(typed.responses['404'].headers, undefined, 'not on other statuses')
  t.same(Object.keys(operation(app, '/untyped').responses).filter((status) => status.startsWith('2')), [], 'no 2xx schema of its own: none is invented')
  const off = await documented(t, { replayHeader: false }, (app) => app.post('/typed', { schema: { response: { 200: { type: 'object' } } } }, handler))
  t.equal(operation(off, '/typed').responses['200'].headers, undefined, 'replayHeader: false: nothing to document')
})

test('with or without @fastify/swagger, a key at the limit is accepted, quoted or not, and one character more is refused by the plugin', async (t) => {
  for (const swagger of [false, true]) {
    const app = await documented(t, { mode: 'required', key: { maxLength: 20 } }, (app) => app.post('/pay', async () => ({ ok: true })), swagger)
    const send = (key: string) => app.inject({ method: 'POST', url: '/pay', headers: { 'idempotency-key': key } })
    const limit = 'k'.repeat(20)
    for (const [key, status] of [[limit, 200], [`"${limit}"`, 200], [`"${'q\\"'.repeat(6)}kk"`, 200], [limit + 'k', 400], [`"${limit}k"`, 400]] as const) {
      const res = await send(key)
      t.equal(res.statusCode, status, `swagger ${swagger}: ${key} (${key.length} characters as sent)`)
      if (status === 400) t.equal(res.json().code, 'FST_IDEMPOTENCY_KEY_INVALID', 'refused by the plugin, not by Fastify\'s validation')
    }
  }
})

test('an optional route: the header is optional; the 400 is only about invalid keys', async (t) => {
  const app = await documented(t, {}, (app) => app.post('/orders', handler))
  const op = operation(app, '/orders')
  t.match(header(op), { required: false, schema: { type: 'string' }, description: /at most 255 characters.*Optional: without it, the request is not idempotent/ })
  t.match(op.responses['400'].description, /^The idempotency-key header is invalid \(FST_IDEMPOTENCY_KEY_INVALID\)/)
  t.notMatch(op.responses['400'].description, /MISSING/)
})

test('the header name, the in-flight status, fingerprint: false and fail-open shape the docs', async (t) => {
  const app = await documented(t, { header: 'X-Request-Key', inFlight: { statusCode: 423 }, fingerprint: false, onStoreError: 'fail-open' }, (app) => {
    app.post('/plain', handler)
    app.post('/fingerprinted', { config: { idempotency: { fingerprint: true, onStoreError: 'fail-closed' } } }, handler)
    app.post('/decided', { config: { idempotency: { onStoreError: () => 'fail-open' } } }, handler)
  })
  const plain = operation(app, '/plain')
  t.ok(header(plain, 'x-request-key'), 'the configured header, lower-cased')
  t.equal(header(plain), undefined)
  t.ok(plain.responses['423'], '423 instead of 409')
  t.equal(plain.responses['409'], undefined)
  t.equal(plain.responses['422'], undefined, 'fingerprint: false: no 422')
  t.equal(plain.responses['503'], undefined, 'fail-open: no 503')
  const fingerprinted = operation(app, '/fingerprinted')
  t.ok(fingerprinted.responses['422'], 'the route turns fingerprints on')
  t.ok(fingerprinted.responses['503'], 'and is fail-closed')
  t.ok(operation(app, '/decided').responses['503'], 'a function may answer fail-closed: 503 is documented')
})

test('problem+json: the error responses are application/problem+json documents', async (t) => {
  const app = await documented(t, { errors: 'problem+json' }, (app) => app.post('/orders', handler))
  const op = operation(app, '/orders')
  for (const status of ['400', '409', '422', '503']) {
    t.strictSame(Object.keys(op.responses[status].content as object), ['application/problem+json'], status)
    t.match(bodySchema(app, op.responses[status], 'application/problem+json'), {
      title: 'IdempotencyProblem',
      type: 'object',
      properties: { type: { type: 'string' }, title: { type: 'string' }, status: { type: 'integer' }, detail: { type: 'string' }, code: { type: 'string' } }
    })
  }
  t.match(op.responses['409'].headers, { 'retry-after': { schema: { type: 'integer', minimum: 1 } } }, 'Retry-After is still documented')
})

test('the route\'s own schemas win: its 400 response, its header parameters', async (t) => {
  const app = await documented(t, { mode: 'required' }, (app) => {
    app.post('/own', {
      schema: {
        headers: { properties: { 'x-tenant': { type: 'string' } }, required: ['x-tenant'] },
        response: { 400: { description: 'Our own bad request', type: 'object', properties: { why: { type: 'string' } } } }
      }
    }, handler)
  })
  const op = operation(app, '/own')
  t.equal(op.responses['400'].description, 'Our own bad request')
  t.ok(op.responses['409'] && op.responses['422'] && op.responses['503'], 'the others are added')
  t.match(header(op, 'x-tenant'), { required: true }, 'the route\'s header stays, still required')
  t.match(header(op), { required: true })
})

test('exempt and uncovered routes get nothing', async (t) => {
  const app = await documented(t, { mode: 'required', endpoints: ['/api/'] }, (app) => {
    app.post('/api/exempt', { config: { idempotency: false } }, handler)
    app.post('/outside', handler)
    app.get('/api/read', handler)
    app.post('/api/covered', handler)
  })
  for (const [path, method] of [['/api/exempt', 'post'], ['/outside', 'post'], ['/api/read', 'get']]) {
    const op = operation(app, path, method)
    t.equal(op.parameters, undefined, `${method} ${path}: no parameter`)
    t.strictSame(Object.keys(op.responses), ['200'], `${method} ${path}: only the default response`)
  }
  t.ok(header(operation(app, '/api/covered')), 'the covered one does')

  const exempt = await documented(t, { mode: 'exempt' }, (app) => app.post('/orders', handler))
  t.equal(operation(exempt, '/orders').parameters, undefined, 'mode: exempt')
})

test('a headers schema object shared by two routes is not changed; each route gets its own copy', async (t) => {
  const shared = { type: 'object', properties: { 'x-tenant': { type: 'string' } }, required: ['x-tenant'] }
  const response = { 201: { type: 'object', properties: { id: { type: 'integer' } } } }
  const snapshot = structuredClone({ shared, response })
  const app = await documented(t, { mode: 'required' }, (app) => {
    app.post('/a', { schema: { headers: shared, response } }, handler)
    app.post('/b', { config: { idempotency: false }, schema: { headers: shared, response } }, handler)
  })
  t.strictSame({ shared, response }, snapshot, 'the objects the application passed are unchanged')
  t.ok(header(operation(app, '/a')), '/a documents the header')
  t.equal(header(operation(app, '/b')), undefined, '/b, exempt, does not')
  t.match(header(operation(app, '/b'), 'x-tenant'), { required: true })
  const reply = await app.inject({ method: 'POST', url: '/b', headers: { 'x-tenant': 't' } })
  t.equal(reply.statusCode, 200, 'the exempt route does not require the key')
})

test('a headers schema given as a $ref is left as it is; the responses are still added', async (t) => {
  const app = await documented(t, { mode: 'required' }, (app) => {
    app.addSchema({ $id: 'tenant-headers', type: 'object', properties: { 'x-tenant': { type: 'string' } } })
    app.post('/ref', { schema: { headers: { $ref: 'tenant-headers#' } } }, handler)
  })
  const op = operation(app, '/ref')
  t.equal(header(op), undefined)
  t.ok(header(op, 'x-tenant'))
  t.ok(op.responses['409'])
})

test('without @fastify/swagger the route schema is untouched', async (t) => {
  const schema = { body: { type: 'object' } }
  const seen: unknown[] = []
  await documented(t, { mode: 'required' }, (app) => {
    app.addHook('onRoute', (route: RouteOptions) => { seen.push(route.schema) })
    app.post('/with', { schema }, handler)
    app.post('/without', handler)
  }, false)
  t.equal(seen[0], schema, 'the same object')
  t.strictSame(Object.keys(schema), ['body'], 'no headers or responses added')
  t.equal(seen[1], undefined, 'no schema added')
})

test('through the added response schemas the plugin\'s errors still serialize whole', async (t) => {
  for (const errors of ['fastify', 'problem+json'] as const) {
    const bodies: Record<string, Array<Record<string, unknown>>> = {}
    for (const swagger of [false, true]) {
      const store = new FlakyStore()
      t.teardown(() => store.close())
      const slow = heldHandler({ ok: true }, { firstOnly: true })
      const app = await documented(t, { store, errors }, (app) => app.post('/orders', { config: { idempotency: true } }, slow.handler), swagger)
      const send = (headers: Record<string, string>, payload: object = { a: 1 }) => app.inject({ method: 'POST', url: '/orders', headers, payload })
      const replies = [await send({}), await send({ 'idempotency-key': 'x'.repeat(300) })]
      const original = send({ 'idempotency-key': 'k' })
      await until(() => slow.runs() === 1)
      replies.push(await send({ 'idempotency-key': 'k' }), await send({ 'idempotency-key': 'k' }, { a: 2 }))
      slow.open()
      await original
      store.failing.claim = true
      replies.push(await send({ 'idempotency-key': 'k2' }))
      t.strictSame(replies.map((r) => r.statusCode), [400, 400, 409, 422, 503])
      bodies[String(swagger)] = replies.map((r) => r.json())
    }
    t.strictSame(bodies.true, bodies.false, `${errors}: the same bodies with and without @fastify/swagger`)
    for (const body of bodies.true) {
      t.ok(errors === 'fastify' ? body.code && body.message && body.error && body.statusCode : body.code && body.detail && body.type && body.status, `${errors}: ${body.code} whole`)
    }
  }
})

test('a route with methods the plugin does not handle: those are answered as without @fastify/swagger', async (t) => {
  for (const swagger of [false, true]) {
    const app = await documented(t, { mode: 'required' }, (app) => app.route({ method: ['GET', 'POST'], url: '/graphql', handler }), swagger)
    const get = await app.inject({ method: 'GET', url: '/graphql' })
    t.equal(get.statusCode, 200, `swagger ${swagger}: GET needs no key`)
    const longKey = await app.inject({ method: 'GET', url: '/graphql', headers: { 'idempotency-key': 'x'.repeat(300) } })
    t.equal(longKey.statusCode, 200, `swagger ${swagger}: GET ignores the header, however long`)
    t.equal((await app.inject({ method: 'POST', url: '/graphql' })).json().code, 'FST_IDEMPOTENCY_KEY_MISSING', `swagger ${swagger}: POST needs one`)
    if (!swagger) continue
    for (const method of ['get', 'post']) {
      // One schema serves both methods: the header cannot be marked required, so the description says where it is.
      t.match(header(operation(app, '/graphql', method)), { required: false, schema: { type: 'string' }, description: /Required on POST\.$/ }, method)
      t.equal(header(operation(app, '/graphql', method))?.schema.maxLength, undefined)
    }
  }
})

test('the added response schemas do not strip the application\'s own bodies on those statuses', async (t) => {
  for (const errors of ['fastify', 'problem+json'] as const) {
    const app = await documented(t, { errors }, (app) => {
      app.setErrorHandler((error: Error & { code?: string, statusCode?: number }, _request, reply) => {
        reply.code(error.statusCode ?? 500).send({ problem: error.code, detail: error.message })
      })
      app.post('/signup', async (request, reply) => {
        const { email } = request.body as { email: string }
        if (email === 'taken@example.com') return reply.code(409).send({ code: 'EMAIL_TAKEN', message: 'taken', field: 'email' })
        if (email === 'weird') return reply.code(422).type('application/problem+json').send({ type: 'about:blank', status: 422, title: 'Weird', detail: 'weird', invalidParams: ['email'] })
        return { ok: true }
      })
    })
    const conflict = await app.inject({ method: 'POST', url: '/signup', payload: { email: 'taken@example.com' } })
    t.strictSame([conflict.statusCode, conflict.json()], [409, { code: 'EMAIL_TAKEN', message: 'taken', field: 'email' }], `${errors}: the handler's 409`)
    const weird = await app.inject({ method: 'POST', url: '/signup', payload: { email: 'weird' } })
    t.strictSame(weird.json().invalidParams, ['email'], `${errors}: a problem document's extension members`)
    if (errors === 'fastify') {
      const invalid = await app.inject({ method: 'POST', url: '/signup', headers: { 'idempotency-key': 'x'.repeat(300) }, payload: { email: 'a' } })
      t.strictSame(invalid.json(), { problem: 'FST_IDEMPOTENCY_KEY_INVALID', detail: 'Invalid idempotency-key header: the key is longer than 255 characters' },
        'the application\'s error handler reshapes a plugin error')
    }
  }
})
