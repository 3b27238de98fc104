/**
 * Every error the plugin raises, with a stable code. Request errors go through
 * Fastify's error handler, so applications can reshape them by code. They are
 * expected outcomes, not bugs, so they skip the cost of a stack trace. Each is
 * typed with its own arguments, so the published declarations need nothing
 * of `@fastify/error`'s types.
 */
import createError from '@fastify/error'
import type { IdempotencyError, IdempotencyErrorConstructor, IdempotencyRequestError } from '../types/index.js'

/** The header is required on this route and was not sent. */
export const KeyMissingError: IdempotencyErrorConstructor<IdempotencyRequestError<'FST_IDEMPOTENCY_KEY_MISSING'>, [header: string]> = createError(
  'FST_IDEMPOTENCY_KEY_MISSING',
  'The %s header is required on this route',
  400,
  Error,
  false
)

/** The header was sent, but its value is not a usable key. */
export const KeyInvalidError: IdempotencyErrorConstructor<IdempotencyRequestError<'FST_IDEMPOTENCY_KEY_INVALID'>, [header: string, reason: string]> = createError(
  'FST_IDEMPOTENCY_KEY_INVALID',
  'Invalid %s header: %s',
  400,
  Error,
  false
)

/** The key was used before with a different request (method, URL or body). */
export const FingerprintMismatchError: IdempotencyErrorConstructor<IdempotencyRequestError<'FST_IDEMPOTENCY_FINGERPRINT_MISMATCH'>, []> = createError(
  'FST_IDEMPOTENCY_FINGERPRINT_MISMATCH',
  'This idempotency key was already used with a different request payload',
  422,
  Error,
  false
)

/** Another request with this key is still running. Sent with 409 or 423 and `Retry-After`. */
export const InFlightError: IdempotencyErrorConstructor<IdempotencyRequestError<'FST_IDEMPOTENCY_IN_FLIGHT'>, []> = createError(
  'FST_IDEMPOTENCY_IN_FLIGHT',
  'A request with this idempotency key is still being processed; retry later',
  409,
  Error,
  false
)

/** The store could not be reached and the policy is fail-closed. Sent with `Retry-After`. */
export const StoreUnavailableError: IdempotencyErrorConstructor<IdempotencyRequestError<'FST_IDEMPOTENCY_STORE_UNAVAILABLE'>, []> = createError(
  'FST_IDEMPOTENCY_STORE_UNAVAILABLE',
  'The idempotency store is unavailable; the request was not processed, retry later',
  503,
  Error,
  false
)

/**
 * A store did not answer in time (the Redis store's `timeout`). ioredis queues
 * commands while it reconnects, so without this bound a dead Redis would hold
 * requests for as long as it keeps retrying. The plugin treats it as any store
 * failure (`onStoreError`).
 */
export const StoreTimeoutError: IdempotencyErrorConstructor<IdempotencyError<'FST_IDEMPOTENCY_STORE_TIMEOUT'>, [timeoutMs: number]> = createError(
  'FST_IDEMPOTENCY_STORE_TIMEOUT',
  'The idempotency store did not answer within %d ms'
)

/** A plugin option is invalid (thrown at registration). */
export const InvalidOptionError: IdempotencyErrorConstructor<IdempotencyError<'FST_IDEMPOTENCY_INVALID_OPTION'>, [option: string, reason: string]> = createError(
  'FST_IDEMPOTENCY_INVALID_OPTION',
  'fastify-idempotency: invalid option "%s": %s'
)

/** A route's `config.idempotency` is invalid (thrown when the route is added). */
export const InvalidRouteConfigError: IdempotencyErrorConstructor<IdempotencyError<'FST_IDEMPOTENCY_INVALID_ROUTE_CONFIG'>, [route: string, option: string, reason: string]> = createError(
  'FST_IDEMPOTENCY_INVALID_ROUTE_CONFIG',
  'fastify-idempotency: invalid config.idempotency on route %s: %s: %s'
)

/** `scope` returned something that is not a principal (a string or a finite number); sent as a 500. */
export const InvalidScopeError: IdempotencyErrorConstructor<IdempotencyRequestError<'FST_IDEMPOTENCY_INVALID_SCOPE'>, [returned: string]> = createError(
  'FST_IDEMPOTENCY_INVALID_SCOPE',
  'The idempotency scope of this route returned %s; it must return a string or a finite number (or undefined for none)',
  500,
  Error,
  false
)

/**
 * The store holds as many in-flight claims as it may (the memory store's
 * `maxClaims`): the request is refused with `Retry-After`, whatever
 * `onStoreError` says, so that one client flooding claims can never switch
 * idempotency off for the others.
 */
export const StoreFullError: IdempotencyErrorConstructor<IdempotencyRequestError<'FST_IDEMPOTENCY_STORE_FULL'>, []> = createError(
  'FST_IDEMPOTENCY_STORE_FULL',
  'The idempotency store holds too many requests in flight; the request was not processed, retry later',
  503,
  Error,
  false
)

/**
 * `reply.idempotency.completeWith` found that this request no longer holds
 * its claim (its lease expired and another request took the key): the
 * transaction must roll back.
 */
export const ClaimLostError: IdempotencyErrorConstructor<IdempotencyRequestError<'FST_IDEMPOTENCY_CLAIM_LOST'>, []> = createError(
  'FST_IDEMPOTENCY_CLAIM_LOST',
  'This request no longer holds its idempotency key (its lease expired and another request took it over); nothing was saved',
  409,
  Error,
  false
)

/** `reply.idempotency.completeWith` was called where it cannot work (another store, or a request that holds no claim). */
export const CompleteWithError: IdempotencyErrorConstructor<IdempotencyRequestError<'FST_IDEMPOTENCY_COMPLETE_WITH'>, [reason: string]> = createError(
  'FST_IDEMPOTENCY_COMPLETE_WITH',
  'reply.idempotency.completeWith: %s',
  500
)

/** Redis acknowledged a write on fewer replicas than the `redis.replicas` option asks for. */
export const NotReplicatedError: IdempotencyErrorConstructor<IdempotencyError<'FST_IDEMPOTENCY_NOT_REPLICATED'>, [acknowledged: number, wanted: number, timeoutMs: number]> = createError(
  'FST_IDEMPOTENCY_NOT_REPLICATED',
  'Redis acknowledged the write on %d of %d replicas within %d ms'
)

/** `redis.requireNoEviction` is set and Redis may evict keys (its `maxmemory-policy` is not `noeviction`). */
export const RedisEvictionError: IdempotencyErrorConstructor<IdempotencyError<'FST_IDEMPOTENCY_REDIS_EVICTION'>, [policy: string]> = createError(
  'FST_IDEMPOTENCY_REDIS_EVICTION',
  'Redis runs with maxmemory-policy %s: it may evict idempotency records, and a retry would then run the handler again. Set maxmemory-policy noeviction on this Redis (or unset redis.requireNoEviction)'
)

/** The plugin is registered where it is registered already (the same app, or a plugin that inherits it). */
export const RegisteredTwiceError: IdempotencyErrorConstructor<IdempotencyError<'FST_IDEMPOTENCY_REGISTERED_TWICE'>, []> = createError(
  'FST_IDEMPOTENCY_REGISTERED_TWICE',
  'fastify-idempotency is registered twice here (in the same app, or again inside a plugin that inherits it): every covered route would claim its key twice. Register it once; give routes their own options with config.idempotency, or register it in sibling plugins (app.register(async (child) => { … })) for groups of routes that need different plugin options'
)
