/**
 * The public type surface of fastify-idempotency: plugin options, route
 * config, `reply.idempotency`, the store interface, and the augmentation of
 * Fastify's own types.
 */
import type { FastifyRequest, preHandlerHookHandler } from 'fastify'

/** What a route does with the idempotency header when its own config says nothing. */
export type IdempotencyMode = 'optional' | 'required' | 'exempt'

/** What a request gets when the store cannot be reached. */
export type StoreErrorPolicy = 'fail-closed' | 'fail-open'

/** A value a store may return directly or through a promise. */
export type MaybePromise<T> = T | Promise<T>

/** A duration: a number of milliseconds, or a string such as `'24h'`, `'90s'` or `'500ms'`. */
export type Duration = number | string

/**
 * What the Postgres store needs of a `pg` client or pool (a `Pool`, a
 * `PoolClient` or a `Client` from `pg` all fit): one parameterized query.
 */
export interface SqlClient {
  query (text: string, values?: unknown[]): Promise<{ rows: any[], rowCount: number | null }>
}

/**
 * What the Redis store takes: an ioredis `Redis` or `Cluster` (ioredis 5 or
 * 6; `@fastify/redis` decorates one). Described by what tells them apart, so
 * that these declarations need no ioredis types.
 */
export interface RedisClient {
  readonly isCluster: boolean
  readonly status: string
  defineCommand (name: string, definition: { lua: string, numberOfKeys?: number, readOnly?: boolean }): void
  duplicate (...args: any[]): RedisClient
  on (event: string | symbol, listener: (...args: any[]) => void): unknown
}

/** A response as saved by the first request and sent again on replays. */
export interface StoredResponse {
  statusCode: number
  /** Lower-case header names; hop-by-hop headers, `content-length`, `date` and `set-cookie` are never saved. */
  headers: Record<string, string | string[]>
  /**
   * The serialized body as the first reply carried it: a string (sent as
   * UTF-8) or bytes. Replays carry it in the same form. Empty when there was
   * none.
   */
  body: string | Buffer
}

/** A claim that another request holds: its handler is still running. */
export interface InFlightRecord {
  state: 'in-flight'
  fingerprint: string | undefined
}

/** A completed request whose response is replayed. */
export interface CompletedRecord {
  state: 'completed'
  fingerprint: string | undefined
  response: StoredResponse
  /**
   * How long the record still lives in the store, in ms (`Infinity`: it
   * never expires), when the store can tell. The plugin's replay cache keeps
   * a copy at most that long; without it, nothing is cached.
   */
  expiresIn?: number
}

export type IdempotencyRecord = InFlightRecord | CompletedRecord

/**
 * The answer of {@link IdempotencyStore.claim}: either the key was free and is
 * now claimed with `token`, or it was not and `record` says what holds it.
 */
export type ClaimResult =
  | { token: string, record?: undefined }
  | { token?: undefined, record: IdempotencyRecord }

/**
 * A place to keep claims and responses. Every method is atomic for one key.
 * `MemoryStore`, `RedisStore` and `PostgresStore` implement it; any object
 * with the four required methods can be passed as the `store` option.
 *
 * Tokens are decimal integers, as strings: successive claims of one key get
 * strictly larger ones, so that a handler can fence its own writes with
 * `reply.idempotency.token`.
 */
export interface IdempotencyStore {
  /**
   * Claims `key` for `lockTtl` ms if no live record holds it, saving
   * `fingerprint` with the claim, and returns a fencing token; otherwise
   * returns the existing record. One atomic step.
   */
  claim (key: string, fingerprint: string | undefined, lockTtl: number): MaybePromise<ClaimResult>
  /**
   * Saves `response` for `ttl` ms (`null`: no expiry) if `token` still holds
   * the claim. Returns false, and saves nothing, when it does not.
   */
  complete (key: string, token: string, response: StoredResponse, ttl: number | null): MaybePromise<boolean>
  /** Deletes the claim if `token` still holds it; a later request may then claim the key. */
  release (key: string, token: string): MaybePromise<boolean>
  /** Extends the claim to `lockTtl` ms from now if `token` still holds it. */
  renew (key: string, token: string, lockTtl: number): MaybePromise<boolean>
  /**
   * Reads the record of `key` without writing anything. The plugin asks it
   * when a claim failed or timed out (a Redis write pause, a full Redis), so
   * that completed records are still replayed and in-flight ones still
   * answered as such.
   */
  lookup? (key: string): MaybePromise<IdempotencyRecord | undefined>
  /**
   * Saves `response` through `client`, a database connection inside the
   * caller's open transaction, if `token` still holds the claim; the record
   * is complete when, and only if, that transaction commits. Returns false
   * when the claim is no longer held. (`reply.idempotency.completeWith`.)
   */
  completeWith? (client: SqlClient, key: string, token: string, response: StoredResponse, ttl: number | null): Promise<boolean>
  /** Called on `onClose` for stores the plugin created itself. */
  close? (): MaybePromise<void>
  /**
   * Adds counts to the stats that every process shares, kept `ttl` ms after
   * the last change. Stores without it, or without `readStats` (the memory
   * store), leave the plugin to keep stats in-process.
   */
  addStats? (counts: StatsCounts, ttl: number): MaybePromise<void>
  /** The shared stats, as `addStats` summed them. */
  readStats? (): MaybePromise<StatsCounts>
  /** How much the store holds. */
  usage? (): MaybePromise<StoreUsage>
}

