/**
 * The request lifecycle: whatever happens (errors, timeouts, aborts, hijacks,
 * store failures), every claim ends completed or released, never while its
 * handler may still be running; slow handlers keep their lease.
 */
import { request as httpRequest } from 'node:http'
import type { AddressInfo } from 'node:net'
import { test } from 'tap'
import Fastify from 'fastify'
import fastifyIdempotency, { MemoryStore } from '../index.js'
import type { IdempotencyStore, StoredResponse } from '../index.js'
import { build, capturingLogger, ERROR, FlakyStore, gate, heldHandler, RecordingStore, sleep, until, valuesStore, type LogLine } from './helpers/app.js'

test('every claim ends completed or released, whatever the handler does', async (t) => {
  const store = new RecordingStore()
  t.teardown(() => store.close())
  const app = await build(t, { store })
  const behaviours: Record<string, () => unknown> = {
    ok: () => ({ ok: true }),
    throws: () => { throw new Error('boom') },
    rejects: () => Promise.reject(new Error('nope')),
    status: () => Object.assign(new Error('teapot'), { statusCode: 418 })
  }
  app.post('/:what', async (request) => {
    const result = behaviours[(request.params as { what: string }).what]()
    if (result instanceof Error) throw result
    return result
  })
  let tokens = 0
  for (const what of Object.keys(behaviours)) {
    for (let i = 0; i < 2; i++) {
      const before = store.claims.length
      await app.inject({ method: 'POST', url: `/${what}`, headers: { 'idempotency-key': 'k' } })
      if (store.claims.length > before && (what !== 'ok' || i === 0)) tokens++
    }
  }
  t.equal(tokens, 7, 'the ok key was claimed once, each failing one twice')
  t.equal(store.completes.length + store.releases.length, tokens, 'every claim completed or released')
  t.equal(store.completes.length, 1)
})

test('handlerTimeout: the claim is held until the handler ends, then released; no parallel run', async (t) => {
  const store = new RecordingStore()
  t.teardown(() => store.close())
  const app = await build(t, { store }, { handlerTimeout: 30 })
  const slow = gate()
  let running = 0
  let maxRunning = 0
  let runs = 0
  app.post('/', async () => {
    runs++
    maxRunning = Math.max(maxRunning, ++running)
    try {
      if (runs === 1) await slow.promise
      return { run: runs }
    } finally {
      running--
    }
  })
  const send = () => app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  const timedOut = await send()
  t.equal(timedOut.statusCode, 503)
  t.equal(timedOut.json().code, 'FST_ERR_HANDLER_TIMEOUT')
  t.equal(running, 1, 'the handler is still running')
  t.equal(store.releases.length, 0, 'the claim was not released when the 503 went out')
  for (let i = 0; i < 2; i++) {
    const dup = await send()
    t.equal(dup.statusCode, 409, 'a duplicate during that window is refused')
  }
  t.equal(runs, 1)
  slow.open()
  await until(() => store.releases.length === 1)
  t.equal(store.releases.length, 1, 'released when the handler ended')
  t.equal(store.completes.length, 0, 'a result that no client received is not saved')
  const retry = await send()
  t.equal(retry.statusCode, 200)
  t.same(retry.json(), { run: 2 })
  t.equal(maxRunning, 1, 'never two runs at once')
  t.equal((await send()).headers['idempotent-replayed'], 'true')
})

test('handlerTimeout that fires while the claim is pending: the handler never runs and the claim is released', async (t) => {
  let hold: Promise<void> | undefined
  const recorded = new RecordingStore()
  t.teardown(() => recorded.close())
  const store: IdempotencyStore = {
    claim: async (key, fingerprint, lockTtl) => {
      if (hold !== undefined) await hold
      return recorded.claim(key, fingerprint, lockTtl)
    },
    complete: (key, token, response, ttl) => recorded.complete(key, token, response, ttl),
    release: (key, token) => recorded.release(key, token),
    renew: (key, token, lockTtl) => recorded.renew(key, token, lockTtl)
  }
  const app = await build(t, { store }, { handlerTimeout: 20 })
  let runs = 0
  app.post('/', async () => ({ run: ++runs }))
  const slowStore = gate()
  hold = slowStore.promise
  const send = () => app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  const timedOut = await send()
  t.equal(timedOut.statusCode, 503)
  hold = undefined
  slowStore.open() // the claim now succeeds, for a request that was already answered
  await until(() => recorded.releases.length === 1)
  t.equal(recorded.releases.length, 1, 'the orphan claim was released')
  t.equal(runs, 0, 'the handler of an answered request never runs')
  const retry = await send()
  t.equal(retry.statusCode, 200, 'a retry is not blocked until lockTtl')
  t.equal(runs, 1)
})

