/**
 * Saving and replaying: a retry gets the same status, headers and body bytes,
 * plus the replay header, without running the handler; what is not stored is
 * released so that a retry runs again.
 */
import { hash } from 'node:crypto'
import { Readable } from 'node:stream'
import { test } from 'tap'
import type { FastifyInstance } from 'fastify'
import { build, capturingLogger, RecordingStore, WARN, type LogLine } from './helpers/app.js'

/** Headers of one transmission, not of the response: they differ between any two replies. */
const IGNORED = new Set(['date', 'connection', 'keep-alive', 'transfer-encoding'])

function comparable (headers: Record<string, unknown>): Record<string, unknown> {
  return Object.fromEntries(Object.entries(headers).filter(([name]) => !IGNORED.has(name)))
}

function post (app: FastifyInstance, url: string, key: string, payload?: unknown) {
  return app.inject({ method: 'POST', url, headers: { 'idempotency-key': key }, ...(payload === undefined ? {} : { payload: payload as string }) })
}

test('a replay has the same status, headers and body bytes, plus the replay header; the handler runs once', async (t) => {
  const store = new RecordingStore()
  t.teardown(() => store.close())
  const app = await build(t, { store })
  let runs = 0
  app.post('/orders', async (_request, reply) => {
    runs++
    reply.code(201)
    reply.header('location', '/orders/42')
    reply.header('x-multi', ['one', 'two'])
    reply.header('cache-control', 'no-store')
    reply.header('x-number', 7)
    return { id: 42, run: runs, text: 'héllo ✓' }
  })
  const first = await post(app, '/orders', 'k', { item: 'book' })
  t.equal(first.statusCode, 201)
  t.equal(first.headers['idempotent-replayed'], undefined)
  for (let i = 0; i < 3; i++) {
    const replay = await post(app, '/orders', 'k', { item: 'book' })
    t.equal(replay.statusCode, 201)
    t.same(replay.rawPayload, first.rawPayload, 'body byte for byte')
    t.same(comparable(replay.headers), { ...comparable(first.headers), 'idempotent-replayed': 'true' }, 'the same headers, and the replay header')
    t.equal(replay.headers['content-length'], String(first.rawPayload.length))
    t.equal(replay.headers['idempotent-replayed'], 'true')
  }
  t.equal(runs, 1)
  t.equal(store.claims.length, 4)
  t.equal(store.completes.length, 1, 'a replay is never saved again')
  t.equal(store.releases.length, 0, 'nor released')
})

test('replayHeader: a custom name, or false for none', async (t) => {
  const custom = await build(t, { replayHeader: 'X-Replayed' })
  custom.post('/', async () => ({ ok: 1 }))
  await post(custom, '/', 'k')
  const replay = await post(custom, '/', 'k')
  t.equal(replay.headers['x-replayed'], 'true')
  t.equal(replay.headers['idempotent-replayed'], undefined)

  const off = await build(t, { replayHeader: false })
  let runs = 0
  off.post('/', async () => ({ run: ++runs }))
  const first = await post(off, '/', 'k')
  const silent = await post(off, '/', 'k')
  t.equal(runs, 1, 'still replayed')
  t.equal(silent.body, first.body)
  t.same(comparable(silent.headers), comparable(first.headers), 'no header marks the replay: the very same headers')
})

test('a replay header set by the handler itself is not saved', async (t) => {
  const store = new RecordingStore()
  t.teardown(() => store.close())
  const app = await build(t, { store, replayHeader: false })
  app.post('/', async (_request, reply) => {
    reply.header('idempotent-replayed', 'false')
    return 'ok'
  })
  await post(app, '/', 'k')
  t.equal(store.completes[0].response.headers['idempotent-replayed'], 'false', 'with replayHeader false, nothing is special')

  const store2 = new RecordingStore()
  t.teardown(() => store2.close())
  const app2 = await build(t, { store: store2 })
  app2.post('/', async (_request, reply) => {
    reply.header('idempotent-replayed', 'false')
    return 'ok'
  })
  await post(app2, '/', 'k')
  t.equal(store2.completes[0].response.headers['idempotent-replayed'], undefined)
  t.equal((await post(app2, '/', 'k')).headers['idempotent-replayed'], 'true')
})

test('replayStatusCode: replays use it and keep the original body; a route may override it', async (t) => {
  const app = await build(t, { replayStatusCode: 409 })
  let runs = 0
  app.post('/plugin', async (_request, reply) => reply.code(201).send({ run: ++runs }))
  app.post('/route', { config: { idempotency: { replayStatusCode: 208 } } }, async () => ({ run: ++runs }))
  app.post('/original', { config: { idempotency: { replayStatusCode: null } } }, async (_request, reply) => reply.code(202).send({ run: ++runs }))
  for (const [url, firstStatus, replayStatus] of [['/plugin', 201, 409], ['/route', 200, 208], ['/original', 202, 202]] as const) {
    const first = await post(app, url, 'k')
    const replay = await post(app, url, 'k')
    t.equal(first.statusCode, firstStatus, url)
    t.equal(replay.statusCode, replayStatus, url)
    t.equal(replay.body, first.body)
    t.equal(replay.headers['idempotent-replayed'], 'true')
  }
  t.equal(runs, 3)
})

