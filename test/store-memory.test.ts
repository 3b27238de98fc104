import t from 'tap'
import './helpers/crash-guard.js'
import { setTimeout as sleep } from 'node:timers/promises'
import { MemoryStore, RECORD_OVERHEAD, type MemoryStoreOptions } from '../lib/stores/memory.js'
import { StoreFullError } from '../lib/errors.js'
import type { StoredResponse } from '../types/index.js'
import { sampleResponse, storeContract, TEXT } from './helpers/store-contract.js'

const LONG = 60_000
const MiB = 1024 * 1024

/** A store on a clock that only moves when the test says so. */
function clocked (options: MemoryStoreOptions = {}) {
  const clock = { now: 1_000_000 }
  const store = new MemoryStore({ now: () => clock.now, ...options })
  t.teardown(() => store.close())
  return { store, clock }
}

/** Claims `key` and saves `response` for it; fails the test if either step is refused. */
function save (store: MemoryStore, key: string, response: StoredResponse = sampleResponse(), ttl: number | null = LONG): void {
  const token = store.claim(key, 'fp', LONG).token
  if (token === undefined) throw new Error(`${key} was not free`)
  if (!store.complete(key, token, response, ttl)) throw new Error(`${key} was not saved`)
}

function small (body = 'ok'): StoredResponse {
  return { statusCode: 200, headers: {}, body }
}

/** The store's evictions, reported through `onEviction`, in order. */
function reported (store: MemoryStore): string[] {
  const keys: string[] = []
  store.onEviction = (key) => keys.push(key)
  return keys
}

t.test('the store contract', async (t) => {
  let clock = { now: 0 }
  storeContract(t, {
    create () {
      clock = { now: 1_000_000 }
      const current = clock
      const store = new MemoryStore({ now: () => current.now })
      t.teardown(() => store.close())
      return store
    },
    async advance (ms) {
      clock.now += ms
    },
    short: 100,
    lookup: true,
    expiresIn: false
  })
})

t.test('live claims beyond maxRecords never evict completed records', async (t) => {
  const { store } = clocked({ maxRecords: 2000 })
  const live: Array<[string, string]> = []
  for (let i = 0; i < 3000; i++) live.push([`live-${i}`, store.claim(`live-${i}`, 'fp', LONG).token as string])
  for (let i = 0; i < 499; i++) save(store, `saved-${i}`)
  store.claim('one-more', 'fp', LONG)
  store.claim('and-another', 'fp', LONG)

  let replayable = 0
  for (let i = 0; i < 499; i++) if (store.claim(`saved-${i}`, 'fp', LONG).record?.state === 'completed') replayable++
  t.equal(replayable, 499, `every saved response is still replayed (${replayable})`)
  t.equal(store.usage().evictions, 0, 'nothing was evicted')
  t.equal(store.usage().inFlight, 3002)

  let completed = 0
  for (const [key, token] of live) if (store.complete(key, token, small(), LONG)) completed++
  t.equal(completed, 3000, 'every live claim could still be completed')
  t.equal(store.usage().records, 2000, 'completing them evicted down to maxRecords')
  t.equal(store.usage().evictions, 3499 - 2000)
  t.equal(store.lookup('live-2999')?.state, 'completed', 'the newest records stayed')
  t.equal(store.lookup('saved-0'), undefined, 'the oldest went first')
})

