/**
 * Real Redis for the tests and the benchmark: a `redis-server` on a free loopback port with
 * persistence off, or a three-node Cluster. Every server started here is
 * stopped by `stop()`, and killed when the test process exits whatever
 * happened.
 *
 * Without `redis-server` on PATH the Redis test files skip with one line
 * saying how to install it, unless `CI` is set: then they fail.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { mkdtempSync, rmSync } from 'node:fs'
import { createConnection } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { HOST, freePort, reap } from './processes.js'
const INSTALL = 'redis-server is not installed: apt-get install redis-server redis-tools'

function onPath (command: string): boolean {
  return spawnSync(command, ['--version'], { stdio: 'ignore' }).error === undefined
}

/** `redis-server` and `redis-cli` are both on PATH. */
export const redisAvailable = onPath('redis-server') && onPath('redis-cli')

interface TestLike {
  plan (n: number, comment?: string): void
}

/**
 * Runs `suite` when Redis is available. Otherwise skips the file with one
 * line saying how to install it, or throws when `CI` is set (CI must run it).
 */
export function withRedis<T extends TestLike> (t: T, suite: (t: T) => unknown): void {
  if (redisAvailable) {
    suite(t)
    return
  }
  if (process.env.CI) throw new Error(`${INSTALL} (CI is set, so the Redis tests must run)`)
  t.plan(0, INSTALL)
}

export interface RedisServer {
  port: number
  url: string
  /** The pid of the running redis-server (it changes with `restart()`). */
  readonly pid: number
  /** The server's output so far, for failure messages. */
  log (): string
  /** Kills the server at once (SIGKILL), as a crash would; its data directory is kept for `restart()`. */
  crash (): Promise<void>
  /** Starts the server again after `crash()`, on the same port and data directory. */
  restart (): Promise<void>
  stop (): Promise<void>
}

export interface RedisServerOptions {
  /** More `redis-server` arguments; they override the defaults and the options below (e.g. `['--appendonly', 'yes']`). */
  args?: string[]
  /** `maxmemory`, e.g. `'2mb'`. */
  maxmemory?: string
  /** `maxmemory-policy`, e.g. `'allkeys-lru'`. */
  policy?: string
  /** A replica of the server on this port: started with `--replicaof`, returned once its link to the primary is up. */
  replicaOf?: number
}

export interface RedisCluster {
  ports: number[]
  /** Startup nodes for `new Cluster(nodes)`. */
  nodes: Array<{ host: string, port: number }>
  stop (): Promise<void>
}

/** Sends one inline command and returns the raw reply, or undefined if nothing answers. */
async function ask (port: number, command: string): Promise<string | undefined> {
  return await new Promise((resolve) => {
    const socket = createConnection({ host: HOST, port })
    let reply = ''
    const done = (value: string | undefined) => {
      socket.destroy()
      resolve(value)
    }
    socket.setTimeout(1000, () => done(undefined))
    socket.once('error', () => done(undefined))
    socket.once('connect', () => socket.write(command + '\r\n'))
    socket.on('data', (chunk) => {
      reply += chunk.toString()
      // A simple reply ends at the first CRLF; a bulk reply ($len) once its length has arrived.
      const bulk = /^\$(\d+)\r\n/.exec(reply)
      if (bulk === null ? reply.includes('\r\n') : reply.length >= bulk[0].length + Number(bulk[1]) + 2) done(reply)
    })
  })
}

async function waitFor (what: string, check: () => Promise<boolean>, log: () => string, limit = 10_000): Promise<void> {
  const deadline = Date.now() + limit
  while (!await check()) {
    if (Date.now() > deadline) throw new Error(`redis test helper: timed out waiting for ${what}\n${log()}`)
    await sleep(20)
  }
}

interface Spawned {
  port: number
  child: ChildProcess
  output: () => string
  stop: () => Promise<void>
}