/** The counters of one route. */
export interface RouteCounters {
  /** Requests that claimed their key and ran the handler. */
  executed: number
  /** Duplicates of completed requests: replayed (or, on manual routes, handed to the handler). */
  replayed: number
  /** Duplicates of requests still in flight (409/423). */
  conflicts: number
  /** Keys reused with a different request (422). */
  mismatches: number
  /** Required keys that were not sent (400). */
  missingKeys: number
  /** Keys that were malformed (400). */
  invalidKeys: number
  /** Requests whose claim failed in the store. */
  storeErrors: number
  /** When the last duplicate (replay, conflict or mismatch) arrived, in ms since the epoch; 0 if none. */
  lastDuplicateAt: number
}

/** Counters per route name (`'POST /orders'`). */
export type StatsCounts = Record<string, RouteCounters>

/** What a store holds. */
export interface StoreUsage {
  /** Completed records (saved responses). */
  records: number
  /** In-flight claims, when the store can tell them apart from completed records. */
  inFlight?: number
  /** Memory that the records use, in bytes, when the store can tell. */
  bytes: number | undefined
  /** The most memory the store may use, in bytes (memory store: `maxBytes`; Redis: `maxmemory`), when known and bounded. */
  maxBytes?: number
  /** Completed records dropped before their `ttl` to make room (a retry of one of them runs the handler again). */
  evictions?: number
  /** What the store does when it is full (Redis: `maxmemory-policy`). */
  evictionPolicy?: string
  /** The figures are estimated from a sample (a big Redis keyspace is never listed whole). */
  estimated: boolean
  /** Conditions an operator should know about (an evicting Redis, memory nearly full). */
  warnings?: string[]
}

/** `await fastify.idempotency.stats()` */
export interface IdempotencyStats {
  /** Routes, most duplicates first. */
  routes: Array<RouteCounters & {
    route: string
    /** `replayed + conflicts + mismatches` */
    duplicates: number
  }>
  /** Every route's counters summed (`lastDuplicateAt`: the latest). */
  totals: RouteCounters & { duplicates: number }
  store: StoreUsage
  /** Set when the store holds more than `stats.warnRecords` records, or reports a warning of its own. */
  warning: string | undefined
}

/** Called when something happens to a key (the client's key, never the stored body). */
export type IdempotencyEvent = (request: FastifyRequest, key: string) => void

/**
 * Called when the store fails. It may return the policy for this request;
 * when it returns nothing, the request is refused (`'fail-closed'`).
 */
export type StoreErrorEvent = (request: FastifyRequest, key: string, error: unknown) => StoreErrorPolicy | undefined | void

/** The `stats` option. */
export interface StatsOptions {
  /** How long counters are kept after their last change. Default `'7d'`. */
  ttl?: Duration
  /** How often counters are sent to a shared store, or moved into the in-process totals. Default `'1s'`. */
  flushInterval?: Duration
  /** Serve the stats page at this path (GET). Off by default. */
  route?: string
  /** Required with `route`: the application's authentication for the stats page. */
  preHandler?: preHandlerHookHandler | preHandlerHookHandler[]
  /** The page warns when the store holds more records than this. Default 8000 (80% of the memory store's default bound). */
  warnRecords?: number
}

/** The parts a store key is built from; see the `keyEncoder` option. */
export interface KeyParts {
  /** What `scope` returned for the request, if anything. */
  scope: string | undefined
  method: string
  /** The request path without its query string (the query string is part of the fingerprint). */
  path: string
  /** The client's key, as validated. */
  key: string
}

/**
 * The principal a request acts for (a user or tenant id), or `undefined`
 * (`null` too) for none. May be async. Anything but a string or a finite
 * number is refused with a 500 (`FST_IDEMPOTENCY_INVALID_SCOPE`).
 */
export type ScopeFunction = (request: FastifyRequest) => string | number | null | undefined | PromiseLike<string | number | null | undefined>
export type FingerprintFunction = (request: FastifyRequest) => string
export type KeyEncoder = (parts: KeyParts) => string

