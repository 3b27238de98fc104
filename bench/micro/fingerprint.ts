/**
 * Micro-benchmark of the default fingerprint on the bodies that matter: a
 * small JSON object (the hot path), JSON nested 20 000 deep, a 10 MiB JSON
 * array and a multipart body parsed by @fastify/multipart.
 *
 *   npx tsx bench/micro/fingerprint.ts [baseline.ts]
 *
 * With a baseline module (one exporting `defaultFingerprint`), both run side
 * by side on the same bodies, e.g. an earlier version from git:
 *
 *   git show <commit>:lib/fingerprint.ts > /tmp/fingerprint-baseline.ts
 *   npx tsx bench/micro/fingerprint.ts /tmp/fingerprint-baseline.ts
 *
 * A body the baseline cannot fingerprint is reported with its error.
 */
import { resolve } from 'node:path'
import { pathToFileURL } from 'node:url'
import Fastify from 'fastify'
import multipart from '@fastify/multipart'
import { Bench } from 'tinybench'
import type { FastifyRequest } from 'fastify'
import { defaultFingerprint } from '../../lib/fingerprint.js'

type Fingerprint = (request: FastifyRequest) => string

function request (body: unknown): FastifyRequest {
  return { method: 'POST', url: '/orders?source=bench', body } as unknown as FastifyRequest
}

const small = JSON.parse(JSON.stringify({
  customerId: 'cus_9f8e7d6c5b4a',
  amount: 4999,
  currency: 'eur',
  description: 'Order #10293, two items',
  items: [{ sku: 'TSHIRT-M-BLUE', quantity: 2 }, { sku: 'MUG-WHITE', quantity: 1 }],
  shipping: { name: 'Ada Lovelace', city: 'London', postcode: 'NW1 6XE', country: 'GB' },
  capture: true,
  metadata: { campaign: 'spring', channel: 'web' }
}))

const deep = JSON.parse('['.repeat(20_000) + ']'.repeat(20_000))

function largeArray (bytes: number): unknown[] {
  const items: string[] = []
  let size = 2
  for (let i = 0; size < bytes; i++) {
    const item = JSON.stringify({ id: i, name: `item ${i}`, price: i * 0.25, tags: ['a', 'b'], active: i % 2 === 0 })
    items.push(item)
    size += item.length + 1
  }
  return JSON.parse('[' + items.join(',') + ']')
}
const large = largeArray(10 * 1024 * 1024)

/** A body as @fastify/multipart leaves it with attachFieldsToBody: three fields and a 256 KiB file. */
async function multipartBody (): Promise<unknown> {
  const app = Fastify()
  await app.register(multipart, { attachFieldsToBody: true })
  let body: unknown
  app.post('/', async (req) => { body = req.body; return {} })
  const form = new FormData()
  form.append('title', 'holiday')
  form.append('album', 'summer')
  form.append('public', 'false')
  form.append('photo', new Blob([Buffer.alloc(256 * 1024, 7)]), 'photo.jpg')
  await app.inject({ method: 'POST', url: '/', payload: form })
  await app.close()
  return body
}

const bodies: Array<[string, FastifyRequest]> = [
  ['small JSON (' + JSON.stringify(small).length + ' B)', request(small)],
  ['20 000-deep array', request(deep)],
  ['10 MiB JSON array', request(large)],
  ['multipart, 256 KiB file', request(await multipartBody())]
]

const implementations: Array<[string, Fingerprint]> = [['new', defaultFingerprint]]
if (process.argv[2] !== undefined) {
  const baseline = await import(pathToFileURL(resolve(process.argv[2])).href) as { defaultFingerprint: Fingerprint }
  implementations.unshift(['baseline', baseline.defaultFingerprint])
}

const bench = new Bench({ time: 1000, warmupTime: 200 })
const failures: string[] = []
for (const [body, req] of bodies) {
  for (const [name, fingerprint] of implementations) {
    try {
      fingerprint(req)
    } catch (err) {
      failures.push(`${name}, ${body}: throws ${(err as Error).name}: ${(err as Error).message}`)
      continue
    }
    bench.add(`${name}: ${body}`, () => { fingerprint(req) })
  }
}
await bench.run()
console.table(bench.tasks.map((task) => {
  const latency = (task.result as { latency?: { mean: number, p50?: number, p99?: number } }).latency
  const micros = (ms: number | undefined) => ms === undefined ? '' : (ms * 1000).toFixed(1)
  return { task: task.name, 'mean (µs)': micros(latency?.mean), 'p50 (µs)': micros(latency?.p50), 'p99 (µs)': micros(latency?.p99) }
}))
for (const failure of failures) console.log(failure)
