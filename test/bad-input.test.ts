/**
 * Bad input, property-based (fast-check): whatever a client puts in the key
 * header, the body or the route, it gets a 400 that says why or is handled
 * correctly; the store only ever sees bounded, hashed keys; nothing crashes.
 */
import { connect } from 'node:net'
import type { AddressInfo } from 'node:net'
import fc from 'fast-check'
import { test } from 'tap'
import type { FastifyInstance, FastifyServerOptions } from 'fastify'
import { canonicalJson, defaultKeyEncoder } from '../index.js'
import { localKeyEncoder } from '../lib/key-encoder.js'
import { LOCAL_TEXT } from '../lib/fingerprint.js'
import type { FastifyIdempotencyOptions, KeyParts } from '../index.js'
import { build, RecordingStore, type Teardown } from './helpers/app.js'

/** Every reason the header parser gives, so each 400 says which rule the key broke. */
const REASONS = /^Invalid idempotency-key header: (the header was sent more than once|the key is empty|a comma is ambiguous|the key may hold only visible ASCII characters, without spaces, unless it is quoted|the key may hold only printable ASCII characters|unexpected characters after the quoted key|only \\" and \\\\ may be escaped in a quoted key|the quoted key has no closing quote|the key is longer than 255 characters)/
const RUNS = Number(process.env.FC_RUNS ?? 300)

/** An app whose POST /items echoes the key it saw; every store call is recorded. */
async function echoApp (t: Teardown, options: FastifyIdempotencyOptions = {}, server: FastifyServerOptions = {}) {
  const store = new RecordingStore()
  t.teardown(() => store.close())
  const app = await build(t, { store, ...options }, server)
  const counter = { runs: 0 }
  app.post('/items', async (request, reply) => ({ key: reply.idempotency.key, run: ++counter.runs, body: request.body ?? null }))
  return { app, store, counter }
}

/** `value` for a test name: JSON with everything outside printable ASCII escaped (a raw U+2028 would break the TAP stream). */
function show (value: string): string {
  return JSON.stringify(value).replace(/[^\x20-\x7e]/g, (c) => '\\u' + c.charCodeAt(0).toString(16).padStart(4, '0'))
}

/** The header value as a client would write it, `"`-quoted with `\` escapes (an RFC 8941 sf-string). */
function sfString (key: string): string {
  return '"' + key.replace(/[\\"]/g, (c) => '\\' + c) + '"'
}

/** Header values of every kind the spec names, mixed. */
const hostileChars = fc.constantFrom(
  '\u0000', '\u0001', '\t', '\n', '\r', '\u001f', '\u007f', ' ', ',', '"', '\\', '|', ':', '{', '}', '%',
  '\u00a0', '\u0085', 'é', '\u00ff', '\u2028', '\u3000', '\ufeff', '\u{1f600}', '\ud800'
)
const headerValue = fc.oneof(
  fc.constantFrom('', ' ', '\t', ' \t ', '""', '"', '\\', ','),
  fc.string({ unit: 'grapheme-ascii', maxLength: 40 }),
  fc.string({ unit: 'binary', maxLength: 40 }),
  fc.string({ unit: fc.oneof(fc.string({ unit: 'grapheme-ascii', minLength: 1, maxLength: 1 }), hostileChars), maxLength: 30 }),
  fc.tuple(hostileChars, fc.stringMatching(/^[a-z0-9-]{1,20}$/), hostileChars).map(([a, key, b]) => a + key + b),
  fc.string({ unit: 'grapheme-ascii', maxLength: 40 }).map(sfString),
  fc.string({ unit: 'grapheme-ascii', maxLength: 40 }).map((s) => '"' + s + '"'),
  fc.integer({ min: 250, max: 10_240 }).map((n) => 'k'.repeat(n)),
  fc.integer({ min: 120, max: 5000 }).map((n) => sfString('"'.repeat(n))),
  fc.stringMatching(/^[A-Za-z0-9_-]{43}$/).map((hash) => 'idem:' + hash),
  fc.stringMatching(/^[A-Za-z0-9_-]{43}$/).map((hash) => `idempotency:{idem:${hash}}`),
  fc.array(fc.stringMatching(/^[a-z0-9]{1,10}$/), { minLength: 1, maxLength: 5 }).map((parts) => parts.join('|')),
  fc.array(fc.stringMatching(/^[a-z0-9]{1,10}$/), { minLength: 2, maxLength: 4 }).map((parts) => parts.join(', '))
)

/** What the plugin must do with one header value: a 400 saying why, or a claim on a hashed store key. */
async function checkValue (app: FastifyInstance, store: RecordingStore, value: string | string[]): Promise<void> {
  const claims = store.claims.length
  const res = await app.inject({ method: 'POST', url: '/items', headers: { 'idempotency-key': value }, payload: { n: 1 } })
  const body = res.json()
  if (res.statusCode === 400) {
    if (body.code !== 'FST_IDEMPOTENCY_KEY_INVALID') throw new Error(`400 with code ${body.code}`)
    if (!REASONS.test(body.message)) throw new Error(`unclear message: ${body.message}`)
    if (store.claims.length !== claims) throw new Error('a refused key reached the store')
    return
  }
  if (res.statusCode !== 200) throw new Error(`status ${res.statusCode}: ${res.body}`)
  const key = body.key as string
  if (typeof value !== 'string') throw new Error('a repeated header was accepted')
  // Only SP and HTAB around a value are whitespace in HTTP (RFC 9110 OWS); anything else is part of it.
  const sent = value.replace(/^[ \t]+|[ \t]+$/g, '')
  if (!/^[\x20-\x7e]*$/.test(sent)) throw new Error(`a header with characters outside ASCII was accepted: ${show(value)} → ${show(key)}`)
  if (sent !== key && sent !== sfString(key)) throw new Error(`${show(value)} read as ${show(key)}`)
  if (key.length === 0 || key.length > 255) throw new Error(`accepted key of length ${key.length}`)
  if (store.claims.length !== claims + 1) throw new Error('an accepted key was not claimed once')
  const claimed = store.claims[claims].key
  // The memory store's keys never leave the process: the parts, length-delimited, unhashed.
  if (claimed !== localKeyEncoder({ scope: undefined, method: 'POST', path: '/items', key })) throw new Error(`the store got ${claimed}`)
}

test('header values of any kind: a 400 saying why, or a claim on the encoded key; never a crash', async (t) => {
  const { app, store } = await echoApp(t)
  await fc.assert(fc.asyncProperty(headerValue, async (value) => { await checkValue(app, store, value) }), { numRuns: RUNS })
  await fc.assert(fc.asyncProperty(fc.array(headerValue, { minLength: 2, maxLength: 4 }), async (values) => {
    await checkValue(app, store, values)
  }), { numRuns: 50 })
  t.ok(store.claims.length > 0, `${store.claims.length} values accepted and claimed`)
  t.ok(store.claims.every((claim) => claim.key.startsWith('idem:-|POST|6:/items|')), 'every store key is the delimited encoding of its parts')
})

test('characters around a key other than SP and HTAB are part of it: 400 (trim() took U+00A0 and line breaks away)', async (t) => {
  const { app, store, counter } = await echoApp(t)
  for (const value of ['\u00a0abc', 'abc\u00a0', '\ufeffabc', 'abc\u3000', '\u2028abc', 'abc\n', '\rabc', 'abc\u000b']) {
    const res = await app.inject({ method: 'POST', url: '/items', headers: { 'idempotency-key': value }, payload: {} })
    t.equal(res.statusCode, 400, show(value))
    t.match(res.json().message, /the key may hold only visible ASCII characters/)
  }
  t.equal((await app.inject({ method: 'POST', url: '/items', headers: { 'idempotency-key': ' \tabc\t ' }, payload: {} })).json().key, 'abc', 'SP and HTAB are trimmed')
  t.equal(counter.runs, 1)
  t.equal(store.claims.length, 1)
})

test('any decoded key round-trips: bare and quoted forms name the same record', async (t) => {
  const { app, store, counter } = await echoApp(t)
  const printable = fc.string({ unit: 'grapheme-ascii', minLength: 1, maxLength: 255 }).filter((key) => key.trim() === key)
  await fc.assert(fc.asyncProperty(printable, async (key) => {
    const runs = counter.runs
    const quoted = await app.inject({ method: 'POST', url: '/items', headers: { 'idempotency-key': sfString(key) }, payload: { n: 1 } })
    if (quoted.statusCode !== 200 || quoted.json().key !== key) throw new Error(`${sfString(key)}: ${quoted.body}`)
    const again = await app.inject({ method: 'POST', url: '/items', headers: { 'idempotency-key': sfString(key) }, payload: { n: 1 } })
    if (again.body !== quoted.body || again.headers['idempotent-replayed'] !== 'true') throw new Error('no replay')
    if (/^[\x21-\x7e]+$/.test(key) && !key.includes(',') && key[0] !== '"') {
      const bare = await app.inject({ method: 'POST', url: '/items', headers: { 'idempotency-key': key }, payload: { n: 1 } })
      if (bare.body !== quoted.body) throw new Error(`bare ${key} is another key`)
    }
    if (counter.runs !== runs + (quoted.headers['idempotent-replayed'] === 'true' ? 0 : 1)) throw new Error('ran twice')
  }), { numRuns: RUNS })
  t.ok(store.claims.every((claim) => claim.key.startsWith('idem:-|POST|6:/items|')))
})

/** Sends raw bytes as the key header on a real socket; returns the status code and body, or throws after 3 s. */
function rawPost (port: number, headerValue: Buffer): Promise<{ status: number, body: string }> {
  return new Promise((resolve, reject) => {
    const socket = connect({ host: '127.0.0.1', port })
    const chunks: Buffer[] = []
    const timer = setTimeout(() => {
      socket.destroy()
      reject(new Error('no answer within 3 s'))
    }, 3000)
    socket.on('data', (chunk) => chunks.push(chunk))
    socket.on('error', () => {}) // a reset after the server's 400 is an answer too
    socket.on('close', () => {
      clearTimeout(timer)
      const text = Buffer.concat(chunks).toString('latin1')
      const match = /^HTTP\/1\.1 (\d{3})/.exec(text)
      if (match === null) return reject(new Error(`not an HTTP answer: ${show(text.slice(0, 200))}`))
      resolve({ status: Number(match[1]), body: text.slice(text.indexOf('\r\n\r\n') + 4) })
    })
    socket.write(Buffer.concat([
      Buffer.from('POST /items HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: 2\r\nIdempotency-Key: '),
      headerValue,
      Buffer.from('\r\n\r\n{}')
    ]))
  })
}

test('raw bytes in the header on a real socket: Node or the plugin answers 400 (or 431), or the key is claimed as sent', async (t) => {
  const { app, store } = await echoApp(t)
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as AddressInfo
  const bytes = fc.oneof(
    fc.uint8Array({ maxLength: 40 }),
    fc.uint8Array({ minLength: 1, maxLength: 20 }).map((a) => Buffer.concat([Buffer.from('key-'), a])),
    fc.constantFrom('abc\r\nIdempotency-Key: def', 'abc\r\nX-Other: 1', 'a\u0000b', '\u00a0abc', 'abc\u00ff').map((s) => Buffer.from(s, 'latin1')),
    fc.integer({ min: 200, max: 20_000 }).map((n) => Buffer.alloc(n, 'k'))
  )
  await fc.assert(fc.asyncProperty(bytes, async (value) => {
    const claims = store.claims.length
    const { status, body } = await rawPost(port, Buffer.from(value))
    if (status === 400 || status === 431) {
      if (store.claims.length !== claims) throw new Error('a refused request reached the store')
      return
    }
    if (status !== 200) throw new Error(`status ${status}: ${body}`)
    const key = JSON.parse(body).key as string
    if (!/^[\x20-\x7e]{1,255}$/.test(key)) throw new Error(`accepted ${show(key)}`)
    // What the client sent as the key header: the bytes up to a line break (after it, another header).
    const sent = Buffer.from(value).toString('latin1').split(/\r?\n/)[0].replace(/^[ \t]+|[ \t]+$/g, '')
    if (sent !== key && sent !== sfString(key)) throw new Error(`${show(sent)} read as ${show(key)}`)
    if (store.claims.length !== claims + 1 || store.claims[claims].key !== localKeyEncoder({ scope: undefined, method: 'POST', path: '/items', key })) throw new Error('not one claim of the encoded key')
  }), { numRuns: Math.ceil(RUNS / 3) })
  t.equal((await rawPost(port, Buffer.from('still-up'))).status, 200, 'the server still answers')
})

/** JSON text of `value` with object keys in another order and other spacing. */
function reordered (value: unknown, shuffle: (keys: string[]) => string[]): string {
  if (typeof value !== 'object' || value === null) return JSON.stringify(value)
  if (Array.isArray(value)) return '[ ' + value.map((item) => reordered(item, shuffle)).join(' , ') + ' ]'
  const object = value as Record<string, unknown>
  return '{\n' + shuffle(Object.keys(object)).map((key) => `  ${JSON.stringify(key)} :\t${reordered(object[key], shuffle)}`).join(',\n') + '\n}'
}

// Fastify refuses these keys (prototype poisoning) with a 400 of its own; they say nothing about fingerprints.
const jsonBody = fc.jsonValue({ maxDepth: 3 }).filter((value) => !/"(__proto__|constructor)"/.test(JSON.stringify(value)))

test('bodies: the same JSON in another key order and spacing replays; another body with the same key is 422 and does not run', async (t) => {
  const { app, store, counter } = await echoApp(t)
  let n = 0
  const send = (key: string, payload: string) =>
    app.inject({ method: 'POST', url: '/items', headers: { 'idempotency-key': key, 'content-type': 'application/json' }, payload })
  await fc.assert(fc.asyncProperty(jsonBody, fc.func(fc.boolean()), async (value, coin) => {
    const key = `same-${++n}`
    const first = await send(key, JSON.stringify(value))
    if (first.statusCode !== 200) throw new Error(`first: ${first.statusCode} ${first.body}`)
    const runs = counter.runs
    const shuffle = (keys: string[]) => [...keys].sort((a, b) => (coin(a, b) ? 1 : -1))
    const second = await send(key, reordered(value, shuffle))
    if (second.headers['idempotent-replayed'] !== 'true' || second.body !== first.body) throw new Error(`no replay: ${second.statusCode} ${second.body}`)
    if (counter.runs !== runs) throw new Error('ran again')
  }), { numRuns: RUNS })
  await fc.assert(fc.asyncProperty(jsonBody, jsonBody, async (a, b) => {
    fc.pre(canonicalJson(a) !== canonicalJson(b))
    const key = `other-${++n}`
    const first = await send(key, JSON.stringify(a))
    if (first.statusCode !== 200) throw new Error(`first: ${first.statusCode} ${first.body}`)
    const runs = counter.runs
    const second = await send(key, JSON.stringify(b))
    if (second.statusCode !== 422 || second.json().code !== 'FST_IDEMPOTENCY_FINGERPRINT_MISMATCH') throw new Error(`${second.statusCode} ${second.body}`)
    if (counter.runs !== runs) throw new Error('the handler ran for a mismatched body')
  }), { numRuns: RUNS })
  // The memory store keeps a short text as it is (localFingerprint), a longer one as its hash.
  const bounded = (fingerprint: string | undefined) => fingerprint !== undefined &&
    (fingerprint.startsWith('POST /items\n') ? fingerprint.length <= LOCAL_TEXT : /^[\w-]{43}$/.test(fingerprint))
  t.ok(store.claims.every((claim) => bounded(claim.fingerprint)), 'fingerprints are bounded: a text of at most LOCAL_TEXT characters or a hash')
  t.ok(store.claims.some((claim) => claim.fingerprint?.length === 43) && store.claims.some((claim) => claim.fingerprint?.startsWith('POST')), 'both forms were seen')
})

test('bodies that cannot be parsed never claim the key: invalid JSON, over bodyLimit, unknown content types, empty JSON', async (t) => {
  const { app, store, counter } = await echoApp(t, {}, { bodyLimit: 1024 })
  let n = 0
  const invalidJson = fc.string({ maxLength: 60 }).filter((text) => {
    try {
      JSON.parse(text)
      return false
    } catch {
      return text.trim() !== '' // an empty body has its own error, tried below
    }
  })
  const refusals = fc.oneof(
    invalidJson.map((payload) => ({ type: 'application/json', payload, status: 400 })),
    fc.integer({ min: 1025, max: 100_000 }).map((size) => ({ type: 'application/json', payload: JSON.stringify({ pad: 'x'.repeat(size) }), status: 413 })),
    fc.constantFrom('application/xml', 'application/octet-stream', 'multipart/form-data; boundary=x', 'image/png', 'text/html; charset=utf-8')
      .map((type) => ({ type, payload: '<a>1</a>', status: 415 })),
    fc.constantFrom('', ' ', '\n').map((payload) => ({ type: 'application/json', payload, status: 400 }))
  )
  await fc.assert(fc.asyncProperty(refusals, async ({ type, payload, status }) => {
    const key = `refused-${++n}`
    const claims = store.claims.length
    const res = await app.inject({ method: 'POST', url: '/items', headers: { 'idempotency-key': key, 'content-type': type }, payload })
    if (res.statusCode !== status || !String(res.json().code).startsWith('FST_ERR_CTP_')) throw new Error(`${type} ${show(payload.slice(0, 40))}: ${res.statusCode} ${res.body}`)
    if (store.claims.length !== claims) throw new Error('the key was claimed')
    const runs = counter.runs
    const retry = await app.inject({ method: 'POST', url: '/items', headers: { 'idempotency-key': key }, payload: { fixed: true } })
    if (retry.statusCode !== 200 || retry.headers['idempotent-replayed'] !== undefined || counter.runs !== runs + 1) throw new Error('the corrected retry did not run')
  }), { numRuns: Math.ceil(RUNS / 2) })
  t.ok(counter.runs > 0)
})

test('text and empty bodies: fingerprinted as sent; an empty body and a non-empty one with the same key are different requests', async (t) => {
  const { app, counter } = await echoApp(t)
  const send = (key: string, type: string | undefined, payload: string | undefined) =>
    app.inject({ method: 'POST', url: '/items', headers: { 'idempotency-key': key, ...(type === undefined ? {} : { 'content-type': type }) }, ...(payload === undefined ? {} : { payload }) })
  let n = 0
  await fc.assert(fc.asyncProperty(fc.string({ maxLength: 50 }), fc.string({ maxLength: 50 }), async (a, b) => {
    const key = `text-${++n}`
    const first = await send(key, 'text/plain', a)
    if (first.statusCode !== 200) throw new Error(`${first.statusCode} ${first.body}`)
    const runs = counter.runs
    const second = await send(key, 'text/plain', b)
    if (a === b ? second.body !== first.body : second.statusCode !== 422) throw new Error(`${show(a)} vs ${show(b)}: ${second.statusCode}`)
    if (counter.runs !== runs) throw new Error('ran again')
  }), { numRuns: RUNS })
  const none = await send('empty', undefined, undefined)
  t.equal(none.statusCode, 200, 'no body at all')
  t.equal((await send('empty', undefined, undefined)).headers['idempotent-replayed'], 'true')
  t.equal((await send('empty', 'text/plain', 'x')).statusCode, 422, 'then a body with the same key')
})

test('routes: one key on two routes and two methods is four requests; methods outside `methods` and exempt routes ignore the header', async (t) => {
  const store = new RecordingStore()
  t.teardown(() => store.close())
  const app = await build(t, { store, endpoints: ['/api/', '/items/'] })
  const runs: Record<string, number> = {}
  const handler = (name: string) => async () => ({ name, run: (runs[name] = (runs[name] ?? 0) + 1) })
  app.post('/items/a', handler('POST a'))
  app.post('/items/b', handler('POST b'))
  app.put('/items/a', handler('PUT a'))
  app.patch('/items/a', handler('PATCH a'))
  app.get('/items/a', handler('GET a'))
  app.post('/items/exempt', { config: { idempotency: false } }, handler('exempt'))
  app.post('/elsewhere', handler('elsewhere')) // no endpoint matches
  let n = 0
  await fc.assert(fc.asyncProperty(fc.stringMatching(/^[!-+\--~]{1,64}$/), async (key) => {
    const k = `${++n}-${key}`
    const send = (method: 'POST' | 'PUT' | 'PATCH', url: string) => app.inject({ method, url, headers: { 'idempotency-key': k }, payload: { same: 'body' } })
    const before = { ...runs }
    const firsts = await Promise.all([send('POST', '/items/a'), send('POST', '/items/b'), send('PUT', '/items/a'), send('PATCH', '/items/a')])
    const names = firsts.map((res) => res.json().name)
    if (names.join() !== 'POST a,POST b,PUT a,PATCH a') throw new Error(`cross-route answer: ${names.join()}`)
    if (firsts.some((res) => res.statusCode !== 200 || res.headers['idempotent-replayed'] !== undefined)) throw new Error('not four first runs')
    const again = await Promise.all([send('POST', '/items/a'), send('POST', '/items/b'), send('PUT', '/items/a'), send('PATCH', '/items/a')])
    if (again.some((res, i) => res.body !== firsts[i].body || res.headers['idempotent-replayed'] !== 'true')) throw new Error('not four replays')
    for (const name of ['POST a', 'POST b', 'PUT a', 'PATCH a']) if (runs[name] !== (before[name] ?? 0) + 1) throw new Error(`${name} ran ${runs[name]}`)
  }), { numRuns: 100 })

  const claims = store.claims.length
  const junk = ['x'.repeat(10_240), 'a, b', '\u00a0', '']
  for (const [method, url, name] of [['GET', '/items/a', 'GET a'], ['POST', '/items/exempt', 'exempt'], ['POST', '/elsewhere', 'elsewhere']] as const) {
    for (const value of junk) {
      const res = await app.inject({ method, url, headers: { 'idempotency-key': value } })
      t.equal(res.statusCode, 200, `${method} ${url} with ${show(value.slice(0, 10))}: passes through`)
    }
    t.equal(runs[name], junk.length, `${name}: ran every time`)
  }
  t.equal(store.claims.length, claims, 'none of them touched the store')
})

const STORE_KEY = /^idem:[A-Za-z0-9_-]{43}$/

test('the default key encoder, and its unhashed form for the memory store: any two different sets of parts give two store keys; the hashed ones bounded', async (t) => {
  const part = fc.oneof(fc.string({ maxLength: 12 }), fc.constantFrom('|', ':', '1:|', '-', '0:', '|-|', 'idem:'), fc.stringMatching(/^[0-9:|-]{0,8}$/))
  const parts = fc.record({
    scope: fc.option(part, { nil: undefined }),
    method: fc.constantFrom('POST', 'PUT', 'PATCH', 'DELETE'),
    path: part.map((p) => '/' + p),
    key: part
  })
  fc.assert(fc.property(parts, parts, (a: KeyParts, b: KeyParts) => {
    const same = a.scope === b.scope && a.method === b.method && a.path === b.path && a.key === b.key
    const ka = defaultKeyEncoder(a)
    if (!STORE_KEY.test(ka)) throw new Error(ka)
    return same === (ka === defaultKeyEncoder(b)) && same === (localKeyEncoder(a) === localKeyEncoder(b))
  }), { numRuns: 2000 })
  // Collisions the length prefixes exist for: a separator moved from one part into its neighbour.
  const tricky: KeyParts[] = [
    { scope: 'a|POST', method: 'POST', path: '/x', key: 'k' },
    { scope: 'a', method: 'POST', path: '/x', key: 'k' },
    { scope: undefined, method: 'POST', path: '/x|k', key: 'k' },
    { scope: undefined, method: 'POST', path: '/x', key: 'k|k' },
    { scope: '-', method: 'POST', path: '/x', key: 'k' },
    { scope: undefined, method: 'POST', path: '/x', key: 'k' },
    { scope: '', method: 'POST', path: '/x', key: 'k' }
  ]
  t.equal(new Set(tricky.map(defaultKeyEncoder)).size, tricky.length)
  t.equal(new Set(tricky.map(localKeyEncoder)).size, tricky.length)
})
