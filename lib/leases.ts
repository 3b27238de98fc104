/**
 * Leases: while a request holds its claim, the claim is renewed every
 * `lockTtl / 3`, so a slow handler keeps its key. A lease can still run out
 * (the store unreachable, this process frozen, the event loop blocked), and
 * no lease alone can stop a duplicate from starting then. So the keeper also
 * knows, on the monotonic clock, until when each claim is *known* to be held
 * (when the last confirmed claim or renewal was sent, plus `lockTtl`, minus a
 * safety margin), and aborts the request's `reply.idempotency.signal` when
 * that time passes without a confirmed renewal: a handler that listens stops
 * before a duplicate may start.
 *
 * One timer per plugin renews every held claim; a tick that fires late is
 * logged, with how late. A renewal that finds the claim gone stops renewing
 * it; failures are logged once per claim.
 */
import type { FastifyBaseLogger } from 'fastify'
import { Queue } from './queue.js'
import type { RequestState } from './state.js'

export class LeaseKeeper {
  /** The requests that hold a claim, linked through their own state: no Set to hash them into. */
  private readonly held = new Queue<RequestState>()
  private readonly abortTimers = new Map<RequestState, NodeJS.Timeout>()
  private readonly failedOnce = new WeakSet<RequestState>()
  private timer: NodeJS.Timeout | undefined
  private dueAt = 0
  /** Renewals are sent this often. */
  readonly interval: number
  /** A claim is trusted until this long before its lease would run out. */
  readonly margin: number
  /** A renewal tick later than this is logged. */
  readonly lateAfter: number
  private readonly tick = (): void => this.renewAll()

  constructor (
    private readonly lockTtl: number,
    private readonly log: FastifyBaseLogger
  ) {
    this.interval = Math.floor(lockTtl / 3)
    this.margin = Math.floor(lockTtl / 10)
    this.lateAfter = Math.max(100, Math.floor(lockTtl / 20))
  }

  /** `state` now holds its claim, confirmed for a claim sent at `sentAt` (`performance.now()`). */
  hold (state: RequestState, sentAt: number): void {
    state.heldUntil = sentAt + this.lockTtl - this.margin
    this.held.push(state)
    if (this.timer === undefined) this.schedule(performance.now())
  }

  /** `state` no longer holds its claim (completed, released or lost): no more renewals, no abort. */
  drop (state: RequestState): void {
    if (this.held.holds(state)) this.held.remove(state)
    if (state.controller === undefined) return // no signal was read: no abort timer
    const timer = this.abortTimers.get(state)
    if (timer !== undefined) {
      clearTimeout(timer)
      this.abortTimers.delete(state)
    }
  }

  /** The controller of `state.signal`, aborted when the claim can no longer be trusted. */
  watch (state: RequestState): AbortController {
    const controller = new AbortController()
    state.controller = controller
    if (state.token !== undefined) this.armAbort(state)
    return controller
  }

  close (): void {
    clearTimeout(this.timer)
    this.timer = undefined
    for (const timer of this.abortTimers.values()) clearTimeout(timer)
    this.abortTimers.clear()
  }

  private schedule (now: number): void {
    this.dueAt = now + this.interval
    this.timer = setTimeout(this.tick, this.interval).unref()
  }

  renewAll (): void {
    const now = performance.now()
    const late = now - this.dueAt
    this.timer = undefined
    if (late > this.lateAfter) {
      this.log.warn({ lateMs: Math.round(late), held: this.held.length },
        `idempotency: lease renewal ran ${Math.round(late)} ms late (event loop blocked, or the process was paused); claims may have come close to expiring`)
    }
    for (let state = this.held.head; state !== undefined; state = state.next) this.renew(state, now)
    if (this.held.length > 0) this.schedule(now)
  }

  private renew (state: RequestState, sentAt: number): void {
    const { storeKey, request } = state
    const token = state.token as string
    // Called in an async function, so a store that throws synchronously rejects instead of breaking the tick.
    ;(async () => state.route.store.renew(storeKey, token, this.lockTtl))().then((renewed) => {
      if (state.token !== token) return // the claim ended meanwhile
      if (renewed) {
        state.heldUntil = Math.max(state.heldUntil, sentAt + this.lockTtl - this.margin)
        if (state.controller !== undefined) this.armAbort(state)
        return
      }
      state.leaseLost = true
      this.drop(state)
      state.controller?.abort(new Error('idempotency: the claim was lost'))
      request.log.error({ idempotencyKey: state.logKey },
        'idempotency: the lease of a running handler was lost (it expired, or the record was evicted or deleted); a duplicate may run, and this response will not be saved')
    }, (err: unknown) => {
      if (this.failedOnce.has(state)) return
      this.failedOnce.add(state)
      request.log.error({ err, idempotencyKey: state.logKey },
        'idempotency: lease renewal failed; retrying every renewal interval (reply.idempotency.signal aborts if the lease may have run out)')
    })
  }

  /** Aborts `state.signal` when the time the claim is known to be held has passed. */
  private armAbort (state: RequestState): void {
    const controller = state.controller as AbortController
    const previous = this.abortTimers.get(state)
    if (previous !== undefined) clearTimeout(previous)
    const left = state.heldUntil - performance.now()
    if (state.leaseLost || left <= 0) {
      this.abortTimers.delete(state)
      controller.abort(new Error('idempotency: the claim may have expired'))
      return
    }
    this.abortTimers.set(state, setTimeout(() => {
      this.abortTimers.delete(state)
      controller.abort(new Error('idempotency: the claim was not renewed in time; a duplicate may start'))
    }, left).unref())
  }
}
