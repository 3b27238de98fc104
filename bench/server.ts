/**
 * One server under test, in its own process (pinned to its own core by
 * run.ts). BENCH_CONFIG names the configuration (see shared.ts); every
 * configuration serves the same `POST /orders`: the same JSON body in, the
 * same order out (about 200 bytes), 201.
 *
 * It listens on 127.0.0.1, port 0, tells its port over IPC, and answers
 * 'stats' messages with its own `process.cpuUsage()`, memory, and request
 * and handler counts. run.ts asks between loads, never under load, so the
 * CPU figures are the server's work on the measured requests and nothing
 * else.
 *
 * BENCH_VERIFY=1 also records every key that reaches the server and every
 * key the handler ran for (a Set each: only for checks, it costs time).
 *
 * BENCH_PLUGIN is the plugin's entry point: run.ts compiles the plugin with
 * tsc and points here, so that the server runs what users run (tsx would add
 * its own helpers to every closure). Without it, the TypeScript source.
 */
import { createServer, type Server } from 'node:http'
import { PerformanceObserver } from 'node:perf_hooks'
import Fastify, { type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify'
import type { MemoryStore } from '../index.js'
import { KEY_HEADER, ROUTE, configuration, orderFor, type FromServer, type OrderInput, type ServerStats, type ToServer } from './shared.js'

type Plugin = typeof import('../index.js')
const pluginEntry = process.env.BENCH_PLUGIN ?? '../index.js'
const loadPlugin = () => import(pluginEntry) as Promise<Plugin>
const name = process.env.BENCH_CONFIG ?? ''
const redisUrl = process.env.BENCH_REDIS_URL
const postgresUrl = process.env.BENCH_POSTGRES_URL
const verify = process.env.BENCH_VERIFY === '1'

let requests = 0
let handlerRuns = 0
let keyedRequests = 0
const requestKeys = new Set<string>()
const handlerKeys = new Set<string>()
/** Completed records in the store, for the memory run. */
let storeRecords: (() => number) | undefined
const closers: Array<() => unknown> = []
/** Garbage collection pauses, µs: one performance entry per collection, summed as they come. */
let gcMicros = 0
new PerformanceObserver((list) => {
  for (const entry of list.getEntries()) gcMicros += entry.duration * 1000
}).observe({ entryTypes: ['gc'] })

/** The route's logic: one handler run, one order. */
function placeOrder (body: OrderInput, key: unknown): Record<string, unknown> {
  handlerRuns++
  if (verify && typeof key === 'string') handlerKeys.add(key)
  return orderFor(body, handlerRuns)
}

function seeKey (key: unknown): void {
  if (typeof key !== 'string') return
  keyedRequests++
  requestKeys.add(key)
}

function send (message: FromServer): void {
  process.send?.(message)
}

async function fastifyApp (): Promise<FastifyInstance> {
  const app = Fastify({ logger: false })
  if (verify) app.addHook('onRequest', (request, _reply, done) => { seeKey(request.headers[KEY_HEADER]); done() })
  const route = async (request: FastifyRequest, reply: FastifyReply) => {
    reply.code(201)
    return placeOrder(request.body as OrderInput, request.headers[KEY_HEADER])
  }

  switch (name) {
    case 'fastify':
      break
    case 'idempotency-memory': {
      const { default: fastifyIdempotency } = await loadPlugin()
      await app.register(fastifyIdempotency)
      const store = app.idempotency.store as MemoryStore
      storeRecords = () => store.usage().records
      break
    }
    case 'idempotency-redis':
    case 'idempotency-redis-nocache':
    case 'idempotency-redis-replicas': {
      const { default: fastifyIdempotency } = await loadPlugin()
      const { default: fastifyRedis } = await import('@fastify/redis')
      await app.register(fastifyRedis, { url: redisUrl })
      // Without the replay cache, every replay is a claim in Redis: what a process that did not see the record pays.
      // With replicas, every claim and save waits for the replica's acknowledgement (WAIT).
      const options = name === 'idempotency-redis-nocache'
        ? { replayCache: 0 }
        : name === 'idempotency-redis-replicas' ? { redis: { replicas: 1 } } : {}
      await app.register(fastifyIdempotency, { store: 'redis', ...options })
      break
    }
    case 'idempotency-postgres': {
      const { default: fastifyIdempotency } = await loadPlugin()
      const { default: fastifyPostgres } = await import('@fastify/postgres')
      await app.register(fastifyPostgres, { connectionString: postgresUrl })
      await app.register(fastifyIdempotency, { store: 'postgres' })
      break
    }
    case 'node-idem-memory':
    case 'node-idem-redis': {
      const { nodeIdempotencyHooks } = await import('./peers/node-idempotency.js')
      await nodeIdempotencyHooks(app, name === 'node-idem-redis' ? redisUrl : undefined, closers, (size) => { storeRecords = size })
      break
    }
    case 'powertools-redis': {
      const { powertoolsRoute } = await import('./peers/powertools.js')
      app.post(ROUTE, await powertoolsRoute(redisUrl as string, placeOrder, closers))
      return app
    }
    case 'floor-1':
    case 'floor-2': {
      const { default: fastifyRedis } = await import('@fastify/redis')
      const { floorHooks } = await import('./floors.js')
      await app.register(fastifyRedis, { url: redisUrl })
      floorHooks(app, name === 'floor-2')
      break
    }
    case 'rate-limit':
    case 'rate-limit-redis': {
      const { default: rateLimit } = await import('@fastify/rate-limit')
      let redis
      if (name === 'rate-limit-redis') {
        const { default: fastifyRedis } = await import('@fastify/redis')
        await app.register(fastifyRedis, { url: redisUrl })
        redis = app.redis
      }
      // A limit no run reaches: every request pays the lookup (memory) or the script call (Redis), none is refused.
      await app.register(rateLimit, { max: 1_000_000_000, timeWindow: 60_000, redis })
      break
    }
    default:
      throw new Error(`unknown Fastify configuration ${name}`)
  }
  app.post(ROUTE, route)
  return app
}

async function expressServer (): Promise<Server> {
  const { default: express } = await import('express')
  const app = express()
  app.disable('x-powered-by')
  if (verify) app.use((req, _res, next) => { seeKey(req.headers[KEY_HEADER]); next() })
  app.use(express.json())
  if (name === 'express') {
    app.post(ROUTE, (req, res) => {
      res.status(201).json(placeOrder(req.body as OrderInput, req.headers[KEY_HEADER]))
    })
  } else if (name === 'express-idempotency') {
    const { idempotency, getSharedIdempotencyService } = await import('express-idempotency')
    app.post(ROUTE, idempotency(), (req, res) => {
      // As its README says: the middleware has answered a duplicate; the handler must not run.
      if (getSharedIdempotencyService().isHit(req)) return
      res.status(201).json(placeOrder(req.body as OrderInput, req.headers[KEY_HEADER]))
    })
  } else {
    throw new Error(`unknown Express configuration ${name}`)
  }
  return createServer(app)
}

function stats (): ServerStats {
  const cpu = process.cpuUsage()
  const memory = process.memoryUsage()
  return {
    cpuMicros: cpu.user + cpu.system,
    gcMicros,
    clockMicros: Number(process.hrtime.bigint() / 1000n),
    requests,
    handlerRuns,
    rss: memory.rss,
    heapUsed: memory.heapUsed,
    ...(verify ? { keyedRequests, distinctRequestKeys: requestKeys.size, distinctHandlerKeys: handlerKeys.size } : {}),
    ...(storeRecords === undefined ? {} : { storeRecords: storeRecords() })
  }
}

async function main (): Promise<void> {
  const { framework, redis, postgres } = configuration(name)
  if (redis && redisUrl === undefined) throw new Error(`${name} needs BENCH_REDIS_URL`)
  if (postgres === true && postgresUrl === undefined) throw new Error(`${name} needs BENCH_POSTGRES_URL`)
  let server: Server
  let close: () => Promise<unknown>
  if (framework === 'fastify') {
    const app = await fastifyApp()
    await app.listen({ host: '127.0.0.1', port: 0 })
    server = app.server
    close = () => app.close()
  } else {
    const express = await expressServer()
    await new Promise<void>((resolve) => express.listen(0, '127.0.0.1', resolve))
    server = express
    close = () => new Promise((resolve) => {
      express.close(resolve)
      express.closeAllConnections()
    })
  }
  // Every request the server took in, whether the load generator still waited for its answer or not.
  server.on('request', () => { requests++ })
  const port = (server.address() as { port: number }).port
  process.on('message', (message: ToServer) => {
    if (message.type === 'stats') send({ type: 'stats', id: message.id, stats: stats() })
    else if (message.type === 'gc') {
      (globalThis as { gc?: () => void }).gc?.()
      send({ type: 'stats', id: message.id, stats: stats() })
    } else if (message.type === 'stop') {
      // A normal exit: with --cpu-prof (run.ts --profile), Node writes the profile now.
      close().then(async () => {
        for (const closer of closers) await closer()
      }).finally(() => process.exit(0))
    }
  })
  process.on('disconnect', () => process.exit(0))
  send({ type: 'listening', port })
}

main().catch((err: Error) => {
  send({ type: 'error', message: err.stack ?? String(err) })
  process.exitCode = 1
  setTimeout(() => process.exit(1), 100)
})