test('client abort on a real socket: the handler finishes, its result is saved, a retry replays', async (t) => {
  const store = new RecordingStore()
  t.teardown(() => store.close())
  const app = await build(t, { store })
  const slow = heldHandler(({ reply }) => {
    reply.code(201)
    return { charged: true }
  })
  app.post('/', slow.handler)
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as AddressInfo
  const req = httpRequest({ host: '127.0.0.1', port, method: 'POST', path: '/', headers: { 'idempotency-key': 'k', 'content-type': 'application/json' } })
  const clientError = new Promise((resolve) => req.on('error', resolve))
  req.end('{"amount":1}')
  await until(() => slow.runs() === 1)
  req.destroy()
  t.match(await clientError, { code: 'ECONNRESET' })
  const during = await fetch(`http://127.0.0.1:${port}/`, { method: 'POST', headers: { 'idempotency-key': 'k', 'content-type': 'application/json' }, body: '{"amount":1}' })
  t.equal(during.status, 409, 'the handler still runs: the claim is held')
  slow.open()
  await until(() => store.completes.length === 1)
  const retry = await fetch(`http://127.0.0.1:${port}/`, { method: 'POST', headers: { 'idempotency-key': 'k', 'content-type': 'application/json' }, body: '{"amount":1}' })
  t.equal(retry.status, 201)
  t.equal(retry.headers.get('idempotent-replayed'), 'true')
  t.same(await retry.json(), { charged: true })
  t.equal(slow.runs(), 1)
})

test('reply.hijack(): the claim is released when the handler ends, nothing is saved', async (t) => {
  const store = new RecordingStore()
  t.teardown(() => store.close())
  const app = await build(t, { store })
  let runs = 0
  app.post('/sync', (_request, reply) => {
    runs++
    reply.hijack()
    reply.raw.writeHead(200, { 'content-type': 'text/plain' })
    reply.raw.end('raw')
  })
  app.post('/async', async (_request, reply) => {
    runs++
    reply.hijack()
    await sleep(1)
    reply.raw.writeHead(202, { 'content-type': 'text/plain' })
    reply.raw.end('raw async')
  })
  app.post('/later', async (_request, reply) => {
    runs++
    reply.hijack()
    setTimeout(() => reply.raw.end('raw later'), 5)
  })
  for (const url of ['/sync', '/async', '/later']) {
    const first = await app.inject({ method: 'POST', url, headers: { 'idempotency-key': 'k' } })
    const second = await app.inject({ method: 'POST', url, headers: { 'idempotency-key': 'k' } })
    t.equal(second.body, first.body, url)
    t.equal(second.headers['idempotent-replayed'], undefined, `${url}: not replayed`)
  }
  t.equal(runs, 6, 'each retry ran again')
  t.equal(store.completes.length, 0)
  t.equal(store.releases.length, 6)
})

test('lease renewal: a handler slower than lockTtl keeps its claim; duplicates get 409; it runs once', async (t) => {
  const store = new FlakyStore()
  t.teardown(() => store.close())
  // Margins are wide so that a loaded machine cannot stall the renewal timer past a lease.
  const app = await build(t, { store, lockTtl: 1000 })
  let runs = 0
  app.post('/', async () => {
    runs++
    await sleep(2600)
    return { run: runs }
  })
  const send = () => app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  const original = send()
  await until(() => runs === 1)
  const statuses: number[] = []
  for (let i = 0; i < 5; i++) {
    await sleep(450)
    statuses.push((await send()).statusCode)
  }
  t.same(statuses, [409, 409, 409, 409, 409], 'every duplicate during 2.25+ s (2 lockTtl) got 409')
  const first = await original
  t.equal(first.statusCode, 200)
  t.equal(runs, 1)
  t.ok(store.calls.renew >= 5, `renewed ${store.calls.renew} times`)
  const replay = await send()
  t.equal(replay.body, first.body)
  t.equal(replay.headers['idempotent-replayed'], 'true')
})

