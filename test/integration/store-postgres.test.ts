import t from 'tap'
import '../helpers/crash-guard.js'
import { spawnSync } from 'node:child_process'
import { setTimeout as sleep } from 'node:timers/promises'
import pg from 'pg'
import { PostgresStore, type PostgresStoreOptions } from '../../lib/stores/postgres.js'
import { startPostgres, uniqueTable, withPostgres, type PostgresServer } from '../../support/postgres.js'
import { childEnv } from '../../support/processes.js'
import { BINARY, TEXT, sampleResponse, storeContract } from '../helpers/store-contract.js'
import { emptyCounters } from '../../lib/stats.js'
import type { SqlClient } from '../../types/index.js'

const LONG = 60_000
const SHORT = 150

// pg's Pool, Client and PoolClient are all passed below where the store takes a SqlClient:
// `npx tsc` checks that each of them fits the structural type.

type Query = string | { name: string, text: string }

/**
 * A client that passes every query on (text or a named statement) and keeps
 * its text, so that round trips can be counted, and how many of its queries
 * have not answered yet. `textOnly`: it refuses named statements, as a client
 * that is no `pg` one might.
 */
function recording (client: SqlClient, textOnly = false): SqlClient & { texts: string[], pending: number } {
  const send = client.query.bind(client) as (query: Query, values?: unknown[]) => ReturnType<SqlClient['query']>
  const recorder = {
    texts: [] as string[],
    pending: 0,
    query (query: Query, values?: unknown[]) {
      if (textOnly && typeof query !== 'string') throw new TypeError('this client takes text only')
      recorder.texts.push(typeof query === 'string' ? query : query.text)
      recorder.pending++
      return send(query, values).finally(() => { recorder.pending-- })
    }
  }
  return recorder
}

/** What kind of statement a recorded text is. */
function kind (text: string): string {
  if (text.startsWith('WITH existing')) return 'claim'
  if (text.startsWith('WITH period')) return 'addStats'
  if (text.startsWith('SELECT to_regclass')) return 'exists'
  if (text.includes('pg_advisory_xact_lock')) return 'ddl'
  if (text.startsWith('DELETE') && text.includes('SKIP LOCKED')) return 'sweep'
  if (text.startsWith('DELETE')) return 'release'
  if (text.startsWith('UPDATE') && text.includes('status_code')) return 'complete'
  if (text.startsWith('UPDATE')) return 'renew'
  if (text.includes('pg_total_relation_size')) return 'usage'
  if (text.includes('JOIN')) return 'readStats'
  return 'lookup'
}

function quote (identifier: string): string {
  return `"${identifier.replace(/"/g, '""')}"`
}

const TIMED_OUT = { code: 'FST_IDEMPOTENCY_STORE_TIMEOUT' }

