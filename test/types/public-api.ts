/**
 * Type tests of the public surface. Not run: `npm test` compiles them
 * (`tsc --noEmit`), and every `@ts-expect-error` line must be an error.
 */
import Fastify, { type FastifyReply } from 'fastify'
import fastifyIdempotency, {
  MemoryStore,
  fastifyIdempotency as named,
  type ClaimResult,
  type FastifyIdempotencyOptions,
  type IdempotencyReplyState,
  type IdempotencyRouteOptions,
  type IdempotencyStore,
  type KeyParts,
  type StoredResponse
} from '../../index.js'

function expectType<T> (_value: T): void {}
type Equal<A, B> = (<T>() => T extends A ? 1 : 2) extends (<T>() => T extends B ? 1 : 2) ? true : false
function expectEqual<A, B> (_proof: Equal<A, B>): void {}

expectEqual<typeof named, typeof fastifyIdempotency>(true)

const app = Fastify()
app.register(fastifyIdempotency)
app.register(fastifyIdempotency, {
  header: 'x-idempotency-key',
  methods: ['POST'],
  mode: 'required',
  endpoints: ['POST /api/payments/', '/api/orders/', '* /api/critical/'],
  ttl: null,
  lockTtl: 30_000,
  inFlight: { wait: 1000, statusCode: 423 },
  storeOnStatuses: [200, 201],
  conflictStatusCode: 409,
  replayHeader: false,
  fingerprint: (request) => request.url,
  scope: (request) => request.headers['x-tenant'] as string | undefined,
  key: { maxLength: 64, pattern: /^[a-z0-9-]+$/, uuid: false },
  keyEncoder: (parts: KeyParts) => `${parts.scope ?? ''}:${parts.method}:${parts.path}:${parts.key}`,
  telemetry: true,
  store: new MemoryStore({ maxRecords: 1000 }),
  onStoreError: 'fail-open'
})
// @ts-expect-error: mode is one of three words
app.register(fastifyIdempotency, { mode: 'sometimes' })
// @ts-expect-error: 409 or 423
app.register(fastifyIdempotency, { inFlight: { statusCode: 429 } })
// @ts-expect-error: the store must implement the interface
app.register(fastifyIdempotency, { store: { claim () {} } })

// Route config is typed on FastifyContextConfig.
app.post('/a', { config: { idempotency: true } }, async () => 'ok')
app.post('/b', { config: { idempotency: false } }, async () => 'ok')
app.post('/c', {
  config: { idempotency: { required: true, manual: true, ttl: 1000, storeOnStatuses: [201], conflictStatusCode: null, fingerprint: false, scope: () => 'u1', onStoreError: 'fail-closed' } }
}, async () => 'ok')
// @ts-expect-error: a route option has its own type
app.post('/d', { config: { idempotency: { required: 'yes' } } }, async () => 'ok')
const routeOptions: IdempotencyRouteOptions = { manual: true }
app.post('/f', { config: { idempotency: routeOptions } }, async () => 'ok')

// reply.idempotency is always defined and read-only.
app.post('/e', async (_request, reply: FastifyReply) => {
  const state = reply.idempotency
  expectType<IdempotencyReplyState>(state)
  expectType<string | undefined>(state.key)
  expectType<boolean>(state.exists)
  expectType<boolean>(state.replayed)
  expectType<StoredResponse | undefined>(state.response)
  if (state.response !== undefined) {
    expectType<number>(state.response.statusCode)
    expectType<Buffer>(state.response.body)
  }
  // @ts-expect-error: read-only
  state.exists = true
  return 'ok'
})

// fastify.idempotency.store is the store interface.
expectType<IdempotencyStore>(app.idempotency.store)

// Any object with the four methods is a store; results may be sync or async.
const custom: IdempotencyStore = {
  claim: async (): Promise<ClaimResult> => ({ token: 't' }),
  complete: () => true,
  release: async () => true,
  renew: () => false
}
const options: FastifyIdempotencyOptions = { store: custom }
expectType<FastifyIdempotencyOptions>(options)
