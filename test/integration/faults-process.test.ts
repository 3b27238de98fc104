/**
 * Faults with real processes, a real Redis and real sockets: Redis crashes
 * under load and comes back; a server process is SIGKILLed with handlers in
 * flight. Whatever happens, no key's handler runs twice where the README says
 * it cannot, no request hangs, no process crashes, nothing is left unhandled.
 */
import t from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import { Redis } from 'ioredis'
import { defaultKeyEncoder } from '../../index.js'
import { ERROR, type LogLine } from '../helpers/app.js'
import { startFixture, type FixtureProcess } from '../../support/fixture.js'
import { startRedis, uniquePrefix, withRedis, type RedisServer } from '../../support/redis.js'

interface Answer {
  key: string
  status: number
  code: string | undefined
  replayed: boolean
  /** The id of the handler run that produced the body (on 2xx). */
  run: string | undefined
  start: number
  end: number
  /** The request failed without an HTTP answer (socket error, or our own 10 s abort). */
  error?: string
}

interface Run { key: string, run: string, startedAt: number, endedAt: number | undefined }

/** POSTs to `${base}/work/${key}` with the key as Idempotency-Key. */
async function post (base: string, key: string, body: object = {}): Promise<Answer> {
  const start = Date.now()
  try {
    const response = await fetch(`${base}/work/${key}`, {
      method: 'POST',
      headers: { 'idempotency-key': key, 'content-type': 'application/json' },
      body: JSON.stringify(body),
      signal: AbortSignal.timeout(10_000)
    })
    const json = await response.json() as { run?: string, code?: string }
    return {
      key,
      status: response.status,
      code: json.code,
      replayed: response.headers.get('idempotent-replayed') === 'true',
      run: json.run,
      start,
      end: Date.now()
    }
  } catch (err) {
    return { key, status: 0, code: undefined, replayed: false, run: undefined, start, end: Date.now(), error: String(err) }
  }
}

async function runsOf (server: FixtureProcess): Promise<Run[]> {
  return await (await fetch(`${server.url}/runs`)).json() as Run[]
}

/** The child's stderr: JSON log lines, and whatever else it wrote (which must be nothing). */
function stderrOf (server: FixtureProcess): { logs: LogLine[], other: string[] } {
  const logs: LogLine[] = []
  const other: string[] = []
  for (const line of server.stderr().split('\n')) {
    if (line === '') continue
    try {
      logs.push(JSON.parse(line) as LogLine)
    } catch {
      other.push(line)
    }
  }
  return { logs, other }
}

/** The hashed store key the plugin logs for `key` on /work/:key. */
function storeKey (key: string): string {
  return defaultKeyEncoder({ scope: undefined, method: 'POST', path: `/work/${key}`, key })
}

const isOk = (answer: Answer) => answer.status >= 200 && answer.status < 300
const ranHere = (answer: Answer) => isOk(answer) && !answer.replayed

