/**
 * Plugin options: one TypeBox schema, checked once at registration; defaults
 * filled once. The options a route may override are listed once
 * (`INHERITABLE`), and one function (`inherit`) applies them, both to the
 * plugin's options over the defaults and to a route's over the plugin's.
 */
import { METHODS } from 'node:http'
import { parse as parseDuration } from '@lukeed/ms'
import { Kind, Type, TypeRegistry, type TSchema } from '@sinclair/typebox'
import { Value } from '@sinclair/typebox/value'
import { ValueErrorType } from '@sinclair/typebox/errors'
import type { preHandlerHookHandler } from 'fastify'
import { InvalidOptionError } from './errors.js'
import { defaultFingerprint } from './fingerprint.js'
import type { KeyRules } from './header.js'
import { defaultKeyEncoder } from './key-encoder.js'
import { unsavedHeaders } from './response.js'
import { warnings } from './warnings.js'
import type {
  FastifyIdempotencyOptions, FingerprintFunction, IdempotencyEvent, IdempotencyMode, IdempotencyStore,
  InheritableOptions, KeyEncoder, ScopeFunction, StoreErrorEvent, StoreErrorPolicy
} from '../types/index.js'

if (!TypeRegistry.Has('IdempotencyRegExp')) {
  TypeRegistry.Set('IdempotencyRegExp', (_schema, value) => value instanceof RegExp)
}

const TOKEN = '^[!#$%&\'*+.^_`|~0-9A-Za-z-]+$'
const fn = (errorMessage: string): TSchema => Type.Function([Type.Any()], Type.Any(), { errorMessage })
const DURATION_MESSAGE = 'a number of ms or a string such as \'24h\', \'90s\' or \'500ms\''
/** A number of ms or a duration string; its value is checked after parsing (`duration`). */
const durationSchema = (errorMessage: string) => Type.Union([Type.Number(), Type.String()], { errorMessage })

