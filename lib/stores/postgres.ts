/**
 * The transactional store: PostgreSQL, through a `pg` pool that the
 * application owns (usually the one `@fastify/postgres` decorates). A handler
 * can save its response in the same transaction as its own writes
 * (`completeWith`), so that a crash between the two can never leave a side
 * effect without its record, nor a record without its side effect.
 *
 * Data layout, one row per record in `table` (default `idempotency_records`),
 * keyed by (namespace, key):
 *
 *   token         the fencing token of the latest claim: an identity column,
 *                 drawn again from its sequence on every takeover (CACHE 1, so
 *                 numbers come out in order across connections)
 *   fingerprint   the request fingerprint, NULL when there is none
 *   completed_at  NULL while the claim is in flight
 *   status_code, headers (jsonb), body (bytea), body_is_text
 *                 the saved response, once completed; body_is_text says the
 *                 body was a string (stored as its UTF-8 bytes)
 *   claimed_at    when the latest claim was made
 *   expires_at    the end of the lease while in flight, of the ttl once
 *                 completed; NULL: the record never expires
 *
 * Every time comes from the database clock (`clock_timestamp()`), never from
 * the application's. An expired row counts as absent on every read; it is
 * taken over by the next claim of its key, and the sweeper deletes expired
 * rows in batches. Stats live in two small tables beside it (see addStats).
 *
 * Every operation is one statement. A claim that its statement's snapshot
 * cannot explain (a concurrent claim committed the row after the snapshot
 * was taken) runs again; nothing else ever needs a second round trip.
 */
import { createHash } from 'node:crypto'
import { Deadlines } from './deadline.js'
import { StoreTimeoutError } from '../errors.js'
import { COUNTERS, emptyCounters } from '../stats.js'
import type { ClaimResult, IdempotencyRecord, IdempotencyStore, RouteCounters, SqlClient, StatsCounts, StoredResponse, StoreUsage } from '../../types/index.js'

export interface PostgresStoreOptions {
  /** A `pg` Pool (or Client); the application owns it: `close()` never ends it. */
  pool: SqlClient
  /**
   * The records table, written as in SQL: `name` or `schema.name`, each part
   * bare (folded to lower case, as PostgreSQL folds it) or double-quoted
   * (kept as written; `""` for a quote), e.g. `'"Billing"."idem.v2"'`. The
   * stats tables take its name with `_stats` and `_stats_periods` appended.
   * Default `'idempotency_records'`.
   */
  table?: string
  /** Records and stats of other namespaces in the same tables are never seen. Default `'idempotency'`. */
  namespace?: string
  /**
   * Create the tables and the index on first use if they are missing (the
   * schema must exist). Default true. With false, run `PostgresStore.schema()`
   * in a migration instead.
   */
  createTable?: boolean
  /** How long any store call waits before it fails with `FST_IDEMPOTENCY_STORE_TIMEOUT`, in ms. Default 2000. */
  timeout?: number
  /** How often expired records are deleted, in ms; 0 never. Default 60 000. */
  sweepInterval?: number
  /** The most rows one delete statement of the sweeper removes. Default 1000. */
  sweepBatch?: number
  /**
   * Send the store's statements as named prepared statements, so that each
   * connection parses and plans them once: planning is most of what a
   * claim costs PostgreSQL. Default true. Turn it off behind a pooler that does not keep
   * prepared statements (PgBouncer in transaction mode before 1.21, or
   * without `max_prepared_statements`), or for a client whose `query` takes
   * only text.
   */
  prepare?: boolean
}

/** The names of the store's objects, each quoted as an identifier. */
interface Names {
  records: string
  /** Unqualified, as CREATE INDEX takes it (an index lives in its table's schema). */
  expiresIndex: string
  /** Qualified, as to_regclass finds it. */
  expiresIndexQualified: string
  stats: string
  periods: string
}

/** What the stats tables and the index add to the table's name. */
const SUFFIXES = { expiresIndex: '_expires_idx', stats: '_stats', periods: '_stats_periods' }
/** PostgreSQL truncates longer identifiers, which could make two derived names one. */
const MAX_IDENTIFIER_BYTES = 63
const PART = /"((?:[^"]|"")+)"|([A-Za-z_][A-Za-z0-9_$]*)/y

function quote (identifier: string): string {
  return `"${identifier.replace(/"/g, '""')}"`
}

/**
 * Parses `table` as SQL would read a (possibly schema-qualified) name, so that
 * it means what the same text means in a migration: never interpolated, every
 * part is quoted again from its parsed value.
 */