withPostgres(t, (t) => {
  let server: PostgresServer
  let pool: pg.Pool
  t.before(async () => {
    server = await startPostgres()
    pool = new pg.Pool({ connectionString: server.connectionString, max: 30 })
  })
  t.teardown(async () => {
    await pool?.end()
    await server?.stop()
  })

  /** A pool of its own, ended when `tt` ends. */
  function newPool (tt: Pick<typeof t, 'teardown'>, options: pg.PoolConfig = {}): pg.Pool {
    const own = new pg.Pool({ connectionString: server.connectionString, max: 30, ...options })
    own.on('error', () => {}) // idle connections of a crashed server, expected where a test crashes it
    tt.teardown(() => own.end())
    return own
  }

  /** A store closed when `tt` ends; each test gets a namespace no other test uses. */
  let namespaces = 0
  function newStore (tt: Pick<typeof t, 'teardown'>, options: Partial<PostgresStoreOptions> = {}): PostgresStore {
    const store = new PostgresStore({ pool, namespace: `ns-${++namespaces}`, sweepInterval: 0, ...options })
    tt.teardown(() => store.close())
    return store
  }

  /** Opens a transaction on a connection of its own; `finish` commits or rolls back and gives the connection back. */
  async function transaction (on: pg.Pool = pool): Promise<pg.PoolClient & { finish: (how: 'COMMIT' | 'ROLLBACK') => Promise<void> }> {
    const client = await on.connect()
    await client.query('BEGIN')
    return Object.assign(client, {
      async finish (how: 'COMMIT' | 'ROLLBACK') {
        await client.query(how)
        client.release()
      }
    })
  }

  /** Waits until `n` backends wait for a lock: a statement of the test is surely blocked. */
  async function lockWaiters (n: number): Promise<void> {
    for (let i = 0; i < 500; i++) {
      const { rows } = await pool.query("SELECT count(*)::int AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
      if (rows[0].n >= n) return
      await sleep(10)
    }
    throw new Error(`no ${n} statements waiting for a lock`)
  }

  async function rowsOf (store: PostgresStore, key?: string): Promise<any[]> {
    const { rows } = await pool.query(`SELECT * FROM ${store.table} WHERE namespace = $1 AND ($2::text IS NULL OR key = $2) ORDER BY key`, [store.namespace, key ?? null])
    return rows
  }

  /** Claims `key`, which must be free (`fingerprint` null: none). */
  async function claimToken (store: PostgresStore, key: string, fingerprint: string | null = 'fp', lockTtl = LONG): Promise<string> {
    const { token } = await store.claim(key, fingerprint ?? undefined, lockTtl)
    if (token === undefined) throw new Error(`${key} was not claimed`)
    return token
  }

  t.test('the store contract, through a Pool, default table', async (t) => {
    storeContract(t, {
      create: () => newStore(t),
      advance: (ms) => sleep(ms),
      short: SHORT,
      expiresIn: true
    })
  })

  t.test('the store contract, through one Client taking text only (prepare off), on a schema-qualified table with a hostile name', async (t) => {
    const client = new pg.Client({ connectionString: server.connectionString })
    await client.connect()
    t.teardown(() => client.end())
    const schema = 'contract "schema".v1'
    await pool.query(`CREATE SCHEMA ${quote(schema)}`)
    const table = `${quote(schema)}.${quote(`r "${uniqueTable('c')}"; --`)}`
    storeContract(t, {
      create: () => newStore(t, { pool: recording(client, true), table, prepare: false }),
      advance: (ms) => sleep(ms),
      short: SHORT,
      expiresIn: true
    })
  })

  t.test('data layout: one row per record, the response as bytea and jsonb, times from the database clock', async (t) => {
    const store = newStore(t)
    const token = await claimToken(store, 'k', 'fp', 5000)
    const [claimed] = await rowsOf(store, 'k')
    t.equal(claimed.token, token, 'the token is the row\'s bigint')
    t.equal(claimed.fingerprint, 'fp')
    t.equal(claimed.completed_at, null, 'in flight: not completed')
    t.equal(claimed.status_code, null)
    const { rows: [lease] } = await pool.query(`SELECT extract(epoch FROM expires_at - claimed_at) * 1000 AS ms FROM ${store.table} WHERE namespace = $1 AND key = 'k'`, [store.namespace])
    t.ok(Math.abs(Number(lease.ms) - 5000) < 50, `the lease ends lockTtl after the claim, both on the database clock (${lease.ms} ms)`)

    t.ok(await store.renew('k', token, 20_000))
    const { rows: [renewed] } = await pool.query(`SELECT extract(epoch FROM expires_at - clock_timestamp()) * 1000 AS ms FROM ${store.table} WHERE namespace = $1 AND key = 'k'`, [store.namespace])
    t.ok(Number(renewed.ms) > 19_000 && Number(renewed.ms) <= 20_000, `renew moves expires_at to lockTtl from now (${renewed.ms} ms)`)

    t.ok(await store.complete('k', token, sampleResponse(), 30_000))
    const [completed] = await rowsOf(store, 'k')
    t.type(completed.completed_at, Date, 'completed_at is set')
    t.equal(completed.status_code, 201)
    t.strictSame(completed.headers, sampleResponse().headers, 'headers as a jsonb object')
    const { rows: [queried] } = await pool.query(`SELECT headers->>'content-type' AS type, jsonb_typeof(headers->'x-multi') AS multi FROM ${store.table} WHERE namespace = $1 AND key = 'k'`, [store.namespace])
    t.strictSame(queried, { type: 'application/octet-stream', multi: 'array' }, 'which SQL can query')
    t.ok(completed.body.equals(BINARY), 'the body as raw bytes')
    t.equal(completed.body_is_text, false)
    t.ok(completed.expires_at.getTime() - completed.completed_at.getTime() > 29_000, 'the record expires ttl after completion')

    const text = await claimToken(store, 'text')
    t.ok(await store.complete('text', text, { statusCode: 200, headers: {}, body: TEXT }, null))
    const [saved] = await rowsOf(store, 'text')
    t.ok(saved.body.equals(Buffer.from(TEXT, 'utf8')), 'a string body is stored as its UTF-8 bytes')
    t.equal(saved.body_is_text, true, 'flagged as text')
    t.equal(saved.expires_at, null, 'ttl null: no expiry at all')

    const none = await claimToken(store, 'none', null)
    t.equal((await rowsOf(store, 'none'))[0].fingerprint, null, 'no fingerprint: NULL')
    t.ok(await store.release('none', none))
    t.strictSame(await rowsOf(store, 'none'), [], 'a released claim is deleted')
  })

  t.test('a process whose clock is an hour behind claims and completes like any other: every time is the database\'s', async (t) => {
    const store = newStore(t)
    const script = `
      const RealDate = Date
      const skew = -3600_000
      globalThis.Date = class extends RealDate {
        constructor (...args) { if (args.length === 0) super(RealDate.now() + skew); else super(...args) }
        static now () { return RealDate.now() + skew }
      }
      const { default: pg } = await import('pg')
      const { PostgresStore } = await import(${JSON.stringify(new URL('../../lib/stores/postgres.ts', import.meta.url).pathname)})
      const pool = new pg.Pool({ connectionString: process.argv[1] })
      const store = new PostgresStore({ pool, namespace: process.argv[2], sweepInterval: 0 })
      const claimed = await store.claim('claimed', 'fp', 60000)
      const done = await store.claim('done', 'fp', 60000)
      await store.complete('done', done.token, { statusCode: 200, headers: {}, body: 'ok' }, 60000)
      console.log(JSON.stringify({ skewed: Date.now() - RealDate.now(), claimed: typeof claimed.token }))
      await pool.end()
    `
    const child = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script, server.connectionString, store.namespace], { encoding: 'utf8', env: childEnv() })
    t.equal(child.status, 0, child.stderr)
    t.strictSame(JSON.parse(child.stdout), { skewed: -3600_000, claimed: 'string' }, 'the child\'s clock was an hour behind')
    t.strictSame(await store.lookup('claimed'), { state: 'in-flight', fingerprint: 'fp' }, 'its claim holds for lockTtl here')
    const done = await store.lookup('done')
    t.ok(done?.state === 'completed' && done.expiresIn !== undefined && done.expiresIn > 55_000 && done.expiresIn <= 60_000,
      `its record lives ttl from its completion (${done?.state === 'completed' && done.expiresIn})`)
  })

  t.test('statements are prepared once per connection, under names of their own; prepare: false prepares none', async (t) => {
    const client = new pg.Client({ connectionString: server.connectionString })
    await client.connect()
    t.teardown(() => client.end())
    const prepared = async () => (await client.query('SELECT name FROM pg_prepared_statements ORDER BY name')).rows.map((row) => row.name as string)
    const a = newStore(t, { pool: client, table: uniqueTable('prepared_a') })
    const b = newStore(t, { pool: client, table: uniqueTable('prepared_b') })
    for (const store of [a, b]) {
      const token = await claimToken(store, 'k')
      t.ok(await store.complete('k', token, sampleResponse(), LONG))
      t.equal((await store.claim('k', 'fp', LONG)).record?.state, 'completed')
    }
    const names = await prepared()
    t.equal(names.length, 5, 'claim and complete of each table, and the existence check they share (its text is the same): a statement run twice is prepared once')
    t.ok(names.every((name) => /^idempotency_[0-9a-f]{24}$/.test(name)), 'named after what they say, so two tables on one connection never clash')

    const plain = new pg.Client({ connectionString: server.connectionString })
    await plain.connect()
    t.teardown(() => plain.end())
    const unprepared = newStore(t, { pool: plain, table: uniqueTable('unprepared'), prepare: false })
    await claimToken(unprepared, 'k')
    t.strictSame((await plain.query('SELECT name FROM pg_prepared_statements')).rows, [], 'prepare: false')
  })

  t.test('round trips: one statement per operation, and a replay writes nothing', async (t) => {
    const client = recording(pool)
    const store = newStore(t, { pool: client })
    const token = await claimToken(store, 'k')
    t.strictSame(client.texts.map(kind), ['exists', 'claim'], 'first use: the tables are checked once (they exist), then one claim')
    client.texts.length = 0
    await store.complete('k', token, sampleResponse(), LONG)
    const { rows: [before] } = await pool.query(`SELECT xmin::text, xmax::text, ctid::text FROM ${store.table} WHERE namespace = $1 AND key = 'k'`, [store.namespace])
    t.equal((await store.claim('k', 'fp', LONG)).record?.state, 'completed')
    const { rows: [after] } = await pool.query(`SELECT xmin::text, xmax::text, ctid::text FROM ${store.table} WHERE namespace = $1 AND key = 'k'`, [store.namespace])
    t.strictSame(after, before, 'the replay neither updated nor locked the row')
    await store.lookup('k')
    const other = await claimToken(store, 'other')
    await store.renew('other', other, LONG)
    await store.release('other', other)
    await store.addStats({ 'POST /a': { ...emptyCounters(), executed: 2, replayed: 1, lastDuplicateAt: 5 } }, LONG)
    await store.readStats()
    await store.usage()
    t.strictSame(client.texts.map(kind), ['complete', 'claim', 'lookup', 'claim', 'renew', 'release', 'addStats', 'readStats', 'usage'], 'each operation: exactly one statement')
  })

  t.test('table names are read as SQL reads them, and always quoted', async (t) => {
    t.match(PostgresStore.schema(), /CREATE TABLE IF NOT EXISTS "idempotency_records" \(/, 'the default table')
    t.match(PostgresStore.schema('Billing.Idem'), /CREATE TABLE IF NOT EXISTS "billing"."idem" \(/, 'bare parts are folded to lower case, as PostgreSQL folds them')
    t.match(PostgresStore.schema('Billing.Idem'), /CREATE INDEX IF NOT EXISTS "idem_expires_idx" ON "billing"."idem"/, 'the index is named in the table\'s schema')
    t.match(PostgresStore.schema('"Billing"."Idem.v2"'), /"Billing"."Idem.v2"/, 'quoted parts are kept, dots included')
    t.match(PostgresStore.schema('"a ""b"""'), /CREATE TABLE IF NOT EXISTS "a ""b""" \(/, 'a doubled quote is one quote, quoted again on the way out')
    t.match(PostgresStore.schema('s.t'), /"s"."t_stats_periods"/)

    for (const [table, why] of [
      ['', /expected a name at character 1/],
      ['a b', /expected a table or schema.table/],
      ['a.b.c', /expected a table or schema.table/],
      ['.a', /expected a name at character 1/],
      ['a.', /expected a name at character 3/],
      ['"unclosed', /expected a name at character 1/],
      ['""', /expected a name/],
      ['x"; DROP TABLE y; --', /expected a table or schema.table/],
      ['1table', /expected a name at character 1/],
      ['"nul\0"', /NUL/],
      [`"${'s'.repeat(64)}".t`, /at most 63 bytes/],
      ['t'.repeat(50), /at most 49 bytes/],
      ['é'.repeat(25), /expected a name/]
    ] as Array<[string, RegExp]>) {
      t.throws(() => new PostgresStore({ pool, table }), { name: 'TypeError', message: why }, JSON.stringify(table))
    }
    t.throws(() => PostgresStore.schema(5 as unknown as string), { message: /table must be a string/ })
    t.doesNotThrow(() => PostgresStore.schema('t'.repeat(49)), 'the longest name whose stats table still fits 63 bytes')
    t.doesNotThrow(() => PostgresStore.schema(`"${'é'.repeat(24)}"`), 'a quoted name may be any text; its length counts in bytes')

    const schema = `Odd "schema". ${process.pid}`
    const victim = uniqueTable('victim')
    const name = `i.r "x"; DROP TABLE ${victim}; --`
    await pool.query(`CREATE SCHEMA ${quote(schema)}; CREATE TABLE ${victim} (id int)`)
    const store = newStore(t, { table: `${quote(schema)}.${quote(name)}` })
    t.equal(store.table, `${quote(schema)}.${quote(name)}`)
    const token = await claimToken(store, 'k')
    t.ok(await store.complete('k', token, sampleResponse(), LONG))
    const { rows } = await pool.query('SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 ORDER BY c.relname', [schema])
    const relations = rows.map((row) => `${row.relkind} ${row.relname}`)
    for (const [relkind, relname] of [['r', name], ['i', `${name}_expires_idx`], ['r', `${name}_stats`], ['r', `${name}_stats_periods`], ['S', `${name}_token_seq`]]) {
      t.ok(relations.includes(`${relkind} ${relname}`), `${relname} exists, named exactly`)
    }
    t.equal((await pool.query('SELECT to_regclass($1) IS NOT NULL AS kept', [victim])).rows[0].kept, true, 'nothing in the name ran as SQL')
    t.equal((await store.usage()).records, 1)
  })

  t.test('createTable false: nothing is created; PostgresStore.schema() applied by hand is what the store needs', async (t) => {
    const table = uniqueTable('manual')
    const client = recording(pool)
    const store = newStore(t, { pool: client, table, createTable: false })
    await t.rejects(store.claim('k', 'fp', LONG), { code: '42P01' }, 'a missing table is an error, passed on')
    t.strictSame(client.texts.map(kind), ['claim'], 'no check, no DDL')
    t.equal((await pool.query('SELECT to_regclass($1) AS t', [table])).rows[0].t, null, 'and nothing was created')

    await pool.query(PostgresStore.schema(table))
    await pool.query(PostgresStore.schema(table)) // a migration run twice changes nothing
    const token = await claimToken(store, 'k')
    t.ok(await store.complete('k', token, { statusCode: 200, headers: {}, body: 'ok' }, LONG))
    t.match(await store.claim('k', 'fp', LONG), { record: { state: 'completed', response: { body: 'ok' } } })
    await store.addStats({ 'POST /m': { ...emptyCounters(), executed: 1 } }, LONG)
    t.equal((await store.readStats())['POST /m'].executed, 1, 'the stats tables are in the schema too')
  })

  t.test('verify(), for start-up: creates the tables with createTable, says what to run without it', async (t) => {
    const created = uniqueTable('verified')
    const client = recording(pool)
    await newStore(t, { pool: client, table: created }).verify()
    t.not((await pool.query('SELECT to_regclass($1) AS t', [`${created}_stats_periods`])).rows[0].t, null, 'createTable: made before any request')
    t.strictSame(client.texts.map(kind), ['exists', 'ddl'])

    const missing = uniqueTable('unverified')
    const store = newStore(t, { table: missing, createTable: false })
    await t.rejects(store.verify(), { message: `PostgresStore: the table "${missing}", its stats tables or its index do not exist: create them with PostgresStore.schema("${missing}") in a migration, or set createTable: true` })
    await pool.query(PostgresStore.schema(missing))
    await pool.query(`DROP INDEX ${missing}_expires_idx`)
    await t.rejects(store.verify(), { message: /do not exist/ }, 'every object counts, the index too')
    await pool.query(PostgresStore.schema(missing))
    await store.verify()
    t.equal((await pool.query('SELECT to_regclass($1) AS t', [missing])).rows[0].t, missing, 'once migrated, it passes')
  })

  t.test('createTable leaves existing tables alone: no DDL, so a role without CREATE works', async (t) => {
    const table = uniqueTable('existing')
    const role = `idem_app_${process.pid}`
    await pool.query(PostgresStore.schema(table))
    await pool.query(`CREATE ROLE ${role} LOGIN; REVOKE CREATE ON SCHEMA public FROM PUBLIC;
      GRANT SELECT, INSERT, UPDATE, DELETE ON ${table}, ${table}_stats, ${table}_stats_periods TO ${role}`)
    t.teardown(() => pool.query('GRANT CREATE ON SCHEMA public TO PUBLIC'))
    const own = newPool(t, { connectionString: server.connectionString.replace('//postgres@', `//${role}@`) })
    t.equal((await own.query('SELECT current_user AS user')).rows[0].user, role)
    await t.rejects(own.query(`CREATE TABLE IF NOT EXISTS ${table} (id int)`), { message: /permission denied/ }, 'the role cannot run the DDL, not even IF NOT EXISTS')
    const client = recording(own)
    const store = newStore(t, { pool: client, table })
    const token = await claimToken(store, 'k')
    t.ok(await store.complete('k', token, sampleResponse(), LONG))
    await store.addStats({ 'POST /x': { ...emptyCounters(), executed: 1 } }, LONG)
    t.strictSame(client.texts.map(kind), ['exists', 'claim', 'complete', 'addStats'], 'checked, found, never created')
  })

  t.test('several pools creating the tables at once: one creates them, the others wait and find them', async (t) => {
    const table = uniqueTable('race')
    const pools = [newPool(t), newPool(t)]
    const stores = Array.from({ length: 12 }, (_, i) => newStore(t, { pool: recording(pools[i % 2]), table, namespace: 'race' }))
    const results = await Promise.all(stores.map((store, i) => store.claim(`k${i}`, 'fp', LONG)))
    t.ok(results.every((result) => typeof result.token === 'string'), 'every store claimed its key')
    const ddl = stores.filter((store) => ((store as unknown as { pool: { texts: string[] } }).pool.texts.map(kind)).includes('ddl')).length
    t.ok(ddl >= 1, `the tables were created (${ddl} stores ran the DDL, one at a time)`)
    t.equal((await stores[0].usage()).inFlight, 12)
  })

  t.test('a failed creation is tried again on the next call', async (t) => {
    const schema = `later_${process.pid}`
    const store = newStore(t, { table: `${schema}.records` })
    await t.rejects(store.claim('k', 'fp', LONG), { code: '3F000' }, 'the schema does not exist: the error is passed on')
    await pool.query(`CREATE SCHEMA ${schema}`)
    t.type((await store.claim('k', 'fp', LONG)).token, 'string', 'once it does, the tables are created and the claim goes through')
  })

  t.test('concurrent claims of one key from two pools: exactly one token, every other claim sees its record', async (t) => {
    const pools = [newPool(t), newPool(t)]
    const namespace = 'hot'
    const recorders = pools.map((own) => recording(own))
    const stores = recorders.map((own) => newStore(t, { pool: own, namespace }))
    await stores[0].claim('warm-up', undefined, LONG)
    await stores[1].claim('warm-up-2', undefined, LONG)
    const sent = () => recorders[0].texts.length + recorders[1].texts.length
    const before = sent()
    const rounds = 20
    for (let round = 0; round < rounds; round++) {
      const key = `hot-${round}`
      const results = await Promise.all(Array.from({ length: 50 }, (_, i) => stores[i % 2].claim(key, `fp-${round}`, LONG)))
      const winners = results.filter((result) => result.token !== undefined)
      t.equal(winners.length, 1, `round ${round}: one claim holds the key`)
      t.ok(results.every((result) => result.token !== undefined || (result.record?.state === 'in-flight' && result.record.fingerprint === `fp-${round}`)),
        'the 49 others see the winner\'s in-flight record')
    }

    // How often a snapshot missed a concurrent claim's row (varies from run to run).
    t.comment(`${sent() - before - rounds * 50} of ${rounds * 50} claims ran their statement again`)

    const expiring = await claimToken(stores[0], 'expired', 'old', 1)
    await sleep(20)
    const takeovers = await Promise.all(Array.from({ length: 50 }, (_, i) => stores[i % 2].claim('expired', 'new', LONG)))
    const taken = takeovers.filter((result) => result.token !== undefined)
    t.equal(taken.length, 1, 'one claim takes the expired claim over')
    t.ok(BigInt(taken[0].token as string) > BigInt(expiring), 'with a larger token')
    t.ok(takeovers.every((result) => result.token !== undefined || result.record?.fingerprint === 'new'), 'the others see the new claim')
  })

  t.test('a claim whose snapshot missed a row committed meanwhile runs again, and answers with that row', async (t) => {
    const client = recording(pool)
    const store = newStore(t, { pool: client })
    await store.claim('warm-up', undefined, LONG)
    const other = await transaction()
    await other.query(`INSERT INTO ${store.table} (namespace, key, fingerprint, expires_at) VALUES ($1, 'k', 'theirs', clock_timestamp() + interval '1 minute')`, [store.namespace])
    client.texts.length = 0
    const claim = store.claim('k', 'mine', LONG)
    await lockWaiters(1) // the insert waits for the other transaction's row
    await other.finish('COMMIT')
    t.strictSame(await claim, { record: { state: 'in-flight', fingerprint: 'theirs' } }, 'the committed row, not a second claim')
    t.strictSame(client.texts.map(kind), ['claim', 'claim'], 'one statement found nothing it could explain; the second found the row')
  })

  t.test('with REPEATABLE READ as the default isolation, concurrent claims still give one token', async (t) => {
    const own = newPool(t, { options: '-c default_transaction_isolation=repeatable\\ read' })
    t.equal((await own.query('SHOW default_transaction_isolation')).rows[0].default_transaction_isolation, 'repeatable read')
    const store = newStore(t, { pool: own })
    await store.claim('warm-up', undefined, LONG)
    const other = await transaction(own)
    await other.query(`INSERT INTO ${store.table} (namespace, key, fingerprint, expires_at) VALUES ($1, 'k', 'theirs', clock_timestamp() + interval '1 minute')`, [store.namespace])
    const claim = store.claim('k', 'mine', LONG)
    await lockWaiters(1)
    await other.finish('COMMIT')
    t.strictSame(await claim, { record: { state: 'in-flight', fingerprint: 'theirs' } }, 'a serialization failure is run again')
    const results = await Promise.all(Array.from({ length: 30 }, () => store.claim('hot', 'fp', LONG)))
    t.equal(results.filter((result) => result.token !== undefined).length, 1)
  })

  t.test('an expired claim, and an expired completed record, are taken over in one statement', async (t) => {
    const client = recording(pool)
    const store = newStore(t, { pool: client })
    const old = await claimToken(store, 'claim', 'fp-old', 1)
    const completed = await claimToken(store, 'record', 'fp-old', LONG)
    t.ok(await store.complete('record', completed, sampleResponse(), 1))
    await sleep(20)
    client.texts.length = 0
    const fresh = await claimToken(store, 'claim', 'fp-new')
    const again = await claimToken(store, 'record', null)
    t.strictSame(client.texts.map(kind), ['claim', 'claim'], 'one statement each')
    t.ok(BigInt(fresh) > BigInt(old) && BigInt(again) > BigInt(completed), 'new, larger tokens')
    t.strictSame(await store.lookup('claim'), { state: 'in-flight', fingerprint: 'fp-new' }, 'the new fingerprint')
    t.strictSame(await store.lookup('record'), { state: 'in-flight', fingerprint: undefined }, 'the record is a claim again, without fingerprint')
    const [row] = await rowsOf(store, 'record')
    t.strictSame([row.status_code, row.headers, row.body, row.body_is_text, row.completed_at], [null, null, null, null, null], 'the old response is gone')
    t.equal(await store.complete('record', completed, sampleResponse(), LONG), false, 'the old token is dead')
  })

  t.test('the application\'s type parsers change nothing', async (t) => {
    const own = newPool(t, {
      types: {
        getTypeParser: ((oid: number, format?: string) => oid === 20 ? Number : oid === 3802 ? String : pg.types.getTypeParser(oid, format as 'text')) as typeof pg.types.getTypeParser
      }
    })
    t.equal(typeof (await own.query('SELECT 1::bigint AS n')).rows[0].n, 'number', 'this pool parses int8 as a number')
    const store = newStore(t, { pool: own })
    const token = await claimToken(store, 'k')
    t.type(token, 'string', 'tokens are still strings')
    t.ok(await store.complete('k', token, sampleResponse(), LONG))
    const { record } = await store.claim('k', 'fp', LONG)
    t.strictSame(record?.state === 'completed' && record.response.headers, sampleResponse().headers, 'headers are still an object')
    await store.addStats({ r: { ...emptyCounters(), executed: 3 } }, LONG)
    t.equal((await store.readStats()).r.executed, 3)
    t.equal((await store.usage()).records, 1)
  })

  t.test('completeWith commits with the caller\'s transaction', async (t) => {
    const store = newStore(t)
    await pool.query('CREATE TABLE IF NOT EXISTS payments (id text PRIMARY KEY, token bigint)')
    const token = await claimToken(store, 'pay-1')
    const tx = await transaction()
    await tx.query('INSERT INTO payments (id, token) VALUES ($1, $2)', ['pay-1', token])
    t.equal(await store.completeWith(tx, 'pay-1', token, { statusCode: 201, headers: { 'content-type': 'application/json' }, body: TEXT }, LONG), true)
    t.strictSame(await store.lookup('pay-1'), { state: 'in-flight', fingerprint: 'fp' }, 'until the commit, others see the claim in flight')
    await tx.finish('COMMIT')
    const found = await store.lookup('pay-1')
    t.ok(found?.state === 'completed' && found.response.body === TEXT && found.response.statusCode === 201, 'after it, the completed record')
    t.equal((await pool.query("SELECT count(*)::int AS n FROM payments WHERE id = 'pay-1'")).rows[0].n, 1, 'with the payment')
    t.equal(await store.complete('pay-1', token, sampleResponse(), LONG), false, 'it cannot be completed again')
  })

  t.test('completeWith rolls back with the caller\'s transaction: the claim stays, the owner can still end it', async (t) => {
    const store = newStore(t)
    const token = await claimToken(store, 'k')
    const tx = await transaction()
    t.equal(await store.completeWith(tx, 'k', token, sampleResponse(), null), true)
    await tx.finish('ROLLBACK')
    t.strictSame(await store.lookup('k'), { state: 'in-flight', fingerprint: 'fp' }, 'nothing was saved')
    t.ok(await store.release('k', token), 'the claim is still the owner\'s')
  })

  t.test('completeWith after the claim was lost returns false, and changes nothing', async (t) => {
    const store = newStore(t)
    const stale = await claimToken(store, 'k', 'fp', 1)
    await sleep(20)
    const fresh = await claimToken(store, 'k', 'fp-new')
    const tx = await transaction()
    t.equal(await store.completeWith(tx, 'k', stale, sampleResponse(), LONG), false, 'taken over: false')
    t.equal(await store.completeWith(tx, 'never', stale, sampleResponse(), LONG), false, 'no such key: false')
    await tx.finish('COMMIT')
    t.strictSame(await store.lookup('k'), { state: 'in-flight', fingerprint: 'fp-new' }, 'the new claim holds')
    t.ok(await store.complete('k', fresh, sampleResponse(), LONG))
    const released = await claimToken(store, 'r')
    t.ok(await store.release('r', released))
    t.equal(await store.completeWith(pool, 'r', released, sampleResponse(), LONG), false, 'released: false (a pool works as a client too)')
  })

  t.test('completeWith of an expired claim nobody took over saves it; a takeover waits for the transaction, then sees the record', async (t) => {
    const store = newStore(t)
    const stale = await claimToken(store, 'k', 'fp', 1)
    await sleep(20)
    t.equal(await store.complete('k', stale, sampleResponse(), LONG), false, 'complete refuses an expired lease')
    const tx = await transaction()
    t.equal(await store.completeWith(tx, 'k', stale, sampleResponse(), LONG), true, 'completeWith saves it: the token is still the row\'s')
    const takeover = store.claim('k', 'fp', LONG)
    await lockWaiters(1)
    await tx.finish('COMMIT')
    const { record, token } = await takeover
    t.equal(token, undefined, 'the waiting claim did not take the key')
    t.ok(record?.state === 'completed' && Buffer.isBuffer(record.response.body) && record.response.body.equals(BINARY), 'it answers with the committed record')

    const other = await claimToken(store, 'rolled', 'fp', 1)
    await sleep(20)
    const rolled = await transaction()
    t.equal(await store.completeWith(rolled, 'rolled', other, sampleResponse(), LONG), true)
    const waiting = store.claim('rolled', 'fp-2', LONG)
    await lockWaiters(1)
    await rolled.finish('ROLLBACK')
    const after = await waiting
    t.type(after.token, 'string', 'after a rollback the expired claim is taken over')
    t.ok(BigInt(after.token as string) > BigInt(other))
  })

  t.test('completeWith in a REPEATABLE READ transaction fails with 40001 if the claim was renewed after its snapshot', async (t) => {
    const store = newStore(t)
    const token = await claimToken(store, 'k')
    const renewed = await transaction()
    await renewed.query('SET TRANSACTION ISOLATION LEVEL REPEATABLE READ')
    await renewed.query('SELECT 1') // the snapshot
    t.ok(await store.renew('k', token, LONG))
    await t.rejects(store.completeWith(renewed, 'k', token, sampleResponse(), LONG), { code: '40001' }, 'the caller\'s transaction is doomed: it rolls back (and may run again)')
    await renewed.finish('ROLLBACK')
    const fresh = await transaction()
    await fresh.query('SET TRANSACTION ISOLATION LEVEL REPEATABLE READ')
    await fresh.query('SELECT 1')
    t.equal(await store.completeWith(fresh, 'k', token, sampleResponse(), LONG), true, 'without a renew in between it saves')
    await fresh.finish('COMMIT')
    t.equal((await store.lookup('k'))?.state, 'completed')
  })

  t.test('the sweeper deletes expired rows only, in batches, skipping locked ones', async (t) => {
    const client = recording(pool)
    const table = uniqueTable('sweep')
    const store = newStore(t, { pool: client, table, sweepBatch: 4 })
    const other = newStore(t, { table })
    for (let i = 0; i < 6; i++) await claimToken(store, `expired-claim-${i}`, 'fp', 1)
    for (let i = 0; i < 3; i++) t.ok(await store.complete(`expired-record-${i}`, await claimToken(store, `expired-record-${i}`), sampleResponse(), 1))
    await claimToken(other, 'other-expired', 'fp', 1)
    await claimToken(store, 'live-claim')
    t.ok(await store.complete('live-record', await claimToken(store, 'live-record'), sampleResponse(), LONG))
    t.ok(await store.complete('forever', await claimToken(store, 'forever'), sampleResponse(), null))
    await claimToken(store, 'locked', 'fp', 1)
    await sleep(20)
    const lock = await transaction()
    await lock.query(`SELECT 1 FROM ${store.table} WHERE namespace = $1 AND key = 'locked' FOR UPDATE`, [store.namespace])

    client.texts.length = 0
    t.equal(await store.sweep(), 10, 'nine expired rows here and one of another namespace (expired is absent, whoever made it)')
    t.strictSame(client.texts.map(kind), ['sweep', 'sweep', 'sweep'], 'in statements of at most 4 rows: 4, 4, 2')
    t.strictSame((await rowsOf(store)).map((row) => row.key), ['forever', 'live-claim', 'live-record', 'locked'], 'live rows stay; the locked one was skipped, not waited for')
    await lock.finish('COMMIT')
    t.equal(await store.sweep(), 1, 'once unlocked, it goes too')
    t.equal(await store.sweep(), 0)
  })

  t.test('a sweep already running is joined; close() stops it after its batch and waits for it', async (t) => {
    const store = newStore(t, { table: uniqueTable('joined'), sweepBatch: 1 })
    for (let i = 0; i < 5; i++) await claimToken(store, `k${i}`, 'fp', 1)
    await sleep(20)
    const sweep = store.sweep()
    t.equal(store.sweep(), sweep, 'a second call joins the first')
    const closed = store.close()
    t.equal(await sweep, 1, 'one batch, then it stopped')
    await closed
    t.equal((await rowsOf(store)).length, 4)
  })

  t.test('the sweeper runs every sweepInterval once the store is in use, and stops on close()', async (t) => {
    const idle = newStore(t, { table: uniqueTable('idle'), sweepInterval: 10 })
    const store = newStore(t, { table: uniqueTable('interval'), sweepInterval: 10 })
    await claimToken(store, 'k', 'fp', 1)
    for (let i = 0; i < 500 && (await rowsOf(store)).length > 0; i++) await sleep(10)
    t.strictSame(await rowsOf(store), [], 'the expired claim was swept by the timer')
    t.equal((await pool.query('SELECT to_regclass($1) AS t', [idle.table])).rows[0].t, null, 'a store never used creates nothing, not even by sweeping')
    await store.close()
    await claimToken(store, 'after', 'fp', 1)
    await sleep(100)
    t.equal((await rowsOf(store)).length, 1, 'after close() nothing is swept')
  })

  t.test('namespaces share the table and never mix', async (t) => {
    const table = uniqueTable('namespaces')
    const a = newStore(t, { table, namespace: 'a' })
    const b = newStore(t, { table, namespace: 'b' })
    const tokenA = await claimToken(a, 'k', 'fp-a')
    const tokenB = await claimToken(b, 'k', 'fp-b')
    t.not(tokenA, tokenB)
    t.equal(await b.complete('k', tokenA, sampleResponse(), LONG), false, 'a token of one namespace does nothing in another')
    t.equal(await b.release('k', tokenA), false)
    t.equal(await b.renew('k', tokenA, LONG), false)
    t.ok(await a.complete('k', tokenA, sampleResponse(), LONG))
    t.strictSame(await b.lookup('k'), { state: 'in-flight', fingerprint: 'fp-b' }, 'b still sees its own claim')
    t.equal((await a.lookup('k'))?.state, 'completed')
    t.match(await a.usage(), { records: 1, inFlight: 0 })
    t.match(await b.usage(), { records: 0, inFlight: 1 })
    await a.addStats({ r: { ...emptyCounters(), executed: 1 } }, LONG)
    await b.addStats({ r: { ...emptyCounters(), executed: 5 } }, LONG)
    t.equal((await a.readStats()).r.executed, 1)
    t.equal((await b.readStats()).r.executed, 5)
  })

  t.test('usage: live records and claims of the namespace, and the table\'s size', async (t) => {
    const store = newStore(t, { table: uniqueTable('usage') })
    t.match(await store.usage(), { records: 0, inFlight: 0, estimated: false }, 'empty')
    for (let i = 0; i < 3; i++) await store.complete(`r${i}`, await claimToken(store, `r${i}`), sampleResponse(), LONG)
    await claimToken(store, 'claim')
    await claimToken(store, 'expired-claim', 'fp', 1)
    await store.complete('expired-record', await claimToken(store, 'expired-record'), sampleResponse(), 1)
    await store.complete('forever', await claimToken(store, 'forever'), sampleResponse(), null)
    await sleep(20)
    const usage = await store.usage()
    const { rows: [size] } = await pool.query('SELECT pg_total_relation_size($1::regclass)::float8 AS bytes', [store.table])
    t.strictSame(usage, { records: 4, inFlight: 1, bytes: size.bytes, estimated: false }, 'expired rows do not count')
    t.ok(usage.bytes as number > 0)
  })

  t.test('stats: summed per route and counter, lastDuplicateAt the latest, kept ttl after the last change', async (t) => {
    const store = newStore(t)
    const odd = 'POST /a,b "c" {d} \\e\nf ✓'
    t.strictSame(await store.readStats(), {}, 'nothing yet')
    await store.addStats({
      'POST /orders': { ...emptyCounters(), executed: 3, replayed: 2, lastDuplicateAt: 2000 },
      [odd]: { ...emptyCounters(), mismatches: 1, lastDuplicateAt: 10 }
    }, 300)
    await store.addStats({ 'POST /orders': { ...emptyCounters(), executed: 1, conflicts: 4, storeErrors: 1, lastDuplicateAt: 1000 } }, 300)
    t.strictSame(await store.readStats(), {
      'POST /orders': { ...emptyCounters(), executed: 4, replayed: 2, conflicts: 4, storeErrors: 1, lastDuplicateAt: 2000 },
      [odd]: { ...emptyCounters(), mismatches: 1, lastDuplicateAt: 10 }
    }, 'sums, the latest duplicate, any route name')

    await sleep(200)
    await store.addStats({ 'POST /other': { ...emptyCounters(), invalidKeys: 1 } }, 300)
    await sleep(200)
    t.equal((await store.readStats())['POST /orders']?.executed, 4, 'a change to any route keeps the whole namespace (as one Redis hash)')
    await sleep(400)
    t.strictSame(await store.readStats(), {}, 'ttl after the last change, everything is gone')
    await store.addStats({ 'POST /orders': { ...emptyCounters(), executed: 1, lastDuplicateAt: 5 } }, 300)
    t.strictSame(await store.readStats(), { 'POST /orders': { ...emptyCounters(), executed: 1, lastDuplicateAt: 5 } }, 'a new period starts from zero, not from the ended one')

    const { rows: [{ period }] } = await pool.query(`SELECT period FROM ${store.table.slice(0, -1)}_stats_periods" WHERE namespace = $1`, [store.namespace])
    await pool.query(`INSERT INTO ${store.table.slice(0, -1)}_stats" VALUES ($1, 'POST /orders', 'fromAFutureVersion', $2, 7)`, [store.namespace, period])
    t.strictSame(await store.readStats(), { 'POST /orders': { ...emptyCounters(), executed: 1, lastDuplicateAt: 5 } }, 'a counter this version does not know is left out')
  })

  t.test('stats: concurrent flushes from two pools add up, whatever routes they touch', async (t) => {
    const namespace = 'concurrent-stats'
    const stores = [newPool(t), newPool(t)].map((own) => newStore(t, { pool: own, namespace }))
    const routes = ['A', 'B', 'C', 'D']
    await Promise.all(Array.from({ length: 40 }, (_, i) => {
      // Each flush touches routes in its own order: counter rows are never what the flushes queue on.
      const touched = i % 2 === 0 ? routes : [...routes].reverse()
      return stores[i % 2].addStats(Object.fromEntries(touched.map((route) => [route, { ...emptyCounters(), executed: 1, lastDuplicateAt: i }])), LONG)
    }))
    const counts = await stores[0].readStats()
    for (const route of routes) t.strictSame(counts[route], { ...emptyCounters(), executed: 40, lastDuplicateAt: 39 }, route)
  })

  t.test('a store call waits at most timeout; a claim that went through late is released', async (t) => {
    const client = recording(newPool(t))
    const table = uniqueTable('timeout')
    await pool.query(PostgresStore.schema(table))
    const store = newStore(t, { pool: client, table, timeout: 200 })
    const held = await claimToken(store, 'held')
    const expired = await claimToken(store, 'expired', 'fp', 1)
    await store.addStats({ r: { ...emptyCounters(), executed: 1 } }, LONG)
    await sleep(20)

    const row = await transaction()
    await row.query(`SELECT 1 FROM ${table} WHERE namespace = $1 AND key = 'expired' FOR UPDATE`, [store.namespace])
    await t.rejects(store.claim('expired', 'fp', LONG), { ...TIMED_OUT, message: /did not answer within 200 ms/ }, 'a takeover waiting for a row lock times out')
    await row.finish('COMMIT')
    for (let i = 0; i < 200 && (await rowsOf(store, 'expired')).length > 0; i++) await sleep(10)
    t.strictSame(await rowsOf(store, 'expired'), [], 'when the lock came, it took the key over; its late answer released it')
    t.type((await store.claim('expired', 'fp', LONG)).token, 'string', 'so a retry claims the key at once')
    t.equal(await store.release('expired', expired), false)

    const tables = await transaction()
    await tables.query(`LOCK TABLE ${table}, ${table}_stats, ${table}_stats_periods IN ACCESS EXCLUSIVE MODE`)
    const tx = await transaction()
    const sweeper = newStore(t, { pool: client, table, timeout: 200 })
    const sweeping = sweeper.sweep()
    await sweeper.close()
    await Promise.all([
      t.rejects(sweeping, TIMED_OUT, 'sweep (and close() waited for it, without throwing)'),
      t.rejects(store.claim('free', 'fp', LONG), TIMED_OUT, 'claim of a free key'),
      t.rejects(store.claim('held', 'fp', LONG), TIMED_OUT, 'claim of a held key'),
      t.rejects(store.lookup('held'), TIMED_OUT, 'lookup'),
      t.rejects(store.renew('held', held, LONG), TIMED_OUT, 'renew'),
      t.rejects(store.release('held', 'not-the-token'), TIMED_OUT, 'release'),
      t.rejects(store.usage(), TIMED_OUT, 'usage'),
      t.rejects(store.addStats({ r: { ...emptyCounters(), executed: 1 } }, LONG), TIMED_OUT, 'addStats'),
      t.rejects(store.readStats(), TIMED_OUT, 'readStats'),
      t.rejects(store.complete('held', held, sampleResponse(), LONG), TIMED_OUT, 'complete'),
      t.rejects(store.completeWith(tx, 'held', held, sampleResponse(), LONG), TIMED_OUT, 'completeWith')
    ])
    const releases = client.texts.filter((text) => kind(text) === 'release').length
    const rolledBack = tx.finish('ROLLBACK') // queued behind its blocked update
    await tables.finish('ROLLBACK')
    await rolledBack
    for (let i = 0; i < 200 && (client.pending > 0 || client.texts.filter((text) => kind(text) === 'release').length === releases); i++) await sleep(10)
    console.error('DEBUG', client.pending, client.texts.slice(-15).map(kind))
    t.equal(client.texts.filter((text) => kind(text) === 'release').length, releases + 1, 'one late answer was a claim: it was released')
    t.strictSame(await rowsOf(store, 'free'), [], 'the free key is free again')
    t.type((await store.claim('free', 'fp', LONG)).token, 'string')
    t.equal((await rowsOf(store, 'held'))[0].token, held, 'the late claim of the held key left it to its owner')
    t.equal((await store.lookup('held'))?.state, 'completed', 'a complete that timed out may still have been applied: the caller cannot tell')
    t.equal((await store.readStats()).r.executed, 2, 'and so may a flush of stats')
  })

  t.test('the first use is bounded too; creation that finishes late is not run again', async (t) => {
    const table = uniqueTable('slow')
    await pool.query(PostgresStore.schema(table))
    await pool.query(`DROP TABLE ${table}_stats`)
    const client = recording(pool)
    const store = newStore(t, { pool: client, table, timeout: 200 })
    const lock = await transaction()
    await lock.query(`LOCK TABLE ${table} IN ACCESS EXCLUSIVE MODE`) // CREATE INDEX IF NOT EXISTS waits for it
    await t.rejects(store.claim('k', 'fp', LONG), TIMED_OUT, 'the creation waited: the call timed out')
    await lock.finish('ROLLBACK')
    t.type((await store.claim('k', 'fp', LONG)).token, 'string', 'the next call goes through')
    t.strictSame(client.texts.map(kind), ['exists', 'ddl', 'claim'], 'the timed-out call sent no claim once the tables were there; the creation ran once')
    t.not((await pool.query('SELECT to_regclass($1) AS t', [`${table}_stats`])).rows[0].t, null, 'which made the missing table')
  })

  t.test('a crashed server fails calls with its error; after a restart the same store works again', async (t) => {
    // Commits reach the WAL before they are acknowledged, so a crash keeps them (fsync stays off).
    const crashing = await startPostgres({ settings: { synchronous_commit: 'on' } })
    t.teardown(() => crashing.stop())
    const own = new pg.Pool({ connectionString: crashing.connectionString })
    own.on('error', () => {}) // the idle connections die with the server
    t.teardown(() => own.end())
    const store = newStore(t, { pool: own, timeout: 5000 })
    const token = await claimToken(store, 'k')
    await crashing.crash()
    await t.rejects(store.complete('k', token, sampleResponse(), LONG), { message: /terminat|ECONNREFUSED|Connection/i }, 'the driver\'s error, not a timeout')
    await crashing.restart()
    let result: unknown
    for (let i = 0; i < 50; i++) {
      try {
        result = await store.complete('k', token, sampleResponse(), LONG)
        break
      } catch {
        await sleep(50) // connections the pool still held from before the crash
      }
    }
    t.equal(result, true, 'the claim survived the crash (it was committed) and completes')
    t.equal((await store.claim('k', 'fp', LONG)).record?.state, 'completed')
  })

  t.test('defaults, and close() leaves the pool to the application', async (t) => {
    const store = new PostgresStore({ pool })
    t.equal(store.table, '"idempotency_records"')
    t.equal(store.namespace, 'idempotency')
    t.equal(store.timeout, 2000)
    t.equal(store.sweepInterval, 60_000)
    t.equal(store.sweepBatch, 1000)
    const key = `defaults-${process.pid}-${Date.now()}`
    const token = await claimToken(store, key)
    t.ok(await store.release(key, token))
    await store.close()
    await store.close()
    t.equal((await pool.query('SELECT 1 AS one')).rows[0].one, 1, 'the pool still works after close()')
  })

  t.test('constructor validation', async (t) => {
    const bad = (options: unknown) => () => new PostgresStore(options as PostgresStoreOptions)
    t.throws(bad(undefined), { name: 'TypeError', message: /pool must be a pg Pool/ })
    t.throws(bad({}), { message: /pool must be a pg Pool/ })
    t.throws(bad({ pool: {} }), { message: /pool must be a pg Pool/ })
    t.throws(bad({ pool, namespace: '' }), { message: /namespace must be a non-empty string/ })
    t.throws(bad({ pool, namespace: 5 }), { message: /namespace must be a non-empty string/ })
    t.throws(bad({ pool, createTable: 'yes' }), { message: /createTable must be a boolean/ })
    t.throws(bad({ pool, timeout: 0 }), { message: /timeout must be a positive integer/ })
    t.throws(bad({ pool, timeout: 1.5 }), { message: /timeout must be a positive integer/ })
    t.throws(bad({ pool, sweepInterval: -1 }), { message: /sweepInterval must be an integer >= 0/ })
    t.throws(bad({ pool, sweepBatch: 0 }), { message: /sweepBatch must be a positive integer/ })
    t.throws(bad({ pool, prepare: 1 }), { message: /prepare must be a boolean/ })
    t.throws(bad({ pool, table: 'a b' }), { message: /invalid table "a b"/ })
  })
})
