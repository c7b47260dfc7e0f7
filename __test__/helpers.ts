import * as fs from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'

import { expect } from 'vitest'

import type * as Binding from '../index.js'
import { HyperLoraError } from '../src/index.js'
import { native } from '../src/native.js'

export function tempDir(prefix: string): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), `hyperlora-${prefix}-`))
}

/** A valid safetensors file whose one tensor spans `dataBytes` bytes (sparse: instant to make). */
export function sparseSafetensors(file: string, dataBytes: number): string {
  const header = Buffer.from(JSON.stringify({ x: { dtype: 'U8', shape: [dataBytes], data_offsets: [0, dataBytes] } }))
  const length = Buffer.alloc(8)
  length.writeBigUInt64LE(BigInt(header.length))
  fs.writeFileSync(file, Buffer.concat([length, header]))
  fs.truncateSync(file, 8 + header.length + dataBytes)
  return file
}

/** A small valid safetensors file with two tensors and metadata. */
export function smallSafetensors(file: string): Buffer {
  const header = Buffer.from(
    JSON.stringify({
      __metadata__: { format: 'pt' },
      weight: { dtype: 'F32', shape: [2, 2], data_offsets: [0, 16] },
      bias: { dtype: 'F16', shape: [2], data_offsets: [16, 20] },
    }),
  )
  const length = Buffer.alloc(8)
  length.writeBigUInt64LE(BigInt(header.length))
  const bytes = Buffer.concat([length, header, Buffer.alloc(20, 1)])
  fs.writeFileSync(file, bytes)
  return bytes
}

/** The error a promise rejects with, which must be a `HyperLoraError`. */
export async function rejection(promise: Promise<unknown>): Promise<HyperLoraError> {
  const error = await promise.then(
    () => {
      throw new Error('expected a rejection')
    },
    (e: unknown) => e,
  )
  expect(error).toBeInstanceOf(HyperLoraError)
  return error as HyperLoraError
}

/**
 * The native test hooks. Only the dev build has them (`npm run build:native` passes `--features
 * test-hooks`; release builds do not), and `index.d.ts` leaves them out, so they are reached
 * through this cast.
 */
export interface TestHooks {
  /** Panics inside a worker task. */
  __panicForTests(): Promise<void>
  /** Panics in a worker while holding the pipeline's model. */
  __panicWhileBusyForTests(pipeline: Binding.Pipeline): Promise<void>
}

export function testHooks(): TestHooks {
  const hooks = native() as unknown as Partial<TestHooks>
  if (typeof hooks.__panicForTests !== 'function' || typeof hooks.__panicWhileBusyForTests !== 'function') {
    throw new Error('the native build has no test hooks: build it with `npm run build` (--features test-hooks)')
  }
  return hooks as TestHooks
}
