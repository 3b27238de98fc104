/**
 * What every part of the benchmark agrees on: the configurations, the
 * scenarios, the request every configuration receives, and the messages the
 * orchestrator (run.ts), the servers (server.ts) and the load generator
 * (load.ts) exchange over IPC.
 */
import { fileURLToPath } from 'node:url'

/** The repository's root directory. */
export const ROOT = fileURLToPath(new URL('..', import.meta.url))

/** One server set-up under test. `baseline` names the bare framework its ratios are taken against. */
export interface Configuration {
  name: string
  framework: 'fastify' | 'express'
  baseline: string
  redis: boolean
  /** Also a Redis replica of that redis-server, in sync before the server starts. */
  replica?: boolean
  /** A PostgreSQL server of the run's own. */
  postgres?: boolean
  /**
   * This plugin's configurations: per scenario, the configuration that does only
   * the work the plugin cannot avoid there, and that its CPU per request is read
   * against (bench/README.md, "Floors").
   */
  floor?: Record<ScenarioName, string>
}

/** First requests (fresh, mix) need a claim and a save; a replay that misses the replay cache needs one claim. */
const REDIS_FLOOR: Record<ScenarioName, string> = { fresh: 'floor-2', hot: 'floor-1', keys1000: 'floor-1', mix: 'floor-2' }
const BARE_FLOOR: Record<ScenarioName, string> = { fresh: 'fastify', hot: 'fastify', keys1000: 'fastify', mix: 'fastify' }

/** In the order of the tables. bench/README.md says what each one is and how it is wired. */
export const CONFIGURATIONS: Configuration[] = [
  { name: 'fastify', framework: 'fastify', baseline: 'fastify', redis: false },
  { name: 'floor-1', framework: 'fastify', baseline: 'fastify', redis: true },
  { name: 'floor-2', framework: 'fastify', baseline: 'fastify', redis: true },
  { name: 'idempotency-memory', framework: 'fastify', baseline: 'fastify', redis: false, floor: BARE_FLOOR },
  { name: 'idempotency-redis', framework: 'fastify', baseline: 'fastify', redis: true, floor: REDIS_FLOOR },
  { name: 'idempotency-redis-nocache', framework: 'fastify', baseline: 'fastify', redis: true, floor: REDIS_FLOOR },
  { name: 'idempotency-redis-replicas', framework: 'fastify', baseline: 'fastify', redis: true, replica: true, floor: REDIS_FLOOR },
  { name: 'idempotency-postgres', framework: 'fastify', baseline: 'fastify', redis: false, postgres: true },
  { name: 'node-idem-memory', framework: 'fastify', baseline: 'fastify', redis: false },
  { name: 'node-idem-redis', framework: 'fastify', baseline: 'fastify', redis: true },
  { name: 'powertools-redis', framework: 'fastify', baseline: 'fastify', redis: true },
  { name: 'rate-limit', framework: 'fastify', baseline: 'fastify', redis: false },
  { name: 'rate-limit-redis', framework: 'fastify', baseline: 'fastify', redis: true },
  { name: 'express', framework: 'express', baseline: 'express', redis: false },
  { name: 'express-idempotency', framework: 'express', baseline: 'express', redis: false }
]

/** The floors a configuration is read against, in any scenario; the report shows them all. */
export function floorsOf (c: Configuration): string[] {
  return c.floor === undefined ? [] : [...new Set(Object.values(c.floor))]
}

export function configuration (name: string): Configuration {
  const found = CONFIGURATIONS.find((c) => c.name === name)
  if (found === undefined) throw new Error(`unknown configuration ${name}`)
  return found
}

export type ScenarioName = 'fresh' | 'hot' | 'keys1000' | 'mix'

export interface Scenario {
  name: ScenarioName
  /** Keys sent once each before the warm-up, so that the measured requests are replays. */
  seedKeys: number
}

/** bench/README.md says what each one sends. */
export const SCENARIOS: Scenario[] = [
  { name: 'fresh', seedKeys: 0 },
  { name: 'hot', seedKeys: 1 },
  { name: 'keys1000', seedKeys: 1000 },
  { name: 'mix', seedKeys: 0 }
]

export function scenario (name: ScenarioName): Scenario {
  return SCENARIOS.find((s) => s.name === name) as Scenario
}

export const ROUTE = '/orders'
export const KEY_HEADER = 'idempotency-key'
/** The small JSON body every request carries. */
export const REQUEST_BODY = JSON.stringify({ item: 'sku-4711', quantity: 2, unitPrice: 1999, currency: 'EUR', customer: 'cus_8c1f3b' })

export interface OrderInput {
  item: string
  quantity: number
  unitPrice: number
  currency: string
  customer: string
}

/** The route's logic, shared by every configuration: about 200 bytes of JSON out. */
export function orderFor (input: OrderInput, sequence: number): Record<string, unknown> {
  return {
    id: 'ord_' + sequence.toString(36).padStart(10, '0'),
    status: 'accepted',
    item: input.item,
    quantity: input.quantity,
    unitPrice: input.unitPrice,
    total: input.quantity * input.unitPrice,
    currency: input.currency,
    customer: input.customer,
    createdAt: new Date().toISOString()
  }
}

/** What a server reports about itself, between two loads. */
export interface ServerStats {
  /** process.cpuUsage() user + system, µs, since the process started. */
  cpuMicros: number
  /** Time spent in garbage collection (the 'gc' performance entries), µs, since the process started. */
  gcMicros: number
  /** The monotonic clock, µs: the clock of a CPU profile's timestamps (profile.ts cuts the measured window out of it). */
  clockMicros: number
  /** Requests the server has taken in (its 'request' events), including those the load generator stopped waiting for. */
  requests: number
  handlerRuns: number
  rss: number
  heapUsed: number
  /** With verify on: requests that reached the server with a key, and how many distinct keys they held. */
  keyedRequests?: number
  distinctRequestKeys?: number
  /** With verify on: distinct keys the handler ran for (handlerRuns - this = runs for a key already run). */
  distinctHandlerKeys?: number
  /** Completed records in the store, when the configuration can tell. */
  storeRecords?: number
}

export type ToServer =
  | { type: 'stats', id: number }
  | { type: 'gc', id: number }
  | { type: 'stop' }
export type FromServer =
  | { type: 'listening', port: number }
  | { type: 'stats', id: number, stats: ServerStats }
  | { type: 'error', message: string }

export interface LoadRequest {
  type: 'run'
  id: number
  url: string
  scenario: ScenarioName
  /** Seconds of load; ignored when `amount` is set. */
  duration: number
  amount?: number
  connections: number
  /** Key prefix that no other load of this run uses. */
  prefix: string
  /** For 'seed': send these keys once each, in order. */
  seed?: boolean
  /** Ask for a 'progress' message every this many responses. */
  progressEvery?: number
}

export interface LoadResult {
  requests: number
  non2xx: number
  errors: number
  timeouts: number
  seconds: number
  rps: number
  /** Latency percentiles in ms, at 10 µs resolution. */
  p50: number
  p99: number
  /** Keys handed out by setupRequest (fresh keys plus retries). */
  keysSent: number
  /** The load generator's own CPU (user + system) during the run, µs. */
  cpuMicros: number
  statusCodes: Record<string, number>
}

export type ToLoad = LoadRequest | { type: 'exit' }
export type FromLoad = { type: 'ready' } | { type: 'result', id: number, result: LoadResult } | { type: 'progress', id: number, responses: number } | { type: 'error', id: number, message: string }
