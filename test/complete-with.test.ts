/**
 * `reply.idempotency.completeWith` against a store of one's own that
 * implements `completeWith` (here over the memory store, with a client that
 * records what was saved): it serializes as Fastify will, refuses what it
 * cannot serialize, throws CLAIM_LOST when the store says the claim is gone,
 * and the claim then ends without a second save.
 */
import t from 'tap'
import { MemoryStore } from '../index.js'
import type { IdempotencyStore, SqlClient, StoredResponse } from '../index.js'
import { build, capturingLogger, until, type LogLine } from './helpers/app.js'

/** A store that completes "through the client" by completing the memory store, and can be told the claim is lost. */
function transactional () {
  const inner = new MemoryStore()
  t.teardown(() => inner.close())
  const control = { lost: false, saved: [] as StoredResponse[], releases: 0 }
  const store: IdempotencyStore = {
    claim: (key, fingerprint, lockTtl) => inner.claim(key, fingerprint, lockTtl),
    complete: inner.complete.bind(inner),
    release: (key, token) => { control.releases++; return inner.release(key, token) },
    renew: inner.renew.bind(inner),
    async completeWith (_client, key, token, response, ttl) {
      if (control.lost) return false
      control.saved.push(response)
      return inner.complete(key, token, response, ttl)
    }
  }
  return { store, control }
}

const client: SqlClient = { query: async () => ({ rows: [], rowCount: 0 }) }

t.test('serializes as Fastify will: JSON with its content-type, text, bytes; the reply then matches, nothing is saved twice', async (t) => {
  const { store, control } = transactional()
  const lines: LogLine[] = []
  const app = await build(t, { store }, capturingLogger(lines))
  app.post('/:kind', async (request, reply) => {
    const kind = (request.params as { kind: string }).kind
    const body = kind === 'json' ? { id: 1 } : kind === 'text' ? 'plain' : kind === 'typed' ? new Uint8Array([1, 2, 3]) : Buffer.from([4, 5])
    await reply.idempotency.completeWith(client, body)
    return body
  })
  for (const [kind, type] of [['json', 'application/json; charset=utf-8'], ['text', 'text/plain; charset=utf-8'], ['typed', 'application/octet-stream'], ['bytes', 'application/octet-stream']]) {
    const first = await app.inject({ method: 'POST', url: `/${kind}`, headers: { 'idempotency-key': kind } })
    t.equal(first.headers['content-type'], type, `${kind}: the content-type Fastify sets`)
    const saved = control.saved.at(-1) as StoredResponse
    t.same(Buffer.from(saved.body), first.rawPayload, `${kind}: the saved bytes are the bytes sent`)
    t.equal(saved.headers['content-type'], type)
    const replay = await app.inject({ method: 'POST', url: `/${kind}`, headers: { 'idempotency-key': kind } })
    t.equal(replay.headers['idempotent-replayed'], 'true')
    t.same(replay.rawPayload, first.rawPayload)
  }
  await until(() => control.releases === 4)
  t.equal(control.releases, 4, 'each claim ends with a fenced release, refused since the record is complete')
  t.notOk(lines.some((line) => /differs from what completeWith saved/.test(line.msg)))
})

t.test('a body it cannot serialize for the reply\'s content-type is refused, and the claim released', async (t) => {
  const { store, control } = transactional()
  const app = await build(t, { store })
  let runs = 0
  app.post('/', async (_request, reply) => {
    runs++
    reply.type('text/html')
    await reply.idempotency.completeWith(client, { not: 'html' })
    return 'unreachable'
  })
  const res = await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  t.equal(res.statusCode, 500)
  t.equal(res.json().code, 'FST_IDEMPOTENCY_COMPLETE_WITH')
  t.match(res.json().message, /cannot serialize a body for content-type text\/html/)
  t.equal(control.saved.length, 0)
  await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  t.equal(runs, 2, 'released: the retry runs')
})

t.test('the store says the claim is gone: FST_IDEMPOTENCY_CLAIM_LOST (409)', async (t) => {
  const { store, control } = transactional()
  control.lost = true
  const app = await build(t, { store })
  app.post('/', async (_request, reply) => {
    await reply.idempotency.completeWith(client, { id: 1 })
    return 'unreachable'
  })
  const res = await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  t.equal(res.statusCode, 409)
  t.equal(res.json().code, 'FST_IDEMPOTENCY_CLAIM_LOST')
})

t.test('after the handler has ended (in an onSend hook), completeWith refuses: the request holds no claim any more', async (t) => {
  const { store } = transactional()
  const app = await build(t, { store })
  const errors: unknown[] = []
  app.post('/', {
    onSend: async (_request, reply, payload) => {
      await reply.idempotency.completeWith(client, { late: true }).catch((err: unknown) => { errors.push(err) })
      return payload
    }
  }, async () => ({ ok: true }))
  await app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k' } })
  t.match(errors, [{ code: 'FST_IDEMPOTENCY_COMPLETE_WITH', message: /holds no idempotency claim/ }])
})
