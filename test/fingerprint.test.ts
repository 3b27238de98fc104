/**
 * Fingerprints: the same key with a different request (method, URL with query,
 * body) is a 422 and the handler does not run; a client that re-serializes the
 * same JSON still matches.
 */
import { test } from 'tap'
import type { FastifyInstance, FastifyRequest, InjectOptions } from 'fastify'
import { canonicalJson, defaultFingerprint } from '../index.js'
import type { FastifyIdempotencyOptions } from '../index.js'
import { build, gate, until } from './helpers/app.js'

async function counting (t: Parameters<typeof build>[0], options: FastifyIdempotencyOptions = {}) {
  const app = await build(t, options)
  const counter = { runs: 0 }
  app.addContentTypeParser('application/octet-stream', { parseAs: 'buffer' }, (_request, body, done) => done(null, body))
  app.route({ method: ['POST', 'PUT'], url: '/a', handler: async () => ({ run: ++counter.runs }) })
  app.post('/b', async () => ({ run: ++counter.runs }))
  return { app, counter }
}

function send (app: FastifyInstance, options: InjectOptions) {
  return app.inject({ method: 'POST', url: '/a', ...options, headers: { 'idempotency-key': 'k', ...options.headers } })
}

const MISMATCH = {
  statusCode: 422,
  code: 'FST_IDEMPOTENCY_FINGERPRINT_MISMATCH',
  error: 'Unprocessable Entity',
  message: 'This idempotency key was already used with a different request payload'
}

/** Status and parsed body, to compare with `[422, MISMATCH]`. */
function answer (res: Awaited<ReturnType<FastifyInstance['inject']>>): [number, unknown] {
  return [res.statusCode, res.json()]
}

test('a different body, query or body type with the same key is a 422; the handler does not run', async (t) => {
  const cases: Array<[string, InjectOptions, InjectOptions]> = [
    ['JSON body', { payload: { amount: 10 } }, { payload: { amount: 11 } }],
    ['nested JSON', { payload: { a: { b: [1, 2] } } }, { payload: { a: { b: [2, 1] } } }],
    ['query string', { url: '/a?amount=10' }, { url: '/a?amount=11' }],
    ['query order', { url: '/a?x=1&y=2' }, { url: '/a?y=2&x=1' }],
    ['body added', {}, { payload: { a: 1 } }],
    ['text body', { payload: 'one', headers: { 'content-type': 'text/plain' } }, { payload: 'two', headers: { 'content-type': 'text/plain' } }],
    ['binary body', { payload: Buffer.from([1, 2]), headers: { 'content-type': 'application/octet-stream' } }, { payload: Buffer.from([1, 3]), headers: { 'content-type': 'application/octet-stream' } }],
    ['same text, other type', { payload: '{"a":1}', headers: { 'content-type': 'text/plain' } }, { payload: '{"a":1}', headers: { 'content-type': 'application/json' } }],
    ['string vs buffer', { payload: 'ab', headers: { 'content-type': 'text/plain' } }, { payload: 'ab', headers: { 'content-type': 'application/octet-stream' } }]
  ]
  for (const [name, first, second] of cases) {
    const { app, counter } = await counting(t)
    t.equal((await send(app, first)).statusCode, 200, name)
    t.same(answer(await send(app, second)), [422, MISMATCH], name)
    t.equal(counter.runs, 1, `${name}: handler ran once`)
    t.equal((await send(app, first)).headers['idempotent-replayed'], 'true', `${name}: the original request still replays`)
  }
})

test('the same JSON with keys reordered or re-spaced matches and replays', async (t) => {
  const { app, counter } = await counting(t)
  const json = { 'content-type': 'application/json' }
  await send(app, { payload: '{"a":1,"b":{"c":[1,{"x":1,"y":2}],"d":null},"e":"é"}', headers: json })
  for (const payload of [
    '{"b":{"d":null,"c":[1,{"y":2,"x":1}]},"e":"é","a":1}',
    '{ "e" : "\\u00e9", "a" : 1.0,\n "b" : { "c" : [ 1 , { "x" : 1 , "y" : 2 } ], "d" : null } }'
  ]) {
    const res = await send(app, { payload, headers: json })
    t.equal(res.statusCode, 200)
    t.equal(res.headers['idempotent-replayed'], 'true')
  }
  t.equal(counter.runs, 1)
})

