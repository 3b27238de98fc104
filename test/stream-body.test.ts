/**
 * A content-type parser that hands the raw request on as a stream (the proxy
 * pattern): the keyed request runs like the same request without a key, the
 * handler still reads the whole body as a stream, and the fingerprint covers
 * the bytes, so the same bytes replay and different bytes are a 422.
 */
import t, { type Test } from 'tap'
import { Readable } from 'node:stream'
import Fastify from 'fastify'
import fastifyIdempotency from '../index.js'
import './helpers/crash-guard.js'

async function streamingApp (t: Test, bodyLimit?: number) {
  const app = Fastify(bodyLimit === undefined ? {} : { bodyLimit })
  t.teardown(() => app.close())
  await app.register(fastifyIdempotency)
  app.removeAllContentTypeParsers()
  app.addContentTypeParser('*', (_request, payload, done) => done(null, payload))
  let runs = 0
  app.post('/upload', async (request) => {
    runs++
    const chunks: Buffer[] = []
    for await (const chunk of request.body as Readable) chunks.push(chunk as Buffer)
    const body = Buffer.concat(chunks)
    return { runs, bytes: body.length, text: body.toString() }
  })
  return { app, runs: () => runs }
}

t.test('a stream body: runs as without a key, replays the same bytes, 422 for other bytes', async (t) => {
  const { app, runs } = await streamingApp(t)
  const send = (payload: string, key?: string) => app.inject({
    method: 'POST', url: '/upload', payload, headers: { 'content-type': 'application/octet-stream', ...(key === undefined ? {} : { 'idempotency-key': key }) }
  })
  const unkeyed = await send('raw bytes one')
  t.same(unkeyed.json(), { runs: 1, bytes: 13, text: 'raw bytes one' })
  const keyed = await send('raw bytes one', 'k')
  t.same(keyed.json(), { runs: 2, bytes: 13, text: 'raw bytes one' }, 'the handler read the same stream as without a key')
  const replay = await send('raw bytes one', 'k')
  t.equal(replay.headers['idempotent-replayed'], 'true')
  t.equal(replay.body, keyed.body)
  const other = await send('raw bytes two', 'k')
  t.equal(other.statusCode, 422, 'different bytes: a different request')
  t.equal(other.json().code, 'FST_IDEMPOTENCY_FINGERPRINT_MISMATCH')
  t.equal(runs(), 2)
})

t.test('a stream body over the route\'s bodyLimit is refused with Fastify\'s own 413, before any claim', async (t) => {
  const { app, runs } = await streamingApp(t, 16)
  const res = await app.inject({
    method: 'POST', url: '/upload', payload: 'x'.repeat(17), headers: { 'content-type': 'text/plain', 'idempotency-key': 'big' }
  })
  t.equal(res.statusCode, 413)
  t.equal(res.json().code, 'FST_ERR_CTP_BODY_TOO_LARGE')
  t.equal(runs(), 0)
  const fits = await app.inject({
    method: 'POST', url: '/upload', payload: 'x'.repeat(16), headers: { 'content-type': 'text/plain', 'idempotency-key': 'big' }
  })
  t.equal(fits.statusCode, 200, 'the key was never claimed: a corrected retry runs')
})

t.test('a stream body that fails while it is read: Fastify answers the error, and the key is never claimed', async (t) => {
  const app = Fastify()
  t.teardown(() => app.close())
  await app.register(fastifyIdempotency)
  app.removeAllContentTypeParsers()
  let broken = true
  app.addContentTypeParser('*', (_request, payload, done) => {
    if (!broken) return done(null, payload)
    done(null, new Readable({ read () { this.destroy(Object.assign(new Error('the upload broke'), { statusCode: 400 })) } }))
  })
  let runs = 0
  app.post('/upload', async () => ({ runs: ++runs }))
  const send = () => app.inject({ method: 'POST', url: '/upload', payload: 'x', headers: { 'content-type': 'text/plain', 'idempotency-key': 'k' } })
  const failed = await send()
  t.equal(failed.statusCode, 400)
  t.equal(failed.json().message, 'the upload broke')
  t.equal(runs, 0)
  broken = false
  t.equal((await send()).statusCode, 200, 'the retry claims the key and runs')
})

t.test('a stream that gives text, and one read already by an earlier hook', async (t) => {
  const app = Fastify()
  t.teardown(() => app.close())
  await app.register(fastifyIdempotency)
  app.removeAllContentTypeParsers()
  app.addContentTypeParser('*', (request, payload, done) => {
    if (request.headers['x-read'] === '1') {
      payload.resume()
      payload.once('end', () => done(null, payload)) // a parser that drained it already
      return
    }
    payload.setEncoding('utf8') // chunks arrive as strings
    done(null, payload)
  })
  let runs = 0
  app.post('/upload', async (request) => {
    runs++
    let text = ''
    for await (const chunk of request.body as Readable) text += String(chunk)
    return { runs, text }
  })
  const send = (payload: string, headers: Record<string, string> = {}) => app.inject({
    method: 'POST', url: '/upload', payload, headers: { 'content-type': 'text/plain', 'idempotency-key': `k-${headers['x-read'] ?? 0}`, ...headers }
  })
  t.same((await send('naïve text')).json(), { runs: 1, text: 'naïve text' })
  t.equal((await send('naïve text')).headers['idempotent-replayed'], 'true')
  t.equal((await send('other text')).statusCode, 422, 'string chunks are fingerprinted by their bytes')
  t.same((await send('gone', { 'x-read': '1' })).json(), { runs: 2, text: '' }, 'nothing left to read: an empty body')
})
