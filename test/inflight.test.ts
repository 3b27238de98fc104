/**
 * Duplicates of a request that is still running: 409 (or 423) with
 * Retry-After at once, or, with `inFlight.wait`, a wait for the original
 * that ends in its replay, in running the handler (the original released the
 * key), or in the in-flight status (the original is still running).
 */
import { test } from 'tap'
import type { ClaimResult, FastifyIdempotencyOptions, IdempotencyStore } from '../index.js'
import { build, gate, RecordingStore, until } from './helpers/app.js'

async function slowApp (t: Parameters<typeof build>[0], options: FastifyIdempotencyOptions = {}) {
  const store = new RecordingStore()
  t.teardown(() => store.close())
  const app = await build(t, { store, ...options })
  const first = gate()
  const state = { runs: 0, fail: false }
  app.post('/', async (_request, reply) => {
    const run = ++state.runs
    if (run === 1) {
      await first.promise
      if (state.fail) throw new Error('original failed')
    }
    reply.code(201)
    return { run }
  })
  const send = () => app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' }, payload: { a: 1 } })
  return { app, store, first, state, send }
}

test('a duplicate of a running request gets 409 with Retry-After by default; the handler runs once', async (t) => {
  const { first, state, send } = await slowApp(t)
  const original = send()
  await until(() => state.runs === 1)
  for (let i = 0; i < 3; i++) {
    const dup = await send()
    t.equal(dup.statusCode, 409)
    t.same(dup.json(), {
      statusCode: 409,
      code: 'FST_IDEMPOTENCY_IN_FLIGHT',
      error: 'Conflict',
      message: 'A request with this idempotency key is still being processed; retry later'
    })
    t.ok(Number(dup.headers['retry-after']) >= 1, 'Retry-After is at least 1 second')
    t.equal(dup.headers['idempotent-replayed'], undefined)
  }
  first.open()
  t.equal((await original).statusCode, 201)
  const replay = await send()
  t.equal(replay.statusCode, 201, 'the 409s did not touch the claim: the original was saved')
  t.equal(replay.headers['retry-after'], undefined)
  t.equal(state.runs, 1)
})

test('inFlight.statusCode 423', async (t) => {
  const { first, state, send } = await slowApp(t, { inFlight: { statusCode: 423 } })
  const original = send()
  await until(() => state.runs === 1)
  const dup = await send()
  t.equal(dup.statusCode, 423)
  t.equal(dup.json().code, 'FST_IDEMPOTENCY_IN_FLIGHT')
  t.equal(dup.json().error, 'Locked')
  t.ok(Number(dup.headers['retry-after']) >= 1)
  first.open()
  await original
  t.equal(state.runs, 1)
})

test('inFlight.wait: a duplicate waits for the original and replays it', async (t) => {
  const { store, first, state, send } = await slowApp(t, { inFlight: { wait: 10_000 } })
  const original = send()
  await until(() => state.runs === 1)
  const dup = send()
  await until(() => store.claims.length >= 3) // the duplicate has looked at least twice
  first.open()
  const [a, b] = await Promise.all([original, dup])
  t.equal(a.statusCode, 201)
  t.equal(b.statusCode, 201)
  t.equal(b.body, a.body)
  t.equal(b.headers['idempotent-replayed'], 'true')
  t.equal(state.runs, 1)
})

test('inFlight.wait: when the original fails and releases the key, the waiter runs the handler itself', async (t) => {
  const { store, first, state, send } = await slowApp(t, { inFlight: { wait: 10_000 } })
  state.fail = true
  const original = send()
  await until(() => state.runs === 1)
  const dup = send()
  await until(() => store.claims.length >= 2)
  first.open()
  const [a, b] = await Promise.all([original, dup])
  t.equal(a.statusCode, 500)
  t.equal(b.statusCode, 201)
  t.same(b.json(), { run: 2 })
  t.equal(b.headers['idempotent-replayed'], undefined, 'not a replay: its own run')
  t.equal(state.runs, 2)
  const replay = await send()
  t.same(replay.json(), { run: 2 })
  t.equal(replay.headers['idempotent-replayed'], 'true')
})

test('inFlight.wait: when the wait runs out, the duplicate gets the in-flight status', async (t) => {
  for (const [statusCode, expected] of [[undefined, 409], [423, 423]] as const) {
    const { store, first, state, send } = await slowApp(t, { inFlight: { wait: 30, statusCode } })
    const original = send()
    await until(() => state.runs === 1)
    const dup = await send()
    t.equal(dup.statusCode, expected, `inFlight.statusCode ${statusCode}`)
    t.equal(dup.json().code, 'FST_IDEMPOTENCY_IN_FLIGHT')
    t.ok(Number(dup.headers['retry-after']) >= 1)
    t.ok(store.claims.length > 2, 'the duplicate looked more than once before giving up')
    first.open()
    await original
    t.equal(state.runs, 1)
  }
})

test('inFlight.wait: a duplicate of a completed request is replayed at once', async (t) => {
  const { first, state, send } = await slowApp(t, { inFlight: { wait: 10_000 } })
  first.open()
  await send()
  const replay = await send()
  t.equal(replay.headers['idempotent-replayed'], 'true')
  t.equal(state.runs, 1)
})

test('inFlight.wait: a waiter that finds the key taken over by a different request gets 422', async (t) => {
  // A scripted store: the original is in flight, then (it failed and released the key)
  // a request with another payload claimed it before the waiter looked again.
  const answers: ClaimResult[] = [
    { record: { state: 'in-flight', fingerprint: 'payload-a' } },
    { record: { state: 'in-flight', fingerprint: 'payload-a' } },
    { record: { state: 'in-flight', fingerprint: 'payload-b' } }
  ]
  let claims = 0
  const store: IdempotencyStore = {
    claim: () => answers[claims++],
    complete: () => true,
    release: () => true,
    renew: () => true
  }
  const app = await build(t, { store, inFlight: { wait: 10_000 }, fingerprint: () => 'payload-a' })
  let runs = 0
  app.post('/', async () => ({ run: ++runs }))
  const res = await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  t.equal(res.statusCode, 422)
  t.equal(res.json().code, 'FST_IDEMPOTENCY_FINGERPRINT_MISMATCH')
  t.equal(claims, 3)
  t.equal(runs, 0)
})
