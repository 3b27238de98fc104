/**
 * The shared store: Redis or Redis Cluster, through an ioredis client that the
 * application owns (usually the one `@fastify/redis` decorates).
 *
 * Data layout: one hash per record, at `${prefix}{${key}}` (the braces are a
 * Cluster hash tag: whatever a record ever needs lives in one slot).
 *
 *   s  'i' (in flight) or 'c' (completed)
 *   t  the fencing token of the claim     } in flight only: both are deleted
 *   n  the id of the claim call           } on completion
 *   f  the request fingerprint (absent when there is none)
 *   c  status code, h  headers as JSON, b  body bytes,
 *   k  'b' (the body was a Buffer) or 's' (a string)   (completed only)
 *
 * The key expires in Redis itself: `PEXPIRE lockTtl` while in flight,
 * `PEXPIRE ttl` (or `PERSIST` for ttl null) once completed. No sweeper.
 *
 * Every state change is one Lua script, so there is no read-then-write race:
 * claim-or-get answers a replay in one round trip, and complete, release and
 * renew act only while the caller's token still holds the claim (a stale owner
 * whose lease expired, and whose key was claimed again, is refused). ioredis
 * `defineCommand` sends a script's source once per connection, then its SHA.
 *
 * Script replies are integers and arrays of bulk strings only (never nil,
 * booleans or maps), which RESP2 and RESP3 encode alike, so replies parse the
 * same whatever protocol the client speaks.
 *
 * Full memory (`maxmemory` under `noeviction`): Redis refuses a script at its
 * first write command that may grow memory (HSET, HINCRBY), and lets the rest
 * of a script run once a write that cannot (HDEL, DEL, PEXPIRE) came first. So
 * a claim, whose first write is HSET, fails while Redis is full, and the
 * request is refused; but complete (HDEL first), release (DEL) and renew
 * (PEXPIRE) still succeed, and a request that got in finishes. The scripts
 * carry no `#!lua flags=` line, which would make Redis refuse the whole script
 * when full (and Redis before 7.0 does not know it).
 *
 * Tokens come from the clock of Redis (`TIME`, in µs since the epoch, read in
 * the claim script): every process of every host gets them from one clock, so
 * successive claims of a key get strictly larger tokens while that clock only
 * goes forward (a script run lasts longer than a microsecond). A claim only
 * succeeds on an absent key (released records are deleted, expired ones are
 * gone), so no earlier token of the key is left to compare with. If the Redis
 * host's clock steps back (an NTP step rather than a slew, a VM restored, a
 * failover to a replica whose clock is behind) by more than the time between
 * two claims of one key, the second token is smaller than the first: a
 * handler that fences its writes with the token (`WHERE last_token < $token`)
 * would then refuse the new owner's writes, and accept a stale owner's.
 */
import { createHash, randomBytes } from 'node:crypto'
import type { Cluster, Redis } from 'ioredis'
import { NotReplicatedError, RedisEvictionError, StoreTimeoutError } from '../errors.js'
import { Deadlines } from './deadline.js'
import type { ClaimResult, CompletedRecord, IdempotencyRecord, IdempotencyStore, RedisClient, RouteCounters, StatsCounts, StoredResponse, StoreUsage } from '../../types/index.js'

export interface RedisStoreOptions {
  /** An ioredis `Redis` or `Cluster`; the application owns it (`close()` leaves it connected). */
  client: RedisClient
  /** Prepended to every key. Default `'idempotency:'`. */
  prefix?: string
  /** How long any store call waits for Redis before it fails with `FST_IDEMPOTENCY_STORE_TIMEOUT`, in ms. Default 2000. */
  timeout?: number
  /**
   * `verify()` rejects with `FST_IDEMPOTENCY_REDIS_EVICTION` unless Redis runs
   * with `maxmemory-policy noeviction`, and so do claims after a reconnect
   * that finds another policy, until a later check passes. Default false: a
   * warning through `onWarning`.
   */
  requireNoEviction?: boolean
  /** Claims and saves wait until this many replicas acknowledge them (`WAIT`). Default 0. Not with Cluster. */
  replicas?: number
  /** How long they wait for the replicas, in ms; below `timeout`. Default 100. */
  replicaTimeout?: number
}

