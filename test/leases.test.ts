/**
 * Leases seen from the handler: `reply.idempotency.token` strictly increases
 * across successive claims of a key, and `reply.idempotency.signal` aborts
 * when the claim can no longer be trusted (renewals fail, the lease is lost,
 * the event loop was blocked past the lease), never while renewals succeed.
 * Renewal problems are logged once per claim; a late renewal tick is logged
 * with how late it was.
 */
import t from 'tap'
import { MemoryStore } from '../index.js'
import type { IdempotencyStore } from '../index.js'
import { build, capturingLogger, ERROR, gate, sleep, until, valuesStore, WARN, type LogLine } from './helpers/app.js'

// The plugin's timers are unref'd (a held claim never keeps a process alive); injected requests
// hold no socket, so this keeps the test process up while handlers wait for their signal.
const keepAlive = setInterval(() => {}, 1000)
t.teardown(() => clearInterval(keepAlive))

/** A memory store whose renew() can be made to throw or to report the claim lost. */
function renewing (mode: { renew: 'ok' | 'throws' | 'lost' | 'hangs' }): IdempotencyStore & { renewals: number } {
  const inner = new MemoryStore()
  t.teardown(() => inner.close())
  const store = {
    renewals: 0,
    claim: (key: string, fingerprint: string | undefined, lockTtl: number) => inner.claim(key, fingerprint, lockTtl),
    complete: inner.complete.bind(inner),
    release: inner.release.bind(inner),
    renew: async (key: string, token: string, lockTtl: number) => {
      store.renewals++
      if (mode.renew === 'throws') throw new Error('store unreachable')
      if (mode.renew === 'lost') return false
      if (mode.renew === 'hangs') return await new Promise<boolean>(() => {})
      return inner.renew(key, token, lockTtl)
    }
  }
  return store
}

t.test('tokens: decimal integers, strictly increasing across successive claims of one key', async (t) => {
  const app = await build(t)
  const tokens: string[] = []
  app.post('/', async (_request, reply) => {
    tokens.push(reply.idempotency.token as string)
    reply.code(500)
    return 'try again'
  })
  for (let i = 0; i < 5; i++) await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  t.equal(tokens.length, 5, 'each failed attempt released the key, so each retry claimed it again')
  for (const token of tokens) t.match(token, /^[1-9][0-9]*$/)
  for (let i = 1; i < tokens.length; i++) t.ok(BigInt(tokens[i]) > BigInt(tokens[i - 1]), `${tokens[i]} > ${tokens[i - 1]}`)
})

t.test('the signal is not aborted while renewals succeed, even past several lockTtl', async (t) => {
  const store = renewing({ renew: 'ok' })
  const app = await build(t, { store, lockTtl: 1000 })
  let aborted: boolean | undefined
  app.post('/', async (_request, reply) => {
    const { signal } = reply.idempotency
    await sleep(2200)
    aborted = signal.aborted
    return 'done'
  })
  const res = await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  t.equal(res.statusCode, 200)
  t.equal(aborted, false)
  t.ok(store.renewals >= 5, `renewed ${store.renewals} times`)
})

t.test('renewals fail: the signal aborts before the lease could run out; the failure is logged once', async (t) => {
  for (const renew of ['throws', 'hangs'] as const) {
    const lines: LogLine[] = []
    const store = renewing({ renew })
    const app = await build(t, { store, lockTtl: 1000 }, capturingLogger(lines))
    let abortedAfter: number | undefined
    app.post('/', async (_request, reply) => {
      const started = performance.now()
      const { signal } = reply.idempotency
      await new Promise<void>((resolve) => signal.addEventListener('abort', () => resolve()))
      abortedAfter = performance.now() - started
      t.match(String(signal.reason), /not renewed in time/, `${renew}: the reason says why`)
      return 'stopped'
    })
    const res = await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
    t.equal(res.statusCode, 200)
    t.ok(abortedAfter !== undefined && abortedAfter < 1000, `${renew}: aborted after ${Math.round(abortedAfter ?? -1)} ms, before lockTtl (1000 ms)`)
    t.ok(abortedAfter !== undefined && abortedAfter >= 850, `${renew}: and not long before (lockTtl minus a 10% margin)`)
    if (renew === 'throws') {
      t.ok(store.renewals >= 2, 'renewals went on after the first failure')
      t.equal(lines.filter((line) => line.level === ERROR && /lease renewal failed/.test(line.msg)).length, 1, 'logged once for the claim')
    }
  }
})

