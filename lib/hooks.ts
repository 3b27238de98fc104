/**
 * The request path, top to bottom:
 *
 *   onRequest   checkHeader   parse and validate the key, before the body is read
 *   preHandler  claimKey      claim the key, or replay / reject / wait (last in the route's chain)
 *   handler     trackHandler  know when the handler ends, however it ends
 *   onSend      saveReply     save the serialized reply, or release the claim
 *
 * Route hooks are built once per covered route; `saveReply` is one global
 * `onSend` that returns at once for requests it does not own.
 */
import { setTimeout as sleep } from 'node:timers/promises'
import type {
  FastifyBaseLogger, FastifyInstance, FastifyReply, FastifyRequest, HookHandlerDoneFunction, RouteHandlerMethod
} from 'fastify'
import { FingerprintMismatchError, InFlightError, KeyMissingError, StoreUnavailableError } from './errors.js'
import { parseKey } from './header.js'
import { sendProblem } from './problem.js'
import type { LeaseKeeper } from './leases.js'
import type { PluginSettings } from './options.js'
import { captureResponse, replayResponse } from './response.js'
import type { RouteSettings } from './route-config.js'
import {
  DONE, IN_CALL, RUNNING_ASYNC, RUNNING_CALLBACK, RequestState, kState, type StatefulReply
} from './state.js'
import type { ClaimResult, IdempotencyEvent, StoredResponse, StoreErrorPolicy } from '../types/index.js'

type RequestError = Error & { code: string, statusCode: number }

function isThenable<T> (value: T | PromiseLike<T>): value is PromiseLike<T> {
  return typeof (value as PromiseLike<T> | undefined)?.then === 'function'
}

/**
 * Whether `log` writes debug lines, so that a replay, the hot path, builds its
 * log line only when it is kept. Pino can tell; another logger is asked to log.
 */
function logsDebug (log: FastifyBaseLogger): boolean {
  return (log as { isLevelEnabled?: (level: string) => boolean }).isLevelEnabled?.('debug') ?? true
}

/** A claim attempt failed in the store and the policy is fail-closed. */
const STORE_FAILED = Symbol('store failed')

/** First and longest pause between two looks at an in-flight original, in ms. */
const FIRST_POLL = 5
const LONGEST_POLL = 100

