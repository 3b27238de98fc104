import Fastify from 'fastify'
import fastifyPostgres from '@fastify/postgres'
import fastifyIdempotency from 'fastify-idempotency'

declare module 'fastify' {
  interface FastifyRequest {
    user?: { id: string }
  }
}

const app = Fastify()
// Stands in for your authentication (see the quick start's hook).
app.addHook('onRequest', async (request) => { request.user = { id: String(request.headers['x-user'] ?? 'demo') } })

await app.register(fastifyPostgres, { connectionString: process.env.DATABASE_URL })
await app.register(fastifyIdempotency, { store: 'postgres', mode: 'required', scope: (request) => request.user?.id })
await app.pg.query('CREATE TABLE IF NOT EXISTS payments (id serial PRIMARY KEY, amount integer NOT NULL)')

app.post('/payments', async (request, reply) => {
  const { amount } = request.body as { amount: number }
  reply.code(201)
  const payment = await app.pg.transact(async (client) => {
    const { rows } = await client.query('INSERT INTO payments (amount) VALUES ($1) RETURNING id, amount', [amount])
    await reply.idempotency.completeWith(client, rows[0]) // the record commits with the payment, or not at all
    return rows[0]
  })
  return payment // the same body: completeWith saved exactly what goes out
})

const address = await app.listen({ port: Number(process.env.PORT ?? 3000), host: '127.0.0.1' })
console.log(`listening on ${address}`)
