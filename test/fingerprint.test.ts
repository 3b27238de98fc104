/**
 * Fingerprints: the same key with a different request (method, URL with query,
 * body) is a 422 and the handler does not run; a client that re-serializes the
 * same JSON still matches. Any body a parser produces is fingerprinted without
 * failing the request: its canonical text, kind by kind, and keyed requests
 * through real apps (multipart, BigInt JSON, 20 000-deep JSON, 10 MiB JSON).
 */
import './helpers/crash-guard.js'
import { createHash } from 'node:crypto'
import { Readable } from 'node:stream'
import { test } from 'tap'
import type { Test } from 'tap'
import fc from 'fast-check'
import Fastify from 'fastify'
import multipart from '@fastify/multipart'
import type { FastifyInstance, FastifyRequest, InjectOptions } from 'fastify'
import fastifyIdempotency, { MemoryStore, canonicalJson, defaultFingerprint } from '../index.js'
import { LOCAL_TEXT, isDefaultFingerprint, localFingerprint } from '../lib/fingerprint.js'
import { localKeyEncoder } from '../lib/key-encoder.js'
import type { FastifyIdempotencyOptions } from '../index.js'
import { build, heldHandler, until } from './helpers/app.js'

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
    ['string vs buffer', { payload: 'ab', headers: { 'content-type': 'text/plain' } }, { payload: 'ab', headers: { 'content-type': 'application/octet-stream' } }],
    // Past LOCAL_TEXT, the memory store keeps the hash: the hashed form still tells them apart.
    ['long JSON body', { payload: { note: 'n'.repeat(200), amount: 10 } }, { payload: { note: 'n'.repeat(200), amount: 11 } }],
    ['long text body', { payload: 'n'.repeat(200) + '1', headers: { 'content-type': 'text/plain' } }, { payload: 'n'.repeat(200) + '2', headers: { 'content-type': 'text/plain' } }]
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
  const release = heldHandler({ done: true })
  app.post('/', release.handler)
  const original = app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' }, payload: { a: 1 } })
  await until(() => release.runs() === 1)
  const other = await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' }, payload: { a: 2 } })
  t.equal(other.statusCode, 422)
  t.equal(other.json().code, 'FST_IDEMPOTENCY_FINGERPRINT_MISMATCH')
  const same = await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' }, payload: { a: 1 } })
  t.equal(same.statusCode, 409, 'the same request gets the in-flight treatment')
  release.open()
  t.equal((await original).statusCode, 200)
  t.equal(release.runs(), 1)
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

// ---- The canonical text, kind by kind ----

/** The reference: JSON.stringify with object keys sorted at every depth, written the plain recursive way. */
function sortedJson (value: unknown): string {
  if (Array.isArray(value)) return '[' + value.map((item) => item === undefined ? 'null' : sortedJson(item)).join(',') + ']'
  if (typeof value === 'object' && value !== null) {
    const object = value as Record<string, unknown>
    return '{' + Object.keys(object).sort().filter((key) => object[key] !== undefined)
      .map((key) => JSON.stringify(key) + ':' + sortedJson(object[key])).join(',') + '}'
  }
  return JSON.stringify(value) ?? 'null'
}

/** The same value with every object's keys inserted in reverse order. */
function reversed (value: unknown): unknown {
  if (Array.isArray(value)) return value.map(reversed)
  if (typeof value !== 'object' || value === null) return value
  const out: Record<string, unknown> = {}
  for (const key of Object.keys(value).reverse()) {
    // Defined, not assigned: an own `__proto__` key stays a key.
    Object.defineProperty(out, key, { value: reversed((value as Record<string, unknown>)[key]), enumerable: true, writable: true, configurable: true })
  }
  return out
}

/** Records as a JSON API sends them, parsed: enough of them to make a large body. */
function records (count: number): unknown[] {
  return JSON.parse(JSON.stringify(Array.from({ length: count }, (_, i) => ({
    id: i, name: `item "${i}"\n`, price: i * 0.25, tags: ['a', 'b'], active: i % 2 === 0, note: null
  })))) as unknown[]
}

const sha = (...parts: Array<string | Uint8Array>): string => {
  const digest = createHash('sha256')
  for (const part of parts) digest.update(part)
  return digest.digest('base64url')
}
const HEAD = 'POST /p?q=1\n'
const request = (body: unknown) => ({ method: 'POST', url: '/p?q=1', body }) as unknown as FastifyRequest

