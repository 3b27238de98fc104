/**
 * `reply.idempotency.completeWith(client, body)`: the response is saved by the
 * handler's own database transaction, so that the record commits or rolls
 * back with the handler's writes (a store with `completeWith`: Postgres).
 * The body is serialized now, as Fastify will serialize the reply, so that
 * the saved bytes are the ones the client gets.
 */
import type { FastifyReply } from 'fastify'
import { ClaimLostError, CompleteWithError } from './errors.js'
import { captureResponse } from './response.js'
import type { RequestState } from './state.js'
import type { SqlClient, StoredResponse } from '../types/index.js'

export async function completeWith (state: RequestState, client: SqlClient, body: unknown): Promise<void> {
  const { route } = state
  const store = route.store
  if (store.completeWith === undefined) {
    throw new CompleteWithError('it needs store: \'postgres\' (a store that saves through the handler\'s transaction); this route\'s store cannot')
  }
  if (state.token === undefined || !state.running) throw new CompleteWithError('this request holds no idempotency claim')
  if (state.committed !== undefined) throw new CompleteWithError('it was called already for this request')
  const response = serialize(state.reply, body, route.plugin.unsavedHeaders)
  if (!await store.completeWith(client, state.storeKey, state.token, response, route.ttl)) throw new ClaimLostError()
  state.committed = response
  // The record is now locked by the handler's transaction until it ends: no one can take it over.
  route.plugin.leases.drop(state)
}

/** `body` as Fastify's `reply.send` will serialize it, with the content-type it will set. */
function serialize (reply: FastifyReply, body: unknown, unsaved: ReadonlySet<string>): StoredResponse {
  const type = reply.getHeader('content-type')
  let payload: string | Buffer
  if (typeof body === 'string') {
    if (type === undefined) reply.type('text/plain; charset=utf-8')
    payload = body
  } else if (Buffer.isBuffer(body) || ArrayBuffer.isView(body)) {
    if (type === undefined) reply.type('application/octet-stream')
    payload = Buffer.isBuffer(body) ? body : Buffer.from(body.buffer, body.byteOffset, body.byteLength)
  } else if (type === undefined || String(type).includes('json')) {
    if (type === undefined) reply.type('application/json; charset=utf-8')
    payload = reply.serialize(body) as string
  } else {
    throw new CompleteWithError(`cannot serialize a body for content-type ${String(type)}; pass a string or a Buffer`)
  }
  return captureResponse(reply, payload, unsaved) as StoredResponse
}
