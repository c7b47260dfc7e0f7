import * as path from 'node:path'

import sharp from 'sharp'
import { beforeAll, describe, expect, it } from 'vitest'

import { loadPipeline, TINY_SDXL, type Pipeline, type ProgressEvent } from '../src/index.js'
import { rejection } from './helpers.js'

let pipeline: Pipeline

beforeAll(async () => {
  pipeline = await loadPipeline(TINY_SDXL, { device: 'cpu' })
})

const base = { prompt: 'a photo of an astronaut riding a horse', width: 64, height: 64, steps: 4, seed: 42 }

describe('SDXL pipeline from TypeScript', () => {
  it('generates a valid PNG and reports every stage and step', async () => {
    const events: ProgressEvent[] = []
    const [image, ...rest] = await pipeline.generate({ ...base, onProgress: (e) => events.push(e) })
    expect(rest).toHaveLength(0)
    expect(pipeline.device).toBe('cpu')
    expect(image).toMatchObject({ format: 'png', width: 64, height: 64, seed: 42, index: 0, warnings: [] })
    const meta = await sharp(image!.data).metadata()
    expect(meta).toMatchObject({ format: 'png', width: 64, height: 64, channels: 3 })
    // A1111-style generation parameters, readable by A1111, ComfyUI and civitai.
    expect(image!.info).toBe(
      'a photo of an astronaut riding a horse\nSteps: 4, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5, Seed: 42, Size: 64x64, Version: hyperlora',
    )
    expect(meta.comments).toEqual([{ keyword: 'parameters', text: image!.info }])
    const [unicode] = await pipeline.generate({ ...base, prompt: 'Ångström 🐱', negativePrompt: 'blur', steps: 1 })
    expect((await sharp(unicode!.data).metadata()).comments?.[0]?.text).toMatch(/^Ångström 🐱\nNegative prompt: blur\nSteps: 1,/)
    const denoise = events.filter((e) => e.stage === 'denoise').map((e) => [e.step, e.totalSteps])
    expect(denoise).toEqual([
      [1, 4],
      [2, 4],
      [3, 4],
      [4, 4],
    ])
    expect(events[0]?.stage).toBe('text')
    expect(events.at(-1)).toMatchObject({ stage: 'decode', step: 1, totalSteps: 1 })
  })

  it('is deterministic per seed and differs across seeds; batches, JPEG and WebP work', async () => {
    const [a] = await pipeline.generate(base)
    const [b] = await pipeline.generate(base)
    const [c] = await pipeline.generate({ ...base, seed: 43 })
    expect(a!.data.equals(b!.data)).toBe(true)
    expect(a!.data.equals(c!.data)).toBe(false)
    const batch = await pipeline.generate({ ...base, batchSize: 2, format: 'jpeg' })
    expect(batch.map((i) => i.index)).toEqual([0, 1])
    expect((await sharp(batch[1]!.data).metadata()).format).toBe('jpeg')
    const [webp] = await pipeline.generate({ ...base, format: 'webp', sampler: 'euler_ancestral', scheduler: 'normal' })
    expect((await sharp(webp!.data).metadata()).format).toBe('webp')
  })

  it('seeds: each image of a batch has its own, which redraws it alone; numbers when exact, bigints above 2^53', async () => {
    const batch = await pipeline.generate({ ...base, steps: 2, batchSize: 2 })
    expect(batch.map((i) => i.seed)).toEqual([42, 43])
    expect(batch[1]!.info).toContain('Seed: 43,')
    const [alone] = await pipeline.generate({ ...base, steps: 2, seed: 43 })
    const [a, b] = await Promise.all([alone!, batch[1]!].map((i) => sharp(i.data).raw().toBuffer()))
    let worst = 0
    for (let p = 0; p < a!.length; p++) worst = Math.max(worst, Math.abs(a![p]! - b![p]!))
    expect(worst).toBeLessThanOrEqual(2)
    expect(JSON.parse(JSON.stringify({ seed: alone!.seed }))).toEqual({ seed: 43 })
    // Image-to-image batches too (drawn one after another).
    const init = await sharp({ create: { width: 64, height: 64, channels: 3, background: '#336699' } }).png().toBuffer()
    const i2i = await pipeline.generate({ ...base, steps: 2, batchSize: 2, initImage: init, strength: 0.5 })
    const [i2iAlone] = await pipeline.generate({ ...base, steps: 2, seed: 43, initImage: init, strength: 0.5 })
    expect(i2i.map((i) => i.seed)).toEqual([42, 43])
    expect((await sharp(i2i[1]!.data).raw().toBuffer()).equals(await sharp(i2iAlone!.data).raw().toBuffer())).toBe(true)
    // Past 2^64 - 1 the next image wraps to 0; seeds above 2^53 stay exact as bigints.
    const top = 2n ** 64n - 1n
    const wrapped = await pipeline.generate({ ...base, steps: 1, seed: top, batchSize: 2 })
    expect(wrapped.map((i) => i.seed)).toEqual([top, 0])
    expect(wrapped[0]!.info).toContain(`Seed: ${top},`)
  })

  it('refuses seeds that are not whole numbers in [0, 2^64) with INVALID_ARGUMENT', async () => {
    for (const seed of [1.5, Number.NaN, -1, 2 ** 60, 2n ** 64n, -1n]) {
      const error = await rejection(pipeline.generate({ ...base, seed }))
      expect(error.code, String(seed)).toBe('INVALID_ARGUMENT')
      expect(error.message).toMatch(/^seed must be a whole number in \[0, 2\^64\)/)
    }
  })

  it('warns about options that have no effect, on every image of the call', async () => {
    const images = await pipeline.generate({ ...base, steps: 1, batchSize: 2, identityWeight: 0.6, strength: 0.3 })
    for (const image of images) {
      expect(image.warnings).toEqual(['identityWeight 0.6 has no effect without an identity', 'strength 0.3 has no effect without an initImage'])
    }
  })

  it('runs image-to-image from any format sharp reads', async () => {
    const init = await sharp({ create: { width: 100, height: 80, channels: 4, background: { r: 200, g: 30, b: 90, alpha: 0.5 } } })
      .jpeg()
      .toBuffer()
    const [image] = await pipeline.generate({ ...base, initImage: init, strength: 0.5, steps: 6 })
    expect((await sharp(image!.data).metadata()).width).toBe(64)
  })

  it('stops within one step of an abort and rejects with AbortError', async () => {
    const controller = new AbortController()
    const steps: number[] = []
    const error = await rejection(
      pipeline.generate({
        ...base,
        steps: 500,
        signal: controller.signal,
        onProgress: (e) => {
          if (e.stage !== 'denoise') return
          steps.push(e.step)
          if (e.step === 2) controller.abort()
        },
      }),
    )
    expect(error.name).toBe('AbortError')
    expect(error.code).toBe('ABORTED')
    expect(Math.max(...steps)).toBeLessThanOrEqual(3)
  })

  it('rejects bad requests with INVALID_ARGUMENT and missing models with MODEL_NOT_FOUND', async () => {
    expect((await rejection(pipeline.generate({ ...base, width: 60 }))).code).toBe('INVALID_ARGUMENT')
    expect((await rejection(pipeline.generate({ ...base, steps: -1 }))).code).toBe('INVALID_ARGUMENT')
    // @ts-expect-error an unknown sampler is a type error, and a runtime one for JavaScript callers
    expect((await rejection(pipeline.generate({ ...base, sampler: 'plms' }))).message).toMatch(/unknown sampler/)
    expect((await rejection(pipeline.generate({ ...base, initImage: Buffer.from('not an image') }))).code).toBe('INVALID_ARGUMENT')
    const missing = await rejection(loadPipeline(path.join(TINY_SDXL, 'nope')))
    expect(missing.code).toBe('MODEL_NOT_FOUND')
    expect(missing.message).toContain('nope')
  })

  it('applies LoCon / LyCORIS files, warns about keys that match no layer, refuses files where none does', async () => {
    const fixture = (name: string) => path.resolve(__dirname, '..', 'crates', 'hyperlora', 'tests', 'fixtures', 'lora_kinds', `${name}.safetensors`)
    const [plain] = await pipeline.generate(base)
    const [styled] = await pipeline.generate({ ...base, loras: [{ path: fixture('locon'), weight: 0.8 }, { path: fixture('lokr'), weight: -0.6 }] })
    expect(styled!.warnings).toEqual([])
    expect(styled!.data.equals(plain!.data)).toBe(false)
    const [partial] = await pipeline.generate({ ...base, loras: [{ path: fixture('partial'), weight: 0.8 }] })
    expect(partial!.warnings).toHaveLength(1)
    expect(partial!.warnings[0]).toMatch(/^partial\.safetensors: 4 keys ignored: /)
    expect(partial!.warnings[0]).toContain('lora_unet_frobnicator_7 (module name not understood)')
    expect(partial!.warnings[0]).toContain('DoRA (dora_scale) is not supported')
    expect(partial!.warnings[0]).toMatch(/, …$/)
    const nothing = await rejection(pipeline.generate({ ...base, loras: [{ path: fixture('nothing'), weight: 1 }] }))
    expect(nothing.code).toBe('INVALID_ARGUMENT')
    expect(nothing.message).toContain('nothing.safetensors')
    // A conv LoRA shared by a batch gives each request what it gets alone.
    const [a, b] = await pipeline.generateBatch([
      { ...base, loras: [{ path: fixture('locon'), weight: 0.8 }, { path: fixture('lokr'), weight: -0.6 }] },
      { ...base, seed: 43, loras: [{ path: fixture('locon'), weight: 0.8 }, { path: fixture('lokr'), weight: -0.6 }] },
    ])
    const [x, y] = await Promise.all([sharp(a![0]!.data).raw().toBuffer(), sharp(styled!.data).raw().toBuffer()])
    let worst = 0
    for (let p = 0; p < x.length; p++) worst = Math.max(worst, Math.abs(x[p]! - y[p]!))
    expect(worst).toBeLessThanOrEqual(1)
    expect(b![0]!.warnings).toEqual([])
  })

  it('loads the single-file checkpoint and gives the same picture as the diffusers folder', async () => {
    const single = await loadPipeline(path.join(TINY_SDXL, '..', 'sdxl-single-file.safetensors'), { device: 'cpu', configDir: TINY_SDXL })
    const [a] = await pipeline.generate(base)
    const [b] = await single.generate(base)
    expect(b!.data.equals(a!.data)).toBe(true)
  })
})
