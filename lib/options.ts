/**
 * Plugin options: one TypeBox schema, checked once at registration; defaults
 * filled once; the result is the settings every hook reads.
 */
import { METHODS } from 'node:http'
import { Kind, Type, TypeRegistry, type TSchema } from '@sinclair/typebox'
import { Value } from '@sinclair/typebox/value'
import { ValueErrorType } from '@sinclair/typebox/errors'
import { InvalidOptionError } from './errors.js'
import { defaultFingerprint } from './fingerprint.js'
import { defaultKeyEncoder, logKeyFor } from './key-encoder.js'
import type { KeyRules } from './header.js'
import { unsavedHeaders } from './response.js'
import type { preHandlerHookHandler } from 'fastify'
import type { StatsSettings } from './stats.js'
import type {
  FastifyIdempotencyOptions, FingerprintFunction, IdempotencyEvent, IdempotencyMode, IdempotencyRouteOptions,
  IdempotencyStore, KeyEncoder, ScopeFunction, StoreErrorEvent, StoreErrorPolicy
} from '../types/index.js'

if (!TypeRegistry.Has('IdempotencyRegExp')) {
  TypeRegistry.Set('IdempotencyRegExp', (_schema, value) => value instanceof RegExp)
}

const TOKEN = '^[!#$%&\'*+.^_`|~0-9A-Za-z-]+$'
const fn = (errorMessage: string): TSchema => Type.Function([Type.Any()], Type.Any(), { errorMessage })

/** Schemas shared by the plugin options and the route config. */
export const shared = {
  ttl: Type.Union([Type.Integer({ minimum: 1 }), Type.Null()], {
    errorMessage: 'must be a positive integer (ms) or null'
  }),
  storeOnStatuses: Type.Array(Type.Integer({ minimum: 100, maximum: 599 }), {
    minItems: 1, errorMessage: 'must be a non-empty array of HTTP status codes'
  }),
  conflictStatusCode: Type.Union([Type.Integer({ minimum: 200, maximum: 599 }), Type.Null()], {
    errorMessage: 'must be an HTTP status code from 200 to 599, or null'
  }),
  fingerprint: Type.Union([Type.Boolean(), fn('')], {
    errorMessage: 'must be a boolean or a function (request) => string'
  }),
  scope: fn('must be a function (request) => string | undefined'),
  onStoreError: Type.Union([Type.Literal('fail-closed'), Type.Literal('fail-open'), fn('')], {
    errorMessage: 'must be \'fail-closed\', \'fail-open\' or a function (request, key, error) => policy'
  }),
  onReplay: fn('must be a function (request, key) => void'),
  onConflict: fn('must be a function (request, key) => void'),
  onMismatch: fn('must be a function (request, key) => void'),
  redisNamespace: Type.String({ minLength: 1, errorMessage: 'must be the non-empty name of a @fastify/redis namespace' })
}

const storeSchema = Type.Object({
  claim: Type.Function([], Type.Any()),
  complete: Type.Function([], Type.Any()),
  release: Type.Function([], Type.Any()),
  renew: Type.Function([], Type.Any())
})

const statsSchema = Type.Object({
  ttl: Type.Optional(Type.Integer({ minimum: 1, errorMessage: 'must be a positive integer (ms)' })),
  flushInterval: Type.Optional(Type.Integer({ minimum: 1, errorMessage: 'must be a positive integer (ms)' })),
  route: Type.Optional(Type.String({ pattern: '^/', errorMessage: 'must be a path starting with /' })),
  preHandler: Type.Optional(Type.Union([fn(''), Type.Array(fn(''))], { errorMessage: 'must be a preHandler hook or an array of them' })),
  warnRecords: Type.Optional(Type.Integer({ minimum: 0, errorMessage: 'must be an integer of at least 0' }))
}, { additionalProperties: false })

