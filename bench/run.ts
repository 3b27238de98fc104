/**
 * npm run bench: what fastify-idempotency costs per request, side by side
 * with bare Fastify, its peers and a reference plugin, in one interleaved run.
 *
 *   npm run bench                                  every configuration and scenario, 3 rounds
 *   npm run bench -- --duration 2 --rounds 1       a quick look
 *   npm run bench -- --only idempotency-memory --scenarios fresh,hot
 *   npm run bench -- --memory                      1 000 000 unique keys into the memory store, RSS every 100k
 *   npm run bench -- --profile --only idempotency-memory --rounds 1   CPU profiles of the servers (node --cpu-prof)
 *
 * Every measurement gets a fresh server process (pinned to core 1), loaded
 * by autocannon in another process (pinned to core 0, with Redis): seed keys
 * (replay scenarios), warm up, read the server's CPU, measure, read it
 * again. Rounds run configurations in turn (A B C … A B C …); the table shows
 * medians, and ratios are medians of per-round ratios to the bare framework
 * of the same round; this plugin's CPU above its floors, medians of per-round
 * differences. bench/README.md says what each configuration is, how the
 * peers are wired and which targets the figures are read against.
 */
import { execFileSync, spawnSync } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { join, relative } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { pathToFileURL } from 'node:url'
import { parseArgs } from 'node:util'
import { postgresAvailable, startPostgres } from '../support/postgres.js'
import { redisAvailable, startRedis } from '../support/redis.js'
import { startLoad, startServer, tasksetWorks, type LoadProcess } from './processes.js'
import { cpuByPart, profileTable, type ProfileRow, type Window } from './profile.js'
import { aboveFloors, aggregate, floorTable, machine, median, table, type Machine, type Measurement } from './report.js'
import { CONFIGURATIONS, ROOT, SCENARIOS, configuration, floorsOf, scenario as scenarioOf, type ScenarioName, type ServerStats } from './shared.js'

const { values: args } = parseArgs({
  options: {
    duration: { type: 'string', default: '5' },
    warmup: { type: 'string', default: '2' },
    rounds: { type: 'string', default: '3' },
    connections: { type: 'string', default: '50' },
    only: { type: 'string' },
    scenarios: { type: 'string' },
    memory: { type: 'boolean', default: false },
    keys: { type: 'string', default: '1000000' },
    profile: { type: 'boolean', default: false },
    source: { type: 'boolean', default: false },
    verify: { type: 'boolean', default: false },
    'max-noise': { type: 'string', default: '0.1' },
    attempts: { type: 'string', default: '3' },
    'quiet-wait': { type: 'string', default: '30' },
    json: { type: 'string' },
    'no-write': { type: 'boolean', default: false },
    help: { type: 'boolean', default: false }
  }
})

if (args.help) {
  console.log(`npm run bench -- [options]
  --duration S       seconds measured per configuration and scenario (5)
  --warmup S         seconds of warm-up before each measurement (2)
  --rounds N         interleaved rounds; the table shows medians (3)
  --connections N    concurrent connections (50)
  --only a,b         configurations (${CONFIGURATIONS.map((c) => c.name).join(', ')})
  --scenarios a,b    scenarios (${SCENARIOS.map((s) => s.name).join(', ')})
  --memory           the memory run: --keys unique keys (1000000) into the memory store, RSS every 100k
  --profile          run each server with node --cpu-prof (the whole process), profiles to bench/results/profiles/
  --source           run the plugin's TypeScript source through tsx instead of compiling it with tsc first
  --verify           servers record every key (checks the harness; slower)
  --max-noise C      measure again (fresh server) when other processes used more than C cores meanwhile (0.1)
  --attempts N       at most N attempts per measurement; the quietest is kept (3)
  --quiet-wait S     before each attempt, wait up to S seconds for other processes to go quiet (30)
  --json FILE        also write the measurements and the table as JSON
  --no-write         do not write bench/results/latest.md`)
  process.exit(0)
}

