/**
 * The shared store: Redis or Redis Cluster, through an ioredis client that the
 * application owns (usually the one `@fastify/redis` decorates).
 *
 * Data layout: one hash per record, at `${prefix}{${key}}` (the braces are a
 * Cluster hash tag: whatever a record ever needs lives in one slot).
 *
 *   s  'i' (in flight) or 'c' (completed)
 *   t  the fencing token of the claim (in flight only; deleted on completion)
 *   f  the request fingerprint (absent when there is none)
 *   c  status code, h  headers as JSON, b  body bytes (completed only)
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
 */
import { createHash, randomBytes } from 'node:crypto'
import { StoreTimeoutError } from '../errors.js'
import type { Cluster, Redis } from 'ioredis'
import { COUNTERS, emptyCounters } from '../stats.js'
import type { ClaimResult, IdempotencyStore, StatsCounts, StoredResponse, StoreUsage } from '../../types/index.js'

export interface RedisStoreOptions {
  /** An ioredis client or Cluster; the application owns it (`close()` leaves it connected). */
  client: Redis | Cluster
  /** Prepended to every key. Default `'idempotency:'`. */
  prefix?: string
  /** How long any store call waits for Redis before it fails with `FST_IDEMPOTENCY_STORE_TIMEOUT`, in ms. Default 2000. */
  timeout?: number
}

/**
 * KEYS[1] record; ARGV token, lockTtl[, fingerprint].
 * Reply: {0} claimed; {1, hasFingerprint, fingerprint} in flight;
 * {2, hasFingerprint, fingerprint, statusCode, headers, body} completed.
 * A claim that finds its own token already there was sent twice (ioredis sends
 * a command again when the connection dropped before its reply came): claimed.
 */
const CLAIM = `
local r = redis.call('HMGET', KEYS[1], 's', 'f', 'c', 'h', 'b', 't')
if not r[1] then
  if ARGV[3] then
    redis.call('HSET', KEYS[1], 's', 'i', 't', ARGV[1], 'f', ARGV[3])
  else
    redis.call('HSET', KEYS[1], 's', 'i', 't', ARGV[1])
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {0}
end
if r[6] == ARGV[1] then return {0} end
local hasFingerprint = 0
if r[2] then hasFingerprint = 1 end
if r[1] == 'i' then return {1, hasFingerprint, r[2] or ''} end
return {2, hasFingerprint, r[2] or '', tonumber(r[3]), r[4], r[5]}
`

/** KEYS[1] record; ARGV token, statusCode, headers, body, ttl ('' = no expiry). Reply 1 saved, 0 refused. */
const COMPLETE = `
if redis.call('HGET', KEYS[1], 't') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 's', 'c', 'c', ARGV[2], 'h', ARGV[3], 'b', ARGV[4])
redis.call('HDEL', KEYS[1], 't')
if ARGV[5] == '' then
  redis.call('PERSIST', KEYS[1])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
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
 * Command names carry the script's SHA: several stores sharing one client
 * define each script once, and two versions of this module never call each
 * other's script.
 */
function commandName (name: string, lua: string): string {
  return `idempotency_${name}_${createHash('sha1').update(lua).digest('hex').slice(0, 12)}`
}

/**
 * KEYS[1] the stats hash; ARGV ttl, then pairs of field and count. Fields are
 * `route\ncounter`; `...\nlastDuplicateAt` keeps the latest time, the others add.
 * (The script spells the newline as Lua's escape `\\n`: a raw one ends a Lua string.)
 */
const ADD_STATS = `
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

type ClaimReply = [0] | [1, number, Buffer] | [2, number, Buffer, number, Buffer, Buffer]

/** The scripted commands, as `defineCommand` adds them to a client. */
interface ScriptedClient {
  [name: string]: (key: string, ...args: Array<string | Buffer>) => Promise<unknown>
}

/** Unique across processes: a random per-process part and a counter. */
const PROCESS_ID = randomBytes(12).toString('base64url')
let sequence = 0

