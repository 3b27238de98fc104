/**
 * Store calls that must answer within a fixed time. A store gives every call
 * the same timeout, so deadlines arrive in the order the calls were made: a
 * list of the calls still pending, oldest first, and one timer armed for the
 * oldest do the work of a `setTimeout` per call. A call leaves the list as
 * soon as it settles, so under load the list holds only what is in flight,
 * and nothing a settled call needed stays reachable until its deadline.
 */
import { StoreTimeoutError } from '../errors.js'
import { Queue, type Linked } from '../queue.js'

class Pending implements Linked<Pending> {
  prev: Pending | undefined = undefined
  next: Pending | undefined = undefined
  timedOut = false

  constructor (
    readonly at: number,
    public reject: ((err: Error) => void) | undefined,
    /** The late answer of a call that timed out goes here (a claim that Redis ran after all must be let go). */
    public late: ((value: unknown) => void) | undefined
  ) {}
}

export class Deadlines {
  /** The calls still waiting within their timeout, oldest first. */
  private readonly pending = new Queue<Pending>()
  private timer: NodeJS.Timeout | undefined
  private readonly expire = (): void => this.expireDue()

  constructor (readonly timeout: number) {}

  /**
   * `promise`, or a `FST_IDEMPOTENCY_STORE_TIMEOUT` failure if it does not
   * settle within the timeout. If it settles later, its value goes to `late`.
   */
  bound<T> (promise: Promise<T>, late?: (value: T) => void): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      const call = new Pending(performance.now() + this.timeout, reject, late as Pending['late'])
      this.append(call)
      promise.then((value) => {
        if (call.timedOut) call.late?.(value)
        else {
          this.remove(call)
          resolve(value)
        }
        call.late = undefined
      }, (err: unknown) => {
        if (!call.timedOut) this.remove(call)
        reject(err)
      })
    })
  }

  /** Calls still waiting for their answer within the timeout (for tests). */
  get size (): number {
    return this.pending.length
  }

  close (): void {
    clearTimeout(this.timer)
    this.timer = undefined
  }

  private append (call: Pending): void {
    this.pending.push(call)
    this.timer ??= setTimeout(this.expire, this.timeout).unref()
  }

  private remove (call: Pending): void {
    this.pending.remove(call)
    call.reject = undefined
  }

  private expireDue (): void {
    this.timer = undefined
    const now = performance.now()
    for (let call = this.pending.head; call !== undefined && call.at <= now; call = this.pending.head) {
      const reject = call.reject as (err: Error) => void
      this.remove(call)
      call.timedOut = true
      reject(new StoreTimeoutError(this.timeout))
    }
    if (this.pending.head !== undefined) this.timer = setTimeout(this.expire, Math.max(1, this.pending.head.at - now)).unref()
  }
}
