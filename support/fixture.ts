/**
 * Child processes that run a fixture server with tsx: started, asked for
 * their port, and stopped (or killed) at the end whatever happened.
 */
import { spawn } from 'node:child_process'
import { once } from 'node:events'
import { createInterface } from 'node:readline'
import { fileURLToPath } from 'node:url'
import { childEnv, reap } from './processes.js'

export interface FixtureProcess {
  port: number
  url: string
  pid: number
  /** What the process wrote on stderr so far. */
  stderr (): string
  stop (): Promise<void>
}

/** Starts `test/integration/fixtures/<name>` with `node --import tsx` and waits for the port it prints. */
export async function startFixture (name: string, env: Record<string, string>): Promise<FixtureProcess> {
  const file = fileURLToPath(new URL(`../test/integration/fixtures/${name}`, import.meta.url))
  // Start-up warnings (no scope, an unbounded Redis queue) are the plugin's advice to operators; the
  // fixtures' stderr is kept for what the tests look for: log lines and crashes.
  const child = reap(spawn(process.execPath, ['--import', 'tsx', file], { env: childEnv({ NODE_NO_WARNINGS: '1', ...env }), stdio: ['ignore', 'pipe', 'pipe'] }))
  let stderr = ''
  child.stderr.on('data', (chunk) => { stderr += chunk })
  let exited = false
  const exit = once(child, 'exit').then(() => {
    exited = true
  })
  const stop = async () => {
    if (exited) return
    child.kill('SIGTERM')
    const timer = setTimeout(() => child.kill('SIGKILL'), 3000)
    await exit
    clearTimeout(timer)
  }
  try {
    const line = await new Promise<string>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`${name} did not print its port within 20 s\n${stderr}`)), 20_000)
      createInterface({ input: child.stdout }).once('line', (first) => {
        clearTimeout(timer)
        resolve(first)
      })
      exit.then(() => {
        clearTimeout(timer)
        reject(new Error(`${name} exited before listening\n${stderr}`))
      })
    })
    const { port } = JSON.parse(line) as { port: number }
    return { port, url: `http://127.0.0.1:${port}`, pid: child.pid as number, stderr: () => stderr, stop }
  } catch (err) {
    await stop()
    throw err
  }
}