/** What `verify()` found: the policy of Redis when full, and its memory bound in bytes (0: none). */
export interface RedisMemoryPolicy {
  policy: string
  maxmemory: number
}

/** The code of the warnings given to `onWarning`. */
export const EVICTION_WARNING = 'FST_IDEMPOTENCY_REDIS_EVICTION'

/**
 * KEYS[1] record; ARGV claim id, lockTtl[, fingerprint].
 * Reply: {0, token} claimed; {1, hasFingerprint, fingerprint} in flight;
 * {2, hasFingerprint, fingerprint, statusCode, headers, body, kind, pttl} completed.
 * A claim that finds its own claim id already there was sent twice (ioredis
 * sends a command again when the connection dropped before its reply came):
 * claimed, with the token it got the first time.
 */
const CLAIM = `
local r = redis.call('HMGET', KEYS[1], 's', 'f', 'c', 'h', 'b', 'k', 'n', 't')
if not r[1] then
  local now = redis.call('TIME')
  local token = now[1] .. string.sub('00000' .. now[2], -6)
  if ARGV[3] then
    redis.call('HSET', KEYS[1], 's', 'i', 't', token, 'n', ARGV[1], 'f', ARGV[3])
  else
    redis.call('HSET', KEYS[1], 's', 'i', 't', token, 'n', ARGV[1])
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {0, token}
end
if r[7] == ARGV[1] then return {0, r[8]} end
local hasFingerprint = 0
if r[2] then hasFingerprint = 1 end
if r[1] == 'i' then return {1, hasFingerprint, r[2] or ''} end
return {2, hasFingerprint, r[2] or '', tonumber(r[3]), r[4], r[5], r[6] or 'b', redis.call('PTTL', KEYS[1])}
`

/**
 * KEYS[1] record; ARGV token, statusCode, headers, body, kind, ttl ('' = no expiry). Reply 1 saved, 0 refused.
 * HDEL comes first: it cannot grow memory, so a full Redis lets the HSET after it run.
 */
const COMPLETE = `
if redis.call('HGET', KEYS[1], 't') ~= ARGV[1] then return 0 end
redis.call('HDEL', KEYS[1], 't', 'n')
redis.call('HSET', KEYS[1], 's', 'c', 'c', ARGV[2], 'h', ARGV[3], 'b', ARGV[4], 'k', ARGV[5])
if ARGV[6] == '' then
  redis.call('PERSIST', KEYS[1])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[6])
end
return 1
`

/** KEYS[1] record; ARGV token. Reply 1 released, 0 refused. */
const RELEASE = `
if redis.call('HGET', KEYS[1], 't') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
`

/** KEYS[1] record; ARGV token, lockTtl. Reply 1 renewed, 0 refused. */
const RENEW = `
if redis.call('HGET', KEYS[1], 't') ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
`

/**
 * KEYS[1] the stats hash; ARGV ttl, then pairs of field and count. Fields are
 * `route\ncounter`; `...\nlastDuplicateAt` keeps the latest time, the others add.
 * (The script spells the newline as Lua's escape `\\n`: a raw one ends a Lua string.)
 * The first PEXPIRE lets a full Redis go on counting (see the top of this file);
 * the last one gives a hash that it has just created its lifetime.
 */
const ADD_STATS = `
redis.call('PEXPIRE', KEYS[1], ARGV[1])
for i = 2, #ARGV, 2 do
  local field, n = ARGV[i], tonumber(ARGV[i + 1])
  if string.sub(field, -16) == '\\nlastDuplicateAt' then
    if n > tonumber(redis.call('HGET', KEYS[1], field) or '0') then redis.call('HSET', KEYS[1], field, ARGV[i + 1]) end
  else
    redis.call('HINCRBY', KEYS[1], field, n)
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
`