test('canonicalJson of any JSON value is JSON.stringify with sorted keys, whatever the key order', async (t) => {
  fc.assert(fc.property(fc.jsonValue(), (value) => {
    const text = canonicalJson(value)
    return text === sortedJson(value) && canonicalJson(reversed(value)) === text
  }), { numRuns: 500 })
  fc.assert(fc.property(fc.string({ unit: 'binary' }), (text) => canonicalJson(text) === JSON.stringify(text)), { numRuns: 500 })
  t.equal(canonicalJson(['\u2028', '\ud800', '\ud83d\ude00', '\u0001', '\u007f', '"\\']), JSON.stringify(['\u2028', '\ud800', '\ud83d\ude00', '\u0001', '\u007f', '"\\']), 'escapes as JSON.stringify does')
  t.equal(canonicalJson([1, -0, 1.5e300, 1e21, NaN, Infinity, -Infinity]), '[1,0,1.5e+300,1e+21,null,null,null]')
  t.equal(canonicalJson(Object.assign(Object.create(null), { b: 1, a: 2 })), '{"a":2,"b":1}', 'an object without prototype is an object')
  t.equal(canonicalJson(new (class Point { x = 1; y = 2 })()), '{"x":1,"y":2}', 'a class instance is its own enumerable properties, as in JSON')
  t.equal(canonicalJson('!bigint(1)'), '"!bigint(1)"', 'a string that looks like a token is still a string')
})

test('large JSON bodies (written by JSON.stringify in pieces) have the same canonical text', async (t) => {
  fc.assert(fc.property(fc.array(fc.jsonValue({ maxDepth: 2 }), { minLength: 2100, maxLength: 2200 }), (value) => {
    return canonicalJson(value) === sortedJson(value) && canonicalJson(reversed(value)) === sortedJson(value)
  }), { numRuns: 4 })
  const list = records(5000)
  t.equal(canonicalJson(list), sortedJson(list), 'an array of records')
  t.equal(canonicalJson(reversed(list)), sortedJson(list), 'the same records with their keys in another order')
  const wide: Record<string, unknown> = {}
  for (let i = 0; i < 3000; i++) wide[`k${i}`] = [i, { v: i, u: 'x' }]
  t.equal(canonicalJson(wide), sortedJson(wide), 'an object with thousands of keys')
  t.equal(canonicalJson({ list, wide, deep: { list: [records(1500)] } }), sortedJson({ list, wide, deep: { list: [records(1500)] } }), 'large containers inside large containers')
  let deep: unknown = records(3)
  for (let i = 0; i < 300; i++) deep = { level: i, next: deep, z: [i] }
  t.equal(canonicalJson([deep, records(3000)]), sortedJson([deep, records(3000)]), 'a large body with a deep branch')
  const numbers = Array.from({ length: 100_000 }, (_, i) => i % 7 === 0 ? -i / 3 : i)
  t.equal(canonicalJson(numbers), JSON.stringify(numbers), 'a long array of numbers')
})

