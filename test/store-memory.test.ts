import t from 'tap'
import './helpers/crash-guard.js'
import { setTimeout as sleep } from 'node:timers/promises'
import { MemoryStore, type MemoryStoreOptions } from '../lib/stores/memory.js'
import { sampleResponse, storeContract } from './helpers/store-contract.js'

const LONG = 60_000

/** A store on a clock that only moves when the test says so. */
function clocked (options: MemoryStoreOptions = {}) {
  const clock = { now: 1_000_000 }
  const store = new MemoryStore({ now: () => clock.now, ...options })
  t.teardown(() => store.close())
  return { store, clock }
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
    short: 100
  })
})

t.test('ttl null outlives any amount of time', async (t) => {
  const { store, clock } = clocked()
  const token = store.claim('k', 'fp', LONG).token as string
  t.equal(store.complete('k', token, sampleResponse(), null), true)
  clock.now += 10 * 365 * 24 * 3600 * 1000
  store.sweep()
  t.equal(store.claim('k', 'fp', LONG).record?.state, 'completed')
})

t.test('a duplicate never receives the owner token', async (t) => {
  const { store } = clocked()
  const token = store.claim('k', 'fp', LONG).token as string
  const duplicate = store.claim('k', 'fp', LONG)
  t.notOk(JSON.stringify(duplicate).includes(token), 'the in-flight record carries no token')
  t.equal(store.complete('k', token, sampleResponse(), LONG), true)
  const replay = store.claim('k', 'fp', LONG)
  t.notOk(JSON.stringify(replay).includes(`"${token}"`), 'neither does the completed record')
  t.equal(duplicate.record?.state, 'in-flight', 'a record already handed out does not change under its holder')
})

t.test('the size stays bounded under 100 000 unique keys', async (t) => {
  const maxRecords = 1000
  const { store } = clocked({ maxRecords })
  const held: Array<[string, string]> = []
  for (let i = 0; i < 50; i++) held.push([`held-${i}`, store.claim(`held-${i}`, 'fp', LONG).token as string])
  let largest = 0
  for (let i = 0; i < 100_000; i++) {
    const token = store.claim(`key-${i}`, 'fp', LONG).token as string
    store.complete(`key-${i}`, token, sampleResponse(), LONG)
    if (store.size > largest) largest = store.size
  }
  t.ok(largest <= maxRecords + held.length, `at most maxRecords plus live in-flight claims (largest: ${largest})`)
  t.ok(largest >= maxRecords / 2, 'and the store is actually used')
  for (const [key, token] of held) {
    if (store.claim(key, 'fp', LONG).record?.state !== 'in-flight') t.fail(`${key} was evicted while in flight`)
    if (!store.complete(key, token, sampleResponse(), LONG)) t.fail(`${key} lost its claim`)
  }
  t.equal(store.claim('key-99999', 'fp', LONG).record?.state, 'completed', 'recent records are kept')
  t.type(store.claim('key-0', 'fp', LONG).token, 'string', 'old completed records were evicted')
})

t.test('eviction drops the least recently used completed records, never in-flight claims', async (t) => {
  // maxRecords 10: generations of 5.
  const { store } = clocked({ maxRecords: 10 })
  const inFlight = store.claim('in-flight', 'fp', LONG).token as string
  const add = (key: string) => {
    const token = store.claim(key, 'fp', LONG).token as string
    t.equal(store.complete(key, token, sampleResponse(), LONG), true)
  }
  for (const key of ['hot', 'a', 'b', 'c']) add(key) // fills the first generation: it becomes the previous one
  for (const key of ['d', 'e']) add(key)
  t.equal(store.claim('hot', 'fp', LONG).record?.state, 'completed', 'a hit moves "hot" into the current generation')
  for (const key of ['f', 'g', 'h']) add(key) // one more rotation: the first generation is dropped
  t.equal(store.claim('hot', 'fp', LONG).record?.state, 'completed', 'the recently used record survived')
  t.type(store.claim('a', 'fp', LONG).token, 'string', 'a record nobody touched was evicted')
  t.strictSame(store.claim('in-flight', 'fp', LONG), { record: { state: 'in-flight', fingerprint: 'fp' } }, 'the in-flight claim survived')
  t.equal(store.complete('in-flight', inFlight, sampleResponse(), LONG), true, 'and its owner can still complete it')
  t.ok(store.size <= 10 + 1)
})

