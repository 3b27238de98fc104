/**
 * The README's Postgres example cannot rot: its TypeScript is
 * examples/postgres-payments.ts word for word (which `npm run typecheck`
 * compiles), and that file, run as a server on a real PostgreSQL, charges
 * once per key: a retry replays the same body, the payments table holds one
 * row, and the same key with another amount is refused.
 */
import t from 'tap'
import { readFileSync } from 'node:fs'
import pg from 'pg'
import '../helpers/crash-guard.js'
import { runExample } from '../helpers/example.js'
import { startPostgres, withPostgres, type PostgresServer } from '../../support/postgres.js'

const readme = readFileSync(new URL('../../README.md', import.meta.url), 'utf8')
const section = readme.slice(readme.indexOf('## Exactly-once side effects with Postgres'), readme.indexOf('## Guarantees and limits'))

t.test('the README\'s Postgres example is examples/postgres-payments.ts, word for word', async (t) => {
  const example = readFileSync(new URL('../../examples/postgres-payments.ts', import.meta.url), 'utf8')
  t.equal(/```ts\n([\s\S]*?)```/.exec(section)?.[1], example)
})

withPostgres(t, (t) => {
  let server: PostgresServer
  t.before(async () => { server = await startPostgres() })
  t.teardown(() => server?.stop())

  t.test('it runs on a real PostgreSQL and charges once per key', async (t) => {
    const { line, address } = await runExample(t, 'postgres-payments.ts', { DATABASE_URL: server.connectionString })
    t.ok(address, `it listens (${line})`)
    const pay = (key: string, amount: number) => fetch(`${address}/payments`, {
      method: 'POST', headers: { 'content-type': 'application/json', 'idempotency-key': key, 'x-user': 'alice' }, body: JSON.stringify({ amount })
    })

    const first = await pay('order-1', 1000)
    const firstBody = await first.text()
    t.equal(first.status, 201)
    t.match(JSON.parse(firstBody), { id: 1, amount: 1000 })
    const retry = await pay('order-1', 1000)
    t.equal(retry.status, 201)
    t.equal(await retry.text(), firstBody, 'the retry gets the same body, byte for byte')
    t.equal(retry.headers.get('idempotent-replayed'), 'true')
    t.equal((await pay('order-1', 2000)).status, 422, 'the same key with another amount')
    t.equal((await fetch(`${address}/payments`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"amount":1}' })).status, 400, 'no key')

    const client = new pg.Client({ connectionString: server.connectionString })
    await client.connect()
    t.teardown(() => client.end())
    const { rows } = await client.query('SELECT id, amount FROM payments ORDER BY id')
    t.same(rows, [{ id: 1, amount: 1000 }], 'one payment: the retry charged nothing')
  })
})