/** How the client's key is validated. */
export interface KeyValidationOptions {
  /** Longest key accepted, in characters. Default 255. */
  maxLength?: number
  /** The key must match this pattern. */
  pattern?: RegExp
  /** The key must be a UUID (any version). Default false. */
  uuid?: boolean
}

/** What a duplicate gets while the original request is still running. */
export interface InFlightOptions {
  /** How long a duplicate waits for the original to finish. Default 0 (answer at once). */
  wait?: Duration
  /** The status sent when the original is still running: 409 (default) or 423. */
  statusCode?: 409 | 423
}

/** Options of the Redis store, for `store: 'redis'` (and `new RedisStore`). */
export interface RedisOptions {
  /**
   * Refuse to start (and to go on after a reconnect) unless Redis reports
   * `maxmemory-policy` `noeviction`. Default false: a coded warning only.
   */
  requireNoEviction?: boolean
  /**
   * Wait until this many replicas have acknowledged each claim and each saved
   * response (`WAIT`), so that a promoted replica knows them. Default 0 (off).
   */
  replicas?: number
  /** How long a claim or save waits for the replicas. Default `'100ms'`. */
  replicaTimeout?: Duration
}

/** Options of the Postgres store, for `store: 'postgres'` (and `new PostgresStore`). */
export interface PostgresOptions {
  /** The records table, `name` or `schema.name`. Default `'idempotency_records'`. */
  table?: string
  /** Create the tables when missing, at start-up. Default true; with false, run `PostgresStore.schema()` in a migration. */
  createTable?: boolean
}

/**
 * Options that a route's `config.idempotency` can override; a route that
 * does not set one inherits the plugin's.
 */
export interface InheritableOptions {
  /** How long a completed response is replayed; `null` never expires. Default `'24h'`. */
  ttl?: Duration | null
  /** Only responses with these status codes are saved. Default 200–207. */
  storeOnStatuses?: number[]
  /** The status sent on replays; `null` sends the original status. Default `null`. */
  replayStatusCode?: number | null
  /** Payload fingerprinting: `true` (default), `false`, or a function that returns the fingerprint. */
  fingerprint?: boolean | FingerprintFunction
  /** Isolates keys per principal, e.g. `(request) => request.user?.id`. */
  scope?: ScopeFunction
  /**
   * What happens when the store fails: `'fail-closed'` (default: 503, the
   * handler does not run), `'fail-open'` (the handler runs without
   * idempotency), or a function called with the error, whose return value
   * picks the policy (nothing: fail-closed).
   */
  onStoreError?: StoreErrorPolicy | StoreErrorEvent
  /** Called when a duplicate is answered with a saved response. */
  onReplay?: IdempotencyEvent
  /** Called when a duplicate arrives while the original is still in flight (409/423). */
  onConflict?: IdempotencyEvent
  /** Called when a key is reused with a different request (422). */
  onMismatch?: IdempotencyEvent
  /**
   * With `store: 'redis'` or `'postgres'`: the namespace of the records, so
   * that services sharing one Redis or one table never share records (and
   * keep their stats apart). Default `'idempotency'`.
   */
  namespace?: string
  /** With `store: 'redis'`: use `fastify.redis[redisNamespace]` (a `@fastify/redis` namespace). */
  redisNamespace?: string
  /** With `store: 'postgres'`: use `fastify.pg[pgNamespace]` (a `@fastify/postgres` named database). */
  pgNamespace?: string
}