test('large bodies that are not plain JSON are written whole by the general walk', async (t) => {
  const list = records(3000)
  const text = sortedJson(list)
  t.equal(canonicalJson({ a: list, b: 1n }), `{"a":${text},"b":!bigint(1)}`, 'a BigInt after the records')
  t.equal(canonicalJson([list, new Date(0)]), `[${text},"1970-01-01T00:00:00.000Z"]`, 'a Date (through its toJSON)')
  t.equal(canonicalJson(new Map(list.map((item, i) => [i, item]))), `!map[${list.map((item, i) => `[${i},${sortedJson(item)}]`).join(',')}]`, 'a large Map')
  const parsed = JSON.parse(`[{"__proto__":{"x":1},"a":1},${JSON.stringify(list).slice(1)}`) as unknown
  t.equal(canonicalJson(parsed), `[{"__proto__":{"x":1},"a":1},${text.slice(1)}`, 'an own __proto__ key is written as the key it is, and only where it is')
  const withRepeat = [...list, list[5]]
  t.equal(canonicalJson(withRepeat), `${text.slice(0, -1)},!ref[5]]`, 'a repeated record')
  const unique = Array.from({ length: 5000 }, (_, i) => ({ [`key${i}`]: i }))
  t.equal(canonicalJson(unique), sortedJson(unique), 'thousands of distinct keys')
  const manyPieces: Record<string, unknown> = { many: Object.fromEntries(Array.from({ length: 200 }, (_, i) => [`w${i}`, i])) }
  for (let i = 0; i < 5000; i++) manyPieces[`k${i}`] = [i]
  t.equal(canonicalJson(manyPieces), sortedJson(manyPieces), 'many small pieces and many distinct keys in them')
  class Row { constructor (readonly id: number) {} }
  t.equal(canonicalJson([...list, new Row(7)]), `${text.slice(0, -1)},{"id":7}]`, 'a class instance')
  class Source { pipe () { return this } }
  t.equal(canonicalJson([...list, [new Source()]]), `${text.slice(0, -1)},[!stream]]`, 'a stream')
  const listOf = class extends Array {}
  const subclassed = listOf.from(list)
  t.equal(canonicalJson(subclassed), text, 'an Array subclass')
  const withToJSON = Object.assign([1], { toJSON: () => new Map([['a', 1]]) })
  t.equal(canonicalJson([...list, [withToJSON]]), `${text.slice(0, -1)},[!map[["a",1]]]]`, 'an array with its own toJSON')
  const throwing = [...records(3000)]
  Object.defineProperty(throwing[2999], 'zz', { enumerable: true, get () { throw new Error('getter') } })
  t.equal(canonicalJson(throwing), `${text.slice(0, -2)},"zz":!throws}]`, 'a getter that throws')
  t.equal(canonicalJson([...list, () => 1, Symbol('s'), undefined]), `${text.slice(0, -1)},null,null,null]`, 'functions, symbols and undefined in an array')
  const fickle = () => {
    let reads = 0
    return { get once () { if (++reads > 1) throw new Error('read twice'); return 1 } }
  }
  t.equal(canonicalJson([...list, fickle(), [fickle()]]), `${text.slice(0, -1)},!throws,!throws]`, 'a getter that throws only after the survey read it: the small part holding it')
})

test('BigInt: !bigint(digits), never the number or the string of the same digits', async (t) => {
  t.equal(canonicalJson(1n), '!bigint(1)')
  t.equal(canonicalJson({ a: -12345678901234567890n, b: [0n] }), '{"a":!bigint(-12345678901234567890),"b":[!bigint(0)]}')
  const prototype = BigInt.prototype as { toJSON?: () => string }
  prototype.toJSON = function (this: bigint) { return String(this) }
  t.teardown(() => { delete prototype.toJSON })
  t.equal(canonicalJson({ a: 5n }), '{"a":!bigint(5)}', 'a global BigInt toJSON changes nothing')
  const kinds = [1n, 1, '1'].map((body) => defaultFingerprint(request({ n: body })))
  t.equal(new Set(kinds).size, 3, '1n, 1 and "1" are three different bodies')
})

test('bytes: !bytes(hex) of the bytes the view covers, whatever holds them; never a string', async (t) => {
  t.equal(canonicalJson(Buffer.from('hi')), '!bytes(6869)')
  t.equal(canonicalJson({ b: Buffer.alloc(0) }), '{"b":!bytes()}')
  t.equal(canonicalJson(Buffer.from('xaby').subarray(1, 3)), '!bytes(6162)', 'only the bytes of a slice')
  t.equal(canonicalJson(new Uint16Array([1, 256])), '!bytes(01000001)', 'a typed array as its memory')
  const memory = new Uint8Array([1, 2, 3, 4])
  t.equal(canonicalJson(new DataView(memory.buffer, 1, 2)), '!bytes(0203)')
  t.equal(canonicalJson(memory.buffer), '!bytes(01020304)', 'an ArrayBuffer')
  const shared = new SharedArrayBuffer(2)
  new Uint8Array(shared).set([255, 0])
  t.equal(canonicalJson(shared), '!bytes(ff00)', 'a SharedArrayBuffer')
  const large = Buffer.alloc(200_000, 0xab)
  t.equal(canonicalJson({ file: large }), `{"file":!bytes(${large.toString('hex')})}`, 'a large buffer')
  t.equal(defaultFingerprint(request({ file: large })), sha(HEAD + 'j' + canonicalJson({ file: large })), 'hashed chunk by chunk to the same digest')
  t.not(canonicalJson({ b: Buffer.from('hi') }), canonicalJson({ b: 'hi' }), 'a Buffer is not the string of the same text')
  t.equal(canonicalJson({ b: new Uint8Array([104, 105]) }), canonicalJson({ b: Buffer.from('hi') }), 'a Uint8Array is the Buffer of the same bytes')
})