test('storeOnStatuses: only those statuses are saved; a route may override them', async (t) => {
  const app = await build(t, { storeOnStatuses: [201] })
  let runs = 0
  const handler = async (request: { query: unknown }, reply: { code: (n: number) => unknown }) => {
    reply.code(Number((request.query as { s: string }).s))
    return { run: ++runs }
  }
  app.post('/plugin', handler)
  app.post('/route', { config: { idempotency: { storeOnStatuses: [202, 299] } } }, handler)
  const twice = async (url: string) => {
    await post(app, url, `k-${url}`)
    return (await post(app, url, `k-${url}`)).headers['idempotent-replayed'] === 'true'
  }
  t.equal(await twice('/plugin?s=201'), true)
  t.equal(await twice('/plugin?s=200'), false)
  t.equal(await twice('/route?s=201'), false, 'the route list replaces the plugin list')
  t.equal(await twice('/route?s=202'), true)
  t.equal(await twice('/route?s=299'), true)
  t.equal(runs, 7, 'one run per stored status, two per unstored one')
})

test('4xx, 5xx and thrown errors release the claim: a retry runs the handler again', async (t) => {
  const store = new RecordingStore()
  t.teardown(() => store.close())
  const app = await build(t, { store })
  const outcomes: Array<(reply: { code: (n: number) => unknown }) => unknown> = [
    (reply) => { reply.code(400); return { error: 'bad' } },
    (reply) => { reply.code(404); return { error: 'missing' } },
    (reply) => { reply.code(500); return { error: 'boom' } },
    (reply) => { reply.code(503); return { error: 'later' } },
    () => { throw Object.assign(new Error('teapot'), { statusCode: 418 }) },
    () => { throw new Error('crash') },
    () => Promise.reject(new Error('rejected')),
    () => ({ ok: true })
  ]
  const statuses: number[] = []
  app.post('/', async (_request, reply) => outcomes[statuses.length](reply))
  app.addHook('onResponse', async (_request, reply) => { statuses.push(reply.statusCode) })
  for (let i = 0; i < outcomes.length; i++) await post(app, '/', 'same-key')
  t.same(statuses, [400, 404, 500, 503, 418, 500, 500, 200], 'every retry ran the handler until one succeeded')
  t.equal(store.releases.length, 7)
  t.equal(store.completes.length, 1)
  const replay = await post(app, '/', 'same-key')
  t.equal(replay.statusCode, 200)
  t.same(replay.json(), { ok: true })
  t.equal(replay.headers['idempotent-replayed'], 'true')
})

test('a sync handler that throws releases the claim', async (t) => {
  const app = await build(t)
  let runs = 0
  app.post('/', function (_request, reply) {
    if (++runs === 1) throw new Error('sync crash')
    reply.send({ run: runs })
  })
  t.equal((await post(app, '/', 'k')).statusCode, 500)
  t.same((await post(app, '/', 'k')).json(), { run: 2 })
  t.same((await post(app, '/', 'k')).json(), { run: 2 })
  t.equal(runs, 2)
})

test('a callback-style handler that answers later is saved', async (t) => {
  const app = await build(t)
  let runs = 0
  app.post('/', function (_request, reply) {
    runs++
    setTimeout(() => reply.code(201).send({ run: runs }), 5)
  })
  const first = await post(app, '/', 'k')
  const replay = await post(app, '/', 'k')
  t.equal(runs, 1)
  t.equal(replay.statusCode, 201)
  t.equal(replay.body, first.body)
})

test('a sync handler returning a value is saved', async (t) => {
  const app = await build(t)
  let runs = 0
  app.post('/', function () { return { run: ++runs } })
  const first = await post(app, '/', 'k')
  const replay = await post(app, '/', 'k')
  t.equal(runs, 1)
  t.equal(replay.body, first.body)
})

