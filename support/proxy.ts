/**
 * A fault-injecting TCP proxy on loopback, for the tests: clients connect to
 * `port`, the proxy connects each of them to `targetPort` on 127.0.0.1 and
 * copies bytes both ways, until told to fail:
 *
 * - `pass()`       copies bytes (the default), new connections are accepted.
 * - `drop()`       resets every connection (RST, as a crashed host's kernel
 *                  or a firewall reject would), and every new one at once,
 *                  until `pass()`.
 * - `blackhole()`  keeps every socket open and discards the bytes that arrive
 *                  either way, without any RST or FIN: a network partition, a
 *                  host that froze. New connections are accepted (the kernel
 *                  completes the handshake on loopback), then discarded too.
 *                  Bytes discarded are lost, also after `pass()`.
 * - `delay(ms)`    delivers every byte `ms` later, in order, both ways.
 *
 * The proxy runs in the test process. Its server does not keep the process
 * alive (a file that forgets `stop()` still exits); `stop()` closes it and
 * destroys every connection.
 */
import { createConnection, createServer, type Socket } from 'node:net'
import { HOST } from './processes.js'

export interface Proxy {
  port: number
  pass (): void
  drop (): void
  blackhole (): void
  delay (ms: number): void
  /** Connections from clients open now. */
  readonly connections: number
  stop (): Promise<void>
}

type Mode = 'pass' | 'drop' | 'blackhole'

function ignore (): void {}

/** One direction of a connection: chunks go out in order, each at its time. */
class Pipe {
  private readonly queue: Array<{ at: number, chunk: Buffer }> = []
  private timer: NodeJS.Timeout | undefined

  constructor (private readonly to: Socket) {}

  send (chunk: Buffer, delay: number): void {
    if (delay === 0 && this.queue.length === 0) {
      this.to.write(chunk)
      return
    }
    this.queue.push({ at: performance.now() + delay, chunk })
    this.timer ??= setTimeout(this.flush, Math.max(0, this.queue[0].at - performance.now()))
  }

  stop (): void {
    clearTimeout(this.timer)
    this.queue.length = 0
  }

  private readonly flush = (): void => {
    this.timer = undefined
    const now = performance.now()
    while (this.queue.length > 0 && this.queue[0].at <= now) this.to.write((this.queue.shift() as { chunk: Buffer }).chunk)
    if (this.queue.length > 0) this.timer = setTimeout(this.flush, Math.max(1, this.queue[0].at - now))
  }
}

/** Starts a proxy to `targetPort` on a free loopback port. */
export async function startProxy (targetPort: number): Promise<Proxy> {
  let mode: Mode = 'pass'
  let delay = 0
  const pairs = new Set<{ downstream: Socket, upstream: Socket, pipes: Pipe[] }>()

  const reset = (pair: { downstream: Socket, upstream: Socket, pipes: Pipe[] }): void => {
    for (const pipe of pair.pipes) pipe.stop()
    pair.downstream.resetAndDestroy()
    pair.upstream.resetAndDestroy()
    pairs.delete(pair)
  }

  const server = createServer((downstream) => {
    downstream.on('error', ignore) // resets, ours or the other side's
    if (mode === 'drop') return downstream.resetAndDestroy()
    const upstream = createConnection({ host: HOST, port: targetPort })
    upstream.on('error', ignore)
    const pipes = [new Pipe(upstream), new Pipe(downstream)]
    const pair = { downstream, upstream, pipes }
    pairs.add(pair)
    const forward = (pipe: Pipe) => (chunk: Buffer) => {
      if (mode === 'pass') pipe.send(chunk, delay)
    }
    downstream.on('data', forward(pipes[0]))
    upstream.on('data', forward(pipes[1]))
    for (const socket of [downstream, upstream]) {
      socket.on('close', () => {
        for (const pipe of pipes) pipe.stop()
        downstream.destroy()
        upstream.destroy()
        pairs.delete(pair)
      })
    }
  })
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject)
    server.listen(0, HOST, resolve)
  })
  server.unref()
  const port = (server.address() as { port: number }).port

  return {
    port,
    pass () {
      mode = 'pass'
      delay = 0
    },
    drop () {
      mode = 'drop'
      for (const pair of [...pairs]) reset(pair)
    },
    blackhole () {
      mode = 'blackhole'
    },
    delay (ms: number) {
      mode = 'pass'
      delay = ms
    },
    get connections () { return pairs.size },
    async stop () {
      for (const pair of [...pairs]) reset(pair)
      await new Promise((resolve) => server.close(resolve))
    }
  }
}