test('toJSON: called with its key as JSON.stringify calls it, its result written without a second toJSON', async (t) => {
  const key = { toJSON: (name: string) => `key:${name}` }
  t.equal(canonicalJson([key, { k: key }, key]), JSON.stringify([key, { k: key }, key]))
  t.equal(canonicalJson(key), '"key:"', 'the root gets the empty key')
  t.equal(canonicalJson({ a: { toJSON: () => undefined }, b: 1 }), '{"b":1}', 'a toJSON returning undefined leaves the property out')
  t.equal(canonicalJson([{ toJSON: () => undefined }]), '[null]')
  const self = { a: 1, toJSON () { return this } }
  t.equal(canonicalJson(self), '{"a":1}', 'a toJSON returning its object does not loop')
  const twice = { toJSON: () => ({ toJSON: () => 'never', z: 1, a: 2 }) }
  t.equal(canonicalJson(twice), '{"a":2,"z":1}', 'what toJSON returns is not asked again')
  t.equal(canonicalJson({ toJSON: () => Buffer.from('x') }), '!bytes(78)', 'a toJSON returning bytes')
  t.equal(canonicalJson({ toJSON: 1, a: 1 }), '{"a":1,"toJSON":1}', 'a toJSON that is not a function is data')
})

test('Map and Set: their entries in insertion order, tagged', async (t) => {
  const inner = { k: 1 }
  t.equal(canonicalJson(new Map<unknown, unknown>([['b', 1], [inner, undefined], [2n, new Set([1, 'a', { z: 1, y: 2 }])]])),
    '!map[["b",1],[{"k":1},null],[!bigint(2),!set[1,"a",{"y":2,"z":1}]]]')
  t.equal(canonicalJson({ m: new Map(), s: new Set() }), '{"m":!map[],"s":!set[]}')
  t.not(canonicalJson(new Map([['a', 1], ['b', 2]])), canonicalJson(new Map([['b', 2], ['a', 1]])), 'the order of the entries counts')
  t.not(canonicalJson(new Set([1, 2])), canonicalJson([1, 2]), 'a Set is not an array')
  t.not(canonicalJson(new Map([['a', 1]])), canonicalJson({ a: 1 }), 'a Map is not an object')
  class Hiding extends Map<string, number> {
    override entries (): MapIterator<[string, number]> { return new Map<string, number>().entries() }
  }
  t.equal(canonicalJson(new Hiding([['a', 1]])), '!map[["a",1]]', 'the real entries, whatever a subclass says')
})

test('boxed primitives are unwrapped as JSON.stringify unwraps them', async (t) => {
  // eslint-disable-next-line no-new-wrappers -- boxed values are what this tests
  const boxed = [new Number(1.5), new String('a"b'), new Boolean(false)]
  t.equal(canonicalJson(boxed), JSON.stringify(boxed))
  t.equal(canonicalJson(Object(2n)), '!bigint(2)')
  t.equal(canonicalJson({ s: Object(Symbol('s')) }), '{"s":{}}', 'a boxed Symbol is an object, as in JSON')
})

test('streams are !stream: their bytes are not read; a plain object with a pipe function is data', async (t) => {
  const stream = Readable.from(['secret'])
  t.equal(canonicalJson({ file: stream, web: new ReadableStream() }), '{"file":!stream,"web":!stream}')
  t.equal(defaultFingerprint(request({ file: Readable.from(['a']) })), defaultFingerprint(request({ file: Readable.from(['b']) })), 'two streams are the same body')
  t.same(await stream.toArray(), ['secret'], 'the stream is left whole for the handler')
  class Tap { data = 1; pipe () { return this } }
  t.equal(canonicalJson(new Tap()), '!stream', 'a class instance with pipe')
  t.equal(canonicalJson({ pipe () { return 1 }, data: 1 }), '{"data":1}', 'an object literal is its data')
})

