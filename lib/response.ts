/**
 * Saving a reply as it leaves (status, headers, serialized bytes) and sending
 * a saved one again.
 */
import type { FastifyReply } from 'fastify'
import type { RouteSettings } from './route-config.js'
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
const EMPTY = Buffer.alloc(0)

/** The reply as a storable response, or undefined when its payload cannot be saved (a stream). */
export function captureResponse (reply: FastifyReply, payload: unknown, unsaved: ReadonlySet<string>): StoredResponse | undefined {
  let body: Buffer
  if (typeof payload === 'string') body = Buffer.from(payload)
  else if (Buffer.isBuffer(payload)) body = payload
  else if (payload === undefined || payload === null) body = EMPTY
  else return undefined
  const headers: Record<string, string | string[]> = {}
  const sent = reply.getHeaders()
  const named = connectionOptions(sent.connection)
  for (const name in sent) {
    const value = sent[name]
    if (value === undefined || unsaved.has(name) || named.includes(name)) continue
    headers[name] = typeof value === 'number' ? String(value) : value
  }
  return { statusCode: reply.statusCode, headers, body }
}

const NONE: readonly string[] = []

/** The header names that a Connection header lists: hop-by-hop too (RFC 9110, 7.6.1), so never saved. */
function connectionOptions (connection: string | number | string[] | undefined): readonly string[] {
  if (connection === undefined) return NONE
  return String(connection).toLowerCase().split(',').map((name) => name.trim())
}

/** Sends `response` again, as stored bytes: never through the route's serializer. */
export function replayResponse (reply: FastifyReply, response: StoredResponse, route: RouteSettings, replayHeader: string | false): FastifyReply {
  reply.code(route.conflictStatusCode ?? response.statusCode)
  reply.headers(response.headers)
  if (replayHeader !== false) reply.header(replayHeader, 'true')
  return reply.send(response.body.length === 0 && response.headers['content-type'] === undefined ? undefined : response.body)
}