function tableNames (table: string): Names {
  if (typeof table !== 'string') throw new TypeError('PostgresStore: table must be a string')
  const parts: string[] = []
  PART.lastIndex = 0
  while (true) {
    const at = PART.lastIndex
    const match = PART.exec(table)
    if (match === null || match.index !== at) throw invalidTable(table, `expected a name at character ${at + 1}`)
    parts.push(match[1] !== undefined ? match[1].replace(/""/g, '"') : match[2].toLowerCase())
    if (PART.lastIndex === table.length) break
    if (table[PART.lastIndex] !== '.' || parts.length === 2) throw invalidTable(table, 'expected a table or schema.table')
    PART.lastIndex++
  }
  for (const part of parts) {
    if (part.includes('\0')) throw invalidTable(table, 'a name cannot contain a NUL character')
    if (Buffer.byteLength(part) > MAX_IDENTIFIER_BYTES) throw invalidTable(table, `a name is at most ${MAX_IDENTIFIER_BYTES} bytes`)
  }
  const name = parts[parts.length - 1]
  const longest = Math.max(...Object.values(SUFFIXES).map((suffix) => suffix.length))
  if (Buffer.byteLength(name) + longest > MAX_IDENTIFIER_BYTES) {
    throw invalidTable(table, `the table name is at most ${MAX_IDENTIFIER_BYTES - longest} bytes (the stats tables append up to ${longest})`)
  }
  const schema = parts.length === 2 ? quote(parts[0]) + '.' : ''
  return {
    records: schema + quote(name),
    expiresIndex: quote(name + SUFFIXES.expiresIndex),
    expiresIndexQualified: schema + quote(name + SUFFIXES.expiresIndex),
    stats: schema + quote(name + SUFFIXES.stats),
    periods: schema + quote(name + SUFFIXES.periods)
  }
}

function invalidTable (table: string, why: string): TypeError {
  return new TypeError(`PostgresStore: invalid table ${JSON.stringify(table)}: ${why}; write it as in SQL, e.g. 'billing.idempotency' or '"Billing"."idem.v2"'`)
}

function schemaSql (names: Names): string {
  return `CREATE TABLE IF NOT EXISTS ${names.records} (
  namespace text NOT NULL,
  key text NOT NULL,
  token bigint NOT NULL GENERATED BY DEFAULT AS IDENTITY (CACHE 1),
  fingerprint text,
  status_code integer,
  headers jsonb,
  body bytea,
  body_is_text boolean,
  claimed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
  completed_at timestamptz,
  expires_at timestamptz,
  PRIMARY KEY (namespace, key),
  CHECK (completed_at IS NOT NULL OR expires_at IS NOT NULL)
);
CREATE INDEX IF NOT EXISTS ${names.expiresIndex} ON ${names.records} (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS ${names.periods} (
  namespace text PRIMARY KEY,
  period bigint NOT NULL,
  expires_at timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS ${names.stats} (
  namespace text NOT NULL,
  route text NOT NULL,
  counter text NOT NULL,
  period bigint NOT NULL,
  value bigint NOT NULL,
  PRIMARY KEY (namespace, route, counter)
);
`
}

/** `$n` ms from now on the database clock; NULL stays NULL (no expiry). */
const fromNow = (n: number) => `clock_timestamp() + $${n}::float8 * interval '1 millisecond'`
const LIVE = '(expires_at IS NULL OR expires_at > clock_timestamp())'
/**
 * The columns a read returns. Each is cast to what the store parses, so an
 * application's own type parsers (int8 as a number, say) change nothing;
 * `expires_in` is in ms, NULL for no expiry.
 */
const RECORD = `fingerprint, completed_at IS NOT NULL AS completed, status_code, headers::text AS headers, body, body_is_text,
  (extract(epoch FROM expires_at - clock_timestamp()) * 1000)::float8 AS expires_in`
const RECORD_NAMES = 'fingerprint, completed, status_code, headers, body, body_is_text, expires_in'

/** A statement and the name it is prepared under: its hash, so stores of different tables on one pool never clash. */
interface Statement {
  name: string
  text: string
}

/** What `pg` accepts besides text: a named statement. */
interface PreparingClient {
  query (config: { name: string, text: string, values: unknown[] }): ReturnType<SqlClient['query']>
}