const RESULTS = join(ROOT, 'bench', 'results')
const PROFILES = join(RESULTS, 'profiles')
const SERVER_CORE = tasksetWorks ? 1 : undefined
const LOAD_CORE = tasksetWorks ? 0 : undefined
const runId = randomBytes(4).toString('hex')
const list = (value: string | undefined) => value?.split(',').map((s) => s.trim()).filter(Boolean)
const number = (name: string, value: string, zero = false) => {
  const n = Number(value)
  if (!Number.isFinite(n) || n < 0 || (n === 0 && !zero)) throw new Error(`--${name} must be a ${zero ? 'non-negative' : 'positive'} number, got ${value}`)
  return n
}

const duration = number('duration', args.duration)
const warmup = number('warmup', args.warmup, true)
const rounds = number('rounds', args.rounds)
const connections = number('connections', args.connections)
const maxNoise = number('max-noise', args['max-noise'], true)
const attempts = number('attempts', args.attempts)
const quietWait = number('quiet-wait', args['quiet-wait'], true)

let clockTicks = 100
try {
  clockTicks = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100
} catch {}

/** CPU time every process on the machine has used (all cores, steal included), µs; undefined without /proc/stat. */
function machineBusyMicros (): number | undefined {
  try {
    const fields = readFileSync('/proc/stat', 'utf8').split('\n', 1)[0].trim().split(/\s+/).slice(1, 9).map(Number)
    const [user, nice, system, , , irq, softirq, steal] = fields // idle and iowait are not busy
    return (user + nice + system + irq + softirq + steal) * 1e6 / clockTicks
  } catch {
    return undefined
  }
}

/**
 * Compiles the plugin as \`npm run build\` does, into node_modules/.cache, so
 * that the servers run plain JavaScript (tsx adds a naming helper call to
 * every closure it creates). Returns the entry point, or undefined for --source.
 */
