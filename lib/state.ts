/**
 * What the plugin knows about one request, from the header check to the
 * moment its claim is completed or released. Handlers see it, typed down to
 * its public fields, as `reply.idempotency`.
 */
import type { FastifyReply, FastifyRequest } from 'fastify'
import { completeWith } from './complete-with.js'
import { CompleteWithError } from './errors.js'
import type { Linked } from './queue.js'
import type { RouteSettings } from './route-config.js'
import type { IdempotencyReplyState, SqlClient, StoredResponse } from '../types/index.js'

export const kState = Symbol('fastify-idempotency.state')

export type StatefulReply = FastifyReply & { [kState]: RequestState | null }

/** A signal that never aborts: requests that hold no claim have nothing to lose. */
const NEVER = new AbortController().signal

/** The answer of `reply.idempotency` on requests the plugin does not handle. */
export const NO_KEY: IdempotencyReplyState = Object.freeze({
  key: undefined,
  exists: false,
  replayed: false,
  response: undefined,
  token: undefined,
  signal: NEVER,
  async completeWith () {
    throw new CompleteWithError('this request holds no idempotency claim (no key, an exempt route, or a replay)')
  }
})

export class RequestState implements IdempotencyReplyState, Linked<RequestState> {
  key: string | undefined = undefined
  exists = false
  replayed = false
  response: StoredResponse | undefined = undefined
  /** A replay whose saved body the plugin's onSend hook has yet to hand on. */
  replayPending = false
  /** The store key, once the claim step has built it. */
  storeKey = ''
  /** The fencing token while this request holds its claim; undefined once the claim has ended (or before it began). */
  token: string | undefined = undefined

  // The end of a claim follows two facts (see completion.ts).
  /** May the handler still be running, or its reply still be on its way to onSend? */
  running = false
  /** `running` ends with the next reply that reaches onSend, not with a promise (callback-style handlers). */
  endsWithSend = false
  /** The raw response is over: sent, or the connection closed. */
  responseOver = false

  /** An error reached Fastify's error handling for this request (the handler threw, a hook failed): nothing is saved. */
  failed = false
  /** The first reply that reached onSend while the claim was held: a response to save, or null when it cannot be saved. */
  captured: StoredResponse | null | undefined = undefined
  /** What `completeWith` committed through the handler's transaction, if it was called. */
  committed: StoredResponse | undefined = undefined

  /** When the last claim of the key was sent to the store (`performance.now()`): a claim it made is held from then. */
  claimSentAt = 0
  /** Until when, on the monotonic clock (`performance.now()`), the claim is known to be held. */
  heldUntil = 0
  /** A renewal found the claim gone: it is not renewed again, and nothing is saved for it. */
  leaseLost = false
  /** Made on the first read of `signal`. */
  controller: AbortController | undefined = undefined
  /** Links in the lease keeper's queue of held claims. */
  prev: RequestState | undefined = undefined
  next: RequestState | undefined = undefined

  /** When the request arrived, in ms since the epoch and as `performance.now()` (telemetry only). */
  startedAt = 0
  startMark = 0

  constructor (
    readonly route: RouteSettings,
    readonly request: FastifyRequest,
    readonly reply: FastifyReply
  ) {}

  /** How logs name this request's store key. */
  get logKey (): string {
    return this.route.logKey(this.storeKey)
  }

  get signal (): AbortSignal {
    if (this.token === undefined && this.controller === undefined) return NEVER
    this.controller ??= this.route.plugin.leases.watch(this)
    return this.controller.signal
  }

  completeWith (client: SqlClient, body: unknown): Promise<void> {
    return completeWith(this, client, body)
  }
}