t.test('1 200 responses of 250 KB stay within maxBytes, least recently used evicted first', async (t) => {
  const maxBytes = 32 * MiB
  const { store } = clocked({ maxBytes })
  const evicted = reported(store)
  const response = (i: number): StoredResponse => ({ statusCode: 200, headers: { 'content-type': 'application/octet-stream' }, body: Buffer.alloc(250_000, i % 251) })
  let largest = 0
  for (let i = 0; i < 1200; i++) {
    save(store, `big-${i}`, response(i))
    if (i % 50 === 0) store.lookup('big-0') // used now and then: never the least recently used
    largest = Math.max(largest, store.usage().bytes as number)
  }
  const one = RECORD_OVERHEAD + 'big-1'.length + 'fp'.length + 'content-type'.length + 'application/octet-stream'.length + 250_000
  t.ok(largest <= maxBytes, `the accounted bytes never went above maxBytes (largest ${largest})`)
  t.ok(largest > maxBytes - 2 * one, 'and the store did fill up')
  const { records, evictions } = store.usage()
  t.ok(records < 140, `about 32 MiB of records are kept (${records})`)
  t.equal(evictions, 1200 - records, 'every record dropped was counted')
  t.equal(evicted.length, evictions, 'and reported')
  t.equal(evicted[0], 'big-1', 'the least recently used went first: big-0 was replayed')
  t.strictSame(evicted.slice(0, 5), ['big-1', 'big-2', 'big-3', 'big-4', 'big-5'], 'then in the order they were used')
  t.notOk(evicted.includes('big-0'), 'the record in use was never evicted')
  const last = store.lookup('big-1199')
  t.ok(last?.state === 'completed' && Buffer.isBuffer(last.response.body) && last.response.body[0] === 1199 % 251, 'the newest response is kept, whole')
  t.equal(store.lookup('big-1'), undefined)
})

t.test('a response larger than maxBytes is kept, alone, until the next save evicts it', async (t) => {
  const { store } = clocked({ maxBytes: 2000 })
  const evicted = reported(store)
  save(store, 'a', small())
  save(store, 'huge', small('x'.repeat(5000)))
  t.equal(store.lookup('huge')?.state, 'completed', 'the record just saved stays')
  t.equal(store.lookup('a'), undefined, 'the older one made room')
  t.strictSame(store.usage(), { records: 1, inFlight: 0, bytes: RECORD_OVERHEAD + 4 + 2 + 5000, maxBytes: 2000, evictions: 1, estimated: false })
  save(store, 'b', small())
  t.equal(store.lookup('huge'), undefined, 'the next save evicted it')
  t.strictSame(evicted, ['a', 'huge'])
  t.equal(store.usage().bytes, RECORD_OVERHEAD + 1 + 2 + 2)
})

t.test('maxRecords evicts the least recently used; a replay and a lookup count as uses', async (t) => {
  const { store } = clocked({ maxRecords: 3 })
  const evicted = reported(store)
  for (const key of ['a', 'b', 'c']) save(store, key)
  t.equal(store.claim('a', 'fp', LONG).record?.state, 'completed', 'a replays: order b, c, a')
  t.equal(store.lookup('b')?.state, 'completed', 'b is looked up: order c, a, b')
  save(store, 'd')
  t.strictSame(evicted, ['c'])
  t.equal(store.lookup('a')?.state, 'completed', 'a is looked up: order b, d, a')
  save(store, 'e')
  save(store, 'f')
  t.strictSame(evicted, ['c', 'b', 'd'])
  t.strictSame(['a', 'e', 'f'].map((key) => store.lookup(key)?.state), ['completed', 'completed', 'completed'])
  t.equal(store.usage().records, 3)
  t.equal(store.usage().evictions, 3)
})

t.test('an eviction is counted without onEviction, and onEviction sees the store without the record', async (t) => {
  const { store } = clocked({ maxRecords: 1 })
  save(store, 'a')
  save(store, 'b')
  t.equal(store.usage().evictions, 1)
  const seen: Array<[string, unknown, number]> = []
  store.onEviction = (key) => seen.push([key, store.lookup(key), store.usage().records])
  save(store, 'c')
  t.strictSame(seen, [['b', undefined, 1]])
  t.equal(store.usage().evictions, 2)
})

