/**
 * The completion step: a claim ends when, and only when, two things are over.
 *
 *   the handler     `running` is false: its promise settled, or (a handler
 *                   that returns no promise) its reply reached onSend
 *   the response    `responseOver` is true: the raw response closed, sent
 *                   or cut off
 *
 * Then `endClaim`, the one place where a claim ends, saves the reply that
 * reached onSend (if it is storable and nothing failed) or releases the claim.
 * The onSend hook only captures and hands the payload back at once, so the
 * plugin never holds a reply back, never sends one twice, and never throws
 * into Fastify after a reply went out: whatever Fastify alone would send is
 * what the client gets, and the saved record is exactly that, or nothing.
 *
 *   handler     trackHandler   know whether the handler may still be running
 *   onError     noteError      an error went to the error handler: never save
 *   onSend      captureReply   capture the first reply; replays get their saved body
 *   res close   watchResponse  the response is over
 */
import type { FastifyError, FastifyInstance, FastifyReply, FastifyRequest, HookHandlerDoneFunction, RouteHandlerMethod } from 'fastify'
import { isThenable } from './thenable.js'
import { captureResponse, replayPayload } from './response.js'
import { kState, type RequestState, type StatefulReply } from './state.js'
import type { StoredResponse } from '../types/index.js'

/**
 * Wraps a covered route's handler. A handler that returns a promise may run
 * until it settles; one that returns nothing answers through `reply.send`
 * later, and counts as running until that reply reaches onSend.
 */
export function trackHandler (handler: RouteHandlerMethod): RouteHandlerMethod {
  return function trackedHandler (this: FastifyInstance, request, reply) {
    const state = (reply as StatefulReply)[kState]
    if (state === null || state.token === undefined) return handler.call(this, request, reply)
    state.running = true
    let result: unknown
    try {
      result = handler.call(this, request, reply)
    } catch (err) {
      handlerFailed(state)
      throw err
    }
    if (isThenable(result)) {
      result.then((value) => handlerResolved(state, value), () => handlerFailed(state))
    } else if (reply.sent) {
      state.running = false // it answered (or hijacked the reply) during the call
      endClaim(state)
    } else if (state.responseOver && result === undefined) {
      // Its client went away before it ran, and it returned neither a promise nor a value: nothing
      // tells when it ends, so it counts as over now, as when the client goes away while it runs.
      state.running = false
      endClaim(state)
    } else {
      state.endsWithSend = true // its value, or a later reply.send, is on its way to onSend
    }
    return result
  } as RouteHandlerMethod
}

function handlerResolved (state: RequestState, value: unknown): void {
  // The client went away while the handler ran, and Fastify still serializes and "sends" a
  // returned value: wait for it to reach onSend, so that the retry can replay it.
  if (state.responseOver && value !== undefined && !state.failed && !state.reply.sent) {
    state.endsWithSend = true
    return
  }
  state.running = false
  endClaim(state)
}

/** The handler threw or rejected: its claim is never saved, whatever reply goes out. */
function handlerFailed (state: RequestState): void {
  state.failed = true
  state.running = false
  endClaim(state)
}

/**
 * onError, on covered routes: an error reached Fastify's error handling (the
 * handler, a hook, serialization, or writing the reply failed). Whatever the
 * error handler turns it into, it is not the handler's result: never saved.
 */
export function noteError (_request: FastifyRequest, reply: FastifyReply, _error: FastifyError, done: HookHandlerDoneFunction): void {
  const state = (reply as StatefulReply)[kState]
  if (state !== null) {
    state.failed = true
    if (state.endsWithSend) {
      state.endsWithSend = false
      state.running = false
      endClaim(state)
    }
  }
  done()
}

/**
 * onSend, global (it returns at once for requests the plugin does not own):
 * captures the first reply of a request that holds its claim, and hands a
 * replay's saved body on in its original form. Synchronous, and `done` is
 * the last thing it calls: an error Fastify raises while writing the reply
 * then reaches Fastify's own error handling, as with no plugin at all.
 */
export function captureReply (_request: FastifyRequest, reply: FastifyReply, payload: unknown, done: (err: null, payload: unknown) => void): void {
  const state = (reply as StatefulReply)[kState]
  if (state === null) return done(null, payload)
  if (state.route.plugin.telemetry) {
    reply.header('x-request-start-time', String(state.startedAt))
    reply.header('x-request-duration-ms', (performance.now() - state.startMark).toFixed(3))
  }
  if (state.replayPending) {
    state.replayPending = false
    return done(null, replayPayload(reply, state.response as StoredResponse))
  }
  if (state.token !== undefined) capture(state, reply, payload)
  done(null, payload)
}

function capture (state: RequestState, reply: FastifyReply, payload: unknown): void {
  if (state.captured === undefined) {
    if (!state.failed) state.captured = captureResponse(reply, payload, state.route.plugin.unsavedHeaders)
    if (state.committed !== undefined && state.captured !== undefined) checkCommitted(state, state.committed, state.captured)
  } else if (!state.failed) {
    state.request.log.warn({ idempotencyKey: state.logKey },
      'idempotency: a second reply reached onSend for this request (reply.send called twice?); the first one is the one saved')
  }
  if (state.endsWithSend) {
    state.endsWithSend = false
    state.running = false
    endClaim(state)
  }
}

