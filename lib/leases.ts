/**
 * Lease renewal: while a handler runs, its claim is extended every
 * `lockTtl / 3`, so a slow handler never loses its key to a duplicate. One
 * unref'd timer per plugin renews every running claim; a request only joins
 * and leaves a Set. A process that dies stops renewing, and its claims expire
 * after `lockTtl`.
 */
import { CLAIMED, DONE, type RequestState } from './state.js'

export class LeaseKeeper {
  private readonly held = new Set<RequestState>()
  private timer: NodeJS.Timeout | undefined

  constructor (private readonly lockTtl: number) {}

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
      // Only running handlers are renewed: a claim whose handler never started, or
      // whose reply went out without a result (hijacked), is left to expire.
      if (state.phase === CLAIMED || state.phase === DONE || state.token === undefined) continue
      const { storeKey, token, request } = state
      Promise.resolve(state.route.store.renew(storeKey, token, this.lockTtl)).then((renewed) => {
        if (!renewed && state.token === token) {
          request.log.error({ idempotencyKey: storeKey }, 'idempotency: the lease of a running handler was lost; its response will not be saved')
        }
      }, (err: unknown) => {
        request.log.error({ err, idempotencyKey: storeKey }, 'idempotency: lease renewal failed')
      })
    }
  }
}
