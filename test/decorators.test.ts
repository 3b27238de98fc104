/**
 * What the plugin adds to Fastify: `fastify.idempotency.store`,
 * `reply.idempotency` (the NO_KEY object where the plugin does not act, key
 * only before the claim), and closing the store it made itself.
 */
import { test } from 'tap'
import Fastify from 'fastify'
import fastifyIdempotency, { MemoryStore } from '../index.js'
import type { IdempotencyReplyState } from '../index.js'
import { build } from './helpers/app.js'

const NO_KEY = { key: undefined, exists: false, replayed: false, response: undefined, token: undefined }

/** The data fields of `reply.idempotency`. */
function fields (state: IdempotencyReplyState) {
  const { key, exists, replayed, response, token } = state
  return { key, exists, replayed, response, token }
}

test('fastify.idempotency.store: the memory store by default, or the store passed in', async (t) => {
  const app = await build(t)
  t.ok(app.idempotency.store instanceof MemoryStore)
  const mine = new MemoryStore()
  t.teardown(() => mine.close())
  const other = await build(t, { store: mine })
  t.equal(other.idempotency.store, mine)
})

test('reply.idempotency is a frozen NO_KEY object on routes and methods the plugin does not cover', async (t) => {
  const app = await build(t)
  const seen: IdempotencyReplyState[] = []
  app.post('/exempt', { config: { idempotency: false } }, async (_request, reply) => { seen.push(reply.idempotency); return 'ok' })
  app.route({ method: ['GET', 'POST'], url: '/covered', handler: async (_request, reply) => { seen.push(reply.idempotency); return 'ok' } })
  await app.inject({ method: 'POST', url: '/exempt', headers: { 'idempotency-key': 'k' } })
  await app.inject({ method: 'GET', url: '/covered', headers: { 'idempotency-key': 'k' } })
  t.equal(seen.length, 2)
  for (const state of seen) {
    t.same(fields(state), NO_KEY)
    t.equal(state.signal.aborted, false, 'a signal that never aborts')
    await t.rejects(state.completeWith({ query: async () => ({ rows: [], rowCount: 0 }) }, {}), { code: 'FST_IDEMPOTENCY_COMPLETE_WITH' })
    t.ok(Object.isFrozen(state))
  }
  t.equal(seen[0], seen[1], 'one shared object')
  t.throws(() => { (seen[0] as { key: string | undefined }).key = 'x' }, TypeError, 'it cannot be written')
})

test('reply.idempotency in handlers: the key, and nothing else on a first request', async (t) => {
  const app = await build(t)
  const seen: Array<Record<string, unknown>> = []
  app.post('/', async (_request, reply) => {
    seen.push(fields(reply.idempotency))
    return 'ok'
  })
  await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'abc' } })
  await app.inject({ method: 'POST', url: '/' })
  t.match(seen[0], { key: 'abc', exists: false, replayed: false, response: undefined, token: /^[0-9]+$/ }, 'the key and the claim\'s token')
  t.same(seen[1], NO_KEY)
})

test('route hooks before the claim see the key only; hooks after a replay see it all', async (t) => {
  const app = await build(t)
  const seen: Record<string, Array<Record<string, unknown>>> = { onRequest: [], preValidation: [], preHandler: [], onSend: [], onResponse: [] }
  const snapshot = (hook: string) => async (_request: unknown, reply: { idempotency: IdempotencyReplyState }) => {
    const { key, exists, replayed, response } = reply.idempotency
    seen[hook].push({ key, exists, replayed, status: response?.statusCode })
  }
  let runs = 0
  app.post('/', {
    onRequest: snapshot('onRequest'),
    preValidation: snapshot('preValidation'),
    preHandler: snapshot('preHandler'),
    onSend: snapshot('onSend'),
    onResponse: snapshot('onResponse')
  }, async (_request, reply) => {
    runs++
    reply.code(201)
    return 'ok'
  })
  await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  t.equal(runs, 1)
  const keyOnly = { key: 'k', exists: false, replayed: false, status: undefined }
  const replay = { key: 'k', exists: true, replayed: true, status: 201 }
  t.same(seen.onRequest, [keyOnly, keyOnly], 'the header is read before the route\'s own onRequest hooks')
  t.same(seen.preValidation, [keyOnly, keyOnly])
  t.same(seen.preHandler, [keyOnly, keyOnly], 'the route\'s preHandlers run before the claim, even on a replay')
  t.same(seen.onSend, [keyOnly, replay])
  t.same(seen.onResponse, [keyOnly, replay])
})

test('the plugin closes the memory store it made, and never a store passed in', async (t) => {
  const own = Fastify()
  await own.register(fastifyIdempotency)
  await own.ready()
  const store = own.idempotency.store as MemoryStore
  let closed = 0
  const close = store.close.bind(store)
  store.close = () => { closed++; close() }
  await own.close()
  t.equal(closed, 1)

  class CountingStore extends MemoryStore {
    closed = 0
    close () { this.closed++; super.close() }
  }
  const mine = new CountingStore()
  const app = Fastify()
  await app.register(fastifyIdempotency, { store: mine })
  await app.ready()
  await app.close()
  t.equal(mine.closed, 0, 'the application owns it')
  mine.close()
})

test('an app with the plugin and an in-flight lease timer closes cleanly', async (t) => {
  const app = Fastify()
  await app.register(fastifyIdempotency, { lockTtl: 1000 })
  app.post('/', async () => 'ok')
  await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  await t.resolves(async () => { await app.close() })
})