test('headers that describe one transmission, cookies and hop-by-hop headers are not saved', async (t) => {
  const store = new RecordingStore()
  t.teardown(() => store.close())
  const app = await build(t, { store, telemetry: true })
  app.post('/', async (_request, reply) => {
    reply.header('set-cookie', ['session=abc; HttpOnly', 'theme=dark'])
    reply.header('date', 'Tue, 01 Jan 2030 00:00:00 GMT')
    reply.header('keep-alive', 'timeout=5')
    reply.header('proxy-authenticate', 'Basic')
    reply.header('upgrade', 'h2c')
    reply.header('x-kept', 'yes')
    reply.header('content-type', 'application/json; charset=utf-8')
    return '{"ok":true}'
  })
  const first = await post(app, '/', 'k')
  t.same(first.headers['set-cookie'], ['session=abc; HttpOnly', 'theme=dark'], 'the first client gets its cookies')
  const saved = store.completes[0].response
  t.same(Object.keys(saved.headers).sort(), ['content-type', 'x-kept'])
  const replay = await post(app, '/', 'k')
  t.equal(replay.headers['set-cookie'], undefined, 'cookies are never replayed')
  t.equal(replay.headers['x-kept'], 'yes')
  t.equal(replay.headers['content-type'], 'application/json; charset=utf-8')
  t.equal(replay.headers['content-length'], String('{"ok":true}'.length))
  t.not(replay.headers.date, 'Tue, 01 Jan 2030 00:00:00 GMT')
  t.equal(replay.body, '{"ok":true}')
})

test('replaySetCookie: true saves set-cookie and replays it', async (t) => {
  const app = await build(t, { replaySetCookie: true })
  let runs = 0
  app.post('/', async (_request, reply) => {
    runs++
    reply.header('set-cookie', ['session=abc; HttpOnly', 'theme=dark'])
    return { ok: true }
  })
  const first = await post(app, '/', 'k')
  const replay = await post(app, '/', 'k')
  t.equal(runs, 1)
  t.equal(replay.headers['idempotent-replayed'], 'true')
  t.same(replay.headers['set-cookie'], first.headers['set-cookie'])
  t.same(replay.headers['set-cookie'], ['session=abc; HttpOnly', 'theme=dark'])
})

test('a replay is sent as stored bytes, never through the route serializer, schema or preSerialization again', async (t) => {
  const app = await build(t)
  let runs = 0
  let serialized = 0
  let preSerialized = 0
  app.post('/', {
    schema: { response: { 201: { type: 'object', properties: { id: { type: 'integer' }, n: { type: 'integer' } } } } },
    serializerCompiler: () => (data) => {
      serialized++
      return `serialized #${serialized}: ${JSON.stringify(data)}`
    },
    preSerialization: async (_request, _reply, payload: unknown) => ({ ...(payload as object), n: ++preSerialized })
  }, async (_request, reply) => {
    reply.code(201)
    return { id: ++runs, secret: 'filtered' }
  })
  const first = await post(app, '/', 'k')
  t.equal(first.body, 'serialized #1: {"id":1,"secret":"filtered","n":1}')
  for (let i = 0; i < 2; i++) {
    const replay = await post(app, '/', 'k')
    t.equal(replay.statusCode, 201)
    t.equal(replay.body, first.body)
    t.equal(replay.headers['content-type'], first.headers['content-type'])
  }
  t.same({ runs, serialized, preSerialized }, { runs: 1, serialized: 1, preSerialized: 1 })
})

test('a replay is not re-serialized by reply.serializer either', async (t) => {
  const app = await build(t)
  let serialized = 0
  app.post('/', async (_request, reply) => {
    reply.serializer((data: unknown) => `<${++serialized}:${JSON.stringify(data)}>`)
    return { a: 1 }
  })
  const first = await post(app, '/', 'k')
  const replay = await post(app, '/', 'k')
  t.equal(first.body, '<1:{"a":1}>')
  t.equal(replay.body, '<1:{"a":1}>')
  t.equal(serialized, 1)
})

test('empty bodies replay empty: 204, 200 with no body, and an empty typed body', async (t) => {
  const app = await build(t)
  let runs = 0
  app.delete('/thing', async (_request, reply) => { runs++; return reply.code(204).send() })
  app.post('/empty', async (_request, reply) => { runs++; return reply.send() })
  app.post('/typed', async (_request, reply) => { runs++; return reply.type('text/plain').send('') })
  const del = () => app.inject({ method: 'DELETE', url: '/thing', headers: { 'idempotency-key': 'd' } })
  const firstDelete = await del()
  const replayDelete = await del()
  t.equal(firstDelete.statusCode, 204)
  t.equal(replayDelete.statusCode, 204)
  t.equal(replayDelete.body, '')
  t.equal(replayDelete.headers['idempotent-replayed'], 'true')
  t.equal(replayDelete.headers['content-type'], undefined)

  const firstEmpty = await post(app, '/empty', 'e')
  const replayEmpty = await post(app, '/empty', 'e')
  t.equal(replayEmpty.statusCode, 200)
  t.equal(replayEmpty.body, '')
  t.same(comparable(replayEmpty.headers), { ...comparable(firstEmpty.headers), 'idempotent-replayed': 'true' })

  const firstTyped = await post(app, '/typed', 't')
  const replayTyped = await post(app, '/typed', 't')
  t.equal(replayTyped.body, '')
  t.equal(replayTyped.headers['content-type'], firstTyped.headers['content-type'])
  t.equal(replayTyped.headers['idempotent-replayed'], 'true')
  t.equal(runs, 3)
})

