/**
 * A tiny round of the benchmark (bench/run.ts), as a child process: bare
 * Fastify and the plugin with its memory store, fresh keys, one second each.
 * It checks that the harness works and really sends fresh keys: a table row
 * with a positive req/s, every key reaching the server once, and the
 * plugin's handler running exactly once per distinct key. No speed is
 * asserted: speed is only measured, by `npm run bench`.
 */
import t from 'tap'
import { spawn } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { childEnv } from '../support/processes.js'

interface Row { config: string, scenario: string, rps: number, handlerShare: number }
interface Check {
  config: string
  scenario: string
  keysSent: number
  before: { handlerRuns: number }
  stats: { handlerRuns: number, keyedRequests?: number, distinctRequestKeys?: number, distinctHandlerKeys?: number }
}

const root = fileURLToPath(new URL('..', import.meta.url))

t.test('one short round: bare Fastify and the memory store, fresh keys', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'idem-bench-smoke-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  const json = join(dir, 'result.json')
  const args = ['--import', 'tsx', 'bench/run.ts', '--only', 'idempotency-memory', '--scenarios', 'fresh',
    '--rounds', '1', '--duration', '1', '--warmup', '0.5', '--attempts', '1', '--max-noise', '100', '--quiet-wait', '0', '--source', '--verify', '--no-write', '--json', json]
  const child = spawn(process.execPath, args, { cwd: root, env: childEnv(), stdio: ['ignore', 'pipe', 'pipe'] })
  let output = ''
  child.stdout.on('data', (chunk) => { output += chunk })
  child.stderr.on('data', (chunk) => { output += chunk })
  const timer = setTimeout(() => child.kill('SIGKILL'), 60_000)
  const code = await new Promise<number | null>((resolve) => child.once('exit', resolve))
  clearTimeout(timer)
  t.equal(code, 0, 'bench/run.ts exits with 0', { output })

  const result = JSON.parse(readFileSync(json, 'utf8')) as { rows: Row[], checks: Check[] }
  for (const config of ['fastify', 'idempotency-memory']) {
    const row = result.rows.find((r) => r.config === config && r.scenario === 'fresh')
    t.ok(row !== undefined && row.rps > 0, `${config}: a table row with a positive req/s`, { row })
    t.match(output, new RegExp(`\\| ${config} \\| fresh \\| [\\d,]+ \\|`), `${config}: the printed table has its row`)
  }

  const check = result.checks.find((c) => c.config === 'idempotency-memory') as Check
  const { keyedRequests, distinctRequestKeys, distinctHandlerKeys, handlerRuns } = check.stats
  t.ok((keyedRequests ?? 0) > 0, 'requests reached the plugin\'s server')
  t.equal(distinctRequestKeys, keyedRequests, 'every request reached the server with a key never sent before')
  t.equal(handlerRuns, distinctHandlerKeys, 'the handler ran exactly once per distinct key')
  t.equal(distinctHandlerKeys, distinctRequestKeys, 'and for every key that reached the server')
  t.ok(check.keysSent >= check.stats.handlerRuns - check.before.handlerRuns, 'the load generator handed out at least as many keys as were measured')
})
