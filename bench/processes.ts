/**
 * The child processes of a benchmark run: servers (one per measurement) and
 * the load generator (one per run), each started with tsx, pinned to a core
 * with `taskset` when there is one, and spoken to over IPC.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { once } from 'node:events'
import { mkdirSync, mkdtempSync, readdirSync, renameSync, rmSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { childEnv, reap } from '../support/processes.js'
import { ROOT, type FromLoad, type FromServer, type LoadRequest, type LoadResult, type ServerStats, type ToLoad, type ToServer } from './shared.js'

const SERVER = fileURLToPath(new URL('./server.ts', import.meta.url))
const LOAD = fileURLToPath(new URL('./load.ts', import.meta.url))

const pinnable = (core: number) => spawnSync('taskset', ['-c', String(core), 'true'], { stdio: 'ignore' }).status === 0
/** `taskset` is installed and can pin to cores 0 and 1 (load generator and server), so both exist here. */
export const tasksetWorks = pinnable(0) && pinnable(1)

/** Starts `file` with tsx, on `core` when given (callers give one only when tasksetWorks). */
function start (file: string, core: number | undefined, nodeArgs: string[], env: Record<string, string>): ChildProcess {
  const node = [process.execPath, ...nodeArgs, '--import', 'tsx', file]
  const [command, ...args] = core !== undefined ? ['taskset', '-c', String(core), ...node] : node
  return reap(spawn(command, args, { cwd: ROOT, env: childEnv(env), stdio: ['ignore', 'inherit', 'inherit', 'ipc'] }))
}

/** Waits for the first message that `match` accepts, or fails on exit or after `ms`. */
function waitFor<M, R> (child: ChildProcess, what: string, ms: number, match: (message: M) => R | undefined): Promise<R> {
  return new Promise((resolve, reject) => {
    const onMessage = (message: M) => {
      let result: R | undefined
      try {
        result = match(message)
      } catch (err) {
        cleanup()
        reject(err)
        return
      }
      if (result === undefined) return
      cleanup()
      resolve(result)
    }
    const onExit = (code: number | null) => {
      cleanup()
      reject(new Error(`${what}: the process exited (code ${code})`))
    }
    const timer = setTimeout(() => {
      cleanup()
      reject(new Error(`${what}: no answer within ${ms} ms`))
    }, ms)
    function cleanup () {
      clearTimeout(timer)
      child.off('message', onMessage)
      child.off('exit', onExit)
    }
    child.on('message', onMessage)
    child.once('exit', onExit)
  })
}

/** Waits for the child's first message as waitFor() does; when none comes, kills the child (its IPC channel would keep this process alive). */
async function waitForStart<M, R> (child: ChildProcess, what: string, match: (message: M) => R | undefined): Promise<R> {
  try {
    return await waitFor(child, what, 30_000, match)
  } catch (err) {
    child.kill('SIGKILL')
    throw err
  }
}

/** Asks the child to exit with `message`, kills it after `graceMs`, and resolves once it has exited. */
async function stopChild (child: ChildProcess, message: ToServer | ToLoad, graceMs: number): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return
  const exited = once(child, 'exit')
  if (child.connected) child.send(message)
  else child.kill('SIGKILL')
  const timer = setTimeout(() => child.kill('SIGKILL'), graceMs)
  await exited
  clearTimeout(timer)
}

let messageId = 0

export interface ServerProcess {
  url: string
  stats (): Promise<ServerStats>
  /** Runs a full GC first (the process must run with --expose-gc), then reports. */
  statsAfterGc (): Promise<ServerStats>
  /** Stops the server; with `cpuProfile`, its profile is in that file once this resolves (unless it had to be killed). */
  stop (): Promise<void>
}

export interface ServerOptions {
  core?: number
  redisUrl?: string
  postgresUrl?: string
  verify?: boolean
  nodeArgs?: string[]
  plugin?: string
  /** Run the server with `--cpu-prof` and keep its profile (the whole process, start to exit) in this file. */
  cpuProfile?: string
}

