/**
 * Picks the stores that the options name: the plugin's own, and one per Redis
 * namespace that a route asks for, each made once and shared.
 */
import type { FastifyInstance } from 'fastify'
import type { Cluster, Redis } from 'ioredis'
import { InvalidOptionError } from '../errors.js'
import type { IdempotencyStore } from '../../types/index.js'
import { MemoryStore } from './memory.js'
import { RedisStore } from './redis.js'

export interface StoreSettings {
  store: 'memory' | 'redis' | IdempotencyStore
  redisNamespace: string | undefined
  storeTimeout: number
}

export class Stores {
  /** The plugin-level store. */
  readonly main: IdempotencyStore
  private readonly redisStores = new Map<string | undefined, RedisStore>()

  constructor (private readonly fastify: FastifyInstance, private readonly settings: StoreSettings) {
    const { store } = settings
    this.main = store === 'memory'
      ? new MemoryStore()
      : store === 'redis'
        ? this.redis(settings.redisNamespace, (message) => new InvalidOptionError('store', message))
        : store
  }

  /**
   * The store of a route: the plugin's, or the Redis store of the route's
   * namespace (`fail` makes the start-up error when there is no such client).
   */
  forRoute (redisNamespace: string | undefined, fail: (message: string) => Error): IdempotencyStore {
    return redisNamespace === undefined ? this.main : this.redis(redisNamespace, fail)
  }

  /** Closes the stores the plugin made (a store passed in belongs to the application). */
  close (): void {
    if (this.settings.store === 'memory') (this.main as MemoryStore).close()
  }

  private redis (namespace: string | undefined, fail: (message: string) => Error): RedisStore {
    let store = this.redisStores.get(namespace)
    if (store === undefined) {
      store = new RedisStore({ client: redisClient(this.fastify, namespace, fail), timeout: this.settings.storeTimeout })
      this.redisStores.set(namespace, store)
    }
    return store
  }
}

/** The client `@fastify/redis` decorated, or a start-up error saying how to get one. */
function redisClient (fastify: FastifyInstance, namespace: string | undefined, fail: (message: string) => Error): Redis | Cluster {
  const register = namespace === undefined ? '@fastify/redis' : `@fastify/redis with { namespace: '${namespace}' }`
  if (!fastify.hasDecorator('redis')) {
    throw fail(`the Redis store reads the client of @fastify/redis: register ${register} before fastify-idempotency`)
  }
  const decorator = (fastify as unknown as { redis: Record<string, unknown> }).redis
  const client = (namespace === undefined ? decorator : decorator[namespace]) as Redis | Cluster | undefined
  if (typeof client?.defineCommand !== 'function') {
    throw fail(`fastify.redis${namespace === undefined ? '' : '.' + namespace} is not a Redis client: register ${register} before fastify-idempotency` +
      (namespace === undefined ? ' (or set redisNamespace)' : ''))
  }
  return client
}