test('lease renewal failures are logged at error level', async (t) => {
  for (const [failure, message] of [['throws', /lease renewal failed/], ['lost', /lease of a running handler was lost/]] as const) {
    const lines: LogLine[] = []
    const store = new FlakyStore()
    t.teardown(() => store.close())
    if (failure === 'throws') store.failing.renew = true
    else store.renew = async () => { store.calls.renew++; return false }
    const app = await build(t, { store, lockTtl: 1000 }, capturingLogger(lines))
    app.post('/', async () => {
      await until(() => store.calls.renew >= (failure === 'throws' ? 2 : 1), 1000)
      if (failure === 'lost') await sleep(400) // one more renewal interval: a lost claim is not renewed again
      await sleep(5)
      return 'ok'
    })
    const res = await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
    t.equal(res.statusCode, 200, failure)
    const errors = lines.filter((l) => l.level === ERROR && message.test(l.msg))
    t.equal(errors.length, 1, `${failure}: logged once for the claim`)
    t.type(errors[0].idempotencyKey, 'string')
    t.equal(store.calls.renew, failure === 'throws' ? 2 : 1, failure === 'throws' ? 'renewal goes on after a failure' : 'a lost claim is not renewed again')
  }
})

/** A store object (not a class) whose methods all fail. */
function brokenStore (): IdempotencyStore & { calls: number } {
  const fail = () => { broken.calls++; throw new Error('connection refused') }
  const broken = { calls: 0, claim: fail, complete: fail, release: fail, renew: fail }
  return broken
}

test('store unavailable, fail-closed: 503 FST_IDEMPOTENCY_STORE_UNAVAILABLE with Retry-After; the handler does not run', async (t) => {
  const lines: LogLine[] = []
  const store = brokenStore()
  const app = await build(t, { store }, capturingLogger(lines))
  let runs = 0
  app.post('/', async () => ({ run: ++runs }))
  const res = await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  t.equal(res.statusCode, 503)
  t.same(res.json(), {
    statusCode: 503,
    code: 'FST_IDEMPOTENCY_STORE_UNAVAILABLE',
    error: 'Service Unavailable',
    message: 'The idempotency store is unavailable; the request was not processed, retry later'
  })
  t.ok(Number(res.headers['retry-after']) >= 1)
  t.equal(runs, 0)
  const logged = lines.find((l) => l.level === ERROR && /fail-closed/.test(l.msg))
  t.equal(logged?.err?.message, 'connection refused')
  t.equal(store.calls, 1, 'nothing but the claim was attempted')
  t.equal((await app.inject({ method: 'POST', url: '/' })).statusCode, 200, 'requests without a key never touch the store')
})

test('store unavailable, fail-open: the handler runs without idempotency', async (t) => {
  const lines: LogLine[] = []
  const store = brokenStore()
  const app = await build(t, { store, onStoreError: 'fail-open' }, capturingLogger(lines))
  let runs = 0
  app.post('/', async (_request, reply) => ({ run: ++runs, key: reply.idempotency.key }))
  const a = await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  const b = await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  t.same([a.statusCode, b.statusCode], [200, 200])
  t.same(b.json(), { run: 2, key: 'k' })
  t.equal(store.calls, 2, 'only the claims: nothing to complete or release')
  t.equal(lines.filter((l) => l.level === ERROR && /fail-open/.test(l.msg)).length, 2)
})

test('onStoreError per route overrides the plugin policy', async (t) => {
  const app = await build(t, { store: brokenStore(), onStoreError: 'fail-open' })
  let runs = 0
  app.post('/open', async () => ({ run: ++runs }))
  app.post('/closed', { config: { idempotency: { onStoreError: 'fail-closed' } } }, async () => ({ run: ++runs }))
  t.equal((await app.inject({ method: 'POST', url: '/open', headers: { 'idempotency-key': 'k' } })).statusCode, 200)
  t.equal((await app.inject({ method: 'POST', url: '/closed', headers: { 'idempotency-key': 'k' } })).statusCode, 503)
  const reverse = await build(t, { store: brokenStore() })
  reverse.post('/open', { config: { idempotency: { onStoreError: 'fail-open' } } }, async () => ({ run: ++runs }))
  t.equal((await reverse.inject({ method: 'POST', url: '/open', headers: { 'idempotency-key': 'k' } })).statusCode, 200)
  t.equal(runs, 2)
})

