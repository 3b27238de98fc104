/**
 * A store that answers at once is answered at once: on the memory store the
 * claim step goes on to the handler, or sends a replay, in the same turn as
 * the route's last own preHandler, without a promise in between. A store
 * that answers later is waited for. Both give the same answers.
 */
import t, { type Test } from 'tap'
import { setImmediate as tick } from 'node:timers/promises'
import type { FastifyInstance, FastifyRequest } from 'fastify'
import { MemoryStore } from '../index.js'
import type { IdempotencyStore } from '../index.js'
import { build } from './helpers/app.js'

/** A memory store behind a turn of the event loop per claim. */
function asynchronous (inner: MemoryStore): IdempotencyStore {
  return {
    claim: async (...args) => { await tick(); return inner.claim(...args) },
    complete: (...args) => inner.complete(...args),
    release: (...args) => inner.release(...args),
    renew: (...args) => inner.renew(...args)
  }
}

type Marked = FastifyRequest & { sameTurn?: boolean }

/**
 * A route whose own preHandler marks the request as in "the same turn" until
 * the next microtask: the handler and an onSend hook record whether they ran
 * before it.
 */
async function markedApp (t: Test, store: IdempotencyStore, options: object = {}) {
  const app: FastifyInstance = await build(t, { store, ...options })
  const seen = { handler: [] as boolean[], onSend: [] as boolean[] }
  let runs = 0
  app.post('/', {
    preHandler (request: Marked, _reply, done) {
      request.sameTurn = true
      queueMicrotask(() => { request.sameTurn = false })
      done()
    },
    onSend (request: Marked, _reply, payload, done) {
      seen.onSend.push(request.sameTurn === true)
      done(null, payload)
    }
  }, async (request: Marked) => {
    seen.handler.push(request.sameTurn === true)
    return { run: ++runs }
  })
  await app.ready()
  const post = (key: string, body: object = { a: 1 }) => app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': key }, payload: body })
  return { app, seen, post }
}

t.test('the memory store: the handler and a replay follow the preHandlers in the same turn', async (t) => {
  const store = new MemoryStore()
  t.teardown(() => store.close())
  const { seen, post } = await markedApp(t, store)
  const first = await post('k1')
  t.equal(first.statusCode, 200)
  t.same(seen.handler, [true], 'the handler ran without a microtask between the preHandlers and it')
  const replay = await post('k1')
  t.same(replay.json(), { run: 1 })
  t.equal(replay.headers['idempotent-replayed'], 'true')
  t.same(seen.handler, [true], 'the replay ran no handler')
  t.same(seen.onSend.slice(1), [true], 'the replay reached onSend in the same turn')
  const mismatch = await post('k1', { a: 2 })
  t.equal(mismatch.statusCode, 422, 'a mismatch found at once is refused at once')
  t.equal(mismatch.json().code, 'FST_IDEMPOTENCY_FINGERPRINT_MISMATCH')
})

t.test('problem+json: a mismatch found at once is answered through the hook chain', async (t) => {
  const store = new MemoryStore()
  t.teardown(() => store.close())
  const { post, seen } = await markedApp(t, store, { errors: 'problem+json' })
  t.equal((await post('k1')).statusCode, 200)
  const mismatch = await post('k1', { a: 2 })
  t.equal(mismatch.statusCode, 422)
  t.match(mismatch.headers['content-type'], /^application\/problem\+json/)
  t.same(seen.handler, [true], 'the handler ran once')
  t.same(seen.onSend.slice(1), [true], 'the refusal was sent in the same turn')
})

t.test('a store that answers later: waited for, with the same answers', async (t) => {
  const store = new MemoryStore()
  t.teardown(() => store.close())
  const { seen, post } = await markedApp(t, asynchronous(store))
  t.equal((await post('k1')).statusCode, 200)
  t.same(seen.handler, [false], 'the handler ran after the claim was waited for')
  const replay = await post('k1')
  t.same(replay.json(), { run: 1 })
  t.same(seen.onSend.slice(1), [false], 'the replay was sent after the claim was waited for')
  t.equal((await post('k1', { a: 2 })).statusCode, 422)
})
