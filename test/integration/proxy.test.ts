import t from 'tap'
import '../helpers/crash-guard.js'
import { once } from 'node:events'
import { createConnection, createServer, type Server, type Socket } from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'
import { freePort, HOST } from '../../support/processes.js'
import { startProxy, type Proxy } from '../../support/proxy.js'
import { eventually } from '../helpers/app.js'

/** An echo server that also keeps everything it received, per connection. */
async function startEcho (): Promise<{ server: Server, port: number, received: () => string, push: (text: string) => void }> {
  let received = ''
  const sockets = new Set<Socket>()
  const server = createServer((socket) => {
    sockets.add(socket)
    socket.on('error', () => {})
    socket.on('close', () => sockets.delete(socket))
    socket.on('data', (chunk) => {
      received += chunk.toString()
      socket.write(chunk)
    })
  })
  server.listen(0, HOST)
  await once(server, 'listening')
  const close = server.close.bind(server)
  server.close = (callback) => {
    for (const socket of sockets) socket.destroy()
    return close(callback)
  }
  const push = (text: string) => { for (const socket of sockets) socket.write(text) }
  return { server, port: (server.address() as { port: number }).port, received: () => received, push }
}

/** A client of the proxy that collects what comes back and how the connection ended. */
async function client (proxy: Proxy): Promise<{ socket: Socket, data: () => string, ended: () => string | undefined }> {
  const socket = createConnection({ host: HOST, port: proxy.port })
  let data = ''
  let ended: string | undefined
  socket.on('data', (chunk) => { data += chunk.toString() })
  socket.on('error', (err: NodeJS.ErrnoException) => { ended ??= err.code })
  socket.on('close', () => { ended ??= 'closed' })
  await once(socket, 'connect')
  return { socket, data: () => data, ended: () => ended }
}

t.test('pass copies bytes both ways', async (t) => {
  const echo = await startEcho()
  t.teardown(() => echo.server.close())
  const proxy = await startProxy(echo.port)
  t.teardown(() => proxy.stop())
  const c = await client(proxy)
  c.socket.write('hello')
  await eventually('the echo', () => c.data() === 'hello')
  t.equal(echo.received(), 'hello')
  t.equal(proxy.connections, 1)
  c.socket.destroy()
  await eventually('the proxy to notice', () => proxy.connections === 0)
  t.pass('a client that leaves closes its pair')
})

t.test('blackhole keeps the connection open and loses the bytes both ways, without a reset', async (t) => {
  const echo = await startEcho()
  t.teardown(() => echo.server.close())
  const proxy = await startProxy(echo.port)
  t.teardown(() => proxy.stop())
  const c = await client(proxy)
  c.socket.write('a')
  await eventually('the first echo', () => c.data() === 'a')

  proxy.blackhole()
  c.socket.write('lost')
  const late = await client(proxy)
  late.socket.write('also lost')
  await sleep(300)
  t.equal(c.data(), 'a', 'nothing comes back')
  t.equal(echo.received(), 'a', 'nothing got through')
  t.equal(c.ended(), undefined, 'no reset, no close')
  t.equal(late.ended(), undefined, 'a new connection is accepted, and kept open too')

  proxy.pass()
  c.socket.write('b')
  await eventually('the echo after pass()', () => c.data() === 'ab')
  t.equal(echo.received(), 'ab', 'the bytes sent meanwhile are gone for good')
})

t.test('a blackhole also swallows what the server sends on its own', async (t) => {
  const echo = await startEcho()
  t.teardown(() => echo.server.close())
  const proxy = await startProxy(echo.port)
  t.teardown(() => proxy.stop())
  const c = await client(proxy)
  c.socket.write('>')
  await eventually('the connection to reach the server', () => c.data() === '>')
  echo.push('hi')
  await eventually('the push', () => c.data() === '>hi')
  proxy.blackhole()
  echo.push('gone')
  await sleep(200)
  t.equal(c.data(), '>hi', 'the server\'s bytes are lost on the way out')
  proxy.pass()
  echo.push('!')
  await eventually('the push after pass()', () => c.data() === '>hi!')
})

t.test('drop resets every connection, and new ones until pass()', async (t) => {
  const echo = await startEcho()
  t.teardown(() => echo.server.close())
  const proxy = await startProxy(echo.port)
  t.teardown(() => proxy.stop())
  const c = await client(proxy)
  proxy.drop()
  await eventually('the reset', () => c.ended() !== undefined)
  t.equal(c.ended(), 'ECONNRESET', 'the client sees a reset, not a clean close')
  t.equal(proxy.connections, 0)

  const refused = createConnection({ host: HOST, port: proxy.port })
  const [err] = await once(refused, 'error') as [NodeJS.ErrnoException]
  t.equal(err.code, 'ECONNRESET', 'a new connection is reset at once')

  proxy.pass()
  const again = await client(proxy)
  again.socket.write('back')
  await eventually('the echo', () => again.data() === 'back')
  t.pass('after pass() connections work again')
})

t.test('delay delivers every byte that much later, in order, both ways', async (t) => {
  const echo = await startEcho()
  t.teardown(() => echo.server.close())
  const proxy = await startProxy(echo.port)
  t.teardown(() => proxy.stop())
  const c = await client(proxy)
  proxy.delay(150)
  const start = performance.now()
  c.socket.write('1')
  await sleep(20)
  c.socket.write('2')
  await sleep(100)
  t.equal(echo.received(), '', 'not yet at the server')
  proxy.pass() // what was delayed still comes first
  c.socket.write('3')
  await eventually('every echo', () => c.data() === '123')
  t.equal(echo.received(), '123', 'in the order sent')
  t.ok(performance.now() - start >= 150, 'the first byte took at least the delay')
})

t.test('a target that is down closes the client connection', async (t) => {
  const proxy = await startProxy(await freePort())
  t.teardown(() => proxy.stop())
  const c = await client(proxy)
  await eventually('the close', () => c.ended() !== undefined)
  t.ok(c.ended() === 'closed' || c.ended() === 'ECONNRESET', `closed (${c.ended()})`)
})

t.test('stop() closes every connection and the port', async (t) => {
  const echo = await startEcho()
  t.teardown(() => echo.server.close())
  const proxy = await startProxy(echo.port)
  const open = await client(proxy)
  await proxy.stop()
  await eventually('stop() to close the open connection', () => open.ended() !== undefined)
  t.equal(proxy.connections, 0)
  const refused = createConnection({ host: HOST, port: proxy.port })
  const [err] = await once(refused, 'error') as [NodeJS.ErrnoException]
  t.equal(err.code, 'ECONNREFUSED')
})