test('repeats and cycles are !ref[path to where the object was first written]', async (t) => {
  const node: Record<string, unknown> = { name: 'a' }
  node.self = node
  t.equal(canonicalJson(node), '{"name":"a","self":!ref[]}')
  const first = { v: 1 }
  t.equal(canonicalJson({ list: [first, first], other: first }), '{"list":[{"v":1},!ref["list",0]],"other":!ref["list",0]}')
  t.equal(canonicalJson(new Map([['a', first], ['b', first]])), '!map[["a",{"v":1}],["b",!ref[0,1]]]', 'inside a Map: entry, then 0 for the key or 1 for the value')
  const items = Array.from({ length: 20 }, (_, i) => ({ i }))
  const listed = items.map((item) => sortedJson(item))
  listed[17] = '!ref["again"]'
  t.equal(canonicalJson({ items, again: items[17] }), `{"again":{"i":17},"items":[${listed.join(',')}]}`, 'past the first sixteen containers too')
  let laughs: unknown[] = []
  for (let i = 0; i < 2; i++) laughs = [laughs, laughs]
  t.equal(canonicalJson(laughs), '[[[],!ref[0,0]],!ref[0]]')
  for (let i = 0; i < 98; i++) laughs = [laughs, laughs]
  t.ok(canonicalJson(laughs).length < 30_000, 'a body of shared references is never expanded (2^100 arrays)')
})

/** `value` as the general walk writes it: next to a Map, which the short walk never takes, whatever its limits. */
const generally = (value: unknown): string => canonicalJson([value, new Map()]).slice(1, -',!map[]]'.length)

test('small bodies: the short walk writes what the general walk writes, or leaves the body to it', async (t) => {
  t.equal(generally({ b: 1, a: [2] }), '{"a":[2],"b":1}', 'next to a Map, a body goes the general way')
  fc.assert(fc.property(fc.anything({ withBigInt: true, withBoxedValues: true, withMap: true, withSet: true, withNullPrototype: true, withObjectString: true, withSparseArray: true, withTypedArray: true, withDate: true, withUnicodeString: true }), (value) => {
    return canonicalJson(value) === generally(value)
  }), { numRuns: 1000 })
  const shared = { x: 1 }
  t.equal(canonicalJson({ a: shared, b: shared }), '{"a":{"x":1},"b":!ref["a"]}', 'a container met twice')
  const nested: unknown[] = []
  let inner = nested
  for (let i = 0; i < 20; i++) inner = (inner[0] = [i]) as unknown[]
  t.equal(canonicalJson(nested), generally(nested), 'more containers than the short walk takes')
  const wide = Object.fromEntries(Array.from({ length: 40 }, (_, i) => [`k${40 - i}`, i]))
  t.equal(canonicalJson(wide), generally(wide), 'more keys than the short walk takes')
  t.equal(canonicalJson(JSON.parse('{"b":1,"__proto__":{"x":1}}')), '{"__proto__":{"x":1},"b":1}', 'an own __proto__ key is data')
  t.equal(canonicalJson({ a: [undefined, 1], b: undefined, c: 'é"' }), '{"a":[null,1],"c":"é\\""}', 'undefined as JSON.stringify writes it')
  const reentrant = { z: 1, get a () { return canonicalJson({ y: 1, x: [2] }) } }
  t.equal(canonicalJson(reentrant), '{"a":"{\\"x\\":[2],\\"y\\":1}","z":1}', 'a getter that asks for a canonical text meanwhile')
  t.equal(canonicalJson({ b: 2, a: 1 }), '{"a":1,"b":2}', 'and the next body is written from a clean start')
})

test('what throws while being read is !throws, in its place', async (t) => {
  const fail = () => { throw new Error('read') }
  t.equal(canonicalJson({ a: 1, get bad () { return fail() } }), '{"a":1,"bad":!throws}', 'a getter')
  const list = [1, 2, 3]
  Object.defineProperty(list, 1, { get: fail })
  t.equal(canonicalJson(list), '[1,!throws,3]', 'an array index getter')
  t.equal(canonicalJson({ when: { toJSON: fail } }), '{"when":!throws}', 'a toJSON')
  t.equal(canonicalJson({ p: new Proxy({}, { ownKeys: fail }) }), '{"p":!throws}', 'a Proxy ownKeys trap')
  t.equal(canonicalJson({ p: new Proxy({}, { getPrototypeOf: fail }) }), '{"p":!throws}', 'a Proxy getPrototypeOf trap')
  t.equal(canonicalJson({ p: new Proxy({ a: 1 }, { get: fail }) }), '{"p":!throws}', 'a Proxy get trap (its toJSON is read first)')
  const revocable = Proxy.revocable({}, {})
  revocable.revoke()
  t.equal(canonicalJson([revocable.proxy]), '[!throws]', 'a revoked Proxy')
  const everything = new Proxy({}, { get: fail, ownKeys: fail, getPrototypeOf: fail, has: fail, getOwnPropertyDescriptor: fail })
  t.equal(canonicalJson(everything), '!throws')
  t.equal(defaultFingerprint(request(everything)), sha(HEAD + 'j!throws'))
})