/**
 * Command names carry the script's SHA: several stores sharing one client
 * define each script once, and two versions of this module never call each
 * other's script.
 */
function commandName (name: string, lua: string): string {
  return `idempotency_${name}_${createHash('sha1').update(lua).digest('hex').slice(0, 12)}`
}

const COMMANDS = {
  claim: commandName('claim', CLAIM),
  complete: commandName('complete', COMPLETE),
  release: commandName('release', RELEASE),
  renew: commandName('renew', RENEW),
  addStats: commandName('stats', ADD_STATS)
}

/** Above this many keys on a node, usage() samples rather than scans. */
const SCAN_LIMIT = 1000
const SAMPLE = 100
/** usage() warns when Redis uses more of its maxmemory than this. */
const MEMORY_WARNING = 0.9

type ClaimReply = [0, Buffer] | [1, number, Buffer] | [2, number, Buffer, number, Buffer, Buffer, Buffer, number]

/** The scripted commands, as `defineCommand` adds them to a client. */
interface ScriptedClient {
  [name: string]: (key: string, ...args: Array<string | Buffer>) => Promise<unknown>
}

/** What the store sends within one turn of the event loop. */
interface Turn {
  /** The connection whose writes are held until the turn ends, if any. */
  corked: Redis['stream'] | undefined
  /** The turn's WAIT, once a claim or a save asked for one: the replicas that acknowledged, or why none could. */
  replicated: Promise<number | Error> | undefined
  acknowledged: (acks: number | Error) => void
}

/** Claim ids, unique across processes: a random per-process part and a counter. */
const PROCESS_ID = randomBytes(12).toString('base64url')
let sequence = 0

function ignore (): void {}

function completedRecord (fingerprint: string | undefined, statusCode: number, headers: Buffer, body: Buffer, kind: Buffer | null, pttl: number): CompletedRecord {
  return {
    state: 'completed',
    fingerprint,
    response: { statusCode, headers: JSON.parse(headers.toString()), body: String(kind) === 's' ? body.toString() : body },
    // PTTL -1: no expiry. -2 (gone since it was read) only on the two-command read of lookup().
    expiresIn: pttl === -1 ? Infinity : Math.max(pttl, 0)
  }
}

/** The `field:value` lines of an INFO reply. */
function parseInfo (info: string): Record<string, string> {
  const fields: Record<string, string> = {}
  for (const line of info.split('\r\n')) {
    const at = line.indexOf(':')
    if (at > 0) fields[line.slice(0, at)] = line.slice(at + 1)
  }
  return fields
}

function zeroCounters (): RouteCounters {
  return { executed: 0, replayed: 0, conflicts: 0, mismatches: 0, missingKeys: 0, invalidKeys: 0, storeErrors: 0, lastDuplicateAt: 0 }
}

/**
 * Since when a connection has been lost and not ready again. ioredis holds
 * the commands sent meanwhile (its offline queue) until it reconnects or
 * gives up, after `maxRetriesPerRequest` attempts, possibly minutes later.
 */
class Outage {
  private since: number | undefined
  readonly lost = (): void => { this.since ??= performance.now() }
  readonly ready = (): void => { this.since = undefined }

  /** The connection has been down for at least `ms`. */
  longerThan (ms: number): boolean {
    return this.since !== undefined && performance.now() - this.since >= ms
  }
}

/**
 * One outage per client, shared by every store on it: one pair of listeners
 * per client however many stores use it (they stay for the client's life).
 */
const outages = new WeakMap<Redis | Cluster, Outage>()

function outageOf (client: Redis | Cluster): Outage {
  let outage = outages.get(client)
  if (outage === undefined) {
    outage = new Outage()
    client.on('close', outage.lost)
    client.on('ready', outage.ready)
    outages.set(client, outage)
  }
  return outage
}

