/**
 * fastify-idempotency: the Idempotency-Key header for Fastify. The first
 * request with a key runs the handler; every retry gets the saved response.
 *
 * This file wires the parts together; the request path is in
 * lib/claim.ts (the header, the claim, the answer for duplicates) and
 * lib/completion.ts (following the handler and the response, and ending the
 * claim).
 */
import fp from 'fastify-plugin'
import type { FastifyPluginAsync, FastifyReply, RouteOptions } from 'fastify'
import { checkHeader, claimKey } from './lib/claim.js'
import { captureReply, noteError, trackHandler } from './lib/completion.js'
import { RegisteredTwiceError } from './lib/errors.js'
import { LeaseKeeper } from './lib/leases.js'
import { addErrorSchemas, documentRoute } from './lib/openapi.js'
import { resolveOptions, type Endpoint } from './lib/options.js'
import { resolveRoute, type RouteSettings } from './lib/route-config.js'
import { NO_KEY, kState, type StatefulReply } from './lib/state.js'
import { Stats } from './lib/stats.js'
import { statsHandler, statsSchema } from './lib/stats-page.js'
import { Stores } from './lib/stores/index.js'
import { warnings } from './lib/warnings.js'
import type { FastifyIdempotencyOptions } from './types/index.js'

export type * from './types/index.js'
export { MemoryStore, type MemoryStoreOptions } from './lib/stores/memory.js'
export { RedisStore, type RedisStoreOptions } from './lib/stores/redis.js'
export { PostgresStore, type PostgresStoreOptions } from './lib/stores/postgres.js'
export { canonicalJson, defaultFingerprint } from './lib/fingerprint.js'
export { defaultKeyEncoder } from './lib/key-encoder.js'
export * as errors from './lib/errors.js'

const plugin: FastifyPluginAsync<FastifyIdempotencyOptions> = async (fastify, options) => {
  if (fastify.hasDecorator('idempotency')) throw new RegisteredTwiceError()
  const settings = resolveOptions(options)
  const stores = new Stores(fastify, settings)
  const routePlugin: RouteSettings['plugin'] = { ...settings, leases: new LeaseKeeper(settings.lockTtl, fastify.log) }
  const stats = new Stats(stores.main, settings.stats,
    (err) => fastify.log.error({ err }, 'idempotency: stats could not be saved'))
  if (settings.inherited.scope === undefined && settings.mode !== 'exempt') warnings.noScope()

  fastify.decorate('idempotency', { store: stores.main, stats: () => stats.read() })
  fastify.decorateReply(kState, null)
  fastify.decorateReply('idempotency', {
    getter (this: FastifyReply) {
      return (this as StatefulReply)[kState] ?? NO_KEY
    }
  })

  const swagger = fastify.hasDecorator('swagger')
  if (swagger) addErrorSchemas(fastify)
  let covered = 0
  const matched = new Set<Endpoint>()
  fastify.addHook('onRoute', (route: RouteOptions) => {
    const routeSettings = resolveRoute(route, routePlugin, stores, settings.stats.counting ? stats : undefined, matched)
    if (routeSettings === undefined) return
    covered++
    if (swagger) documentRoute(route, routeSettings)
    route.onRequest = [checkHeader(routeSettings), ...asArray(route.onRequest)] // first: the route's own hooks see the key
    route.preHandler = [...asArray(route.preHandler), claimKey]
    route.onError = [...asArray(route.onError), noteError]
    route.handler = trackHandler(route.handler)
  })
  fastify.addHook('onSend', captureReply)
  fastify.addHook('onReady', async () => {
    if (settings.mode === 'required' && covered === 0) warnings.requiredCoversNothing()
    for (const endpoint of settings.endpoints) if (!matched.has(endpoint)) warnings.endpointMatchesNothing(endpoint.pattern)
    await stores.verify()
  })
  fastify.addHook('onClose', async () => {
    routePlugin.leases.close()
    await stats.close()
    await stores.close()
  })

  if (settings.stats.route !== undefined) {
    fastify.get(settings.stats.route, {
      preHandler: settings.stats.preHandler,
      config: { idempotency: false },
      schema: statsSchema
    }, statsHandler)
  }
}

function asArray<T> (value: T | T[] | undefined): T[] {
  if (value === undefined) return []
  return Array.isArray(value) ? value : [value]
}

export const fastifyIdempotency = fp(plugin, { fastify: '5.x', name: 'fastify-idempotency' })
export default fastifyIdempotency
