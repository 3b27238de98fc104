/**
 * Request fingerprints: a key reused with a different request is an error
 * (422), so each claim saves a hash of what the request asked for.
 */
import { createHash, hash } from 'node:crypto'
import type { FastifyRequest } from 'fastify'

/**
 * The default fingerprint: SHA-256 of the method, the URL with its query
 * string and the body. A parsed JSON body is hashed in canonical form (object
 * keys sorted), so a client that serializes the same JSON again still matches.
 */
export function defaultFingerprint (request: FastifyRequest): string {
  const head = request.method + ' ' + request.url + '\n'
  const body = request.body
  if (body === undefined || body === null) return hash('sha256', head, 'base64url')
  if (typeof body === 'string') return hash('sha256', head + 's' + body, 'base64url')
  if (Buffer.isBuffer(body)) return createHash('sha256').update(head + 'b').update(body).digest('base64url')
  return hash('sha256', head + 'j' + canonicalJson(body), 'base64url')
}

/** Quoted object keys: the bodies of one API repeat the same few keys. Bounded. */
const quotedKeys = new Map<string, string>()

function quoteKey (key: string): string {
  let quoted = quotedKeys.get(key)
  if (quoted === undefined) {
    quoted = JSON.stringify(key)
    if (quotedKeys.size < 1024) quotedKeys.set(key, quoted)
  }
  return quoted
}

/** JSON with object keys sorted at every depth; otherwise what `JSON.stringify` writes. */
export function canonicalJson (value: unknown): string {
  switch (typeof value) {
    case 'string': return JSON.stringify(value)
    case 'number': return Number.isFinite(value) ? '' + value : 'null'
    case 'boolean': return value ? 'true' : 'false'
    case 'object': if (value === null) return 'null'; break
    default: return JSON.stringify(value) ?? 'null'
  }
  if (typeof (value as { toJSON?: unknown }).toJSON === 'function') {
    return canonicalJson((value as { toJSON: () => unknown }).toJSON())
  }
  if (Array.isArray(value)) {
    let out = '['
    for (let i = 0; i < value.length; i++) out += (i === 0 ? '' : ',') + canonicalJson(value[i])
    return out + ']'
  }
  const object = value as Record<string, unknown>
  const keys = Object.keys(object)
  // Clients mostly send keys in one order: sort only when they are not in order already.
  for (let i = 1; i < keys.length; i++) {
    if (keys[i - 1] > keys[i]) {
      keys.sort()
      break
    }
  }
  let out = '{'
  for (let i = 0; i < keys.length; i++) {
    const item = object[keys[i]]
    if (item === undefined || typeof item === 'function' || typeof item === 'symbol') continue
    out += (out.length === 1 ? '' : ',') + quoteKey(keys[i]) + ':' + canonicalJson(item)
  }
  return out + '}'
}
