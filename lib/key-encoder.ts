/**
 * The default store key: a fixed prefix and a SHA-256 of the key's parts.
 * Store keys thus have a bounded length whatever the client sends, and no
 * client input can forge another key's separator. A store that never leaves
 * the process (the memory store) needs neither the bound nor the hash: it
 * gets the parts themselves, delimited the same way.
 */
import { hash } from 'node:crypto'
import type { KeyEncoder, KeyParts } from '../types/index.js'

export const KEY_PREFIX = 'idem:'

/**
 * The parts as one string, after `prefix`: every part but the last is
 * length-prefixed or free of '|', so no two sets of parts give the same string.
 *
 * Store keys are built by `join`, not `+`: V8 keeps a string made by `+` as a
 * tree of its pieces, and a store or cache that keeps the key (a Map key)
 * would keep the tree, several objects a record for the garbage collector to
 * copy, and walk it on every lookup. `join` writes one flat string.
 */
function joined (prefix: string, parts: KeyParts): string {
  const { scope, path } = parts
  return [prefix, scope === undefined ? '-' : scope.length + ':' + scope, '|', parts.method, '|', path.length, ':', path, '|', parts.key].join('')
}

export function defaultKeyEncoder (parts: KeyParts): string {
  return [KEY_PREFIX, hash('sha256', joined('', parts), 'base64url')].join('')
}

/** The default store key of a store in this process: the parts, unhashed (logs show a hash of it). */
export function localKeyEncoder (parts: KeyParts): string {
  return joined(KEY_PREFIX, parts)
}

/**
 * How logs name a store key: as it is when the default encoder made it (a
 * hash already), hashed when another encoder may have put the client's key
 * in it.
 */
export function logKeyFor (encoder: KeyEncoder): (storeKey: string) => string {
  if (encoder === defaultKeyEncoder) return (storeKey) => storeKey
  return (storeKey) => 'sha256:' + hash('sha256', storeKey, 'base64url')
}