export function createHooks (settings: PluginSettings, leases: LeaseKeeper) {
  const { header, keyRules, keyEncoder, logKey, lockTtl, replayHeader, telemetry, inFlightWait, unsavedHeaders, problemJson } = settings

  /** Answers with one of the plugin's errors, through Fastify's error handler or as problem+json. */
  function reject (reply: FastifyReply, error: RequestError): FastifyReply {
    if (problemJson) return sendProblem(reply, error)
    throw error
  }

  /** Calls an event callback; one that throws is logged and never breaks the request. */
  function emit (event: IdempotencyEvent | undefined, state: RequestState): void {
    if (event === undefined) return
    try {
      event(state.request, state.key as string)
    } catch (err) {
      callbackThrew(state, err)
    }
  }

  /** The policy that the route's `onStoreError` function picks for this failure, if any. */
  function chosenPolicy (state: RequestState, err: unknown): StoreErrorPolicy | undefined {
    const event = state.route.events.onStoreError
    if (event === undefined) return
    try {
      const chosen = event(state.request, state.key as string, err)
      if (chosen === 'fail-open' || chosen === 'fail-closed') return chosen
    } catch (callbackError) {
      callbackThrew(state, callbackError)
    }
  }

  function callbackThrew (state: RequestState, err: unknown): void {
    state.request.log.error({ err, idempotencyKey: logKey(state.storeKey) }, 'idempotency: an event callback threw')
  }

  /** Counts a duplicate (replay, conflict or mismatch) on its route. */
  function countDuplicate (route: RouteSettings, outcome: 'replayed' | 'conflicts' | 'mismatches'): void {
    route.counters[outcome]++
    route.counters.lastDuplicateAt = Date.now()
  }

  /** onRequest: the key is parsed and validated before the body is read. */
  function checkHeader (route: RouteSettings) {
    return function checkHeader (request: FastifyRequest, reply: FastifyReply, done: HookHandlerDoneFunction): void {
      if (!route.methods.has(request.method)) return done()
      const state = new RequestState(route, request)
      ;(reply as StatefulReply)[kState] = state
      if (telemetry) {
        state.startedAt = Date.now()
        state.startMark = performance.now()
      }
      const raw = request.headers[header]
      let error: RequestError | undefined
      if (raw === undefined) {
        if (!route.required) return done()
        route.counters.missingKeys++
        error = new KeyMissingError(header)
      } else {
        try {
          state.key = parseKey(raw, keyRules)
          return done()
        } catch (err) {
          route.counters.invalidKeys++
          error = err as RequestError
        }
      }
      if (problemJson) sendProblem(reply, error) // answered: the hook chain stops here
      else done(error)
    }
  }

  /**
   * preHandler, last in the route's chain (auth has run, the body is parsed):
   * one atomic store step claims the key or returns what holds it.
   */
  async function claimKey (request: FastifyRequest, reply: FastifyReply): Promise<FastifyReply | undefined> {
    const state = (reply as StatefulReply)[kState]
    if (state === null || state.key === undefined) return
    const route = state.route
    const queryAt = request.url.indexOf('?')
    state.storeKey = keyEncoder({
      scope: route.scope?.(request),
      method: request.method,
      path: queryAt === -1 ? request.url : request.url.slice(0, queryAt),
      key: state.key
    })
    const fingerprint = route.fingerprint?.(request)
    const deadline = inFlightWait > 0 ? Date.now() + inFlightWait : 0
    let pause = FIRST_POLL
    for (;;) {
      let result: ClaimResult | typeof STORE_FAILED | undefined
      try {
        const claimed = route.store.claim(state.storeKey, fingerprint, lockTtl)
        // A synchronous store (memory) answers without a trip through the microtask queue.
        result = isThenable(claimed) ? await claimed : claimed
      } catch (err) {
        result = storeFailed(state, err)
      }
      if (result === undefined) return // the store failed and the policy is fail-open: run without idempotency
      if (result === STORE_FAILED) {
        reply.header('retry-after', '1')
        return reject(reply, new StoreUnavailableError())
      }
      if (result.token !== undefined) {
        state.token = result.token
        route.counters.executed++
        leases.hold(state)
        // The reply went out while the claim was pending (a handler timeout): Fastify will not run the handler.
        if (reply.sent) await release(state)
        return
      }
      const record = result.record
      if (fingerprint !== undefined && record.fingerprint !== undefined && record.fingerprint !== fingerprint) {
        countDuplicate(route, 'mismatches')
        request.log.warn({ idempotencyKey: logKey(state.storeKey) }, 'idempotency: key reused with a different request (422)')
        emit(route.events.onMismatch, state)
        return reject(reply, new FingerprintMismatchError())
      }
      if (record.state === 'completed') {
        countDuplicate(route, 'replayed')
        state.exists = true
        state.response = record.response
        if (route.manual) return // the handler decides what a duplicate gets
        state.replayed = true
        if (logsDebug(request.log)) request.log.debug({ idempotencyKey: logKey(state.storeKey) }, 'idempotency: replayed a saved response')
        emit(route.events.onReplay, state)
        return replayResponse(reply, record.response, route, replayHeader)
      }
      // In flight: wait for the original to complete or release the key, up to inFlight.wait.
      // Waiting polls the same claim-or-get step with back-off: it works on any store and
      // across processes, needs no extra connection (pub/sub) or server setting (keyspace
      // notifications), and a waiter that finds the key released claims it in that step.
      const left = deadline - Date.now()
      if (left <= 0) {
        countDuplicate(route, 'conflicts')
        request.log.info({ idempotencyKey: logKey(state.storeKey) }, 'idempotency: the original request is still in flight')
        emit(route.events.onConflict, state)
        const err: RequestError = new InFlightError()
        err.statusCode = settings.inFlightStatus
        reply.header('retry-after', '1')
        return reject(reply, err)
      }
      await sleep(Math.min(pause, left))
      if (reply.sent) return // answered meanwhile (a handler timeout): stop waiting
      pause = Math.min(pause * 2, LONGEST_POLL)
    }
  }

  /** A failed claim, answered by the route's policy: undefined (fail-open: run without idempotency) or STORE_FAILED. */
  function storeFailed (state: RequestState, err: unknown): typeof STORE_FAILED | undefined {
    const { route, request } = state
    route.counters.storeErrors++
    const failOpen = (chosenPolicy(state, err) ?? route.storeErrorPolicy) === 'fail-open'
    request.log.error({ err, idempotencyKey: logKey(state.storeKey) },
      failOpen ? 'idempotency: store failed; running the handler without idempotency (fail-open)' : 'idempotency: store failed; request refused (fail-closed)')
    return failOpen ? undefined : STORE_FAILED
  }

  /**
   * Wraps a covered route's handler to know when it ends: a claim is released
   * only when the handler never started or has finished without a storable
   * result, never while it may still be running.
   */
  function trackHandler (handler: RouteHandlerMethod): RouteHandlerMethod {
    return function trackedHandler (this: FastifyInstance, request, reply) {
      const state = (reply as StatefulReply)[kState]
      if (state === null || state.token === undefined) return handler.call(this, request, reply)
      // A reply sent during the call (an async handler sends before its first await)
      // does not end the handler: finish() leaves the claim to be released below.
      state.phase = IN_CALL
      let result: unknown
      try {
        result = handler.call(this, request, reply)
      } catch (err) {
        handlerEnded(state, reply)
        throw err
      }
      if (isThenable(result)) {
        state.phase = RUNNING_ASYNC
        const ended = () => handlerEnded(state, reply)
        result.then(ended, ended)
      } else if (state.token !== undefined && (state.releaseWhenDone || reply.sent)) {
        // It sent a reply that is not stored, or it hijacked the reply (onSend never runs).
        handlerEnded(state, reply)
      } else {
        state.phase = RUNNING_CALLBACK
      }
      return result
    } as RouteHandlerMethod
  }

  function handlerEnded (state: RequestState, reply: FastifyReply): void {
    state.phase = DONE
    // A reply that went out while the handler ran (sent early, a timeout) or a hijacked
    // reply left the claim held until now; a normal reply is still on its way to onSend.
    if (state.token !== undefined && (state.releaseWhenDone || reply.sent)) release(state) // never rejects: failures are logged
  }

  /** onSend, global: saves the serialized reply of the request that holds the claim, or releases it. */
  function saveReply (_request: FastifyRequest, reply: FastifyReply, payload: unknown, done: (err: null, payload: unknown) => void): void {
    const state = (reply as StatefulReply)[kState]
    if (state === null) return done(null, payload)
    if (telemetry) {
      reply.header('x-request-start-time', String(state.startedAt))
      reply.header('x-request-duration-ms', (performance.now() - state.startMark).toFixed(3))
    }
    if (state.token === undefined) return done(null, payload)
    const pending = finish(state, reply, payload)
    if (pending === undefined) return done(null, payload) // a synchronous store (memory) has saved it already
    pending.then(() => done(null, payload))
  }

  /** Saves or releases the claim; a promise only while an asynchronous store is at work (it never rejects). */
  function finish (state: RequestState, reply: FastifyReply, payload: unknown): PromiseLike<void> | undefined {
    if (state.phase === RUNNING_CALLBACK) state.phase = DONE
    if (state.route.storeOnStatuses.has(reply.statusCode)) {
      const response = captureResponse(reply, payload, unsavedHeaders)
      if (response !== undefined) return save(state, response)
      state.request.log.warn({ idempotencyKey: logKey(state.storeKey) }, 'idempotency: the response payload cannot be saved (a stream?); the claim is released')
    }
    if (state.phase === RUNNING_ASYNC || state.phase === IN_CALL) {
      state.releaseWhenDone = true
      return
    }
    return release(state)
  }

  function save (state: RequestState, response: StoredResponse): PromiseLike<void> | undefined {
    const token = takeClaim(state)
    try {
      const saved = state.route.store.complete(state.storeKey, token, response, state.route.ttl)
      if (!isThenable(saved)) {
        savedOrLost(state, saved)
        return
      }
      return saved.then((ok) => savedOrLost(state, ok), (err: unknown) => saveFailed(state, err))
    } catch (err) {
      saveFailed(state, err)
    }
  }

  function savedOrLost (state: RequestState, saved: boolean): void {
    if (!saved) state.request.log.error({ idempotencyKey: logKey(state.storeKey) }, 'idempotency: the claim was lost before the response could be saved (lease expired); the response was not saved')
  }

  function saveFailed (state: RequestState, err: unknown): void {
    state.request.log.error({ err, idempotencyKey: logKey(state.storeKey) }, 'idempotency: the response could not be saved; the claim expires after lockTtl')
  }

  async function release (state: RequestState): Promise<void> {
    const token = takeClaim(state)
    try {
      await state.route.store.release(state.storeKey, token)
    } catch (err) {
      state.request.log.error({ err, idempotencyKey: logKey(state.storeKey) }, 'idempotency: the claim could not be released; it expires after lockTtl')
    }
  }

  /** The claim's token; from now on this request no longer holds it. */
  function takeClaim (state: RequestState): string {
    const token = state.token as string
    state.token = undefined
    leases.drop(state)
    return token
  }

  return { checkHeader, claimKey, trackHandler, saveReply }
}