test('20 000-deep bodies are written without recursion', async (t) => {
  const arrays = '['.repeat(20_000) + ']'.repeat(20_000)
  t.equal(canonicalJson(JSON.parse(arrays)), arrays)
  const objects = '{"b":2,"a":'.repeat(20_000) + 'null' + '}'.repeat(20_000)
  const sorted = '{"a":'.repeat(20_000) + 'null' + ',"b":2}'.repeat(20_000)
  t.equal(canonicalJson(JSON.parse(objects)), sorted, 'keys sorted at every level')
  t.equal(defaultFingerprint(request(JSON.parse(objects))), sha(HEAD + 'j' + sorted))
})

test('defaultFingerprint: SHA-256 of the head and the body by kind, the same digest however it is streamed', async (t) => {
  t.equal(defaultFingerprint(request(undefined)), sha(HEAD))
  t.equal(defaultFingerprint(request('text')), sha(HEAD + 's' + 'text'))
  t.equal(defaultFingerprint(request(Buffer.from('ab'))), sha(HEAD + 'b', Buffer.from('ab')))
  for (const bytes of [new Uint8Array([97, 98]), new Uint8Array([97, 98]).buffer, new DataView(new Uint8Array([0, 97, 98]).buffer, 1)]) {
    t.equal(defaultFingerprint(request(bytes)), sha(HEAD + 'b', Buffer.from('ab')), `a ${bytes.constructor.name} body is its bytes`)
  }
  const bodies: unknown[] = [
    { a: 1 }, [1, 'x'], 0, false, 1n,
    records(5000), // large plain JSON: several chunks
    { text: 'y'.repeat(300_000), more: ['z'.repeat(70_000)] }, // a few values, long text
    ['y'.repeat(70_000), ...records(3000)], // text handed on before the body turns out large
    [...records(3000), 1n], // large, general walk
    Readable.from([])
  ]
  for (const body of bodies) t.equal(defaultFingerprint(request(body)), sha(HEAD + 'j' + canonicalJson(body)))
  t.equal(defaultFingerprint(request(records(5000))), sha(HEAD + 'j' + sortedJson(records(5000))), 'plain JSON: the hash of its sorted JSON, as before')
})

test('localFingerprint (the memory store\'s): the text the default hashes, up to LOCAL_TEXT characters; the default\'s hash beyond', async (t) => {
  t.equal(localFingerprint(request(undefined)), HEAD)
  t.equal(localFingerprint(request('text')), HEAD + 's' + 'text')
  t.equal(localFingerprint(request({ b: 1, a: [1] })), HEAD + 'j' + '{"a":[1],"b":1}', 'the canonical text')
  t.equal(localFingerprint(request(Buffer.from('ab'))), defaultFingerprint(request(Buffer.from('ab'))), 'bytes: always hashed')
  const fits = 'x'.repeat(LOCAL_TEXT - HEAD.length - 1)
  t.equal(localFingerprint(request(fits)), HEAD + 's' + fits, 'exactly LOCAL_TEXT characters: kept')
  t.equal(localFingerprint(request(fits + 'x')), defaultFingerprint(request(fits + 'x')), 'one more: the default\'s hash')
  t.equal(localFingerprint(request(records(5000))), defaultFingerprint(request(records(5000))), 'a large body, hashed in chunks, as the default')
  const failing = { method: 'POST', url: '/p?q=1', get body () { throw new Error('body') } } as unknown as FastifyRequest
  t.equal(localFingerprint(failing), defaultFingerprint(failing), '!throws: hashed')
  t.ok(isDefaultFingerprint(defaultFingerprint) && isDefaultFingerprint(localFingerprint) && !isDefaultFingerprint(() => 'x'))
  // The two forms never meet: a kept text has the head's space and line break; a hash is base64url.
  fc.assert(fc.property(fc.string({ maxLength: 200 }), fc.string({ maxLength: 200 }), (a, b) => {
    const [fa, fb] = [localFingerprint(request(a)), localFingerprint(request(b))]
    return (fa === fb) === (a === b) && (fa.startsWith(HEAD) !== /^[\w-]{43}$/.test(fa))
  }), { numRuns: 500 })
})