t.test('in-flight claims are never evicted and never count against maxRecords or maxBytes', async (t) => {
  const { store } = clocked({ maxRecords: 2, maxBytes: 3000 })
  const held = ['h1', 'h2', 'h3', 'h4', 'h5'].map((key) => [key, store.claim(key, 'fp', LONG).token as string])
  for (let i = 0; i < 50; i++) save(store, `r-${i}`, sampleResponse(Buffer.alloc(1000)))
  t.equal(store.usage().inFlight, 5)
  t.equal(store.usage().records, 2)
  for (const [key, token] of held) {
    t.strictSame(store.lookup(key), { state: 'in-flight', fingerprint: 'fp' }, `${key} is still in flight`)
    t.equal(store.complete(key, token, small(), LONG), true, `and ${key} can be completed`)
  }
  t.equal(store.usage().records, 2)
  t.equal(store.size, 2)
})

t.test('expired records are dropped silently: never counted, never reported', async (t) => {
  const { store, clock } = clocked({ maxRecords: 2 })
  const evicted = reported(store)
  save(store, 'short', small(), 100)
  save(store, 'long', small(), LONG)
  clock.now += 200
  t.equal(store.usage().records, 2, 'nothing is dropped before something reads it')
  save(store, 'new', small())
  t.equal(store.lookup('long')?.state, 'completed', 'the bound dropped the expired record, not the live one')
  t.equal(store.usage().evictions, 0)
  t.strictSame(evicted, [])

  save(store, 'brief', small(), 100)
  t.equal(store.lookup('new'), undefined, 'a live record makes room for the new one, and that counts')
  t.strictSame(evicted, ['new'])
  clock.now += 200
  t.equal(store.usage().records, 2)
  t.equal(store.lookup('brief'), undefined, 'an expired record reads as absent')
  t.equal(store.usage().records, 1, 'and that read dropped it')
  t.equal(store.usage().bytes, RECORD_OVERHEAD + 'long'.length + 2 + 2, 'with its bytes')
  t.equal(store.usage().evictions, 1, 'uncounted')
})

t.test('bytes account for the key, fingerprint, headers and body, and are freed when a record goes', async (t) => {
  const { store, clock } = clocked()
  const a = store.claim('k', undefined, LONG).token as string
  t.equal(store.usage().bytes, 0, 'a claim holds no accounted bytes')
  store.complete('k', a, { statusCode: 204, headers: {}, body: '' }, 100)
  t.equal(store.usage().bytes, RECORD_OVERHEAD + 1)

  save(store, 'key2', { statusCode: 200, headers: { 'x-a': 'b', 'x-m': ['cd', 'e'] }, body: 'é€' })
  const text = RECORD_OVERHEAD + 'key2'.length + 'fp'.length + 'x-a'.length + 1 + 'x-m'.length + 3 + 5
  t.equal(store.usage().bytes, RECORD_OVERHEAD + 1 + text, 'a string body counts its UTF-8 bytes')
  save(store, 'key3', { statusCode: 200, headers: {}, body: Buffer.alloc(10) })
  const bytes = RECORD_OVERHEAD + 'key3'.length + 'fp'.length + 10
  t.equal(store.usage().bytes, RECORD_OVERHEAD + 1 + text + bytes, 'a Buffer counts its length')

  clock.now += 200
  store.sweep()
  t.equal(store.usage().bytes, text + bytes, 'the swept record gave its bytes back')
  t.equal(store.usage().records, 2)
})

t.test('claims beyond maxClaims are refused with StoreFullError, and a slot frees up when a claim ends', async (t) => {
  const { store } = clocked({ maxClaims: 3 })
  save(store, 'done')
  const a = store.claim('a', 'fp', LONG).token as string
  const b = store.claim('b', 'fp', LONG).token as string
  store.claim('c', 'fp', LONG)
  const size = store.size
  t.throws(() => store.claim('d', 'fp', LONG), StoreFullError)
  t.throws(() => store.claim('d', 'fp', LONG), { code: 'FST_IDEMPOTENCY_STORE_FULL', statusCode: 503 })
  t.equal(store.size, size, 'a refused claim creates nothing')
  t.strictSame(store.claim('b', 'fp', LONG), { record: { state: 'in-flight', fingerprint: 'fp' } }, 'a claimed key still answers')
  t.equal(store.claim('done', 'fp', LONG).record?.state, 'completed', 'and so does a completed one')
  t.equal(store.usage().inFlight, 3)

  t.equal(store.release('b', b), true, 'releasing a claim in the middle of the queue')
  t.type(store.claim('d', 'fp', LONG).token, 'string', 'frees a slot')
  t.throws(() => store.claim('e', 'fp', LONG), StoreFullError)
  t.equal(store.complete('a', a, small(), LONG), true)
  t.type(store.claim('e', 'fp', LONG).token, 'string', 'completing a claim frees a slot too')
  t.equal(store.usage().inFlight, 3)
  t.equal(store.usage().records, 2)
})