/** Options of `app.register(fastifyIdempotency, options)`. All are optional. */
export interface FastifyIdempotencyOptions extends InheritableOptions {
  /** The request header that carries the key (case-insensitive). Default `'idempotency-key'`. */
  header?: string
  /** The only methods ever handled. Default `['POST', 'PUT', 'PATCH', 'DELETE']`. */
  methods?: string[]
  /** The behaviour of routes whose config says nothing. Default `'optional'`. */
  mode?: IdempotencyMode
  /**
   * Limits `mode` to routes matching one of these patterns:
   * `'POST /api/payments/'`, `'/api/orders/'` or `'* /api/critical/'`.
   * Default: every route.
   */
  endpoints?: string[]
  /** How long an in-flight claim lives if its process dies. Default `'60s'`; at least 1 s and 3 × `storeTimeout`. */
  lockTtl?: Duration
  inFlight?: InFlightOptions
  /** Header added (value `true`) to replayed responses; `false` adds none. Default `'idempotent-replayed'`. */
  replayHeader?: string | false
  key?: KeyValidationOptions
  /** Builds the store key. Default: a SHA-256 of the parts, with a fixed prefix. */
  keyEncoder?: KeyEncoder
  /** Adds `x-request-start-time` and `x-request-duration-ms` to covered responses. Default false. */
  telemetry?: boolean
  /**
   * Save `set-cookie` with responses and send it again on replays. Default
   * false: a cookie is meant for the client that got the first response.
   */
  replaySetCookie?: boolean
  /**
   * `'memory'` (default); `'redis'`: a `RedisStore` on the client that
   * `@fastify/redis` decorates (register it first); `'postgres'`: a
   * `PostgresStore` on the pool that `@fastify/postgres` decorates; or any
   * {@link IdempotencyStore}.
   */
  store?: 'memory' | 'redis' | 'postgres' | IdempotencyStore
  /** With `store: 'redis'`: the Redis store's options. */
  redis?: RedisOptions
  /** With `store: 'postgres'`: the Postgres store's options. */
  postgres?: PostgresOptions
  /** How long one store operation may take before it counts as a failure. Default `'2s'`. */
  storeTimeout?: Duration
  /**
   * Bytes of completed responses a process keeps, once a replay has fetched
   * them from a shared store (Redis, Postgres), to replay them again without
   * asking it. Default 16 MiB; 0 turns it off.
   */
  replayCache?: number
  /** The body of the plugin's own errors: Fastify's shape (default) or RFC 9457 `application/problem+json`. */
  errors?: 'fastify' | 'problem+json'
  /** Counters per route and outcome, and the optional stats page; `false` turns counting off. */
  stats?: StatsOptions | false
}

/** Per-route options, in `config.idempotency`. Given fields override the plugin options. */
export interface IdempotencyRouteOptions extends InheritableOptions {
  /** A missing key is rejected with 400. Default: true when the plugin `mode` is `'required'`. */
  required?: boolean
  /** The handler runs for duplicates of completed requests and reads `reply.idempotency`. Default false. */
  manual?: boolean
}

/** `reply.idempotency`: what the plugin knows about the current request. */
export interface IdempotencyReplyState {
  /** The client's key, when it sent a valid one. */
  readonly key: string | undefined
  /** A completed request with this key was found (manual routes run their handler for it). */
  readonly exists: boolean
  /** This reply is a replay of a saved response. */
  readonly replayed: boolean
  /** The saved response, when `exists`. */
  readonly response: StoredResponse | undefined
  /**
   * The fencing token of this request's claim, while the handler runs (a
   * decimal integer as a string; successive claims of one key get strictly
   * larger ones). Fence your own writes with it:
   * `UPDATE … SET …, last_token = $token WHERE id = $id AND last_token < $token`.
   */
  readonly token: string | undefined
  /**
   * Aborted when this request can no longer be sure it holds its claim (its
   * lease was not renewed in time, or was lost), so that a duplicate may
   * start: pass it to `fetch` and database calls to stop early. Never aborted
   * without a claim.
   */
  readonly signal: AbortSignal
  /**
   * With `store: 'postgres'`: saves the response for `body` through `client`,
   * inside the handler's own transaction, so that the record commits (or
   * rolls back) with the handler's writes. `body` is serialized as Fastify
   * will serialize the reply; reply with the same `body` afterwards. Throws
   * `FST_IDEMPOTENCY_CLAIM_LOST` (409) when another request holds the key
   * now: let it roll the transaction back.
   */
  completeWith (client: SqlClient, body: unknown): Promise<void>
}

/** An error the plugin raises; `code` is stable. */
export interface IdempotencyError<Code extends string = string> extends Error {
  code: Code
  statusCode?: number
}

/** An error a request is answered with: it carries its HTTP status. */
export interface IdempotencyRequestError<Code extends string = string> extends IdempotencyError<Code> {
  statusCode: number
}

/** One of the plugin's error classes (`errors.KeyMissingError` …), with the arguments its message takes. */
export interface IdempotencyErrorConstructor<E extends IdempotencyError = IdempotencyError, Args extends unknown[] = unknown[]> {
  new (...args: Args): E
  (...args: Args): E
  readonly prototype: E
}

/** `fastify.idempotency` */
export interface IdempotencyDecorator {
  /** The store the plugin uses. */
  readonly store: IdempotencyStore
  /** Counters per route and outcome (summed across processes on a shared store), and the store's size. */
  stats (): Promise<IdempotencyStats>
}

declare module 'fastify' {
  interface FastifyContextConfig {
    /** `false`: exempt; `true`: required; an object enables the route and overrides plugin options. */
    idempotency?: boolean | IdempotencyRouteOptions
  }
  interface FastifyReply {
    readonly idempotency: IdempotencyReplyState
  }
  interface FastifyInstance {
    readonly idempotency: IdempotencyDecorator
  }
}