test('through the plugin: the memory store keeps a short fingerprint as its text', async (t) => {
  const store = new MemoryStore()
  t.teardown(() => store.close())
  const app = await build(t, { store })
  app.post('/p', async () => ({ ok: true }))
  await app.inject({ method: 'POST', url: '/p?q=1', payload: { a: 1 }, headers: { 'idempotency-key': 'k' } })
  const key = localKeyEncoder({ scope: undefined, method: 'POST', path: '/p', key: 'k' })
  t.equal(store.lookup(key)?.fingerprint, HEAD + 'j{"a":1}')
})

test('defaultFingerprint never throws: a body that cannot be read is !throws, a broken request a constant', async (t) => {
  const failing = { method: 'POST', url: '/p?q=1', get body () { throw new Error('body') } } as unknown as FastifyRequest
  t.equal(defaultFingerprint(failing), sha(HEAD + 'j!throws'))
  const broken = { method: 'POST', get url () { throw new Error('url') } } as unknown as FastifyRequest
  t.equal(defaultFingerprint(broken), sha('!throws'))
})

/** The body @fastify/multipart leaves with attachFieldsToBody: true. */
async function multipartBody (t: Test, form: FormData): Promise<unknown> {
  const app = Fastify()
  t.teardown(() => app.close())
  await app.register(multipart, { attachFieldsToBody: true })
  let body: unknown
  app.post('/', async (req) => {
    body = req.body
    return {}
  })
  await app.inject({ method: 'POST', url: '/', payload: form })
  return body
}

function photoForm (title: string, bytes: string, filename = 'p.jpg'): FormData {
  const form = new FormData()
  form.append('title', title)
  form.append('photo', new Blob([Buffer.from(bytes)]), filename)
  return form
}

test('a multipart body: the file part as its bytes, its stream a marker, its back-reference a !ref', async (t) => {
  const body = await multipartBody(t, photoForm('hi', 'abc'))
  const text = canonicalJson(body)
  t.match(text, /^\{"photo":\{"_buf":!bytes\(616263\),.*"fieldname":"photo","fields":!ref\[\],"file":!stream,"filename":"p\.jpg",.*"type":"file"\},"title":\{.*"fields":!ref\[\],.*"value":"hi",.*\}\}$/)
  const fingerprint = defaultFingerprint(request(body))
  t.equal(defaultFingerprint(request(await multipartBody(t, photoForm('hi', 'abc')))), fingerprint, 'the same form again')
  t.not(defaultFingerprint(request(await multipartBody(t, photoForm('hi', 'abd')))), fingerprint, 'other file bytes')
  t.not(defaultFingerprint(request(await multipartBody(t, photoForm('ho', 'abc')))), fingerprint, 'another field value')
  t.not(defaultFingerprint(request(await multipartBody(t, photoForm('hi', 'abc', 'q.jpg')))), fingerprint, 'another file name')
})

// ---- Keyed requests through real apps: each runs as it would without a key ----

/** An app with the plugin and one counted POST route, set up by `setup`. */
async function appWith (t: Test, setup: (app: FastifyInstance, count: () => void) => void | Promise<void>) {
  const app = Fastify()
  t.teardown(() => app.close())
  await app.register(fastifyIdempotency)
  const counter = { runs: 0 }
  await setup(app, () => { counter.runs++ })
  return { app, counter }
}

/**
 * Without a key, then with one: the same answer; a retry replays it without
 * running the handler; another body with the same key is a 422.
 */
async function keyedRunsLikeUnkeyed (t: Test, app: FastifyInstance, counter: { runs: number }, same: () => InjectOptions, other: () => InjectOptions) {
  const unkeyed = await app.inject(same())
  t.equal(unkeyed.statusCode, 200, 'without a key')
  const keyed = await app.inject(withKey(same()))
  t.equal(keyed.statusCode, 200, 'with a key')
  t.equal(keyed.body, unkeyed.body, 'the same answer')
  t.equal(keyed.headers['idempotent-replayed'], undefined)
  const retry = await app.inject(withKey(same()))
  t.equal(retry.headers['idempotent-replayed'], 'true', 'a retry is replayed')
  t.equal(retry.body, keyed.body)
  t.same(answer(await app.inject(withKey(other()))), [422, MISMATCH], 'another body with the same key')
  t.equal(counter.runs, 2, 'the handler ran for the unkeyed and the first keyed request only')
}

