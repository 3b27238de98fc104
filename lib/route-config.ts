/**
 * Per-route settings: which routes the plugin covers, for which methods, and
 * with what overrides. Resolved once per route when it is added (`onRoute`),
 * never at request time.
 */
import { Type } from '@sinclair/typebox'
import type { RouteOptions } from 'fastify'
import { InvalidRouteConfigError } from './errors.js'
import { check, resolveEvents, resolveFingerprint, shared, storeErrorPolicy, type Events, type PluginSettings } from './options.js'
import type { Stores } from './stores/index.js'
import { emptyCounters, type Stats } from './stats.js'
import type { FingerprintFunction, IdempotencyRouteOptions, IdempotencyStore, RouteCounters, ScopeFunction, StoreErrorPolicy } from '../types/index.js'

const routeObjectSchema = Type.Partial(Type.Object({
  required: Type.Boolean(),
  manual: Type.Boolean(),
  ttl: shared.ttl,
  storeOnStatuses: shared.storeOnStatuses,
  conflictStatusCode: shared.conflictStatusCode,
  fingerprint: shared.fingerprint,
  scope: shared.scope,
  onStoreError: shared.onStoreError,
  onReplay: shared.onReplay,
  onConflict: shared.onConflict,
  onMismatch: shared.onMismatch,
  redisNamespace: shared.redisNamespace
}), { additionalProperties: false })
const routeSchema = Type.Union([Type.Boolean(), routeObjectSchema], { errorMessage: 'must be true, false or an object of route options' })

/** Everything the request hooks of one route need, plugin options and route overrides merged. */
export interface RouteSettings {
  /** The route's methods that the plugin handles. */
  methods: ReadonlySet<string>
  required: boolean
  manual: boolean
  ttl: number | null
  storeOnStatuses: ReadonlySet<number>
  conflictStatusCode: number | null
  fingerprint: FingerprintFunction | undefined
  scope: ScopeFunction | undefined
  storeErrorPolicy: StoreErrorPolicy
  events: Events
  store: IdempotencyStore
  /** This route's pending stats counters, named `'POST /orders'` (the methods it covers and its path). */
  counters: RouteCounters
}

/** The settings of `route`, or undefined when the plugin leaves it alone. */
export function resolveRoute (route: RouteOptions, plugin: PluginSettings, stores: Stores, stats: Stats | undefined): RouteSettings | undefined {
  const config: unknown = route.config?.idempotency
  if (config === false) return undefined
  const routeMethods = (Array.isArray(route.method) ? route.method : [route.method]).map((m) => m.toUpperCase())
  const name = `${routeMethods.join(',')} ${route.url}`
  const explicit = config !== undefined
  if (explicit) {
    // An object is checked against the object schema itself, so the error names the bad field, not the union.
    const schema = typeof config === 'object' && config !== null && !Array.isArray(config) ? routeObjectSchema : routeSchema
    check(schema, config, (path, message) =>
      new InvalidRouteConfigError(name, path === '(options)' ? 'config.idempotency' : path, message))
  }
  if (!explicit && plugin.mode === 'exempt') return undefined

  const matches = plugin.endpoints.filter((e) => route.url.startsWith(e.prefix))
  if (!explicit && plugin.endpoints.length > 0 && matches.length === 0) return undefined
  const methods = new Set(routeMethods.filter((method) => matches.some((e) => e.method === '*' || e.method === method) ||
    (plugin.methods.has(method) && (explicit || plugin.endpoints.length === 0 || matches.some((e) => e.method === undefined)))))
  if (methods.size === 0) {
    // Fastify adds a HEAD route for every GET route, with the same config; it is simply not covered.
    if (explicit && routeMethods.some((method) => method !== 'HEAD')) {
      throw new InvalidRouteConfigError(name, 'config.idempotency',
        `none of the route's methods is handled; add them to the plugin's \`methods\` option (${[...plugin.methods].join(', ')})`)
    }
    return undefined
  }

  const options: IdempotencyRouteOptions = typeof config === 'object' && config !== null ? config : {}
  return {
    methods,
    required: config === true || (options.required ?? plugin.mode === 'required'),
    manual: options.manual ?? false,
    ttl: options.ttl === undefined ? plugin.ttl : options.ttl,
    storeOnStatuses: options.storeOnStatuses === undefined ? plugin.storeOnStatuses : new Set(options.storeOnStatuses),
    conflictStatusCode: options.conflictStatusCode === undefined ? plugin.conflictStatusCode : options.conflictStatusCode,
    fingerprint: options.fingerprint === undefined ? plugin.fingerprint : resolveFingerprint(options.fingerprint),
    scope: options.scope ?? plugin.scope,
    storeErrorPolicy: storeErrorPolicy(options.onStoreError, plugin.storeErrorPolicy),
    events: resolveEvents(options, plugin.events),
    store: stores.forRoute(options.redisNamespace, (message) => new InvalidRouteConfigError(name, 'redisNamespace', message)),
    counters: stats === undefined ? emptyCounters() : stats.counters(`${[...methods].join(',')} ${route.url}`)
  }
}
