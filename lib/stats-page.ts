/**
 * The stats page (`stats.route`): JSON, or for `Accept: text/html` a small
 * self-contained HTML page (inline CSS, no script, no external resource; an
 * empty inline icon, or the browser asks for /favicon.ico and logs its 404).
 */
import type { FastifyReply, FastifyRequest } from 'fastify'
import type { IdempotencyStats } from '../types/index.js'

const ESCAPES: Record<string, string> = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }

function escape (text: string): string {
  return text.replace(/[&<>"']/g, (c) => ESCAPES[c])
}

function when (at: number): string {
  return at === 0 ? 'never' : new Date(at).toISOString()
}

function bytes (n: number | undefined): string {
  if (n === undefined) return 'unknown'
  if (n < 1024) return `${n} B`
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`
  return `${(n / 1024 / 1024).toFixed(1)} MiB`
}

/** Memory used, and against the bound when there is one. */
function memory (store: IdempotencyStats['store']): string {
  if (store.maxBytes === undefined || store.bytes === undefined) return bytes(store.bytes)
  return `${bytes(store.bytes)} of ${bytes(store.maxBytes)}`
}

export function renderStatsPage (stats: IdempotencyStats, now: number): string {
  const { totals, store } = stats
  const approx = store.estimated ? '≈ ' : ''
  const rows = stats.routes.map((r) => `<tr><td><code>${escape(r.route)}</code></td><td>${r.duplicates}</td><td>${r.replayed}</td>` +
    `<td>${r.conflicts}</td><td>${r.mismatches}</td><td>${r.executed}</td><td>${r.missingKeys + r.invalidKeys}</td>` +
    `<td>${r.storeErrors}</td><td>${when(r.lastDuplicateAt)}</td></tr>`).join('\n')
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Idempotency stats</title>
<link rel="icon" href="data:,">
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 2rem; color: #222; }
table { border-collapse: collapse; margin-top: 1rem; }
th, td { border: 1px solid #ccc; padding: .3rem .6rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.warning { background: #fff3cd; border: 1px solid #e0b000; padding: .6rem 1rem; }
dl { display: grid; grid-template-columns: max-content auto; gap: .2rem 1rem; }
dt { font-weight: 600; }
</style>
</head>
<body>
<h1>Idempotency stats</h1>
${stats.warning === undefined ? '' : `<p class="warning" id="warning">${escape(stats.warning)}</p>`}
<dl>
<dt>Saved responses</dt><dd id="records">${approx}${store.records}</dd>
<dt>Requests in flight</dt><dd id="in-flight">${store.inFlight === undefined ? 'unknown' : approx + store.inFlight}</dd>
<dt>Store memory</dt><dd id="bytes">${approx}${memory(store)}</dd>
<dt>Evicted before their ttl</dt><dd id="evictions">${store.evictions ?? 'unknown'}</dd>
${store.evictionPolicy === undefined ? '' : `<dt>Eviction policy</dt><dd id="policy">${escape(store.evictionPolicy)}</dd>`}
<dt>Duplicates</dt><dd id="duplicates">${totals.duplicates}</dd>
<dt>Executed</dt><dd id="executed">${totals.executed}</dd>
<dt>Last duplicate</dt><dd id="last-duplicate">${when(totals.lastDuplicateAt)}</dd>
</dl>
<h2>Top routes by duplicates</h2>
<table id="routes">
<thead><tr><th>Route</th><th>Duplicates</th><th>Replayed</th><th>In flight (409)</th><th>Mismatch (422)</th><th>Executed</th><th>Bad keys (400)</th><th>Store errors</th><th>Last duplicate</th></tr></thead>
<tbody>
${rows || '<tr><td colspan="9">No requests yet</td></tr>'}
</tbody>
</table>
<p><small>Generated ${new Date(now).toISOString()}</small></p>
</body>
</html>
`
}

/** The stats route's response schema (JSON; the HTML page is a string). */
export const statsSchema = {
  response: {
    200: {
      anyOf: [{ type: 'string' }, { type: 'object', additionalProperties: true }]
    }
  }
}

/** The handler of the stats route. */
export async function statsHandler (this: { idempotency: { stats: () => Promise<IdempotencyStats> } }, request: FastifyRequest, reply: FastifyReply): Promise<IdempotencyStats | string> {
  const stats = await this.idempotency.stats()
  if (request.headers.accept?.includes('text/html') !== true) return stats
  reply.type('text/html; charset=utf-8')
  return renderStatsPage(stats, Date.now())
}
