/**
 * Reading the client's key from the request header: a bare token or a
 * structured-field string (`"abc"`, as the IETF Idempotency-Key draft writes
 * it), validated against the key rules. Anything else is a 400.
 */
import { KeyInvalidError } from './errors.js'

export interface KeyRules {
  header: string
  maxLength: number
  pattern: RegExp | undefined
  uuid: boolean
}

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i
const QUOTE = 34
const BACKSLASH = 92
const COMMA = 44
const SPACE = 32
const TAB = 9

/** Returns the key carried by `raw`, or throws `FST_IDEMPOTENCY_KEY_INVALID` saying why it is unusable. */
export function parseKey (raw: string | string[], rules: KeyRules): string {
  if (typeof raw !== 'string') throw new KeyInvalidError(rules.header, 'the header was sent more than once')
  // A quoted key may double in length through escapes; anything longer is rejected before it is scanned.
  if (raw.length > 2 * rules.maxLength + 16) throw tooLong(rules)
  const value = trimOws(raw)
  if (value.length === 0) throw new KeyInvalidError(rules.header, 'the key is empty')
  const key = value.charCodeAt(0) === QUOTE ? unquote(value, rules) : bareToken(value, rules)
  if (key.length === 0) throw new KeyInvalidError(rules.header, 'the key is empty')
  if (key.length > rules.maxLength) throw tooLong(rules)
  if (rules.uuid && !UUID.test(key)) throw new KeyInvalidError(rules.header, 'the key must be a UUID')
  if (rules.pattern !== undefined && !rules.pattern.test(key)) {
    throw new KeyInvalidError(rules.header, `the key does not match ${rules.pattern}`)
  }
  return key
}

function bareToken (value: string, rules: KeyRules): string {
  for (let i = 0; i < value.length; i++) {
    const c = value.charCodeAt(i)
    if (c === COMMA) {
      throw new KeyInvalidError(rules.header, 'a comma is ambiguous (the header may have been sent more than once); quote the key as "..." if it contains one')
    }
    if (c < 0x21 || c > 0x7e) {
      throw new KeyInvalidError(rules.header, 'the key may hold only visible ASCII characters, without spaces, unless it is quoted')
    }
  }
  return value
}

/** Decodes an RFC 8941 sf-string: printable ASCII, with `\"` and `\\` as the only escapes. */
function unquote (value: string, rules: KeyRules): string {
  let key = ''
  let start = 1
  for (let i = 1; i < value.length; i++) {
    const c = value.charCodeAt(i)
    if (c === QUOTE) {
      if (i !== value.length - 1) {
        const rest = value.slice(i + 1).trimStart()
        throw new KeyInvalidError(rules.header, rest.charCodeAt(0) === COMMA
          ? 'the header was sent more than once'
          : 'unexpected characters after the quoted key')
      }
      return key + value.slice(start, i)
    }
    if (c === BACKSLASH) {
      const next = value.charCodeAt(i + 1)
      if (next !== QUOTE && next !== BACKSLASH) {
        throw new KeyInvalidError(rules.header, 'only \\" and \\\\ may be escaped in a quoted key')
      }
      key += value.slice(start, i)
      start = ++i
    } else if (c < 0x20 || c > 0x7e) {
      throw new KeyInvalidError(rules.header, 'the key may hold only printable ASCII characters')
    }
  }
  throw new KeyInvalidError(rules.header, 'the quoted key has no closing quote')
}

/**
 * Strips SP and HTAB, the only whitespace HTTP allows around a field value
 * (RFC 9110 OWS). `trim()` would also strip U+00A0, line breaks and other
 * characters, accepting a header that holds them as the key without them.
 */
function trimOws (raw: string): string {
  let start = 0
  let end = raw.length
  while (start < end && isOws(raw.charCodeAt(start))) start++
  while (end > start && isOws(raw.charCodeAt(end - 1))) end--
  return raw.slice(start, end)
}

function isOws (c: number): boolean {
  return c === SPACE || c === TAB
}

function tooLong (rules: KeyRules): Error {
  return new KeyInvalidError(rules.header, `the key is longer than ${rules.maxLength} characters`)
}
