/**
 * The stats page in a real headless browser: Debian's Chromium driven by
 * playwright-core, against the app listening on 127.0.0.1. It renders, shows
 * the counts of a known run, logs no console error, loads nothing that fails,
 * and is served only through the application's preHandler.
 *
 * Without /usr/bin/chromium the file is skipped with one line saying how to
 * install it, unless `CI` is set: then it fails (CI must run it).
 */
import t from 'tap'
import { existsSync } from 'node:fs'
import { chromium, type Browser, type Page } from 'playwright-core'
import type { FastifyInstance } from 'fastify'
import { build, heldHandler, until, type Teardown } from '../helpers/app.js'

const CHROMIUM = '/usr/bin/chromium'
const INSTALL = 'Chromium is not installed: apt-get install chromium'
const TOKEN = 'let-me-see-the-stats'

if (existsSync(CHROMIUM)) {
  suite()
} else if (process.env.CI) {
  throw new Error(`${INSTALL} (CI is set, so the stats page test must run)`)
} else {
  t.plan(0, INSTALL)
}

function suite () {
  let browser: Browser
  let app: FastifyInstance
  let base: string

  t.before(async () => {
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
        '--disable-background-networking', '--disable-component-update', '--disable-sync']
    })
    app = await build(t, {
      stats: {
        route: '/idempotency/stats',
        warnRecords: 3,
        preHandler: async (request, reply) => {
          if (request.headers['x-stats-token'] !== TOKEN) return reply.code(401).send({ error: 'Unauthorized' })
        }
      }
    })
    const held = heldHandler({ paid: true }, { firstOnly: true })
    app.post('/orders', async () => ({ ok: true }))
    app.post('/payments', held.handler)
    app.post('/required', { config: { idempotency: true } }, async () => ({ ok: true }))
    base = await app.listen({ host: '127.0.0.1', port: 0 })

    // The known run: /orders 3 executed, 2 replayed, 1 mismatch; /payments 1 executed, 1 conflict; /required 1 missing key.
    const send = (url: string, key?: string, payload: object = { n: 1 }) =>
      app.inject({ method: 'POST', url, headers: key === undefined ? {} : { 'idempotency-key': key }, payload })
    for (const key of ['a', 'b', 'c']) await send('/orders', key)
    await send('/orders', 'a')
    await send('/orders', 'b')
    await send('/orders', 'c', { n: 2 })
    const original = send('/payments', 'p')
    await until(() => held.runs() === 1)
    await send('/payments', 'p')
    held.open()
    await original
    await send('/required')
  })
  t.teardown(async () => {
    await browser?.close()
  })

  /** A new page in its own context, with what went wrong on it collected. */
  async function open (tt: Teardown, headers: Record<string, string>) {
    const context = await browser.newContext({ extraHTTPHeaders: headers })
    tt.teardown(() => context.close())
    const page: Page = await context.newPage()
    const problems: string[] = []
    page.on('console', (message) => { if (message.type() === 'error') problems.push(`console: ${message.text()} (${message.location().url})`) })
    page.on('pageerror', (error) => problems.push(`page error: ${error.message}`))
    page.on('requestfailed', (request) => problems.push(`failed: ${request.url()} ${request.failure()?.errorText}`))
    const requests: string[] = []
    page.on('request', (request) => requests.push(request.url()))
    return { page, problems, requests }
  }

  t.test('the page renders the counts of the known run, with no console error and nothing failing', async (t) => {
    const { page, problems, requests } = await open(t, { 'x-stats-token': TOKEN })
    const response = await page.goto(`${base}/idempotency/stats`)
    t.equal(response?.status(), 200)
    t.match(response?.headers()['content-type'], /^text\/html/)
    t.equal(await page.title(), 'Idempotency stats')
    t.ok(await page.locator('h1').isVisible(), 'the heading is visible')
    t.equal(await page.textContent('#records'), '4', 'a, b, c and p are in the store')
    t.equal(await page.textContent('#duplicates'), '4', '2 replays, 1 mismatch, 1 conflict')
    t.equal(await page.textContent('#executed'), '4')
    t.match(await page.textContent('#last-duplicate'), /^\d{4}-\d\d-\d\dT[\d:.]+Z$/)
    t.match(await page.textContent('#bytes'), /^\d+(\.\d)? (B|KiB) of 64\.0 MiB$/, 'the memory store counts the bytes it holds, against maxBytes')
    t.equal(await page.textContent('#in-flight'), '0')
    t.equal(await page.textContent('#evictions'), '0')

    const rows = await page.locator('#routes tbody tr').evaluateAll((trs) =>
      trs.map((tr) => Array.from(tr.querySelectorAll('td'), (td) => td.textContent)))
    t.strictSame(rows.map((cells) => cells.slice(0, 8)), [
      // Route, Duplicates, Replayed, In flight, Mismatch, Executed, Bad keys, Store errors
      ['POST /orders', '3', '2', '0', '1', '3', '0', '0'],
      ['POST /payments', '1', '0', '1', '0', '1', '0', '0'],
      ['POST /required', '0', '0', '0', '0', '0', '1', '0']
    ], 'the top routes by duplicates')
    t.equal(rows[2][8], 'never')

    const warning = page.locator('#warning')
    t.ok(await warning.isVisible(), 'the warning is shown: 4 records, more than warnRecords 3')
    t.match(await warning.textContent(), /The store holds 4 records, more than 3/)
    const background = await warning.evaluate((element) => getComputedStyle(element).backgroundColor)
    t.equal(background, 'rgb(255, 243, 205)', 'the inline style applies')

    t.strictSame(problems, [], 'no console error, no page error, no failed request')
    t.ok(requests.every((url) => url.startsWith(base) || url.startsWith('data:')), `nothing loaded from elsewhere (${requests.join(', ')})`)
  })

  t.test('without the application\'s credentials the page is not served', async (t) => {
    for (const headers of [{}, { 'x-stats-token': 'wrong' }] as Array<Record<string, string>>) {
      const { page } = await open(t, headers)
      const response = await page.goto(`${base}/idempotency/stats`)
      t.equal(response?.status(), 401)
      t.equal(await page.locator('#records').count(), 0, 'no stats in the page')
      t.notMatch(await page.content(), /POST \/orders/)
    }
  })
}
