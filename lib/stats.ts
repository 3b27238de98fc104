/**
 * Counters per route and outcome. A request only increments a field of its
 * route's pending counters (no allocation, no store call); a timer sends the
 * pending counts to a shared store (one `addStats` call per flush interval,
 * off the request path) so that they add up across processes. Stores without
 * `addStats` and `readStats` (the memory store) have their stats kept here,
 * in-process: the same timer moves the pending counts into the in-process
 * totals, so that `stats.ttl` counts from their last change, as in Redis, not
 * from a read.
 */
import type { StatsSettings } from './options.js'
import type { IdempotencyStats, IdempotencyStore, RouteCounters, StatsCounts, StoreUsage } from '../types/index.js'

export const COUNTERS = ['executed', 'replayed', 'conflicts', 'mismatches', 'missingKeys', 'invalidKeys', 'storeErrors'] as const

export function emptyCounters (): RouteCounters {
  return { executed: 0, replayed: 0, conflicts: 0, mismatches: 0, missingKeys: 0, invalidKeys: 0, storeErrors: 0, lastDuplicateAt: 0 }
}

/** Adds `from` into `into`; `lastDuplicateAt` keeps the latest. */
export function addCounters (into: RouteCounters, from: RouteCounters): void {
  for (const name of COUNTERS) into[name] += from[name]
  if (from.lastDuplicateAt > into.lastDuplicateAt) into.lastDuplicateAt = from.lastDuplicateAt
}

export class Stats {
  /** Counts not yet sent to the store, per route; requests write here. */
  private readonly pending = new Map<string, RouteCounters>()
  /** Whether the store keeps the stats (both `addStats` and `readStats`); otherwise they are kept here. */
  private readonly shared: boolean
  /** In-process totals, when the store does not keep them. */
  private local: StatsCounts = {}
  private localChangedAt = 0
  /** Only while counting (not with `stats: false`). */
  private readonly timer: NodeJS.Timeout | undefined

  constructor (
    private readonly store: IdempotencyStore,
    private readonly settings: StatsSettings,
    private readonly onFlushError: (err: unknown) => void,
    private readonly now: () => number = Date.now
  ) {
    this.shared = store.addStats !== undefined && store.readStats !== undefined
    this.timer = settings.counting
      ? setInterval(() => { this.flush().catch(this.onFlushError) }, settings.flushInterval).unref()
      : undefined
  }

  /** The pending counters of a route, made once when the route is added. */
  counters (route: string): RouteCounters {
    let counters = this.pending.get(route)
    if (counters === undefined) {
      counters = emptyCounters()
      this.pending.set(route, counters)
    }
    return counters
  }

  /** Moves the pending counts into the store (or the in-process totals). */
  async flush (): Promise<void> {
    const now = this.now()
    const counts: StatsCounts = {}
    let any = false
    for (const [route, counters] of this.pending) {
      if (!COUNTERS.some((name) => counters[name] > 0)) continue
      counts[route] = { ...counters }
      Object.assign(counters, emptyCounters())
      any = true
    }
    if (!this.shared) {
      if (now - this.localChangedAt > this.settings.ttl) this.local = {}
      if (!any) return
      for (const route in counts) addCounters(this.local[route] ??= emptyCounters(), counts[route])
      this.localChangedAt = now
      return
    }
    if (any) await this.store.addStats!(counts, this.settings.ttl)
  }

  async read (): Promise<IdempotencyStats> {
    await this.flush()
    const counts = this.shared ? await this.store.readStats!() : this.local
    const usage: StoreUsage = this.store.usage === undefined
      ? { records: 0, bytes: undefined, estimated: true }
      : await this.store.usage()
    const totals = { ...emptyCounters(), duplicates: 0 }
    const routes: IdempotencyStats['routes'] = []
    for (const route in counts) {
      const counters = counts[route]
      const duplicates = counters.replayed + counters.conflicts + counters.mismatches
      routes.push({ route, ...counters, duplicates })
      addCounters(totals, counters)
      totals.duplicates += duplicates
    }
    routes.sort((a, b) => b.duplicates - a.duplicates || b.lastDuplicateAt - a.lastDuplicateAt || a.route.localeCompare(b.route))
    const found: string[] = []
    if (usage.records > this.settings.warnRecords) {
      found.push(`The store holds ${usage.records} records, more than ${this.settings.warnRecords}: check ttl, or that keys are not generated per attempt.`)
    }
    if (usage.bytes !== undefined && usage.maxBytes !== undefined && usage.bytes > 0.9 * usage.maxBytes) {
      found.push(`The store uses ${Math.round(100 * usage.bytes / usage.maxBytes)}% of its memory bound.`)
    }
    if (usage.evictions !== undefined && usage.evictions > 0) {
      found.push(`${usage.evictions} saved responses were evicted before their ttl: a retry of one of them runs the handler again.`)
    }
    if (usage.warnings !== undefined) found.push(...usage.warnings)
    return { routes, totals, store: usage, warning: found.length === 0 ? undefined : found.join(' ') }
  }

  /** Stops the timer and sends what is pending; a failure is reported, never thrown. */
  close (): Promise<void> {
    clearInterval(this.timer)
    return this.flush().catch(this.onFlushError)
  }
}
