/**
 * Store calls that must answer within a fixed time. A store gives every call
 * the same timeout, so deadlines arrive in the order the calls were made: a
 * FIFO of pending calls and one timer, armed for the oldest, does the work
 * of a `setTimeout` per call.
 */
import { StoreTimeoutError } from '../errors.js'

interface Pending {
  at: number
  settled: boolean
  reject: (err: Error) => void
  /** The late answer of a call that timed out goes here (a claim that Redis ran after all must be let go). */
  late: ((value: unknown) => void) | undefined
  timedOut: boolean
}

export class Deadlines {
  private readonly queue: Pending[] = []
  private head = 0
  private timer: NodeJS.Timeout | undefined
  private readonly expire = (): void => this.expireDue()

  constructor (readonly timeout: number) {}

  /**
   * `promise`, or a `FST_IDEMPOTENCY_STORE_TIMEOUT` failure if it does not
   * settle within the timeout. If it settles later, its value goes to `late`.
   */
  bound<T> (promise: Promise<T>, late?: (value: T) => void): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      const pending: Pending = { at: performance.now() + this.timeout, settled: false, reject, late: late as Pending['late'], timedOut: false }
      this.queue.push(pending)
      this.timer ??= setTimeout(this.expire, this.timeout).unref()
      promise.then((value) => {
        pending.settled = true
        if (pending.timedOut) pending.late?.(value)
        else resolve(value)
      }, (err: unknown) => {
        pending.settled = true
        reject(err)
      })
    })
  }

  /** Pending calls, timed-out ones that may still answer late excluded (for tests). */
  get size (): number {
    let n = 0
    for (let i = this.head; i < this.queue.length; i++) if (!this.queue[i].settled && !this.queue[i].timedOut) n++
    return n
  }

  close (): void {
    clearTimeout(this.timer)
    this.timer = undefined
  }

  private expireDue (): void {
    this.timer = undefined
    const now = performance.now()
    const { queue } = this
    while (this.head < queue.length) {
      const pending = queue[this.head]
      if (!pending.settled) {
        if (pending.at > now) break
        pending.timedOut = true
        pending.reject(new StoreTimeoutError(this.timeout))
      }
      this.head++
    }
    // Compact once the consumed part dominates, so the array never grows without bound.
    if (this.head > 1024 && this.head * 2 > queue.length) {
      queue.splice(0, this.head)
      this.head = 0
    }
    if (this.head < queue.length) {
      this.timer = setTimeout(this.expire, Math.max(1, queue[this.head].at - now)).unref()
    } else {
      queue.length = 0
      this.head = 0
    }
  }
}