function buildPlugin (): string | undefined {
  if (args.source) return undefined
  const out = join(ROOT, 'node_modules', '.cache', 'fastify-idempotency-bench')
  rmSync(out, { recursive: true, force: true })
  const tsc = spawnSync(process.execPath, [join(ROOT, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', 'tsconfig.build.json', '--outDir', out, '--declaration', 'false', '--noEmitOnError', 'false'], { cwd: ROOT, encoding: 'utf8' })
  const entry = join(out, 'index.js')
  if (!existsSync(entry)) throw new Error(`tsc emitted no plugin:\n${tsc.stdout}${tsc.stderr}`)
  writeFileSync(join(out, 'package.json'), '{ "type": "module" }\n')
  if (tsc.status !== 0) console.log(`note: tsc reported errors in the plugin's source; it emitted JavaScript all the same:\n${tsc.stdout.split('\n').slice(0, 5).join('\n')}`)
  return pathToFileURL(entry).href
}

/** What a configuration's server talks to: one Redis, a Redis with its replica, or a PostgreSQL, started once per run. */
interface Backend {
  /** The URL the server gets: BENCH_REDIS_URL or BENCH_POSTGRES_URL. */
  url: string
  /** CPU its processes have used so far, µs. */
  cpu (): Promise<number>
  /** Empties it between measurements. */
  flush (): Promise<void>
  stop (): Promise<void>
}

type BackendKind = 'redis' | 'redis-replica' | 'postgres'

function backendOf (name: string): BackendKind | undefined {
  const c = configuration(name)
  return c.postgres === true ? 'postgres' : c.replica === true ? 'redis-replica' : c.redis ? 'redis' : undefined
}

/** -a: every thread of the process, not only the main one; processes it forks later inherit the core. */
function pinWithLoad (pid: number): void {
  if (LOAD_CORE !== undefined) spawnSync('taskset', ['-apc', String(LOAD_CORE), String(pid)], { stdio: 'ignore' })
}

/** user + system CPU of a process from /proc, µs; with `children`, of its waited-for children too. */
function processCpu (pid: number, children: boolean): number {
  try {
    // The fields after the command name, which is in parentheses and may hold spaces.
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ').map(Number)
    const [utime, stime, cutime, cstime] = fields.slice(11, 15)
    return (utime + stime + (children ? cutime + cstime : 0)) * 1e6 / clockTicks
  } catch {
    return 0 // it has exited
  }
}

/** The PostgreSQL version of this run, once its server is up. */
let postgresVersion: string | undefined

/** A redis-server of our own on a free loopback port, persistence off, pinned with the load generator; with `replica`, a replica of it too, in sync. */
async function redisBackend (replica: boolean): Promise<Backend> {
  const primary = await startRedis()
  const servers = [primary]
  const { Redis: Client } = await import('ioredis')
  const clients: Array<InstanceType<typeof Client>> = []
  try {
    if (replica) servers.push(await startRedis({ replicaOf: primary.port }))
    for (const server of servers) {
      pinWithLoad(server.pid)
      const client = new Client({ host: '127.0.0.1', port: server.port, lazyConnect: true })
      clients.push(client)
      await client.connect()
    }
  } catch (err) {
    for (const client of clients) client.disconnect() // or it keeps reconnecting, and this process alive
    for (const server of servers) await server.stop()
    throw err
  }
  return {
    url: primary.url,
    async cpu () {
      let total = 0
      for (const client of clients) {
        const info = await client.info('cpu')
        const field = (name: string) => Number(new RegExp(name + ':([\\d.]+)').exec(info)?.[1] ?? 0)
        total += (field('used_cpu_sys') + field('used_cpu_user')) * 1e6
      }
      return total
    },
    async flush () {
      await clients[0].flushall()
      // The replica gets the FLUSHALL through the replication stream: wait for it, so that the next measurement starts in sync.
      if (replica) await clients[0].wait(1, 5000)
    },
    async stop () {
      for (const client of clients) client.disconnect()
      for (const server of servers) await server.stop()
    }
  }
}

/**
 * A PostgreSQL cluster of our own (support/postgres.ts: fsync and synchronous
 * commit off, as a test cluster), pinned with the load generator. Its CPU:
 * the postmaster, the server processes running now (one per connection, and
 * the background ones), and those that have exited.
 */
async function postgresBackend (): Promise<Backend> {
  const server = await startPostgres()
  const postmaster = server.pid
  const serverProcesses = () => {
    const found = spawnSync('pgrep', ['-P', String(postmaster)], { encoding: 'utf8' }).stdout
    return found.split('\n').filter(Boolean).map(Number)
  }
  pinWithLoad(postmaster)
  for (const pid of serverProcesses()) pinWithLoad(pid)
  const { default: pg } = await import('pg')
  const client = new pg.Client({ connectionString: server.connectionString })
  try {
    await client.connect()
    postgresVersion = (await client.query<{ server_version: string }>('SHOW server_version')).rows[0].server_version
  } catch (err) {
    await client.end().catch(() => {})
    await server.stop()
    throw err
  }
  return {
    url: server.connectionString,
    async cpu () {
      return processCpu(postmaster, true) + serverProcesses().reduce((sum, pid) => sum + processCpu(pid, false), 0)
    },
    async flush () {
      // The plugin's tables (records and stats), whatever their names: everything in the public schema.
      const { rows } = await client.query<{ name: string }>("SELECT quote_ident(tablename) AS name FROM pg_tables WHERE schemaname = 'public'")
      if (rows.length > 0) await client.query(`TRUNCATE ${rows.map((r) => r.name).join(', ')}`)
    },
    async stop () {
      await client.end()
      await server.stop()
    }
  }
}

/** --only, with the bare framework and the floors of each (ratios and differences need them in the same run), in CONFIGURATIONS order. */
function selectedConfigurations (): string[] {
  const wanted = list(args.only) ?? CONFIGURATIONS.map((c) => c.name)
  const withBaselines = new Set(wanted.flatMap((name) => {
    const c = configuration(name) // throws on an unknown name
    return [c.baseline, ...floorsOf(c), name]
  }))
  return CONFIGURATIONS.map((c) => c.name).filter((name) => withBaselines.has(name))
}

function selectedScenarios (): ScenarioName[] {
  const wanted = list(args.scenarios) ?? SCENARIOS.map((s) => s.name)
  for (const name of wanted) {
    if (!SCENARIOS.some((s) => s.name === name)) throw new Error(`unknown scenario ${name}; known: ${SCENARIOS.map((s) => s.name).join(', ')}`)
  }
  return SCENARIOS.map((s) => s.name).filter((name) => wanted.includes(name))
}

interface Checked {
  config: string
  scenario: ScenarioName
  round: number
  stats: ServerStats
  before: ServerStats
  keysSent: number
  statusCodes: Record<string, number>
}

let cell = 0
let plugin: string | undefined
/** The CPU profiles this run wrote (--profile). */
const profiles = new Set<string>()
/** Where each profiled server's CPU went over its measured window (--profile). */
const profileRows: ProfileRow[] = []

/** One measurement: a fresh server, seeded, warmed up, measured. */
async function measure (load: LoadProcess, name: string, scenario: ScenarioName, round: number, backend: Backend | undefined, checks: Checked[]): Promise<Measurement> {
  // A measurement taken again (another process was busy) writes over its profile: the file is the last attempt's.
  const cpuProfile = args.profile ? join(PROFILES, `${name}.${scenario}.r${round}.cpuprofile`) : undefined
  const url = backendOf(name) === 'postgres' ? { postgresUrl: backend?.url } : { redisUrl: backend?.url }
  const server = await startServer(name, { core: SERVER_CORE, ...url, verify: args.verify, plugin, cpuProfile })
  let window: Window | undefined
  try {
    const prefix = `${runId}-${(++cell).toString(36).padStart(4, '0')}-`
    const base = { url: server.url, scenario, connections, prefix }
    const { seedKeys } = scenarioOf(scenario)
    if (seedKeys > 0) await load.run({ ...base, duration: 1, amount: seedKeys, seed: true })
    if (warmup > 0) await load.run({ ...base, duration: warmup })
    const before = await server.stats()
    const busyBefore = machineBusyMicros()
    const ownBefore = process.cpuUsage()
    const backendBefore = await backend?.cpu() ?? 0
    const result = await load.run({ ...base, duration })
    const busyAfter = machineBusyMicros()
    const own = process.cpuUsage(ownBefore)
    const after = await server.stats()
    const backendCpu = (await backend?.cpu() ?? 0) - backendBefore
    // What other processes used meanwhile (another test run, a package install…), in cores.
    const noise = busyBefore === undefined || busyAfter === undefined
      ? 0
      : Math.max(0, busyAfter - busyBefore - (after.cpuMicros - before.cpuMicros) - result.cpuMicros - own.user - own.system - backendCpu) / (result.seconds * 1e6)
    checks.push({ config: name, scenario, round, stats: after, before, keysSent: result.keysSent, statusCodes: result.statusCodes })
    if (result.requests === 0) throw new Error(`${name} ${scenario}: no response at all (errors ${result.errors}, timeouts ${result.timeouts})`)
    // Per request the server took in over the measured window: the server's CPU covers the requests still
    // in flight when the load generator stopped (up to one per connection), which it never counts as answered.
    const served = after.requests - before.requests
    window = { from: before.clockMicros, to: after.clockMicros, requests: served }
    return {
      round,
      config: name,
      scenario,
      rps: result.rps,
      p50: result.p50,
      p99: result.p99,
      cpuPerRequest: (after.cpuMicros - before.cpuMicros) / served,
      gcPerRequest: (after.gcMicros - before.gcMicros) / served,
      requests: result.requests,
      non2xx: result.non2xx,
      errors: result.errors + result.timeouts,
      handlerShare: (after.handlerRuns - before.handlerRuns) / served,
      noise,
      statusCodes: result.statusCodes
    }
  } finally {
    await server.stop()
    if (cpuProfile !== undefined && existsSync(cpuProfile)) {
      profiles.add(cpuProfile)
      if (window !== undefined) profileRows.push({ config: name, scenario, round, micros: cpuByPart(cpuProfile, window, pathToFileURL(ROOT + '/').href, pluginFolder()) })
    }
    await backend?.flush()
  }
}

/** The file URL of the folder the plugin runs from, with a trailing slash. */
function pluginFolder (): string {
  return plugin === undefined ? pathToFileURL(ROOT + '/').href : new URL('.', plugin).href
}

/** Waits (up to --quiet-wait seconds) until other processes use at most --max-noise cores over one second. */
async function waitForQuiet (): Promise<void> {
  const deadline = Date.now() + quietWait * 1000
  let told = false
  for (;;) {
    const before = machineBusyMicros()
    const own = process.cpuUsage()
    await sleep(1000)
    const after = machineBusyMicros()
    if (before === undefined || after === undefined) return
    const ownUsed = process.cpuUsage(own)
    const others = (after - before - ownUsed.user - ownUsed.system) / 1e6
    if (others <= maxNoise || Date.now() > deadline) return
    if (!told) console.log(`  (waiting for other processes to go quiet: ${others.toFixed(2)} cores busy)`)
    told = true
  }
}

/** measure(), again on a fresh server while other processes were busy meanwhile; the quietest attempt is kept. */
async function measureQuietly (load: LoadProcess, name: string, scenario: ScenarioName, round: number, backend: Backend | undefined, checks: Checked[]): Promise<Measurement> {
  let best: Measurement | undefined
  for (let attempt = 1; attempt <= attempts; attempt++) {
    await waitForQuiet()
    const m = await measure(load, name, scenario, round, backend, checks)
    if (best === undefined || m.noise < best.noise) best = m
    if (m.noise <= maxNoise) break
    console.log(`  (other processes used ${m.noise.toFixed(2)} cores during ${name} ${scenario}${attempt < attempts ? ': measuring again' : ''})`)
  }
  return best as Measurement
}

function describe (m: Machine): string {
  return `${m.cores} cores (nproc), ${m.cpu}, Node.js ${m.node}, ${m.os}` + (m.redis === undefined ? ', no redis-server' : `, redis-server ${m.redis}`) +
    (postgresVersion === undefined ? '' : `, PostgreSQL ${postgresVersion}`)
}

function commandLine (): string {
  const rest = process.argv.slice(2)
  return rest.length === 0 ? 'npm run bench' : `npm run bench -- ${rest.join(' ')}`
}

async function benchmark (): Promise<void> {
  const scenarios = selectedScenarios()
  const selected = selectedConfigurations()
  plugin = buildPlugin()
  const notes: string[] = []
  const skip = (kinds: BackendKind[], why: string) => {
    const skipped = selected.filter((name) => kinds.includes(backendOf(name) as BackendKind))
    if (skipped.length > 0) notes.push(`SKIPPED ${skipped.join(', ')}: ${why}`)
    return skipped
  }
  const skipped = [
    ...redisAvailable ? [] : skip(['redis', 'redis-replica'], 'redis-server is not installed (apt-get install redis-server); the Redis configurations need a local one.'),
    ...postgresAvailable ? [] : skip(['postgres'], 'PostgreSQL is not installed (apt-get install postgresql); the PostgreSQL configuration needs a local one.')
  ]
  const names = selected.filter((name) => !skipped.includes(name))
  const backends = new Map<BackendKind, Backend>()
  const host = machine()
  if (!tasksetWorks) notes.push('taskset is not available: server and load generator are not pinned to separate cores.')
  for (const note of notes) console.log(note)
  console.log(`machine: ${describe(host)}`)
  console.log(`configurations: ${names.join(', ')}; scenarios: ${scenarios.join(', ')}; ${rounds} round(s) of ${duration} s (+${warmup} s warm-up), ${connections} connections`)

  const measurements: Measurement[] = []
  const checks: Checked[] = []
  const started = Date.now()
  let load: LoadProcess | undefined
  try {
    for (const kind of new Set(names.map(backendOf))) {
      if (kind === undefined) continue
      backends.set(kind, kind === 'postgres' ? await postgresBackend() : await redisBackend(kind === 'redis-replica'))
    }
    load = await startLoad(LOAD_CORE)
    for (let round = 1; round <= rounds; round++) {
      for (const scenario of scenarios) {
        for (const name of names) {
          const kind = backendOf(name)
          const m = await measureQuietly(load, name, scenario, round, kind === undefined ? undefined : backends.get(kind), checks)
          measurements.push(m)
          console.log(`round ${round} ${scenario.padEnd(8)} ${name.padEnd(20)} ${Math.round(m.rps).toString().padStart(6)} req/s  p50 ${m.p50.toFixed(2)} ms  p99 ${m.p99.toFixed(2)} ms  ${m.cpuPerRequest.toFixed(1)} µs CPU/req  handler ${m.handlerShare.toFixed(3)}/req${m.non2xx > 0 ? `  non-2xx ${m.non2xx} (statuses ${JSON.stringify(m.statusCodes)})` : ''}`)
        }
      }
    }
  } finally {
    await load?.stop()
    for (const backend of backends.values()) await backend.stop()
  }

  const rows = aggregate(measurements)
  const floorRows = aboveFloors(measurements)
  const text = table(rows)
  const floors = floorRows.length > 0 ? floorTable(floorRows) : undefined
  console.log('\n' + text + '\n')
  if (floors !== undefined) console.log('CPU above the floor (µs/req, medians of per-round differences):\n' + floors + '\n')
  console.log('What the configurations are, what the columns mean and the targets: bench/README.md\n')

  const minutes = ((Date.now() - started) / 60_000).toFixed(1)
  if (args.json !== undefined) {
    writeFileSync(args.json, JSON.stringify({ machine: host, command: commandLine(), rows, floorRows, measurements, checks, skipped }, null, 2))
  }
  if (!args['no-write'] && !args.profile) {
    writeFileSync(join(RESULTS, 'latest.md'), markdown({ host, text, floors, notes, minutes }))
    console.log(`written: bench/results/latest.md (${minutes} min)`)
  }
  if (args.profile) {
    console.log(profileNote())
    if (profileRows.length > 0) {
      const where = profileTable(profileRows)
      console.log('\nWhere the CPU went over the measured load (self time, µs/req, with the profiler\'s own cost):\n' + where + '\n')
      if (!args['no-write']) {
        writeFileSync(join(RESULTS, 'profile.md'), profileMarkdown({ host, where, minutes }))
        console.log('written: bench/results/profile.md')
      }
    }
  }
}

function profileNote (): string {
  if (profiles.size === 0) return 'No CPU profile was written (a server that had to be killed writes none).'
  return `CPU profiles, ${profiles.size}, in ${relative(process.cwd(), PROFILES) || '.'}/:
${[...profiles].sort().map((file) => '  ' + relative(PROFILES, file)).join('\n')}
Each covers its whole server process (node --cpu-prof): start-up, seeding, warm-up, the measured ${duration} s of load and shutdown; the measured seconds are the last stretch of load, right after the warm-up.
Open one in Chrome DevTools (Performance, "Load profile…") or at https://www.speedscope.app. The figures of a profiled run include the profiler's cost: it does not write bench/results/latest.md.`
}

function markdown (r: { host: Machine, text: string, floors: string | undefined, notes: string[], minutes: string }): string {
  return `# Benchmark results

Written by \`${commandLine()}\` on ${new Date().toISOString().slice(0, 10)} (${r.minutes} min).

Machine: ${describe(r.host)}.
Settings: ${rounds} interleaved round(s), ${duration} s measured per configuration and scenario after ${warmup} s of warm-up, ${connections} connections, pipelining 1, a fresh server process per measurement${tasksetWorks ? '; server pinned to core 1, load generator (and Redis) to core 0 with taskset' : '; no taskset: processes not pinned'}; measurements during which other processes used more than ${maxNoise} cores repeated, up to ${attempts} attempts, keeping the quietest.
${r.notes.length > 0 ? '\n' + r.notes.map((n) => `**${n}**`).join('\n\n') + '\n' : ''}
What each configuration and scenario is, how the peers are wired, what the columns mean, and the targets these figures are read against: [bench/README.md](../README.md).

## Table

${r.text}
${r.floors === undefined
    ? ''
    : `
## CPU above the floor

µs of server CPU per request above the floor each scenario is bound by, and above both Redis floors; medians of per-round differences.

${r.floors}
`}`
}

function profileMarkdown (r: { host: Machine, where: string, minutes: string }): string {
  return `# Where the CPU goes

Written by \`${commandLine()}\` on ${new Date().toISOString().slice(0, 10)} (${r.minutes} min).

Machine: ${describe(r.host)}.
Each server ran under \`node --cpu-prof\`; the samples taken while the measured load ran (warm-up and start-up left out) are grouped by whose code was running (self time: the function on top of the stack), in µs of CPU per request. The profiler costs time of its own, so the totals are above the CPU column of an unprofiled run; the differences between configurations are what to read. "↳ above fastify" is the row above minus bare Fastify in the same scenario and round. How the parts are told apart: [bench/profile.ts](../profile.ts).

${r.where}
`
}

/** The memory run: unique keys into the memory store, RSS before, every 100k, after. */
async function memoryRun (): Promise<void> {
  const names = list(args.only) ?? ['idempotency-memory']
  const keys = number('keys', args.keys)
  const step = Math.min(100_000, keys)
  const host = machine()
  console.log(`machine: ${describe(host)}`)
  plugin = buildPlugin()
  const load = await startLoad(LOAD_CORE)
  const report: string[] = []
  let backend: Backend | undefined
  try {
    for (const name of names) {
      const kind = backendOf(name)
      if (kind === 'postgres') throw new Error('the memory run is for the memory and Redis stores')
      if (kind !== undefined && !redisAvailable) throw new Error(`${name} needs redis-server (apt-get install redis-server)`)
      await backend?.stop()
      backend = kind === undefined ? undefined : await redisBackend(kind === 'redis-replica')
      const server = await startServer(name, { core: SERVER_CORE, nodeArgs: ['--expose-gc'], plugin, redisUrl: backend?.url })
      const lines: string[] = []
      const line = (label: string, s: ServerStats) => {
        const text = `| ${label} | ${(s.rss / 2 ** 20).toFixed(1)} | ${(s.heapUsed / 2 ** 20).toFixed(1)} | ${s.storeRecords ?? '–'} | ${s.handlerRuns} |`
        lines.push(text)
        console.log(text)
      }
      console.log(`\n${name}: ${keys} unique keys, ${connections} connections`)
      const header = '| when | RSS MiB | heap used MiB | records in store | handler runs |\n| --- | ---: | ---: | ---: | ---: |'
      console.log(header)
      try {
        line('before (after GC)', await server.statsAfterGc())
        const samples: Array<Promise<void>> = []
        const rss: number[] = []
        const result = await load.run({ url: server.url, scenario: 'fresh', duration: 1, amount: keys, connections, prefix: `${runId}-mem-`, progressEvery: step }, (responses) => {
          samples.push(server.stats().then((s) => {
            rss.push(s.rss)
            line(`${responses.toLocaleString('en-US')} responses`, s)
          }))
        })
        await Promise.all(samples)
        line('after', await server.stats())
        line('after (after GC)', await server.statsAfterGc())
        const second = rss.length > 2 ? rss.slice(Math.floor(rss.length / 2)) : rss
        const growth = second.length > 1 ? (second[second.length - 1] - second[0]) / 2 ** 20 : NaN
        const summary = `${name}: ${result.requests} responses (${result.non2xx} non-2xx) at ${Math.round(result.rps)} req/s; RSS over the second half of the run: ${(Math.min(...second) / 2 ** 20).toFixed(1)}–${(Math.max(...second) / 2 ** 20).toFixed(1)} MiB (median ${(median(second) / 2 ** 20).toFixed(1)}), ${growth >= 0 ? '+' : ''}${growth.toFixed(1)} MiB from its first to its last sample.`
        console.log(summary)
        report.push(`### ${name}\n\n${header}\n${lines.join('\n')}\n\n${summary}\n`)
      } finally {
        await server.stop()
      }
    }
  } finally {
    await load.stop()
    await backend?.stop()
  }
  if (!args['no-write']) {
    mkdirSync(RESULTS, { recursive: true })
    writeFileSync(join(RESULTS, 'memory.md'), `# Memory run\n\nWritten by \`${commandLine()}\` on ${new Date().toISOString().slice(0, 10)}.\n\nMachine: ${describe(host)}.\n\nEach configuration gets a fresh server and ${keys.toLocaleString('en-US')} requests, each with a new key. RSS and heap are sampled by the server itself every ${step.toLocaleString('en-US')} responses. This plugin's memory store has its defaults, \`new MemoryStore({ maxRecords: 10000, maxBytes: 64 MiB, maxClaims: 10000 })\`: one LRU of completed records bounded by \`maxRecords\` and \`maxBytes\`, and the claims in flight bounded apart by \`maxClaims\` (never evicted). Under a flood of new keys it fills up to 10 000 records, then evicts the least recently used record for each new one. With the Redis store, the records are in Redis and the process keeps its replay cache (\`replayCache\`, 16 MiB by default, least recently used copies dropped first). "records in store" is \`store.usage().records\`: completed records only, not the claims in flight; for \`@node-idempotency/core\`, the entries of its memory adapter; – for Redis.\n\n${report.join('\n')}`)
    console.log('written: bench/results/memory.md')
  }
}

// Interrupted: exit through 'exit', whose handlers kill the servers, the load generator and Redis.
for (const signal of ['SIGINT', 'SIGTERM'] as const) process.once(signal, () => process.exit(130))

;(args.memory ? memoryRun() : benchmark()).catch((err: Error) => {
  console.error(err.stack ?? err)
  process.exitCode = 1
})