export class RedisStore implements IdempotencyStore {
  readonly prefix: string
  readonly timeout: number
  private readonly client: ScriptedClient
  private readonly redis: Redis | Cluster
  private readonly claimCommand: string
  /** One hash holds every route's counters (a hash tag keeps it on one Cluster slot). */
  private readonly statsKey: string
  /** The connection whose writes are held until the end of this turn of the event loop, if any. */
  private corked: Redis['stream'] | undefined
  private readonly uncork = (): void => {
    this.corked?.uncork()
    this.corked = undefined
  }

  constructor (options: RedisStoreOptions) {
    const { client, prefix = 'idempotency:', timeout = 2000 } = options ?? {}
    if (typeof client?.defineCommand !== 'function') {
      throw new TypeError('RedisStore: client must be an ioredis Redis or Cluster client')
    }
    if (typeof prefix !== 'string') throw new TypeError('RedisStore: prefix must be a string')
    if (!Number.isInteger(timeout) || timeout < 1) throw new TypeError('RedisStore: timeout must be a positive integer (ms)')
    for (const [name, lua] of [[COMMANDS.claim, CLAIM], [COMMANDS.complete, COMPLETE], [COMMANDS.release, RELEASE], [COMMANDS.renew, RENEW], [COMMANDS.addStats, ADD_STATS]]) {
      if (!(name in client)) client.defineCommand(name, { numberOfKeys: 1, lua })
    }
    this.client = client as unknown as ScriptedClient
    this.redis = client
    this.statsKey = `${prefix}stats:{idempotency-stats}`
    this.claimCommand = COMMANDS.claim + 'Buffer' // bulk replies as Buffers: bodies are bytes
    this.prefix = prefix
    this.timeout = timeout
  }

  /** The Redis key of the record for `key`. */
  redisKey (key: string): string {
    return `${this.prefix}{${key}}`
  }

  async claim (key: string, fingerprint: string | undefined, lockTtl: number): Promise<ClaimResult> {
    const token = `${PROCESS_ID}.${(++sequence).toString(36)}`
    const args = [token, String(lockTtl)]
    if (fingerprint !== undefined) args.push(fingerprint)
    const reply = await this.call(this.claimCommand, this.redisKey(key), args, (late) => {
      // It timed out here but Redis ran it later (ioredis queues commands while Redis is away):
      // a claim that nobody holds would answer every retry with 409 until lockTtl. Let it go;
      // if that fails too, it still expires after lockTtl.
      if ((late as ClaimReply)[0] === 0) Promise.allSettled([this.release(key, token)])
    }) as ClaimReply
    if (reply[0] === 0) return { token }
    const fp = reply[1] === 1 ? reply[2].toString() : undefined
    if (reply[0] === 1) return { record: { state: 'in-flight', fingerprint: fp } }
    return {
      record: {
        state: 'completed',
        fingerprint: fp,
        response: { statusCode: reply[3], headers: JSON.parse(reply[4].toString()), body: reply[5] }
      }
    }
  }

  async complete (key: string, token: string, response: StoredResponse, ttl: number | null): Promise<boolean> {
    const args = [token, String(response.statusCode), JSON.stringify(response.headers), response.body, ttl === null ? '' : String(ttl)]
    return await this.call(COMMANDS.complete, this.redisKey(key), args) === 1
  }

  async release (key: string, token: string): Promise<boolean> {
    return await this.call(COMMANDS.release, this.redisKey(key), [token]) === 1
  }

  async renew (key: string, token: string, lockTtl: number): Promise<boolean> {
    return await this.call(COMMANDS.renew, this.redisKey(key), [token, String(lockTtl)]) === 1
  }

  /** Adds counts to the shared stats hash, in one script call. */
  async addStats (counts: StatsCounts, ttl: number): Promise<void> {
    const args = [String(ttl)]
    for (const route in counts) {
      const counters = counts[route]
      for (const name of COUNTERS) if (counters[name] > 0) args.push(`${route}\n${name}`, String(counters[name]))
      if (counters.lastDuplicateAt > 0) args.push(`${route}\nlastDuplicateAt`, String(counters.lastDuplicateAt))
    }
    await this.call(COMMANDS.addStats, this.statsKey, args)
  }

