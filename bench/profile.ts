/**
 * Where a server's CPU goes, read off its CPU profile (`--profile`): the
 * samples taken while the measured load ran, grouped by whose code was on top
 * of the stack (its self time), in µs per request.
 *
 * A profile's timestamps are the monotonic clock in µs, the clock of the
 * server's `clockMicros`, so the measured window is cut out of the whole
 * process' profile (start-up, seeding and warm-up left out).
 */
import { readFileSync } from 'node:fs'
import { pathToFileURL } from 'node:url'

/** Whose code a sample was in. */
export const PARTS = ['plugin', 'packages', 'ioredis', 'pg', 'crypto', 'node', 'gc', 'bench'] as const
export type Part = typeof PARTS[number]

export const PART_NAMES: Record<Part, string> = {
  plugin: 'this plugin (lib/)',
  packages: 'Fastify and other packages',
  ioredis: 'ioredis',
  pg: 'node-postgres',
  crypto: 'node:crypto (SHA-256)',
  node: 'Node and V8 (http, streams, events, JSON, promises)',
  gc: 'garbage collector',
  bench: 'the bench route'
}

export interface Window {
  /** The monotonic clock, µs, when the measured load began and ended. */
  from: number
  to: number
  /** Requests the server took in over the window. */
  requests: number
}

interface CpuProfile {
  nodes: Array<{ id: number, callFrame: { functionName: string, url: string } }>
  startTime: number
  samples: number[]
  timeDeltas: number[]
}

const IOREDIS = /\/node_modules\/(ioredis|@ioredis|redis-parser|redis-errors|denque|cluster-key-slot|standard-as-callback)\//
const PG = /\/node_modules\/(pg|pg-[a-z-]+|postgres-[a-z-]+|pgpass)\//

/** The part of one call frame; undefined for the idle time. */
function partOf (url: string, functionName: string, root: string, plugin: string): Part | undefined {
  if (url === '') {
    if (functionName === '(idle)') return undefined
    return functionName === '(garbage collector)' ? 'gc' : 'node'
  }
  if (url.startsWith('node:')) return url.startsWith('node:internal/crypto') ? 'crypto' : 'node'
  if (url.startsWith(plugin)) return 'plugin'
  const path = url.startsWith('file://') ? url : pathToFileURL(url).href
  if (path.startsWith(root + 'bench/')) return 'bench'
  if (IOREDIS.test(path)) return 'ioredis'
  if (PG.test(path)) return 'pg'
  if (path.includes('/node_modules/')) return 'packages'
  if (path.startsWith(root)) return 'plugin' // the TypeScript source (--source): index.ts, lib/
  return 'node'
}

/**
 * µs of CPU per request in each part over the window. `root` is the
 * repository's file URL with a trailing slash, `plugin` the folder the
 * plugin runs from (the compiled copy, or `root` itself with --source).
 */
export function cpuByPart (file: string, window: Window, root: string, plugin: string): Record<Part, number> {
  const profile = JSON.parse(readFileSync(file, 'utf8')) as CpuProfile
  const parts = new Map<number, Part | undefined>()
  for (const node of profile.nodes) parts.set(node.id, partOf(node.callFrame.url, node.callFrame.functionName, root, plugin))
  const micros = Object.fromEntries(PARTS.map((part) => [part, 0])) as Record<Part, number>
  let at = profile.startTime
  for (let i = 0; i < profile.samples.length; i++) {
    // A sample's delta is the time since the one before: it is that sample's share.
    const delta = profile.timeDeltas[i]
    at += delta
    if (at <= window.from || at > window.to) continue
    const part = parts.get(profile.samples[i])
    if (part !== undefined) micros[part] += delta
  }
  for (const part of PARTS) micros[part] /= window.requests
  return micros
}

export interface ProfileRow {
  config: string
  scenario: string
  round: number
  micros: Record<Part, number>
}

/**
 * The markdown table: µs per request in each part, and each configuration's
 * difference from bare Fastify (`fastify`) in the same scenario and round,
 * when that was profiled too.
 */
export function profileTable (rows: ProfileRow[]): string {
  const used = PARTS.filter((part) => rows.some((row) => row.micros[part] >= 0.05))
  const total = (row: ProfileRow) => used.reduce((sum, part) => sum + row.micros[part], 0)
  const lines = [
    `| configuration | scenario | round | ${used.map((part) => PART_NAMES[part]).join(' | ')} | total |`,
    `| --- | --- | --- | ${used.map(() => '---:').join(' | ')} | ---: |`
  ]
  const bare = (row: ProfileRow) => rows.find((other) => other.config === 'fastify' && other.scenario === row.scenario && other.round === row.round)
  for (const row of rows) {
    lines.push(`| ${row.config} | ${row.scenario} | ${row.round} | ${used.map((part) => row.micros[part].toFixed(1)).join(' | ')} | ${total(row).toFixed(1)} |`)
    const base = row.config === 'fastify' ? undefined : bare(row)
    if (base === undefined) continue
    const above = (value: number) => (value >= 0 ? '+' : '') + value.toFixed(1)
    lines.push(`| ↳ above fastify | | | ${used.map((part) => above(row.micros[part] - base.micros[part])).join(' | ')} | ${above(total(row) - total(base))} |`)
  }
  return lines.join('\n')
}
