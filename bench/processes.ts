/**
 * The child processes of a benchmark run: servers (one per measurement) and
 * the load generator (one per run), each started with tsx, pinned to a core
 * with `taskset` when there is one, and spoken to over IPC.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { once } from 'node:events'
import { fileURLToPath } from 'node:url'
import type { FromLoad, FromServer, LoadRequest, LoadResult, ServerStats, ToLoad, ToServer } from './shared.js'

export const ROOT = fileURLToPath(new URL('..', import.meta.url))
const SERVER = fileURLToPath(new URL('./server.ts', import.meta.url))
const LOAD = fileURLToPath(new URL('./load.ts', import.meta.url))

/** `taskset` is installed and works here. */
export const tasksetWorks = spawnSync('taskset', ['-c', '0', 'true'], { stdio: 'ignore' }).status === 0

const running = new Set<ChildProcess>()
process.on('exit', () => {
  for (const child of running) child.kill('SIGKILL')
})

/** The environment of a child: no coverage collection (the smoke test runs under tap). */
function childEnv (extra: Record<string, string>): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, ...extra, _TAPJS_PROCESSINFO_COVERAGE_: '0' }
  delete env.NODE_V8_COVERAGE
  return env
}

function start (file: string, core: number | undefined, nodeArgs: string[], env: Record<string, string>): ChildProcess {
  const node = [process.execPath, ...nodeArgs, '--import', 'tsx', file]
  const [command, ...args] = core !== undefined && tasksetWorks ? ['taskset', '-c', String(core), ...node] : node
  const child = spawn(command, args, { cwd: ROOT, env: childEnv(env), stdio: ['ignore', 'inherit', 'inherit', 'ipc'] })
  running.add(child)
  child.once('exit', () => running.delete(child))
  return child
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

let messageId = 0

export interface ServerProcess {
  name: string
  url: string
  pid: number
  stats (): Promise<ServerStats>
  /** Runs a full GC first (the process must run with --expose-gc), then reports. */
  statsAfterGc (): Promise<ServerStats>
  /** Starts the in-process CPU profiler; profileStop writes what it recorded to `file`. */
  profileStart (): Promise<void>
  profileStop (file: string): Promise<void>
  stop (): Promise<void>
}

export async function startServer (name: string, options: { core?: number, redisUrl?: string, verify?: boolean, nodeArgs?: string[], plugin?: string }): Promise<ServerProcess> {
  const env: Record<string, string> = { BENCH_CONFIG: name }
  if (options.plugin !== undefined) env.BENCH_PLUGIN = options.plugin
  if (options.redisUrl !== undefined) env.BENCH_REDIS_URL = options.redisUrl
  if (options.verify === true) env.BENCH_VERIFY = '1'
  const child = start(SERVER, options.core, options.nodeArgs ?? [], env)
  const exited = once(child, 'exit')
  const port = await waitFor(child, `server ${name}`, 30_000, (message: FromServer) => {
    if (message.type === 'error') throw new Error(`server ${name} failed to start:\n${message.message}`)
    return message.type === 'listening' ? message.port : undefined
  })
  const ask = (type: 'stats' | 'gc') => {
    const id = ++messageId
    const answer = waitFor(child, `server ${name} ${type}`, 30_000, (message: FromServer) =>
      message.type === 'stats' && message.id === id ? message.stats : undefined)
    child.send({ type, id } satisfies ToServer)
    return answer
  }
  const profile = async (message: { type: 'profile-start' } | { type: 'profile-stop', file: string }) => {
    const id = ++messageId
    const answer = waitFor(child, `server ${name} ${message.type}`, 30_000, (reply: FromServer) => {
      if (reply.type === 'error') throw new Error(`server ${name}: ${reply.message}`)
      return reply.type === 'done' && reply.id === id ? true : undefined
    })
    child.send({ ...message, id } satisfies ToServer)
    await answer
  }
  return {
    name,
    url: `http://127.0.0.1:${port}`,
    profileStart: () => profile({ type: 'profile-start' }),
    profileStop: (file) => profile({ type: 'profile-stop', file }),
    pid: child.pid as number,
    stats: () => ask('stats'),
    statsAfterGc: () => ask('gc'),
    async stop () {
      if (child.exitCode !== null || child.signalCode !== null) return
      child.send({ type: 'stop' } satisfies ToServer)
      const timer = setTimeout(() => child.kill('SIGKILL'), 10_000)
      await exited
      clearTimeout(timer)
    }
  }
}

export interface LoadProcess {
  run (job: Omit<LoadRequest, 'type' | 'id'>, onProgress?: (responses: number) => void): Promise<LoadResult>
  stop (): Promise<void>
}

export async function startLoad (core: number | undefined): Promise<LoadProcess> {
  const child = start(LOAD, core, [], {})
  const exited = once(child, 'exit')
  await waitFor(child, 'load generator', 30_000, (message: FromLoad) => message.type === 'ready' ? true : undefined)
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
    async stop () {
      if (child.exitCode !== null || child.signalCode !== null) return
      child.send({ type: 'exit' } satisfies ToLoad)
      const timer = setTimeout(() => child.kill('SIGKILL'), 5000)
      await exited
      clearTimeout(timer)
    }
  }
}
