/**
 * Body-transforming plugins registered after this one (here @fastify/compress):
 * the plugin's global onSend sees the payload before compression, so the
 * stored body is the plain one, the handler runs once and every replay
 * decompresses to the same bytes.
 */
import { brotliDecompressSync, gunzipSync } from 'node:zlib'
import { test } from 'tap'
import fastifyCompress from '@fastify/compress'
import { build, RecordingStore } from './helpers/app.js'

test('@fastify/compress registered after the plugin: one run, stored uncompressed, replays decompress to the same bytes', async (t) => {
  const store = new RecordingStore()
  t.teardown(() => store.close())
  const app = await build(t, { store })
  await app.register(fastifyCompress, { global: true, threshold: 0 })
  let runs = 0
  const items = Array.from({ length: 200 }, (_, i) => ({ id: i, name: `item ${i} ✓` }))
  app.post('/', async (_request, reply) => {
    runs++
    reply.code(201)
    return { items }
  })
  const plain = Buffer.from(JSON.stringify({ items }))
  const send = (encoding?: string) => app.inject({
    method: 'POST', url: '/', payload: { q: 1 }, headers: { 'idempotency-key': 'k', ...(encoding === undefined ? {} : { 'accept-encoding': encoding }) }
  })

  const first = await send('gzip')
  t.equal(first.statusCode, 201)
  t.equal(first.headers['content-encoding'], 'gzip')
  t.same(gunzipSync(first.rawPayload), plain)
  t.ok(first.rawPayload.length < plain.length, 'the first response was compressed')

  t.equal(store.completes.length, 1)
  const saved = store.completes[0].response
  t.same(Buffer.from(saved.body), plain, 'the stored body is the uncompressed payload')
  t.equal(saved.headers['content-encoding'], undefined)

  const gzip = await send('gzip')
  t.equal(gzip.statusCode, 201)
  t.equal(gzip.headers['idempotent-replayed'], 'true')
  t.equal(gzip.headers['content-encoding'], 'gzip')
  t.same(gunzipSync(gzip.rawPayload), plain)

  const br = await send('br')
  t.equal(br.headers['content-encoding'], 'br')
  t.same(brotliDecompressSync(br.rawPayload), plain)

  const identity = await send()
  t.equal(identity.headers['content-encoding'], undefined)
  t.same(identity.rawPayload, plain)
  t.equal(identity.headers['idempotent-replayed'], 'true')

  t.equal(runs, 1)
})

test('@fastify/compress: an uncompressed first response replays compressed for a client that asks', async (t) => {
  const app = await build(t)
  await app.register(fastifyCompress, { global: true, threshold: 0 })
  let runs = 0
  app.post('/', async (_request, reply) => reply.type('text/plain').send('x'.repeat(5000) + String(++runs)))
  const first = await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  const replay = await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k', 'accept-encoding': 'gzip' } })
  t.equal(replay.headers['content-encoding'], 'gzip')
  t.same(gunzipSync(replay.rawPayload), first.rawPayload)
  t.equal(runs, 1)
})