test('Buffer and text bodies replay byte for byte', async (t) => {
  const app = await build(t)
  const bytes = Buffer.alloc(256)
  for (let i = 0; i < 256; i++) bytes[i] = i
  const text = 'héllo ✓ 🎉\r\n\u0000end'
  let runs = 0
  app.post('/bin', async (_request, reply) => { runs++; return reply.type('application/octet-stream').send(bytes) })
  app.post('/bin-untyped', async () => { runs++; return Buffer.from([0xff, 0x00, 0xfe]) })
  app.post('/text', async (_request, reply) => { runs++; return reply.type('text/plain; charset=utf-8').send(text) })
  app.post('/string', async () => { runs++; return 'plain string' })
  for (const [url, body] of [['/bin', bytes], ['/bin-untyped', Buffer.from([0xff, 0x00, 0xfe])], ['/text', Buffer.from(text)], ['/string', Buffer.from('plain string')]] as const) {
    const first = await post(app, url, 'k')
    const replay = await post(app, url, 'k')
    t.same(first.rawPayload, body, url)
    t.same(replay.rawPayload, body, `${url} replay`)
    t.equal(replay.headers['content-type'], first.headers['content-type'])
    t.equal(replay.headers['idempotent-replayed'], 'true')
  }
  t.equal(runs, 4)
})

test('a streamed reply is sent, not stored; the claim is released and a warning logged', async (t) => {
  const lines: LogLine[] = []
  const store = new RecordingStore()
  t.teardown(() => store.close())
  const app = await build(t, { store }, capturingLogger(lines))
  let runs = 0
  app.post('/', async (_request, reply) => {
    runs++
    reply.type('text/plain')
    return Readable.from(['chunk one, ', 'chunk two'])
  })
  const first = await post(app, '/', 'k')
  t.equal(first.statusCode, 200)
  t.equal(first.body, 'chunk one, chunk two')
  const second = await post(app, '/', 'k')
  t.equal(second.body, 'chunk one, chunk two')
  t.equal(second.headers['idempotent-replayed'], undefined)
  t.equal(runs, 2, 'the claim was released, so the retry ran')
  t.equal(store.completes.length, 0)
  t.equal(store.releases.length, 2)
  const warnings = lines.filter((l) => l.level === WARN && /cannot be saved/.test(l.msg))
  t.equal(warnings.length, 2)
  t.equal(warnings[0].idempotencyKey, 'sha256:' + hash('sha256', store.claims[0].key, 'base64url'), 'named by a hash of its store key')
})

test('a stream sent from a callback-style handler is released too', async (t) => {
  const app = await build(t)
  let runs = 0
  app.post('/', function (_request, reply) {
    runs++
    reply.send(Readable.from(['x']))
  })
  await post(app, '/', 'k')
  await post(app, '/', 'k')
  t.equal(runs, 2)
})

test('a stream with a status outside storeOnStatuses is released without a warning', async (t) => {
  const lines: LogLine[] = []
  const app = await build(t, {}, capturingLogger(lines))
  let runs = 0
  app.post('/', async (_request, reply) => {
    runs++
    reply.code(500)
    return Readable.from(['x'])
  })
  await post(app, '/', 'k')
  await post(app, '/', 'k')
  t.equal(runs, 2)
  t.equal(lines.filter((l) => l.level === WARN && /cannot be saved/.test(l.msg)).length, 0)
})

test('a body that fails to parse never claims the key', async (t) => {
  const store = new RecordingStore()
  t.teardown(() => store.close())
  const app = await build(t, { store })
  let runs = 0
  app.post('/', async () => ({ run: ++runs }))
  const bad = await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k', 'content-type': 'application/json' }, payload: '{"broken' })
  t.equal(bad.statusCode, 400)
  t.equal(store.claims.length, 0)
  const good = await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k', 'content-type': 'application/json' }, payload: '{"ok":1}' })
  t.equal(good.statusCode, 200)
  t.equal(runs, 1)
})

test('schema validation failures never claim the key', async (t) => {
  const store = new RecordingStore()
  t.teardown(() => store.close())
  const app = await build(t, { store })
  let runs = 0
  app.post('/', { schema: { body: { type: 'object', required: ['n'], properties: { n: { type: 'integer' } } } } }, async () => ({ run: ++runs }))
  t.equal((await post(app, '/', 'k', { n: 'x' })).statusCode, 400)
  t.equal(store.claims.length, 0)
  t.equal((await post(app, '/', 'k', { n: 1 })).statusCode, 200)
  t.equal(runs, 1)
})
