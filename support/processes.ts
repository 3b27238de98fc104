/**
 * Child processes of the tests and the benchmark: every child started here
 * is killed when this process exits, whatever happened; children run with
 * tap's coverage switched off; free loopback ports.
 */
import type { ChildProcess } from 'node:child_process'
import { createServer } from 'node:net'

export const HOST = '127.0.0.1'

const running = new Set<ChildProcess>()
process.on('exit', () => {
  for (const child of running) child.kill('SIGKILL')
})

/** Kills `child` (SIGKILL) if it is still running when this process exits. */
export function reap<T extends ChildProcess> (child: T): T {
  running.add(child)
  child.once('exit', () => running.delete(child))
  return child
}

/** A loopback port nobody listens on right now. */
export async function freePort (): Promise<number> {
  const server = createServer()
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject)
    server.listen(0, HOST, resolve)
  })
  const { port } = server.address() as { port: number }
  await new Promise((resolve) => server.close(resolve))
  return port
}

/**
 * The environment for a child process that runs a fixture with tsx, with
 * coverage off: tap's process tracking re-adds its own variables to every
 * child it sees spawned, and a child's coverage of the sources as tsx
 * transpiled them would be merged, with wrong line numbers, into the test's.
 */
export function childEnv (extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, ...extra, _TAPJS_PROCESSINFO_COVERAGE_: '0' }
  delete env.NODE_V8_COVERAGE
  return env
}
