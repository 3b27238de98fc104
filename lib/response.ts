/**
 * Saving a reply as it passes the plugin's onSend hook (status, headers,
 * serialized body) and sending a saved one again, in the same form: later
 * onSend hooks see a replay as they saw the original.
 */
import type { FastifyReply } from 'fastify'
import type { StoredResponse } from '../types/index.js'

/**
 * Headers never saved: hop-by-hop ones, those that describe one transmission
 * (`content-length`, `date`), and the plugin's own per-response headers.
 * `set-cookie` joins them unless `replaySetCookie` is set: a cookie is meant
 * for the client that got the first response.
 */
const UNSAVED = [
  'connection', 'keep-alive', 'proxy-authenticate', 'proxy-authorization', 'proxy-connection', 'te',
  'trailer', 'transfer-encoding', 'upgrade', 'content-length', 'date',
  'x-request-start-time', 'x-request-duration-ms'
]

/** The names of the headers that are never saved, for these options. */
export function unsavedHeaders (replayHeader: string | false, replaySetCookie: boolean): ReadonlySet<string> {
  const names = new Set(UNSAVED)
  if (replayHeader !== false) names.add(replayHeader)
  if (!replaySetCookie) names.add('set-cookie')
  return names
}

/** The body of a reply that had none. */
const EMPTY = Buffer.alloc(0)

/**
 * The reply as a storable response, or null when its payload cannot be saved
 * (a stream, or a value Fastify will refuse to send).
 */
export function captureResponse (reply: FastifyReply, payload: unknown, unsaved: ReadonlySet<string>): StoredResponse | null {
  let body: string | Buffer
  if (typeof payload === 'string' || Buffer.isBuffer(payload)) body = payload
  else if (payload === undefined || payload === null) body = EMPTY
  else return null
  // getHeaders() gives a fresh object: the unsaved headers are taken out of it in place.
  const headers = reply.getHeaders() as Record<string, string | string[] | number | undefined>
  const named = connectionOptions(headers.connection)
  for (const name in headers) {
    const value = headers[name]
    if (value === undefined || unsaved.has(name) || named.includes(name)) delete headers[name]
    else if (typeof value === 'number') headers[name] = String(value)
  }
  return { statusCode: reply.statusCode, headers: headers as Record<string, string | string[]>, body }
}

const NONE: readonly string[] = []

/** The header names that a Connection header lists: hop-by-hop too (RFC 9110, 7.6.1), so never saved. */
function connectionOptions (connection: string | number | string[] | undefined): readonly string[] {
  if (connection === undefined) return NONE
  return String(connection).toLowerCase().split(',').map((name) => name.trim())
}

/** Starts sending `response` again, with `statusCode`: never through the route's serializer. */
export function replayResponse (reply: FastifyReply, response: StoredResponse, statusCode: number, replayHeader: string | false): FastifyReply {
  reply.code(statusCode)
  reply.headers(response.headers)
  if (replayHeader !== false) reply.header(replayHeader, 'true')
  return reply.send(bodyOf(response))
}

/**
 * The payload a replay hands to the onSend hooks after the plugin's: the
 * saved body in its original form. Fastify's `send` adds a content-type to a
 * string or Buffer that has none; the original had none, so it goes again.
 */
export function replayPayload (reply: FastifyReply, response: StoredResponse): string | Buffer | undefined {
  if (response.headers['content-type'] === undefined) reply.removeHeader('content-type')
  return bodyOf(response)
}

/** A saved body, or undefined for a reply that had none. */
function bodyOf (response: StoredResponse): string | Buffer | undefined {
  return response.body === EMPTY || (Buffer.isBuffer(response.body) && response.body.length === 0) ? undefined : response.body
}