t.test('expired claims make room for new ones without a sweep', async (t) => {
  const { store, clock } = clocked({ maxClaims: 3 })
  for (const key of ['a', 'b', 'c']) store.claim(key, 'fp', 100)
  clock.now += 50
  t.throws(() => store.claim('d', 'fp', 100), StoreFullError, 'live claims hold their slots')
  clock.now += 60
  for (const key of ['d', 'e', 'f']) t.type(store.claim(key, 'fp', 100).token, 'string', `${key} takes the slot of an expired claim`)
  t.equal(store.usage().inFlight, 3)
  t.equal(store.size, 3, 'the expired claims are gone')
  t.throws(() => store.claim('g', 'fp', 100), StoreFullError)
})

t.test('a renewed claim moves to the back of the queue', async (t) => {
  const { store, clock } = clocked({ maxClaims: 2 })
  const a = store.claim('a', 'fp', 100).token as string
  store.claim('b', 'fp', 100)
  clock.now += 50
  t.equal(store.renew('a', a, 100), true, 'a now expires after b')
  clock.now += 60
  t.type(store.claim('c', 'fp', 100).token, 'string', 'b, expired, was at the front and made room')
  t.strictSame(store.claim('a', 'fp', 100), { record: { state: 'in-flight', fingerprint: 'fp' } }, 'a is still held')
  t.equal(store.complete('a', a, small(), LONG), true)
})

t.test('with different lockTtls, an expired claim behind a live one is freed by the sweeper', async (t) => {
  const { store, clock } = clocked({ maxClaims: 2 })
  store.claim('long', 'fp', LONG)
  store.claim('short', 'fp', 100)
  clock.now += 200
  t.throws(() => store.claim('new', 'fp', LONG), StoreFullError, 'only the front of the queue is checked')
  store.sweep()
  t.type(store.claim('new', 'fp', LONG).token, 'string', 'after a sweep there is room')
  t.strictSame(store.claim('long', 'fp', LONG), { record: { state: 'in-flight', fingerprint: 'fp' } })
})

t.test('an expired claim is dropped when its owner comes back', async (t) => {
  const { store, clock } = clocked()
  const token = store.claim('k', 'fp', 100).token as string
  store.claim('other', 'fp', LONG)
  clock.now += 200
  t.equal(store.size, 2)
  t.equal(store.complete('k', token, small(), LONG), false, 'the expired claim cannot complete')
  t.equal(store.size, 1, 'and is gone')
  t.equal(store.usage().inFlight, 1)
})

