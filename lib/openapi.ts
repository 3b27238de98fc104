/**
 * OpenAPI: when `@fastify/swagger` is registered, each covered route's schema
 * documents the idempotency header — how long a key is kept and the key rules
 * in force, as the Idempotency-Key draft asks a server to publish — the
 * `idempotent-replayed` header on its 2xx responses, and the plugin's error
 * responses, whose body schema is defined once and referenced. Documentation
 * never changes what is accepted: the header's schema holds no validating
 * keyword (the plugin checks the key itself, before Fastify's validation).
 * Done once per route, in `onRoute`; the route's schema objects are copied,
 * never changed in place (an application may share them).
 */
import { format } from '@lukeed/ms'
import type { FastifyInstance, RouteOptions } from 'fastify'
import type { RouteSettings } from './route-config.js'

type JsonSchema = Record<string, unknown>

/** The ids of the shared error body schemas (components in the generated spec). */
export const ERROR_SCHEMA = 'fastify-idempotency-error'
export const PROBLEM_SCHEMA = 'fastify-idempotency-problem'

// Fastify also serializes the route's own replies on these statuses with these schemas:
// additionalProperties keeps whatever else the application's bodies hold.
const schemas: JsonSchema[] = [{
  $id: ERROR_SCHEMA,
  title: 'IdempotencyError',
  type: 'object',
  additionalProperties: true,
  properties: {
    statusCode: { type: 'integer' },
    code: { type: 'string' },
    error: { type: 'string' },
    message: { type: 'string' }
  }
}, {
  $id: PROBLEM_SCHEMA,
  title: 'IdempotencyProblem',
  type: 'object',
  additionalProperties: true,
  properties: {
    type: { type: 'string' },
    title: { type: 'string' },
    status: { type: 'integer' },
    detail: { type: 'string' },
    code: { type: 'string' }
  }
}]

/** Adds the shared error body schemas once (at registration, when `@fastify/swagger` is there). */
export function addErrorSchemas (fastify: FastifyInstance): void {
  for (const schema of schemas) if (fastify.getSchema(schema.$id as string) === undefined) fastify.addSchema(schema)
}

const retryAfter = { 'retry-after': { type: 'integer', minimum: 1, description: 'Seconds to wait before retrying' } }

/** What the header's description says about keys: how long they are kept, and the rules they must follow. */
function keyPolicy (settings: RouteSettings): string {
  const { keyRules } = settings.plugin
  const kept = settings.ttl === null
    ? 'A saved response never expires.'
    : `A saved response is replayed for ${format(settings.ttl, true)} (ttl ${settings.ttl} ms) after the first request completes; after that the key is new again.`
  const rules = [`at most ${keyRules.maxLength} characters`]
  if (keyRules.uuid) rules.push('a UUID')
  if (keyRules.pattern !== undefined) rules.push(`matching ${String(keyRules.pattern)}`)
  return `${kept} The key: ${rules.join(', ')}; a bare token of visible ASCII, or a quoted string ("…", RFC 8941).`
}

export function documentRoute (route: RouteOptions, settings: RouteSettings): void {
  const plugin = settings.plugin
  const schema: JsonSchema = { ...route.schema }
  const headers = schema.headers as JsonSchema | undefined
  // Fastify validates every method of the route against this one schema: the header is
  // marked required only when the plugin handles them all.
  const allMethods = [route.method].flat().every((method) => settings.methods.has(method.toUpperCase()))
  // A headers schema given as a $ref or a non-object schema is left as it is.
  if (headers === undefined || (headers.$ref === undefined && (headers.type === 'object' || headers.properties !== undefined))) {
    const required = (headers?.required as string[] | undefined) ?? []
    schema.headers = {
      type: 'object',
      ...headers,
      properties: {
        ...(headers?.properties as JsonSchema | undefined),
        [plugin.header]: {
          type: 'string',
          description: 'Names the operation: retries with the same key get the saved response instead of running it again. ' + keyPolicy(settings) +
            (!settings.required
              ? ' Optional: without it, the request is not idempotent.'
              : allMethods ? '' : ` Required on ${[...settings.methods].join(', ')}.`)
        }
      },
      ...(settings.required && allMethods ? { required: [...required.filter((name) => name !== plugin.header), plugin.header] } : {})
    }
  }

  const responses: Record<string, JsonSchema> = {}
  const error = (status: number, description: string, extra: JsonSchema = {}) => {
    responses[status] = plugin.problemJson
      ? { description, ...extra, content: { 'application/problem+json': { schema: { $ref: `${PROBLEM_SCHEMA}#` } } } }
      : { description, ...extra, $ref: `${ERROR_SCHEMA}#` }
  }
  error(400, `The ${plugin.header} header is ${settings.required ? 'missing or ' : ''}invalid (FST_IDEMPOTENCY_KEY_${settings.required ? 'MISSING, FST_IDEMPOTENCY_KEY_' : ''}INVALID).`)
  error(plugin.inFlightStatus, 'A request with this idempotency key is still being processed; retry after Retry-After seconds (FST_IDEMPOTENCY_IN_FLIGHT).', { headers: retryAfter })
  if (settings.fingerprint !== undefined) {
    error(422, 'The idempotency key was already used with a different request (FST_IDEMPOTENCY_FINGERPRINT_MISMATCH).')
  }
  if (settings.onStoreError !== 'fail-open') {
    error(503, 'The idempotency store is unavailable; the request was not processed (FST_IDEMPOTENCY_STORE_UNAVAILABLE).', { headers: retryAfter })
  }
  // The route's own response schemas win; its 2xx ones also document the replay header.
  const own = { ...(schema.response as Record<string, JsonSchema> | undefined) }
  if (plugin.replayHeader !== false) {
    for (const status in own) {
      if (!/^2/.test(status)) continue
      own[status] = {
        ...own[status],
        headers: {
          ...(own[status].headers as JsonSchema | undefined),
          [plugin.replayHeader]: { type: 'string', enum: ['true'], description: 'Present, with the value true, when this response is the saved response of an earlier request with the same key (a replay).' }
        }
      }
    }
  }
  schema.response = { ...responses, ...own }
  route.schema = schema
}
