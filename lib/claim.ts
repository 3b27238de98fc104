/**
 * The claim step, top to bottom:
 *
 *   onRequest   checkHeader   parse and validate the key, before the body is read
 *   preHandler  claimKey      scope → store key → fingerprint → claim the key, or
 *                             replay / refuse (422) / wait / answer in flight (409)
 *
 * `claimKey` is the last preHandler of the route, so authentication and
 * validation have run and the body is parsed. A request that claims its key
 * runs the handler; completion.ts follows it until its claim ends.
 */
import { setTimeout as sleep } from 'node:timers/promises'
import type { FastifyBaseLogger, FastifyReply, FastifyRequest, HookHandlerDoneFunction } from 'fastify'
import { isStream, readStreamBody } from './body.js'
import { FingerprintMismatchError, InFlightError, InvalidScopeError, KeyMissingError, StoreUnavailableError } from './errors.js'
import { isDefaultFingerprint } from './fingerprint.js'
import { watchResponse } from './completion.js'
import { parseKey } from './header.js'
import { sendProblem } from './problem.js'
import { isThenable } from './thenable.js'
import { replayResponse } from './response.js'
import type { RouteSettings } from './route-config.js'
import { RequestState, kState, type StatefulReply } from './state.js'
import type { ClaimResult, FingerprintFunction, IdempotencyEvent, IdempotencyRecord, MaybePromise, StoreErrorPolicy } from '../types/index.js'

type RequestError = Error & { code: string, statusCode: number }

/** First and longest pause between two looks at an in-flight original, in ms. */
const FIRST_POLL = 5
const LONGEST_POLL = 100

