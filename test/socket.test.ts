/**
 * Through a real socket: 20 identical requests at once on one key. The
 * handler runs once; every answer is the original (201, or its replay) or an
 * in-flight refusal, as configured.
 */
import type { AddressInfo } from 'node:net'
import { test } from 'tap'
import type { FastifyIdempotencyOptions } from '../index.js'
import { build, sleep } from './helpers/app.js'

async function storm (t: Parameters<typeof build>[0], options: FastifyIdempotencyOptions) {
  const app = await build(t, options)
  let runs = 0
  app.post('/payments', async (request, reply) => {
    runs++
    await sleep(50)
    reply.code(201)
    return { id: `pay_${runs}`, amount: (request.body as { amount: number }).amount }
  })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as AddressInfo
  const answers = await Promise.all(Array.from({ length: 20 }, async () => {
    const res = await fetch(`http://127.0.0.1:${port}/payments`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', 'idempotency-key': 'storm-key' },
      body: JSON.stringify({ amount: 100 })
    })
    return { status: res.status, replayed: res.headers.get('idempotent-replayed'), retryAfter: res.headers.get('retry-after'), body: await res.text() }
  }))
  return { answers, runs: () => runs }
}

test('20 concurrent duplicates, no wait: the handler runs once; each answer is the original, its replay, or 409', async (t) => {
  const { answers, runs } = await storm(t, {})
  t.equal(runs(), 1)
  const original = JSON.stringify({ id: 'pay_1', amount: 100 })
  const firsts = answers.filter((a) => a.status === 201 && a.replayed === null)
  t.equal(firsts.length, 1, 'exactly one answer came from the handler')
  for (const answer of answers) {
    if (answer.status === 409) {
      t.equal(JSON.parse(answer.body).code, 'FST_IDEMPOTENCY_IN_FLIGHT')
      t.ok(Number(answer.retryAfter) >= 1)
    } else {
      t.equal(answer.status, 201)
      t.equal(answer.body, original)
    }
  }
  t.ok(answers.some((a) => a.status === 409), 'at least one duplicate arrived while the original ran')
})

test('20 concurrent duplicates with inFlight.wait: all get the same body, all but one replayed', async (t) => {
  const { answers, runs } = await storm(t, { inFlight: { wait: 10_000 } })
  t.equal(runs(), 1)
  const original = JSON.stringify({ id: 'pay_1', amount: 100 })
  t.same(answers.map((a) => a.status), Array(20).fill(201))
  t.same(answers.map((a) => a.body), Array(20).fill(original))
  t.equal(answers.filter((a) => a.replayed === 'true').length, 19)
})
