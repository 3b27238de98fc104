/**
 * fastify-idempotency: the Idempotency-Key header for Fastify. The first
 * request with a key runs the handler; every retry gets the saved response.
 */
import fp from 'fastify-plugin'
import type { FastifyPluginAsync, FastifyReply, RouteOptions } from 'fastify'
import { createHooks } from './lib/hooks.js'
import { LeaseKeeper } from './lib/leases.js'
import { resolveOptions } from './lib/options.js'
import { documentRoute } from './lib/openapi.js'
import { resolveRoute } from './lib/route-config.js'
import { Stats } from './lib/stats.js'
import { statsHandler } from './lib/stats-page.js'
import { NO_KEY, kState, type StatefulReply } from './lib/state.js'
import { Stores } from './lib/stores/index.js'
import type { FastifyIdempotencyOptions } from './types/index.js'

export type * from './types/index.js'
export { MemoryStore, type MemoryStoreOptions } from './lib/stores/memory.js'
export { RedisStore, type RedisStoreOptions } from './lib/stores/redis.js'
export { canonicalJson, defaultFingerprint } from './lib/fingerprint.js'
export { defaultKeyEncoder } from './lib/key-encoder.js'
export * as errors from './lib/errors.js'

const plugin: FastifyPluginAsync<FastifyIdempotencyOptions> = async (fastify, options) => {
  const settings = resolveOptions(options)
  const stores = new Stores(fastify, settings)
  const store = stores.main
  const leases = new LeaseKeeper(settings.lockTtl, settings.logKey)
  const hooks = createHooks(settings, leases)
  const stats = new Stats(store, settings.stats,
    (err) => fastify.log.error({ err }, 'fastify-idempotency: stats could not be saved'))
  if (settings.scope === undefined && settings.mode !== 'exempt') {
    fastify.log.warn('fastify-idempotency: no `scope` is set, so keys are shared by every client: a client that sends another client\'s key gets that client\'s saved response. Set `scope` to the authenticated principal (see the README, "Scope").')
  }

  fastify.decorate('idempotency', { store, stats: () => stats.read() })
  fastify.decorateReply(kState, null)
  fastify.decorateReply('idempotency', {
    getter (this: FastifyReply) {
      return (this as StatefulReply)[kState] ?? NO_KEY
    }
  })

  fastify.addHook('onRoute', (route: RouteOptions) => {
    const routeSettings = resolveRoute(route, settings, stores, settings.stats.counting ? stats : undefined)
    if (routeSettings === undefined) return
    if (fastify.hasDecorator('swagger')) documentRoute(route, routeSettings, settings)
    route.onRequest = [hooks.checkHeader(routeSettings), ...asArray(route.onRequest)] // first: the route's own hooks see the key
    route.preHandler = [...asArray(route.preHandler), hooks.claimKey]
    route.handler = hooks.trackHandler(route.handler)
  })
  fastify.addHook('onSend', hooks.saveReply)
  fastify.addHook('onClose', async () => {
    leases.close()
    await stats.close()
    stores.close()
  })

  if (settings.stats.route !== undefined) {
    fastify.get(settings.stats.route, { preHandler: settings.stats.preHandler, config: { idempotency: false } }, statsHandler)
  }
}

function asArray<T> (value: T | T[] | undefined): T[] {
  if (value === undefined) return []
  return Array.isArray(value) ? value : [value]
}

export const fastifyIdempotency = fp(plugin, { fastify: '5.x', name: 'fastify-idempotency' })
export default fastifyIdempotency
