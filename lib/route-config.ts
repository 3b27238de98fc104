/**
 * Per-route settings: which routes the plugin covers, for which methods, and
 * with what overrides. Resolved once per route when it is added (`onRoute`),
 * never at request time, into one object: everything the request path of
 * that route reads.
 */
import type { RouteOptions } from 'fastify'
import { InvalidRouteConfigError } from './errors.js'
import { defaultFingerprint, localFingerprint } from './fingerprint.js'
import { defaultKeyEncoder, localKeyEncoder, logKeyFor } from './key-encoder.js'
import type { LeaseKeeper } from './leases.js'
import { check, inherit, routeConfigSchema, type Endpoint, type Inherited, type PluginSettings } from './options.js'
import type { Stores } from './stores/index.js'
import { MemoryStore } from './stores/memory.js'
import { emptyCounters, type Stats } from './stats.js'
import type { IdempotencyRouteOptions, IdempotencyStore, KeyEncoder, RouteCounters } from '../types/index.js'

/** What the request path of one covered route reads: the route's settings, and the plugin's under `plugin`. */
export interface RouteSettings extends Inherited {
  /** The route's methods that the plugin handles. */
  methods: ReadonlySet<string>
  required: boolean
  manual: boolean
  store: IdempotencyStore
  /** The request's fingerprint (Inherited's, or the default's local form for a store in this process). */
  fingerprint: Inherited['fingerprint']
  /** Builds the store key: the plugin's `keyEncoder`, or the default's unhashed form for a store in this process. */
  keyEncoder: KeyEncoder
  /** How logs name a store key of this route (never the client's key in clear). */
  logKey: (storeKey: string) => string
  /** This route's pending stats counters, named `'POST /orders'` (the methods it covers and its path). */
  counters: RouteCounters
  plugin: PluginSettings & { leases: LeaseKeeper }
}

/** The settings of `route`, or undefined when the plugin leaves it alone. */
export function resolveRoute (
  route: RouteOptions, plugin: RouteSettings['plugin'], stores: Stores, stats: Stats | undefined, matched: Set<Endpoint>
): RouteSettings | undefined {
  const config: unknown = route.config?.idempotency
  if (config === false) return undefined
  const routeMethods = [route.method].flat().map((m) => m.toUpperCase())
  const name = `${routeMethods.join(',')} ${route.url}`
  const fail = (path: string, message: string) => new InvalidRouteConfigError(name, path, message)
  const explicit = config !== undefined
  if (explicit && config !== true) {
    if (typeof config !== 'object' || config === null || Array.isArray(config)) {
      throw fail('config.idempotency', 'must be true, false or an object of route options')
    }
    check(routeConfigSchema, config, fail)
  }
  if (!explicit && plugin.mode === 'exempt') return undefined

  const matches = plugin.endpoints.filter((e) => route.url.startsWith(e.prefix))
  if (!explicit && plugin.endpoints.length > 0 && matches.length === 0) return undefined
  const methods = new Set(routeMethods.filter((method) => matches.some((e) => e.method === '*' || e.method === method) ||
    (plugin.methods.has(method) && (explicit || plugin.endpoints.length === 0 || matches.some((e) => e.method === undefined)))))
  if (methods.size === 0) {
    // Fastify adds a HEAD route for every GET route, with the same config; it is simply not covered.
    if (explicit && routeMethods.some((method) => method !== 'HEAD')) {
      throw fail('config.idempotency', `none of the route's methods is handled; add them to the plugin's \`methods\` option (${[...plugin.methods].join(', ')})`)
    }
    return undefined
  }
  for (const endpoint of matches) matched.add(endpoint)

  const options: IdempotencyRouteOptions = typeof config === 'object' && config !== null ? config : {}
  const inherited = inherit(options, plugin.inherited, fail)
  const store = stores.forRoute(inherited, options, fail)
  // The memory store never leaves the process: its keys need no hash (the shared stores' do).
  const local = store instanceof MemoryStore
  const keyEncoder = plugin.keyEncoder === defaultKeyEncoder && local ? localKeyEncoder : plugin.keyEncoder
  return {
    ...inherited,
    // Nor do its fingerprints, when short (see localFingerprint).
    fingerprint: inherited.fingerprint === defaultFingerprint && local ? localFingerprint : inherited.fingerprint,
    methods,
    required: config === true || (options.required ?? plugin.mode === 'required'),
    manual: options.manual ?? false,
    store,
    keyEncoder,
    logKey: logKeyFor(keyEncoder),
    counters: stats === undefined ? emptyCounters() : stats.counters(`${[...methods].join(',')} ${route.url}`),
    plugin
  }
}
