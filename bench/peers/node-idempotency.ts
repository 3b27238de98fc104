/**
 * @node-idempotency/core in Fastify hooks, as its README describes the flow
 * (and as the project's own, unpublished, Fastify wrapper does it): call
 * `onRequest` before the business logic, send the cached response back if
 * there is one, and call `onResponse` when the logic completed for the first
 * time. A `preHandler` (the body is parsed) and an `onSend` hook (the
 * serialized payload) do that here.
 *
 * One thing differs from that wrapper, in the peer's favour: `onResponse` is
 * called only for the request that ran the handler, not again for replays
 * and error replies (which would overwrite the stored response).
 */
import { Idempotency, IdempotencyError, IdempotencyErrorCodes, type IdempotencyParams, type IdempotencyResponse } from '@node-idempotency/core'
import { MemoryStorageAdapter } from '@node-idempotency/storage-adapter-memory'
import { RedisStorageAdapter } from '@node-idempotency/storage-adapter-redis'
import type { FastifyInstance, FastifyRequest } from 'fastify'
import { KEY_HEADER } from '../shared.js'

const STATUS: Record<string, number> = {
  [IdempotencyErrorCodes.REQUEST_IN_PROGRESS]: 409,
  [IdempotencyErrorCodes.IDEMPOTENCY_FINGERPRINT_MISSMATCH]: 422,
  [IdempotencyErrorCodes.IDEMPOTENCY_KEY_MISSING]: 400,
  [IdempotencyErrorCodes.IDEMPOTENCY_KEY_LEN_EXEEDED]: 400
}

const kRan = Symbol('node-idempotency.ran')
type Marked = FastifyRequest & { [kRan]?: boolean }

function params (request: FastifyRequest): IdempotencyParams {
  return {
    headers: request.headers,
    body: request.body as Record<string, unknown>,
    path: request.url,
    method: request.method
  }
}

export async function nodeIdempotencyHooks (
  app: FastifyInstance,
  redisUrl: string | undefined,
  closers: Array<() => unknown>,
  setSize: (size: () => number) => void
): Promise<void> {
  let storage: MemoryStorageAdapter | RedisStorageAdapter
  if (redisUrl === undefined) {
    const memory = new MemoryStorageAdapter()
    storage = memory
    setSize(() => (memory as unknown as { cache: Map<string, unknown> }).cache.size)
  } else {
    const redis = new RedisStorageAdapter({ url: redisUrl })
    await redis.connect()
    closers.push(() => redis.disconnect())
    storage = redis
  }
  const idempotency = new Idempotency(storage)

  app.addHook('preHandler', async (request, reply) => {
    let cached: IdempotencyResponse | undefined
    try {
      cached = await idempotency.onRequest(params(request))
    } catch (err) {
      if (err instanceof IdempotencyError) {
        if (err.code === IdempotencyErrorCodes.REQUEST_IN_PROGRESS) reply.header('retry-after', '1')
        return reply.code(STATUS[err.code] ?? 500).send({ message: err.message, code: err.code })
      }
      throw err
    }
    if (cached === undefined) {
      if (request.headers[KEY_HEADER] !== undefined) (request as Marked)[kRan] = true
      return
    }
    const additional = cached.additional ?? {}
    reply.code(additional.statusCode as number)
    if (additional['content-type'] !== undefined) reply.header('content-type', additional['content-type'] as string)
    reply.header('idempotent-replayed', 'true')
    return reply.send(cached.body)
  })

  app.addHook('onSend', async (request, reply, payload) => {
    if ((request as Marked)[kRan] !== true) return payload
    const additional: Record<string, unknown> = { statusCode: reply.statusCode }
    const contentType = reply.getHeader('content-type')
    if (contentType !== undefined) additional['content-type'] = contentType
    await idempotency.onResponse(params(request), {
      additional,
      ...(reply.statusCode < 400 ? { body: payload } : { error: payload })
    })
    return payload
  })
}