async function spawnServer (extra: (port: number) => Promise<string[]>, dir: string, fixedPort?: number): Promise<Spawned> {
  for (let attempt = 1; ; attempt++) {
    const port = fixedPort ?? await freePort()
    const args = ['--port', String(port), '--bind', HOST, '--save', '', '--appendonly', 'no', '--dir', dir, ...await extra(port)]
    const child = reap(spawn('redis-server', args, { stdio: ['ignore', 'pipe', 'pipe'] }))
    let output = ''
    child.stdout.on('data', (chunk) => { output += chunk })
    child.stderr.on('data', (chunk) => { output += chunk })
    let dead = false
    const exited = new Promise<void>((resolve) => child.once('exit', () => {
      dead = true
      resolve()
    }))
    const stop = async () => {
      if (!dead) child.kill('SIGKILL')
      await exited
    }
    try {
      await waitFor(`redis-server on port ${port} to answer PING`, async () => {
        if (dead) throw new Error(`redis-server exited\n${output}`)
        return (await ask(port, 'PING'))?.startsWith('+PONG') === true
      }, () => output)
      return { port, child, output: () => output, stop }
    } catch (err) {
      await stop()
      // Another process may have taken the port between the probe and the start.
      if (attempt < 5 && fixedPort === undefined && output.includes('already in use')) continue
      throw err
    }
  }
}

/** Starts a `redis-server` on a free loopback port, persistence off unless `args` say otherwise; `stop()` kills it. */
export async function startRedis (options: RedisServerOptions = {}): Promise<RedisServer> {
  const dir = mkdtempSync(join(tmpdir(), 'idem-redis-'))
  const args: string[] = []
  if (options.maxmemory !== undefined) args.push('--maxmemory', options.maxmemory)
  if (options.policy !== undefined) args.push('--maxmemory-policy', options.policy)
  if (options.replicaOf !== undefined) args.push('--replicaof', HOST, String(options.replicaOf))
  args.push(...options.args ?? [])
  const extra = async () => args
  try {
    let server = await spawnServer(extra, dir)
    const port = server.port
    if (options.replicaOf !== undefined) {
      await waitFor(`the replica on port ${port} to sync with port ${options.replicaOf}`,
        async () => (await ask(port, 'INFO replication'))?.includes('master_link_status:up') === true, () => server.output())
        .catch(async (err: unknown) => {
          await server.stop()
          throw err
        })
    }
    let earlier = ''
    return {
      port,
      url: `redis://${HOST}:${port}`,
      get pid () { return server.child.pid as number },
      log: () => earlier + server.output(),
      crash: () => server.stop(),
      async restart () {
        earlier += server.output()
        server = await spawnServer(extra, dir, port)
      },
      async stop () {
        await server.stop()
        rmSync(dir, { recursive: true, force: true })
      }
    }
  } catch (err) {
    rmSync(dir, { recursive: true, force: true })
    throw err
  }
}

/** Starts three `cluster-enabled` nodes on loopback, joins them, and waits for `cluster_state:ok`. */
export async function startRedisCluster (): Promise<RedisCluster> {
  const nodes: Spawned[] = []
  const dirs: string[] = []
  const stop = async () => {
    await Promise.all(nodes.map((node) => node.stop()))
    for (const dir of dirs) rmSync(dir, { recursive: true, force: true })
  }
  try {
    for (let i = 0; i < 3; i++) {
      const dir = mkdtempSync(join(tmpdir(), 'idem-redis-cluster-'))
      dirs.push(dir)
      nodes.push(await spawnServer(async () => [
        '--cluster-enabled', 'yes',
        '--cluster-config-file', join(dir, 'nodes.conf'),
        '--cluster-port', String(await freePort()),
        '--cluster-node-timeout', '5000'
      ], dir))
    }
    const log = () => nodes.map((node) => node.output()).join('\n')
    const create = spawnSync('redis-cli', ['--cluster', 'create', ...nodes.map((node) => `${HOST}:${node.port}`), '--cluster-yes'], { encoding: 'utf8', timeout: 30_000 })
    if (create.status !== 0) throw new Error(`redis-cli --cluster create failed\n${create.stdout}\n${create.stderr}\n${log()}`)
    for (const node of nodes) {
      await waitFor(`cluster_state:ok on port ${node.port}`, async () => (await ask(node.port, 'CLUSTER INFO'))?.includes('cluster_state:ok') === true, log, 30_000)
    }
    const ports = nodes.map((node) => node.port)
    return { ports, nodes: ports.map((port) => ({ host: HOST, port })), stop }
  } catch (err) {
    await stop()
    throw err
  }
}

let unique = 0
/** A key prefix no other test (or test file running in parallel) uses. */
export function uniquePrefix (name = 'test'): string {
  return `idem-test:${process.pid}:${name}:${++unique}:`
}