withRedis(t, (t) => {
  t.test('Redis crashes under load and comes back: fail-closed refuses or runs once, fail-open keeps serving', async (t) => {
    // appendfsync always: every write Redis acknowledged survives the crash, as the README's guarantee assumes.
    const redis: RedisServer = await startRedis({ args: ['--appendonly', 'yes', '--appendfsync', 'always'] })
    t.teardown(() => redis.stop())
    const STORE_TIMEOUT = 300
    const LOCK_TTL = 3000
    const HANDLER_MS = 50
    const env = { REDIS_PORT: String(redis.port), STORE_TIMEOUT: String(STORE_TIMEOUT), LOCK_TTL: String(LOCK_TTL), HANDLER_MS: String(HANDLER_MS) }
    const [closed, open] = await Promise.all([
      startFixture('fault-server.ts', { ...env, ON_STORE_ERROR: 'fail-closed' }),
      startFixture('fault-server.ts', { ...env, ON_STORE_ERROR: 'fail-open' })
    ])
    t.teardown(() => Promise.all([closed.stop(), open.stop()]))

    // Clients: each takes a new key, sends it twice at once, and retries the pair every 100 ms
    // until it gets a 2xx; then it sends the key once more (a replay) and takes the next key.
    const answers = new Map<FixtureProcess, Answer[]>([[closed, []], [open, []]])
    const load = { on: true }
    let next = 0
    async function client (server: FixtureProcess, name: string): Promise<void> {
      const mine = answers.get(server) as Answer[]
      while (load.on) {
        const key = `${name}-${++next}`
        for (;;) {
          const pair = await Promise.all([post(server.url, key), post(server.url, key)])
          mine.push(...pair)
          if (pair.some(isOk)) {
            mine.push(await post(server.url, key))
            break
          }
          if (!load.on) break
          await sleep(100)
        }
      }
    }
    const clients = [
      ...Array.from({ length: 5 }, (_, i) => client(closed, `closed${i}`)),
      ...Array.from({ length: 5 }, (_, i) => client(open, `open${i}`))
    ]
    await sleep(800)
    // Handlers that are running when Redis goes away and end while it is away: they cannot save.
    const stranded = ['stranded-1', 'stranded-2', 'stranded-3'].map((key) => ({ key, answer: post(closed.url, key, { ms: 1000 }) }))
    const started = async () => (await runsOf(closed)).filter((run) => run.key.startsWith('stranded-')).length === stranded.length
    for (let i = 0; i < 300 && !await started(); i++) await sleep(10)
    t.ok(await started(), 'the stranded handlers are running when Redis crashes')
    const crashAt = Date.now()
    await redis.crash()
    await sleep(1500)
    const restartAt = Date.now()
    await redis.restart()
    await sleep(LOCK_TTL + 500)
    load.on = false
    await Promise.all(clients)
    const strandedAnswers = await Promise.all(stranded.map((s) => s.answer))

    const bound = HANDLER_MS + 2 * STORE_TIMEOUT + 2000
    for (const [server, name] of [[closed, 'fail-closed'], [open, 'fail-open']] as const) {
      const mine = answers.get(server) as Answer[]
      t.ok(mine.length > 100, `${name}: ${mine.length} answers`)
      t.strictSame(mine.filter((a) => a.status === 0), [], `${name}: every request got an HTTP answer`)
      const slow = mine.filter((a) => a.end - a.start > bound)
      t.strictSame(slow, [], `${name}: every answer came within ${bound} ms (2 × storeTimeout + handler + margin)`)
      const { other } = stderrOf(server)
      t.strictSame(other, [], `${name}: nothing but log lines on stderr (no unhandled rejection, no crash)`)
      const runs = await runsOf(server) // the process is alive and answers
      const answered = new Set(mine.filter(ranHere).map((a) => a.run))
      if (server === closed) for (const a of strandedAnswers) answered.add(a.run)
      t.strictSame(runs.filter((run) => !answered.has(run.run)), [], `${name}: every handler run answered its client`)
      t.equal(answered.size, runs.length, `${name}: and every first answer comes from one run`)
    }

    // fail-closed: every request got 503 (never ran), 409 (a duplicate of a running one), or a 2xx.
    const closedAnswers = answers.get(closed) as Answer[]
    const closedRuns = await runsOf(closed)
    const kinds = new Set(closedAnswers.map((a) => `${a.status} ${a.code ?? ''}`.trim()))
    t.strictSame([...kinds].filter((kind) => !['200', '409 FST_IDEMPOTENCY_IN_FLIGHT', '503 FST_IDEMPOTENCY_STORE_UNAVAILABLE'].includes(kind)), [],
      `fail-closed: only 200, 409 in flight and 503 store unavailable (${[...kinds].join(', ')})`)
    t.ok(closedAnswers.some((a) => a.status === 503), 'fail-closed: the outage was seen (503s)')
    t.ok(closedAnswers.some((a) => ranHere(a) && a.start > restartAt), 'fail-closed: requests ran again once Redis was back')
    t.strictSame(closedRuns.filter((run) => run.startedAt > crashAt + 100 && run.startedAt < restartAt), [],
      'fail-closed: no handler started while Redis was down')

    // The handlers stranded by the crash answered their clients; the failure to save was logged
    // at error level with the hashed store key, never the client's key.
    const { logs } = stderrOf(closed)
    for (const { key } of stranded) {
      const answer = strandedAnswers.find((a) => a.key === key) as Answer
      t.equal(answer.status, 200, `${key}: the client got its answer`)
      const logged = logs.filter((l) => l.idempotencyKey === storeKey(key) && l.level === ERROR && /could not be saved/.test(l.msg))
      t.equal(logged.length, 1, `${key}: "could not be saved" logged at error level with the store key`)
    }
    t.strictSame(logs.filter((l) => JSON.stringify(l).includes('"stranded-')), [], 'no log line carries a client key')
    // What a retry then gets: the save that Redis missed was queued by ioredis and lands when Redis
    // is back (the replay), or, if it did not, the claim expires and the retry runs after lockTtl.
    for (const { key } of stranded) {
      const first = strandedAnswers.find((a) => a.key === key) as Answer
      let retry = await post(closed.url, key, { ms: 1000 })
      // A renewal ioredis queued during the outage may land once Redis is back and hold the claim
      // up to lockTtl longer: the client retries on 409, as the answer tells it to.
      for (let i = 0; retry.status === 409 && i < LOCK_TTL / 100; i++) {
        await sleep(100)
        retry = await post(closed.url, key, { ms: 1000 })
      }
      const runs = (await runsOf(closed)).filter((run) => run.key === key)
      if (retry.replayed) {
        t.equal(retry.run, first.run, `${key}: the retry replays the first run`)
        t.equal(runs.length, 1)
      } else {
        t.equal(retry.status, 200, `${key}: the retry ran`)
        t.equal(runs.length, 2, `${key}: the stranded run and the retry`)
        // The claim was last renewed at most lockTtl / 3 before the handler ended, so it expired no sooner than this.
        t.ok(runs[1].startedAt >= (runs[0].endedAt as number) + LOCK_TTL * 2 / 3, `${key}: and only once the claim had expired`)
      }
    }

    // A 409 says that another request with the key is running. After Redis came back (and ioredis
    // sent what it had queued), a 409 with nothing running is a claim nobody holds.
    const unexplained = closedAnswers.filter((a) => a.status === 409 && a.start > restartAt + 1500 &&
      !closedAnswers.some((b) => b.key === a.key && ranHere(b) && b.start <= a.end && a.start <= b.end))
    t.strictSame(unexplained, [], 'fail-closed: after recovery, no 409 without a running request for that key')

    // Each key ran at most once: per key, the runs and what the clients saw agree.
    const byKey = new Map<string, Run[]>()
    for (const run of closedRuns) byKey.set(run.key, [...(byKey.get(run.key) ?? []), run])
    const twice = [...byKey].filter(([key, runs]) => runs.length > 1 && !key.startsWith('stranded-'))
    t.strictSame(twice, [], 'fail-closed: no key ran twice')
    for (const a of closedAnswers.filter((a) => a.replayed)) {
      if ((byKey.get(a.key) ?? []).every((run) => run.run !== a.run)) t.fail(`${a.key}: a replay of a run that never happened`)
    }

    // fail-open: requests kept being served during the outage, and every store failure was logged.
    const openAnswers = answers.get(open) as Answer[]
    const openKinds = new Set(openAnswers.map((a) => `${a.status} ${a.code ?? ''}`.trim()))
    t.strictSame([...openKinds].filter((kind) => !['200', '409 FST_IDEMPOTENCY_IN_FLIGHT'].includes(kind)), [],
      `fail-open: only 200 and 409 in flight (${[...openKinds].join(', ')})`)
    t.ok(openAnswers.some((a) => ranHere(a) && a.start > crashAt + 100 && a.end < restartAt), 'fail-open: served while Redis was down')
    const failOpen = stderrOf(open).logs.filter((l) => l.level === ERROR && /fail-open/.test(l.msg))
    t.ok(failOpen.length > 0, 'fail-open: store failures logged at error level')
    t.ok(failOpen.every((l) => /^idem:[\w-]{43}$/.test(String(l.idempotencyKey))), 'with the hashed store key')
  })

  t.test('a server process killed with handlers in flight: after lockTtl the keys run once on another process; completed keys replay', async (t) => {
    const redis = await startRedis()
    t.teardown(() => redis.stop())
    const counter = new Redis({ host: '127.0.0.1', port: redis.port })
    t.teardown(() => counter.disconnect())
    const counterPrefix = uniquePrefix('killed')
    const LOCK_TTL = 1500
    const env = { REDIS_PORT: String(redis.port), STORE_TIMEOUT: '300', LOCK_TTL: String(LOCK_TTL), COUNTER_PREFIX: counterPrefix }
    const [doomed, survivor] = await Promise.all([
      startFixture('fault-server.ts', { ...env, HOLD: '1' }),
      startFixture('fault-server.ts', env)
    ])
    t.teardown(() => Promise.all([doomed.stop(), survivor.stop()]))

    const done = ['done-1', 'done-2', 'done-3']
    const held = ['hold-1', 'hold-2', 'hold-3', 'hold-4']
    const completed = await Promise.all(done.map((key) => post(doomed.url, key)))
    t.strictSame(completed.map((a) => a.status), [200, 200, 200])
    const inFlight = held.map((key) => post(doomed.url, key)) // never answered: the process dies
    const started = async () => (await counter.mget(held.map((key) => counterPrefix + key))).every((n) => n === '1')
    for (let i = 0; i < 200 && !await started(); i++) await sleep(10)
    t.ok(await started(), 'every held handler has started its side effect')

    process.kill(doomed.pid, 'SIGKILL')
    const killedAt = Date.now()
    const lost = await Promise.all(inFlight)
    t.ok(lost.every((a) => a.status === 0), 'the clients of the killed process got no answer')

    const early = await Promise.all(held.map((key) => post(survivor.url, key)))
    if (Date.now() - killedAt < LOCK_TTL / 2) {
      t.strictSame(early.map((a) => `${a.status} ${a.code}`), held.map(() => '409 FST_IDEMPOTENCY_IN_FLIGHT'),
        'before lockTtl the dead process still holds the keys: 409, not a second run')
    } else {
      t.comment('the early retries came too late to check the 409 before lockTtl (a loaded machine?)')
    }
    const replays = await Promise.all(done.map((key) => post(survivor.url, key)))
    replays.forEach((replay, i) => {
      t.ok(replay.replayed, `${done[i]}: replayed by the other process`)
      t.equal(replay.run, completed[i].run, `${done[i]}: with the body of the run that completed before the kill`)
    })

    await sleep(Math.max(0, killedAt + LOCK_TTL + 200 - Date.now()))
    const retries = await Promise.all(held.flatMap((key) => [0, 1, 2, 3].map(() => post(survivor.url, key))))
    const survivorRuns = await runsOf(survivor)
    for (const key of held) {
      const mine = retries.filter((a) => a.key === key)
      t.equal(survivorRuns.filter((run) => run.key === key).length, 1, `${key}: 4 retries at once after lockTtl, one run`)
      t.equal(new Set(mine.filter(isOk).map((a) => a.run)).size, 1, `${key}: every 2xx carries that run`)
      t.ok(mine.every((a) => isOk(a) || (a.status === 409 && a.code === 'FST_IDEMPOTENCY_IN_FLIGHT')), `${key}: the others are 409`)
    }
    t.strictSame(await counter.mget(held.map((key) => counterPrefix + key)), held.map(() => '2'),
      'each held key: the killed run and one run after lockTtl')
    t.strictSame(await counter.mget(done.map((key) => counterPrefix + key)), done.map(() => '1'), 'completed keys never ran again')
    t.strictSame(stderrOf(survivor).other, [], 'the survivor wrote nothing but log lines')
  })
})