export class RedisStore implements IdempotencyStore {
  readonly prefix: string
  readonly timeout: number
  readonly requireNoEviction: boolean
  readonly replicas: number
  readonly replicaTimeout: number
  /**
   * Receives what an operator must hear of (a `maxmemory-policy` that may
   * evict records), with a code; the plugin sets it. Called by `verify()` and
   * by the check after every reconnect.
   */
  onWarning: ((code: string, message: string) => void) | undefined

  /** The application's client (`close()` leaves it connected). */
  readonly client: RedisClient
  /** The same client, as ioredis types it. */
  private readonly redis: Redis | Cluster
  /** The same client, seen with the commands of the scripts. */
  private readonly scripts: ScriptedClient
  private readonly claimCommand: string
  /** One hash holds every route's counters (a hash tag keeps it on one Cluster slot). */
  private readonly statsKey: string
  private readonly deadlines: Deadlines
  private readonly outage: Outage
  /** The connection of `lookup()`, opened on the first one: a read there never waits behind a script that Redis holds. */
  private reader: { client: Redis | Cluster, outage: Outage } | undefined
  private turn: Turn | undefined
  /** Calls of `verify()` under way: a reconnect meanwhile needs no check of its own (their INFO goes to the new connection). */
  private verifying = 0
  /** With `requireNoEviction`: the evicting policy that the last check found, while claims are refused. */
  private refusing: string | undefined

  private readonly endTurn = (): void => {
    const turn = this.turn as Turn
    this.turn = undefined
    // After the turn's claims and saves, on the same connection: it acknowledges all of them.
    if (turn.replicated !== undefined) {
      this.deadlines.bound((this.redis as Redis).wait(this.replicas, this.replicaTimeout)).then(turn.acknowledged, turn.acknowledged)
    }
    turn.corked?.uncork()
  }

  private readonly reconnected = (): void => {
    if (this.verifying > 0) return
    this.verify().catch((err: unknown) => {
      // A refusal has already set the state; anything else leaves it as the last check found it.
      if (!(err instanceof RedisEvictionError)) {
        this.onWarning?.(EVICTION_WARNING, `Could not check the maxmemory-policy of Redis after a reconnect: ${(err as Error).message}`)
      }
    })
  }

  constructor (options: RedisStoreOptions) {
    const { client: given, prefix = 'idempotency:', timeout = 2000, requireNoEviction = false, replicas = 0, replicaTimeout = 100 } = options ?? {}
    if (typeof given?.defineCommand !== 'function') {
      throw new TypeError('RedisStore: client must be an ioredis Redis or Cluster client')
    }
    const client = given as unknown as Redis | Cluster
    if (typeof prefix !== 'string') throw new TypeError('RedisStore: prefix must be a string')
    if (!Number.isInteger(timeout) || timeout < 1) throw new TypeError('RedisStore: timeout must be a positive integer (ms)')
    if (typeof requireNoEviction !== 'boolean') throw new TypeError('RedisStore: requireNoEviction must be a boolean')
    if (!Number.isInteger(replicas) || replicas < 0) throw new TypeError('RedisStore: replicas must be a non-negative integer')
    if (!Number.isInteger(replicaTimeout) || replicaTimeout < 1) throw new TypeError('RedisStore: replicaTimeout must be a positive integer (ms)')
    if (replicas > 0 && replicaTimeout >= timeout) throw new TypeError('RedisStore: replicaTimeout must be below timeout, or every replicated call would time out first')
    if (replicas > 0 && client.isCluster) {
      throw new TypeError('RedisStore: replicas is not supported with Redis Cluster (WAIT counts the replicas of one node); use it with a single Redis primary')
    }
    for (const [name, lua] of [[COMMANDS.claim, CLAIM], [COMMANDS.complete, COMPLETE], [COMMANDS.release, RELEASE], [COMMANDS.renew, RENEW], [COMMANDS.addStats, ADD_STATS]]) {
      if (!(name in client)) client.defineCommand(name, { numberOfKeys: 1, lua })
    }
    this.client = given
    this.redis = client
    this.scripts = client as unknown as ScriptedClient
    this.statsKey = `${prefix}stats:{idempotency-stats}`
    this.claimCommand = COMMANDS.claim + 'Buffer' // bulk replies as Buffers: bodies are bytes
    this.prefix = prefix
    this.timeout = timeout
    this.requireNoEviction = requireNoEviction
    this.replicas = replicas
    this.replicaTimeout = replicaTimeout
    this.deadlines = new Deadlines(timeout)
    this.outage = outageOf(client)
  }

