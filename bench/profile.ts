/**
 * Reads the V8 CPU profiles that `npm run bench -- --profile` has the servers
 * write (the inspector's Profiler, in process, over the measured seconds),
 * and summarizes them: where the busy time goes, by function (self time)
 * and, for this plugin's own functions, also with what they call
 * (inclusive time).
 *
 *   tsx bench/profile.ts bench/results/profiles/idempotency-memory.fresh.r1.cpuprofile
 */
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { pathToFileURL } from 'node:url'
import { ROOT } from './shared.js'

interface CallFrame {
  functionName: string
  url: string
  lineNumber: number
  columnNumber: number
}

interface ProfileNode {
  id: number
  callFrame: CallFrame
  children?: number[]
}

interface CpuProfile {
  nodes: ProfileNode[]
  samples: number[]
  timeDeltas: number[]
}

/** The plugin's files: its source (--source), or what run.ts compiled into node_modules/.cache. */
const BUILD = pathToFileURL(join(ROOT, 'node_modules', '.cache', 'fastify-idempotency-bench')).href + '/'
const PLUGIN_FILES = [pathToFileURL(join(ROOT, 'lib')).href + '/', pathToFileURL(join(ROOT, 'index.ts')).href, BUILD + 'lib/', BUILD + 'index.js']
const IDLE = new Set(['(idle)', '(program)'])

function isPlugin (url: string): boolean {
  return PLUGIN_FILES.some((prefix) => url.startsWith(prefix))
}

function where (frame: CallFrame): string {
  const url = frame.url
  if (url === '') return ''
  const rootUrl = pathToFileURL(ROOT).href
  const short = url.startsWith(BUILD)
    ? url.slice(BUILD.length)
    : url.startsWith(rootUrl) ? url.slice(rootUrl.length) : url.replace(/^file:\/\/.*\/node_modules\//, '')
  return `${short}:${frame.lineNumber + 1}:${frame.columnNumber + 1}`
}

export interface FunctionTime {
  name: string
  where: string
  plugin: boolean
  /** Share of busy (non-idle) time, 0–1. */
  share: number
}

export interface ProfileSummary {
  file: string
  busyMs: number
  /** Self time of the plugin's own functions, and of everything they call, as shares of busy time. */
  pluginSelf: number
  pluginInclusive: number
  top: FunctionTime[]
  pluginTop: FunctionTime[]
  pluginInclusiveTop: FunctionTime[]
}

export function summarize (file: string, limit = 25): ProfileSummary {
  const profile = JSON.parse(readFileSync(file, 'utf8')) as CpuProfile
  const byId = new Map(profile.nodes.map((node) => [node.id, node]))
  const parent = new Map<number, number>()
  for (const node of profile.nodes) for (const child of node.children ?? []) parent.set(child, node.id)

  const self = new Map<number, number>()
  let busy = 0
  profile.samples.forEach((id, i) => {
    const delta = profile.timeDeltas[i] ?? 0
    const name = byId.get(id)?.callFrame.functionName ?? ''
    if (IDLE.has(name)) return
    busy += delta
    self.set(id, (self.get(id) ?? 0) + delta)
  })

  const key = (frame: CallFrame) => `${frame.functionName || '(anonymous)'}\u0000${where(frame)}`
  const selfByFunction = new Map<string, number>()
  const inclusiveByFunction = new Map<string, number>()
  let pluginSelf = 0
  let pluginInclusive = 0
  for (const [id, time] of self) {
    const frame = (byId.get(id) as ProfileNode).callFrame
    selfByFunction.set(key(frame), (selfByFunction.get(key(frame)) ?? 0) + time)
    if (isPlugin(frame.url)) pluginSelf += time
    // Walk up the stack: every plugin function on it gets this time once.
    const seen = new Set<string>()
    let inPlugin = false
    for (let at: number | undefined = id; at !== undefined; at = parent.get(at)) {
      const f = (byId.get(at) as ProfileNode).callFrame
      if (!isPlugin(f.url)) continue
      inPlugin = true
      const k = key(f)
      if (seen.has(k)) continue
      seen.add(k)
      inclusiveByFunction.set(k, (inclusiveByFunction.get(k) ?? 0) + time)
    }
    if (inPlugin) pluginInclusive += time
  }

  const list = (times: Map<string, number>, filter: (plugin: boolean) => boolean) => [...times]
    .map(([k, time]) => {
      const [name, at] = k.split('\u0000')
      return { name, where: at, plugin: at.startsWith('lib/') || at.startsWith('index.'), share: time / busy }
    })
    .filter((f) => filter(f.plugin))
    .sort((a, b) => b.share - a.share)
    .slice(0, limit)

  return {
    file,
    busyMs: busy / 1000,
    pluginSelf: pluginSelf / busy,
    pluginInclusive: pluginInclusive / busy,
    top: list(selfByFunction, () => true),
    pluginTop: list(selfByFunction, (plugin) => plugin),
    pluginInclusiveTop: list(inclusiveByFunction, (plugin) => plugin)
  }
}

const percent = (share: number) => (share * 100).toFixed(1).padStart(5) + '%'

export function format (summary: ProfileSummary): string {
  const lines = [`## ${summary.file}`, `busy ${summary.busyMs.toFixed(0)} ms; plugin self time ${percent(summary.pluginSelf)}, plugin inclusive ${percent(summary.pluginInclusive)}`, '', 'top self time (all):']
  for (const f of summary.top) lines.push(`  ${percent(f.share)}  ${f.plugin ? '*' : ' '} ${f.name}  ${f.where}`)
  lines.push('', 'plugin functions, self time:')
  for (const f of summary.pluginTop) lines.push(`  ${percent(f.share)}  ${f.name}  ${f.where}`)
  lines.push('', 'plugin functions, inclusive time (with what they call):')
  for (const f of summary.pluginInclusiveTop) lines.push(`  ${percent(f.share)}  ${f.name}  ${f.where}`)
  return lines.join('\n')
}

/** Summarizes the profiles a --profile run wrote (not older ones left in the same directory). */
export function summarizeProfiles (files: string[]): string {
  if (files.length === 0) return 'no profiles written'
  return [...files].sort().map((f) => format(summarize(f, 20))).join('\n\n')
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  for (const file of process.argv.slice(2)) console.log(format(summarize(file)) + '\n')
}
