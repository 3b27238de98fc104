/**
 * The behaviour every IdempotencyStore must have, as one suite that runs
 * against the memory store, RedisStore on one Redis and on a Redis Cluster,
 * and PostgresStore.
 */
import type { Test } from 'tap'
import type { IdempotencyStore, StoredResponse } from '../../types/index.js'

export interface ContractTarget {
  /** A store whose keys no other test sees. */
  create (): IdempotencyStore | Promise<IdempotencyStore>
  /** Lets `ms` of the store's clock pass (an injected clock, or real time). */
  advance (ms: number): Promise<void>
  /** A lock or record lifetime that expires after `advance(2 * short)` and not before a few store calls. */
  short: number
  /** Whether completed records carry `expiresIn` (checked when given). */
  expiresIn?: boolean
  /** Whether the store has `lookup` (checked when given as false). */
  lookup?: boolean
}

const LONG = 60_000

/** Every byte value, so an encoding that is not byte-safe shows up. */
export const BINARY = Buffer.from(Array.from({ length: 512 }, (_, i) => (i * 7) % 256))

export function sampleResponse (body: Buffer = BINARY): StoredResponse {
  return {
    statusCode: 201,
    headers: {
      'content-type': 'application/octet-stream',
      'x-multi': ['one', 'two, with a comma', 'thrée'],
      'x-empty': ''
    },
    body
  }
}

/** A JSON body, as a string: what most replies carry. */
export const TEXT = '{"id":"pay_1","note":"naïve € ✓ \\u0000"}'

async function claimToken (t: Test, store: IdempotencyStore, key: string, fingerprint: string | undefined, lockTtl: number): Promise<string> {
  const result = await store.claim(key, fingerprint, lockTtl)
  t.type(result.token, 'string', `${key} is claimed`)
  t.equal(result.record, undefined)
  return result.token as string
}

