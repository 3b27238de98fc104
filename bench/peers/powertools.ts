/**
 * Powertools for AWS Lambda (TypeScript), idempotency utility, run inside a
 * Fastify route: `makeIdempotent` around a Lambda-style handler, with the
 * Redis persistence layer its docs show (`CachePersistenceLayer` on a
 * connected `@redis/client`), keyed on the Idempotency-Key header
 * (`eventKeyJmesPath`).
 *
 * Without payload validation: with `payloadValidationJmesPath` (the
 * counterpart of this plugin's fingerprint) every replay is refused, in
 * 2.35.0: `CachePersistenceLayer` writes the completed record without the
 * payload hash (`_updateRecord` keeps status, expiry and data only), so the
 * replay's hash never matches and the utility throws
 * IdempotencyValidationError. Validation off, replays work as documented.
 *
 * The route turns the request into an API Gateway-like event (headers and
 * the already parsed body) and passes a minimal fake Lambda context: what
 * `makeIdempotent` reads of it is `getRemainingTimeInMillis()`, for the
 * in-progress expiry.
 */
import { IdempotencyAlreadyInProgressError, IdempotencyConfig, IdempotencyValidationError, makeIdempotent } from '@aws-lambda-powertools/idempotency'
import { CachePersistenceLayer } from '@aws-lambda-powertools/idempotency/cache'
import { createClient } from '@redis/client'
import type { FastifyReply, FastifyRequest } from 'fastify'
import { KEY_HEADER, type OrderInput } from '../shared.js'

interface OrdersEvent {
  httpMethod: string
  path: string
  headers: Record<string, string | string[] | undefined>
  body: OrderInput
}

interface LambdaResult {
  statusCode: number
  headers: Record<string, string>
  body: string
}

/** What a Lambda context holds; only getRemainingTimeInMillis() is read by the utility. */
const fakeContext = {
  functionName: 'orders',
  functionVersion: '$LATEST',
  invokedFunctionArn: 'arn:aws:lambda:eu-west-1:123456789012:function:orders',
  memoryLimitInMB: '1024',
  awsRequestId: 'bench',
  logGroupName: '/aws/lambda/orders',
  logStreamName: 'bench',
  callbackWaitsForEmptyEventLoop: true,
  getRemainingTimeInMillis: () => 30_000
}

export async function powertoolsRoute (
  redisUrl: string,
  placeOrder: (body: OrderInput, key: unknown) => Record<string, unknown>,
  closers: Array<() => unknown>
): Promise<(request: FastifyRequest, reply: FastifyReply) => Promise<unknown>> {
  process.env.AWS_LAMBDA_FUNCTION_NAME ??= 'orders'
  const client = await createClient({ url: redisUrl }).connect()
  closers.push(() => client.close())
  const persistenceStore = new CachePersistenceLayer({ client })
  const config = new IdempotencyConfig({ eventKeyJmesPath: `headers."${KEY_HEADER}"` })

  const handler = makeIdempotent(async (event: OrdersEvent, _context: typeof fakeContext): Promise<LambdaResult> => {
    const order = placeOrder(event.body, event.headers[KEY_HEADER])
    return { statusCode: 201, headers: { 'content-type': 'application/json; charset=utf-8' }, body: JSON.stringify(order) }
  }, { persistenceStore, config })

  return async function orders (request, reply) {
    const event: OrdersEvent = { httpMethod: request.method, path: request.url, headers: request.headers, body: request.body as OrderInput }
    let result: LambdaResult
    try {
      result = await handler(event, fakeContext)
    } catch (err) {
      if (err instanceof IdempotencyAlreadyInProgressError) return reply.code(409).header('retry-after', '1').send({ message: err.message })
      if (err instanceof IdempotencyValidationError) return reply.code(422).send({ message: err.message })
      throw err
    }
    return reply.code(result.statusCode).headers(result.headers).send(result.body)
  }
}
