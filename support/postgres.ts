/**
 * Real PostgreSQL for the tests: a cluster made with `initdb` in a temporary
 * folder and started with `pg_ctl` on a free loopback port (fsync off, unix
 * sockets in that folder). Every server started here is stopped by `stop()`,
 * and stopped when the test process exits, whatever happened: an exit
 * handler for a normal exit, and a small watchdog process for a test process
 * that is killed (pg_ctl runs the server as a daemon, so it is no child that
 * the process reaper could kill).
 *
 * PostgreSQL refuses to run as root: as root, initdb and pg_ctl run as the
 * `postgres` user (`runuser`), which owns the folder. The binaries are found
 * on PATH or in `/usr/lib/postgresql/<version>/bin`, where Debian's package
 * puts them.
 *
 * Without PostgreSQL the PostgreSQL test files skip with one line saying how
 * to install it, unless `CI` is set: then they fail.
 */
import { spawn, spawnSync } from 'node:child_process'
import { accessSync, chownSync, constants, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { delimiter, join } from 'node:path'
import { HOST, freePort, reap } from './processes.js'

const INSTALL = 'PostgreSQL is not installed: apt-get install postgresql'

function executable (path: string): boolean {
  try {
    accessSync(path, constants.X_OK)
    return true
  } catch {
    return false
  }
}

/** The folder holding both `initdb` and `pg_ctl`: on PATH first, then the newest Debian version. */
function findBinaries (): string | undefined {
  const debian = '/usr/lib/postgresql'
  const versions = existsSync(debian)
    ? readdirSync(debian).filter((name) => /^\d+(\.\d+)?$/.test(name)).sort((a, b) => Number(b) - Number(a))
    : []
  const folders = [...(process.env.PATH ?? '').split(delimiter).filter(Boolean), ...versions.map((version) => join(debian, version, 'bin'))]
  return folders.find((folder) => executable(join(folder, 'initdb')) && executable(join(folder, 'pg_ctl')))
}

/** The uid and gid of the `postgres` user, when there is one. */
function postgresUser (): { uid: number, gid: number } | undefined {
  const uid = spawnSync('id', ['-u', 'postgres'], { encoding: 'utf8' })
  const gid = spawnSync('id', ['-g', 'postgres'], { encoding: 'utf8' })
  if (uid.status !== 0 || gid.status !== 0) return undefined
  return { uid: Number(uid.stdout), gid: Number(gid.stdout) }
}

const binaries = findBinaries()
const asRoot = process.getuid?.() === 0
const user = asRoot ? postgresUser() : undefined

/** initdb and pg_ctl were found (and, as root, a `postgres` user to run them). */
export const postgresAvailable = binaries !== undefined && (!asRoot || user !== undefined)

interface TestLike {
  plan (n: number, comment?: string): void
}

/**
 * Runs `suite` when PostgreSQL is available. Otherwise skips the file with
 * one line saying how to install it, or throws when `CI` is set (CI must run it).
 */
export function withPostgres<T extends TestLike> (t: T, suite: (t: T) => unknown): void {
  if (postgresAvailable) {
    suite(t)
    return
  }
  if (process.env.CI) throw new Error(`${INSTALL} (CI is set, so the PostgreSQL tests must run)`)
  t.plan(0, INSTALL)
}

/** The command line that runs a PostgreSQL binary as a user PostgreSQL accepts. */
function command (name: 'initdb' | 'pg_ctl', args: string[]): [string, string[]] {
  const path = join(binaries as string, name)
  return asRoot ? ['runuser', ['-u', 'postgres', '--', path, ...args]] : [path, args]
}

async function run (name: 'initdb' | 'pg_ctl', args: string[]): Promise<{ status: number | null, output: string }> {
  const [file, argv] = command(name, args)
  const child = reap(spawn(file, argv, { stdio: ['ignore', 'pipe', 'pipe'] }))
  let output = ''
  child.stdout.on('data', (chunk) => { output += chunk })
  child.stderr.on('data', (chunk) => { output += chunk })
  const status = await new Promise<number | null>((resolve, reject) => {
    child.once('error', reject)
    child.once('close', resolve)
  })
  return { status, output }
}

export interface PostgresServer {
  port: number
  /** `postgres://postgres@127.0.0.1:<port>/postgres` (trust authentication, loopback only). */
  connectionString: string
  /** The pid of the running postmaster, the parent of every server process (it changes with `restart()`). */
  readonly pid: number
  /** The server's log so far, for failure messages. */
  log (): string
  /** Stops the server at once, as a crash would (`pg_ctl stop -m immediate`: no checkpoint, recovery on restart). */
  crash (): Promise<void>
  /** Starts the server again after `crash()`, on the same port and data folder. */
  restart (): Promise<void>
  /** Stops the server and deletes its folder. */
  stop (): Promise<void>
}

export interface PostgresServerOptions {
  /** More server settings (`-c name=value`); they override the defaults. */
  settings?: Record<string, string>
}

/** Data folders of the servers still running, stopped on exit. */
const running = new Set<{ data: string, folder: string }>()
process.on('exit', () => {
  for (const { data, folder } of running) {
    const [file, argv] = command('pg_ctl', ['stop', '-D', data, '-m', 'immediate'])
    spawnSync(file, argv, { stdio: 'ignore' })
    rmSync(folder, { recursive: true, force: true })
  }
})

/**
 * A detached shell that outlives this process if it is killed (SIGKILL,
 * SIGTERM skip exit handlers), then stops the server and deletes its folder.
 * Values go in as positional parameters: nothing is spliced into the script.
 */
function watchdog (data: string, folder: string): void {
  const [file, argv] = command('pg_ctl', ['stop', '-D', data, '-m', 'immediate'])
  const script = [
    'pid=$1 data=$2 folder=$3; shift 3',
    'while kill -0 "$pid" 2>/dev/null; do sleep 1; done',
    'if [ -d "$data" ]; then "$@" >/dev/null 2>&1; fi',
    'rm -rf "$folder"'
  ].join('\n')
  spawn('sh', ['-c', script, 'watchdog', String(process.pid), data, folder, file, ...argv], { detached: true, stdio: 'ignore' }).unref()
}

/** Creates a cluster in a new temporary folder and starts it on a free loopback port. */
export async function startPostgres (options: PostgresServerOptions = {}): Promise<PostgresServer> {
  const folder = mkdtempSync(join(tmpdir(), 'idem-pg-'))
  if (user !== undefined) chownSync(folder, user.uid, user.gid)
  const data = join(folder, 'data')
  const logFile = join(folder, 'server.log')
  const log = () => existsSync(logFile) ? readFileSync(logFile, 'utf8') : ''
  const entry = { data, folder }
  try {
    const init = await run('initdb', ['-D', data, '-U', 'postgres', '--auth=trust', '-E', 'UTF8', '--locale=C', '--no-sync', '--no-instructions'])
    if (init.status !== 0) throw new Error(`initdb failed\n${init.output}`)
    running.add(entry)
    watchdog(data, folder)

    const start = async (port: number) => {
      const settings: Record<string, string> = {
        listen_addresses: HOST,
        port: String(port),
        unix_socket_directories: folder,
        fsync: 'off',
        synchronous_commit: 'off',
        full_page_writes: 'off',
        max_connections: '200',
        ...options.settings
      }
      // pg_ctl hands -o to the server's command line, split on spaces: values are quoted for it.
      const serverOptions = Object.entries(settings).map(([name, value]) => `-c ${name}='${value.replace(/'/g, "'\\''")}'`).join(' ')
      return await run('pg_ctl', ['start', '-D', data, '-l', logFile, '-w', '-t', '60', '-o', serverOptions])
    }

    let port = await freePort()
    for (let attempt = 1; ; attempt++) {
      const started = await start(port)
      if (started.status === 0) break
      // Another process may have taken the port between the probe and the start.
      if (attempt < 5 && /could not bind|already in use/i.test(log())) {
        port = await freePort()
        continue
      }
      throw new Error(`pg_ctl start failed\n${started.output}\n${log()}`)
    }

    const stopNow = async () => {
      const stopped = await run('pg_ctl', ['stop', '-D', data, '-m', 'immediate'])
      if (stopped.status !== 0) throw new Error(`pg_ctl stop failed\n${stopped.output}\n${log()}`)
    }
    return {
      port,
      connectionString: `postgres://postgres@${HOST}:${port}/postgres`,
      // postmaster.pid: the pid on its first line, while the server runs.
      get pid () { return Number(readFileSync(join(data, 'postmaster.pid'), 'utf8').split('\n', 1)[0]) },
      log,
      crash: stopNow,
      async restart () {
        const started = await start(port)
        if (started.status !== 0) throw new Error(`pg_ctl start (restart) failed\n${started.output}\n${log()}`)
      },
      async stop () {
        await run('pg_ctl', ['stop', '-D', data, '-m', 'immediate'])
        running.delete(entry)
        rmSync(folder, { recursive: true, force: true })
      }
    }
  } catch (err) {
    await run('pg_ctl', ['stop', '-D', data, '-m', 'immediate'])
    running.delete(entry)
    rmSync(folder, { recursive: true, force: true })
    throw err
  }
}

let unique = 0
/** A table name no other test (or test file running in parallel) uses. */
export function uniqueTable (name = 'test'): string {
  return `idem_${name}_${process.pid}_${++unique}`
}
