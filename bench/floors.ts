/**
 * The floors: bare Fastify plus only the Redis calls an idempotency plugin
 * on Redis cannot avoid, so that the plugin's CPU per request can be read as
 * "this much above what any Redis-backed implementation must spend".
 *
 * - floor-1: one script call per request, claim-like, in a `preHandler`: what
 *   a replay costs when the replay cache does not have it.
 * - floor-2: that, plus a save-like script call in `onSend`, awaited, writing
 *   the serialized reply: what a first request costs.
 *
 * Both go through the ioredis client of `@fastify/redis`, with `defineCommand`
 * (EVALSHA, the source sent once per connection), on a key derived from the
 * request's key, as the plugin's Redis store does. Nothing else: no key
 * hashing, no fingerprint, no headers, no token fencing, no timeout.
 */
import type {} from '@fastify/redis' // the `redis` decorator's type
import type { FastifyInstance } from 'fastify'
import { KEY_HEADER } from './shared.js'

/** A claim: takes the key if it is free (with an expiry), and answers a small array either way. */
const CLAIM = `
if redis.call('HSETNX', KEYS[1], 't', ARGV[1]) == 0 then
  return {1, redis.call('HGET', KEYS[1], 't')}
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {0, ARGV[1]}
`

/** A save: the status code and the serialized body, with the record's expiry. */
const SAVE = `
redis.call('HSET', KEYS[1], 's', 'c', 'c', ARGV[1], 'b', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
`

const LOCK_TTL = '30000'
const TTL = '86400000'

interface FloorClient {
  floorClaim (key: string, token: string, lockTtl: string): Promise<unknown>
  floorSave (key: string, statusCode: string, body: string | Buffer, ttl: string): Promise<unknown>
}

let sequence = 0

/** Adds the floor's hooks to `app`, which must have `@fastify/redis` registered: the claim, and with `save` the save too. */
export function floorHooks (app: FastifyInstance, save: boolean): void {
  app.redis.defineCommand('floorClaim', { numberOfKeys: 1, lua: CLAIM })
  app.redis.defineCommand('floorSave', { numberOfKeys: 1, lua: SAVE })
  const client = app.redis as unknown as FloorClient
  const keyOf = (key: unknown) => `floor:{${String(key)}}`

  app.addHook('preHandler', async (request) => {
    await client.floorClaim(keyOf(request.headers[KEY_HEADER]), (++sequence).toString(36), LOCK_TTL)
  })
  if (!save) return
  app.addHook('onSend', async (request, reply, payload) => {
    await client.floorSave(keyOf(request.headers[KEY_HEADER]), String(reply.statusCode), payload as string, TTL)
    return payload
  })
}