/** The statements of one table, built once per store. Values always travel as parameters. */
function statements (names: Names) {
  const texts = statementTexts(names)
  const named = Object.entries(texts).map(([key, text]) => [key, { name: `idempotency_${createHash('sha256').update(text).digest('hex').slice(0, 24)}`, text }])
  return Object.fromEntries(named) as Record<keyof typeof texts, Statement>
}

function statementTexts (names: Names) {
  const { records, stats, periods } = names
  const own = 'namespace = $1 AND key = $2 AND token::text = $3 AND completed_at IS NULL'
  const completion = `UPDATE ${records} SET status_code = $4, headers = $5::jsonb, body = $6, body_is_text = $7,
  completed_at = clock_timestamp(), expires_at = ${fromNow(8)}
WHERE ${own}`
  return {
    /** Whether the three tables and the index all exist. */
    exists: 'SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL AND to_regclass($3) IS NOT NULL AND to_regclass($4) IS NOT NULL AS ready',
    /**
     * $1 namespace, $2 key, $3 fingerprint, $4 lockTtl. A live row in the
     * snapshot is answered as it is, without writing; otherwise the insert
     * claims the key, or takes over a row that has expired by the time its
     * lock is held. `token = DEFAULT` draws a new token after that lock, so a
     * claim that waited still gets a larger token than the one it replaced.
     * No row back: the key was claimed by a statement that committed after
     * this one's snapshot (the caller runs it again).
     */
    claim: `WITH existing AS (
  SELECT ${RECORD} FROM ${records} WHERE namespace = $1 AND key = $2 AND ${LIVE}
), claimed AS (
  INSERT INTO ${records} AS r (namespace, key, fingerprint, expires_at)
  SELECT $1, $2, $3, ${fromNow(4)} WHERE NOT EXISTS (SELECT FROM existing)
  ON CONFLICT (namespace, key) DO UPDATE SET token = DEFAULT, fingerprint = excluded.fingerprint, expires_at = ${fromNow(4)},
    claimed_at = clock_timestamp(), completed_at = NULL, status_code = NULL, headers = NULL, body = NULL, body_is_text = NULL
  WHERE r.expires_at <= clock_timestamp()
  RETURNING token
)
SELECT token::text AS token, NULL::text AS fingerprint, NULL::boolean AS completed, NULL::integer AS status_code, NULL::text AS headers,
  NULL::bytea AS body, NULL::boolean AS body_is_text, NULL::float8 AS expires_in FROM claimed
UNION ALL
SELECT NULL, ${RECORD_NAMES} FROM existing`,
    lookup: `SELECT ${RECORD} FROM ${records} WHERE namespace = $1 AND key = $2 AND ${LIVE}`,
    /** $1 namespace, $2 key, $3 token, $4 status, $5 headers, $6 body, $7 body is text, $8 ttl. */
    complete: `${completion} AND expires_at > clock_timestamp()`,
    /**
     * The same, through the caller's transaction, without the lease check: a
     * lease that ran out while nobody took the key over leaves the token in
     * the row, and no duplicate can have run. The row stays locked until the
     * caller's transaction ends, so a takeover waits for it and then finds
     * the record completed (commit) or still expired (rollback).
     */
    completeWith: completion,
    /** Deletes the caller's own claim, expired or not; says whether it still held the key. */
    release: `DELETE FROM ${records} WHERE ${own} RETURNING expires_at > clock_timestamp() AS held`,
    renew: `UPDATE ${records} SET expires_at = ${fromNow(4)} WHERE ${own} AND expires_at > clock_timestamp()`,
    /**
     * At most $1 expired rows of any namespace (expired is absent, whoever
     * made it). `statement_timestamp()` rather than `clock_timestamp()`: the
     * index serves only a stable bound. Rows locked by a claim or a
     * completeWith are skipped, never waited for.
     */
    sweep: `DELETE FROM ${records} WHERE ctid = ANY (ARRAY(
  SELECT ctid FROM ${records} WHERE expires_at <= statement_timestamp() LIMIT $1 FOR UPDATE SKIP LOCKED))`,
    usage: `SELECT count(*) FILTER (WHERE completed_at IS NOT NULL)::float8 AS records, count(*) FILTER (WHERE completed_at IS NULL)::float8 AS in_flight,
  pg_total_relation_size($2::regclass)::float8 AS bytes
FROM ${records} WHERE namespace = $1 AND ${LIVE}`,
    /**
     * $1 namespace, $2 ttl, then routes, counters and values as arrays. A
     * namespace's stats live in one period, which ends `ttl` after its last
     * change (as one Redis hash expires). The period row is locked first, so
     * concurrent flushes of one namespace take turns and never deadlock on
     * the counter rows; a counter left from an ended period starts again.
     */
    addStats: `WITH period AS (
  INSERT INTO ${periods} AS p (namespace, period, expires_at) VALUES ($1, 1, ${fromNow(2)})
  ON CONFLICT (namespace) DO UPDATE SET expires_at = ${fromNow(2)},
    period = CASE WHEN p.expires_at > clock_timestamp() THEN p.period ELSE p.period + 1 END
  RETURNING period
)
INSERT INTO ${stats} AS s (namespace, route, counter, period, value)
SELECT $1, c.route, c.counter, period.period, c.value FROM period, unnest($3::text[], $4::text[], $5::bigint[]) AS c (route, counter, value)
ON CONFLICT (namespace, route, counter) DO UPDATE SET period = excluded.period, value = CASE
  WHEN s.period <> excluded.period THEN excluded.value
  WHEN s.counter = 'lastDuplicateAt' THEN greatest(s.value, excluded.value)
  ELSE s.value + excluded.value END`,
    readStats: `SELECT s.route, s.counter, s.value::float8 AS value FROM ${stats} s
JOIN ${periods} p ON p.namespace = s.namespace AND p.period = s.period
WHERE s.namespace = $1 AND p.expires_at > clock_timestamp()`
  }
}