/** Node's default profile name, `CPU.<date>.<time>.<pid>.<thread id>.<sequence>.cpuprofile`, for the main thread (id 0). */
const MAIN_THREAD_PROFILE = /^CPU\.\d+\.\d+\.\d+\.0\.\d+\.cpuprofile$/

/**
 * Moves the main thread's profile out of `dir` to `file`, and removes `dir`.
 * Node writes one profile per thread, and tsx runs its module loader in a
 * thread of its own: with a fixed `--cpu-prof-name`, that thread's profile
 * would overwrite the server's. Hence a directory per server and Node's names.
 */
function keepMainThreadProfile (dir: string, file: string): void {
  try {
    const main = readdirSync(dir).find((name) => MAIN_THREAD_PROFILE.test(name))
    if (main !== undefined) renameSync(join(dir, main), file)
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
}

export async function startServer (name: string, options: ServerOptions): Promise<ServerProcess> {
  const env: Record<string, string> = { BENCH_CONFIG: name }
  if (options.plugin !== undefined) env.BENCH_PLUGIN = options.plugin
  if (options.redisUrl !== undefined) env.BENCH_REDIS_URL = options.redisUrl
  if (options.postgresUrl !== undefined) env.BENCH_POSTGRES_URL = options.postgresUrl
  if (options.verify === true) env.BENCH_VERIFY = '1'
  const nodeArgs = [...options.nodeArgs ?? []]
  const { cpuProfile } = options
  let profileDir: string | undefined
  if (cpuProfile !== undefined) {
    mkdirSync(dirname(cpuProfile), { recursive: true })
    profileDir = mkdtempSync(join(dirname(cpuProfile), '.cpu-prof-'))
    nodeArgs.push('--cpu-prof', `--cpu-prof-dir=${profileDir}`)
  }
  const child = start(SERVER, options.core, nodeArgs, env)
  let port: number
  try {
    port = await waitForStart(child, `server ${name}`, (message: FromServer) => {
      if (message.type === 'error') throw new Error(`server ${name} failed to start:\n${message.message}`)
      return message.type === 'listening' ? message.port : undefined
    })
  } catch (err) {
    if (profileDir !== undefined) rmSync(profileDir, { recursive: true, force: true })
    throw err
  }
  const ask = (type: 'stats' | 'gc') => {
    const id = ++messageId
    const answer = waitFor(child, `server ${name} ${type}`, 30_000, (message: FromServer) =>
      message.type === 'stats' && message.id === id ? message.stats : undefined)
    child.send({ type, id } satisfies ToServer)
    return answer
  }
  return {
    url: `http://127.0.0.1:${port}`,
    stats: () => ask('stats'),
    statsAfterGc: () => ask('gc'),
    async stop () {
      // Node writes the profiles as the process exits, before 'exit' reaches this process.
      await stopChild(child, { type: 'stop' }, 10_000)
      if (profileDir !== undefined && cpuProfile !== undefined) keepMainThreadProfile(profileDir, cpuProfile)
    }
  }
}

export interface LoadProcess {
  run (job: Omit<LoadRequest, 'type' | 'id'>, onProgress?: (responses: number) => void): Promise<LoadResult>
  stop (): Promise<void>
}

export async function startLoad (core: number | undefined): Promise<LoadProcess> {
  const child = start(LOAD, core, [], {})
  await waitForStart(child, 'load generator', (message: FromLoad) => message.type === 'ready' ? true : undefined)
  return {
    async run (job, onProgress) {
      const id = ++messageId
      const onMessage = (message: FromLoad) => {
        if (message.type === 'progress' && message.id === id) onProgress?.(message.responses)
      }
      child.on('message', onMessage)
      try {
        const limit = (job.amount === undefined ? job.duration * 1000 : 600_000) + 60_000
        const answer = waitFor(child, 'load run', limit, (message: FromLoad) => {
          if (message.type === 'error' && message.id === id) throw new Error(`load run failed:\n${message.message}`)
          return message.type === 'result' && message.id === id ? message.result : undefined
        })
        child.send({ type: 'run', id, ...job } satisfies ToLoad)
        return await answer
      } finally {
        child.off('message', onMessage)
      }
    },
    stop: () => stopChild(child, { type: 'exit' }, 5000)
  }
}
