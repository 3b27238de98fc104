/**
 * npm run demo: an example payments server with the memory store, and three
 * requests against it over real HTTP: a first request, a retry that is
 * replayed, and the same key with a different body (422).
 * `npm run demo -- --serve` keeps the server running afterwards.
 */
import Fastify from 'fastify'
import fastifyIdempotency from '../index.js'

const app = Fastify()
// A real application scopes keys by the authenticated user; the demo has one client.
await app.register(fastifyIdempotency, { mode: 'required', inFlight: { wait: '2s' }, scope: () => 'demo-user' })

let charges = 0
app.post<{ Body: { amount: number, currency: string } }>('/payments', async (request, reply) => {
  charges++
  await new Promise((resolve) => setTimeout(resolve, 50)) // the payment provider
  reply.code(201)
  return { id: `pay_${charges}`, amount: request.body.amount, currency: request.body.currency }
})

const address = await app.listen({ port: Number(process.env.PORT ?? 0), host: '127.0.0.1' })
console.log(`payments server on ${address} (memory store)\n`)

async function pay (key: string, body: object): Promise<void> {
  const res = await fetch(`${address}/payments`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'idempotency-key': key },
    body: JSON.stringify(body)
  })
  const replayed = res.headers.get('idempotent-replayed') === 'true' ? '  (replayed)' : ''
  console.log(`POST /payments key=${key} ${JSON.stringify(body)}\n  -> ${res.status} ${await res.text()}${replayed}`)
}

await pay('order-42', { amount: 1000, currency: 'EUR' })
await pay('order-42', { amount: 1000, currency: 'EUR' })
await pay('order-42', { amount: 9999, currency: 'EUR' })
console.log(`\nthe handler charged ${charges} time(s)`)

if (process.argv.includes('--serve')) {
  console.log(`\ntry: curl -i -X POST ${address}/payments -H 'idempotency-key: k1' -H 'content-type: application/json' -d '{"amount":5,"currency":"EUR"}'`)
} else {
  await app.close()
}
