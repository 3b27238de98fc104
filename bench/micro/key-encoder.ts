/**
 * Micro-benchmark of the default key encoder (lib/key-encoder.ts): the store
 * key of a request, a SHA-256 of its scope, method, path and key, without a
 * scope and with one.
 *
 *   npx tsx bench/micro/key-encoder.ts
 */
import { randomUUID } from 'node:crypto'
import { Bench } from 'tinybench'
import { defaultKeyEncoder } from '../../lib/key-encoder.js'
import type { KeyParts } from '../../types/index.js'
import { batch, print } from './helpers/measure.js'

const BATCH = 1000
const keys = Array.from({ length: BATCH }, () => randomUUID())
const parts = (scope: string | undefined): KeyParts[] => keys.map((key) => ({ scope, method: 'POST', path: '/orders', key }))

let sink = 0
const bench = new Bench({ name: 'defaultKeyEncoder (lib/key-encoder.ts)', time: 1000, warmupTime: 200 })
for (const [name, requests] of [['no scope', parts(undefined)], ['scope: a user id', parts('user_8c1f3b2a')]] as const) {
  bench.add(name, () => batch(BATCH, () => {
    for (let i = 0; i < BATCH; i++) sink += defaultKeyEncoder(requests[i]).length
  }))
}

await bench.run()
if (sink === 0) throw new Error('defaultKeyEncoder returned nothing')
print(bench, `${BATCH} calls per sample`)
