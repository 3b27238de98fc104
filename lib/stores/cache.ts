/**
 * The replay cache: a per-process copy of completed records of a shared
 * store (Redis, Postgres). A completed record never changes until it
 * expires, so a process that has fetched one (a claim returned it: a replay
 * it asked the store for) can replay it again without a round trip, as long
 * as its copy expires no later than the record in the store. Copies are kept
 * on the monotonic clock from the moment the store call was sent, so a copy
 * always expires before the store's record; only what the store returned
 * completed is kept, never an in-flight claim. Bounded by bytes, least
 * recently used first.
 *
 * The process's own saves are not copied: most keys are never sent again,
 * and a copy of each would keep every response alive for a while, which the
 * garbage collector pays for on every first request. A key sent again costs
 * one claim, which brings the record back and copies it.
 *
 * The cache wraps the store: claims of cached keys answer at once, without a
 * promise; everything else goes to the store.
 */
import { Queue, type Linked } from '../queue.js'
import { isThenable } from '../thenable.js'
import type { ClaimResult, IdempotencyRecord, IdempotencyStore, MaybePromise, StoredResponse } from '../../types/index.js'

class Copy implements Linked<Copy> {
  prev: Copy | undefined = undefined
  next: Copy | undefined = undefined

  constructor (
    readonly key: string,
    /** The answer to a claim of this key: the completed record. */
    readonly result: { readonly record: IdempotencyRecord },
    readonly expiresAt: number,
    readonly bytes: number
  ) {}
}

/** A rough size of a copy: its body, headers and key, plus a fixed overhead. */
function sizeOf (key: string, response: StoredResponse, fingerprint: string | undefined): number {
  let bytes = 200 + key.length + (fingerprint?.length ?? 0) +
    (typeof response.body === 'string' ? response.body.length * 2 : response.body.length)
  for (const name in response.headers) bytes += name.length + String(response.headers[name]).length
  return bytes
}

export class ReplayCache implements IdempotencyStore {
  private readonly copies = new Map<string, Copy>()
  /** Least recently used first. */
  private readonly used = new Queue<Copy>()
  private bytes = 0
  /** Claims answered from a copy (for tests). */
  hits = 0
  readonly complete: IdempotencyStore['complete']
  readonly release: IdempotencyStore['release']
  readonly renew: IdempotencyStore['renew']
  readonly lookup?: IdempotencyStore['lookup']
  readonly completeWith?: IdempotencyStore['completeWith']

  constructor (readonly store: IdempotencyStore, readonly maxBytes: number) {
    const { lookup, completeWith } = store
    this.complete = store.complete.bind(store)
    this.release = store.release.bind(store)
    this.renew = store.renew.bind(store)
    if (lookup !== undefined) this.lookup = (key) => this.get(key)?.result.record ?? lookup.call(store, key)
    if (completeWith !== undefined) this.completeWith = completeWith.bind(store)
  }

  claim (key: string, fingerprint: string | undefined, lockTtl: number): MaybePromise<ClaimResult> {
    const copy = this.get(key)
    if (copy !== undefined) {
      this.hits++
      return copy.result
    }
    const sentAt = performance.now()
    const claimed = this.store.claim(key, fingerprint, lockTtl)
    if (!isThenable(claimed)) return this.learn(key, sentAt, claimed)
    return claimed.then((result) => this.learn(key, sentAt, result))
  }

  /** Bytes held (for tests and stats). */
  get size (): number {
    return this.bytes
  }

  /** Copies a completed record a claim returned. */
  private learn (key: string, sentAt: number, result: ClaimResult): ClaimResult {
    const { record } = result
    if (record?.state === 'completed' && record.expiresIn !== undefined) this.put(key, record, sentAt + record.expiresIn)
    return result
  }

  private get (key: string): Copy | undefined {
    const copy = this.copies.get(key)
    if (copy === undefined) return undefined
    if (copy.expiresAt <= performance.now()) {
      this.drop(copy)
      return undefined
    }
    this.used.toBack(copy)
    return copy
  }

  private put (key: string, record: IdempotencyRecord & { state: 'completed' }, expiresAt: number): void {
    const bytes = sizeOf(key, record.response, record.fingerprint)
    if (bytes > this.maxBytes) return
    const previous = this.copies.get(key)
    if (previous !== undefined) this.drop(previous)
    // The copy answers claims as the store would; it never needs its remaining time.
    const copy = new Copy(key, { record: { state: 'completed', fingerprint: record.fingerprint, response: record.response } }, expiresAt, bytes)
    this.copies.set(key, copy)
    this.used.push(copy)
    this.bytes += bytes
    // The copy just kept fits, so the loop stops before it.
    while (this.bytes > this.maxBytes) this.drop(this.used.head as Copy)
  }

  private drop (copy: Copy): void {
    this.copies.delete(copy.key)
    this.used.remove(copy)
    this.bytes -= copy.bytes
  }
}
