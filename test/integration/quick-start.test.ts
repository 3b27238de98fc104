/**
 * The README's quick start cannot rot: its TypeScript is examples/quick-start.ts
 * word for word (which `npm run typecheck` compiles), that file runs as a
 * server, and the README's curl lines, run against it, get what the README
 * says they get.
 */
import t from 'tap'
import { execFileSync } from 'node:child_process'
import { readFileSync } from 'node:fs'
import '../helpers/crash-guard.js'
import { runExample } from '../helpers/example.js'

const readme = readFileSync(new URL('../../README.md', import.meta.url), 'utf8')
const quickStart = readme.slice(readme.indexOf('## Quick start'), readme.indexOf('## How it works'))
const blocks = [...quickStart.matchAll(/```(\w+)\n([\s\S]*?)```/g)].map(([, lang, body]) => ({ lang, body }))

t.test('the quick start is examples/quick-start.ts, word for word', async (t) => {
  const example = readFileSync(new URL('../../examples/quick-start.ts', import.meta.url), 'utf8')
  t.equal(blocks.find((block) => block.lang === 'ts')?.body, example)
})

t.test('it runs, and the README\'s curl lines get what the README says', async (t) => {
  const { line, address } = await runExample(t, 'quick-start.ts')
  t.ok(address, `it listens (${line})`)
  const curls = (blocks.find((block) => block.lang === 'sh')?.body ?? '').trim().split('\n')
  t.equal(curls.length, 4, 'four curl lines')
  const answers = curls.map((command) => {
    const args = [...command.replace('http://127.0.0.1:3000', address as string).matchAll(/'([^']*)'|(\S+)/g)].map((m) => m[1] ?? m[2]).slice(1)
    const out = execFileSync('curl', args, { encoding: 'utf8' })
    const [head, body] = out.split('\r\n\r\n')
    return { status: Number(head.split(' ')[1]), head: head.toLowerCase(), body }
  })
  t.equal(answers[0].status, 201)
  t.match(JSON.parse(answers[0].body), { id: 'pay_1', amount: 1000, currency: 'EUR' })
  t.equal(answers[1].status, 201)
  t.equal(answers[1].body, answers[0].body, 'the same body, byte for byte')
  t.match(answers[1].head, /idempotent-replayed: true/)
  t.equal(answers[2].status, 422, 'the same key with another amount')
  t.equal(answers[3].status, 400, 'no key')
})
