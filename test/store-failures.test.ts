/**
 * When a claim fails in the store: a read-only lookup still replays completed
 * keys and answers in-flight ones (only an absent key follows onStoreError);
 * a duplicate that has seen its key in flight never fails open beside the
 * original; and waits are measured on the monotonic clock, whatever the
 * application's wall clock does.
 */
import t from 'tap'
import { MemoryStore, errors } from '../index.js'
import type { IdempotencyRecord, IdempotencyStore, StoreErrorPolicy } from '../index.js'
import { build, capturingLogger, ERROR, gate, heldHandler, until, type LogLine } from './helpers/app.js'

/** A memory store whose claims fail on demand, and which can be read while they do. */
function failingClaims (options: { lookup?: 'works' | 'fails' | 'none' } = {}) {
  const inner = new MemoryStore()
  t.teardown(() => inner.close())
  const control = { failClaims: false, failAfter: Infinity, claims: 0, lookups: 0 }
  const store: IdempotencyStore = {
    claim (key, fingerprint, lockTtl) {
      control.claims++
      if (control.failClaims || control.claims > control.failAfter) throw new Error('claim timed out')
      return inner.claim(key, fingerprint, lockTtl)
    },
    complete: inner.complete.bind(inner),
    release: inner.release.bind(inner),
    renew: inner.renew.bind(inner)
  }
  if (options.lookup !== 'none') {
    store.lookup = async (key): Promise<IdempotencyRecord | undefined> => {
      control.lookups++
      if (options.lookup === 'fails') throw new Error('lookup failed too')
      const result = inner.claim(key, undefined, 1000)
      if (result.token !== undefined) {
        inner.release(key, result.token) // absent: leave nothing behind
        return undefined
      }
      return result.record
    }
  }
  return { store, control }
}

const send = (app: Awaited<ReturnType<typeof build>>, key = 'k', body: object = { a: 1 }) =>
  app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': key }, payload: body })

t.test('a failed claim falls back to a read: completed keys replay, in-flight keys answer 409, absent keys follow the policy', async (t) => {
  for (const policy of ['fail-closed', 'fail-open'] as StoreErrorPolicy[]) {
    const lines: LogLine[] = []
    const { store, control } = failingClaims()
    const app = await build(t, { store, onStoreError: policy }, capturingLogger(lines))
    const slow = gate()
    let runs = 0
    app.post('/', async (request) => {
      runs++
      if ((request.body as { slow?: boolean }).slow === true) await slow.promise
      return { run: runs }
    })
    const first = await send(app, 'done')
    const original = send(app, 'running', { slow: true })
    await until(() => runs === 2)
    control.failClaims = true

    const replay = await send(app, 'done')
    t.equal(replay.statusCode, 200, `${policy}: a completed key is replayed from the read`)
    t.equal(replay.headers['idempotent-replayed'], 'true')
    t.equal(replay.body, first.body)
    const mismatch = await send(app, 'done', { a: 2 })
    t.equal(mismatch.statusCode, 422, `${policy}: and a different body is still a 422`)
    const inFlight = await send(app, 'running', { slow: true })
    t.equal(inFlight.statusCode, 409, `${policy}: an in-flight key answers 409, never runs beside the original`)
    const absent = await send(app, 'new')
    t.equal(absent.statusCode, policy === 'fail-open' ? 200 : 503, `${policy}: an absent key follows the policy`)
    t.equal(runs, policy === 'fail-open' ? 3 : 2)
    t.ok(lines.some((line) => line.level === ERROR && line.msg === 'idempotency: store failed; the key was read instead (read-only lookup)'))
    control.failClaims = false
    slow.open()
    await original
  }
})

t.test('without a lookup, or when it fails too: the policy decides, as before', async (t) => {
  for (const lookup of ['none', 'fails'] as const) {
    const { store, control } = failingClaims({ lookup })
    const app = await build(t, { store })
    let runs = 0
    app.post('/', async () => ({ run: ++runs }))
    await send(app, 'done')
    control.failClaims = true
    t.equal((await send(app, 'done')).statusCode, 503, `lookup ${lookup}: fail-closed`)
    t.equal(control.lookups, lookup === 'none' ? 0 : 1)
  }
})

