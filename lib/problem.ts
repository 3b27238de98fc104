/**
 * The plugin's own errors as RFC 9457 problem details
 * (`errors: 'problem+json'`), the shape the IETF Idempotency-Key draft's
 * examples use: `type`, `title`, `status`, `detail`, plus the stable `code`.
 */
import type { FastifyReply } from 'fastify'

/** A tag URI (RFC 4151) per problem: stable and unique, without a web page that must stay up. */
const TYPE = 'tag:fastify-idempotency,2026:'

const PROBLEMS: Record<string, { type: string, title: string }> = {
  FST_IDEMPOTENCY_KEY_MISSING: { type: TYPE + 'key-missing', title: 'Idempotency key missing' },
  FST_IDEMPOTENCY_KEY_INVALID: { type: TYPE + 'key-invalid', title: 'Idempotency key invalid' },
  FST_IDEMPOTENCY_FINGERPRINT_MISMATCH: { type: TYPE + 'fingerprint-mismatch', title: 'Idempotency key reused with a different request' },
  FST_IDEMPOTENCY_IN_FLIGHT: { type: TYPE + 'in-flight', title: 'Request with this idempotency key in progress' },
  FST_IDEMPOTENCY_STORE_UNAVAILABLE: { type: TYPE + 'store-unavailable', title: 'Idempotency store unavailable' }
}

/** Sends `error` (one of the plugin's request errors) as `application/problem+json`. */
export function sendProblem (reply: FastifyReply, error: Error & { code: string, statusCode: number }): FastifyReply {
  const { type, title } = PROBLEMS[error.code]
  return reply
    .code(error.statusCode)
    .type('application/problem+json')
    .send(JSON.stringify({ type, title, status: error.statusCode, detail: error.message, code: error.code }))
}
