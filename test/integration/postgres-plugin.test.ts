/**
 * `store: 'postgres'` on @fastify/postgres, and transactional completion:
 * `reply.idempotency.completeWith(client, body)` saves the response in the
 * handler's own transaction, so the record commits (or rolls back) with the
 * handler's writes. A stale owner whose claim was taken over is refused
 * (FST_IDEMPOTENCY_CLAIM_LOST) and its transaction rolls back.
 */
import t, { type Test } from 'tap'
import Fastify, { type FastifyInstance } from 'fastify'
import fastifyPostgres from '@fastify/postgres'
import pg from 'pg'
import fastifyIdempotency, { PostgresStore } from '../../index.js'
import type { FastifyIdempotencyOptions, SqlClient } from '../../index.js'
import '../helpers/crash-guard.js'
import { capturingLogger, ERROR, gate, until, WARN, type LogLine } from '../helpers/app.js'
import { startPostgres, uniqueTable, withPostgres, type PostgresServer } from '../../support/postgres.js'

withPostgres(t, (t) => {
  let server: PostgresServer
  let admin: pg.Pool
  t.before(async () => {
    server = await startPostgres()
    admin = new pg.Pool({ connectionString: server.connectionString })
  })
  t.teardown(async () => {
    await admin?.end()
    await server?.stop()
  })

  /** An app with @fastify/postgres and the plugin on `store: 'postgres'`, its own table, and a payments table. */
  async function postgresApp (t: Test, options: FastifyIdempotencyOptions = {}, lines?: LogLine[]) {
    const table = uniqueTable('plugin')
    const payments = uniqueTable('payments')
    await admin.query(`CREATE TABLE ${payments} (key text NOT NULL, amount int NOT NULL, owner text)`)
    const app = Fastify(lines === undefined ? {} : capturingLogger(lines, 'debug'))
    t.teardown(() => app.close())
    await app.register(fastifyPostgres, { connectionString: server.connectionString })
    await app.register(fastifyIdempotency, { store: 'postgres', postgres: { table }, storeTimeout: 300, lockTtl: 1000, ...options })
    const rows = async (key: string) => (await admin.query(`SELECT owner FROM ${payments} WHERE key = $1`, [key])).rows as Array<{ owner: string }>
    return { app, table, payments, rows }
  }

  const pay = (app: FastifyInstance, key: string, amount = 10) =>
    app.inject({ method: 'POST', url: '/pay', headers: { 'idempotency-key': key }, payload: { amount } })

  t.test('store: \'postgres\' keeps records in the table of @fastify/postgres\'s pool; a retry is replayed from it', async (t) => {
    const { app, table } = await postgresApp(t)
    let runs = 0
    app.post('/pay', async (_request, reply) => {
      reply.code(201)
      return { run: ++runs }
    })
    await app.ready()
    t.ok(app.idempotency.store instanceof PostgresStore)
    const first = await pay(app, 'k')
    t.equal(first.statusCode, 201)
    let rows: Array<{ status_code: number | null, done: boolean }> = []
    for (let i = 0; i < 100 && rows[0]?.done !== true; i++) {
      rows = (await admin.query(`SELECT status_code, completed_at IS NOT NULL AS done FROM ${table}`)).rows
      await new Promise((resolve) => setTimeout(resolve, 20))
    }
    t.match(rows, [{ status_code: 201, done: true }], 'the completed record is in the table')
    const other = Fastify()
    t.teardown(() => other.close())
    await other.register(fastifyPostgres, { connectionString: server.connectionString })
    await other.register(fastifyIdempotency, { store: 'postgres', postgres: { table }, storeTimeout: 300, lockTtl: 1000, replayCache: 0 })
    other.post('/pay', async () => ({ other: true }))
    const replay = await pay(other, 'k')
    t.equal(replay.statusCode, 201)
    t.equal(replay.headers['idempotent-replayed'], 'true', 'another process replays it from Postgres')
    t.equal(replay.body, first.body)
  })

  t.test('pgNamespace picks a named database; without @fastify/postgres, start-up says what to register', async (t) => {
    const app = Fastify()
    t.teardown(() => app.close())
    await app.register(fastifyPostgres, { connectionString: server.connectionString, name: 'billing' })
    await app.register(fastifyIdempotency, { store: 'postgres', pgNamespace: 'billing', postgres: { table: uniqueTable('named') }, storeTimeout: 300 })
    app.post('/pay', async () => ({ ok: true }))
    await pay(app, 'k')
    t.equal((await pay(app, 'k')).headers['idempotent-replayed'], 'true')

    // A route may keep its records in a Postgres database whatever the plugin's store.
    const mixed = Fastify()
    t.teardown(() => mixed.close())
    await mixed.register(fastifyPostgres, { connectionString: server.connectionString, name: 'ledger' })
    await mixed.register(fastifyIdempotency, { postgres: { table: uniqueTable('mixed') }, storeTimeout: 300 })
    mixed.post('/pay', { config: { idempotency: { pgNamespace: 'ledger' } } }, async () => ({ ok: true }))
    await pay(mixed, 'k')
    t.equal((await pay(mixed, 'k')).headers['idempotent-replayed'], 'true')
    t.notOk(mixed.idempotency.store instanceof PostgresStore, 'the plugin\'s own store is still the memory store')

    const bare = Fastify()
    t.teardown(() => bare.close())
    await t.rejects(async () => { await bare.register(fastifyIdempotency, { store: 'postgres' }) }, {
      code: 'FST_IDEMPOTENCY_INVALID_OPTION',
      message: /register @fastify\/postgres before fastify-idempotency/
    })
    const notADatabase = Fastify()
    t.teardown(() => notADatabase.close())
    notADatabase.decorate('pg', {} as never)
    await t.rejects(async () => { await notADatabase.register(fastifyIdempotency, { store: 'postgres' }) }, {
      message: /fastify\.pg is not a @fastify\/postgres database: register @fastify\/postgres before fastify-idempotency \(or set pgNamespace\)/
    })
    const wrongName = Fastify()
    t.teardown(() => wrongName.close())
    await wrongName.register(fastifyPostgres, { connectionString: server.connectionString })
    await t.rejects(async () => { await wrongName.register(fastifyIdempotency, { store: 'postgres', pgNamespace: 'nope' }) }, {
      message: /fastify\.pg\.nope is not a @fastify\/postgres database: register @fastify\/postgres with \{ name: 'nope' \}/
    })
  })

  t.test('completeWith: the record commits with the handler\'s writes; a retry replays it and nothing runs twice', async (t) => {
    const lines: LogLine[] = []
    const { app, payments, rows } = await postgresApp(t, {}, lines)
    let runs = 0
    app.post('/pay', async (request, reply) => {
      runs++
      const { amount } = request.body as { amount: number }
      reply.code(201)
      const payment = { id: `pay_${runs}`, amount }
      await app.pg.transact(async (client) => {
        await client.query(`INSERT INTO ${payments} (key, amount, owner) VALUES ($1, $2, $3)`, [reply.idempotency.key, amount, payment.id])
        await reply.idempotency.completeWith(client, payment)
      })
      return payment
    })
    const first = await pay(app, 'k', 25)
    t.equal(first.statusCode, 201)
    t.same(first.json(), { id: 'pay_1', amount: 25 })
    const replay = await pay(app, 'k', 25)
    t.equal(replay.headers['idempotent-replayed'], 'true')
    t.equal(replay.statusCode, 201)
    t.equal(replay.body, first.body, 'the bytes completeWith saved are the bytes the client got')
    t.equal(replay.headers['content-type'], first.headers['content-type'])
    t.equal(runs, 1)
    t.same(await rows('k'), [{ owner: 'pay_1' }])
    t.notOk(lines.some((line) => line.level >= WARN), 'nothing to warn about')
  })

  t.test('a transaction that rolls back after completeWith: nothing was saved, the claim is released, the retry runs once', async (t) => {
    const lines: LogLine[] = []
    const { app, payments, rows } = await postgresApp(t, {}, lines)
    let runs = 0
    app.post('/pay', async (_request, reply) => {
      const run = ++runs
      const payment = { id: `pay_${run}` }
      await app.pg.transact(async (client) => {
        await client.query(`INSERT INTO ${payments} (key, amount, owner) VALUES ($1, 1, $2)`, [reply.idempotency.key, payment.id])
        await reply.idempotency.completeWith(client, payment)
        if (run === 1) throw new Error('the ledger refused it')
      })
      return payment
    })
    t.equal((await pay(app, 'k')).statusCode, 500)
    await until(() => lines.some((line) => /completeWith did not commit; the claim is released/.test(line.msg)))
    const retry = await pay(app, 'k')
    t.equal(retry.statusCode, 200)
    t.same(retry.json(), { id: 'pay_2' })
    t.same(await rows('k'), [{ owner: 'pay_2' }], 'one payment: the rolled-back one left nothing')
    t.equal((await pay(app, 'k')).headers['idempotent-replayed'], 'true')
  })

  t.test('a stale owner whose claim was taken over: completeWith throws CLAIM_LOST, its transaction rolls back, only the new owner\'s row stays', async (t) => {
    const { app, table, payments, rows } = await postgresApp(t)
    const inside = gate()
    const proceed = gate()
    let runs = 0
    app.post('/pay', async (_request, reply) => {
      const run = ++runs
      await app.pg.transact(async (client) => {
        await client.query(`INSERT INTO ${payments} (key, amount, owner) VALUES ($1, 1, $2)`, [reply.idempotency.key, `run ${run}`])
        if (run === 1) {
          inside.open()
          await proceed.promise
        }
        await reply.idempotency.completeWith(client, { run })
      })
      return { run }
    })
    const stale = pay(app, 'k')
    await inside.promise
    // The stale owner's lease runs out (a frozen process, a partition): its claim expires in the table.
    await admin.query(`UPDATE ${table} SET expires_at = clock_timestamp() WHERE completed_at IS NULL`)
    const fresh = await pay(app, 'k')
    t.equal(fresh.statusCode, 200, 'the new owner took the key over and completed it')
    t.same(fresh.json(), { run: 2 })
    proceed.open()
    const refused = await stale
    t.equal(refused.statusCode, 409)
    t.equal(refused.json().code, 'FST_IDEMPOTENCY_CLAIM_LOST')
    t.same(await rows('k'), [{ owner: 'run 2' }], 'the stale owner\'s side effect never committed')
    const replay = await pay(app, 'k')
    t.same(replay.json(), { run: 2 }, 'retries replay the new owner\'s response')
  })

  t.test('completeWith where it cannot work: another store, a request without a claim, twice', async (t) => {
    const memory = Fastify()
    t.teardown(() => memory.close())
    await memory.register(fastifyIdempotency)
    const client: SqlClient = { query: async () => ({ rows: [], rowCount: 0 }) }
    memory.post('/pay', async (_request, reply) => {
      await reply.idempotency.completeWith(client, { ok: true })
      return 'unreachable'
    })
    const refused = await pay(memory, 'k')
    t.equal(refused.statusCode, 500)
    t.equal(refused.json().code, 'FST_IDEMPOTENCY_COMPLETE_WITH')
    t.match(refused.json().message, /needs store: 'postgres'/)
    t.equal((await memory.inject({ method: 'POST', url: '/pay' })).json().code, 'FST_IDEMPOTENCY_COMPLETE_WITH', 'no key: no claim')

    const { app, payments } = await postgresApp(t)
    app.post('/pay', async (_request, reply) => {
      await app.pg.transact(async (client) => {
        await client.query(`INSERT INTO ${payments} (key, amount) VALUES ('k', 1)`)
        await reply.idempotency.completeWith(client, { once: true })
        await reply.idempotency.completeWith(client, { twice: true })
      })
      return 'unreachable'
    })
    const twice = await pay(app, 'k2')
    t.equal(twice.json().code, 'FST_IDEMPOTENCY_COMPLETE_WITH')
    t.match(twice.json().message, /called already/)
  })

  t.test('a reply that differs from what completeWith saved: logged, and retries replay what was saved', async (t) => {
    const lines: LogLine[] = []
    const { app } = await postgresApp(t, {}, lines)
    app.post('/pay', async (_request, reply) => {
      await app.pg.transact((client) => reply.idempotency.completeWith(client, { saved: true }))
      return { sent: 'something else' }
    })
    const first = await pay(app, 'k')
    t.same(first.json(), { sent: 'something else' })
    await until(() => lines.some((line) => line.level === ERROR && /differs from what completeWith saved/.test(line.msg)))
    const replay = await pay(app, 'k')
    t.same(replay.json(), { saved: true })
  })

  t.test('completeWith serializes as Fastify does: a response schema, a string, a Buffer', async (t) => {
    const { app } = await postgresApp(t)
    app.post('/pay', {
      schema: { response: { 200: { type: 'object', properties: { kept: { type: 'string' } } } } }
    }, async (request, reply) => {
      const kind = (request.body as { kind: string }).kind
      const body = kind === 'schema' ? { kept: 'yes', dropped: 'by the schema' } : kind === 'text' ? 'plain text' : Buffer.from([0, 1, 2])
      await app.pg.transact((client) => reply.idempotency.completeWith(client, body))
      return body
    })
    for (const kind of ['schema', 'text', 'bytes']) {
      const send = () => app.inject({ method: 'POST', url: '/pay', headers: { 'idempotency-key': kind }, payload: { kind } })
      const first = await send()
      const replay = await send()
      t.equal(replay.headers['idempotent-replayed'], 'true', kind)
      t.same(replay.rawPayload, first.rawPayload, `${kind}: the same bytes`)
      t.equal(replay.headers['content-type'], first.headers['content-type'], `${kind}: the same content-type`)
    }
    t.equal((await app.inject({ method: 'POST', url: '/pay', headers: { 'idempotency-key': 'schema' }, payload: { kind: 'schema' } })).body, '{"kept":"yes"}')
  })
})