t.test('a duplicate that has seen its key in flight never fails open when a later poll fails', async (t) => {
  const { store, control } = failingClaims({ lookup: 'none' })
  const app = await build(t, { store, onStoreError: 'fail-open', inFlight: { wait: 2000 } })
  const slow = heldHandler(({ run }) => ({ run }))
  app.post('/', slow.handler)
  const original = send(app)
  await until(() => slow.runs() === 1)
  const claimsBefore = control.claims
  control.failAfter = claimsBefore + 1 // the waiter's first look sees the original in flight; the next ones fail
  const duplicate = await send(app)
  t.equal(duplicate.statusCode, 409, 'answered in flight')
  t.equal(duplicate.json().code, 'FST_IDEMPOTENCY_IN_FLIGHT')
  t.equal(slow.runs(), 1, 'never ran beside the original')
  control.failAfter = Infinity
  slow.open()
  t.equal((await original).statusCode, 200)
})

t.test('a store that refuses claims because it may evict records (redis.requireNoEviction): 503 even with fail-open', async (t) => {
  const inner = new MemoryStore()
  t.teardown(() => inner.close())
  const store: IdempotencyStore = {
    claim () { throw new errors.RedisEvictionError('allkeys-lru') },
    complete: inner.complete.bind(inner),
    release: inner.release.bind(inner),
    renew: inner.renew.bind(inner)
  }
  const lines: LogLine[] = []
  const app = await build(t, { store, onStoreError: 'fail-open' }, capturingLogger(lines))
  let runs = 0
  app.post('/', async () => ({ run: ++runs }))
  const res = await send(app)
  t.equal(res.statusCode, 503)
  t.equal(res.json().code, 'FST_IDEMPOTENCY_STORE_UNAVAILABLE')
  t.equal(res.headers['retry-after'], '1')
  t.equal(runs, 0, 'never run without idempotency')
  t.ok(lines.some((line) => line.level === ERROR && /may evict records/.test(line.msg)))
})

t.test('inFlight.wait is measured on the monotonic clock: a wall clock stepped back does not stretch it', async (t) => {
  const app = await build(t, { inFlight: { wait: 300 } })
  const slow = heldHandler('done')
  app.post('/', slow.handler)
  const original = send(app)
  await new Promise((resolve) => setTimeout(resolve, 20))
  const realNow = Date.now
  let calls = 0
  Date.now = () => realNow() - 30_000 * Math.min(++calls, 2) // the wall clock steps back 30 s, then 60 s
  t.teardown(() => { Date.now = realNow })
  const started = performance.now()
  const waiter = await send(app)
  const waited = performance.now() - started
  Date.now = realNow
  t.equal(waiter.statusCode, 409)
  t.ok(waited >= 290 && waited < 1500, `answered after ${Math.round(waited)} ms (wait 300 ms)`)
  slow.open()
  await original
})

t.test('a store that fails with no error object (undefined, null, a string) gets the onStoreError policy, never a 500', async (t) => {
  for (const thrown of [undefined, null, 'down']) {
    for (const how of ['throws', 'rejects'] as const) {
      for (const policy of ['fail-closed', 'fail-open'] as StoreErrorPolicy[]) {
        const inner = new MemoryStore()
        t.teardown(() => inner.close())
        const store: IdempotencyStore = {
          claim () {
            if (how === 'throws') throw thrown
            return Promise.reject(thrown)
          },
          complete: inner.complete.bind(inner),
          release: inner.release.bind(inner),
          renew: inner.renew.bind(inner)
        }
        const seen: unknown[] = []
        const app = await build(t, { store, onStoreError: (_request, _key, err) => { seen.push(err); return policy } })
        let runs = 0
        app.post('/', async () => ({ run: ++runs }))
        const res = await send(app)
        const label = `${String(thrown)}, ${how}, ${policy}`
        t.equal(res.statusCode, policy === 'fail-open' ? 200 : 503, `${label}: the policy decides`)
        if (policy === 'fail-closed') t.equal(res.json().code, 'FST_IDEMPOTENCY_STORE_UNAVAILABLE', label)
        t.equal(runs, policy === 'fail-open' ? 1 : 0, `${label}: the handler runs only when the policy lets it`)
        t.same(seen, [thrown], `${label}: onStoreError is given what the store threw`)
        await app.close()
      }
    }
  }
})
