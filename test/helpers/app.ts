/**
 * Shared fixtures for the behaviour tests: an app with the plugin registered
 * and closed at teardown, a log capture, and stores that fail on demand.
 */
import './crash-guard.js'
import Fastify, { type FastifyInstance, type FastifyReply, type FastifyRequest, type FastifyServerOptions } from 'fastify'
import fastifyIdempotency, { MemoryStore } from '../../index.js'
import type { FastifyIdempotencyOptions, IdempotencyStore, StoredResponse } from '../../index.js'

/** The subset of a tap Test that the helpers need. */
export interface Teardown {
  teardown (fn: () => unknown): void
}

export interface LogLine {
  level: number
  msg: string
  err?: { message: string }
  idempotencyKey?: string
  [field: string]: unknown
}

/** A Fastify app with the plugin registered (not yet ready), closed when the test ends. */
export async function build (t: Teardown, options: FastifyIdempotencyOptions = {}, server: FastifyServerOptions = {}): Promise<FastifyInstance> {
  const app = Fastify(server)
  t.teardown(() => app.close())
  await app.register(fastifyIdempotency, options)
  return app
}

/** Fastify server options whose logger writes parsed lines into `lines`. */
export function capturingLogger (lines: LogLine[], level = 'info'): FastifyServerOptions {
  return {
    logger: {
      level,
      stream: { write (line: string) { lines.push(JSON.parse(line) as LogLine) } }
    }
  }
}

export const WARN = 40
export const ERROR = 50

/** Resolves after `ms` ms. */
export function sleep (ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms))
}

/** A promise with its resolve function, to hold a handler until the test lets it go. */
export function gate (): { promise: Promise<void>, open: () => void } {
  let open!: () => void
  const promise = new Promise<void>((resolve) => { open = resolve })
  return { promise, open }
}

/** What a held handler's answer can use: which run this is (1 for the first), its request and its reply. */
export interface HeldRun { run: number, request: FastifyRequest, reply: FastifyReply }

/** A route handler that counts its runs and holds each one (with `firstOnly`, only the first) until `open()`, then answers `answer`. */
export function heldHandler<T> (answer: T | ((held: HeldRun) => T), { firstOnly = false }: { firstOnly?: boolean } = {}): {
  handler: (request: FastifyRequest, reply: FastifyReply) => Promise<T>, runs: () => number, open: () => void
} {
  const { promise, open } = gate()
  let runs = 0
  const handler = async (request: FastifyRequest, reply: FastifyReply): Promise<T> => {
    const run = ++runs
    if (run === 1 || !firstOnly) await promise
    return typeof answer === 'function' ? (answer as (held: HeldRun) => T)({ run, request, reply }) : answer
  }
  return { handler, runs: () => runs, open }
}

/**
 * Resolves once `check` returns true, looking every 5 ms; throws, naming the
 * check, when it is still false after `tries` looks (2 s by default).
 */
export async function until (check: () => boolean, tries = 400): Promise<void> {
  for (let i = 0; i < tries; i++) {
    if (check()) return
    await sleep(5)
  }
  if (!check()) throw new Error(`until(): still false after ${tries} tries (${tries * 5} ms): ${check.toString()}`)
}

/** Waits until `check` (synchronous or not) holds, looking every 20 ms; throws, naming `what`, after `limit` ms. */
export async function eventually (what: string, check: () => boolean | Promise<boolean>, limit = 10_000): Promise<void> {
  const deadline = Date.now() + limit
  while (!await check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await sleep(20)
  }
}

/** A store of values (no promises) over a MemoryStore closed at the end of the test, with the methods in `replace` swapped in. */
export function valuesStore (t: Teardown, replace: Partial<IdempotencyStore> = {}): IdempotencyStore {
  const inner = new MemoryStore()
  t.teardown(() => inner.close())
  return {
    claim: (key, fingerprint, lockTtl) => inner.claim(key, fingerprint, lockTtl),
    complete: (key, token, response, ttl) => inner.complete(key, token, response, ttl),
    release: (key, token) => inner.release(key, token),
    renew: (key, token, lockTtl) => inner.renew(key, token, lockTtl),
    ...replace
  }
}

/**
 * A MemoryStore whose methods can be made to throw, and which counts calls.
 * `failing.claim = true` makes the next claims throw, and so on.
 */
export class FlakyStore implements IdempotencyStore {
  readonly inner = new MemoryStore()
  readonly failing = { claim: false, complete: false, release: false, renew: false }
  readonly calls = { claim: 0, complete: 0, release: 0, renew: 0 }

  claim (key: string, fingerprint: string | undefined, lockTtl: number) {
    this.calls.claim++
    if (this.failing.claim) throw new Error('store down (claim)')
    return this.inner.claim(key, fingerprint, lockTtl)
  }

  async complete (...args: Parameters<MemoryStore['complete']>) {
    this.calls.complete++
    if (this.failing.complete) throw new Error('store down (complete)')
    return this.inner.complete(...args)
  }

  async release (key: string, token: string) {
    this.calls.release++
    if (this.failing.release) throw new Error('store down (release)')
    return this.inner.release(key, token)
  }

  async renew (key: string, token: string, lockTtl: number) {
    this.calls.renew++
    if (this.failing.renew) throw new Error('store down (renew)')
    return this.inner.renew(key, token, lockTtl)
  }

  close () {
    this.inner.close()
  }
}

/** A MemoryStore that records what the plugin asks of it. */
export class RecordingStore extends MemoryStore {
  claims: Array<{ key: string, fingerprint: string | undefined, lockTtl: number }> = []
  completes: Array<{ key: string, ttl: number | null, response: StoredResponse }> = []
  releases: string[] = []

  claim (key: string, fingerprint: string | undefined, lockTtl: number) {
    this.claims.push({ key, fingerprint, lockTtl })
    return super.claim(key, fingerprint, lockTtl)
  }

  complete (key: string, token: string, response: StoredResponse, ttl: number | null) {
    this.completes.push({ key, ttl, response })
    return super.complete(key, token, response, ttl)
  }

  release (key: string, token: string) {
    this.releases.push(key)
    return super.release(key, token)
  }
}