function withKey (options: InjectOptions): InjectOptions {
  return { ...options, headers: { ...options.headers, 'idempotency-key': 'body-kind' } }
}

test('through the plugin: @fastify/multipart with attachFieldsToBody', async (t) => {
  const { app, counter } = await appWith(t, async (app, count) => {
    await app.register(multipart, { attachFieldsToBody: true })
    app.post('/upload', async (req) => {
      count()
      const body = req.body as { title: { value: string }, photo: { filename: string, _buf: Buffer } }
      return { title: body.title.value, file: body.photo.filename, digest: sha(body.photo._buf) }
    })
  })
  // A new form each time: each request gets its own multipart boundary, as from a real client.
  await keyedRunsLikeUnkeyed(t, app, counter,
    () => ({ method: 'POST', url: '/upload', payload: photoForm('holiday', 'JPEG bytes') }),
    () => ({ method: 'POST', url: '/upload', payload: photoForm('holiday', 'other bytes') }))
})

test('through the plugin: a JSON parser that produces BigInt', async (t) => {
  const { app, counter } = await appWith(t, (app, count) => {
    app.removeContentTypeParser('application/json')
    app.addContentTypeParser('application/json', { parseAs: 'string' }, (_req, text, done) => {
      try {
        done(null, JSON.parse(text as string, (_key, value: unknown) => typeof value === 'number' && Number.isInteger(value) ? BigInt(value) : value))
      } catch (err) {
        done(err as Error, undefined)
      }
    })
    app.post('/pay', async (req) => {
      count()
      const body = req.body as { amount: bigint, quantity: bigint }
      return { total: String(body.amount * body.quantity) }
    })
  })
  const json = (payload: string) => () => ({ method: 'POST' as const, url: '/pay', headers: { 'content-type': 'application/json' }, payload })
  await keyedRunsLikeUnkeyed(t, app, counter, json('{"amount":4999,"quantity":3}'), json('{"amount":4999,"quantity":4}'))
  const reordered = await app.inject(withKey(json('{"quantity":3,"amount":4999}')()))
  t.equal(reordered.headers['idempotent-replayed'], 'true', 'the same BigInt JSON with its keys in another order')
})

test('through the plugin: JSON nested 20 000 deep', async (t) => {
  const { app, counter } = await appWith(t, (app, count) => {
    app.post('/tree', { bodyLimit: 4 * 1024 * 1024 }, async (req) => {
      count()
      let depth = 0
      let node = req.body as { next?: unknown, leaf?: unknown }
      while (node.next !== undefined) {
        node = node.next as typeof node
        depth++
      }
      return { depth, leaf: node.leaf }
    })
  })
  const tree = (leaf: string) => '{"level":1,"label":"a node of a tree twenty thousand deep","next":'.repeat(20_000) + `{"leaf":"${leaf}"}` + '}'.repeat(20_000)
  const json = (payload: string) => () => ({ method: 'POST' as const, url: '/tree', headers: { 'content-type': 'application/json' }, payload })
  t.ok(tree('x').length > 1024 * 1024, 'over the default body limit')
  await keyedRunsLikeUnkeyed(t, app, counter, json(tree('x')), json(tree('y')))
})

test('through the plugin: a 10 MiB JSON array', async (t) => {
  const { app, counter } = await appWith(t, (app, count) => {
    app.post('/batch', { bodyLimit: 16 * 1024 * 1024 }, async (req) => {
      count()
      const body = req.body as Array<{ id: number }>
      return { count: body.length, last: body[body.length - 1].id }
    })
  })
  const list = records(110_000)
  const same = JSON.stringify(list)
  t.ok(same.length > 10 * 1024 * 1024, '10 MiB')
  const changed = JSON.parse(same) as Array<{ price: number }>
  changed[40_000].price += 0.01
  const other = JSON.stringify(changed)
  const json = (payload: string) => () => ({ method: 'POST' as const, url: '/batch', headers: { 'content-type': 'application/json' }, payload })
  await keyedRunsLikeUnkeyed(t, app, counter, json(same), json(other))
})