const optionsSchema = Type.Partial(Type.Object({
  header: Type.String({ pattern: TOKEN, errorMessage: 'must be a valid HTTP header name' }),
  methods: Type.Array(Type.String(), { minItems: 1, errorMessage: 'must be a non-empty array of HTTP methods' }),
  mode: Type.Union([Type.Literal('optional'), Type.Literal('required'), Type.Literal('exempt')], {
    errorMessage: 'must be \'optional\', \'required\' or \'exempt\''
  }),
  endpoints: Type.Array(Type.String(), { errorMessage: 'must be an array of strings' }),
  ttl: shared.ttl,
  lockTtl: Type.Integer({ minimum: 3, errorMessage: 'must be an integer of at least 3 (ms)' }),
  inFlight: Type.Object({
    wait: Type.Optional(Type.Integer({ minimum: 0, errorMessage: 'must be an integer of at least 0 (ms)' })),
    statusCode: Type.Optional(Type.Union([Type.Literal(409), Type.Literal(423)], { errorMessage: 'must be 409 or 423' }))
  }, { additionalProperties: false }),
  storeOnStatuses: shared.storeOnStatuses,
  conflictStatusCode: shared.conflictStatusCode,
  replayHeader: Type.Union([Type.String({ pattern: TOKEN }), Type.Literal(false)], {
    errorMessage: 'must be a valid HTTP header name or false'
  }),
  fingerprint: shared.fingerprint,
  scope: shared.scope,
  key: Type.Object({
    maxLength: Type.Optional(Type.Integer({ minimum: 1, maximum: 8192, errorMessage: 'must be an integer from 1 to 8192' })),
    pattern: Type.Optional(Type.Unsafe<RegExp>({ [Kind]: 'IdempotencyRegExp', errorMessage: 'must be a RegExp' })),
    uuid: Type.Optional(Type.Boolean())
  }, { additionalProperties: false }),
  keyEncoder: fn('must be a function (parts) => string'),
  telemetry: Type.Boolean(),
  replaySetCookie: Type.Boolean(),
  store: Type.Union([Type.Literal('memory'), Type.Literal('redis'), storeSchema], {
    errorMessage: 'must be \'memory\', \'redis\' or an object with claim, complete, release and renew methods'
  }),
  redisNamespace: shared.redisNamespace,
  storeTimeout: Type.Integer({ minimum: 1, errorMessage: 'must be a positive integer (ms)' }),
  onStoreError: shared.onStoreError,
  onReplay: shared.onReplay,
  onConflict: shared.onConflict,
  onMismatch: shared.onMismatch,
  errors: Type.Union([Type.Literal('fastify'), Type.Literal('problem+json')], {
    errorMessage: 'must be \'fastify\' or \'problem+json\''
  }),
  stats: Type.Union([Type.Literal(false), statsSchema], { errorMessage: 'must be false or an object { ttl, flushInterval, route, preHandler, warnRecords }' })
}), { additionalProperties: false })

/** An `endpoints` entry: an optional method (`*` for any) and a path prefix. */
export interface Endpoint {
  method: string | undefined
  prefix: string
}

/** The options after validation, with every default filled in. */
export interface PluginSettings {
  header: string
  methods: ReadonlySet<string>
  mode: IdempotencyMode
  endpoints: readonly Endpoint[]
  ttl: number | null
  lockTtl: number
  inFlightWait: number
  inFlightStatus: 409 | 423
  storeOnStatuses: ReadonlySet<number>
  conflictStatusCode: number | null
  replayHeader: string | false
  fingerprint: FingerprintFunction | undefined
  scope: ScopeFunction | undefined
  keyRules: KeyRules
  keyEncoder: KeyEncoder
  /** How logs name a store key (see `logKeyFor`). */
  logKey: (storeKey: string) => string
  telemetry: boolean
  /** Headers never saved with a response. */
  unsavedHeaders: ReadonlySet<string>
  store: 'memory' | 'redis' | IdempotencyStore
  redisNamespace: string | undefined
  storeTimeout: number
  storeErrorPolicy: StoreErrorPolicy
  events: Events
  problemJson: boolean
  /** `counting` is false with `stats: false`; the rest still serves `fastify.idempotency.stats()`. */
  stats: StatsSettings & { counting: boolean, route: string | undefined, preHandler: preHandlerHookHandler[] }
}

/** The event callbacks of a route (or of the plugin). */
export interface Events {
  onReplay: IdempotencyEvent | undefined
  onConflict: IdempotencyEvent | undefined
  onMismatch: IdempotencyEvent | undefined
  onStoreError: StoreErrorEvent | undefined
}

/** The events of `options`, falling back to `inherited` for each one it does not set. */
export function resolveEvents (options: FastifyIdempotencyOptions | IdempotencyRouteOptions, inherited?: Events): Events {
  const onStoreError = typeof options.onStoreError === 'function' ? options.onStoreError : undefined
  return {
    onReplay: options.onReplay ?? inherited?.onReplay,
    onConflict: options.onConflict ?? inherited?.onConflict,
    onMismatch: options.onMismatch ?? inherited?.onMismatch,
    onStoreError: options.onStoreError === undefined ? inherited?.onStoreError : onStoreError
  }
}

/** The policy that `onStoreError` names; a function's policy is decided per failure. */
export function storeErrorPolicy (option: StoreErrorPolicy | StoreErrorEvent | undefined, inherited: StoreErrorPolicy = 'fail-closed'): StoreErrorPolicy {
  if (option === undefined) return inherited
  return typeof option === 'function' ? 'fail-closed' : option
}