export function storeContract (t: Test, target: ContractTarget): void {
  const { advance, short } = target

  t.test('a free key is claimed; claiming it again returns the in-flight record and its fingerprint', async (t) => {
    const store = await target.create()
    const token = await claimToken(t, store, 'k1', 'fp-1', LONG)
    t.ok(token.length > 0)
    t.strictSame(await store.claim('k1', 'fp-1', LONG), { record: { state: 'in-flight', fingerprint: 'fp-1' } })
    t.strictSame(await store.claim('k1', 'fp-other', LONG), { record: { state: 'in-flight', fingerprint: 'fp-1' } },
      'a different fingerprint gets the record too: comparing is the caller\'s job')

    await claimToken(t, store, 'k2', undefined, LONG)
    t.strictSame(await store.claim('k2', 'fp-2', LONG), { record: { state: 'in-flight', fingerprint: undefined } },
      'a claim without fingerprint keeps none')
  })

  t.test('keys are independent, including one that extends another', async (t) => {
    const store = await target.create()
    const a = await claimToken(t, store, 'idem:abc', 'fp', LONG)
    const b = await claimToken(t, store, 'idem:abcd', 'fp', LONG)
    const c = await claimToken(t, store, 'idem:ab', 'fp', LONG)
    t.equal(new Set([a, b, c]).size, 3, 'every claim has its own token')
    t.equal(await store.complete('idem:abcd', a, sampleResponse(), LONG), false, 'a token only works for its own key')
    t.equal(await store.complete('idem:abcd', b, sampleResponse(), LONG), true)
    t.match(await store.claim('idem:abc', 'fp', LONG), { record: { state: 'in-flight' } })
  })

  t.test('complete with the claim token saves the response byte for byte', async (t) => {
    const store = await target.create()
    const token = await claimToken(t, store, 'k', 'fp', LONG)
    t.equal(await store.complete('k', token, sampleResponse(), LONG), true)
    const { record, token: again } = await store.claim('k', 'fp', LONG)
    t.equal(again, undefined, 'a completed key cannot be claimed')
    t.equal(record?.state, 'completed')
    t.equal(record?.fingerprint, 'fp')
    if (record?.state !== 'completed') throw new Error('not completed')
    t.equal(record.response.statusCode, 201)
    t.strictSame(record.response.headers, sampleResponse().headers, 'headers, multi-value ones included')
    t.ok(Buffer.isBuffer(record.response.body), 'the body is a Buffer')
    t.ok(Buffer.isBuffer(record.response.body) && record.response.body.equals(BINARY), 'the body is the same bytes')

    t.equal(await store.complete('k', token, sampleResponse(Buffer.from('second')), LONG), false, 'a completed claim cannot be completed again')
    t.equal(await store.release('k', token), false, 'nor released')
    t.equal(await store.renew('k', token, LONG), false, 'nor renewed')
    const after = await store.claim('k', 'fp', LONG)
    t.ok(after.record?.state === 'completed' && Buffer.isBuffer(after.record.response.body) && after.record.response.body.equals(BINARY), 'the first response stays')
  })

  t.test('an empty body and a record without fingerprint survive the round trip', async (t) => {
    const store = await target.create()
    const token = await claimToken(t, store, 'empty', undefined, LONG)
    t.equal(await store.complete('empty', token, { statusCode: 204, headers: {}, body: Buffer.alloc(0) }, LONG), true)
    const { record } = await store.claim('empty', 'fp', LONG)
    t.equal(record?.state, 'completed')
    t.equal(record?.fingerprint, undefined)
    if (record?.state !== 'completed') throw new Error('not completed')
    t.equal(record.response.statusCode, 204)
    t.strictSame(record.response.headers, {})
    t.ok(Buffer.isBuffer(record.response.body))
    t.equal(record.response.body.length, 0)
  })

  t.test('a wrong token can neither complete, release nor renew, and changes nothing', async (t) => {
    const store = await target.create()
    const token = await claimToken(t, store, 'k', 'fp', short)
    t.equal(await store.complete('k', 'not-the-token', sampleResponse(), LONG), false)
    t.equal(await store.release('k', 'not-the-token'), false)
    t.equal(await store.renew('k', 'not-the-token', LONG), false)
    t.strictSame(await store.claim('k', 'fp', LONG), { record: { state: 'in-flight', fingerprint: 'fp' } }, 'still in flight')
    await advance(short * 2)
    t.type((await store.claim('k', 'fp', LONG)).token, 'string', 'the wrong renew did not extend the claim')

    t.equal(await store.complete('never-claimed', token, sampleResponse(), LONG), false, 'nothing to complete')
    t.equal(await store.release('never-claimed', token), false, 'nothing to release')
    t.equal(await store.renew('never-claimed', token, LONG), false, 'nothing to renew')
    t.type((await store.claim('never-claimed', 'fp', LONG)).token, 'string', 'the refused calls created nothing')
  })

  t.test('release frees the key; the next claim gets a new token and the old one is dead', async (t) => {
    const store = await target.create()
    const first = await claimToken(t, store, 'k', 'fp-1', LONG)
    t.equal(await store.release('k', first), true)
    t.equal(await store.release('k', first), false, 'a released claim is gone')
    const second = await claimToken(t, store, 'k', 'fp-2', LONG)
    t.not(second, first)
    t.equal(await store.complete('k', first, sampleResponse(), LONG), false, 'the released token cannot complete')
    t.equal(await store.release('k', first), false, 'nor release')
    t.equal(await store.renew('k', first, LONG), false, 'nor renew')
    t.strictSame(await store.claim('k', 'fp-2', LONG), { record: { state: 'in-flight', fingerprint: 'fp-2' } },
      'the new claim holds, with its own fingerprint')
    t.equal(await store.complete('k', second, sampleResponse(), LONG), true)
  })

  t.test('renew extends the claim to lockTtl from now', async (t) => {
    const store = await target.create()
    const token = await claimToken(t, store, 'k', 'fp', short)
    t.equal(await store.renew('k', token, LONG), true)
    await advance(short * 2)
    t.strictSame(await store.claim('k', 'fp', LONG), { record: { state: 'in-flight', fingerprint: 'fp' } }, 'still held after the first lockTtl')
    t.equal(await store.complete('k', token, sampleResponse(), LONG), true, 'and the owner can still complete it')

    const other = await claimToken(t, store, 'k2', 'fp', LONG)
    t.equal(await store.renew('k2', other, short), true, 'renew sets the lease, it can shorten it too')
    await advance(short * 2)
    t.type((await store.claim('k2', 'fp', LONG)).token, 'string')
  })

  t.test('an expired lock can be claimed again; the stale owner is refused everything', async (t) => {
    const store = await target.create()
    const stale = await claimToken(t, store, 'k', 'fp-old', short)
    await advance(short * 2)
    t.equal(await store.renew('k', stale, LONG), false, 'an expired claim cannot be renewed')
    t.equal(await store.complete('k', stale, sampleResponse(), LONG), false, 'nor completed')
    const fresh = await claimToken(t, store, 'k', 'fp-new', LONG)
    t.not(fresh, stale)
    t.equal(await store.complete('k', stale, sampleResponse(), LONG), false, 'the stale owner cannot complete')
    t.equal(await store.release('k', stale), false, 'nor release')
    t.equal(await store.renew('k', stale, LONG), false, 'nor renew')
    t.strictSame(await store.claim('k', 'fp-new', LONG), { record: { state: 'in-flight', fingerprint: 'fp-new' } })
    t.equal(await store.complete('k', fresh, sampleResponse(), LONG), true, 'the new owner can')
    t.equal((await store.claim('k', 'fp-new', LONG)).record?.state, 'completed')
  })

  t.test('a completed record expires after ttl', async (t) => {
    const store = await target.create()
    const token = await claimToken(t, store, 'k', 'fp', LONG)
    t.equal(await store.complete('k', token, sampleResponse(), short), true)
    t.equal((await store.claim('k', 'fp', LONG)).record?.state, 'completed')
    await advance(short * 2)
    const again = await claimToken(t, store, 'k', 'fp', LONG)
    t.not(again, token)
  })

  t.test('ttl null never expires, even when the claim had a short lock', async (t) => {
    const store = await target.create()
    const token = await claimToken(t, store, 'k', 'fp', short)
    t.equal(await store.complete('k', token, sampleResponse(), null), true)
    await advance(short * 3)
    const { record } = await store.claim('k', 'fp', LONG)
    t.equal(record?.state, 'completed')
  })

  t.test('a completed record takes ttl, not what is left of the lock', async (t) => {
    const store = await target.create()
    const token = await claimToken(t, store, 'k', 'fp', short)
    t.equal(await store.complete('k', token, sampleResponse(), LONG), true)
    await advance(short * 2)
    t.equal((await store.claim('k', 'fp', LONG)).record?.state, 'completed')
  })

  t.test('concurrent claims of one key: exactly one wins', async (t) => {
    const store = await target.create()
    const results = await Promise.all(Array.from({ length: 25 }, () => store.claim('hot', 'fp', LONG)))
    const winners = results.filter((result) => result.token !== undefined)
    t.equal(winners.length, 1, 'one claim holds the key')
    for (const result of results) {
      if (result.token === undefined) t.strictSame(result, { record: { state: 'in-flight', fingerprint: 'fp' } })
    }
  })

  t.test('tokens are decimal integers, strictly increasing across successive claims of one key', async (t) => {
    const store = await target.create()
    const tokens: bigint[] = []
    const take = async (fingerprint: string, lockTtl: number) => {
      const token = await claimToken(t, store, 'seq', fingerprint, lockTtl)
      t.match(token, /^[1-9][0-9]*$/, `token ${token} is a decimal integer`)
      tokens.push(BigInt(token))
      return token
    }
    await store.release('seq', await take('a', LONG))
    const expiring = await take('b', short)
    await advance(short * 2)
    t.equal(await store.complete('seq', expiring, sampleResponse(), LONG), false, 'the expired claim is gone')
    const completed = await take('c', LONG)
    t.equal(await store.complete('seq', completed, sampleResponse(), short), true)
    await advance(short * 2)
    await take('d', LONG)
    for (let i = 1; i < tokens.length; i++) t.ok(tokens[i] > tokens[i - 1], `claim ${i + 1} (${tokens[i]}) > claim ${i} (${tokens[i - 1]})`)
  })

  t.test('a string body comes back as the same string, a Buffer body as the same bytes', async (t) => {
    const store = await target.create()
    const text = await claimToken(t, store, 'text', 'fp', LONG)
    t.equal(await store.complete('text', text, { statusCode: 200, headers: { 'content-type': 'application/json' }, body: TEXT }, LONG), true)
    const bytes = await claimToken(t, store, 'bytes', 'fp', LONG)
    t.equal(await store.complete('bytes', bytes, sampleResponse(BINARY), LONG), true)
    const empty = await claimToken(t, store, 'empty-string', 'fp', LONG)
    t.equal(await store.complete('empty-string', empty, { statusCode: 200, headers: {}, body: '' }, LONG), true)

    const asText = await store.claim('text', 'fp', LONG)
    t.ok(asText.record?.state === 'completed' && asText.record.response.body === TEXT, 'the string, as a string')
    const asBytes = await store.claim('bytes', 'fp', LONG)
    t.ok(asBytes.record?.state === 'completed' && Buffer.isBuffer(asBytes.record.response.body) && asBytes.record.response.body.equals(BINARY), 'the bytes, as a Buffer')
    const asEmpty = await store.claim('empty-string', 'fp', LONG)
    t.ok(asEmpty.record?.state === 'completed' && asEmpty.record.response.body === '', 'an empty string stays an empty string')
  })

  t.test('a completed record tells how long it still lives, when the store can tell', async (t) => {
    const store = await target.create()
    const token = await claimToken(t, store, 'k', 'fp', short)
    t.equal(await store.complete('k', token, sampleResponse(), LONG), true)
    const { record } = await store.claim('k', 'fp', LONG)
    if (record?.state !== 'completed') throw new Error('not completed')
    if (record.expiresIn !== undefined) {
      t.ok(record.expiresIn > LONG - 5000 && record.expiresIn <= LONG, `expiresIn ${record.expiresIn} is what is left of ttl`)
    }
    const forever = await claimToken(t, store, 'forever', 'fp', short)
    t.equal(await store.complete('forever', forever, sampleResponse(), null), true)
    const kept = await store.claim('forever', 'fp', LONG)
    if (kept.record?.state !== 'completed') throw new Error('not completed')
    if (kept.record.expiresIn !== undefined) t.equal(kept.record.expiresIn, Infinity, 'ttl null: Infinity')
    t.ok(target.expiresIn === undefined || (record.expiresIn !== undefined) === target.expiresIn,
      `this store ${target.expiresIn === true ? 'tells' : 'does not tell'} expiresIn`)
  })

  t.test('lookup reads a record without writing anything', async (t) => {
    const store = await target.create()
    if (store.lookup === undefined) {
      t.equal(target.lookup, false, 'this store has no lookup')
      return
    }
    t.equal(await store.lookup('absent'), undefined, 'absent: undefined')
    t.type((await store.claim('absent', 'fp', LONG)).token, 'string', 'and the lookup created nothing')
    const token = await claimToken(t, store, 'k', 'fp', short)
    t.strictSame(await store.lookup('k'), { state: 'in-flight', fingerprint: 'fp' }, 'in flight')
    t.equal(await store.complete('k', token, sampleResponse(), LONG), true)
    const found = await store.lookup('k')
    t.ok(found?.state === 'completed' && found.fingerprint === 'fp' && Buffer.isBuffer(found.response.body) && found.response.body.equals(BINARY), 'completed, with its response')
    const expiring = await claimToken(t, store, 'expiring', undefined, short)
    t.strictSame(await store.lookup('expiring'), { state: 'in-flight', fingerprint: undefined })
    await advance(short * 2)
    t.equal(await store.lookup('expiring'), undefined, 'an expired claim is absent')
    t.equal(await store.complete('expiring', expiring, sampleResponse(), LONG), false)
  })
}
