/**
 * From measurements to the tables: medians per configuration and scenario,
 * ratios to the bare framework measured in the same round, and this plugin's
 * CPU per request above its floors, also per round. The targets they are
 * read against are in bench/README.md.
 */
import { execFileSync } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { availableParallelism } from 'node:os'
import { CONFIGURATIONS, SCENARIOS, floorsOf, type ScenarioName } from './shared.js'

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
  /** Of that, the time in garbage collection, µs. */
  gcPerRequest: number
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
  gcPerRequest: number
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
        gcPerRequest: median(mine.map((m) => m.gcPerRequest)),
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
    '| configuration | scenario | req/s | p50 ms | p99 ms | CPU µs/req | GC µs/req | req/s × bare | CPU × bare | p99 × bare | handler runs/req | non-2xx | other CPU |',
    '| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |'
  ]
  for (const row of rows) {
    lines.push(`| ${row.config} | ${row.scenario} | ${thousands(row.rps)} | ${fixed(row.p50, 2)} | ${fixed(row.p99, 2)} | ${fixed(row.cpuPerRequest, 1)} | ${fixed(row.gcPerRequest, 1)} | ` +
      `${fixed(row.rpsRatio, 2)} | ${fixed(row.cpuRatio, 2)} | ${fixed(row.p99Ratio, 2)} | ${fixed(row.handlerShare, 3)} | ${row.non2xx} | ${fixed(row.noise, 2)} |`)
  }
  return lines.join('\n')
}

/** This plugin's CPU per request above its floors, in µs. */
export interface FloorRow {
  config: string
  scenario: ScenarioName
  cpuPerRequest: number
  /** The configuration this scenario is bound by (shared.ts, `floor`). */
  floor: string
  /** µs above each floor measured in the same run, medians of per-round differences; undefined when a floor was not measured. */
  above: Record<string, number | undefined>
}

export function aboveFloors (measurements: Measurement[]): FloorRow[] {
  const rows: FloorRow[] = []
  for (const c of CONFIGURATIONS) {
    if (c.floor === undefined) continue
    for (const s of SCENARIOS) {
      const mine = measurements.filter((m) => m.config === c.name && m.scenario === s.name)
      if (mine.length === 0) continue
      const above: Record<string, number | undefined> = {}
      for (const floor of floorsOf(c)) {
        // Per round, as the ratios: a floor measured in another round saw another machine state.
        const per = mine.flatMap((m) => {
          const base = measurements.find((b) => b.config === floor && b.scenario === s.name && b.round === m.round)
          return base === undefined ? [] : [m.cpuPerRequest - base.cpuPerRequest]
        })
        above[floor] = per.length === 0 ? undefined : median(per)
      }
      rows.push({ config: c.name, scenario: s.name, cpuPerRequest: median(mine.map((m) => m.cpuPerRequest)), floor: c.floor[s.name], above })
    }
  }
  return rows
}

const signed = (value: number | undefined) => value === undefined || Number.isNaN(value) ? '–' : (value >= 0 ? '+' : '') + value.toFixed(1)

export function floorTable (rows: FloorRow[]): string {
  const lines = [
    '| configuration | scenario | CPU µs/req | bound by | µs/req above it | above floor-1 | above floor-2 |',
    '| --- | --- | ---: | --- | ---: | ---: | ---: |'
  ]
  for (const row of rows) {
    lines.push(`| ${row.config} | ${row.scenario} | ${fixed(row.cpuPerRequest, 1)} | ${row.floor} | ${signed(row.above[row.floor])} | ` +
      `${signed(row.above['floor-1'])} | ${signed(row.above['floor-2'])} |`)
  }
  return lines.join('\n')
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