  /**
   * Why `client` may hold commands without bound on a connection that died
   * without a reset (a host gone, a network partition), or undefined when it
   * cannot. The rule: it can unless `socketTimeout` is set (for a Cluster, in
   * `redisOptions`). Without it, ioredis keeps the connection "ready" and
   * queues every command on it until the operating system gives up on the
   * socket, which takes minutes to hours; this store's calls fail after
   * `timeout`, but their commands stay queued. With it, ioredis closes a
   * connection that sent nothing back for that long while commands wait, and
   * reconnects; while it cannot, this store fails calls at once rather than
   * queueing them (after `timeout` of outage).
   */
  static queueWarning (given: RedisClient): string | undefined {
    const client = given as unknown as Redis | Cluster
    const socketTimeout = client.isCluster ? (client as Cluster).options.redisOptions?.socketTimeout : (client as Redis).options.socketTimeout
    if (Number(socketTimeout) > 0) return undefined
    const option = client.isCluster ? 'redisOptions.socketTimeout' : 'socketTimeout'
    return `The ioredis client has no ${option}: on a connection that dies without a reset, it queues every command until the operating system drops the socket, ` +
      `which can take hours, and memory grows meanwhile. Set ${option} (ms) on the client, above the longest command the application sends on it (blocking ones included)`
  }

  /** The Redis key of the record for `key`. */
  redisKey (key: string): string {
    return `${this.prefix}{${key}}`
  }

  /**
   * Reads `maxmemory-policy` and `maxmemory` (from `INFO memory`, which works
   * where `CONFIG` is disabled, on every master of a Cluster). A policy other
   * than `noeviction` lets Redis drop records before their ttl, in-flight
   * claims included (every one has a TTL, so `volatile-*` policies take them
   * first), and a retry then runs the handler again: it is reported through
   * `onWarning`, or with `requireNoEviction` rejects with
   * `FST_IDEMPOTENCY_REDIS_EVICTION`. The check runs again after every
   * reconnect from then on. On a Cluster, the first master that evicts is
   * reported.
   */
  async verify (): Promise<RedisMemoryPolicy> {
    // From the first check on, every reconnect checks again (only stores that are verified listen).
    if (!this.redis.listeners('ready').includes(this.reconnected)) this.redis.on('ready', this.reconnected)
    this.verifying++
    let found: RedisMemoryPolicy[]
    try {
      found = await Promise.all((await this.masters()).map(async (node) => {
        const info = parseInfo(await this.deadlines.bound(node.info('memory')))
        return { policy: info.maxmemory_policy, maxmemory: Number(info.maxmemory) }
      }))
    } finally {
      this.verifying--
    }
    const verdict = found.find(({ policy }) => policy !== 'noeviction') ?? found[0]
    if (verdict.policy === 'noeviction') {
      this.refusing = undefined
    } else if (this.requireNoEviction) {
      this.refusing = verdict.policy
      throw new RedisEvictionError(verdict.policy)
    } else {
      this.onWarning?.(EVICTION_WARNING, `Redis runs with maxmemory-policy ${verdict.policy}: it may evict idempotency records, in-flight claims included, ` +
        'and a retry of an evicted one runs the handler again. Set maxmemory-policy noeviction on this Redis (or redis.requireNoEviction to refuse to run without it)')
    }
    return verdict
  }