const DEFAULT_STATUSES = [200, 201, 202, 203, 204, 205, 206, 207]

/** Throws `FST_IDEMPOTENCY_INVALID_OPTION` naming the first option that does not fit `schema`. */
export function check (schema: TSchema, value: unknown, fail: (path: string, message: string) => Error): void {
  const error = Value.Errors(schema, value).First()
  if (error === undefined) return
  const message = (error.schema as { errorMessage?: string }).errorMessage || error.message
  throw fail(error.path.slice(1).replaceAll('/', '.') || '(options)', error.type === ValueErrorType.ObjectAdditionalProperties ? 'unknown option' : message)
}

export function resolveOptions (options: FastifyIdempotencyOptions): PluginSettings {
  // A stats object is checked against the object schema itself, so the error names the bad field, not the union.
  const stats: unknown = options.stats
  if (typeof stats === 'object' && stats !== null && !Array.isArray(stats)) {
    check(statsSchema, stats, (path, message) => new InvalidOptionError(`stats.${path}`, message))
  }
  check(optionsSchema, options, (path, message) => new InvalidOptionError(path, message))
  const header = (options.header ?? 'idempotency-key').toLowerCase()
  const key = options.key ?? {}
  const statsOptions = options.stats || {}
  const statsPreHandler = [statsOptions.preHandler ?? []].flat()
  if (statsOptions.route !== undefined && statsPreHandler.length === 0) {
    throw new InvalidOptionError('stats.preHandler', 'is required with stats.route: give the application\'s authentication, so that the stats page is never open by accident')
  }
  const keyEncoder = options.keyEncoder ?? defaultKeyEncoder
  const replayHeader = options.replayHeader === false ? false : (options.replayHeader ?? 'idempotent-replayed').toLowerCase()
  return {
    header,
    methods: new Set((options.methods ?? ['POST', 'PUT', 'PATCH', 'DELETE']).map((method, i) => checkMethod(method, `methods.${i}`))),
    mode: options.mode ?? 'optional',
    endpoints: (options.endpoints ?? []).map(parseEndpoint),
    ttl: options.ttl === undefined ? 24 * 60 * 60 * 1000 : options.ttl,
    lockTtl: options.lockTtl ?? 60_000,
    inFlightWait: options.inFlight?.wait ?? 0,
    inFlightStatus: options.inFlight?.statusCode ?? 409,
    storeOnStatuses: new Set(options.storeOnStatuses ?? DEFAULT_STATUSES),
    conflictStatusCode: options.conflictStatusCode ?? null,
    replayHeader,
    fingerprint: resolveFingerprint(options.fingerprint),
    scope: options.scope,
    keyRules: { header, maxLength: key.maxLength ?? 255, pattern: key.pattern, uuid: key.uuid ?? false },
    keyEncoder,
    logKey: logKeyFor(keyEncoder),
    telemetry: options.telemetry ?? false,
    unsavedHeaders: unsavedHeaders(replayHeader, options.replaySetCookie ?? false),
    store: options.store ?? 'memory',
    redisNamespace: options.redisNamespace,
    storeTimeout: options.storeTimeout ?? 2000,
    storeErrorPolicy: storeErrorPolicy(options.onStoreError),
    events: resolveEvents(options),
    problemJson: options.errors === 'problem+json',
    stats: {
      counting: options.stats !== false,
      ttl: statsOptions.ttl ?? 7 * 24 * 60 * 60 * 1000,
      flushInterval: statsOptions.flushInterval ?? 1000,
      warnRecords: statsOptions.warnRecords ?? 100_000,
      route: statsOptions.route,
      preHandler: statsPreHandler
    }
  }
}

export function resolveFingerprint (option: boolean | FingerprintFunction | undefined): FingerprintFunction | undefined {
  if (option === false) return undefined
  return typeof option === 'function' ? option : defaultFingerprint
}

function checkMethod (method: string, path: string): string {
  const upper = method.toUpperCase()
  if (!METHODS.includes(upper)) throw new InvalidOptionError(path, `"${method}" is not an HTTP method`)
  return upper
}

function parseEndpoint (pattern: string, i: number): Endpoint {
  const path = `endpoints.${i}`
  const parts = pattern.trim().split(/\s+/)
  const [method, prefix] = parts.length === 2 ? parts : [undefined, parts[0]]
  if (parts.length > 2 || !prefix.startsWith('/')) {
    throw new InvalidOptionError(path, `"${pattern}" must be "/prefix", "METHOD /prefix" or "* /prefix"`)
  }
  return { method: method === undefined || method === '*' ? method : checkMethod(method, path), prefix }
}
