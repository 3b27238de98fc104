/**
 * `manual: true`: the handler decides what a duplicate of a completed request
 * gets, reading `reply.idempotency`; its own reply is never saved over the
 * original. In-flight duplicates and fingerprint mismatches are handled as on
 * any other route.
 */
import { test } from 'tap'
import type { IdempotencyReplyState } from '../index.js'
import { build, gate, RecordingStore, until } from './helpers/app.js'

async function manualApp (t: Parameters<typeof build>[0]) {
  const store = new RecordingStore()
  t.teardown(() => store.close())
  const app = await build(t, { store })
  const seen: Array<{ key: string | undefined, exists: boolean, replayed: boolean, response: { statusCode: number, headers: Record<string, unknown>, body: string } | undefined }> = []
  const hold = { gate: undefined as ReturnType<typeof gate> | undefined }
  app.post('/pay', { config: { idempotency: { manual: true } } }, async (_request, reply) => {
    const state: IdempotencyReplyState = reply.idempotency
    seen.push({
      key: state.key,
      exists: state.exists,
      replayed: state.replayed,
      response: state.response && { ...state.response, body: state.response.body.toString() }
    })
    if (hold.gate !== undefined) await hold.gate.promise
    if (state.exists) {
      reply.code(200).header('x-duplicate', 'yes')
      return { duplicateOf: JSON.parse(state.response!.body.toString()) }
    }
    reply.code(201).header('x-charge', 'ch_1')
    return { charged: seen.length }
  })
  const send = (payload: object = { amount: 5 }, key = 'k') =>
    app.inject({ method: 'POST', url: '/pay', headers: { 'idempotency-key': key }, payload })
  return { app, store, seen, hold, send }
}

test('manual: the handler runs for a duplicate and reads exists and response', async (t) => {
  const { store, seen, send } = await manualApp(t)
  const first = await send()
  t.equal(first.statusCode, 201)
  t.same(first.json(), { charged: 1 })
  t.same(seen[0], { key: 'k', exists: false, replayed: false, response: undefined })

  const dup = await send()
  t.equal(dup.statusCode, 200)
  t.same(dup.json(), { duplicateOf: { charged: 1 } })
  t.equal(dup.headers['x-duplicate'], 'yes')
  t.equal(dup.headers['idempotent-replayed'], undefined, 'not a replay: the handler answered')
  t.same(seen[1], {
    key: 'k',
    exists: true,
    replayed: false,
    response: { statusCode: 201, headers: { 'content-type': 'application/json; charset=utf-8', 'x-charge': 'ch_1' }, body: '{"charged":1}' }
  })

  const again = await send()
  t.same(again.json(), { duplicateOf: { charged: 1 } }, 'the duplicate reply was not saved over the original')
  t.equal(seen[2].response?.statusCode, 201)
  t.equal(store.completes.length, 1)
  t.equal(store.releases.length, 0)
})

test('manual: an in-flight duplicate gets 409 and the handler does not run for it', async (t) => {
  const { seen, hold, send } = await manualApp(t)
  hold.gate = gate()
  const original = send()
  await until(() => seen.length === 1)
  const dup = await send()
  t.equal(dup.statusCode, 409)
  t.equal(dup.json().code, 'FST_IDEMPOTENCY_IN_FLIGHT')
  t.equal(seen.length, 1)
  hold.gate.open()
  t.equal((await original).statusCode, 201)
})

test('manual: a different payload with the same key gets 422 and the handler does not run', async (t) => {
  const { seen, send } = await manualApp(t)
  await send({ amount: 5 })
  const other = await send({ amount: 6 })
  t.equal(other.statusCode, 422)
  t.equal(other.json().code, 'FST_IDEMPOTENCY_FINGERPRINT_MISMATCH')
  t.equal(seen.length, 1)
})

test('manual: a failing duplicate handler leaves the original record alone', async (t) => {
  const store = new RecordingStore()
  t.teardown(() => store.close())
  const app = await build(t, { store })
  let runs = 0
  app.post('/', { config: { idempotency: { manual: true } } }, async (_request, reply) => {
    runs++
    if (reply.idempotency.exists) throw new Error('duplicate handler failed')
    return { first: true }
  })
  const send = () => app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  await send()
  t.equal((await send()).statusCode, 500)
  t.equal(store.releases.length, 0, 'nothing released')
  t.equal((await send()).statusCode, 500, 'still a duplicate: the record survived')
  t.equal(runs, 3)
})

test('manual: without a key the handler sees nothing', async (t) => {
  const { seen, app } = await manualApp(t)
  await app.inject({ method: 'POST', url: '/pay', payload: {} })
  t.same(seen[0], { key: undefined, exists: false, replayed: false, response: undefined })
})