test('complete() throwing: the client still gets its answer; the failure is logged at error level', async (t) => {
  const lines: LogLine[] = []
  const store = new FlakyStore()
  t.teardown(() => store.close())
  store.failing.complete = true
  const app = await build(t, { store }, capturingLogger(lines))
  let runs = 0
  app.post('/', async (_request, reply) => reply.code(201).send({ run: ++runs }))
  const res = await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  t.equal(res.statusCode, 201)
  t.same(res.json(), { run: 1 })
  // The save goes out once the response is over, and fails a turn later.
  await until(() => lines.some((l) => l.level === ERROR && /could not be saved/.test(l.msg)))
  const logged = lines.find((l) => l.level === ERROR && /could not be saved/.test(l.msg))
  t.equal(logged?.err?.message, 'store down (complete)')
  t.type(logged?.idempotencyKey, 'string')
  t.equal(store.calls.release, 0, 'the claim is not released: the handler did run, so a retry must not run it again')
  t.equal((await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })).statusCode, 409)
  t.equal(runs, 1)
})

test('complete() throwing synchronously: the client still gets its answer; the failure is logged at error level', async (t) => {
  const lines: LogLine[] = []
  const store = new MemoryStore()
  t.teardown(() => store.close())
  const saves: string[] = []
  // A store whose complete() is not async and throws before returning anything.
  const syncThrowing: IdempotencyStore = {
    claim: (key, fingerprint, lockTtl) => store.claim(key, fingerprint, lockTtl),
    complete: (key) => { saves.push(key); throw new Error('store down (sync complete)') },
    release: (key, token) => store.release(key, token),
    renew: (key, token, lockTtl) => store.renew(key, token, lockTtl)
  }
  const app = await build(t, { store: syncThrowing }, capturingLogger(lines))
  let runs = 0
  app.post('/', async (_request, reply) => reply.code(201).send({ run: ++runs }))
  const res = await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  t.equal(res.statusCode, 201)
  t.same(res.json(), { run: 1 })
  t.equal(saves.length, 1)
  const logged = lines.find((l) => l.level === ERROR && /could not be saved/.test(l.msg))
  t.equal(logged?.err?.message, 'store down (sync complete)')
  t.equal((await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })).statusCode, 409, 'the claim is held: a retry does not run the handler again')
  t.equal(runs, 1)
})

test('release() throwing: the client still gets its error; the failure is logged at error level', async (t) => {
  const lines: LogLine[] = []
  const store = new FlakyStore()
  t.teardown(() => store.close())
  store.failing.release = true
  const app = await build(t, { store }, capturingLogger(lines))
  app.post('/', async () => { throw new Error('handler failed') })
  const res = await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  t.equal(res.statusCode, 500)
  t.equal(res.json().message, 'handler failed')
  const logged = lines.find((l) => l.level === ERROR && /could not be released/.test(l.msg))
  t.equal(logged?.err?.message, 'store down (release)')
})

test('release() throwing synchronously (a store of values): the same, and the process stays up', async (t) => {
  const lines: LogLine[] = []
  let releases = 0
  const store = valuesStore(t, { release: () => { releases++; throw new Error('store down (sync release)') } })
  const app = await build(t, { store }, capturingLogger(lines))
  app.post('/', async () => { throw new Error('handler failed') })
  const res = await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  t.equal(res.statusCode, 500)
  t.equal(res.json().message, 'handler failed')
  t.equal(releases, 1)
  const logged = lines.find((l) => l.level === ERROR && /could not be released/.test(l.msg))
  t.equal(logged?.err?.message, 'store down (sync release)')
})

test('a store returning promises works like one returning values', async (t) => {
  const inner = new MemoryStore()
  t.teardown(() => inner.close())
  const store: IdempotencyStore = {
    claim: async (key, fingerprint, lockTtl) => inner.claim(key, fingerprint, lockTtl),
    complete: async (key, token, response: StoredResponse, ttl) => inner.complete(key, token, response, ttl),
    release: async (key, token) => inner.release(key, token),
    renew: async (key, token, lockTtl) => inner.renew(key, token, lockTtl)
  }
  const app = Fastify()
  t.teardown(() => app.close())
  await app.register(fastifyIdempotency, { store })
  let runs = 0
  app.post('/', async () => ({ run: ++runs }))
  await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  const replay = await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  t.equal(replay.headers['idempotent-replayed'], 'true')
  t.equal(runs, 1)
})

test('handlerTimeout while a duplicate waits for the original: the duplicate stops waiting', async (t) => {
  const store = new RecordingStore()
  t.teardown(() => store.close())
  const app = await build(t, { store, inFlight: { wait: 60_000 } }, { handlerTimeout: 40 })
  const slow = heldHandler('done')
  app.post('/', slow.handler)
  const send = () => app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  const original = send()
  await until(() => slow.runs() === 1)
  const waiter = await send()
  t.equal(waiter.statusCode, 503, 'the waiter timed out')
  await sleep(150) // the next look at the store comes within 100 ms
  const looks = store.claims.length
  await sleep(250)
  t.equal(store.claims.length, looks, 'an answered waiter no longer polls the store')
  slow.open()
  t.equal((await original).statusCode, 503)
  await until(() => store.releases.length === 1)
  t.equal((await send()).statusCode, 200, 'the key is free: the waiter did not claim it')
  t.equal(slow.runs(), 2)
})

