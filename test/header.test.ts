/**
 * The key header: a bare token or a quoted sf-string, validated in onRequest
 * (before the body is read); anything unusable is a 400 saying why.
 */
import { request as httpRequest } from 'node:http'
import type { AddressInfo } from 'node:net'
import { test } from 'tap'
import type { FastifyInstance } from 'fastify'
import type { FastifyIdempotencyOptions } from '../index.js'
import { parseKey } from '../lib/header.js'
import { build } from './helpers/app.js'

interface Echo { key: string | undefined, run: number }

async function echoApp (t: Parameters<typeof build>[0], options: FastifyIdempotencyOptions = {}) {
  const app = await build(t, options)
  const counter = { runs: 0, parsed: 0 }
  // A body parser that counts: a rejected key must be refused before the body is read.
  app.addContentTypeParser('text/plain', { parseAs: 'string' }, (_request, body, done) => {
    counter.parsed++
    done(null, body)
  })
  app.post('/', async (_request, reply): Promise<Echo> => ({ key: reply.idempotency.key, run: ++counter.runs }))
  return { app, counter }
}

function send (app: FastifyInstance, value: string | undefined, header = 'idempotency-key') {
  return app.inject({
    method: 'POST',
    url: '/',
    headers: { 'content-type': 'text/plain', ...(value === undefined ? {} : { [header]: value }) },
    payload: 'body'
  })
}

test('accepted keys: bare tokens and quoted sf-strings, with escapes decoded', async (t) => {
  const { app, counter } = await echoApp(t)
  const cases: Array<[string, string]> = [
    ['abc', 'abc'],
    ['Ab9-._~!#$%&\'*+^`|', 'Ab9-._~!#$%&\'*+^`|'],
    ['  padded\t', 'padded'],
    ['"quoted"', 'quoted'],
    ['"with space, and comma"', 'with space, and comma'],
    ['"esc\\"aped\\\\"', 'esc"aped\\'],
    ['"\\\\"', '\\'],
    ['  "spaced"  ', 'spaced'],
    ['"a{}[]<>=?@;:/"', 'a{}[]<>=?@;:/'],
    // Bare keys are lenient: any visible ASCII but the comma (base64 keys carry + / =).
    ['aGVsbG8+/w==', 'aGVsbG8+/w=='],
    ['a"b', 'a"b']
  ]
  for (const [raw, key] of cases) {
    const res = await send(app, raw)
    t.equal(res.statusCode, 200, raw)
    t.equal(res.json<Echo>().key, key, `${raw} → ${key}`)
  }
  t.equal(counter.runs, cases.length)
})

test('a quoted key is the same key as the bare token it holds', async (t) => {
  const { app, counter } = await echoApp(t)
  const first = await send(app, '"same-key"')
  const second = await send(app, 'same-key')
  t.equal(counter.runs, 1)
  t.equal(second.headers['idempotent-replayed'], 'true')
  t.equal(second.body, first.body)
})

test('rejected keys: 400 FST_IDEMPOTENCY_KEY_INVALID, saying why, before the body is read', async (t) => {
  const { app, counter } = await echoApp(t)
  const cases: Array<[string, string]> = [
    ['', 'the key is empty'],
    ['   ', 'the key is empty'],
    ['""', 'the key is empty'],
    ['a,b', 'a comma is ambiguous'],
    ['a, b', 'a comma is ambiguous'],
    ['"a", "b"', 'the header was sent more than once'],
    ['"a","b"', 'the header was sent more than once'],
    ['"a"b', 'unexpected characters after the quoted key'],
    ['"a" b', 'unexpected characters after the quoted key'],
    ['"abc', 'the quoted key has no closing quote'],
    ['"abc\\"', 'the quoted key has no closing quote'],
    ['"a\\b"', 'only \\" and \\\\ may be escaped in a quoted key'],
    ['"a\\', 'only \\" and \\\\ may be escaped in a quoted key'],
    ['a b', 'the key may hold only visible ASCII characters, without spaces, unless it is quoted'],
    ['clé', 'the key may hold only visible ASCII characters'],
    ['a\u0001b', 'the key may hold only visible ASCII characters'],
    ['a\u007fb', 'the key may hold only visible ASCII characters'],
    ['"clé"', 'the key may hold only printable ASCII characters'],
    ['"a\tb"', 'the key may hold only printable ASCII characters'],
    ['"a\u0001b"', 'the key may hold only printable ASCII characters'],
    ['x'.repeat(256), 'the key is longer than 255 characters'],
    ['"' + 'x'.repeat(256) + '"', 'the key is longer than 255 characters'],
    ['x'.repeat(100_000), 'the key is longer than 255 characters']
  ]
  for (const [raw, why] of cases) {
    const res = await send(app, raw)
    t.equal(res.statusCode, 400, JSON.stringify(raw))
    const body = res.json()
    t.equal(body.code, 'FST_IDEMPOTENCY_KEY_INVALID')
    t.equal(body.message.startsWith('Invalid idempotency-key header: ' + why), true, `${JSON.stringify(raw)}: ${body.message}`)
  }
  t.equal(counter.runs, 0, 'the handler never ran')
  t.equal(counter.parsed, 0, 'no body was parsed')
})

