/**
 * Runs every micro-benchmark of this folder, one after another, each in a
 * process of its own (so that what V8 learnt running one does not shape the
 * next), and fails if one does.
 *
 *   npx tsx bench/micro/index.ts                        all of them
 *   npx tsx bench/micro/index.ts parse-key replay-cache  some of them
 */
import { spawnSync } from 'node:child_process'
import { readdirSync } from 'node:fs'
import { basename, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { ROOT } from '../shared.js'

const here = fileURLToPath(new URL('.', import.meta.url))
const all = readdirSync(here).filter((file) => file.endsWith('.ts') && file !== basename(fileURLToPath(import.meta.url))).sort()
const wanted = process.argv.slice(2).map((name) => name.replace(/\.ts$/, '') + '.ts')
for (const name of wanted) {
  if (!all.includes(name)) throw new Error(`no bench/micro/${name}; there are: ${all.join(', ')}`)
}

const failed: string[] = []
for (const file of wanted.length > 0 ? wanted : all) {
  console.log(`\n# bench/micro/${file}\n`)
  const run = spawnSync(process.execPath, ['--import', 'tsx', join(here, file)], { cwd: ROOT, stdio: 'inherit' })
  if (run.status !== 0) failed.push(`${file} (${run.signal ?? `exit code ${run.status}`})`)
}
if (failed.length > 0) {
  console.error(`\nfailed: ${failed.join(', ')}`)
  process.exitCode = 1
}