test('lease renewal continues after the handler ends, while its result goes through slow hooks', async (t) => {
  const app = await build(t, { lockTtl: 1000 })
  let runs = 0
  let serializing = false
  app.post('/', {
    preSerialization: async (_request, _reply, payload: unknown) => {
      serializing = true
      await sleep(2500)
      return payload
    }
  }, async () => ({ run: ++runs }))
  const send = () => app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  const original = send()
  await until(() => serializing)
  await sleep(2200) // more than two lockTtl
  const dup = await send()
  t.equal(dup.statusCode, 409, 'the handler has ended, but its result is not saved yet: the claim is still held')
  const first = await original
  t.equal(runs, 1)
  const replay = await send()
  t.equal(replay.body, first.body)
  t.equal(replay.headers['idempotent-replayed'], 'true')
})

test('a store whose renew() throws synchronously: logged, the process keeps running', async (t) => {
  const lines: LogLine[] = []
  let renewals = 0
  const store = valuesStore(t, {
    renew: () => {
      renewals++
      throw new Error('renew exploded')
    }
  })
  const app = await build(t, { store, lockTtl: 1000 }, capturingLogger(lines))
  app.post('/', async () => {
    await until(() => renewals >= 2, 1000)
    return 'ok'
  })
  const res = await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  t.equal(res.statusCode, 200)
  const logged = lines.filter((l) => l.level === ERROR && /lease renewal failed/.test(l.msg))
  t.equal(logged.length, 1, 'logged once for the claim, not once per renewal')
  t.ok(renewals >= 2)
  t.equal(logged[0].err?.message, 'renew exploded')
})

test('an async handler that returns reply and sends later keeps its claim until it sends', async (t) => {
  const app = await build(t, { lockTtl: 1000 })
  let runs = 0
  let sent = false
  app.post('/', async (_request, reply) => {
    runs++
    setTimeout(() => {
      sent = true
      reply.code(201).send({ late: true })
    }, 2500)
    return reply
  })
  const send = () => app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  const original = send()
  await until(() => runs === 1)
  await sleep(2200)
  t.equal(sent, false)
  t.equal((await send()).statusCode, 409, 'more than two lockTtl later, the claim is still held')
  const first = await original
  t.equal(first.statusCode, 201)
  const replay = await send()
  t.equal(replay.statusCode, 201)
  t.equal(replay.body, first.body)
  t.equal(runs, 1)
})

test('an async handler that sends an error and keeps working holds the claim until it returns', async (t) => {
  const store = new RecordingStore()
  t.teardown(() => store.close())
  const app = await build(t, { store })
  const work = gate()
  let runs = 0
  let finished = 0
  app.post('/', async (_request, reply) => {
    runs++
    if (runs === 1) {
      await reply.code(500).send({ error: 'answered early' })
      await work.promise // still doing something after the reply went out
      finished++
      return reply
    }
    return { run: runs }
  })
  const send = () => app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  t.equal((await send()).statusCode, 500)
  t.equal((await send()).statusCode, 409, 'the handler is still running')
  t.equal(store.releases.length, 0)
  work.open()
  await until(() => store.releases.length === 1)
  t.equal(finished, 1)
  t.same((await send()).json(), { run: 2 })
})

test('sync handlers that send an error reply, or hijack and then throw, release the claim', async (t) => {
  const store = new RecordingStore()
  t.teardown(() => store.close())
  const app = await build(t, { store })
  let runs = 0
  app.post('/send', (_request, reply) => {
    runs++
    reply.code(400).send({ bad: true })
  })
  app.post('/hijack-then-throw', (_request, reply) => {
    runs++
    reply.hijack()
    reply.raw.end('raw')
    throw new Error('after the reply')
  })
  for (const url of ['/send', '/hijack-then-throw']) {
    const first = await app.inject({ method: 'POST', url, headers: { 'idempotency-key': 'k' } })
    const second = await app.inject({ method: 'POST', url, headers: { 'idempotency-key': 'k' } })
    t.equal(second.statusCode, first.statusCode, url)
    t.equal(second.headers['idempotent-replayed'], undefined)
  }
  t.equal(runs, 4)
  t.equal(store.releases.length, 4)
})
