/**
 * Lease renewal: while a request holds its claim (its handler runs, or its
 * result is on its way through serialization and onSend), the claim is
 * extended every `lockTtl / 3`, so a slow request never loses its key to a
 * duplicate. One unref'd timer per plugin renews every held claim; a request
 * joins the Set when it claims and leaves it when its claim is completed or
 * released. A process that dies stops renewing, and its claims expire after
 * `lockTtl`.
 */
import type { RequestState } from './state.js'

export class LeaseKeeper {
  private readonly held = new Set<RequestState>()
  private timer: NodeJS.Timeout | undefined

  constructor (private readonly lockTtl: number, private readonly logKey: (storeKey: string) => string) {}

  hold (state: RequestState): void {
    this.held.add(state)
    this.timer ??= setInterval(() => this.renewAll(), Math.floor(this.lockTtl / 3)).unref()
  }

  drop (state: RequestState): void {
    this.held.delete(state)
  }

  close (): void {
    clearInterval(this.timer)
  }

  renewAll (): void {
    for (const state of this.held) {
      // Held until completed or released: a handler that has ended still holds its claim
      // until onSend saves its result, and async preSerialization or onSend hooks may be slow.
      const { storeKey, request } = state
      const token = state.token as string
      // Called in an async function, so a store that throws synchronously rejects instead of crashing the timer.
      ;(async () => state.route.store.renew(storeKey, token, this.lockTtl))().then((renewed) => {
        if (!renewed && state.token === token) {
          request.log.error({ idempotencyKey: this.logKey(storeKey) }, 'idempotency: the lease of a running handler was lost; its response will not be saved')
        }
      }, (err: unknown) => {
        request.log.error({ err, idempotencyKey: this.logKey(storeKey) }, 'idempotency: lease renewal failed')
      })
    }
  }
}
