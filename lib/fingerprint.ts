/**
 * Request fingerprints: a key reused with a different request is an error
 * (422), so each claim saves a hash of what the request asked for.
 *
 * Whatever a parser put in `request.body`, the fingerprint describes it
 * without throwing, so a request runs as it would without a key. The body is
 * written as a canonical text: JSON where the body is JSON, and tokens that
 * start with `!` for what JSON cannot say:
 *
 *   !bigint(123)      a BigInt, in decimal
 *   !bytes(00ff)      a Buffer, typed array, DataView or ArrayBuffer: its bytes in hex
 *   !map[[k,v],…]     a Map: its entries, in insertion order
 *   !set[v,…]         a Set: its values, in insertion order
 *   !stream           an object (not a plain one) with a `pipe` or `getReader` function
 *   !ref[…]           an object or array already written: the keys and indexes from
 *                     the root to where it was first written (`!ref[]` is the root)
 *   !throws           a value whose reading threw (a getter, a toJSON, a Proxy trap)
 *
 * JSON has no `!` outside strings, so these never collide with JSON.
 */
import { createHash, hash, type Hash } from 'node:crypto'
import {
  isAnyArrayBuffer, isBigIntObject, isBooleanObject, isBoxedPrimitive, isMap, isNumberObject, isSet, isStringObject
} from 'node:util/types'
import type { FastifyRequest } from 'fastify'

/**
 * The default fingerprint: SHA-256 of the method, the URL with its query
 * string and the body. A string body is hashed as its text, a binary body as
 * its bytes, any other body as its canonical text (so a client that
 * serializes the same JSON again in another key order still matches).
 * Never throws.
 */
export function defaultFingerprint (request: FastifyRequest): string {
  return fingerprintOf(request, 0)
}

/** The longest text the local fingerprint keeps unhashed, in characters. */
export const LOCAL_TEXT = 128

/**
 * The default fingerprint for a store in this process (the memory store),
 * which never lets it out: the text that the default hashes, kept as it is
 * when it has at most LOCAL_TEXT characters (no SHA-256 to compute), and
 * hashed as by the default when it is longer, so that a record stays small.
 * A text holds a space and a line break and a hash never does, so the two
 * forms never match each other. Never throws.
 */
export function localFingerprint (request: FastifyRequest): string {
  return fingerprintOf(request, LOCAL_TEXT)
}

/** Whether `fingerprint` is the default, in either form: one that reads a streamed body whole first. */
export function isDefaultFingerprint (fingerprint: unknown): boolean {
  return fingerprint === defaultFingerprint || fingerprint === localFingerprint
}

/** The fingerprint of `request`: its text when at most `keep` characters long, its SHA-256 otherwise. */
function fingerprintOf (request: FastifyRequest, keep: number): string {
  let head: string
  try {
    head = request.method + ' ' + request.url + '\n'
  } catch {
    // Only a broken request object gets here: a constant still lets the request run and replay.
    return UNREADABLE_REQUEST
  }
  try {
    return fingerprintBody(head, request.body, keep)
  } catch {
    // A body that cannot even be read, or a canonical text longer than a string can be:
    // the body counts as `!throws`, and the request still runs and replays.
    return hash('sha256', head + 'j' + THROWS, 'base64url')
  }
}

const THROWS = '!throws'
const UNREADABLE_REQUEST = hash('sha256', THROWS, 'base64url')

function fingerprintBody (head: string, body: unknown, keep: number): string {
  if (body === undefined || body === null) return textOrHash(head, '', '', keep)
  if (typeof body === 'string') return textOrHash(head, 's', body, keep)
  if (ArrayBuffer.isView(body) || isAnyArrayBuffer(body)) {
    return createHash('sha256').update(head + 'b').update(bytesOf(body)).digest('base64url')
  }
  let incremental: Hash | undefined
  const rest = canonical(body, (chunk) => {
    incremental ??= createHash('sha256').update(head + 'j')
    incremental.update(chunk)
  })
  // A small body never fills a chunk: one one-shot hash, the fastest path.
  if (incremental === undefined) return textOrHash(head, 'j', rest, keep)
  return incremental.update(rest).digest('base64url')
}

