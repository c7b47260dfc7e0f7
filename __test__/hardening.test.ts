import * as fs from 'node:fs'
import * as path from 'node:path'

import sharp from 'sharp'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'

import { HyperLoRA, HyperLoraError, TINY_MODELS, TINY_SDXL, type Identity } from '../src/index.js'
import { CLIP_MERGES } from '../src/pipeline.js'
import { fromNativeError } from '../src/errors.js'
import { native } from '../src/native.js'
import { rejection, tempDir, testHooks } from './helpers.js'

const PHOTO = path.join(__dirname, '..', 'models', 'tiny', 'photos', 'astronaut.png')
const base = { prompt: 'a portrait photo', width: 64, height: 64, steps: 2, seed: 5 }

let engine: HyperLoRA
let me: Identity

beforeAll(async () => {
  engine = await HyperLoRA.load({ ...TINY_MODELS, device: 'cpu' })
  me = await engine.createIdentity(PHOTO)
})

afterAll(async () => {
  await engine.dispose()
})

async function code(promise: Promise<unknown>): Promise<string> {
  return (await rejection(promise)).code
}

/** A small deterministic PRNG, so the "random" abort points are the same on every run. */
function xorshift(seed: number): () => number {
  let x = seed
  return () => {
    x ^= x << 13
    x ^= x >>> 17
    x ^= x << 5
    return (x >>> 0) / 2 ** 32
  }
}

describe('hardening', () => {
  it('a panic while the model is busy fails that call with INTERNAL; the model keeps working', async () => {
    const pipeline = await native().loadPipeline(TINY_SDXL, { device: 'cpu', mergesFile: CLIP_MERGES })
    const request = { prompt: 'x', width: 64, height: 64, steps: 1, sampler: 'euler', schedule: 'normal', seed: 1n } as const
    const before = (await pipeline.generate(request)).images
    const error = await testHooks().__panicWhileBusyForTests(pipeline).then(
      () => undefined,
      (e: unknown) => fromNativeError(e),
    )
    expect(error?.code).toBe('INTERNAL')
    const after = (await pipeline.generate(request)).images
    expect(after[0]!.data.equals(before[0]!.data)).toBe(true)
    pipeline.dispose()
  })

  it('calls aborted at random points reject with ABORTED or finish, and leave the engine deterministic', async () => {
    const [expected] = await engine.generate({ ...base, identity: me })
    const random = xorshift(12345)
    const outcomes = await Promise.all(
      Array.from({ length: 12 }, async (_, i) => {
        const controller = new AbortController()
        setTimeout(() => controller.abort(), random() * 400)
        return engine.generate({ ...base, steps: 4, seed: i, identity: me, signal: controller.signal }).then(
          () => 'done',
          (e: unknown) => (e as HyperLoraError).code,
        )
      }),
    )
    expect(outcomes.every((o) => o === 'done' || o === 'ABORTED')).toBe(true)
    expect(outcomes).toContain('ABORTED')
    const [again] = await engine.generate({ ...base, identity: me })
    expect(again!.data.equals(expected!.data)).toBe(true)
  })

  it('refuses hostile requests with stable codes', async () => {
    const dir = tempDir('hostile')
    expect(await code(engine.generate({ ...base, width: 4104 }))).toBe('INVALID_ARGUMENT')
    expect(await code(engine.generate({ ...base, width: 60 }))).toBe('INVALID_ARGUMENT')
    expect(await code(engine.generate({ ...base, steps: 100_000 }))).toBe('INVALID_ARGUMENT')
    expect(await code(engine.generate({ ...base, cfg: Number.NaN }))).toBe('INVALID_ARGUMENT')
    expect(await code(engine.generate({ ...base, batchSize: 1000 }))).toBe('INVALID_ARGUMENT')
    expect(await code(engine.generate({ ...base, prompt: 'word '.repeat(3000) }))).toBe('INVALID_ARGUMENT')
    expect(await code(engine.generate({ ...base, width: 4096, height: 4096, batchSize: 64 }))).toBe('OUT_OF_MEMORY')
    // Control characters, emoji, unbalanced weights: a picture, not an error.
    expect(await engine.generate({ ...base, prompt: '((((a\u0000\u0007 🐱 :1e309)]] BREAK BREAK \u202e' })).toHaveLength(1)
    // A truncated LoRA, a LoRA that is not one, a missing one.
    const lora = path.join(dir, 'me.safetensors')
    await me.saveLora(lora)
    const truncated = path.join(dir, 'truncated.safetensors')
    fs.writeFileSync(truncated, fs.readFileSync(lora).subarray(0, 1000))
    expect(await code(engine.generate({ ...base, loras: [{ path: truncated, weight: 1 }] }))).toBe('BAD_WEIGHTS')
    expect(await code(engine.generate({ ...base, loras: [{ path: PHOTO, weight: 1 }] }))).toBe('BAD_WEIGHTS')
    expect(await code(engine.generate({ ...base, loras: [{ path: path.join(dir, 'nope.safetensors'), weight: 1 }] }))).toMatch(/MODEL_NOT_FOUND|IO/)
    // Photos: garbage bytes, a decompression bomb (beyond the pixel limit), an empty list.
    expect(await code(engine.createIdentity(Buffer.from('not an image')))).toBe('INVALID_ARGUMENT')
    const bomb = await sharp({ create: { width: 12000, height: 12000, channels: 3, background: '#000' } })
      .png({ compressionLevel: 9 })
      .toBuffer()
    expect(await code(engine.createIdentity(bomb))).toBe('INVALID_ARGUMENT')
    expect(await code(engine.createIdentity([]))).toBe('INVALID_ARGUMENT')
    // The engine still works.
    expect(await engine.generate(base)).toHaveLength(1)
  })

  it('keeps its memory over 200 generations (RSS after 200 within 10% of after 20)', async () => {
    const rss: number[] = []
    for (let i = 0; i < 200; i++) {
      await engine.generate({ ...base, steps: 1, seed: i, identity: me, identityWeight: i % 2 ? 0.85 : 0.6 })
      rss.push(process.memoryUsage().rss)
    }
    const ratio = rss[199]! / rss[19]!
    expect(ratio).toBeLessThan(1.1)
  })
})
