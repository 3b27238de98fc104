/**
 * Type tests of the public surface. Not run: `npm test` compiles them
 * (`tsc --noEmit`), and every `@ts-expect-error` line must be an error.
 */
import Fastify, { type FastifyReply } from 'fastify'
import fastifyIdempotency, {
  MemoryStore,
  errors,
  fastifyIdempotency as named,
  type ClaimResult,
  type FastifyIdempotencyOptions,
  type IdempotencyReplyState,
  type IdempotencyRouteOptions,
  type IdempotencyStore,
  type InheritableOptions,
  type KeyParts,
  type SqlClient,
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
  lockTtl: '30s',
  inFlight: { wait: 1000, statusCode: 423 },
  storeOnStatuses: [200, 201],
  replayStatusCode: 409,
  replayHeader: false,
  fingerprint: (request) => request.url,
  scope: async (request) => request.headers['x-tenant'] as string | undefined,
  key: { maxLength: 64, pattern: /^[a-z0-9-]+$/, uuid: false },
  keyEncoder: (parts: KeyParts) => `${parts.scope ?? ''}:${parts.method}:${parts.path}:${parts.key}`,
  telemetry: true,
  store: new MemoryStore({ maxRecords: 1000, maxBytes: 1 << 20, maxClaims: 500 }),
  storeTimeout: '500ms',
  replayCache: 0,
  redis: { requireNoEviction: true, replicas: 1, replicaTimeout: '100ms' },
  namespace: 'billing',
  onStoreError: 'fail-open'
})
app.register(fastifyIdempotency, { ttl: '24h', scope: (request) => request.headers['x-user-id'] === undefined ? null : 42 })
app.register(fastifyIdempotency, { store: 'redis', redisNamespace: 'cache' })
app.register(fastifyIdempotency, { store: 'postgres', pgNamespace: 'main' })
// @ts-expect-error: mode is one of three words
app.register(fastifyIdempotency, { mode: 'sometimes' })
// @ts-expect-error: 409 or 423
app.register(fastifyIdempotency, { inFlight: { statusCode: 429 } })
// @ts-expect-error: the store must implement the interface
app.register(fastifyIdempotency, { store: { claim () {} } })
// @ts-expect-error: renamed to replayStatusCode
app.register(fastifyIdempotency, { conflictStatusCode: 409 })
// @ts-expect-error: a scope names a principal, not an object
app.register(fastifyIdempotency, { scope: () => ({ id: 1 }) })

// Route config is typed on FastifyContextConfig; it takes the inheritable options.
app.post('/a', { config: { idempotency: true } }, async () => 'ok')
app.post('/b', { config: { idempotency: false } }, async () => 'ok')
app.post('/c', {
  config: { idempotency: { required: true, manual: true, ttl: '7d', storeOnStatuses: [201], replayStatusCode: null, fingerprint: false, scope: () => 'u1', onStoreError: 'fail-closed', namespace: 'x' } }
}, async () => 'ok')
// @ts-expect-error: a route option has its own type
app.post('/d', { config: { idempotency: { required: 'yes' } } }, async () => 'ok')
// @ts-expect-error: lockTtl is plugin-wide
const notInheritable: IdempotencyRouteOptions = { lockTtl: 1000 }
expectType<IdempotencyRouteOptions>(notInheritable)
const routeOptions: IdempotencyRouteOptions = { manual: true }
app.post('/f', { config: { idempotency: routeOptions } }, async () => 'ok')
const inheritable: InheritableOptions = { ttl: 1000, onReplay: () => {} }
expectType<IdempotencyRouteOptions>(inheritable)
expectType<FastifyIdempotencyOptions>(inheritable)

// reply.idempotency is always defined and read-only.
app.post('/e', async (_request, reply: FastifyReply) => {
  const state = reply.idempotency
  expectType<IdempotencyReplyState>(state)
  expectType<string | undefined>(state.key)
  expectType<boolean>(state.exists)
  expectType<boolean>(state.replayed)
  expectType<StoredResponse | undefined>(state.response)
  expectType<string | undefined>(state.token)
  expectType<AbortSignal>(state.signal)
  if (state.response !== undefined) {
    expectType<number>(state.response.statusCode)
    expectType<string | Buffer>(state.response.body)
  }
  // @ts-expect-error: read-only
  state.exists = true
  const client: SqlClient = { query: async () => ({ rows: [], rowCount: 0 }) }
  expectType<Promise<void>>(state.completeWith(client, { id: 1 }))
  return 'ok'
})

// fastify.idempotency.store is the store interface.
expectType<IdempotencyStore>(app.idempotency.store)

// Any object with the four methods is a store; results may be sync or async.
const custom: IdempotencyStore = {
  claim: async (): Promise<ClaimResult> => ({ token: '1' }),
  complete: () => true,
  release: async () => true,
  renew: () => false
}
const options: FastifyIdempotencyOptions = { store: custom }
expectType<FastifyIdempotencyOptions>(options)

// The error classes take the arguments of their messages, and carry their code.
const missing = new errors.KeyMissingError('idempotency-key')
expectType<'FST_IDEMPOTENCY_KEY_MISSING'>(missing.code)
expectType<number>(missing.statusCode)
expectType<'FST_IDEMPOTENCY_STORE_TIMEOUT'>(new errors.StoreTimeoutError(2000).code)
// @ts-expect-error: the header name, nothing else
errors.KeyMissingError(42, {}, [])
// @ts-expect-error: no arguments
errors.InFlightError('why')
