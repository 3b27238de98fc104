/**
 * From measurements to the table: medians per configuration and scenario,
 * ratios to the bare framework measured in the same round, and the issue's
 * targets checked against them.
 */
import { execFileSync } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { availableParallelism } from 'node:os'
import { CONFIGURATIONS, SCENARIOS, type ScenarioName } from './shared.js'

/** One measured load against one fresh server. */
export interface Measurement {
  round: number
  config: string
  scenario: ScenarioName
  rps: number
  p50: number
  p99: number
  /** Server CPU (user + system) per answered request, µs. */
  cpuPerRequest: number
  requests: number
  non2xx: number
  errors: number
  /** Handler runs per answered request: 1 when every request ran it, 0 when all were replays. */
  handlerShare: number
  /** CPU other processes used during the measurement, in cores. */
  noise: number
  statusCodes: Record<string, number>
}

export interface Row {
  config: string
  scenario: ScenarioName
  rounds: number
  rps: number
  p50: number
  p99: number
  cpuPerRequest: number
  /** Medians of the per-round ratios to the baseline; undefined for the baseline itself or without one. */
  rpsRatio?: number
  cpuRatio?: number
  p99Ratio?: number
  handlerShare: number
  non2xx: number
  errors: number
  /** Median CPU that other processes used during the measurements, in cores. */
  noise: number
}

export function median (values: number[]): number {
  if (values.length === 0) return NaN
  const sorted = [...values].sort((a, b) => a - b)
  const middle = sorted.length >> 1
  return sorted.length % 2 === 1 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2
}

export function aggregate (measurements: Measurement[]): Row[] {
  const rows: Row[] = []
  for (const c of CONFIGURATIONS) {
    for (const s of SCENARIOS) {
      const mine = measurements.filter((m) => m.config === c.name && m.scenario === s.name)
      if (mine.length === 0) continue
      const ratios = (pick: (m: Measurement) => number) => {
        if (c.baseline === c.name) return undefined
        const per = mine.flatMap((m) => {
          const base = measurements.find((b) => b.config === c.baseline && b.scenario === s.name && b.round === m.round)
          return base === undefined ? [] : [pick(m) / pick(base)]
        })
        return per.length === 0 ? undefined : median(per)
      }
      rows.push({
        config: c.name,
        scenario: s.name,
        rounds: mine.length,
        rps: median(mine.map((m) => m.rps)),
        p50: median(mine.map((m) => m.p50)),
        p99: median(mine.map((m) => m.p99)),
        cpuPerRequest: median(mine.map((m) => m.cpuPerRequest)),
        rpsRatio: ratios((m) => m.rps),
        cpuRatio: ratios((m) => m.cpuPerRequest),
        p99Ratio: ratios((m) => m.p99),
        handlerShare: median(mine.map((m) => m.handlerShare)),
        non2xx: mine.reduce((sum, m) => sum + m.non2xx, 0),
        errors: mine.reduce((sum, m) => sum + m.errors, 0),
        noise: median(mine.map((m) => m.noise))
      })
    }
  }
  return rows
}

const fixed = (value: number | undefined, digits: number) => value === undefined || Number.isNaN(value) ? '–' : value.toFixed(digits)
const thousands = (value: number) => Math.round(value).toLocaleString('en-US')

export function table (rows: Row[]): string {
  const lines = [
    '| configuration | scenario | req/s | p50 ms | p99 ms | CPU µs/req | req/s × bare | CPU × bare | p99 × bare | handler runs/req | non-2xx | other CPU |',
    '| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |'
  ]
  for (const row of rows) {
    lines.push(`| ${row.config} | ${row.scenario} | ${thousands(row.rps)} | ${fixed(row.p50, 2)} | ${fixed(row.p99, 2)} | ${fixed(row.cpuPerRequest, 1)} | ` +
      `${fixed(row.rpsRatio, 2)} | ${fixed(row.cpuRatio, 2)} | ${fixed(row.p99Ratio, 2)} | ${fixed(row.handlerShare, 3)} | ${row.non2xx} | ${fixed(row.noise, 2)} |`)
  }
  return lines.join('\n')
}

/** The targets, each with what was measured: met, missed, or not measured in this run. */
export function targets (rows: Row[]): string[] {
  const out: string[] = []
  const get = (config: string, scenario: ScenarioName) => rows.find((r) => r.config === config && r.scenario === scenario)
  const check = (label: string, value: number | undefined, ok: (v: number) => boolean, bound: string) => {
    if (value === undefined) out.push(`- not measured: ${label}`)
    else out.push(`- ${ok(value) ? 'met' : 'MISSED'}: ${label}: ${value.toFixed(2)} (target ${bound})`)
  }
  for (const { name: scenario } of SCENARIOS) {
    const row = get('idempotency-memory', scenario)
    if (row === undefined) continue
    check(`memory store, ${scenario}, req/s × bare`, row.rpsRatio, (v) => v >= 0.80, '≥ 0.80')
    check(`memory store, ${scenario}, CPU × bare`, row.cpuRatio, (v) => v <= 1.25, '≤ 1.25')
    check(`memory store, ${scenario}, p99 × bare`, row.p99Ratio, (v) => v <= 1.5, '≤ 1.5')
  }
  for (const { name: scenario } of SCENARIOS) {
    const row = get('idempotency-redis', scenario)
    if (row === undefined) continue
    const bound = scenario === 'hot' || scenario === 'keys1000' ? 0.70 : 0.60
    check(`Redis store, ${scenario}, req/s × bare`, row.rpsRatio, (v) => v >= bound, `≥ ${bound.toFixed(2)}`)
  }
  // The memory store against every peer; the Redis store against the Redis peers. Ratios to each one's own bare framework.
  const peers: Record<string, string[]> = {
    'idempotency-memory': ['node-idem-memory', 'node-idem-redis', 'powertools-redis', 'express-idempotency'],
    'idempotency-redis': ['node-idem-redis', 'powertools-redis']
  }
  for (const { name: scenario } of SCENARIOS) {
    for (const [ours, theirs] of Object.entries(peers)) {
      const mine = get(ours, scenario)
      if (mine?.rpsRatio === undefined) continue
      for (const peer of theirs) {
        const other = get(peer, scenario)
        if (other?.rpsRatio === undefined) continue
        const ahead = mine.rpsRatio > other.rpsRatio
        out.push(`- ${ahead ? 'met' : 'MISSED'}: ${ours} ahead of ${peer}, ${scenario}: ${mine.rpsRatio.toFixed(2)}× vs ${other.rpsRatio.toFixed(2)}× of bare`)
      }
    }
  }
  return out
}

export interface Machine {
  cores: number
  cpu: string
  node: string
  os: string
  redis: string | undefined
}

export function machine (): Machine {
  let cpu = 'unknown'
  try {
    cpu = /model name\s*:\s*(.+)/.exec(readFileSync('/proc/cpuinfo', 'utf8'))?.[1]?.trim() ?? cpu
  } catch {}
  let cores = availableParallelism()
  try {
    cores = Number(execFileSync('nproc', { encoding: 'utf8' }).trim())
  } catch {}
  let redis: string | undefined
  try {
    redis = /v=(\S+)/.exec(execFileSync('redis-server', ['--version'], { encoding: 'utf8' }))?.[1]
  } catch {}
  return { cores, cpu, node: process.version, os: `${process.platform} ${process.arch}`, redis }
}