test('with the default key encoder another method or path is another key', async (t) => {
  const { app, counter } = await counting(t)
  await send(app, { payload: { a: 1 } })
  t.equal((await send(app, { url: '/b', payload: { a: 1 } })).statusCode, 200)
  t.equal((await send(app, { method: 'PUT', payload: { a: 1 } })).statusCode, 200)
  t.equal(counter.runs, 3)
})

test('with a key encoder that ignores method and path, the fingerprint catches them: 422', async (t) => {
  const { app, counter } = await counting(t, { keyEncoder: ({ key }) => `only:${key}` })
  await send(app, { payload: { a: 1 } })
  t.same(answer(await send(app, { url: '/b', payload: { a: 1 } })), [422, MISMATCH], 'other path')
  t.same(answer(await send(app, { method: 'PUT', payload: { a: 1 } })), [422, MISMATCH], 'other method')
  t.equal(counter.runs, 1)
})

test('fingerprint: false replays the original whatever the new request carries', async (t) => {
  const { app, counter } = await counting(t, { fingerprint: false })
  const first = await send(app, { url: '/a?x=1', payload: { amount: 10 } })
  const second = await send(app, { url: '/a?x=2', payload: { amount: 99 } })
  t.equal(second.statusCode, 200)
  t.equal(second.body, first.body)
  t.equal(second.headers['idempotent-replayed'], 'true')
  t.equal(counter.runs, 1)
})

test('a fingerprint function replaces the default', async (t) => {
  const seen: string[] = []
  const { app, counter } = await counting(t, {
    fingerprint: (request: FastifyRequest) => {
      seen.push(request.url)
      return String(request.headers['x-account'])
    }
  })
  await send(app, { payload: { a: 1 }, headers: { 'x-account': 'A' } })
  const sameAccount = await send(app, { payload: { a: 2 }, headers: { 'x-account': 'A' } })
  t.equal(sameAccount.headers['idempotent-replayed'], 'true', 'body ignored by the custom fingerprint')
  t.same(answer(await send(app, { payload: { a: 1 }, headers: { 'x-account': 'B' } })), [422, MISMATCH], 'other account')
  t.equal(counter.runs, 1)
  t.same(seen, ['/a', '/a', '/a'], 'called once per request, after the body is parsed')
})

test('route overrides: off on one route, on on another, a function on a third', async (t) => {
  const app = await build(t, { fingerprint: false })
  let runs = 0
  app.post('/inherit', async () => ({ run: ++runs }))
  app.post('/on', { config: { idempotency: { fingerprint: true } } }, async () => ({ run: ++runs }))
  app.post('/fn', { config: { idempotency: { fingerprint: (request) => (request.body as { id: string }).id } } }, async () => ({ run: ++runs }))
  const post = (url: string, payload: object) => app.inject({ method: 'POST', url, headers: { 'idempotency-key': 'k' }, payload })
  await post('/inherit', { id: 'x', n: 1 })
  t.equal((await post('/inherit', { id: 'y', n: 2 })).statusCode, 200)
  await post('/on', { id: 'x', n: 1 })
  t.equal((await post('/on', { id: 'x', n: 2 })).statusCode, 422)
  await post('/fn', { id: 'x', n: 1 })
  t.equal((await post('/fn', { id: 'x', n: 2 })).statusCode, 200, 'same id')
  t.equal((await post('/fn', { id: 'y', n: 1 })).statusCode, 422, 'other id')
  t.equal(runs, 3)

  const defaults = await build(t)
  let offRuns = 0
  defaults.post('/off', { config: { idempotency: { fingerprint: false } } }, async () => ({ run: ++offRuns }))
  await defaults.inject({ method: 'POST', url: '/off', headers: { 'idempotency-key': 'k' }, payload: { a: 1 } })
  const off = await defaults.inject({ method: 'POST', url: '/off', headers: { 'idempotency-key': 'k' }, payload: { a: 2 } })
  t.equal(off.headers['idempotent-replayed'], 'true')
  t.equal(offRuns, 1)
})