/** The schemas of the inheritable options, shared by the plugin options and the route config. */
export const inheritableSchema = {
  ttl: Type.Union([Type.Number(), Type.String(), Type.Null()], { errorMessage: `must be a positive duration (${DURATION_MESSAGE}) or null` }),
  storeOnStatuses: Type.Array(Type.Integer({ minimum: 100, maximum: 599 }), {
    minItems: 1, errorMessage: 'must be a non-empty array of HTTP status codes'
  }),
  replayStatusCode: Type.Union([Type.Integer({ minimum: 200, maximum: 599 }), Type.Null()], {
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
  namespace: Type.String({ pattern: '^[^{}]+$', errorMessage: 'must be a non-empty string without { or }' }),
  redisNamespace: Type.String({ minLength: 1, errorMessage: 'must be the non-empty name of a @fastify/redis namespace' }),
  pgNamespace: Type.String({ minLength: 1, errorMessage: 'must be the non-empty name of a @fastify/postgres database' })
} satisfies Record<keyof InheritableOptions, TSchema>

/** A duration option's value in ms: a positive integer (or at least `minimum`), from a number or a string. */
export function duration (value: number | string, path: string, fail: (path: string, message: string) => Error, minimum = 1): number {
  const ms = typeof value === 'number' ? value : parseDuration(value)
  if (ms === undefined || !Number.isInteger(ms) || ms < minimum) {
    const bound = minimum === 0 ? 'a duration of at least 0' : minimum === 1 ? 'a positive duration' : `a duration of at least ${minimum} ms`
    throw fail(path, `must be ${bound} (${DURATION_MESSAGE}); got ${JSON.stringify(value)}`)
  }
  return ms
}

/** The inheritable options, resolved: what every route's settings carry. */
export interface Inherited {
  ttl: number | null
  storeOnStatuses: ReadonlySet<number>
  replayStatusCode: number | null
  fingerprint: FingerprintFunction | undefined
  scope: ScopeFunction | undefined
  /** As given: a policy, or a function that picks one per failure (nothing picked: fail-closed). */
  onStoreError: StoreErrorPolicy | StoreErrorEvent
  onReplay: IdempotencyEvent | undefined
  onConflict: IdempotencyEvent | undefined
  onMismatch: IdempotencyEvent | undefined
  namespace: string
  redisNamespace: string | undefined
  pgNamespace: string | undefined
}

type Fail = (path: string, message: string) => Error

/** How each inheritable option is resolved when it is given. The keys are the list of inheritable options. */
const RESOLVE: { [K in keyof Inherited]: (value: Exclude<InheritableOptions[K], undefined>, fail: Fail) => Inherited[K] } = {
  ttl: (value, fail) => value === null ? null : duration(value, 'ttl', fail),
  storeOnStatuses: (value) => new Set(value),
  replayStatusCode: (value) => value,
  fingerprint: (value) => value === false ? undefined : value === true ? defaultFingerprint : value,
  scope: (value) => value,
  onStoreError: (value) => value,
  onReplay: (value) => value,
  onConflict: (value) => value,
  onMismatch: (value) => value,
  namespace: (value) => value,
  redisNamespace: (value) => value,
  pgNamespace: (value) => value
}

/** The options a route's `config.idempotency` may override. */
export const INHERITABLE = Object.keys(RESOLVE) as Array<keyof Inherited>

const DEFAULTS: Inherited = {
  ttl: 24 * 60 * 60 * 1000,
  storeOnStatuses: new Set([200, 201, 202, 203, 204, 205, 206, 207]),
  replayStatusCode: null,
  fingerprint: defaultFingerprint,
  scope: undefined,
  onStoreError: 'fail-closed',
  onReplay: undefined,
  onConflict: undefined,
  onMismatch: undefined,
  namespace: 'idempotency',
  redisNamespace: undefined,
  pgNamespace: undefined
}

/** `parent` with every inheritable option that `options` sets replaced by its resolved value. */
export function inherit (options: InheritableOptions, parent: Inherited, fail: Fail): Inherited {
  const resolved = { ...parent }
  for (const name of INHERITABLE) {
    const value = options[name]
    if (value !== undefined) (resolved as Record<string, unknown>)[name] = (RESOLVE[name] as (value: unknown, fail: Fail) => unknown)(value, fail)
  }
  return resolved
}

const storeSchema = Type.Object({
  claim: Type.Function([], Type.Any()),
  complete: Type.Function([], Type.Any()),
  release: Type.Function([], Type.Any()),
  renew: Type.Function([], Type.Any())
})

const statsSchema = Type.Object({
  ttl: Type.Optional(durationSchema(`must be a positive duration (${DURATION_MESSAGE})`)),
  flushInterval: Type.Optional(durationSchema(`must be a positive duration (${DURATION_MESSAGE})`)),
  route: Type.Optional(Type.String({ pattern: '^/', errorMessage: 'must be a path starting with /' })),
  preHandler: Type.Optional(Type.Union([fn(''), Type.Array(fn(''))], { errorMessage: 'must be a preHandler hook or an array of them' })),
  warnRecords: Type.Optional(Type.Integer({ minimum: 0, errorMessage: 'must be an integer of at least 0' }))
}, { additionalProperties: false })

const redisSchema = Type.Object({
  requireNoEviction: Type.Optional(Type.Boolean()),
  replicas: Type.Optional(Type.Integer({ minimum: 0, errorMessage: 'must be an integer of at least 0' })),
  replicaTimeout: Type.Optional(durationSchema(`must be a positive duration (${DURATION_MESSAGE})`))
}, { additionalProperties: false })

const postgresSchema = Type.Object({
  table: Type.Optional(Type.String({ minLength: 1, errorMessage: 'must be a table name, optionally schema-qualified (\'schema.table\')' })),
  createTable: Type.Optional(Type.Boolean())
}, { additionalProperties: false })

const optionsSchema = Type.Partial(Type.Object({
  ...inheritableSchema,
  header: Type.String({ pattern: TOKEN, errorMessage: 'must be a valid HTTP header name' }),
  methods: Type.Array(Type.String(), { minItems: 1, errorMessage: 'must be a non-empty array of HTTP methods' }),
  mode: Type.Union([Type.Literal('optional'), Type.Literal('required'), Type.Literal('exempt')], {
    errorMessage: 'must be \'optional\', \'required\' or \'exempt\''
  }),
  endpoints: Type.Array(Type.String(), { errorMessage: 'must be an array of strings' }),
  lockTtl: durationSchema(`must be a duration of at least 1000 ms (${DURATION_MESSAGE})`),
  inFlight: Type.Object({
    wait: Type.Optional(durationSchema(`must be a duration of at least 0 (${DURATION_MESSAGE})`)),
    statusCode: Type.Optional(Type.Union([Type.Literal(409), Type.Literal(423)], { errorMessage: 'must be 409 or 423' }))
  }, { additionalProperties: false }),
  replayHeader: Type.Union([Type.String({ pattern: TOKEN }), Type.Literal(false)], {
    errorMessage: 'must be a valid HTTP header name or false'
  }),
  key: Type.Object({
    maxLength: Type.Optional(Type.Integer({ minimum: 1, maximum: 8192, errorMessage: 'must be an integer from 1 to 8192' })),
    pattern: Type.Optional(Type.Unsafe<RegExp>({ [Kind]: 'IdempotencyRegExp', errorMessage: 'must be a RegExp' })),
    uuid: Type.Optional(Type.Boolean())
  }, { additionalProperties: false }),
  keyEncoder: fn('must be a function (parts) => string'),
  telemetry: Type.Boolean(),
  replaySetCookie: Type.Boolean(),
  store: Type.Union([Type.Literal('memory'), Type.Literal('redis'), Type.Literal('postgres'), storeSchema], {
    errorMessage: 'must be \'memory\', \'redis\', \'postgres\' or an object with claim, complete, release and renew methods'
  }),
  redis: redisSchema,
  postgres: postgresSchema,
  storeTimeout: durationSchema(`must be a positive duration (${DURATION_MESSAGE})`),
  replayCache: Type.Integer({ minimum: 0, errorMessage: 'must be a number of bytes (an integer of at least 0)' }),
  errors: Type.Union([Type.Literal('fastify'), Type.Literal('problem+json')], {
    errorMessage: 'must be \'fastify\' or \'problem+json\''
  }),
  stats: Type.Union([Type.Literal(false), statsSchema], { errorMessage: 'must be false or an object { ttl, flushInterval, route, preHandler, warnRecords }' })
}), { additionalProperties: false })

/** The route config schema: the inheritable options and the route's own. */
export const routeConfigSchema = Type.Partial(Type.Object({
  ...inheritableSchema,
  required: Type.Boolean(),
  manual: Type.Boolean()
}), { additionalProperties: false })

/** Every option name the plugin accepts (derived from the schema, for tests and docs). */
export const OPTION_NAMES = Object.keys(optionsSchema.properties)

/** An `endpoints` entry: an optional method (`*` for any) and a path prefix. */
export interface Endpoint {
  method: string | undefined
  prefix: string
  /** The pattern as written, for the warning when it covers no route. */
  pattern: string
}

export interface StatsSettings {
  ttl: number
  flushInterval: number
  warnRecords: number
  /** False with `stats: false`: nothing is counted; `fastify.idempotency.stats()` still reports the store. */
  counting: boolean
  route: string | undefined
  preHandler: preHandlerHookHandler[]
}

export interface PostgresSettings {
  table?: string
  createTable?: boolean
}

export interface RedisSettings {
  requireNoEviction: boolean
  replicas: number
  replicaTimeout: number
}

/**
 * The options after validation, with every default filled in: the plugin's
 * own settings, and the inheritable ones that routes start from.
 */
export interface PluginSettings {
  header: string
  methods: ReadonlySet<string>
  mode: IdempotencyMode
  endpoints: readonly Endpoint[]
  lockTtl: number
  inFlightWait: number
  inFlightStatus: 409 | 423
  replayHeader: string | false
  keyRules: KeyRules
  keyEncoder: KeyEncoder
  telemetry: boolean
  /** Headers never saved with a response. */
  unsavedHeaders: ReadonlySet<string>
  store: 'memory' | 'redis' | 'postgres' | IdempotencyStore
  redis: RedisSettings
  postgres: PostgresSettings
  storeTimeout: number
  replayCache: number
  problemJson: boolean
  stats: StatsSettings
  /** What routes inherit. */
  inherited: Inherited
}

/** Throws the error `fail` makes, naming the first option that does not fit `schema`. */
export function check (schema: TSchema, value: unknown, fail: Fail): void {
  const error = Value.Errors(schema, value).First()
  if (error === undefined) return
  const message = (error.schema as { errorMessage?: string }).errorMessage || error.message
  throw fail(error.path.slice(1).replaceAll('/', '.'), error.type === ValueErrorType.ObjectAdditionalProperties ? 'unknown option' : message)
}

const invalid: Fail = (path, message) => new InvalidOptionError(path, message)

const MIN_LOCK_TTL = 1000

export function resolveOptions (options: FastifyIdempotencyOptions): PluginSettings {
  // An object is checked against its own schema first, so the error names the bad field, not the union.
  const stats: unknown = options.stats
  if (typeof stats === 'object' && stats !== null && !Array.isArray(stats)) {
    check(statsSchema, stats, (path, message) => invalid(`stats.${path}`, message))
  }
  check(optionsSchema, options, invalid)
  const header = (options.header ?? 'idempotency-key').toLowerCase()
  const key = options.key ?? {}
  const statsOptions = options.stats || {}
  const statsPreHandler = [statsOptions.preHandler ?? []].flat()
  if (statsOptions.route !== undefined && statsPreHandler.length === 0) {
    throw invalid('stats.preHandler', 'is required with stats.route: give the application\'s authentication, so that the stats page is never open by accident')
  }
  const store = options.store ?? 'memory'
  const storeTimeout = options.storeTimeout === undefined ? 2000 : duration(options.storeTimeout, 'storeTimeout', invalid)
  // Renewals must be able to reach the store, and time out, several times within one lease.
  const minLockTtl = store === 'redis' || store === 'postgres' ? Math.max(MIN_LOCK_TTL, 3 * storeTimeout) : MIN_LOCK_TTL
  const lockTtl = options.lockTtl === undefined ? 60_000 : duration(options.lockTtl, 'lockTtl', invalid, minLockTtl)
  const keyEncoder = options.keyEncoder ?? defaultKeyEncoder
  const replayHeader = options.replayHeader === false ? false : (options.replayHeader ?? 'idempotent-replayed').toLowerCase()
  const inherited = inherit(options, DEFAULTS, invalid)
  warnAboutDurations(options, inherited, lockTtl)
  return {
    header,
    methods: new Set((options.methods ?? ['POST', 'PUT', 'PATCH', 'DELETE']).map((method, i) => checkMethod(method, `methods.${i}`))),
    mode: options.mode ?? 'optional',
    endpoints: (options.endpoints ?? []).map(parseEndpoint),
    lockTtl,
    inFlightWait: options.inFlight?.wait === undefined ? 0 : duration(options.inFlight.wait, 'inFlight.wait', invalid, 0),
    inFlightStatus: options.inFlight?.statusCode ?? 409,
    replayHeader,
    keyRules: { header, maxLength: key.maxLength ?? 255, pattern: key.pattern, uuid: key.uuid ?? false },
    keyEncoder,
    telemetry: options.telemetry ?? false,
    unsavedHeaders: unsavedHeaders(replayHeader, options.replaySetCookie ?? false),
    store,
    redis: {
      requireNoEviction: options.redis?.requireNoEviction ?? false,
      replicas: options.redis?.replicas ?? 0,
      replicaTimeout: options.redis?.replicaTimeout === undefined ? 100 : duration(options.redis.replicaTimeout, 'redis.replicaTimeout', invalid)
    },
    postgres: { ...options.postgres },
    storeTimeout,
    replayCache: options.replayCache ?? 16 * 1024 * 1024,
    problemJson: options.errors === 'problem+json',
    stats: {
      counting: options.stats !== false,
      ttl: statsOptions.ttl === undefined ? 7 * 24 * 60 * 60 * 1000 : duration(statsOptions.ttl, 'stats.ttl', invalid),
      flushInterval: statsOptions.flushInterval === undefined ? 1000 : duration(statsOptions.flushInterval, 'stats.flushInterval', invalid),
      warnRecords: statsOptions.warnRecords ?? 8000,
      route: statsOptions.route,
      preHandler: statsPreHandler
    },
    inherited
  }
}

/** Start-up warnings for durations that run but are probably not what was meant. */
function warnAboutDurations (options: FastifyIdempotencyOptions, inherited: Inherited, lockTtl: number): void {
  if (typeof options.ttl === 'number' && options.ttl < 1000) warnings.ttlLooksLikeSeconds('ttl', options.ttl, `${options.ttl}s`)
  if (inherited.ttl !== null && inherited.ttl < lockTtl) warnings.ttlBelowLockTtl(inherited.ttl, lockTtl)
}

function checkMethod (method: string, path: string): string {
  const upper = method.toUpperCase()
  if (!METHODS.includes(upper)) throw invalid(path, `"${method}" is not an HTTP method`)
  return upper
}

function parseEndpoint (pattern: string, i: number): Endpoint {
  const path = `endpoints.${i}`
  const parts = pattern.trim().split(/\s+/)
  const [method, prefix] = parts.length === 2 ? parts : [undefined, parts[0]]
  if (parts.length > 2 || !prefix.startsWith('/')) {
    throw invalid(path, `"${pattern}" must be "/prefix", "METHOD /prefix" or "* /prefix"`)
  }
  return { method: method === undefined || method === '*' ? method : checkMethod(method, path), prefix, pattern }
}
