/**
 * Exactly-once side effects with Postgres, across real processes: two
 * servers share one database, the handler's side effect and the record
 * commit in one transaction (completeWith). Many concurrent duplicates to
 * both servers write one row per key; a server killed just after the commit
 * leaves a record that retries replay; one killed just before it leaves
 * nothing but its claim, and after lockTtl a retry runs the handler once.
 */
import t from 'tap'
import pg from 'pg'
import '../helpers/crash-guard.js'
import { startFixture, type FixtureProcess } from '../../support/fixture.js'
import { startPostgres, uniqueTable, withPostgres, type PostgresServer } from '../../support/postgres.js'

interface Answer { status: number, body: string, replayed: boolean }

async function post (base: string, path: string, key: string, crash?: 'before-commit' | 'after-commit'): Promise<Answer> {
  try {
    const res = await fetch(`${base}${path}/${encodeURIComponent(key)}`, {
      method: 'POST',
      headers: { 'idempotency-key': key, 'content-type': 'application/json', ...(crash === undefined ? {} : { 'x-crash': crash }) },
      body: JSON.stringify({ key })
    })
    return { status: res.status, body: await res.text(), replayed: res.headers.get('idempotent-replayed') === 'true' }
  } catch {
    return { status: 0, body: '', replayed: false } // the server died before answering
  }
}

const LOCK_TTL = 1000

withPostgres(t, (t) => {
  let server: PostgresServer
  let db: pg.Pool
  const table = uniqueTable('processes')
  const effects = uniqueTable('effects')
  const env = () => ({ PG_URL: server.connectionString, TABLE: table, EFFECTS: effects, LOCK_TTL: String(LOCK_TTL) })
  const effectRows = async (key: string) => Number((await db.query(`SELECT count(*) AS n FROM ${effects} WHERE key = $1`, [key])).rows[0].n)

  t.before(async () => {
    server = await startPostgres()
    db = new pg.Pool({ connectionString: server.connectionString })
    await db.query(`CREATE TABLE ${effects} (key text NOT NULL, pid int NOT NULL)`)
  })
  t.teardown(async () => {
    await db?.end()
    await server?.stop()
  })

  t.test('two servers, 200 requests over 50 keys, each key 4 times at once to alternating servers: one side effect per key', async (t) => {
    const servers: FixtureProcess[] = await Promise.all([startFixture('pg-server.ts', env()), startFixture('pg-server.ts', env())])
    t.teardown(() => Promise.all(servers.map((s) => s.stop())))
    await Promise.all(servers.map((s) => post(s.url, '/once', `warm-up-${s.pid}`)))
    const keys = Array.from({ length: 50 }, (_, i) => `order-${i}-${Math.random().toString(36).slice(2)}`)
    const answers = await Promise.all(keys.map((key, k) => Promise.all(Array.from({ length: 4 }, (_, i) =>
      post(servers[(i + k) % 2].url, '/once', key)))))
    for (const [k, key] of keys.entries()) {
      const ok = answers[k].filter((a) => a.status === 200)
      t.equal(await effectRows(key), 1, `${key}: one row`)
      t.ok(ok.length >= 1, `${key}: answered`)
      t.equal(new Set(ok.map((a) => a.body)).size, 1, `${key}: every 2xx carries the same body`)
      t.ok(answers[k].every((a) => a.status === 200 || a.status === 409), `${key}: only 200 or 409 (${answers[k].map((a) => a.status)})`)
    }
  })

  t.test('killed just after the commit: a retry to another server replays the saved response; one row', async (t) => {
    const victim = await startFixture('pg-server.ts', env())
    const other = await startFixture('pg-server.ts', env())
    t.teardown(() => Promise.all([victim.stop(), other.stop()]))
    const key = `after-${Math.random().toString(36).slice(2)}`
    const cut = await post(victim.url, '/crash', key, 'after-commit')
    t.equal(cut.status, 0, 'the server died before answering')
    t.equal(await effectRows(key), 1, 'the side effect committed')
    const retry = await post(other.url, '/crash', key)
    t.equal(retry.status, 200)
    t.ok(retry.replayed, 'a replay of what the dead server committed')
    t.equal(JSON.parse(retry.body).pid, victim.pid, 'the response the dead server saved')
    t.equal(await effectRows(key), 1, 'still one row')
  })

  t.test('killed just before the commit: nothing committed; after lockTtl a retry runs the handler once; one row', async (t) => {
    const victim = await startFixture('pg-server.ts', env())
    const other = await startFixture('pg-server.ts', env())
    t.teardown(() => Promise.all([victim.stop(), other.stop()]))
    const key = `before-${Math.random().toString(36).slice(2)}`
    const killedAt = Date.now()
    const cut = await post(victim.url, '/crash', key, 'before-commit')
    t.equal(cut.status, 0, 'the server died before answering')
    t.equal(await effectRows(key), 0, 'the transaction never committed: no side effect')
    // The other server's duplicates wait (inFlight.wait 2 s) while the dead server's claim holds.
    const retry = await post(other.url, '/crash', key)
    const answeredAfter = Date.now() - killedAt
    t.equal(retry.status, 200, 'the claim of the dead server expired: the retry ran')
    t.ok(answeredAfter >= LOCK_TTL - 100, `only once that claim could have expired (${answeredAfter} ms after the kill, lockTtl ${LOCK_TTL})`)
    t.notOk(retry.replayed)
    t.equal(JSON.parse(retry.body).pid, other.pid)
    t.equal(await effectRows(key), 1, 'one row')
    const again = await post(other.url, '/crash', key)
    t.ok(again.replayed)
    t.equal(again.body, retry.body)
    t.equal(await effectRows(key), 1)
  })
})
