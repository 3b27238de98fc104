/**
 * Runs a file of examples/ as the README says to, in a child process with
 * PORT 0, and waits for its "listening on <address>" line; the child is
 * killed at the end of the test.
 */
import { spawn } from 'node:child_process'
import { createInterface } from 'node:readline'
import { fileURLToPath } from 'node:url'
import type { Test } from 'tap'
import { childEnv, reap } from '../../support/processes.js'

const root = fileURLToPath(new URL('../..', import.meta.url))

/** Starts `examples/<file>` with `env`, and resolves with the line it printed first and the address in it. */
export async function runExample (t: Test, file: string, env: Record<string, string> = {}): Promise<{ line: string, address: string | undefined }> {
  const child = reap(spawn(process.execPath, ['--import', 'tsx', `examples/${file}`], {
    cwd: root, env: childEnv({ PORT: '0', NODE_NO_WARNINGS: '1', ...env }), stdio: ['ignore', 'pipe', 'inherit']
  }))
  t.teardown(() => { child.kill() })
  const line = await new Promise<string>((resolve, reject) => {
    createInterface({ input: child.stdout }).once('line', resolve)
    child.once('exit', (code) => reject(new Error(`examples/${file} exited with ${code}`)))
  })
  return { line, address: /listening on (http:\/\/127\.0\.0\.1:\d+)/.exec(line)?.[1] }
}
