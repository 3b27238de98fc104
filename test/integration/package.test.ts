/**
 * The package as a user installs it: `npm pack` holds only what a user needs;
 * installed into a fresh consumer with only `fastify` (no ioredis, no pg),
 * its declarations type-check with `strict` and `skipLibCheck: false` under
 * TypeScript 5 (ESM, NodeNext) and TypeScript 7 (`module: commonjs`), and
 * `require()` of it works on this Node.
 */
import t from 'tap'
import { execFileSync, spawnSync } from 'node:child_process'
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import '../helpers/crash-guard.js'

const root = fileURLToPath(new URL('../..', import.meta.url))
const require = createRequire(import.meta.url)
const versionOf = (name: string) => (JSON.parse(readFileSync(join(root, 'node_modules', name, 'package.json'), 'utf8')) as { version: string }).version
const TSC5 = require.resolve('typescript/bin/tsc')
/** The consumer's processes run as a user's would: without this test runner's loaders. */
const env = { ...process.env }
delete env.NODE_OPTIONS
delete env.NODE_V8_COVERAGE
/**
 * Runs node as a user would. tap re-adds its process-tracking loader to every child it sees
 * spawned, and that loader cannot load TypeScript 7's ES module entry point: a shell clears it.
 */
function plainNode (args: string[], cwd: string) {
  return spawnSync('sh', ['-c', 'unset NODE_OPTIONS; exec "$0" "$@"', process.execPath, ...args], { cwd, env, encoding: 'utf8' })
}
const TSC7 = join(root, 'node_modules', 'typescript7', 'bin', 'tsc')

/** What a consumer writes: the plugin, its options and route config, reply.idempotency, the stores' types, the errors. */
const CONSUMER = `
import Fastify from 'fastify'
import fastifyIdempotency, { MemoryStore, RedisStore, PostgresStore, errors, type FastifyIdempotencyOptions, type IdempotencyStore, type SqlClient } from 'fastify-idempotency'

declare module 'fastify' {
  interface FastifyRequest { user?: { id: string } }
}

const options: FastifyIdempotencyOptions = { mode: 'required', scope: (request) => request.user?.id, ttl: '24h', store: new MemoryStore({ maxBytes: 1 << 20 }) }
const app = Fastify()
app.register(fastifyIdempotency, options)
app.post('/pay', { config: { idempotency: { ttl: '7d' } } }, async (_request, reply) => {
  const token: string | undefined = reply.idempotency.token
  const signal: AbortSignal = reply.idempotency.signal
  return { token, aborted: signal.aborted }
})
const store: IdempotencyStore = app.idempotency.store
const redisStore: typeof RedisStore = RedisStore
const postgresStore: typeof PostgresStore = PostgresStore
const client: SqlClient = { query: async () => ({ rows: [], rowCount: 0 }) }
const error: Error = new errors.KeyMissingError('idempotency-key')
export { store, redisStore, postgresStore, client, error }
`

function tsconfig (compilerOptions: Record<string, unknown>): string {
  return JSON.stringify({ compilerOptions: { strict: true, skipLibCheck: false, noEmit: true, types: ['node'], ...compilerOptions }, include: ['*.ts'] }, null, 2)
}

t.test('packed, installed with only fastify, and type-checked as a consumer would', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'idem-consumer-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))

  const packed = JSON.parse(execFileSync('npm', ['pack', '--json', '--pack-destination', dir], { cwd: root, env, encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] })) as Array<{ filename: string, files: Array<{ path: string }> }>
  const files = packed[0].files.map((file) => file.path)
  t.ok(files.includes('dist/index.js') && files.includes('dist/index.d.ts'), 'the build and its declarations')
  t.same(files.filter((path) => !path.startsWith('dist/')).sort(), ['LICENSE', 'README.md', 'package.json'], 'and nothing else a user does not need')
  t.notOk(files.some((path) => /\.test\.|^dist\/(test|bench|support|examples)\//.test(path)), 'no tests, benchmarks or helpers')

  const consumer = join(dir, 'consumer')
  mkdirSync(consumer)
  writeFileSync(join(consumer, 'package.json'), JSON.stringify({ name: 'consumer', private: true, type: 'module' }))
  execFileSync('npm', ['install', '--no-audit', '--no-fund', '--prefer-offline', '--ignore-scripts',
    join(dir, packed[0].filename), `fastify@${versionOf('fastify')}`, `@types/node@${versionOf('@types/node')}`], { cwd: consumer, env, stdio: ['ignore', 'ignore', 'inherit'] })
  for (const absent of ['ioredis', 'pg', '@types/pg', '@fastify/redis', '@fastify/postgres']) {
    t.equal(plainNode(['-e', `require.resolve(${JSON.stringify(absent)})`], consumer).status, 1, `${absent} is not installed`)
  }

  for (const [name, tsc, compilerOptions] of [
    ['TypeScript 5, ESM (NodeNext)', TSC5, { module: 'nodenext', moduleResolution: 'nodenext', target: 'es2022' }],
    ['TypeScript 7, module commonjs', TSC7, { module: 'commonjs', target: 'es2022' }]
  ] as const) {
    const project = join(consumer, name.replace(/\W+/g, '-'))
    mkdirSync(project)
    writeFileSync(join(project, 'tsconfig.json'), tsconfig(compilerOptions))
    writeFileSync(join(project, 'index.ts'), CONSUMER)
    const run = plainNode([tsc, '-p', project], consumer)
    t.equal(run.status, 0, `${name}: the consumer type-checks with strict and skipLibCheck false`, { output: run.stdout + run.stderr })
  }

  const required = plainNode(['--input-type=commonjs', '-e',
    'const m = require("fastify-idempotency"); process.stdout.write(typeof m.default + " " + typeof m.fastifyIdempotency + " " + typeof m.MemoryStore)'], consumer)
  t.equal(required.stdout, 'function function function', `require() of the ESM package works on Node ${process.versions.node}`, { stderr: required.stderr })
})