t.test('a renewal that finds the claim gone: the signal aborts at once, renewals stop, nothing is saved', async (t) => {
  const lines: LogLine[] = []
  const store = renewing({ renew: 'lost' })
  const app = await build(t, { store, lockTtl: 1000 }, capturingLogger(lines))
  let runs = 0
  let abortedAfter: number | undefined
  app.post('/', async (_request, reply) => {
    runs++
    const started = performance.now()
    await new Promise<void>((resolve) => reply.idempotency.signal.addEventListener('abort', () => resolve()))
    abortedAfter = performance.now() - started
    await sleep(400) // another renewal interval: no second renewal
    return { run: runs }
  })
  const res = await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  t.equal(res.statusCode, 200)
  t.ok(abortedAfter !== undefined && abortedAfter < 500, `aborted at the first renewal (${Math.round(abortedAfter ?? -1)} ms)`)
  t.equal(store.renewals, 1, 'not renewed again')
  const lost = lines.filter((line) => line.level === ERROR && /lease of a running handler was lost/.test(line.msg))
  t.equal(lost.length, 1)
  const retry = await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  t.equal(retry.headers['idempotent-replayed'], undefined, 'the response of a lost claim was not saved')
})

t.test('a renewal that answers after its claim ended changes nothing: the saved response stays, nothing is logged', async (t) => {
  const lines: LogLine[] = []
  const answer = gate()
  let renewals = 0
  // Held until the test lets it answer, then "lost": an answer that counted would abort and log.
  const store = valuesStore(t, { renew: async () => { renewals++; await answer.promise; return false } })
  const app = await build(t, { store, lockTtl: 1000 }, capturingLogger(lines))
  app.post('/', async () => {
    await until(() => renewals === 1, 200)
    return { done: true }
  })
  const res = await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  t.equal(res.statusCode, 200)
  answer.open()
  await sleep(20)
  t.same(lines.filter((line) => line.level >= WARN).map((line) => line.msg), [], 'no lease lost, no failure')
  const retry = await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  t.equal(retry.headers['idempotent-replayed'], 'true', 'the response saved before the answer is replayed')
})

t.test('an event loop blocked past the lease: the late renewal tick is logged, and the signal aborts', async (t) => {
  const lines: LogLine[] = []
  const store = renewing({ renew: 'ok' })
  const app = await build(t, { store, lockTtl: 1000 }, capturingLogger(lines))
  let aborted: boolean | undefined
  app.post('/', async (_request, reply) => {
    const { signal } = reply.idempotency
    const until = Date.now() + 1500
    while (Date.now() < until) { /* 1.5 s of synchronous work */ }
    await sleep(50)
    aborted = signal.aborted
    return 'done'
  })
  await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  t.equal(aborted, true, 'the handler can tell that a duplicate may have started')
  const late = lines.find((line) => line.level === WARN && /lease renewal ran \d+ ms late/.test(line.msg))
  t.ok(late, 'the late tick is logged')
  t.ok((late?.lateMs as number) >= 1000, `with how late: ${late?.lateMs} ms`)
})

t.test('a signal first read after the lease may have run out is aborted already', async (t) => {
  const store = renewing({ renew: 'ok' })
  const app = await build(t, { store, lockTtl: 1000 })
  let aborted: boolean | undefined
  app.post('/', async (_request, reply) => {
    const until = Date.now() + 1100
    while (Date.now() < until) { /* synchronous work past the whole lease, before the handler looks */ }
    aborted = reply.idempotency.signal.aborted
    return 'done'
  })
  await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  t.equal(aborted, true)
})

t.test('the app closing while a handler waits on its signal: the abort timer goes with it', async (t) => {
  const app = await build(t, { lockTtl: 1000 })
  const started = gate()
  app.post('/', async (_request, reply) => {
    reply.idempotency.signal.addEventListener('abort', () => {})
    started.open()
    await sleep(100)
    return 'done'
  })
  const answer = app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  await started.promise
  await app.close()
  t.equal((await answer).statusCode, 200, 'the handler still answers')
})

t.test('the signal of a request without a claim never aborts; read after the claim ended, it stays as it was', async (t) => {
  const app = await build(t, { lockTtl: 1000 })
  const signals: AbortSignal[] = []
  app.post('/', async (_request, reply) => {
    signals.push(reply.idempotency.signal)
    return 'ok'
  })
  await app.inject({ method: 'POST', url: '/' })
  await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  await sleep(1100)
  t.equal(signals.length, 2)
  t.equal(signals[0].aborted, false, 'no key: never aborted')
  t.equal(signals[1].aborted, false, 'a completed claim: never aborted afterwards')
})
