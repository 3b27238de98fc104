import Fastify from 'fastify'
import fastifyIdempotency from 'fastify-idempotency'

// What the auth hook below sets on every request.
declare module 'fastify' {
  interface FastifyRequest {
    user?: { id: string }
  }
}

const app = Fastify()

// A minimal auth hook; a real application checks a session or a signed token here.
app.addHook('onRequest', async (request, reply) => {
  const token = request.headers.authorization?.replace(/^Bearer /, '')
  if (!token) return reply.code(401).send({ error: 'unauthorized' })
  request.user = { id: token }
})

// Await the registration: routes added before the plugin has loaded are not covered.
await app.register(fastifyIdempotency, {
  mode: 'required', // every POST, PUT, PATCH and DELETE needs an Idempotency-Key
  scope: (request) => request.user?.id // keys are per user: nobody gets another user's response
})

let payments = 0
app.post('/payments', async (request, reply) => {
  const { amount, currency } = request.body as { amount: number, currency: string }
  payments++ // the side effect that must happen once per key
  reply.code(201)
  return { id: `pay_${payments}`, amount, currency }
})

const address = await app.listen({ port: Number(process.env.PORT ?? 3000), host: '127.0.0.1' })
console.log(`listening on ${address}`)
