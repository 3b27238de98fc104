/**
 * Micro-benchmark of reading the key from the header (lib/header.ts,
 * `parseKey`), with the default key rules: a bare UUID, as most clients send
 * it, and the same UUID quoted, as the IETF draft writes it.
 *
 *   npx tsx bench/micro/parse-key.ts
 */
import { randomUUID } from 'node:crypto'
import { Bench } from 'tinybench'
import { parseKey, type KeyRules } from '../../lib/header.js'
import { batch, print } from './helpers/measure.js'

const BATCH = 1000
/** The plugin's defaults (lib/options.ts). */
const RULES: KeyRules = { header: 'idempotency-key', maxLength: 255, pattern: undefined, uuid: false }
// Distinct strings, as requests bring: one string again and again could let V8 keep what it learnt of it.
const bare = Array.from({ length: BATCH }, () => randomUUID())
const quoted = bare.map((key) => `"${key}"`)

let sink = 0
const bench = new Bench({ name: 'parseKey (lib/header.ts)', time: 1000, warmupTime: 200 })
for (const [name, keys] of [['bare UUID', bare], ['quoted UUID', quoted]] as const) {
  bench.add(name, () => batch(BATCH, () => {
    for (let i = 0; i < BATCH; i++) sink += parseKey(keys[i], RULES).length
  }))
}

await bench.run()
if (sink === 0) throw new Error('parseKey returned nothing')
print(bench, `${BATCH} calls per sample`)