t.test('tokens are decimal integers that keep increasing, across keys, clock changes and a new store', async (t) => {
  const { store, clock } = clocked()
  const tokens: bigint[] = []
  const take = (key: string) => {
    const token = store.claim(key, 'fp', LONG).token as string
    if (!/^[1-9][0-9]*$/.test(token)) t.fail(`${token} is not a decimal integer`)
    tokens.push(BigInt(token))
    store.release(key, token)
  }
  take('a')
  t.equal(tokens[0], 1_000_000n * 1000n, 'the first token is the clock in µs')
  take('b')
  take('a')
  t.equal(tokens[2], tokens[0] + 2n, 'within one ms, each claim adds one')
  clock.now += 5
  take('a')
  t.equal(tokens[3], 1_000_005n * 1000n, 'a later ms starts from the clock again')
  clock.now -= 1000
  take('a')
  t.equal(tokens[4], tokens[3] + 1n, 'a clock that goes back never makes a token go back')
  for (let i = 0; i < 2500; i++) take(`burst-${i}`)
  t.equal(tokens[tokens.length - 1], 1_000_005n * 1000n + 2501n, 'more than 1 000 claims in a ms run into the next ms')
  clock.now = 1_000_006
  take('a')
  t.equal(tokens[tokens.length - 1], 1_000_005n * 1000n + 2502n, 'and the clock does not pull them back')
  clock.now = 1_000_010
  take('a')
  t.equal(tokens[tokens.length - 1], 1_000_010n * 1000n, 'until it passes them')
  let increasing = 0
  for (let i = 1; i < tokens.length; i++) if (tokens[i] > tokens[i - 1]) increasing++
  t.equal(increasing, tokens.length - 1, 'every token is larger than the one before')

  // A process that made 999 claims within its last ms, and the next one, started a ms later.
  const before = new MemoryStore({ now: () => 5_000_000 })
  t.teardown(() => before.close())
  let last = 0n
  for (let i = 0; i < 999; i++) last = BigInt(before.claim(`k-${i}`, 'fp', LONG).token as string)
  const restarted = new MemoryStore({ now: () => 5_000_001 })
  t.teardown(() => restarted.close())
  t.ok(BigInt(restarted.claim('k-0', 'fp', LONG).token as string) > last, 'a new store starts above every token of the one before')

  const fractional = new MemoryStore({ now: () => 1234.5678 })
  t.teardown(() => fractional.close())
  t.equal(fractional.claim('a', 'fp', LONG).token, '1234000', 'a fractional clock still gives an integer')
  const zero = new MemoryStore({ now: () => 0 })
  t.teardown(() => zero.close())
  t.equal(zero.claim('a', 'fp', LONG).token, '1000', 'a clock at 0 still gives a positive token')
})

t.test('a string body and a Buffer body come back as the very values saved', async (t) => {
  const { store } = clocked()
  const bytes = Buffer.from('bytes')
  save(store, 'text', small(TEXT))
  save(store, 'bytes', { statusCode: 200, headers: {}, body: bytes })
  const text = store.claim('text', 'fp', LONG).record
  t.ok(text?.state === 'completed' && text.response.body === TEXT, 'the string')
  const buffer = store.lookup('bytes')
  t.ok(buffer?.state === 'completed' && buffer.response.body === bytes, 'the same Buffer')
})

t.test('duplicates share one frozen claim result that never carries the owner token', async (t) => {
  const { store } = clocked()
  const token = store.claim('k', 'fp', LONG).token as string
  const first = store.claim('k', 'fp', LONG)
  t.equal(store.claim('k', 'fp', LONG), first, 'every duplicate gets the same object')
  t.equal(store.lookup('k'), first.record, 'and lookup its record')
  t.notOk(JSON.stringify(first).includes(token), 'the in-flight record carries no token')
  t.ok(Object.isFrozen(first) && Object.isFrozen(first.record), 'no holder can change what the next one gets')
  t.throws(() => { (first.record as { fingerprint: string | undefined }).fingerprint = 'changed' }, TypeError)

  t.equal(store.complete('k', token, sampleResponse(), LONG), true)
  const replay = store.claim('k', 'fp', LONG)
  t.equal(replay.record?.state, 'completed', 'a completed key gets a new result')
  t.equal(store.claim('k', 'fp', LONG), replay, 'shared by every replay')
  t.notOk(JSON.stringify(replay).includes(`"${token}"`), 'it carries no token either')
  t.equal(first.record?.state, 'in-flight', 'a result already handed out does not change under its holder')
  t.notOk('expiresIn' in (replay.record as object), 'no expiresIn: the replay cache is for shared stores')
})