test('a different request gets 422 also while the original is still in flight', async (t) => {
  const app = await build(t)
  const release = gate()
  let runs = 0
  app.post('/', async () => {
    runs++
    await release.promise
    return { done: true }
  })
  const original = app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' }, payload: { a: 1 } })
  await until(() => runs === 1)
  const other = await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' }, payload: { a: 2 } })
  t.equal(other.statusCode, 422)
  t.equal(other.json().code, 'FST_IDEMPOTENCY_FINGERPRINT_MISMATCH')
  const same = await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' }, payload: { a: 1 } })
  t.equal(same.statusCode, 409, 'the same request gets the in-flight treatment')
  release.open()
  t.equal((await original).statusCode, 200)
  t.equal(runs, 1)
})

test('defaultFingerprint distinguishes body kinds and ignores JSON key order', async (t) => {
  const request = (body: unknown, url = '/p?q=1', method = 'POST') => ({ method, url, body }) as unknown as FastifyRequest
  const none = defaultFingerprint(request(undefined))
  t.equal(defaultFingerprint(request(null)), none, 'null and no body are the same')
  t.match(none, /^[A-Za-z0-9_-]{43}$/, 'a base64url SHA-256')
  const all = [
    none,
    defaultFingerprint(request('{"a":1}')),
    defaultFingerprint(request(Buffer.from('{"a":1}'))),
    defaultFingerprint(request({ a: 1 })),
    defaultFingerprint(request({ a: 1 }, '/p?q=2')),
    defaultFingerprint(request({ a: 1 }, '/p?q=1', 'PUT')),
    defaultFingerprint(request([1, 2])),
    defaultFingerprint(request([2, 1]))
  ]
  t.equal(new Set(all).size, all.length, 'all different')
  t.equal(defaultFingerprint(request({ b: 2, a: 1 })), defaultFingerprint(request({ a: 1, b: 2 })))
  t.equal(defaultFingerprint(request(Buffer.from('xy'))), defaultFingerprint(request(Buffer.from('xy'))))
})

test('canonicalJson: sorted keys at every depth, otherwise what JSON.stringify writes', async (t) => {
  t.equal(canonicalJson({ b: 1, a: { d: [3, { z: 1, y: 2 }], c: null } }), '{"a":{"c":null,"d":[3,{"y":2,"z":1}]},"b":1}')
  t.equal(canonicalJson([]), '[]')
  t.equal(canonicalJson({}), '{}')
  t.equal(canonicalJson([[1], [2, [3]]]), '[[1],[2,[3]]]')
  t.equal(canonicalJson('a"b\\c\n'), JSON.stringify('a"b\\c\n'))
  t.equal(canonicalJson(1.5), '1.5')
  t.equal(canonicalJson(true), 'true')
  t.equal(canonicalJson(null), 'null')
  t.equal(canonicalJson(undefined), 'null')
  t.equal(canonicalJson(NaN), 'null')
  t.equal(canonicalJson({ a: undefined, b: 1, c: () => 1, d: Symbol('s') }), '{"b":1}', 'undefined, functions and symbols are skipped in objects')
  t.equal(canonicalJson({ a: undefined }), '{}')
  t.equal(canonicalJson({ a: 1, b: undefined, c: 2 }), '{"a":1,"c":2}')
  t.equal(canonicalJson([undefined, () => 1, 1]), '[null,null,1]', 'and written as null in arrays')
  const date = new Date('2024-05-06T07:08:09.010Z')
  t.equal(canonicalJson(date), '"2024-05-06T07:08:09.010Z"')
  t.equal(canonicalJson({ when: date }), '{"when":"2024-05-06T07:08:09.010Z"}')
  t.equal(canonicalJson({ toJSON: () => ({ z: 1, a: 2 }) }), '{"a":2,"z":1}', 'a toJSON result is canonicalized too')
  t.equal(canonicalJson({ é: 1, e: 2, E: 3, 10: 4, 9: 5 }), '{"10":4,"9":5,"E":3,"e":2,"é":1}', 'keys sorted by code unit')
  t.equal(canonicalJson({ 'a"b': 1 }), '{"a\\"b":1}', 'keys are escaped')
  const tricky = { list: [{ b: 1, a: [true, false, null] }], s: 'x', n: -0.5 }
  t.same(JSON.parse(canonicalJson(tricky)), tricky, 'round-trips')
})
