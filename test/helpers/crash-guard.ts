/**
 * Fails the test file on an unhandled rejection or an uncaught exception,
 * wherever it comes from (the plugin, a store, a timer): a crash in the
 * plugin can never pass silently. Every test file imports it, directly or
 * through the other helpers.
 */
import t from 'tap'

function crashed (kind: string, error: unknown): void {
  process.exitCode = 1
  console.error(`${kind} in a test process:`, error)
  t.fail(`${kind}: ${error instanceof Error ? error.stack ?? error.message : String(error)}`)
}

process.on('unhandledRejection', (reason) => crashed('unhandledRejection', reason))
process.on('uncaughtException', (error) => crashed('uncaughtException', error))