test('length limits apply to the decoded key', async (t) => {
  const { app } = await echoApp(t)
  t.equal((await send(app, 'x'.repeat(255))).statusCode, 200, '255 characters: accepted')
  // 255 escaped quotes: 512 characters on the wire, 255 in the key.
  const escaped = '"' + '\\"'.repeat(255) + '"'
  const res = await send(app, escaped)
  t.equal(res.statusCode, 200)
  t.equal(res.json<Echo>().key, '"'.repeat(255))
})

test('key.maxLength, key.pattern and key.uuid', async (t) => {
  const short = await echoApp(t, { key: { maxLength: 8 } })
  t.equal((await send(short.app, '12345678')).statusCode, 200)
  const tooLong = await send(short.app, '123456789')
  t.equal(tooLong.statusCode, 400)
  t.equal(tooLong.json().message, 'Invalid idempotency-key header: the key is longer than 8 characters')

  const pattern = await echoApp(t, { key: { pattern: /^order-\d+$/ } })
  t.equal((await send(pattern.app, 'order-42')).statusCode, 200)
  t.equal((await send(pattern.app, '"order-43"')).statusCode, 200, 'the pattern applies to the decoded key')
  const mismatch = await send(pattern.app, 'order-x')
  t.equal(mismatch.statusCode, 400)
  t.equal(mismatch.json().message, 'Invalid idempotency-key header: the key does not match /^order-\\d+$/')

  const uuid = await echoApp(t, { key: { uuid: true } })
  for (const good of ['3f2504e0-4f89-41d3-9a0c-0305e82c3301', '3F2504E0-4F89-11D3-9A0C-0305E82C3301', '"00000000-0000-0000-0000-000000000000"']) {
    t.equal((await send(uuid.app, good)).statusCode, 200, good)
  }
  for (const bad of ['3f2504e0-4f89-41d3-9a0c-0305e82c330', '3f2504e04f8941d39a0c0305e82c3301', 'g f2504e0-4f89-41d3-9a0c-0305e82c3301'.replace(' ', ''), 'not-a-uuid']) {
    const res = await send(uuid.app, bad)
    t.equal(res.statusCode, 400, bad)
    t.equal(res.json().message, 'Invalid idempotency-key header: the key must be a UUID')
  }
  t.equal(uuid.counter.runs, 3)
})

test('a custom header name is matched case-insensitively; the default header is then ignored', async (t) => {
  const { app, counter } = await echoApp(t, { header: 'X-Request-Key' })
  const first = await send(app, 'k1', 'X-REQUEST-KEY')
  t.equal(first.json<Echo>().key, 'k1')
  const replay = await send(app, 'k1', 'x-request-key')
  t.equal(replay.headers['idempotent-replayed'], 'true')
  t.equal(counter.runs, 1)
  const other = await send(app, 'k1', 'idempotency-key')
  t.equal(other.json<Echo>().key, undefined, 'idempotency-key is not the configured header')
  const invalid = await send(app, 'a,b', 'x-request-key')
  t.equal(invalid.json().message.startsWith('Invalid x-request-key header: '), true, 'messages name the configured header')
})

test('a header sent twice on a real connection is refused (Node joins the values with ", ")', async (t) => {
  const { app, counter } = await echoApp(t)
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as AddressInfo
  const post = (values: string[]) => new Promise<{ status: number, body: string }>((resolve, reject) => {
    const req = httpRequest({
      host: '127.0.0.1', port, method: 'POST', path: '/', headers: { 'idempotency-key': values, 'content-type': 'text/plain' }
    }, (res) => {
      let body = ''
      res.setEncoding('utf8')
      res.on('data', (chunk: string) => { body += chunk })
      res.on('end', () => resolve({ status: res.statusCode as number, body }))
    })
    req.on('error', reject)
    req.end('body')
  })
  const bare = await post(['a', 'b'])
  t.equal(bare.status, 400)
  t.match(JSON.parse(bare.body), { code: 'FST_IDEMPOTENCY_KEY_INVALID', message: /a comma is ambiguous/ })
  const quoted = await post(['"a"', '"b"'])
  t.equal(quoted.status, 400)
  t.match(JSON.parse(quoted.body), { code: 'FST_IDEMPOTENCY_KEY_INVALID', message: /the header was sent more than once/ })
  const same = await post(['a', 'a'])
  t.equal(same.status, 400, 'even two equal values')
  t.equal(counter.runs, 0)
  const once = await post(['a'])
  t.equal(once.status, 200)
})

test('parseKey refuses a header value that arrives as an array', async (t) => {
  // Node joins repeated headers into one string, but a hook or an adapter may hand over an array.
  const rules = { header: 'idempotency-key', maxLength: 255, pattern: undefined, uuid: false }
  t.throws(() => parseKey(['a', 'b'], rules), { code: 'FST_IDEMPOTENCY_KEY_INVALID', message: 'Invalid idempotency-key header: the header was sent more than once' })
  t.equal(parseKey('a', rules), 'a')
})
