/**
 * OpenAPI: when `@fastify/swagger` is registered, each covered route's schema
 * documents the idempotency header (required or optional) and the plugin's
 * responses. Done once per route, in `onRoute`; the route's schema objects are
 * copied, never changed in place (an application may share them).
 */
import type { RouteOptions } from 'fastify'
import type { RouteSettings } from './route-config.js'

type JsonSchema = Record<string, unknown>

// Fastify also serializes the route's own replies on these statuses with these schemas:
// additionalProperties keeps whatever else the application's bodies hold.
const fastifyErrorBody: JsonSchema = {
  type: 'object',
  additionalProperties: true,
  properties: {
    statusCode: { type: 'integer' },
    code: { type: 'string' },
    error: { type: 'string' },
    message: { type: 'string' }
  }
}

const problemBody: JsonSchema = {
  type: 'object',
  additionalProperties: true,
  properties: {
    type: { type: 'string' },
    title: { type: 'string' },
    status: { type: 'integer' },
    detail: { type: 'string' },
    code: { type: 'string' }
  }
}

const retryAfter = { 'retry-after': { type: 'integer', minimum: 1, description: 'Seconds to wait before retrying' } }

export function documentRoute (route: RouteOptions, settings: RouteSettings): void {
  const plugin = settings.plugin
  const schema: JsonSchema = { ...route.schema }
  const headers = schema.headers as JsonSchema | undefined
  // Fastify validates every method of the route against this one schema: the header is
  // constrained only when the plugin handles them all (it checks the key itself first).
  const constrained = [route.method].flat().every((method) => settings.methods.has(method.toUpperCase()))
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
          ...(constrained ? { maxLength: plugin.keyRules.maxLength } : {}),
          description: 'Names the operation: retries with the same key get the saved response instead of running it again.' +
            (!settings.required
              ? ' Optional: without it, the request is not idempotent.'
              : constrained ? '' : ` Required on ${[...settings.methods].join(', ')}.`)
        }
      },
      ...(settings.required && constrained ? { required: [...required.filter((name) => name !== plugin.header), plugin.header] } : {})
    }
  }

  const body = plugin.problemJson
    ? (description: string, extra: JsonSchema = {}) => ({ description, ...extra, content: { 'application/problem+json': { schema: problemBody } } })
    : (description: string, extra: JsonSchema = {}) => ({ description, ...extra, ...fastifyErrorBody })
  const responses: Record<string, JsonSchema> = {
    400: body(`The ${plugin.header} header is ${settings.required ? 'missing or ' : ''}invalid (FST_IDEMPOTENCY_KEY_${settings.required ? 'MISSING, FST_IDEMPOTENCY_KEY_' : ''}INVALID).`),
    [plugin.inFlightStatus]: body('A request with this idempotency key is still being processed; retry after Retry-After seconds (FST_IDEMPOTENCY_IN_FLIGHT).', { headers: retryAfter })
  }
  if (settings.fingerprint !== undefined) {
    responses[422] = body('The idempotency key was already used with a different request (FST_IDEMPOTENCY_FINGERPRINT_MISMATCH).')
  }
  if (settings.onStoreError !== 'fail-open') {
    responses[503] = body('The idempotency store is unavailable; the request was not processed (FST_IDEMPOTENCY_STORE_UNAVAILABLE).', { headers: retryAfter })
  }
  // The route's own response schemas win.
  schema.response = { ...responses, ...(schema.response as JsonSchema | undefined) }
  route.schema = schema
}
