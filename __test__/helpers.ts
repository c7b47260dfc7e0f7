import * as fs from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'

import { expect } from 'vitest'

import { HyperLoraError } from '../src/index.js'

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
