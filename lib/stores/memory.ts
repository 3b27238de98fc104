/**
 * The in-process store: correct for one process, bounded in claims, records
 * and bytes, and O(1) per operation.
 *
 * One Map finds an entry by key. Each entry is also linked, through its own
 * `prev` and `next`, into one of two queues:
 * - `claims` (in flight), in the order of their last claim or renewal. When
 *   every claim uses the same lockTtl, that is their order of expiry, so the
 *   expired ones are at the front; the sweeper catches the others.
 * - `records` (completed), least recently used first: eviction takes the
 *   front, a replay moves a record to the back.
 * (A Map's own insertion order would be slow for it: see queue.ts.)
 *
 * In-flight claims are never evicted: that could let a duplicate run. Beyond
 * `maxClaims` a new key is refused instead (`StoreFullError`), and completed
 * records, which hold their own bounds, never pay for the claims.
 *
 * Expiry needs no timer per key: every read checks `expiresAt`, and one
 * unref'd sweeper frees expired entries between reads.
 */
import { inspect } from 'node:util'
import { StoreFullError } from '../errors.js'
import { Queue } from '../queue.js'
import type { ClaimResult, IdempotencyRecord, IdempotencyStore, StoredResponse, StoreUsage } from '../../types/index.js'

export interface MemoryStoreOptions {
  /** Most completed records kept; the least recently used are evicted beyond it. Default 10 000. */
  maxRecords?: number
  /**
   * Most bytes of completed records kept (bodies, header names and values,
   * fingerprints, keys and a fixed overhead per record); the least recently
   * used are evicted beyond it. Default 64 MiB.
   */
  maxBytes?: number
  /** Most claims in flight; a claim of a new key beyond it throws `StoreFullError`. Default 10 000. */
  maxClaims?: number
  /** How often expired entries are swept, in ms. Default 60 000. */
  sweepInterval?: number
  /** The clock, in ms. Default `Date.now`. */
  now?: () => number
}

const IN_FLIGHT = 'in-flight'
const COMPLETED = 'completed'

/**
 * What a completed record costs beyond its text, in bytes: the entry, its Map
 * slot, the response and headers objects, and the shared claim result once
 * a duplicate made it (measured on Node 20 with one header: about 260 bytes,
 * 340 with the claim result).
 */
export const RECORD_OVERHEAD = 320

/** The last three digits of a token, `'000'` to `'999'`. */
const TAILS = Array.from({ length: 1000 }, (_, i) => String(i).padStart(3, '0'))

class Entry {
  state: typeof IN_FLIGHT | typeof COMPLETED = IN_FLIGHT
  response: StoredResponse | undefined = undefined
  /** The bytes accounted to this record once it is completed. */
  bytes = 0
  prev: Entry | undefined = undefined
  next: Entry | undefined = undefined
  /**
   * The claim result for duplicates, made on the first duplicate after a state
   * change (most keys never see one), then shared by every later hit. It holds
   * a plain frozen record: never the entry, whose token would let a duplicate
   * complete or release the owner's claim, and no holder can alter what the
   * next one gets.
   */
  private shared: { readonly record: IdempotencyRecord } | undefined = undefined

  constructor (
    readonly key: string,
    readonly fingerprint: string | undefined,
    /** The claim's fencing token; '' once completed (a record kept for long keeps no more than it needs). */
    public token: string,
    public expiresAt: number
  ) {}

  get asClaimResult (): { readonly record: IdempotencyRecord } {
    if (this.shared === undefined) {
      const record: IdempotencyRecord = this.state === COMPLETED
        ? { state: COMPLETED, fingerprint: this.fingerprint, response: this.response as StoredResponse }
        : { state: IN_FLIGHT, fingerprint: this.fingerprint }
      this.shared = Object.freeze({ record: Object.freeze(record) })
    }
    return this.shared
  }

  completeWith (response: StoredResponse, expiresAt: number, bytes: number): void {
    this.state = COMPLETED
    this.token = ''
    this.response = response
    this.shared = undefined
    this.expiresAt = expiresAt
    this.bytes = bytes
  }
}

