/** A worker's expanded identities, least recently used first out, bounded by their memory. */
import type { Identity } from '../identity.js'

export class IdentityCache {
  readonly #entries = new Map<string, Identity>()
  #bytes = 0

  constructor(readonly maxBytes: number) {}

  get bytes(): number {
    return this.#bytes
  }

  get(id: string): Identity | undefined {
    const identity = this.#entries.get(id)
    if (identity) {
      // Map keeps insertion order: re-inserting makes it the most recently used.
      this.#entries.delete(id)
      this.#entries.set(id, identity)
    }
    return identity
  }

  /** Adds `identity`, then drops the least recently used ones until the total fits (the newest
   * stays even when it alone is larger: the batch that asked for it needs it). Dropped
   * identities free their native memory when no running batch holds them any more. */
  set(id: string, identity: Identity): void {
    if (this.#entries.has(id)) return
    this.#entries.set(id, identity)
    this.#bytes += identity.sizeBytes
    for (const [old, held] of this.#entries) {
      if (this.#bytes <= this.maxBytes || old === id) break
      this.#entries.delete(old)
      this.#bytes -= held.sizeBytes
    }
  }
}