  async claim (key: string, fingerprint: string | undefined, lockTtl: number): Promise<ClaimResult> {
    if (this.refusing !== undefined) throw new RedisEvictionError(this.refusing)
    const id = `${PROCESS_ID}.${(++sequence).toString(36)}`
    const args = fingerprint === undefined ? [id, String(lockTtl)] : [id, String(lockTtl), fingerprint]
    const sent = this.call(this.claimCommand, this.redisKey(key), args, (late) => {
      // It timed out here but Redis ran it later (ioredis queues commands while Redis is away):
      // a claim that nobody holds would answer every retry with 409 until lockTtl. Let it go.
      if ((late as ClaimReply)[0] === 0) this.letGo(key, (late as ClaimReply)[1].toString())
    }) as Promise<ClaimReply>
    const replicated = this.replication()
    const reply = await sent
    if (reply[0] === 0) {
      const token = reply[1].toString()
      if (replicated !== undefined) await this.confirm(replicated, () => this.letGo(key, token))
      return { token }
    }
    const fp = reply[1] === 1 ? reply[2].toString() : undefined
    if (reply[0] === 1) return { record: { state: 'in-flight', fingerprint: fp } }
    return { record: completedRecord(fp, reply[3], reply[4], reply[5], reply[6], reply[7]) }
  }

  async complete (key: string, token: string, response: StoredResponse, ttl: number | null): Promise<boolean> {
    const { body } = response
    const args = [token, String(response.statusCode), JSON.stringify(response.headers), body, typeof body === 'string' ? 's' : 'b', ttl === null ? '' : String(ttl)]
    const sent = this.call(COMMANDS.complete, this.redisKey(key), args)
    const replicated = this.replication()
    const saved = await sent === 1
    // Saved on the primary, and staying there: the caller learns that a promotion may lose it.
    if (saved && replicated !== undefined) await this.confirm(replicated)
    return saved
  }

  async release (key: string, token: string): Promise<boolean> {
    return await this.call(COMMANDS.release, this.redisKey(key), [token]) === 1
  }

  async renew (key: string, token: string, lockTtl: number): Promise<boolean> {
    return await this.call(COMMANDS.renew, this.redisKey(key), [token, String(lockTtl)]) === 1
  }

  /**
   * The record of `key`, read with plain reads (HMGET and PTTL) on a
   * connection of its own: they run while Redis pauses writes (`CLIENT PAUSE
   * WRITE`, as every coordinated failover does), which holds every script,
   * claims of completed keys included, and every command sent after one on
   * the same connection.
   */
  async lookup (key: string): Promise<IdempotencyRecord | undefined> {
    const reader = this.reader ??= this.openReader()
    if (reader.outage.longerThan(this.timeout)) throw new StoreTimeoutError(this.timeout)
    const redisKey = this.redisKey(key)
    const [fields, pttl] = await this.deadlines.bound(Promise.all([
      reader.client.hmgetBuffer(redisKey, 's', 'f', 'c', 'h', 'b', 'k'),
      reader.client.pttl(redisKey)
    ]))
    const [state, fingerprint, statusCode, headers, body, kind] = fields
    if (state === null) return undefined
    const fp = fingerprint === null ? undefined : fingerprint.toString()
    if (state.toString() === 'i') return { state: 'in-flight', fingerprint: fp }
    return completedRecord(fp, Number(statusCode), headers as Buffer, body as Buffer, kind, pttl)
  }

  /** Adds counts to the shared stats hash, in one script call. */
  async addStats (counts: StatsCounts, ttl: number): Promise<void> {
    const args = [String(ttl)]
    for (const route in counts) {
      const counters = counts[route]
      for (const name of Object.keys(counters) as Array<keyof RouteCounters>) {
        if (counters[name] > 0) args.push(`${route}\n${name}`, String(counters[name]))
      }
    }
    await this.call(COMMANDS.addStats, this.statsKey, args)
  }

