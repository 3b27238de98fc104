/**
 * The load generator: a child process of run.ts (pinned to its own core) that
 * runs autocannon's programmatic API on request, so that every request can
 * carry a key of its own (`requests[].setupRequest`).
 *
 * Latency is taken from autocannon's per-response timing (float ms) into a
 * histogram of 10 µs buckets: autocannon's own histogram rounds to whole
 * milliseconds, too coarse for responses that take about one.
 */
import autocannon from 'autocannon'
import { KEY_HEADER, REQUEST_BODY, ROUTE, scenario as scenarioOf, type FromLoad, type LoadRequest, type LoadResult, type ToLoad } from './shared.js'

const BUCKET_MS = 0.01
const BUCKETS = 100_000 // up to 1 s; slower responses land in the last bucket
/** Retries in the mix scenario pick among this many most recently answered fresh keys. */
const RECENT = 1000
const RETRY_SHARE = 0.1

let counter = 0
/** A key no other request of this process has used: fixed length, like a UUID. */
function freshKey (prefix: string): string {
  return prefix + (++counter).toString(36).padStart(12, '0')
}

function seedKey (prefix: string, i: number): string {
  return prefix + 's' + i.toString(36).padStart(11, '0')
}

interface Ctx { key?: string, fresh?: boolean }

function send (message: FromLoad): void {
  process.send?.(message)
}

async function run (job: LoadRequest): Promise<LoadResult> {
  const { prefix, scenario } = job
  let keysSent = 0
  const recent: string[] = []
  let recentAt = 0
  // The keys run.ts seeded before the warm-up (replay scenarios): one for hot, 1000 for keys1000.
  const { seedKeys } = scenarioOf(scenario)
  let seedNext = 0

  function nextKey (context: Ctx): string {
    keysSent++
    if (job.seed) return seedKey(prefix, seedNext++)
    switch (scenario) {
      case 'hot':
      case 'keys1000': return seedKey(prefix, Math.floor(Math.random() * seedKeys))
      case 'mix':
        if (recent.length > 0 && Math.random() < RETRY_SHARE) {
          context.fresh = false
          return recent[Math.floor(Math.random() * recent.length)]
        }
        context.fresh = true
        return freshKey(prefix)
      default: return freshKey(prefix)
    }
  }

  const setupRequest = (request: autocannon.Request, context: object) => {
    const key = nextKey(context as Ctx)
    ;(context as Ctx).key = key
    request.headers = { 'content-type': 'application/json', [KEY_HEADER]: key }
    return request
  }
  // Only the mix scenario needs to know which keys were answered (autocannon parses headers for onResponse).
  const onResponse = scenario === 'mix' && !job.seed
    ? (status: number, _body: string, context: object) => {
        const { fresh, key } = context as Ctx
        if (status >= 200 && status < 300 && fresh === true && key !== undefined) {
          if (recent.length < RECENT) recent.push(key)
          else recent[recentAt++ % RECENT] = key
        }
      }
    : undefined

  const histogram = new Uint32Array(BUCKETS)
  let recorded = 0
  const statusCodes: Record<string, number> = {}
  const started = performance.now()
  const cpuBefore = process.cpuUsage()
  let instance: autocannon.Instance | undefined
  const done = new Promise<autocannon.Result>((resolve, reject) => {
    instance = autocannon({
      url: job.url + ROUTE,
      method: 'POST',
      body: REQUEST_BODY,
      connections: job.seed ? Math.min(job.connections, job.amount ?? 1) : job.connections,
      pipelining: 1,
      duration: job.duration,
      ...(job.amount === undefined ? {} : { amount: job.amount }),
      timeout: 10,
      requests: [{ setupRequest, ...(onResponse === undefined ? {} : { onResponse }) }]
    }, (err, result) => err ? reject(err) : resolve(result))
  })
  ;(instance as autocannon.Instance).on('response', (_client, statusCode, _bytes, responseTime) => {
    statusCodes[statusCode] = (statusCodes[statusCode] ?? 0) + 1
    const bucket = Math.floor(responseTime / BUCKET_MS)
    histogram[bucket < BUCKETS ? bucket : BUCKETS - 1]++
    recorded++
    if (job.progressEvery !== undefined && recorded % job.progressEvery === 0) send({ type: 'progress', id: job.id, responses: recorded })
  })
  const result = await done
  const cpu = process.cpuUsage(cpuBefore)
  // autocannon's own duration (s, to 10 ms); our clock when it reports none.
  const seconds = result.duration || (performance.now() - started) / 1000
  return {
    requests: result.requests.total,
    non2xx: result.non2xx,
    errors: result.errors,
    timeouts: result.timeouts,
    seconds,
    rps: result.requests.total / seconds,
    p50: percentile(histogram, recorded, 0.5),
    p99: percentile(histogram, recorded, 0.99),
    keysSent,
    cpuMicros: cpu.user + cpu.system,
    statusCodes
  }
}

function percentile (histogram: Uint32Array, total: number, p: number): number {
  if (total === 0) return 0
  const rank = Math.ceil(total * p)
  let seen = 0
  for (let i = 0; i < histogram.length; i++) {
    seen += histogram[i]
    if (seen >= rank) return (i + 1) * BUCKET_MS
  }
  return histogram.length * BUCKET_MS
}

process.on('message', (message: ToLoad) => {
  if (message.type === 'exit') {
    process.disconnect?.()
    return
  }
  run(message).then(
    (result) => send({ type: 'result', id: message.id, result }),
    (err: Error) => send({ type: 'error', id: message.id, message: err.stack ?? String(err) })
  )
})
send({ type: 'ready' })