t.test('ttl null outlives any amount of time', async (t) => {
  const { store, clock } = clocked()
  save(store, 'k', sampleResponse(), null)
  clock.now += 10 * 365 * 24 * 3600 * 1000
  store.sweep()
  t.equal(store.claim('k', 'fp', LONG).record?.state, 'completed')
})

t.test('size and usage count claims and records, expired ones until something drops them', async (t) => {
  const { store, clock } = clocked()
  save(store, 'done', small(), 100)
  store.claim('held', 'fp', LONG)
  store.claim('dying', 'fp', 100)
  t.equal(store.size, 3)
  t.match(store.usage(), { records: 1, inFlight: 2, evictions: 0, estimated: false })
  clock.now += 200
  t.equal(store.size, 3)
  store.sweep()
  t.equal(store.size, 1)
  t.strictSame(store.usage(), { records: 0, inFlight: 1, bytes: 0, maxBytes: 64 * MiB, evictions: 0, estimated: false })
})

t.test('the sweeper deletes expired entries on its interval', async (t) => {
  const { store, clock } = clocked({ sweepInterval: 5 })
  save(store, 'done', small(), 100)
  store.claim('claimed', 'fp', 100)
  store.claim('kept', 'fp', LONG)
  clock.now += 200
  for (let i = 0; store.size !== 1 && i < 400; i++) await sleep(5)
  t.equal(store.size, 1, 'only the live claim is left')
  t.strictSame(store.claim('kept', 'fp', LONG), { record: { state: 'in-flight', fingerprint: 'fp' } })
  t.equal(store.usage().evictions, 0, 'expiry is not eviction')
})

t.test('the sweeper timer is unref\'d and close() clears it', async (t) => {
  const { store, clock } = clocked({ sweepInterval: 5 })
  const timer = (store as unknown as { sweeper: NodeJS.Timeout }).sweeper
  t.equal(timer.hasRef(), false, 'it does not keep the process alive')
  store.claim('k', 'fp', 10)
  store.close()
  clock.now += 100
  await sleep(50)
  t.equal(store.size, 1, 'nothing was swept after close()')
})

t.test('defaults', async (t) => {
  const store = new MemoryStore()
  t.teardown(() => store.close())
  t.equal(store.maxRecords, 10_000)
  t.equal(store.maxBytes, 64 * MiB)
  t.equal(store.maxClaims, 10_000)
  t.equal(store.onEviction, undefined)
  const before = Date.now()
  const token = store.claim('k', undefined, 50).token as string
  t.ok(BigInt(token) >= BigInt(before) * 1000n, 'the default clock is the real one')
  t.equal(store.complete('k', token, sampleResponse(), 1000), true)
  t.equal(store.claim('k', undefined, 50).record?.state, 'completed')
})

t.test('constructor validation', async (t) => {
  for (const name of ['maxRecords', 'maxBytes', 'maxClaims', 'sweepInterval'] as const) {
    for (const value of [0, -1, 1.5, Number.NaN, Infinity, '10']) {
      t.throws(() => new MemoryStore({ [name]: value } as MemoryStoreOptions), { name: 'TypeError', message: new RegExp(`^MemoryStore: ${name} must be a positive integer`) }, `${name}: ${String(value)}`)
    }
  }
  t.throws(() => new MemoryStore({ sweepInterval: 0 }), { message: 'MemoryStore: sweepInterval must be a positive integer (ms), got 0' })
  t.throws(() => new MemoryStore({ maxClaims: '10' as unknown as number }), { message: "MemoryStore: maxClaims must be a positive integer, got '10'" })
  t.throws(() => new MemoryStore({ now: 5 as unknown as () => number }), { name: 'TypeError', message: /now must be a function/ })
  const one = new MemoryStore({ maxRecords: 1, maxBytes: 1, maxClaims: 1, sweepInterval: 1 })
  one.close()
  t.equal(one.maxRecords, 1, 'one is enough')
})