t.test('a record completed while its claim sat in the previous generation is not evicted first', async (t) => {
  // maxRecords 10: generations of 5. A slow request claims, five others come and go, then it completes.
  const { store } = clocked({ maxRecords: 10 })
  const slow = store.claim('slow', 'fp', LONG).token as string
  const add = (key: string) => {
    const token = store.claim(key, 'fp', LONG).token as string
    store.complete(key, token, sampleResponse(), LONG)
  }
  for (const key of ['a', 'b', 'c', 'd']) add(key) // rotation: 'slow' is now in the previous generation
  t.equal(store.complete('slow', slow, sampleResponse(), LONG), true)
  for (const key of ['e', 'f', 'g', 'h', 'i']) add(key) // rotation: the previous generation is dropped
  t.equal(store.claim('slow', 'fp', LONG).record?.state, 'completed', 'the newest response is still replayed')
  t.type(store.claim('a', 'fp', LONG).token, 'string', 'older ones went first')
})

t.test('expired in-flight claims are not carried into the next generation', async (t) => {
  const { store, clock } = clocked({ maxRecords: 4 })
  store.claim('dead', 'fp', 10)
  store.claim('x', 'fp', LONG) // generation of 2 full: rotate
  clock.now += 20
  store.claim('y', 'fp', LONG)
  store.claim('z', 'fp', LONG) // rotate again: 'dead' is dropped, not carried
  t.equal(store.size, 3)
  t.type(store.claim('dead', 'fp', LONG).token, 'string')
})

t.test('an expired record in the previous generation is not moved up', async (t) => {
  const { store, clock } = clocked({ maxRecords: 4 })
  const token = store.claim('old', 'fp', LONG).token as string
  store.complete('old', token, sampleResponse(), 10)
  store.claim('x', 'fp', LONG) // rotate: 'old' is in the previous generation
  clock.now += 20
  const size = store.size
  t.type(store.claim('old', 'fp', LONG).token, 'string', 'the expired record is gone')
  t.equal(store.size, size, 'and replaced, not duplicated')
})

t.test('release deletes from the generation that holds the claim', async (t) => {
  const { store } = clocked({ maxRecords: 4 })
  const token = store.claim('old', 'fp', LONG).token as string
  store.claim('x', 'fp', LONG) // rotate: 'old' is in the previous generation
  t.equal(store.release('old', token), true)
  t.equal(store.size, 1)
  t.type(store.claim('old', 'fp', LONG).token, 'string')
})

t.test('the sweeper deletes expired records on its interval', async (t) => {
  const { store, clock } = clocked({ sweepInterval: 5 })
  const token = store.claim('done', 'fp', LONG).token as string
  store.complete('done', token, sampleResponse(), 100)
  store.claim('claimed', 'fp', 100)
  store.claim('kept', 'fp', LONG)
  clock.now += 200
  for (let i = 0; store.size !== 1 && i < 400; i++) await sleep(5)
  t.equal(store.size, 1, 'only the live claim is left')
  t.strictSame(store.claim('kept', 'fp', LONG), { record: { state: 'in-flight', fingerprint: 'fp' } })
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
  const token = store.claim('k', undefined, 50).token as string
  t.equal(store.complete('k', token, sampleResponse(), 1000), true)
  t.equal(store.claim('k', undefined, 50).record?.state, 'completed', 'the default clock is the real one')
})

t.test('constructor validation', async (t) => {
  t.throws(() => new MemoryStore({ maxRecords: 1 }), { name: 'TypeError', message: /maxRecords must be an integer of at least 2/ })
  t.throws(() => new MemoryStore({ maxRecords: 10.5 }), { message: /maxRecords/ })
  t.throws(() => new MemoryStore({ sweepInterval: 0 }), { name: 'TypeError', message: /sweepInterval must be a positive integer/ })
  t.throws(() => new MemoryStore({ sweepInterval: 1.5 }), { message: /sweepInterval/ })
})
