/**
 * Bodies that a content-type parser hands over as a stream (a catch-all
 * parser that passes the raw request on, as proxies do). The fingerprint must
 * cover the bytes before the handler runs, so the stream is read here, up to
 * the route's `bodyLimit`, and the handler gets a stream of the same bytes.
 */
import { Readable } from 'node:stream'
import { errorCodes, type FastifyRequest } from 'fastify'

export function isStream (body: unknown): body is Readable {
  return typeof body === 'object' && body !== null && typeof (body as { pipe?: unknown }).pipe === 'function' &&
    typeof (body as { on?: unknown }).on === 'function'
}

/**
 * Reads the stream `request.body` whole (failing with Fastify's own 413
 * beyond the route's `bodyLimit`), leaves the bytes in `request.body` for the
 * fingerprint, and returns a function that puts a stream of those bytes back
 * for the handler.
 */
export function readStreamBody (request: FastifyRequest): Promise<() => void> {
  const body = request.body as Readable
  const limit = request.routeOptions.bodyLimit
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = []
    let length = 0
    const onData = (chunk: Buffer | string) => {
      const bytes = typeof chunk === 'string' ? Buffer.from(chunk) : chunk
      length += bytes.length
      if (length > limit) {
        done()
        body.pause()
        reject(new errorCodes.FST_ERR_CTP_BODY_TOO_LARGE())
        return
      }
      chunks.push(bytes)
    }
    const onEnd = () => {
      done()
      const bytes = Buffer.concat(chunks, length)
      request.body = bytes
      resolve(() => { request.body = Readable.from([bytes], { objectMode: false }) })
    }
    const onError = (err: Error) => {
      done()
      reject(err)
    }
    function done () {
      body.off('data', onData)
      body.off('end', onEnd)
      body.off('error', onError)
    }
    if (body.readableEnded) return onEnd() // read already (by an earlier hook): no bytes left
    body.on('data', onData)
    body.once('end', onEnd)
    body.once('error', onError)
  })
}