/** onRequest, first in the route's chain: the key is parsed and validated before the body is read. */
export function checkHeader (route: RouteSettings) {
  const { header, keyRules, telemetry, problemJson } = route.plugin
  return function checkHeader (request: FastifyRequest, reply: FastifyReply, done: HookHandlerDoneFunction): void {
    if (!route.methods.has(request.method)) return done()
    const state = new RequestState(route, request, reply)
    ;(reply as StatefulReply)[kState] = state
    if (telemetry) {
      state.startedAt = Date.now()
      state.startMark = performance.now()
    }
    const raw = request.headers[header]
    let error: RequestError
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

/** What the claim step ends with: the handler runs (undefined), or the request was answered with this reply. */
type Answer = FastifyReply | undefined

/** What `answerClaim` says of a key whose original request is still in flight: wait, then claim again. */
const IN_FLIGHT = Symbol('in flight')

/**
 * preHandler, last in the route's chain: builds the store key and the
 * fingerprint, then claims the key or answers the duplicate. It stays
 * synchronous as long as everything it needs is at hand: a synchronous scope
 * and body, and a store that answers at once (the memory store, a cached
 * replay) go on to the handler or answer through `done`, without a promise
 * or a trip through the microtask queue. Anything that must wait returns a
 * promise instead, and Fastify waits for it.
 */
export function claimKey (request: FastifyRequest, reply: FastifyReply, done: HookHandlerDoneFunction): Promise<Answer> | undefined {
  const state = (reply as StatefulReply)[kState]
  if (state === null || state.key === undefined) {
    done()
    return
  }
  const scoped = scopeOf(state)
  const streamed = isDefaultFingerprint(state.route.fingerprint) && isStream(request.body)
  // An invalid scope goes the slow way too: it is refused there.
  if (isThenable(scoped) || streamed || typeof scoped === 'object') return claimAfterWaiting(state, scoped, streamed)
  storeKeyOf(state, scoped)
  const fingerprint = state.route.fingerprint?.(request)
  const claimed = callClaim(state, fingerprint)
  if (isThenable(claimed)) return claimOrAnswer(state, fingerprint, claimed)
  // A refusal (422) throws here, and Fastify's hook runner sends it as it sends done(err).
  const answer = answerClaim(state, fingerprint, claimed)
  if (answer === IN_FLIGHT) return claimOrAnswer(state, fingerprint, undefined)
  if (answer === undefined) done()
  // Otherwise the request was answered (a replay, a problem+json refusal): the chain stops there.
  return undefined
}

async function claimAfterWaiting (state: RequestState, scoped: Scope | Promise<Scope>, streamed: boolean): Promise<Answer> {
  const scope = await scoped
  if (typeof scope === 'object') return reject(state, new InvalidScopeError(describe(scope.value)))
  storeKeyOf(state, scope)
  let fingerprint: string | undefined
  if (streamed) {
    // A body the content-type parser left as a stream is read here, so that the fingerprint covers its bytes.
    const putBack = await readStreamBody(state.request)
    fingerprint = (state.route.fingerprint as FingerprintFunction)(state.request)
    putBack()
  } else {
    fingerprint = state.route.fingerprint?.(state.request)
  }
  return claimOrAnswer(state, fingerprint, callClaim(state, fingerprint))
}

/** The store key of the request: its scope, method, path (without the query string) and key. */
function storeKeyOf (state: RequestState, scope: string | undefined): void {
  const { url, method } = state.request
  const queryAt = url.indexOf('?')
  state.storeKey = state.route.keyEncoder({ scope, method, path: queryAt === -1 ? url : url.slice(0, queryAt), key: state.key as string })
}

/**
 * One atomic claim-or-get of the key in the store, noting when it was sent
 * (a claim it makes is held from then on); a store that throws gives a
 * rejected promise.
 */
function callClaim (state: RequestState, fingerprint: string | undefined): MaybePromise<ClaimResult> {
  state.claimSentAt = performance.now()
  try {
    return state.route.store.claim(state.storeKey, fingerprint, state.route.plugin.lockTtl)
  } catch (err) {
    return Promise.reject(err)
  }
}

/**
 * The claim loop, for whatever must wait: the store's answer (`claimed`), a
 * store failure, or an original in flight (`claimed` undefined: the first
 * claim found it so). It claims again with back-off until the key is
 * claimed, its record is complete, or inFlight.wait is over.
 */
async function claimOrAnswer (state: RequestState, fingerprint: string | undefined, claimed: MaybePromise<ClaimResult> | undefined): Promise<Answer> {
  const { route, request, reply } = state
  const { inFlightWait } = route.plugin
  const deadline = inFlightWait > 0 ? performance.now() + inFlightWait : 0
  let pause = FIRST_POLL
  let seenInFlight = claimed === undefined
  for (;;) {
    if (claimed !== undefined) {
      let result: ClaimResult
      try {
        result = await claimed
      } catch (err) {
        // A custom store may fail with anything, undefined and null included: only a refusal has a code of ours.
        if (REFUSALS.has((err as { code?: string } | null | undefined)?.code as string)) return answerRefusal(state, err as RequestError)
        route.counters.storeErrors++
        const record = await lookupAfterFailure(state)
        if (record === undefined) return refuse(state, err, seenInFlight)
        request.log.error({ err, idempotencyKey: state.logKey }, 'idempotency: store failed; the key was read instead (read-only lookup)')
        result = { record }
      }
      const answer = answerClaim(state, fingerprint, result)
      if (answer !== IN_FLIGHT) return answer
      seenInFlight = true
    }
    // In flight: wait for the original to complete or release the key, up to inFlight.wait.
    // Waiting polls the same claim-or-get step with back-off: it works on any store and
    // across processes, needs no extra connection (pub/sub) or server setting (keyspace
    // notifications), and a waiter that finds the key released claims it in that step.
    const left = deadline - performance.now()
    if (left <= 0) return answerInFlight(state)
    await sleep(Math.min(pause, left))
    if (reply.sent) return // answered meanwhile (a handler timeout): stop waiting
    pause = Math.min(pause * 2, LONGEST_POLL)
    claimed = callClaim(state, fingerprint)
  }
}

/**
 * What the store's answer means for the request: it holds the claim (the
 * handler runs), or it is a duplicate: refused when its fingerprint differs
 * (422), replayed when the record is complete, or IN_FLIGHT.
 */
function answerClaim (state: RequestState, fingerprint: string | undefined, result: ClaimResult): Answer | typeof IN_FLIGHT {
  const { route, request, reply } = state
  if (result.token !== undefined) {
    holdClaim(state, result.token)
    return
  }
  const record = result.record
  if (fingerprint !== undefined && record.fingerprint !== undefined && record.fingerprint !== fingerprint) {
    countDuplicate(route, 'mismatches')
    request.log.warn({ idempotencyKey: state.logKey }, 'idempotency: key reused with a different request (422)')
    emit(route.onMismatch, state)
    return reject(state, new FingerprintMismatchError())
  }
  if (record.state !== 'completed') return IN_FLIGHT
  countDuplicate(route, 'replayed')
  state.exists = true
  state.response = record.response
  if (route.manual) return // the handler decides what a duplicate gets
  state.replayed = true
  state.replayPending = true
  if (logsDebug(request.log)) request.log.debug({ idempotencyKey: state.logKey }, 'idempotency: replayed a saved response')
  emit(route.onReplay, state)
  return replayResponse(reply, record.response, route.replayStatusCode ?? record.response.statusCode, route.plugin.replayHeader)
}

/** The request now holds the claim: it runs the handler, renews its lease, and ends the claim when it is over. */
function holdClaim (state: RequestState, token: string): void {
  state.token = token
  state.route.counters.executed++
  state.route.plugin.leases.hold(state, state.claimSentAt)
  // The reply may have gone out while the claim was pending (a handler timeout): the handler
  // will not run then, and the claim is released as soon as that reply is over.
  watchResponse(state)
}

/**
 * A claim failed in the store: a read-only look (when the store has one) may
 * still find the record, so that a completed key is replayed and an in-flight
 * one answered as such while writes fail (a Redis write pause, a full Redis).
 */
async function lookupAfterFailure (state: RequestState): Promise<IdempotencyRecord | undefined> {
  const { store } = state.route
  if (store.lookup === undefined) return undefined
  try {
    return await store.lookup(state.storeKey)
  } catch {
    return undefined // the claim's failure is logged by the caller; the policy decides
  }
}

/** A claim that failed and found no record: answered in flight, run without idempotency (fail-open), or refused (503). */
function refuse (state: RequestState, err: unknown, seenInFlight: boolean): FastifyReply | undefined {
  const { request, reply } = state
  const idempotencyKey = state.logKey
  // Once the original was seen in flight, it may still be running: never run beside it.
  if (seenInFlight) {
    request.log.error({ err, idempotencyKey }, 'idempotency: store failed; the original was seen in flight, so the duplicate is answered as in flight')
    return answerInFlight(state)
  }
  if (chosenPolicy(state, err) === 'fail-open') {
    request.log.error({ err, idempotencyKey }, 'idempotency: store failed; running the handler without idempotency (fail-open)')
    return
  }
  request.log.error({ err, idempotencyKey }, 'idempotency: store failed; request refused (fail-closed)')
  reply.header('retry-after', '1')
  return reject(state, new StoreUnavailableError())
}

/** A refusal of the store (see REFUSALS): 503 with Retry-After, whatever `onStoreError` says. */
function answerRefusal (state: RequestState, err: RequestError): FastifyReply {
  const { route, request, reply } = state
  route.counters.storeErrors++
  if (err.code === 'FST_IDEMPOTENCY_STORE_FULL') {
    request.log.warn({ idempotencyKey: state.logKey }, 'idempotency: the store holds too many requests in flight; refused (503)')
    reply.header('retry-after', '1')
    return reject(state, err)
  }
  request.log.error({ err, idempotencyKey: state.logKey }, 'idempotency: the store may evict records (redis.requireNoEviction); refused (503)')
  reply.header('retry-after', '1')
  return reject(state, new StoreUnavailableError())
}

function answerInFlight (state: RequestState): FastifyReply {
  const { route, request, reply } = state
  countDuplicate(route, 'conflicts')
  request.log.info({ idempotencyKey: state.logKey }, 'idempotency: the original request is still in flight')
  emit(route.onConflict, state)
  const err: RequestError = new InFlightError()
  err.statusCode = route.plugin.inFlightStatus
  reply.header('retry-after', '1')
  return reject(state, err)
}

/** Answers with one of the plugin's errors, through Fastify's error handler or as problem+json. */
function reject (state: RequestState, error: RequestError): FastifyReply {
  if (state.route.plugin.problemJson) return sendProblem(state.reply, error)
  throw error
}

/**
 * Store failures that are refusals, not outages: the store holds all the
 * claims it may, or may evict records (`redis.requireNoEviction`). Running
 * the handler without idempotency then (fail-open) would be what the bound
 * exists to prevent, so they are always answered 503.
 */
const REFUSALS = new Set(['FST_IDEMPOTENCY_STORE_FULL', 'FST_IDEMPOTENCY_REDIS_EVICTION'])

/** A scope function's answer that names no principal. */
interface InvalidScope { value: unknown }

type Scope = string | undefined | InvalidScope

/**
 * The request's scope: what the route's `scope` returns (awaited when it is a
 * promise; a synchronous one stays synchronous), `null` as none, a finite
 * number as its digits. Anything else would merge principals into one scope,
 * so it is refused (logged, 500).
 */
function scopeOf (state: RequestState): Scope | Promise<Scope> {
  const scope = state.route.scope
  if (scope === undefined) return undefined
  const given = scope(state.request)
  return isThenable(given) ? Promise.resolve(given).then((value) => checkScope(state, value)) : checkScope(state, given)
}

function checkScope (state: RequestState, value: unknown): Scope {
  if (value === undefined || value === null) return undefined
  if (typeof value === 'string') return value
  if (typeof value === 'number' && Number.isFinite(value)) return String(value)
  state.request.log.error({ scope: describe(value) }, 'idempotency: the route\'s scope function returned something that is not a principal id; the request is refused (500)')
  return { value }
}

function describe (value: unknown): string {
  if (typeof value === 'object') return `an object (${(value as object).constructor?.name ?? 'without prototype'})`
  return `a ${typeof value} (${String(value)})`
}

/** The policy that the route's `onStoreError` picks for this failure. */
function chosenPolicy (state: RequestState, err: unknown): StoreErrorPolicy {
  const option = state.route.onStoreError
  if (typeof option !== 'function') return option
  try {
    const chosen = option(state.request, state.key as string, err)
    if (chosen === 'fail-open' || chosen === 'fail-closed') return chosen
  } catch (callbackError) {
    callbackThrew(state, callbackError)
  }
  return 'fail-closed'
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

function callbackThrew (state: RequestState, err: unknown): void {
  state.request.log.error({ err, idempotencyKey: state.logKey }, 'idempotency: an event callback threw')
}

/** Counts a duplicate (replay, conflict or mismatch) on its route. */
function countDuplicate (route: RouteSettings, outcome: 'replayed' | 'conflicts' | 'mismatches'): void {
  route.counters[outcome]++
  route.counters.lastDuplicateAt = Date.now()
}

/**
 * Whether `log` writes debug lines, so that a replay, the hot path, builds its
 * log line only when it is kept. Pino can tell; another logger is asked to log.
 */
function logsDebug (log: FastifyBaseLogger): boolean {
  return (log as { isLevelEnabled?: (level: string) => boolean }).isLevelEnabled?.('debug') ?? true
}