interface RecordRow {
  token: string | null
  fingerprint: string | null
  completed: boolean
  status_code: number
  headers: string
  body: Buffer
  body_is_text: boolean
  expires_in: number | null
}

function toRecord (row: RecordRow): IdempotencyRecord {
  const fingerprint = row.fingerprint ?? undefined
  if (!row.completed) return { state: 'in-flight', fingerprint }
  return {
    state: 'completed',
    fingerprint,
    response: {
      statusCode: row.status_code,
      headers: JSON.parse(row.headers),
      body: row.body_is_text ? row.body.toString('utf8') : row.body
    },
    expiresIn: row.expires_in === null ? Infinity : Math.max(0, Math.floor(row.expires_in))
  }
}

function completionValues (namespace: string, key: string, token: string, response: StoredResponse, ttl: number | null): unknown[] {
  const isText = typeof response.body === 'string'
  const body = isText ? Buffer.from(response.body as string, 'utf8') : response.body
  return [namespace, key, token, response.statusCode, JSON.stringify(response.headers), body, isText, ttl]
}

/** A fixed advisory lock class for the store's DDL; the second key is the table's. */
const LOCK_CLASS = 0x1de0
const noop = (): void => {}
const SERIALIZATION_FAILURE = '40001'

export class PostgresStore implements IdempotencyStore {
  /** The records table, quoted as it is used in statements. */
  readonly table: string
  readonly namespace: string
  readonly timeout: number
  readonly sweepInterval: number
  readonly sweepBatch: number
  private readonly pool: SqlClient
  private readonly names: Names
  private readonly sql: ReturnType<typeof statements>
  private readonly prepare: boolean
  private readonly createTable: boolean
  /** The `table` option as given, for messages. */
  private readonly tableOption: string
  private readonly deadlines: Deadlines
  /** Set once the tables are known to exist (or createTable is off). */
  private ready: boolean
  private creating: Promise<void> | undefined
  private readonly sweeper: NodeJS.Timeout | undefined
  private sweeping: Promise<number> | undefined
  private closed = false

  /**
   * The SQL that creates the store's tables and index (`IF NOT EXISTS`), for
   * migrations: `createTable` runs the same. The schema itself must exist.
   * The application's role needs SELECT, INSERT, UPDATE and DELETE on the
   * three tables (the token's identity sequence needs no grant).
   */
  static schema (table = 'idempotency_records'): string {
    return schemaSql(tableNames(table))
  }