/** `head + kind + text`, as it is when at most `keep` characters long (one flat string: see key-encoder.ts), hashed otherwise. */
function textOrHash (head: string, kind: string, text: string, keep: number): string {
  if (head.length + kind.length + text.length <= keep) return [head, kind, text].join('')
  return hash('sha256', head + kind + text, 'base64url')
}

/**
 * The canonical text of a value: for JSON values exactly what `JSON.stringify`
 * writes with object keys sorted (by UTF-16 code unit) at every depth; other
 * values as described at the top of this file. Throws only if the text is
 * longer than a string can be.
 */
export function canonicalJson (value: unknown): string {
  return canonical(value, undefined)
}

type Sink = (chunk: string) => void

/** Writes the canonical text of `value`, handing full chunks to `sink`, and returns the rest. */
function canonical (value: unknown, sink: Sink | undefined): string {
  // Most bodies are small trees of plain JSON: a short recursive walk writes them.
  const plain = smallPlainText(value)
  if (plain !== undefined) return plain
  // Otherwise the general walk, given up if it passes a budget of values.
  const first = new Writer(sink, undefined, BUDGET)
  const text = first.write(value)
  if (!first.overBudget) return text
  // A large body of plain JSON is written mostly by the engine's JSON.stringify, several times
  // faster. (Only an object or an array holds enough values to pass the budget.)
  return new Writer(sink, planPlainJson(value as object), Infinity).write(value)
}

/** Values the first walk writes before a body counts as large. */
const BUDGET = 2048
/** Text is handed to the hash in pieces of about this many characters. */
const CHUNK = 64 * 1024
/** At most this many values go to one JSON.stringify call… */
const LARGE = 1024
/** …counting this many for a container too small to have its size noted. */
const SMALL = 16
/** Containers nested deeper than this are not handed to JSON.stringify (it recurses). */
const DEEP = 64
/** Containers the walk searches for repeats before it indexes them in a Map. */
const SEARCHED = 16