  async readStats (): Promise<StatsCounts> {
    const fields = await this.deadlines.bound(this.redis.hgetall(this.statsKey))
    const counts: StatsCounts = {}
    for (const field in fields) {
      const at = field.lastIndexOf('\n')
      const counters = counts[field.slice(0, at)] ??= zeroCounters()
      counters[field.slice(at + 1) as keyof RouteCounters] = Number(fields[field])
    }
    return counts
  }

  /**
   * Records, claims and their memory, and how full Redis is. Never lists a big
   * keyspace: a node with up to 1000 keys is scanned; on a bigger one, 100
   * random keys give the share of records and claims and their mean size,
   * scaled by DBSIZE (so `estimated` is true). `evictions` counts every key
   * Redis evicted (`evicted_keys`), ours or not: Redis does not tell them apart.
   */
  async usage (): Promise<StoreUsage> {
    const match = `${this.prefix.replace(/[*?[\]\\]/g, '\\$&')}{*`
    let records = 0
    let inFlight = 0
    let bytes = 0
    let estimated = false
    let evictions = 0
    const maxmemories: number[] = []
    const policies: string[] = []
    const warnings: string[] = []
    for (const node of await this.masters()) {
      const [size, text] = await this.deadlines.bound(Promise.all([node.dbsize(), node.info()]))
      const info = parseInfo(text)
      const maxmemory = Number(info.maxmemory)
      const used = Number(info.used_memory)
      policies.push(info.maxmemory_policy)
      evictions += Number(info.evicted_keys)
      maxmemories.push(maxmemory)
      if (maxmemory > 0 && used > maxmemory * MEMORY_WARNING) {
        warnings.push(`Redis ${node.options.host}:${node.options.port} uses ${Math.round(used / maxmemory * 100)}% of its maxmemory (${used} of ${maxmemory} bytes): ` +
          'once it is full, new requests are refused (noeviction) or records evicted')
      }
      let keys: string[] = []
      let scale = 1
      if (size <= SCAN_LIMIT) {
        let cursor = '0'
        do {
          const [next, found] = await this.deadlines.bound(node.scan(cursor, 'MATCH', match, 'COUNT', SCAN_LIMIT))
          keys.push(...found)
          cursor = next
        } while (cursor !== '0')
      } else {
        const sample = node.pipeline()
        for (let i = 0; i < SAMPLE; i++) sample.randomkey()
        const picked = await this.deadlines.bound(sample.exec()) as Array<[Error | null, string | null]>
        keys = picked.map(([, key]) => key).filter((key): key is string => key !== null && key.startsWith(this.prefix + '{'))
        scale = size / SAMPLE
        estimated = true
      }
      let nodeRecords = 0
      let nodeInFlight = 0
      let nodeBytes = 0
      if (keys.length > 0) {
        const pipeline = node.pipeline()
        // SAMPLES 0: every field counts. By default Redis sums 5 fields of a hash and scales: a record of 6 or
        // 7 fields would then weigh more or less depending on whether its body was one of the five.
        for (const key of keys) pipeline.hget(key, 's').memory('USAGE', key, 'SAMPLES', 0)
        const replies = await this.deadlines.bound(pipeline.exec()) as Array<[Error | null, unknown]>
        // A key that expired since it was listed answers null to both.
        for (let i = 0; i < replies.length; i += 2) {
          nodeInFlight += Number(replies[i][1] === 'i')
          nodeRecords += Number(replies[i][1] === 'c')
          nodeBytes += Number(replies[i + 1][1])
        }
      }
      records += Math.round(nodeRecords * scale)
      inFlight += Math.round(nodeInFlight * scale)
      bytes += Math.round(nodeBytes * scale)
    }
    const evictionPolicy = policies.find((policy) => policy !== 'noeviction') ?? policies[0]
    if (evictionPolicy !== 'noeviction') {
      warnings.unshift(`Redis runs with maxmemory-policy ${evictionPolicy}: it may evict idempotency records, in-flight claims included, and a retry of an evicted one runs the handler again`)
    }
    // One node without a bound leaves the whole unbounded.
    const maxBytes = maxmemories.includes(0) ? undefined : maxmemories.reduce((sum, max) => sum + max, 0)
    return { records, inFlight, bytes, maxBytes, evictions, evictionPolicy, estimated, warnings }
  }

