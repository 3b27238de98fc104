/**
 * The memory store's bounds through the plugin: beyond `maxClaims` requests
 * in flight a new key is refused with 503 and Retry-After, whatever
 * onStoreError says; a completed record evicted before its ttl is counted
 * in the stats and logged (once, then at most once a minute), because a
 * retry of it runs the handler again.
 */
import t from 'tap'
import { MemoryStore } from '../index.js'
import { build, capturingLogger, heldHandler, until, WARN, type LogLine } from './helpers/app.js'

t.test('beyond maxClaims in flight, a new key gets 503 with Retry-After, even with fail-open; the others are untouched', async (t) => {
  const lines: LogLine[] = []
  const store = new MemoryStore({ maxClaims: 2 })
  t.teardown(() => store.close())
  const app = await build(t, { store, onStoreError: 'fail-open' }, capturingLogger(lines))
  const held = heldHandler('done')
  app.post('/', held.handler)
  const send = (key: string) => app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': key } })
  const first = [send('a'), send('b')]
  await until(() => held.runs() === 2)
  const refused = await send('c')
  t.equal(refused.statusCode, 503)
  t.equal(refused.json().code, 'FST_IDEMPOTENCY_STORE_FULL')
  t.equal(refused.headers['retry-after'], '1')
  t.equal(held.runs(), 2, 'fail-open does not apply: the handler did not run')
  t.equal((await send('a')).statusCode, 409, 'a duplicate of a held key is still answered as in flight')
  t.ok(lines.some((line) => line.level === WARN && /too many requests in flight; refused \(503\)/.test(line.msg)))
  held.open()
  await Promise.all(first)
  t.equal((await send('c')).statusCode, 200, 'once they end, new keys are claimed again')
  t.equal((await app.idempotency.stats()).totals.storeErrors, 1)
})

t.test('a completed record evicted before its ttl: counted, logged once then at most once a minute; its retry runs again', async (t) => {
  const lines: LogLine[] = []
  const store = new MemoryStore({ maxRecords: 2 })
  t.teardown(() => store.close())
  const app = await build(t, { store }, capturingLogger(lines))
  let runs = 0
  app.post('/', async () => ({ run: ++runs }))
  const send = (key: string) => app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': key } })
  for (const key of ['a', 'b', 'c', 'd']) await send(key)
  const evictionLogs = lines.filter((line) => line.level === WARN && /evicted completed records before their ttl/.test(line.msg))
  t.equal(evictionLogs.length, 1, 'two evictions, one log line within the minute')
  t.equal(evictionLogs[0].maxRecords, 2)
  const stats = await app.idempotency.stats()
  t.equal(stats.store.evictions, 2)
  t.match(stats.warning, /2 saved responses were evicted before their ttl/)
  t.equal((await send('a')).headers['idempotent-replayed'], undefined, 'the evicted key runs again')
  t.equal(runs, 5)
  t.equal((await send('d')).headers['idempotent-replayed'], 'true', 'the recent ones replay')
})

t.test('a store passed in gets the same eviction log, unless it has its own listener', async (t) => {
  const lines: LogLine[] = []
  const own: string[] = []
  const listened = new MemoryStore({ maxRecords: 1 })
  listened.onEviction = (key) => own.push(key)
  t.teardown(() => listened.close())
  const app = await build(t, { store: listened }, capturingLogger(lines))
  app.post('/', async () => 'ok')
  for (const key of ['a', 'b']) await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': key } })
  t.equal(own.length, 1, 'the application\'s listener')
  t.notOk(lines.some((line) => /evicted/.test(line.msg)), 'is left alone')
})