export class MemoryStore implements IdempotencyStore {
  readonly maxRecords: number
  readonly maxBytes: number
  readonly maxClaims: number
  /**
   * Called synchronously with the key of each completed record evicted before
   * its ttl (a retry of that key will run its handler again), once the store
   * no longer holds it. It must not throw: it runs inside `complete()`.
   */
  onEviction: ((key: string) => void) | undefined = undefined
  private readonly entries = new Map<string, Entry>()
  private readonly claimQueue = new Queue<Entry>()
  private readonly recordQueue = new Queue<Entry>()
  private bytes = 0
  private evictions = 0
  /** The last token is `tokenPrefix + TAILS[tokenTail]`, where the prefix is `tokenMs` in decimal. */
  private tokenMs = 0
  private tokenTail = 999
  private tokenPrefix = '0'
  private readonly now: () => number
  private readonly sweeper: NodeJS.Timeout

  constructor (options: MemoryStoreOptions = {}) {
    const { maxRecords = 10_000, maxBytes = 64 * 1024 * 1024, maxClaims = 10_000, sweepInterval = 60_000, now = Date.now } = options
    positiveInteger('maxRecords', maxRecords)
    positiveInteger('maxBytes', maxBytes)
    positiveInteger('maxClaims', maxClaims)
    positiveInteger('sweepInterval', sweepInterval, ' (ms)')
    if (typeof now !== 'function') throw new TypeError('MemoryStore: now must be a function that returns the time in ms')
    this.maxRecords = maxRecords
    this.maxBytes = maxBytes
    this.maxClaims = maxClaims
    this.now = now
    this.sweeper = setInterval(() => this.sweep(), sweepInterval).unref()
  }

  /** Entries held, claims and records, expired ones not yet swept included. */
  get size (): number {
    return this.entries.size
  }

  claim (key: string, fingerprint: string | undefined, lockTtl: number): ClaimResult {
    const now = this.now()
    const entry = this.live(key, now)
    if (entry !== undefined) {
      if (entry.state === COMPLETED) this.recordQueue.toBack(entry)
      return entry.asClaimResult
    }
    if (this.claimQueue.length >= this.maxClaims) {
      this.dropExpiredClaims(now)
      if (this.claimQueue.length >= this.maxClaims) throw new StoreFullError()
    }
    const token = this.nextToken(now)
    const claim = new Entry(key, fingerprint, token, now + lockTtl)
    this.entries.set(key, claim)
    this.claimQueue.push(claim)
    return { token }
  }

  complete (key: string, token: string, response: StoredResponse, ttl: number | null): boolean {
    const now = this.now()
    const entry = this.claimed(key, token, now)
    if (entry === undefined) return false
    this.claimQueue.remove(entry)
    entry.completeWith(response, ttl === null ? Infinity : now + ttl, recordBytes(key, entry.fingerprint, response))
    this.recordQueue.push(entry)
    this.bytes += entry.bytes
    this.evictFor(entry, now)
    return true
  }

  release (key: string, token: string): boolean {
    const entry = this.claimed(key, token, this.now())
    if (entry === undefined) return false
    this.drop(entry)
    return true
  }

  renew (key: string, token: string, lockTtl: number): boolean {
    const now = this.now()
    const entry = this.claimed(key, token, now)
    if (entry === undefined) return false
    entry.expiresAt = now + lockTtl
    this.claimQueue.toBack(entry)
    return true
  }

  /** The live record of `key`; a completed one counts as used, as on a replay. */
  lookup (key: string): IdempotencyRecord | undefined {
    const entry = this.live(key, this.now())
    if (entry === undefined) return undefined
    if (entry.state === COMPLETED) this.recordQueue.toBack(entry)
    return entry.asClaimResult.record
  }

  /** Counts and bytes as accounted, expired entries not yet swept included. */
  usage (): StoreUsage {
    return {
      records: this.recordQueue.length,
      inFlight: this.claimQueue.length,
      bytes: this.bytes,
      maxBytes: this.maxBytes,
      evictions: this.evictions,
      estimated: false
    }
  }

