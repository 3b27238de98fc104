/**
 * Key isolation: `scope` (plugin or route) separates keys per principal, read
 * after auth hooks have run; the key encoder turns the parts into a store key
 * that no client input can forge.
 */
import { test } from 'tap'
import type { FastifyRequest } from 'fastify'
import { defaultKeyEncoder } from '../index.js'
import { localKeyEncoder } from '../lib/key-encoder.js'
import type { KeyParts } from '../index.js'
import { build, capturingLogger, ERROR, RecordingStore, type LogLine } from './helpers/app.js'

declare module 'fastify' {
  interface FastifyRequest {
    user?: { id: string }
  }
}

const USERS: Record<string, string> = { 'token-a': 'alice', 'token-b': 'bob' }

/** An auth hook: sets request.user from the bearer token, 401 without one. */
async function auth (request: FastifyRequest) {
  const user = USERS[String(request.headers.authorization).replace('Bearer ', '')]
  if (user === undefined) throw Object.assign(new Error('unauthorized'), { statusCode: 401 })
  request.user = { id: user }
}

test('scope from a route auth preHandler: user B with user A\'s key runs its own request', async (t) => {
  const app = await build(t, { scope: (request) => request.user?.id })
  let runs = 0
  app.post('/transfer', { preHandler: auth }, async (request) => ({ run: ++runs, user: request.user?.id, body: request.body }))
  const send = (token: string, payload: object) =>
    app.inject({ method: 'POST', url: '/transfer', headers: { authorization: `Bearer ${token}`, 'idempotency-key': 'shared' }, payload })
  const alice = await send('token-a', { amount: 1 })
  t.same(alice.json(), { run: 1, user: 'alice', body: { amount: 1 } })
  const bobSame = await send('token-b', { amount: 1 })
  t.same(bobSame.json(), { run: 2, user: 'bob', body: { amount: 1 } }, 'bob never receives alice\'s response')
  t.equal(bobSame.headers['idempotent-replayed'], undefined)
  const aliceAgain = await send('token-a', { amount: 1 })
  t.same(aliceAgain.json(), alice.json())
  t.equal(aliceAgain.headers['idempotent-replayed'], 'true')
  const bobAgain = await send('token-b', { amount: 1 })
  t.same(bobAgain.json(), bobSame.json())
  t.equal(runs, 2)
  t.equal((await send('token-x', { amount: 1 })).statusCode, 401, 'auth runs before the claim')
})

test('keys of different scopes never conflict, even with different payloads', async (t) => {
  const app = await build(t, { scope: (request) => request.user?.id })
  let runs = 0
  app.addHook('preHandler', auth) // a global auth hook, as an auth plugin would add
  app.post('/', async () => ({ run: ++runs }))
  const send = (token: string, payload: object) =>
    app.inject({ method: 'POST', url: '/', headers: { authorization: `Bearer ${token}`, 'idempotency-key': 'k' }, payload })
  t.equal((await send('token-a', { a: 1 })).statusCode, 200)
  t.equal((await send('token-b', { b: 2 })).statusCode, 200, 'no 422: bob\'s key is not alice\'s')
  t.equal((await send('token-a', { a: 2 })).statusCode, 422, 'alice reusing her key with another payload')
  t.equal(runs, 2)
})

test('without a scope, keys are shared: the reason scope exists', async (t) => {
  const app = await build(t)
  let runs = 0
  app.post('/', { preHandler: auth }, async (request) => ({ run: ++runs, user: request.user?.id }))
  const send = (token: string) =>
    app.inject({ method: 'POST', url: '/', headers: { authorization: `Bearer ${token}`, 'idempotency-key': 'k' } })
  await send('token-a')
  const bob = await send('token-b')
  t.same(bob.json(), { run: 1, user: 'alice' })
  t.equal(runs, 1)
})

test('route-level scope overrides the plugin scope', async (t) => {
  const app = await build(t, { scope: () => 'everyone' })
  let runs = 0
  app.post('/tenant', { config: { idempotency: { scope: (request) => String(request.headers['x-tenant']) } } }, async () => ({ run: ++runs }))
  app.post('/global', async () => ({ run: ++runs }))
  const send = (url: string, tenant: string) =>
    app.inject({ method: 'POST', url, headers: { 'x-tenant': tenant, 'idempotency-key': 'k' } })
  await send('/tenant', 't1')
  await send('/tenant', 't2')
  await send('/tenant', 't1')
  t.equal(runs, 2, 'one run per tenant')
  await send('/global', 't1')
  await send('/global', 't2')
  t.equal(runs, 3, 'the plugin scope puts both tenants in one space')
})

test('a scope that returns undefined leaves the key unscoped', async (t) => {
  const app = await build(t, { scope: (request) => request.headers['x-user'] as string | undefined })
  let runs = 0
  app.post('/', async () => ({ run: ++runs }))
  const send = (user?: string) => app.inject({ method: 'POST', url: '/', headers: { 'idempotency-key': 'k', ...(user ? { 'x-user': user } : {}) } })
  await send()
  await send()
  await send('-')
  t.equal(runs, 2, 'no scope and the scope "-" are different keys')
})

test('keyEncoder receives scope, method, path without query, and key', async (t) => {
  const parts: KeyParts[] = []
  const store = new RecordingStore()
  t.teardown(() => store.close())
  const app = await build(t, {
    store,
    scope: () => 'tenant-1',
    keyEncoder: (p) => {
      parts.push(p)
      return `custom:${p.key}`
    }
  })
  app.put('/items/:id', async () => 'ok')
  await app.inject({ method: 'PUT', url: '/items/7?force=true&x=1', headers: { 'idempotency-key': '"quoted"' } })
  t.same(parts, [{ scope: 'tenant-1', method: 'PUT', path: '/items/7', key: 'quoted' }])
  t.equal(store.claims[0].key, 'custom:quoted')
})