  /**
   * Leaves the client connected: it belongs to the application (or
   * `@fastify/redis`). Closes the connection of `lookup()`, and stops the
   * timer of the deadlines unless a call still waits for its own (it then
   * runs out by itself, and holds no process open).
   */
  close (): void {
    this.redis.off('ready', this.reconnected)
    this.reader?.client.disconnect()
    this.reader = undefined
    if (this.deadlines.size === 0) this.deadlines.close()
  }

  private openReader (): { client: Redis | Cluster, outage: Outage } {
    const client = this.redis.isCluster ? (this.redis as Cluster).duplicate() : (this.redis as Redis).duplicate()
    const outage = outageOf(client)
    client.on('error', ignore) // a failed lookup carries the error; the application's client reports the outage
    return { client, outage }
  }

  /**
   * Runs one script, failing with `FST_IDEMPOTENCY_STORE_TIMEOUT` if Redis does
   * not answer in time. The command may still run later (ioredis keeps it
   * queued): its reply then goes to `late`, if given. Once the connection has
   * been down for longer than the timeout, a call fails at once instead: it
   * would time out too, and its command would wait in ioredis for as long as
   * the outage lasts.
   */
  private call (command: string, redisKey: string, args: Array<string | Buffer>, late?: (reply: unknown) => void): Promise<unknown> {
    if (this.outage.longerThan(this.timeout)) return Promise.reject(new StoreTimeoutError(this.timeout))
    this.joinTurn()
    return this.deadlines.bound(this.scripts[command](redisKey, ...args), late)
  }

  /**
   * ioredis writes every command to the socket at once: under load that is one
   * system call per request. Holding a single connection's writes (cork) until
   * the event loop has handled this turn's I/O (setImmediate) sends the claims
   * and saves of all requests that arrived together in one write, and lets
   * them share one WAIT. The same commands, in the same order, a fraction of a
   * loop turn later. Cluster connections are left as they are (each command
   * picks its node).
   */
  private joinTurn (): void {
    if (this.turn !== undefined || this.redis.isCluster) return
    const { stream, status } = this.redis as Redis
    const turn: Turn = { corked: undefined, replicated: undefined, acknowledged: ignore }
    if (status === 'ready') {
      stream.cork()
      turn.corked = stream
    }
    this.turn = turn
    setImmediate(this.endTurn)
  }

  /** The WAIT of this turn's writes, with `replicas`; undefined without, or when nothing was sent this turn. */
  private replication (): Promise<number | Error> | undefined {
    const turn = this.turn
    if (this.replicas === 0 || turn === undefined) return undefined
    turn.replicated ??= new Promise((resolve) => { turn.acknowledged = resolve })
    return turn.replicated
  }

  /** Fails with `FST_IDEMPOTENCY_NOT_REPLICATED` (after `undo`) unless enough replicas acknowledged. */
  private async confirm (replicated: Promise<number | Error>, undo?: () => void): Promise<void> {
    const acks = await replicated
    if (typeof acks === 'number' && acks >= this.replicas) return
    undo?.()
    throw typeof acks === 'number' ? new NotReplicatedError(acks, this.replicas, this.replicaTimeout) : acks
  }

  /** Releases a claim that nobody will hold; if that fails too, the claim expires after lockTtl. */
  private letGo (key: string, token: string): void {
    Promise.allSettled([this.release(key, token)])
  }

  /** The nodes that hold records: the client itself, or every master of a Cluster (once it knows them). */
  private async masters (): Promise<Redis[]> {
    if (!this.redis.isCluster) return [this.redis as Redis]
    const cluster = this.redis as Cluster
    // A Cluster lists its nodes once it has read the slots; its commands wait for that.
    if (cluster.status !== 'ready') await this.deadlines.bound(cluster.ping())
    return cluster.nodes('master')
  }
}
