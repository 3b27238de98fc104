/**
 * Start-up warnings: configurations that run but may not protect what the
 * application means to protect. They go through `process.emitWarning` (with
 * `process-warning`, as Fastify's own warnings do), so they are printed even
 * when the application has no logger. Each is emitted once per process,
 * but an evicting Redis, which is checked again after every reconnect.
 */
import processWarning from 'process-warning'

const { createWarning } = processWarning

const name = 'FastifyIdempotencyWarning'

export const warnings = {
  noScope: createWarning({
    name,
    code: 'FSTIDEM001',
    message: 'No `scope` is set, so keys are shared by every client: a client that sends another client\'s key gets that client\'s saved response. Set `scope` to the authenticated principal, e.g. `scope: (request) => request.user?.id` (README, "Scope").'
  }),
  requiredCoversNothing: createWarning({
    name,
    code: 'FSTIDEM002',
    message: '`mode: \'required\'` covers no route: routes added before the plugin (or in a `register` that was not awaited) are not covered. `await app.register(fastifyIdempotency, …)` before adding routes.'
  }),
  endpointMatchesNothing: createWarning({
    name,
    code: 'FSTIDEM003',
    message: 'The `endpoints` entry "%s" covers no route. Entries are matched against the full route path, with the `prefix` of an encapsulating `register`; routes added before the plugin are not covered.'
  }),
  ttlBelowLockTtl: createWarning({
    name,
    code: 'FSTIDEM004',
    message: '`ttl` (%d ms) is shorter than `lockTtl` (%d ms): a saved response is forgotten sooner than a claim of a crashed process, so a retry that arrives late runs the handler again. Make `ttl` longer (the default is 24 h).'
  }),
  ttlLooksLikeSeconds: createWarning({
    name,
    code: 'FSTIDEM005',
    message: '`%s` is %d ms: durations given as numbers are milliseconds. If you meant seconds, write \'%s\'; a string duration in ms (\'500ms\') keeps the value and silences this warning.'
  }),
  // Checked again after every reconnect (a failover may land on another Redis): each finding is printed.
  redisEviction: createWarning({
    name,
    code: 'FSTIDEM006',
    message: '%s',
    unlimited: true
  }),
  redisQueue: createWarning({
    name,
    code: 'FSTIDEM007',
    message: '%s'
  })
}

/** Lets every warning be emitted again (tests). */
export function resetWarnings (): void {
  for (const warning of Object.values(warnings)) warning.emitted = false
}