/** The reply that goes out after completeWith must be the one it saved; retries replay what was saved. */
function checkCommitted (state: RequestState, committed: StoredResponse, sent: StoredResponse | null): void {
  if (sent !== null && sent.statusCode === committed.statusCode && sameBody(sent.body, committed.body)) return
  state.request.log.error({ idempotencyKey: state.logKey },
    'idempotency: the reply differs from what completeWith saved (send the same body; or a later hook changed it); retries replay what completeWith saved')
}

function sameBody (a: string | Buffer, b: string | Buffer): boolean {
  if (typeof a === 'string' && typeof b === 'string') return a === b
  return Buffer.from(a).equals(Buffer.from(b))
}

/** Marks the response over when the raw response closes (sent, or the connection cut). */
export function watchResponse (state: RequestState): void {
  const raw = state.reply.raw
  if (raw.writableFinished || raw.destroyed) {
    state.responseOver = true
    // The client went away while the claim was pending: Fastify still runs the handler (it runs
    // it unless a reply went out), so the claim ends when the handler does, never before it.
    if (state.reply.sent) endClaim(state)
    return
  }
  raw.on('close', () => { // emitted once, at the end of the response
    state.responseOver = true
    // A handler that returned no promise and never answered: nothing tells when it ends, and
    // its client is gone; it counts as over now (prefer async handlers, which are tracked).
    if (state.endsWithSend) {
      state.endsWithSend = false
      state.running = false
    }
    endClaim(state)
  })
}

/**
 * The one place where a claim ends, once the handler and the response are
 * both over: the captured reply is saved when it is storable and nothing
 * failed; otherwise the claim is released, so that a retry runs the handler.
 * Never throws, and never rejects: store failures are logged.
 */
export function endClaim (state: RequestState): void {
  if (state.token === undefined || state.running || !state.responseOver) return
  const token = state.token
  state.token = undefined
  state.route.plugin.leases.drop(state)
  if (state.leaseLost) return // logged when the renewal found it gone: the key is not ours to end
  // A reply that completeWith saved in the handler's transaction is the store's already: if that
  // transaction rolled back, the claim is still ours, and releasing it tells.
  const response = state.committed === undefined ? storable(state) : undefined
  if (response === undefined) release(state, token)
  else save(state, token, response)
}

/** Saves the reply; never throws, and a failure is logged. */
function save (state: RequestState, token: string, response: StoredResponse): void {
  const { route } = state
  let result: boolean | PromiseLike<boolean>
  try {
    result = route.store.complete(state.storeKey, token, response, route.ttl)
  } catch (err) {
    return storeCallFailed(state, 'save', err)
  }
  if (isThenable(result)) result.then((done) => saved(state, done), (err: unknown) => storeCallFailed(state, 'save', err))
  else saved(state, result)
}

function saved (state: RequestState, done: boolean): void {
  if (done) return
  const vanished = performance.now() < state.heldUntil
  state.request.log.error({ idempotencyKey: state.logKey }, vanished
    ? 'idempotency: the record vanished from the store while its claim was held (evicted, or deleted by hand: check maxmemory-policy); the response was not saved'
    : 'idempotency: the claim expired before the response could be saved (its lease was lost); the response was not saved')
}

/** Releases the claim, so that a retry runs the handler; never throws, and a failure is logged. */
function release (state: RequestState, token: string): void {
  let result: boolean | PromiseLike<boolean>
  try {
    result = state.route.store.release(state.storeKey, token)
  } catch (err) {
    return storeCallFailed(state, 'release', err)
  }
  if (isThenable(result)) result.then((done) => released(state, done), (err: unknown) => storeCallFailed(state, 'release', err))
  else released(state, result)
}

function released (state: RequestState, done: boolean): void {
  if (done && state.committed !== undefined) {
    state.request.log.warn({ idempotencyKey: state.logKey }, 'idempotency: the transaction of completeWith did not commit; the claim is released')
  }
}

function storeCallFailed (state: RequestState, what: 'save' | 'release', err: unknown): void {
  state.request.log.error({ err, idempotencyKey: state.logKey }, what === 'save'
    ? 'idempotency: the response could not be saved; the claim expires after lockTtl'
    : 'idempotency: the claim could not be released; it expires after lockTtl')
}

/** The reply to save, or undefined (logged once when the reason is worth knowing). */
function storable (state: RequestState): StoredResponse | undefined {
  const { captured, route, request } = state
  if (state.failed) return
  if (captured === undefined) {
    request.log.info({ idempotencyKey: state.logKey },
      'idempotency: the request ended without a reply to save (the client went away, the reply was hijacked or written to reply.raw); the claim is released')
    return
  }
  if (!route.storeOnStatuses.has(captured === null ? state.reply.statusCode : captured.statusCode)) return
  if (captured === null) {
    request.log.warn({ idempotencyKey: state.logKey }, 'idempotency: the response payload cannot be saved (a stream?); the claim is released')
    return
  }
  return captured
}
