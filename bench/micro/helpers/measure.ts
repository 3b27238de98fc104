/**
 * What the micro-benchmarks share: timing a batch of calls as one sample, and
 * printing ns per call. In a folder of its own, so that bench/micro/index.ts,
 * which runs every file of bench/micro, does not run it.
 */
import type { Bench, FnReturnedObject } from 'tinybench'

/**
 * Times `run`, which makes `calls` calls, and gives tinybench their mean as
 * the sample: one call is shorter than the timer resolves well, and
 * tinybench's own cost per sample would outweigh it.
 */
export function batch (calls: number, run: () => void): FnReturnedObject {
  const start = performance.now()
  run()
  const duration = performance.now() - start
  return { overriddenDuration: duration / calls, overriddenIterationCost: duration }
}

const ns = (ms: number) => (ms * 1e6).toFixed(ms < 1e-4 ? 1 : 0)

/** Prints each task's median and mean, in ns per call, with the spread tinybench sees; a task that failed fails the process. */
export function print (bench: Bench, note: string): void {
  console.log(`${bench.name}: ${note}, Node.js ${process.version}`)
  console.table(bench.tasks.map((task) => {
    const result = task.result
    if (result.state !== 'completed') return { task: task.name, state: result.state, ...(result.state === 'errored' ? { error: result.error.message } : {}) }
    const { latency } = result
    return {
      task: task.name,
      'median ns/op': ns(latency.p50),
      'mean ns/op': ns(latency.mean),
      'p99 ns/op': ns(latency.p99),
      'mean ± %': latency.rme.toFixed(1),
      samples: latency.samplesCount
    }
  }))
  if (bench.tasks.some((task) => task.result.state !== 'completed')) process.exitCode = 1
}
