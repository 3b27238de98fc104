/**
 * The request lifecycle under the handler, hook and client patterns real
 * applications use, as one suite that runs on every store (memory, a store
 * whose every method is asynchronous, Redis). For each pattern: the process
 * stays up (the crash guard fails the file otherwise), the client gets what
 * Fastify alone sends for the same handler, the saved record is exactly what
 * the client got (or nothing is saved), and every claim ends.
 */
import { request as httpRequest } from 'node:http'
import type { AddressInfo } from 'node:net'
import type { Test } from 'tap'
import Fastify, { type FastifyInstance, type FastifyReply, type FastifyRequest, type FastifyServerOptions } from 'fastify'
import fastifyIdempotency from '../../index.js'
import type { FastifyIdempotencyOptions, IdempotencyStore, StoredResponse } from '../../index.js'
import { capturingLogger, heldHandler, sleep, until, type LogLine } from './app.js'

export interface PatternTarget {
  /** A fresh store no other test shares. */
  store (): IdempotencyStore | Promise<IdempotencyStore>
}

/** What a client got. */
interface Answer { status: number, body: string, headers: Record<string, string | string[] | number | undefined> }

type Handler = (request: FastifyRequest, reply: FastifyReply) => unknown

/** Wraps a store and records the outcome of every claim: saved responses, releases. */
export class Watch implements IdempotencyStore {
  readonly saved: StoredResponse[] = []
  released = 0
  claimed = 0
  constructor (readonly inner: IdempotencyStore) {}
  async claim (key: string, fingerprint: string | undefined, lockTtl: number) {
    const result = await this.inner.claim(key, fingerprint, lockTtl)
    if (result.token !== undefined) this.claimed++
    return result
  }

  async complete (key: string, token: string, response: StoredResponse, ttl: number | null) {
    const ok = await this.inner.complete(key, token, response, ttl)
    if (ok) this.saved.push(response)
    return ok
  }

  async release (key: string, token: string) {
    const ok = await this.inner.release(key, token)
    if (ok) this.released++
    return ok
  }

  renewed = 0
  renew (key: string, token: string, lockTtl: number) {
    this.renewed++
    return this.inner.renew(key, token, lockTtl)
  }

  /** Claims that are over: saved or released. */
  get ended (): number { return this.saved.length + this.released }
}

async function inject (app: FastifyInstance, key: string | undefined, url = '/'): Promise<Answer> {
  const res = await app.inject({ method: 'POST', url, headers: key === undefined ? {} : { 'idempotency-key': key }, payload: { n: 1 } })
  return { status: res.statusCode, body: res.body, headers: res.headers }
}

/** The same route on bare Fastify: what the client would get without the plugin. */
async function bare (t: Test, handler: Handler, server: FastifyServerOptions = {}, setup?: (app: FastifyInstance) => void): Promise<Answer> {
  const app = Fastify(server)
  t.teardown(() => app.close())
  setup?.(app)
  app.post('/', handler)
  return inject(app, undefined)
}

