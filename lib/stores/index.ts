/**
 * Picks the stores that the options name: the plugin's own, and one per
 * (client, namespace) pair that a route asks for, each made once and shared.
 * Stores the plugin makes are checked at start-up and closed with the app;
 * a store passed in belongs to the application.
 */
import type { FastifyInstance } from 'fastify'
import { InvalidOptionError } from '../errors.js'
import type { Inherited, PluginSettings } from '../options.js'
import { warnings } from '../warnings.js'
import type { IdempotencyStore, InheritableOptions, RedisClient, SqlClient } from '../../types/index.js'
import { ReplayCache } from './cache.js'
import { MemoryStore } from './memory.js'
import { PostgresStore } from './postgres.js'
import { RedisStore } from './redis.js'

type Fail = (path: string, message: string) => Error

/** How often, at most, evictions of completed records are logged (after the first one). */
const EVICTION_LOG_INTERVAL = 60_000

export class Stores {
  /** The plugin-level store (`fastify.idempotency.store`). */
  readonly main: IdempotencyStore
  private readonly made = new Map<string, IdempotencyStore>()
  /** What the request path uses for each store: the store itself, or its replay cache. */
  private readonly views = new Map<IdempotencyStore, IdempotencyStore>()

  constructor (private readonly fastify: FastifyInstance, private readonly settings: PluginSettings) {
    this.main = this.pick(settings.store, settings.inherited, (path, message) => new InvalidOptionError(path, message))
  }

  /**
   * What a route's requests use: its store (`fail` makes the start-up error
   * when it cannot be made), behind a replay cache when the store is shared
   * (Redis, Postgres). A route whose own config names a Redis or Postgres
   * database (`redisNamespace`, `pgNamespace`) keeps its records there,
   * whatever the plugin's store.
   */
  forRoute (options: Inherited, own: InheritableOptions, fail: Fail): IdempotencyStore {
    const kind = own.redisNamespace !== undefined ? 'redis' : own.pgNamespace !== undefined ? 'postgres' : this.settings.store
    const store = this.pick(kind, options, fail)
    let view = this.views.get(store)
    if (view === undefined) {
      // A store in this process (memory) needs no copy; one of another kind may be changed by others.
      const shared = store instanceof RedisStore || store instanceof PostgresStore
      view = this.settings.replayCache > 0 && shared ? new ReplayCache(store, this.settings.replayCache) : store
      this.views.set(store, view)
    }
    return view
  }

  private pick (store: PluginSettings['store'], options: Inherited, fail: Fail): IdempotencyStore {
    if (typeof store === 'object') return this.watched(store)
    if (store === 'memory') return this.once('memory', () => this.watched(new MemoryStore()))
    if (store === 'redis') {
      return this.once(`redis\0${options.redisNamespace ?? ''}\0${options.namespace}`, () => {
        const client = redisClient(this.fastify, options.redisNamespace, fail)
        let redis: RedisStore
        try {
          redis = new RedisStore({ client, prefix: `${options.namespace}:`, timeout: this.settings.storeTimeout, ...this.settings.redis })
        } catch (err) {
          throw fail('redis', (err as Error).message.replace(/^RedisStore: /, '')) // e.g. replicas on a Cluster
        }
        redis.onWarning = (_code, message) => warnings.redisEviction(message)
        return redis
      })
    }
    return this.once(`postgres\0${options.pgNamespace ?? ''}\0${options.namespace}`, () => new PostgresStore({
      pool: pgPool(this.fastify, options.pgNamespace, fail),
      namespace: options.namespace,
      timeout: this.settings.storeTimeout,
      ...this.settings.postgres
    }))
  }

  /**
   * At start-up: Redis stores check the eviction policy (and fail start-up
   * with `redis.requireNoEviction`) and their client's queueing; Postgres
   * stores create their tables (or, with `createTable: false`, check them).
   */
  async verify (): Promise<void> {
    for (const store of this.made.values()) {
      if (store instanceof RedisStore) {
        const queue = RedisStore.queueWarning(store.client)
        if (queue !== undefined) warnings.redisQueue(queue)
        await store.verify()
      } else if (store instanceof PostgresStore) {
        await store.verify()
      }
    }
  }

  /** Closes the stores the plugin made. */
  async close (): Promise<void> {
    await Promise.all([...this.made.values()].map((store) => store.close?.()))
  }

  private once (id: string, make: () => IdempotencyStore): IdempotencyStore {
    let store = this.made.get(id)
    if (store === undefined) {
      store = make()
      this.made.set(id, store)
    }
    return store
  }

  /** A memory store logs the eviction of completed records before their ttl: a retry of one runs again. */
  private watched<T extends IdempotencyStore> (store: T): T {
    if (store instanceof MemoryStore && store.onEviction === undefined) {
      let loggedAt = -Infinity
      let since = 0
      store.onEviction = () => {
        since++
        const now = performance.now()
        if (now - loggedAt < EVICTION_LOG_INTERVAL) return
        this.fastify.log.warn({ evicted: since, maxRecords: store.maxRecords, maxBytes: store.maxBytes },
          'idempotency: the memory store evicted completed records before their ttl to stay within maxRecords/maxBytes; a retry of one of them runs the handler again. Raise the bounds, lower ttl, or use a shared store')
        loggedAt = now
        since = 0
      }
    }
    return store
  }
}

/** The client `@fastify/redis` decorated, or a start-up error saying how to get one. */
function redisClient (fastify: FastifyInstance, namespace: string | undefined, fail: Fail): RedisClient {
  const register = namespace === undefined ? '@fastify/redis' : `@fastify/redis with { namespace: '${namespace}' }`
  const path = namespace === undefined ? 'store' : 'redisNamespace'
  if (!fastify.hasDecorator('redis')) {
    throw fail(path, `the Redis store reads the client of @fastify/redis: register ${register} before fastify-idempotency`)
  }
  const decorator = (fastify as unknown as { redis: Record<string, unknown> }).redis
  const client = (namespace === undefined ? decorator : decorator[namespace]) as RedisClient | undefined
  if (typeof client?.defineCommand !== 'function') {
    throw fail(path, `fastify.redis${namespace === undefined ? '' : '.' + namespace} is not a Redis client: register ${register} before fastify-idempotency` +
      (namespace === undefined ? ' (or set redisNamespace)' : ''))
  }
  return client
}

/** The pool of `@fastify/postgres` (or of one of its named databases), or a start-up error saying how to get one. */
function pgPool (fastify: FastifyInstance, namespace: string | undefined, fail: Fail): SqlClient {
  const register = namespace === undefined ? '@fastify/postgres' : `@fastify/postgres with { name: '${namespace}' }`
  const path = namespace === undefined ? 'store' : 'pgNamespace'
  if (!fastify.hasDecorator('pg')) {
    throw fail(path, `the Postgres store uses the pool of @fastify/postgres: register ${register} before fastify-idempotency`)
  }
  const decorator = (fastify as unknown as { pg: Record<string, unknown> }).pg
  const db = (namespace === undefined ? decorator : decorator[namespace]) as { pool?: Partial<SqlClient> } | undefined
  if (typeof db?.pool?.query !== 'function') {
    throw fail(path, `fastify.pg${namespace === undefined ? '' : '.' + namespace} is not a @fastify/postgres database: register ${register} before fastify-idempotency` +
      (namespace === undefined ? ' (or set pgNamespace)' : ''))
  }
  return db.pool as SqlClient
}