  async readStats (): Promise<StatsCounts> {
    const fields = await this.bounded(this.redis.hgetall(this.statsKey))
    const counts: StatsCounts = {}
    for (const field in fields) {
      const at = field.lastIndexOf('\n')
      const counters = counts[field.slice(0, at)] ??= emptyCounters()
      counters[field.slice(at + 1) as keyof typeof counters] = Number(fields[field])
    }
    return counts
  }

  /**
   * Records and their memory. Never lists a big keyspace: a node with up to
   * 1000 keys is scanned; on a bigger one, 100 random keys give the share of
   * records and their mean size, scaled by DBSIZE (so `estimated` is true).
   */
  async usage (): Promise<StoreUsage> {
    const nodes = this.redis.isCluster ? (this.redis as Cluster).nodes('master') : [this.redis as Redis]
    const match = `${this.prefix.replace(/[*?[\]\\]/g, '\\$&')}{*`
    let records = 0
    let bytes = 0
    let estimated = false
    for (const node of nodes) {
      const size = await this.bounded(node.dbsize())
      let keys: string[] = []
      let scale = 1
      if (size <= SCAN_LIMIT) {
        let cursor = '0'
        do {
          const [next, found] = await this.bounded(node.scan(cursor, 'MATCH', match, 'COUNT', SCAN_LIMIT))
          keys.push(...found)
          cursor = next
        } while (cursor !== '0')
      } else {
        const sample = node.pipeline()
        for (let i = 0; i < SAMPLE; i++) sample.randomkey()
        const picked = await this.bounded(sample.exec()) as Array<[Error | null, string | null]>
        keys = picked.map(([, key]) => key).filter((key): key is string => key !== null && key.startsWith(this.prefix + '{'))
        scale = size / SAMPLE
        estimated = true
      }
      let used = 0
      if (keys.length > 0) {
        const sizes = node.pipeline()
        for (const key of keys) sizes.memory('USAGE', key)
        for (const [, keyBytes] of await this.bounded(sizes.exec()) as Array<[Error | null, number | null]>) used += keyBytes ?? 0
      }
      records += Math.round(keys.length * scale)
      bytes += Math.round(used * scale)
    }
    return { records, bytes, estimated }
  }

  /** Leaves the client connected: it belongs to the application (or `@fastify/redis`). */
  close (): void {}

  /**
   * Runs one script, failing with `FST_IDEMPOTENCY_STORE_TIMEOUT` if Redis does
   * not answer in time. The command may still run later (ioredis keeps it
   * queued): its reply then goes to `late`, if given.
   */
  private call (command: string, redisKey: string, args: Array<string | Buffer>, late?: (reply: unknown) => void): Promise<unknown> {
    this.batchWrites()
    return this.bounded(this.client[command](redisKey, ...args), late)
  }

  /**
   * ioredis writes every command to the socket at once: under load that is one
   * system call per request. Holding a single connection's writes (cork) until
   * the event loop has handled this turn's I/O (setImmediate) sends the claims
   * and saves of all requests that arrived together in one write. The same
   * commands, in the same order, a fraction of a loop turn later. Cluster
   * connections are left as they are (each command picks its node).
   */
  private batchWrites (): void {
    if (this.corked !== undefined || this.redis.isCluster) return
    const { stream, status } = this.redis as Redis
    if (status !== 'ready') return
    stream.cork()
    this.corked = stream
    setImmediate(this.uncork)
  }

  /** `promise`, or a `FST_IDEMPOTENCY_STORE_TIMEOUT` failure if Redis does not answer in time (its reply then goes to `late`). */
  private bounded<T> (promise: Promise<T>, late?: (reply: T) => void): Promise<T> {
    return new Promise((resolve, reject) => {
      let timedOut = false
      const timer = setTimeout(() => {
        timedOut = true
        reject(new StoreTimeoutError(this.timeout))
      }, this.timeout)
      promise.then((reply) => {
        clearTimeout(timer)
        if (timedOut) late?.(reply)
        resolve(reply)
      }, (err: unknown) => {
        clearTimeout(timer)
        reject(err)
      })
    })
  }
}