  close (): void {
    clearInterval(this.sweeper)
  }

  /** Deletes every expired entry. */
  sweep (): void {
    const now = this.now()
    for (const queue of [this.claimQueue, this.recordQueue]) {
      for (let entry = queue.head; entry !== undefined;) {
        const next = entry.next
        if (entry.expiresAt <= now) this.drop(entry)
        entry = next
      }
    }
  }

  /** The entry of `key` unless it has expired (an expired one is dropped on the way). */
  private live (key: string, now: number): Entry | undefined {
    const entry = this.entries.get(key)
    if (entry === undefined || entry.expiresAt > now) return entry
    this.drop(entry)
    return undefined
  }

  /** The in-flight entry of `key` if `token` still holds its claim. */
  private claimed (key: string, token: string, now: number): Entry | undefined {
    const entry = this.live(key, now)
    return entry !== undefined && entry.state === IN_FLIGHT && entry.token === token ? entry : undefined
  }

  private drop (entry: Entry): void {
    this.entries.delete(entry.key)
    if (entry.state === IN_FLIGHT) {
      this.claimQueue.remove(entry)
    } else {
      this.recordQueue.remove(entry)
      this.bytes -= entry.bytes
    }
  }

  /** Drops expired claims from the front, where they are when every claim has the same lockTtl. */
  private dropExpiredClaims (now: number): void {
    for (let head = this.claimQueue.head; head !== undefined && head.expiresAt <= now; head = this.claimQueue.head) this.drop(head)
  }

  /**
   * Evicts the least recently used records until the bounds hold again, or
   * only `saved`, the record just saved, is left: a response is never lost the
   * moment it is saved, even one larger than `maxBytes`.
   */
  private evictFor (saved: Entry, now: number): void {
    while (this.recordQueue.length > this.maxRecords || this.bytes > this.maxBytes) {
      const oldest = this.recordQueue.head as Entry
      if (oldest === saved) return
      this.drop(oldest)
      // An expired record was due to go anyway: no retry loses its response.
      if (oldest.expiresAt > now) {
        this.evictions++
        this.onEviction?.(oldest.key)
      }
    }
  }

  /**
   * A token larger than any before it, and than the last one of an earlier
   * process in practice: the clock in µs, `max(ms, 1) * 1000`, or one more
   * than the last token when that is larger. It is written as the ms followed
   * by three digits, because turning a 16-digit number into a string costs
   * more than the rest of a claim; the ms is converted at most once a ms.
   */
  private nextToken (now: number): string {
    const ms = Math.max(Math.floor(now), 1)
    if (ms > this.tokenMs) {
      this.tokenMs = ms
      this.tokenTail = 0
    } else if (++this.tokenTail === 1000) {
      this.tokenMs++
      this.tokenTail = 0
    } else {
      return this.tokenPrefix + TAILS[this.tokenTail]
    }
    this.tokenPrefix = String(this.tokenMs)
    return this.tokenPrefix + TAILS[0]
  }
}

/**
 * The bytes a completed record accounts for. Header text is Latin-1 (one byte
 * a character, in V8 and on the wire); a string body counts its UTF-8 bytes,
 * as it is sent.
 */
function recordBytes (key: string, fingerprint: string | undefined, response: StoredResponse): number {
  let bytes = RECORD_OVERHEAD + key.length + (fingerprint === undefined ? 0 : fingerprint.length)
  for (const name in response.headers) {
    const value = response.headers[name]
    bytes += name.length
    if (typeof value === 'string') {
      bytes += value.length
    } else {
      for (const item of value) bytes += item.length
    }
  }
  const { body } = response
  return bytes + (typeof body === 'string' ? Buffer.byteLength(body) : body.byteLength)
}

function positiveInteger (name: string, value: unknown, unit = ''): void {
  if (!Number.isInteger(value) || (value as number) < 1) {
    throw new TypeError(`MemoryStore: ${name} must be a positive integer${unit}, got ${inspect(value)}`)
  }
}
