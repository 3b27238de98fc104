/**
 * The default store key: a fixed prefix and a SHA-256 of the key's parts.
 * Store keys thus have a bounded length whatever the client sends, and no
 * client input can forge another key's separator.
 */
import { hash } from 'node:crypto'
import type { KeyEncoder, KeyParts } from '../types/index.js'

export const KEY_PREFIX = 'idem:'

export function defaultKeyEncoder (parts: KeyParts): string {
  // Every part but the last is length-prefixed or free of '|', so no two
  // different sets of parts give the same string.
  const scope = parts.scope === undefined ? '-' : parts.scope.length + ':' + parts.scope
  const input = scope + '|' + parts.method + '|' + parts.path.length + ':' + parts.path + '|' + parts.key
  return KEY_PREFIX + hash('sha256', input, 'base64url')
}

/**
 * How logs name a store key: as it is when the default encoder made it (a
 * hash already), hashed when a custom encoder may have put the client's key
 * in it.
 */
export function logKeyFor (encoder: KeyEncoder): (storeKey: string) => string {
  if (encoder === defaultKeyEncoder) return (storeKey) => storeKey
  return (storeKey) => 'sha256:' + hash('sha256', storeKey, 'base64url')
}