  constructor (options: PostgresStoreOptions) {
    const {
      pool, table = 'idempotency_records', namespace = 'idempotency', createTable = true,
      timeout = 2000, sweepInterval = 60_000, sweepBatch = 1000, prepare = true
    } = options ?? {}
    if (typeof pool?.query !== 'function') throw new TypeError('PostgresStore: pool must be a pg Pool or Client')
    if (typeof namespace !== 'string' || namespace === '') throw new TypeError('PostgresStore: namespace must be a non-empty string')
    if (typeof createTable !== 'boolean') throw new TypeError('PostgresStore: createTable must be a boolean')
    if (!Number.isInteger(timeout) || timeout < 1) throw new TypeError('PostgresStore: timeout must be a positive integer (ms)')
    if (!Number.isInteger(sweepInterval) || sweepInterval < 0) throw new TypeError('PostgresStore: sweepInterval must be an integer >= 0 (ms; 0: never)')
    if (!Number.isInteger(sweepBatch) || sweepBatch < 1) throw new TypeError('PostgresStore: sweepBatch must be a positive integer')
    if (typeof prepare !== 'boolean') throw new TypeError('PostgresStore: prepare must be a boolean')
    this.names = tableNames(table)
    this.sql = statements(this.names)
    this.table = this.names.records
    this.pool = pool
    this.namespace = namespace
    this.timeout = timeout
    this.sweepInterval = sweepInterval
    this.sweepBatch = sweepBatch
    this.prepare = prepare
    this.createTable = createTable
    this.tableOption = table
    this.deadlines = new Deadlines(timeout)
    this.ready = !createTable
    if (sweepInterval > 0) {
      // Not before the first call has made sure the tables exist: a store nobody uses creates nothing.
      this.sweeper = setInterval(() => { if (this.ready) this.sweep().catch(noop) }, sweepInterval).unref()
    }
  }

  /**
   * For start-up: creates what is missing (createTable), or checks that the
   * tables exist, so that a missing schema fails the start rather than the
   * first request.
   */
  async verify (): Promise<void> {
    if (this.createTable) return await this.run(async () => {})
    const { rows } = await this.run(() => this.query(this.sql.exists, this.objects()))
    if (rows[0].ready !== true) {
      throw new Error(`PostgresStore: the table ${this.table}, its stats tables or its index do not exist: create them with PostgresStore.schema(${JSON.stringify(this.tableOption)}) in a migration, or set createTable: true`)
    }
  }

  async claim (key: string, fingerprint: string | undefined, lockTtl: number): Promise<ClaimResult> {
    return await this.run(async () => {
      const values = [this.namespace, key, fingerprint ?? null, lockTtl]
      while (true) {
        let rows: RecordRow[]
        try {
          rows = (await this.query(this.sql.claim, values)).rows
        } catch (err) {
          // REPEATABLE READ or SERIALIZABLE as the default isolation: the same race, reported as
          // a serialization failure instead of an empty answer. A new statement sees the row.
          if ((err as { code?: unknown }).code === SERIALIZATION_FAILURE) continue
          throw err
        }
        if (rows.length > 0) return rows[0].token !== null ? { token: rows[0].token } : { record: toRecord(rows[0]) }
      }
    }, (late) => {
      // It timed out here but PostgreSQL ran it later (a lock wait, a slow server): a claim
      // that nobody holds would answer every retry as in flight until lockTtl. Let it go;
      // if that fails too, it still expires after lockTtl.
      if (late.token !== undefined) this.release(key, late.token).catch(noop)
    })
  }

  async lookup (key: string): Promise<IdempotencyRecord | undefined> {
    const [row] = (await this.run(() => this.query(this.sql.lookup, [this.namespace, key]))).rows as RecordRow[]
    return row === undefined ? undefined : toRecord(row)
  }

  async complete (key: string, token: string, response: StoredResponse, ttl: number | null): Promise<boolean> {
    const values = completionValues(this.namespace, key, token, response, ttl)
    return (await this.run(() => this.query(this.sql.complete, values))).rowCount === 1
  }

  /**
   * `complete` through `client`, a connection inside the caller's open
   * transaction: the record is complete if, and only if, that transaction
   * commits. False when the token no longer holds the claim (taken over,
   * released, or swept): the caller must roll back. Until the transaction
   * ends the row stays locked: renew and release wait for it. In a
   * REPEATABLE READ or SERIALIZABLE transaction it fails with a
   * serialization error (40001) if the claim was renewed after the
   * transaction's snapshot was taken.
   */
  async completeWith (client: SqlClient, key: string, token: string, response: StoredResponse, ttl: number | null): Promise<boolean> {
    const values = completionValues(this.namespace, key, token, response, ttl)
    return (await this.run(() => client.query(this.sql.completeWith.text, values))).rowCount === 1
  }

  async release (key: string, token: string): Promise<boolean> {
    const { rows } = await this.run(() => this.query(this.sql.release, [this.namespace, key, token]))
    return rows[0]?.held === true
  }

  async renew (key: string, token: string, lockTtl: number): Promise<boolean> {
    return (await this.run(() => this.query(this.sql.renew, [this.namespace, key, token, lockTtl]))).rowCount === 1
  }

