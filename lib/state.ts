/**
 * What the plugin knows about one request, from the header check to the
 * moment its claim is completed or released. Handlers see it, typed down to
 * its public fields, as `reply.idempotency`.
 */
import type { FastifyReply, FastifyRequest } from 'fastify'
import type { RouteSettings } from './route-config.js'
import type { IdempotencyReplyState, StoredResponse } from '../types/index.js'

export const kState = Symbol('fastify-idempotency.state')

export type StatefulReply = FastifyReply & { [kState]: RequestState | null }

/** Where the handler of a claimed request is. */
export const CLAIMED = 0
/** The handler returned a promise that has not settled. */
export const RUNNING_ASYNC = 1
/** The handler returned without a promise and has not called `reply.send` yet. */
export const RUNNING_CALLBACK = 2
export const DONE = 3
/** The handler's call has not returned yet: whether it will go on (a promise) is not known. */
export const IN_CALL = 4

/** The answer of `reply.idempotency` on requests the plugin does not handle. */
export const NO_KEY: IdempotencyReplyState = Object.freeze({
  key: undefined, exists: false, replayed: false, response: undefined
})

export class RequestState implements IdempotencyReplyState {
  key: string | undefined = undefined
  exists = false
  replayed = false
  response: StoredResponse | undefined = undefined
  /** The store key, once the claim step has built it. */
  storeKey = ''
  /** The fencing token while this request holds the claim; undefined once it is completed or released. */
  token: string | undefined = undefined
  phase = CLAIMED
  /** A reply went out while the handler was still running: release the claim when it ends. */
  releaseWhenDone = false
  /** When the request arrived, in ms since the epoch and as `performance.now()` (telemetry only). */
  startedAt = 0
  startMark = 0

  constructor (
    readonly route: RouteSettings,
    readonly request: FastifyRequest
  ) {}
}
