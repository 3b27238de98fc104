/**
 * The lifecycle patterns (test/helpers/patterns.ts) on a real Redis: every
 * store call answers over the network, later than the reply it belongs to.
 */
import t from 'tap'
import { Redis } from 'ioredis'
import { RedisStore } from '../../index.js'
import '../helpers/crash-guard.js'
import { lifecyclePatterns } from '../helpers/patterns.js'
import { startRedis, uniquePrefix, withRedis, type RedisServer } from '../../support/redis.js'

withRedis(t, (t) => {
  let server: RedisServer
  let client: Redis
  t.before(async () => {
    server = await startRedis()
    client = new Redis({ host: '127.0.0.1', port: server.port })
  })
  t.teardown(async () => {
    client?.disconnect()
    await server?.stop()
  })
  lifecyclePatterns(t, { store: () => new RedisStore({ client, prefix: uniquePrefix('lifecycle') }) })
})
