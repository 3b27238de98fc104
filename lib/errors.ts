/**
 * Every error the plugin raises, with a stable code. Request errors go through
 * Fastify's error handler, so applications can reshape them by code. They are
 * expected outcomes, not bugs, so they skip the cost of a stack trace.
 */
import createError from '@fastify/error'

/** The header is required on this route and was not sent. */
export const KeyMissingError = createError(
  'FST_IDEMPOTENCY_KEY_MISSING',
  'The %s header is required on this route',
  400,
  Error,
  false
)

/** The header was sent, but its value is not a usable key. */
export const KeyInvalidError = createError(
  'FST_IDEMPOTENCY_KEY_INVALID',
  'Invalid %s header: %s',
  400,
  Error,
  false
)

/** The key was used before with a different request (method, URL or body). */
export const FingerprintMismatchError = createError(
  'FST_IDEMPOTENCY_FINGERPRINT_MISMATCH',
  'This idempotency key was already used with a different request payload',
  422,
  Error,
  false
)

/** Another request with this key is still running. Sent with 409 or 423 and `Retry-After`. */
export const InFlightError = createError(
  'FST_IDEMPOTENCY_IN_FLIGHT',
  'A request with this idempotency key is still being processed; retry later',
  409,
  Error,
  false
)

/** The store could not be reached and the policy is fail-closed. Sent with `Retry-After`. */
export const StoreUnavailableError = createError(
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
export const StoreTimeoutError = createError(
  'FST_IDEMPOTENCY_STORE_TIMEOUT',
  'The idempotency store did not answer within %d ms'
)

/** A plugin option is invalid (thrown at registration). */
export const InvalidOptionError = createError(
  'FST_IDEMPOTENCY_INVALID_OPTION',
  'fastify-idempotency: invalid option "%s": %s'
)

/** A route's `config.idempotency` is invalid (thrown when the route is added). */
export const InvalidRouteConfigError = createError(
  'FST_IDEMPOTENCY_INVALID_ROUTE_CONFIG',
  'fastify-idempotency: invalid config.idempotency on route %s: %s: %s'
)
