/**
 * The in-process store: correct for one process, bounded, with lazy expiry.
 *
 * Records live in two generations of Maps (the scheme of a two-generation
 * LRU): lookups and inserts go to `current`; a hit in `previous` moves the
 * record up once, so a hot key costs one Map lookup per hit and no
 * reinsertion. When `current` fills, it becomes `previous` and the old
 * `previous` is dropped in one batch: the least recently used completed
 * records go first. In-flight claims are never dropped (that could let a
 * duplicate run); they are carried into the new generation instead.
 *
 * Expiry needs no timer per key: every read checks `expiresAt`, and one
 * unref'd sweeper frees expired records between reads.
 */
import type { ClaimResult, CompletedRecord, IdempotencyStore, InFlightRecord, StoredResponse, StoreUsage } from '../../types/index.js'

export interface MemoryStoreOptions {
  /** Most records kept; the least recently used completed ones are evicted beyond it. Default 10 000. */
  maxRecords?: number
  /** How often expired records are swept, in ms. Default 60 000. */
  sweepInterval?: number
  /** The clock, in ms. Default `Date.now`. */
  now?: () => number
}

const IN_FLIGHT = 'in-flight'
const COMPLETED = 'completed'

class Entry {
  state: typeof IN_FLIGHT | typeof COMPLETED = IN_FLIGHT
  response: StoredResponse | undefined = undefined
  /**
   * The claim result for duplicates, made on the first duplicate after a state
   * change (most keys never see one), then shared by every later hit. It holds
   * a plain record: never the entry, whose token would let a duplicate
   * complete or release the owner's claim.
   */
  private result: ClaimResult | undefined = undefined

  constructor (
    readonly fingerprint: string | undefined,
    readonly token: string,
    public expiresAt: number
  ) {}

  get asClaimResult (): ClaimResult {
    if (this.result === undefined) {
      const record: InFlightRecord | CompletedRecord = this.state === COMPLETED
        ? { state: COMPLETED, fingerprint: this.fingerprint, response: this.response as StoredResponse }
        : { state: IN_FLIGHT, fingerprint: this.fingerprint }
      this.result = { record }
    }
    return this.result
  }

  completeWith (response: StoredResponse, expiresAt: number): void {
    this.state = COMPLETED
    this.response = response
    this.result = undefined
    this.expiresAt = expiresAt
  }
}

export class MemoryStore implements IdempotencyStore {
  readonly maxRecords: number
  private current = new Map<string, Entry>()
  private previous = new Map<string, Entry>()
  private readonly generationSize: number
  private readonly now: () => number
  private readonly sweeper: NodeJS.Timeout
  private sequence = 0

  constructor (options: MemoryStoreOptions = {}) {
    const maxRecords = options.maxRecords ?? 10_000
    const sweepInterval = options.sweepInterval ?? 60_000
    if (!Number.isInteger(maxRecords) || maxRecords < 2) {
      throw new TypeError('MemoryStore: maxRecords must be an integer of at least 2')
    }
    if (!Number.isInteger(sweepInterval) || sweepInterval < 1) {
      throw new TypeError('MemoryStore: sweepInterval must be a positive integer (ms)')
    }
    this.maxRecords = maxRecords
    this.generationSize = Math.floor(maxRecords / 2)
    this.now = options.now ?? Date.now
    this.sweeper = setInterval(() => this.sweep(), sweepInterval).unref()
  }

  /** Records held, expired ones not yet swept included. */
  get size (): number {
    return this.current.size + this.previous.size
  }

  claim (key: string, fingerprint: string | undefined, lockTtl: number): ClaimResult {
    const now = this.now()
    const existing = this.lookup(key, now)
    if (existing !== undefined) return existing.asClaimResult
    const token = String(++this.sequence)
    this.insert(key, new Entry(fingerprint, token, now + lockTtl))
    return { token }
  }

  complete (key: string, token: string, response: StoredResponse, ttl: number | null): boolean {
    const now = this.now()
    const entry = this.claimed(key, token, now)
    if (entry === undefined) return false
    entry.completeWith(response, ttl === null ? Infinity : now + ttl)
    // Just written, so most recently used: out of the generation that is dropped next.
    if (this.previous.delete(key)) this.insert(key, entry)
    return true
  }

  release (key: string, token: string): boolean {
    if (this.claimed(key, token, this.now()) === undefined) return false
    if (!this.current.delete(key)) this.previous.delete(key)
    return true
  }

  renew (key: string, token: string, lockTtl: number): boolean {
    const now = this.now()
    const entry = this.claimed(key, token, now)
    if (entry === undefined) return false
    entry.expiresAt = now + lockTtl
    return true
  }

  /** Records held (expired ones not yet swept included); their memory is not measured. */
  usage (): StoreUsage {
    return { records: this.size, bytes: undefined, estimated: false }
  }

  close (): void {
    clearInterval(this.sweeper)
  }

  /** Deletes every expired record. */
  sweep (): void {
    const now = this.now()
    for (const generation of [this.current, this.previous]) {
      for (const [key, entry] of generation) {
        if (entry.expiresAt <= now) generation.delete(key)
      }
    }
  }

  /** The live record for `key`, moved into the current generation if it was in the previous one. */
  private lookup (key: string, now: number): Entry | undefined {
    let entry = this.current.get(key)
    if (entry !== undefined) {
      if (entry.expiresAt > now) return entry
      this.current.delete(key)
      return undefined
    }
    entry = this.previous.get(key)
    if (entry === undefined) return undefined
    this.previous.delete(key)
    if (entry.expiresAt <= now) return undefined
    this.insert(key, entry)
    return entry
  }

  /** The in-flight entry for `key` if `token` still holds its claim. */
  private claimed (key: string, token: string, now: number): Entry | undefined {
    const entry = this.current.get(key) ?? this.previous.get(key)
    if (entry === undefined || entry.state !== IN_FLIGHT || entry.token !== token || entry.expiresAt <= now) {
      return undefined
    }
    return entry
  }

  private insert (key: string, entry: Entry): void {
    this.current.set(key, entry)
    if (this.current.size >= this.generationSize) this.rotate()
  }

  /** Drops the previous generation in one batch, keeping its live in-flight claims. */
  private rotate (): void {
    const next = new Map<string, Entry>()
    const now = this.now()
    for (const [key, entry] of this.previous) {
      if (entry.state === IN_FLIGHT && entry.expiresAt > now) next.set(key, entry)
    }
    this.previous = this.current
    this.current = next
  }
}