/** Stands for a value whose reading threw. */
const THREW = Object.freeze({})
/** Characters JSON.stringify escapes in a string (a surrogate only when lone). */
// eslint-disable-next-line no-control-regex -- the control characters are what JSON escapes
const NEEDS_ESCAPE = /["\\\u0000-\u001f\ud800-\udfff]/

const mapEntries = Map.prototype.entries
const setValues = Set.prototype.values

/** A position: an object key (already quoted) or an array index. */
type Step = string | number

/** An object or array being written: the walk keeps these on its own stack instead of recursing. */
class Frame {
  index = 0
  written = 0
  constructor (
    readonly items: Record<string, unknown> | unknown[],
    /** The object's sorted keys; null for an array (or a Map's entries, a Set's values). */
    readonly keys: string[] | null,
    readonly length: number,
    /** The container's registration, for the `!ref` paths of what it holds. */
    readonly ordinal: number
  ) {}
}

class Writer {
  /** The walk gave up at its budget (only ever before handing anything to the sink). */
  overBudget = false
  private out = ''
  private values = 0
  private readonly stack: Frame[] = []
  /** By ordinal, every container written so far: a repeat or a cycle becomes `!ref`. */
  private readonly containers: object[] = []
  /** Ordinals by container, once there are too many containers to search. */
  private ordinals: Map<object, number> | undefined
  /** By ordinal: the parent's ordinal (-1 for the root) and the step from it. */
  private readonly parents: number[] = []
  private readonly steps: Step[] = []

  constructor (
    private readonly sink: Sink | undefined,
    private readonly plan: PlainJson | undefined,
    private budget: number
  ) {}

  /** Writes `root` and returns what was not handed to the sink ('' when over budget). */
  write (root: unknown): string {
    let value: unknown
    try {
      value = resolve(root, '')
    } catch {
      value = THREW
    }
    this.value(value, '', -1)
    const stack = this.stack
    while (stack.length > 0) {
      if (this.values > this.budget) {
        this.overBudget = true
        return ''
      }
      const frame = stack[stack.length - 1]
      if (frame.index === frame.length) {
        this.out += frame.keys === null ? ']' : '}'
        stack.pop()
        continue
      }
      const index = frame.index++
      if (frame.keys === null) {
        const items = frame.items as unknown[]
        const end = this.plan === undefined ? index : this.plan.batchEnd(items, index)
        // A run of small items in one JSON.stringify call; if it throws, they go one by one.
        const run = end > index + 1 ? stringify(items.slice(index, end), this.plan?.keys) : undefined
        if (run !== undefined) {
          this.out += (index > 0 ? ',' : '') + run.slice(1, -1)
          frame.index = end
        } else {
          let item: unknown
          try {
            item = resolve(items[index], index)
          } catch {
            item = THREW
          }
          if (index > 0) this.out += ','
          this.value(item, index, frame.ordinal)
        }
      } else {
        const key = frame.keys[index]
        let item: unknown
        try {
          item = resolve((frame.items as Record<string, unknown>)[key], key)
        } catch {
          item = THREW
        }
        // Left out, as JSON.stringify leaves them out.
        if (item === undefined || typeof item === 'function' || typeof item === 'symbol') continue
        const quoted = quoteKey(key)
        this.out += (frame.written++ === 0 ? quoted : ',' + quoted) + ':'
        this.value(item, quoted, frame.ordinal)
      }
      if (this.out.length >= CHUNK) this.flush()
    }
    return this.out
  }

  private flush (): void {
    if (this.sink === undefined) return
    this.sink(this.out)
    this.out = ''
    // What went to the sink cannot be taken back: this walk now goes to the end.
    this.budget = Infinity
  }

  private value (value: unknown, step: Step, parent: number): void {
    this.values++
    switch (typeof value) {
      case 'string': this.out += stringText(value); return
      case 'number': this.out += numberText(value); return
      case 'boolean': this.out += value ? 'true' : 'false'; return
      case 'bigint': this.out += '!bigint(' + value + ')'; return
      case 'object': if (value !== null) { this.object(value, step, parent); return } break
    }
    // null; and in arrays, Maps and Sets undefined, functions and symbols, as JSON.stringify writes them.
    this.out += 'null'
  }

  private object (value: object, step: Step, parent: number): void {
    if (value === THREW) {
      this.out += THROWS
      return
    }
    if (this.plan !== undefined && !this.plan.isLarge(value)) {
      this.out += stringify(value, this.plan.keys) ?? THROWS
      return
    }
    const earlier = this.ordinals === undefined ? this.containers.indexOf(value) : this.ordinals.get(value) ?? -1
    if (earlier !== -1) {
      this.out += '!ref' + this.path(earlier)
      return
    }
    // What can run the body's own code (getters, Proxy traps) comes before
    // anything is written, so a throw leaves a clean `!throws`.
    try {
      if (Array.isArray(value)) {
        this.open(value, value, null, value.length, step, parent, '[')
        return
      }
      if (ArrayBuffer.isView(value)) {
        this.bytes(bytesOf(value))
        return
      }
      const proto = Object.getPrototypeOf(value)
      if (proto !== Object.prototype && proto !== null && this.special(value, step, parent)) return
      const keys = Object.keys(value)
      sortKeys(keys)
      this.open(value, value as Record<string, unknown>, keys, keys.length, step, parent, '{')
    } catch {
      this.out += THROWS
    }
  }

  /** Writes the kinds only class instances can be; false for any other object. */
  private special (value: object, step: Step, parent: number): boolean {
    if (typeof (value as { pipe?: unknown }).pipe === 'function' || typeof (value as { getReader?: unknown }).getReader === 'function') {
      // A stream's bytes cannot be read here without consuming them.
      this.out += '!stream'
    } else if (isAnyArrayBuffer(value)) {
      this.bytes(bytesOf(value))
    } else if (isMap(value)) {
      // The real entries, whatever a subclass does to `entries`.
      const entries = Array.from(mapEntries.call(value))
      this.open(value, entries, null, entries.length, step, parent, '!map[')
    } else if (isSet(value)) {
      const values = Array.from(setValues.call(value))
      this.open(value, values, null, values.length, step, parent, '!set[')
    } else if (isBoxedPrimitive(value)) {
      // Unwrapped as JSON.stringify unwraps them; a boxed Symbol stays an object.
      if (isNumberObject(value)) this.value(Number.prototype.valueOf.call(value), step, parent)
      else if (isStringObject(value)) this.value(String.prototype.valueOf.call(value), step, parent)
      else if (isBooleanObject(value)) this.value(Boolean.prototype.valueOf.call(value), step, parent)
      else if (isBigIntObject(value)) this.value(BigInt.prototype.valueOf.call(value), step, parent)
      else return false
    } else {
      return false
    }
    return true
  }

  private open (container: object, items: Record<string, unknown> | unknown[], keys: string[] | null, length: number, step: Step, parent: number, opening: string): void {
    const ordinal = this.containers.length
    this.containers.push(container)
    if (this.ordinals !== undefined) {
      this.ordinals.set(container, ordinal)
    } else if (ordinal === SEARCHED) {
      // A small body's few containers are cheaper to search than to put in a Map.
      this.ordinals = new Map()
      for (let i = 0; i <= ordinal; i++) this.ordinals.set(this.containers[i], i)
    }
    this.parents.push(parent)
    this.steps.push(step)
    this.stack.push(new Frame(items, keys, length, ordinal))
    this.out += opening
  }

  /** `[steps]` from the root to the container registered as `ordinal`. */
  private path (ordinal: number): string {
    const steps: Step[] = []
    for (let at = ordinal; this.parents[at] !== -1; at = this.parents[at]) steps.push(this.steps[at])
    return '[' + steps.reverse().join(',') + ']'
  }

  private bytes (bytes: Buffer): void {
    this.out += '!bytes('
    // Hex in slices, so a large file part reaches the hash chunk by chunk.
    const slice = CHUNK / 2
    for (let start = 0; start < bytes.length; start += slice) {
      this.out += bytes.toString('hex', start, Math.min(start + slice, bytes.length))
      if (this.out.length >= CHUNK) this.flush()
    }
    this.out += ')'
  }
}

/** Limits of the walk for small plain bodies: containers (so also depth), keys of an object, items of an array. */
const SMALL_CONTAINERS = 16
const SMALL_KEYS = 32
const SMALL_ITEMS = 64

/**
 * The canonical text of a small tree of plain JSON (ordinary objects and
 * arrays, strings, finite or non-finite numbers, booleans, null, undefined
 * where JSON.stringify skips it), exactly as the general walk writes it; or
 * undefined for anything else, and the general walk writes it: a toJSON, a
 * class instance, bytes, a BigInt, a container met twice, or more than the
 * small limits. A getter or a Proxy trap that throws is read again there.
 */
function smallPlainText (value: unknown): string | undefined {
  if (typeof value !== 'object' || value === null) return undefined
  try {
    // The containers entered so far, to give up on a repeat.
    return smallText(value, [])
  } catch {
    return undefined
  }
}

function smallText (value: unknown, seen: object[]): string | undefined {
  switch (typeof value) {
    case 'string': return stringText(value)
    case 'number': return numberText(value)
    case 'boolean': return value ? 'true' : 'false'
    case 'object': break
    default: return undefined // undefined only where an object skips it (see below); a BigInt, a function or a symbol
  }
  if (value === null) return 'null'
  if (seen.length === SMALL_CONTAINERS || seen.includes(value)) return undefined
  seen.push(value)
  if (typeof (value as { toJSON?: unknown }).toJSON === 'function') return undefined
  if (Array.isArray(value)) {
    if (value.length > SMALL_ITEMS) return undefined
    let out = '['
    for (let i = 0; i < value.length; i++) {
      const item: unknown = value[i]
      const text = item === undefined ? 'null' : smallText(item, seen)
      if (text === undefined) return undefined
      out += i === 0 ? text : ',' + text
    }
    return out + ']'
  }
  const proto: unknown = Object.getPrototypeOf(value)
  if (proto !== Object.prototype && proto !== null) return undefined
  const keys = Object.keys(value)
  if (keys.length > SMALL_KEYS) return undefined
  sortKeys(keys)
  let out = '{'
  for (let i = 0; i < keys.length; i++) {
    const key = keys[i]
    const item: unknown = (value as Record<string, unknown>)[key]
    if (item === undefined) continue
    const text = smallText(item, seen)
    if (text === undefined) return undefined
    out += (out.length === 1 ? quoteKey(key) : ',' + quoteKey(key)) + ':' + text
  }
  return out + '}'
}

/**
 * What a survey of a large body found, when the body is plain JSON: a tree
 * (no object twice) of ordinary objects and arrays holding strings, numbers,
 * booleans and null. Given the keys of the small objects, sorted,
 * JSON.stringify writes exactly the canonical text of any small part of it;
 * the walk writes the large containers around those parts.
 */
class PlainJson {
  constructor (
    readonly keys: string[],
    /** Values held, for the containers holding more than SMALL (Infinity: too deep for JSON.stringify). */
    private readonly sizes: Map<object, number>
  ) {}

  /** Whether the walk writes this container itself, so that no string handed on gets large or deep. */
  isLarge (container: object): boolean {
    return (this.sizes.get(container) ?? 0) > LARGE
  }

  /** The end of the run of items from `start` small enough together for one JSON.stringify call. */
  batchEnd (items: unknown[], start: number): number {
    let total = 0
    let end = start
    while (end < items.length) {
      const item = items[end]
      total += typeof item === 'object' && item !== null ? this.sizes.get(item) ?? SMALL : 1
      if (total > LARGE) break
      end++
    }
    return end
  }
}

/** A container being surveyed: how many values it holds and how deep, once its frame is done. */
class SurveyFrame {
  index = 0
  size = 1
  height = 1
  constructor (
    readonly container: object,
    readonly keys: string[] | null,
    readonly length: number
  ) {}
}

/** A plan for `value` if it is plain JSON that JSON.stringify can write cheaply; otherwise undefined. */
function planPlainJson (value: object): PlainJson | undefined {
  try {
    return survey(value)
  } catch {
    // A getter or a Proxy trap threw: the general walk writes `!throws` where it did.
    return undefined
  }
}

function survey (root: object): PlainJson | undefined {
  const seen = new Set<object>()
  const sizes = new Map<object, number>()
  const stack: SurveyFrame[] = []
  /** The keys of the objects JSON.stringify will write (the walk writes the large ones). */
  const names = new Set<string>()
  let objects = 0
  let properties = 0
  /** JSON.stringify calls at most: one per item of a large container. */
  let pieces = 0
  let values = 0

  // JSON.stringify reads the keys it is given once per call, and looks each one up in
  // every object: with many distinct keys, most of them absent, the general walk is faster.
  const tooManyNames = (): boolean => objects * names.size > 8 * properties + 4096

  /** Pushes a frame for `value`, or says it is not plain. */
  function enter (value: object): boolean {
    if (seen.has(value)) return false
    seen.add(value)
    if (Array.isArray(value)) {
      // Its toJSON might return what JSON.stringify cannot write as the walk does.
      if (typeof (value as { toJSON?: unknown }).toJSON === 'function') return false
      stack.push(new SurveyFrame(value, null, value.length))
      return true
    }
    const proto = Object.getPrototypeOf(value)
    if (proto !== Object.prototype && proto !== null) return false
    const keys = Object.keys(value)
    // JSON.stringify would read `__proto__` from the objects that lack it: their prototype.
    if (keys.includes('__proto__')) return false
    stack.push(new SurveyFrame(value, keys, keys.length))
    return true
  }

  if (!enter(root)) return undefined
  while (stack.length > 0) {
    const frame = stack[stack.length - 1]
    if (frame.index === frame.length) {
      stack.pop()
      if (frame.height > DEEP || frame.size > LARGE) {
        sizes.set(frame.container, frame.height > DEEP ? Infinity : frame.size)
        pieces += frame.length
      } else {
        if (frame.size > SMALL) sizes.set(frame.container, frame.size)
        if (frame.keys !== null) {
          objects++
          properties += frame.keys.length
          for (let i = 0; i < frame.keys.length; i++) names.add(frame.keys[i])
          if (names.size > 4096 && tooManyNames()) return undefined
        }
      }
      const parent = stack[stack.length - 1]
      if (parent === undefined) {
        values = frame.size
      } else {
        parent.size += frame.size
        if (frame.height >= parent.height) parent.height = frame.height + 1
      }
      continue
    }
    const index = frame.index++
    const item = frame.keys === null
      ? (frame.container as unknown[])[index]
      : (frame.container as Record<string, unknown>)[frame.keys[index]]
    if (typeof item === 'object' && item !== null) {
      if (!enter(item)) return undefined
    } else if (typeof item === 'bigint' || typeof item === 'function') {
      return undefined
    } else {
      frame.size++
    }
  }
  if (tooManyNames() || pieces * names.size > 16 * values + 65536) return undefined
  return new PlainJson([...names].sort(), sizes)
}

/**
 * The value JSON.stringify would write: the result of its toJSON, called with
 * the key as JSON.stringify calls it. Bytes keep their own form (a Buffer's
 * toJSON spells every byte as a number), and so does a BigInt (a global BigInt
 * toJSON would make 1n and "1" the same). What toJSON returns is not asked
 * again, as in JSON.stringify (a toJSON returning `this` would loop).
 */
function resolve (value: unknown, key: Step): unknown {
  if (typeof value !== 'object' || value === null || ArrayBuffer.isView(value)) return value
  const toJSON = (value as { toJSON?: unknown }).toJSON
  if (typeof toJSON !== 'function') return value
  return toJSON.call(value, typeof key === 'number' ? '' + key : key) as unknown
}

/** JSON.stringify, or undefined if a getter or a Proxy trap throws this time (the survey read them once). */
function stringify (value: unknown, keys: string[] | undefined): string | undefined {
  try {
    return JSON.stringify(value, keys)
  } catch {
    return undefined
  }
}

function bytesOf (value: ArrayBufferView | ArrayBufferLike): Buffer {
  return ArrayBuffer.isView(value)
    ? Buffer.from(value.buffer, value.byteOffset, value.byteLength)
    : Buffer.from(value)
}

/** A string as JSON.stringify writes it: most need no escaping, and get their quotes without a call into the engine. */
function stringText (value: string): string {
  return NEEDS_ESCAPE.test(value) ? JSON.stringify(value) : '"' + value + '"'
}

/** A number as JSON.stringify writes it. */
function numberText (value: number): string {
  return Number.isFinite(value) ? '' + value : 'null'
}

/** Objects with up to this many keys have them sorted in place; Array#sort copies them first. */
const SORTED_IN_PLACE = 32

/** Sorts object keys by UTF-16 code unit, as Array#sort does. Keys are unique, so the order is total. */
function sortKeys (keys: string[]): void {
  if (keys.length > SORTED_IN_PLACE) {
    keys.sort()
    return
  }
  // Insertion sort: a single pass when the client sent the keys in order already.
  for (let i = 1; i < keys.length; i++) {
    const key = keys[i]
    let j = i - 1
    while (j >= 0 && keys[j] > key) {
      keys[j + 1] = keys[j]
      j--
    }
    keys[j + 1] = key
  }
}

/** Quoted object keys: the bodies of one API repeat the same few keys. Bounded. */
const quotedKeys = new Map<string, string>()

function quoteKey (key: string): string {
  let quoted = quotedKeys.get(key)
  if (quoted === undefined) {
    quoted = JSON.stringify(key)
    if (quotedKeys.size < 1024) quotedKeys.set(key, quoted)
  }
  return quoted
}