test('the default key encoder: bounded, prefixed, and no two sets of parts collide', async (t) => {
  const base: KeyParts = { scope: undefined, method: 'POST', path: '/a', key: 'k' }
  const encoded = defaultKeyEncoder(base)
  t.match(encoded, /^idem:[A-Za-z0-9_-]{43}$/)
  t.equal(defaultKeyEncoder({ ...base, key: 'x'.repeat(10_000) }).length, encoded.length, 'bounded length')
  t.equal(defaultKeyEncoder({ ...base }), encoded, 'deterministic')
  const variants: KeyParts[] = [
    base,
    { ...base, scope: '-' },
    { ...base, scope: '' },
    { ...base, scope: 'a' },
    { ...base, scope: 'a|POST' },
    { ...base, scope: 'a', key: 'b|k' },
    { ...base, scope: 'a|b', key: 'k' },
    { ...base, path: '/a|k' },
    { ...base, path: '/a', key: '|k' },
    { ...base, path: '/a|', key: 'k' },
    { ...base, method: 'PUT' },
    { ...base, scope: '1:a', path: '/a' },
    { ...base, scope: '1', path: '/a' }
  ]
  const keys = variants.map(defaultKeyEncoder)
  t.equal(new Set(keys).size, variants.length, 'all distinct')
})

test('route hooks given as arrays all run before the claim, in order', async (t) => {
  const app = await build(t, { scope: (request) => request.user?.id })
  const order: string[] = []
  let runs = 0
  app.post('/', {
    onRequest: [async () => { order.push('onRequest 1') }, async () => { order.push('onRequest 2') }],
    preHandler: [auth, async (request) => { order.push(`preHandler 2 sees ${request.user?.id}`) }]
  }, async () => {
    order.push('handler')
    return { run: ++runs }
  })
  const send = (token: string) =>
    app.inject({ method: 'POST', url: '/', headers: { authorization: `Bearer ${token}`, 'idempotency-key': 'k' } })
  await send('token-a')
  t.same(order, ['onRequest 1', 'onRequest 2', 'preHandler 2 sees alice', 'handler'])
  await send('token-b')
  await send('token-a')
  t.equal(runs, 2, 'scoped by the user the preHandler array set')
})

test('an async scope function is awaited: users stay apart', async (t) => {
  const app = await build(t, {
    scope: async (request) => {
      await new Promise((resolve) => setTimeout(resolve, 1))
      return String(request.headers['x-user'])
    }
  })
  let runs = 0
  app.post('/me', async (request) => ({ run: ++runs, user: request.headers['x-user'] }))
  const send = (user: string) => app.inject({ method: 'POST', url: '/me', headers: { 'x-user': user, 'idempotency-key': 'same' } })
  const one = await send('1')
  const two = await send('2')
  t.same(one.json(), { run: 1, user: '1' })
  t.same(two.json(), { run: 2, user: '2' }, 'user 2 never gets user 1\'s response')
  t.equal(two.headers['idempotent-replayed'], undefined)
  const again = await send('2')
  t.same(again.json(), two.json())
  t.equal(again.headers['idempotent-replayed'], 'true')
})

test('scope answers: null is no scope, a finite number its digits; anything else is refused, never merged', async (t) => {
  const lines: LogLine[] = []
  const answers: Record<string, unknown> = {
    null: null,
    number: 42,
    numberAsText: '42',
    object: { id: '1' },
    otherObject: { id: '2' },
    promiseOfObject: Promise.resolve({ id: '3' }),
    nan: Number.NaN,
    boolean: true,
    symbol: Symbol('user'),
    bigint: 10n,
    bare: Object.create(null)
  }
  const store = new RecordingStore()
  t.teardown(() => store.close())
  const app = await build(t, {
    store,
    scope: (request) => {
      const answer = answers[String(request.headers['x-answer'])]
      return answer as string
    }
  }, capturingLogger(lines))
  let runs = 0
  app.post('/', async () => ({ run: ++runs }))
  const send = (answer: string) => app.inject({ method: 'POST', url: '/', headers: { 'x-answer': answer, 'idempotency-key': 'k' } })

  t.same((await send('null')).json(), { run: 1 })
  const unscoped = store.claims[0].key
  t.equal(unscoped, localKeyEncoder({ scope: undefined, method: 'POST', path: '/', key: 'k' }), 'null: the unscoped key')
  t.same((await send('number')).json(), { run: 2 })
  t.equal(store.claims[1].key, localKeyEncoder({ scope: '42', method: 'POST', path: '/', key: 'k' }), 'a number: its digits')
  const same = await send('numberAsText')
  t.equal(same.headers['idempotent-replayed'], 'true', 'the number 42 and the string "42" are one principal')

  for (const name of ['object', 'otherObject', 'promiseOfObject', 'nan', 'boolean', 'symbol', 'bigint', 'bare']) {
    const refused = await send(name)
    t.equal(refused.statusCode, 500, `${name}: refused`)
    t.equal(refused.json().code, 'FST_IDEMPOTENCY_INVALID_SCOPE')
    t.match(refused.json().message, /must return a string or a finite number/)
  }
  t.equal(runs, 2, 'no refused request ran the handler')
  t.equal(store.claims.length, 3, 'nor claimed a key')
  const logged = lines.filter((line) => line.level === ERROR && /scope function returned something that is not a principal id/.test(line.msg))
  t.equal(logged.length, 8, 'each refusal is logged')
  t.match(logged[0].scope, /an object \(Object\)/)
  t.match(logged[7].scope, /an object \(without prototype\)/)
})
