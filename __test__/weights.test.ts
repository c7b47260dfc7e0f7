import { createHash } from 'node:crypto'
import * as fs from 'node:fs'
import * as path from 'node:path'

import { describe, expect, it } from 'vitest'

import { inspectWeights } from '../src/index.js'
import { smallSafetensors, tempDir, rejection, testHooks } from './helpers.js'

const dir = tempDir('weights')

describe('inspectWeights', () => {
  it('lists tensors in file order with dtype, shape, metadata and hash', async () => {
    const file = path.join(dir, 'small.safetensors')
    const bytes = smallSafetensors(file)
    const index = await inspectWeights(file, { sha256: true })
    expect(index.tensors.map((t) => [t.name, t.dtype, t.shape, t.byteSize])).toEqual([
      ['weight', 'F32', [2, 2], 16],
      ['bias', 'F16', [2], 4],
    ])
    expect(index.metadata).toEqual({ format: 'pt' })
    expect(index.fileSize).toBe(bytes.length)
    expect(index.sha256).toBe(createHash('sha256').update(bytes).digest('hex'))
  })

  it('rejects malformed files with BAD_WEIGHTS and keeps the process alive', async () => {
    const good = smallSafetensors(path.join(dir, 'good.safetensors'))
    const lying = Buffer.from(good)
    lying.writeBigUInt64LE(1n << 40n)
    const cases: Record<string, Buffer> = {
      'truncated.safetensors': good.subarray(0, good.length - 5),
      'lying-header.safetensors': lying,
      'not-safetensors.safetensors': Buffer.from('PK\u0003\u0004 this is a zip, not a safetensors file'),
      'empty.safetensors': Buffer.alloc(0),
    }
    for (const [name, bytes] of Object.entries(cases)) {
      const file = path.join(dir, name)
      fs.writeFileSync(file, bytes)
      const error = await rejection(inspectWeights(file))
      expect(error.code, name).toBe('BAD_WEIGHTS')
      expect(error.message).toContain(name)
    }
  })

  it('names a missing file with MODEL_NOT_FOUND', async () => {
    const error = await rejection(inspectWeights(path.join(dir, 'missing.safetensors')))
    expect(error.code).toBe('MODEL_NOT_FOUND')
    expect(error.message).toContain('missing.safetensors')
  })

  it('rejects bad arguments with INVALID_ARGUMENT', async () => {
    const error = await rejection(inspectWeights(''))
    expect(error.code).toBe('INVALID_ARGUMENT')
  })

  it('turns a native panic into INTERNAL without crashing, and keeps working after it', async () => {
    const error = await testHooks().__panicForTests().then(
      () => undefined,
      (e: unknown) => e as Error,
    )
    expect(error?.message).toMatch(/^\[INTERNAL\] native panic: injected test panic/)
    const index = await inspectWeights(path.join(dir, 'good.safetensors'))
    expect(index.tensors).toHaveLength(2)
  })
})