  /** Adds counts to this namespace's stats, in one statement. */
  async addStats (counts: StatsCounts, ttl: number): Promise<void> {
    // Three parallel arrays, one element per (route, counter): one statement for any number of routes.
    const routes: string[] = []
    const names: string[] = []
    const values: number[] = []
    const add = (route: string, name: string, value: number) => {
      routes.push(route)
      names.push(name)
      values.push(value)
    }
    for (const route in counts) {
      const counters = counts[route]
      for (const name of COUNTERS) if (counters[name] > 0) add(route, name, counters[name])
      if (counters.lastDuplicateAt > 0) add(route, 'lastDuplicateAt', counters.lastDuplicateAt)
    }
    await this.run(() => this.query(this.sql.addStats, [this.namespace, ttl, routes, names, values]))
  }

  async readStats (): Promise<StatsCounts> {
    const { rows } = await this.run(() => this.query(this.sql.readStats, [this.namespace]))
    const counts: StatsCounts = {}
    for (const { route, counter, value } of rows as Array<{ route: string, counter: string, value: number }>) {
      const counters = counts[route] ??= emptyCounters()
      if (counter in counters) counters[counter as keyof RouteCounters] = value
    }
    return counts
  }

  /** This namespace's live records and claims; `bytes` is the records table's size on disk, every namespace included. */
  async usage (): Promise<StoreUsage> {
    const { rows: [row] } = await this.run(() => this.query(this.sql.usage, [this.namespace, this.table]))
    return { records: row.records, inFlight: row.in_flight, bytes: row.bytes, estimated: false }
  }

  /**
   * Deletes expired records now, `sweepBatch` rows per statement until none
   * is left; resolves to how many were deleted. The timer calls it; a sweep
   * already running is joined, not doubled.
   */
  sweep (): Promise<number> {
    this.sweeping ??= this.sweepAll().finally(() => { this.sweeping = undefined })
    return this.sweeping
  }

  /** Stops the sweeper (after the batch it is deleting); leaves the pool to the application. */
  async close (): Promise<void> {
    this.closed = true
    clearInterval(this.sweeper)
    await this.sweeping?.catch(noop)
  }

  private async sweepAll (): Promise<number> {
    let deleted = 0
    while (!this.closed) {
      const batch = Number((await this.run(() => this.query(this.sql.sweep, [this.sweepBatch]))).rowCount)
      deleted += batch
      if (batch < this.sweepBatch) break
    }
    return deleted
  }

  /** What the existence check looks for: the three tables and the index. */
  private objects (): string[] {
    const { records, expiresIndexQualified, periods, stats } = this.names
    return [records, expiresIndexQualified, periods, stats]
  }

  /** One statement through the pool, named unless `prepare` is off. */
  private query (statement: Statement, values: unknown[]): ReturnType<SqlClient['query']> {
    if (!this.prepare) return this.pool.query(statement.text, values)
    return (this.pool as unknown as PreparingClient).query({ name: statement.name, text: statement.text, values })
  }

  /**
   * `work`, after the tables exist, within the store's timeout (a late
   * result goes to `late`): one deadline for the whole call.
   */
  private run<T> (work: () => Promise<T>, late?: (value: T) => void): Promise<T> {
    if (this.ready) return this.deadlines.bound(work(), late)
    // A call that timed out while the tables were being created never sends its statement.
    let abandoned = false
    const bounded = this.deadlines.bound(this.createTables().then(() => {
      if (abandoned) throw new StoreTimeoutError(this.timeout)
      return work()
    }), late)
    bounded.catch(() => { abandoned = true })
    return bounded
  }

  /**
   * Creates what is missing, once. Checking first leaves a running system
   * alone: `CREATE ... IF NOT EXISTS` still needs the CREATE privilege, and
   * `CREATE INDEX` locks the table against writes even when the index exists.
   * Processes that start together take turns on an advisory lock held for
   * the DDL's implicit transaction (one multi-statement query).
   */
  private createTables (): Promise<void> {
    this.creating ??= (async () => {
      const { rows } = await this.query(this.sql.exists, this.objects())
      if (rows[0].ready !== true) {
        const lock = createHash('sha256').update(this.table).digest().readInt32BE(0)
        await this.pool.query(`SET LOCAL client_min_messages = warning;\nSELECT pg_advisory_xact_lock(${LOCK_CLASS}, ${lock});\n${schemaSql(this.names)}`)
      }
      this.ready = true
    })().catch((err: unknown) => {
      this.creating = undefined
      throw err
    })
    return this.creating
  }
}