export function lifecyclePatterns (t: Test, target: PatternTarget): void {
  async function plugin (t: Test, handler: Handler, options: FastifyIdempotencyOptions = {}, server: FastifyServerOptions = {}, setup?: (app: FastifyInstance) => void) {
    const store = new Watch(await target.store())
    const app = Fastify(server)
    t.teardown(() => app.close())
    setup?.(app)
    await app.register(fastifyIdempotency, { store, ...options })
    app.post('/', handler)
    return { app, store }
  }

  /** The client gets what bare Fastify sends; a retry replays exactly that when it was saved, and runs again otherwise. */
  async function sameAsFastify (t: Test, name: string, make: () => { handler: Handler, runs: () => number }, saved: boolean, server: FastifyServerOptions = {}) {
    const alone = await bare(t, make().handler, server)
    const { handler, runs } = make()
    const { app, store } = await plugin(t, handler, {}, server)
    const first = await inject(app, 'k')
    t.equal(first.status, alone.status, `${name}: the status Fastify alone sends`)
    t.equal(first.body, alone.body, `${name}: the body Fastify alone sends`)
    t.equal(first.headers['content-type'], alone.headers['content-type'], `${name}: the content-type Fastify alone sends`)
    await until(() => store.ended === 1)
    t.equal(store.ended, 1, `${name}: the claim ended`)
    const retry = await inject(app, 'k')
    if (saved) {
      t.equal(store.saved.length, 1, `${name}: saved`)
      t.equal(Buffer.from(store.saved[0].body).toString(), first.body, `${name}: the saved body is the one the client got`)
      t.equal(retry.headers['idempotent-replayed'], 'true', `${name}: the retry is a replay`)
      t.equal(retry.status, first.status)
      t.equal(retry.body, first.body, `${name}: the replay is what the first client got`)
      t.equal(runs(), 1, `${name}: the handler ran once`)
    } else {
      t.equal(store.saved.length, 0, `${name}: nothing saved`)
      t.equal(retry.headers['idempotent-replayed'], undefined, `${name}: the retry is no replay`)
      t.equal(runs(), 2, `${name}: the retry ran the handler again`)
    }
  }

  const counted = (body: (runs: number, request: FastifyRequest, reply: FastifyReply) => unknown) => () => {
    let runs = 0
    return { handler: (request: FastifyRequest, reply: FastifyReply) => body(++runs, request, reply), runs: () => runs }
  }

  t.test('async handlers that call reply.send and return nothing', async (t) => {
    await sameAsFastify(t, 'send, no return', counted(async (_runs, _q, reply) => { reply.code(201).send({ id: 1 }) }), true)
    await sameAsFastify(t, 'await, then send', counted(async (_runs, _q, reply) => {
      await sleep(2)
      reply.send({ v: 2 })
    }), true)
    await sameAsFastify(t, 'send, then return reply', counted(async (_runs, _q, reply) => reply.code(202).send('text')), true)
  })

  t.test('a handler that sends twice: the client gets the first reply, and that is what is saved', async (t) => {
    await sameAsFastify(t, 'send twice', counted(async (_runs, _q, reply) => {
      reply.send({ a: 1 })
      reply.send({ b: 2 })
    }), true)
  })

  t.test('a second reply while the first is still in an async onSend hook after the plugin: the client gets the first, logged, nothing saved', async (t) => {
    const delay = (app: FastifyInstance) => app.addHook('onSend', async (_request, _reply, payload) => {
      await sleep(1)
      return payload
    })
    const handler = (_request: FastifyRequest, reply: FastifyReply) => {
      reply.send({ a: 1 })
      reply.send({ b: 2 })
    }
    const alone = await bare(t, handler, {}, delay)
    const lines: LogLine[] = []
    const store = new Watch(await target.store())
    const app = Fastify(capturingLogger(lines))
    t.teardown(() => app.close())
    await app.register(fastifyIdempotency, { store })
    delay(app)
    app.post('/', handler)
    const first = await inject(app, 'k')
    t.equal(first.status, alone.status)
    t.equal(first.body, alone.body, 'the first reply, as Fastify alone sends it')
    await until(() => store.ended === 1)
    t.ok(lines.some((line) => /a second reply reached onSend/.test(line.msg)), 'the second reply is logged')
    // Whether the response is over before Fastify's error for the second reply comes decides between the
    // two answers the rule allows: the record is exactly what the client got, or nothing.
    t.ok(store.saved.length === 0 || Buffer.from(store.saved[0].body).toString() === first.body,
      `the saved record is what the client got, or there is none (${store.saved.length})`)
  })

  t.test('a handler that sends, then throws: the client gets the reply; a handler that threw is never saved', async (t) => {
    await sameAsFastify(t, 'send then throw', counted(async (_runs, _q, reply) => {
      reply.send({ v: 1 })
      throw new Error('after the reply')
    }), false)
  })

  t.test('payloads and headers Fastify refuses: the 500 Fastify alone sends, nothing saved', async (t) => {
    await sameAsFastify(t, 'a number as text/plain', counted(async (_runs, _q, reply) => {
      reply.type('text/plain')
      return 42
    }), false)
    await sameAsFastify(t, 'an invalid header on a 500', counted(async (_runs, _q, reply) => {
      reply.code(500).header('x-note', 'naïve €')
      return 'x'
    }), false)
    await sameAsFastify(t, 'an invalid header on a 200', counted(async (_runs, _q, reply) => {
      reply.header('content-disposition', 'filename="€.txt"')
      return 'file'
    }), false)
    await sameAsFastify(t, 'a callback handler sending a number as text/plain', counted((_runs, _q, reply) => {
      reply.type('text/plain').send(42 as unknown as string)
    }), false)
  })

  t.test('callback-style handlers and plain return values', async (t) => {
    await sameAsFastify(t, 'callback, later send', counted((runs, _q, reply) => {
      setTimeout(() => reply.code(201).send({ run: runs }), 5)
    }), true)
    await sameAsFastify(t, 'sync return value', counted((runs) => ({ run: runs })), true)
    await sameAsFastify(t, 'sync throw', counted(() => { throw new Error('sync') }), false)
    await sameAsFastify(t, 'callback, later error', counted((_runs, _q, reply) => {
      setTimeout(() => reply.send(new Error('later')), 5)
    }), false)
    await sameAsFastify(t, 'rejects', counted(async () => { throw Object.assign(new Error('nope'), { statusCode: 409 }) }), false)
  })

  t.test('handlerTimeout while the store is slow to save: no crash, the 200 Fastify sent, a retry replays it', async (t) => {
    const slowStore = new Watch(await target.store())
    const inner = slowStore.complete.bind(slowStore)
    slowStore.complete = async (...args) => {
      await sleep(80)
      return inner(...args)
    }
    const app = Fastify({ handlerTimeout: 30 })
    t.teardown(() => app.close())
    await app.register(fastifyIdempotency, { store: slowStore })
    let runs = 0
    app.post('/', async () => ({ run: ++runs }))
    const first = await inject(app, 'k')
    t.equal(first.status, 200)
    t.same(JSON.parse(first.body), { run: 1 })
    await sleep(120) // past the handler timeout and the slow save
    await until(() => slowStore.saved.length === 1)
    const retry = await inject(app, 'k')
    t.equal(retry.headers['idempotent-replayed'], 'true')
    t.equal(retry.body, first.body)
    t.equal(runs, 1)
  })

  t.test('an error handler that turns a thrown error into a 200: sent as it says, never saved', async (t) => {
    let runs = 0
    const { app, store } = await plugin(t, async () => { throw new Error(`db down ${++runs}`) }, {}, {}, (app) => {
      app.setErrorHandler(async (error: Error) => ({ handled: error.message }))
    })
    const first = await inject(app, 'k')
    t.equal(first.status, 200)
    t.same(JSON.parse(first.body), { handled: 'db down 1' })
    await until(() => store.ended === 1)
    const retry = await inject(app, 'k')
    t.same(JSON.parse(retry.body), { handled: 'db down 2' }, 'the retry ran the handler again')
    t.equal(retry.headers['idempotent-replayed'], undefined)
    t.equal(store.saved.length, 0)
  })

  t.test('a global onSend hook before the plugin that throws: 500, and the key is not stuck', async (t) => {
    let runs = 0
    const app = Fastify()
    t.teardown(() => app.close())
    app.addHook('onSend', async (_request, reply) => {
      if (reply.statusCode < 500) throw new Error('signing failed')
    })
    const store = new Watch(await target.store())
    await app.register(fastifyIdempotency, { store })
    app.post('/', async () => ({ run: ++runs }))
    const first = await inject(app, 'k')
    t.equal(first.status, 500)
    await until(() => store.ended === 1)
    t.equal(store.released, 1, 'released')
    const retry = await inject(app, 'k')
    t.equal(retry.status, 500, 'the retry is not answered 409: it ran again')
    t.equal(runs, 2)
  })

  t.test('a global onSend hook after the plugin that throws: the client gets its 500, and nothing is saved', async (t) => {
    let runs = 0
    const store = new Watch(await target.store())
    const app = Fastify()
    t.teardown(() => app.close())
    await app.register(fastifyIdempotency, { store })
    app.addHook('onSend', async (_request, reply) => {
      if (reply.statusCode < 500) throw new Error('later hook failed')
    })
    app.post('/', async () => ({ run: ++runs }))
    t.equal((await inject(app, 'k')).status, 500)
    await until(() => store.ended === 1)
    t.equal(store.saved.length, 0, 'the 200 the client never got is not saved')
    t.equal((await inject(app, 'k')).status, 500)
    t.equal(runs, 2)
  })

  t.test('replays reach later onSend hooks as the original did: a string stays a string', async (t) => {
    const store = new Watch(await target.store())
    const app = Fastify()
    t.teardown(() => app.close())
    await app.register(fastifyIdempotency, { store })
    const seen: string[] = []
    app.addHook('onSend', async (_request, reply, payload) => {
      seen.push(typeof payload)
      if (typeof payload !== 'string') return payload
      reply.header('x-signature', `sig:${payload.length}`)
      return payload.toUpperCase()
    })
    let runs = 0
    app.post('/', async () => ({ n: ++runs, s: 'abc' }))
    const first = await inject(app, 'k')
    await until(() => store.ended === 1)
    const replay = await inject(app, 'k')
    t.equal(first.body, '{"N":1,"S":"ABC"}')
    t.equal(replay.body, first.body, 'the later hook transformed the replay as it did the original')
    t.equal(replay.headers['x-signature'], first.headers['x-signature'], 'and signed it')
    t.same(seen, ['string', 'string'])
    t.equal(runs, 1)
  })

  t.test('a reply with a custom serializer and no content-type: the replay has no content-type either', async (t) => {
    const { app, store } = await plugin(t, async (_request, reply) => {
      reply.serializer((payload) => `custom:${JSON.stringify(payload)}`)
      return { a: 1 }
    })
    const first = await inject(app, 'k')
    await until(() => store.ended === 1)
    const replay = await inject(app, 'k')
    t.equal(first.headers['content-type'], undefined)
    t.equal(replay.headers['content-type'], undefined)
    t.equal(replay.body, first.body)
    const headerNames = (answer: Answer) => Object.keys(answer.headers).filter((name) => !['date', 'idempotent-replayed', 'content-length', 'connection', 'keep-alive'].includes(name)).sort()
    t.same(headerNames(replay), headerNames(first), 'the same headers')
  })

  // Real sockets: the client hangs up, a connection timeout, raw writes.
  async function listen (t: Test, handler: Handler, server: FastifyServerOptions = {}, options: FastifyIdempotencyOptions = {}, setup?: (app: FastifyInstance) => void) {
    const lines: LogLine[] = []
    const { app, store } = await plugin(t, handler, { lockTtl: 1500, ...options }, { ...server, ...capturingLogger(lines) }, setup)
    await app.listen({ port: 0, host: '127.0.0.1' })
    const { port } = app.server.address() as AddressInfo
    /** POSTs with the key; resolves with the answer, or status 0 when the connection was cut. */
    const post = (key: string, abortAfter?: number) => new Promise<Answer>((resolve) => {
      const req = httpRequest({ host: '127.0.0.1', port, method: 'POST', path: '/', headers: { 'idempotency-key': key, 'content-type': 'application/json' } }, (res) => {
        let body = ''
        res.on('data', (chunk) => { body += chunk })
        res.on('end', () => resolve({ status: res.statusCode as number, body, headers: res.headers }))
        res.on('error', () => resolve({ status: 0, body, headers: {} }))
      })
      req.on('error', () => resolve({ status: 0, body: '', headers: {} }))
      req.end('{"n":1}')
      if (abortAfter !== undefined) setTimeout(() => req.destroy(), abortAfter)
    })
    return { app, store, post, lines }
  }

  t.test('the client hangs up while a handler that sets a status and returns nothing runs: released when it ends', async (t) => {
    const work = heldHandler(({ reply }) => { reply.code(204) })
    const { app, store, post } = await listen(t, work.handler)
    const cut = await post('k', 50)
    t.equal(cut.status, 0, 'the client hung up')
    t.equal((await post('k')).status, 409, 'while the handler runs, a duplicate is refused')
    work.open()
    await until(() => store.ended === 1)
    t.equal(store.released, 1, 'the claim was released: no reply reached the plugin')
    t.equal(app.idempotency.store, store)
    const retry = await post('k')
    t.equal(retry.status, 204, 'the retry ran the handler')
    t.equal(work.runs(), 2)
  })

  t.test('the client hangs up while a handler returns a value: saved, the retry replays it', async (t) => {
    const work = heldHandler(({ run, reply }) => {
      reply.code(201)
      return { charged: run }
    })
    const { store, post } = await listen(t, work.handler)
    t.equal((await post('k', 50)).status, 0)
    work.open()
    await until(() => store.ended === 1)
    t.equal(store.saved.length, 1)
    const retry = await post('k')
    t.equal(retry.status, 201)
    t.equal(retry.headers['idempotent-replayed'], 'true')
    t.same(JSON.parse(retry.body), { charged: 1 })
    t.equal(work.runs(), 1)
  })

  /** A preHandler before the plugin's that holds the first request until its client has hung up. */
  const firstWaitsForHangUp = (app: FastifyInstance) => {
    let requests = 0
    app.addHook('preHandler', async (_request, reply) => {
      if (++requests === 1) await new Promise((resolve) => reply.raw.once('close', resolve))
    })
  }

  t.test('the client hangs up before the claim is made: Fastify still runs the handler, which holds the key; the retry replays it', async (t) => {
    const work = heldHandler(({ run, reply }) => {
      reply.code(201)
      return { charged: run }
    }, { firstOnly: true })
    const { store, post } = await listen(t, work.handler, {}, {}, firstWaitsForHangUp)
    t.equal((await post('k', 50)).status, 0, 'the client hung up')
    await until(() => work.runs() === 1)
    t.equal((await post('k')).status, 409, 'while that handler runs, a duplicate is refused: the claim is held')
    t.equal(work.runs(), 1, 'never two runs at once')
    work.open()
    await until(() => store.ended === 1)
    const retry = await post('k')
    t.equal(retry.headers['idempotent-replayed'], 'true', 'its result was saved')
    t.same(JSON.parse(retry.body), { charged: 1 })
    t.equal(work.runs(), 1)
  })

  t.test('the client hangs up before the claim is made, and the handler returns nothing and never answers: released when it returns', async (t) => {
    let runs = 0
    const { store, post } = await listen(t, (_request, reply) => {
      if (++runs > 1) reply.code(204).send()
    }, {}, {}, firstWaitsForHangUp)
    t.equal((await post('k', 50)).status, 0)
    await until(() => store.ended === 1)
    t.equal(store.released, 1, 'released: nothing tells when it ends, and its client is gone')
    t.equal((await post('k')).status, 204, 'the retry runs')
    t.equal(runs, 2)
  })

  t.test('request.raw.destroy() in the handler: what Fastify alone sends, and the claim ends', async (t) => {
    await sameAsFastify(t, 'raw.destroy()', counted(async (_runs, request) => {
      await sleep(5)
      request.raw.destroy()
    }), true)
  })

  t.test('the handler destroys the socket: the claim ends with the handler, released', async (t) => {
    let runs = 0
    const { store, post } = await listen(t, async (request) => {
      runs++
      await sleep(5)
      request.raw.socket.destroy()
    })
    t.equal((await post('k')).status, 0, 'the connection was cut')
    await until(() => store.ended === 1)
    t.equal(store.released, 1)
    t.equal((await post('k')).status, 0, 'the retry ran again (and was cut again)')
    t.equal(runs, 2)
  })

  t.test('connectionTimeout cuts a handler that returns nothing: released when it ends, not stuck', async (t) => {
    const work = heldHandler(({ reply }) => { reply.code(204) })
    const { store, post } = await listen(t, work.handler, { connectionTimeout: 100 })
    t.equal((await post('k')).status, 0, 'the connection timed out')
    t.equal(store.ended, 0, 'held while the handler runs')
    work.open()
    await until(() => store.ended === 1)
    t.equal(store.released, 1)
    t.equal((await post('k')).status, 204, 'the retry ran the handler')
    t.equal(work.runs(), 2)
  })

  t.test('SSE-style raw writes ended after the handler returns: released when the raw response ends', async (t) => {
    let runs = 0
    const { store, post } = await listen(t, async (_request, reply) => {
      runs++
      reply.raw.writeHead(200, { 'content-type': 'text/event-stream' })
      reply.raw.write('data: one\n\n')
      setTimeout(() => reply.raw.end('data: two\n\n'), 30)
    })
    const first = await post('k')
    t.equal(first.status, 200)
    t.equal(first.body, 'data: one\n\ndata: two\n\n')
    await until(() => store.ended === 1)
    t.equal(store.released, 1, 'nothing to save: released')
    t.equal((await post('k')).status, 200)
    t.equal(runs, 2)
  })

  t.test('leases are renewed while a handler runs, and stop once the handler and the response are over', async (t) => {
    const work = heldHandler(({ reply }) => { reply.code(204) })
    const { store, post } = await listen(t, work.handler)
    const answers = Promise.all([post('a', 20), post('b'), post('c', 20)])
    await until(() => store.renewed >= 3, 400) // lockTtl 1500: renewed every 500 ms
    t.ok(store.renewed >= 3, 'renewed while the handlers run')
    work.open()
    await answers
    await until(() => store.ended === 3)
    t.equal(store.ended, 3, 'every claim ended: the hung-up ones and the answered one')
    const renewed = store.renewed
    await sleep(700)
    t.equal(store.renewed, renewed, 'no renewal after the claims ended')
  })
}
