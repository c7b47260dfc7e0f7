import * as path from 'node:path'

import sharp from 'sharp'
import { beforeAll, describe, expect, it } from 'vitest'

import { ControlNet, loadPipeline, TINY_SDXL, type GeneratedImage, type Pipeline } from '../src/index.js'
import { rejection } from './helpers.js'

const TINY_CONTROLNET = path.join(TINY_SDXL, '..', 'controlnet')
const TINY_CONTROLNET_FILE = path.join(TINY_SDXL, '..', 'controlnet-b-sdxl-tiny.safetensors')

let pipeline: Pipeline
let controlnet: ControlNet

beforeAll(async () => {
  pipeline = await loadPipeline(TINY_SDXL, { device: 'cpu' })
  controlnet = await pipeline.loadControlNet(TINY_CONTROLNET)
})

const base = { prompt: 'a photo of an astronaut riding a horse', width: 64, height: 64, steps: 3, seed: 42 }

/** A pose-like control image: a bright cross at (x, y) on black, `size` pixels square. */
function pose(x: number, y: number, size = 64): { width: number; height: number; data: Buffer } {
  const data = Buffer.alloc(size * size * 3)
  for (let i = 0; i < size; i++) {
    for (const [px, py] of [
      [i, y],
      [x, i],
    ] as const) {
      data.set([255, 128, 0], (py * size + px) * 3)
    }
  }
  return { width: size, height: size, data }
}

async function pixels(image: GeneratedImage): Promise<Buffer> {
  return sharp(image.data).raw().toBuffer()
}

async function worstDiff(a: GeneratedImage, b: GeneratedImage): Promise<number> {
  const [x, y] = await Promise.all([pixels(a), pixels(b)])
  let worst = 0
  for (let p = 0; p < x.length; p++) worst = Math.max(worst, Math.abs(x[p]! - y[p]!))
  return worst
}

describe('ControlNet from TypeScript', () => {
  it('guides a generation and reports its settings', async () => {
    const [plain] = await pipeline.generate(base)
    const [guided] = await pipeline.generate({ ...base, controlnets: [{ model: controlnet, image: pose(20, 40), strength: 0.7, end: 0.7 }] })
    expect(controlnet.name).toBe('controlnet')
    expect(await worstDiff(plain!, guided!)).toBeGreaterThan(1)
    expect(guided!.settings.controlnets).toEqual([{ name: 'controlnet', strength: 0.7, start: 0, end: 0.7 }])
    expect(guided!.info).toContain('ControlNet 0: "Model: controlnet, Weight: 0.7, Guidance Start: 0, Guidance End: 0.7"')
  })

  it('strength 0 draws the same picture as no ControlNet', async () => {
    const [plain] = await pipeline.generate(base)
    const [zero] = await pipeline.generate({ ...base, controlnets: [{ model: controlnet, image: pose(20, 40), strength: 0 }] })
    expect((await pixels(zero!)).equals(await pixels(plain!))).toBe(true)
  })

  it('batches requests with different control images as it draws them one by one', async () => {
    const a = { ...base, controlnets: [{ model: controlnet, image: pose(10, 50), strength: 0.8 }] }
    const b = { ...base, seed: 7, controlnets: [{ model: controlnet, image: pose(40, 12, 96), strength: 0.8 }] }
    const [batchA, batchB] = await pipeline.generateBatch([a, b])
    const [aloneA] = await pipeline.generate(a)
    const [aloneB] = await pipeline.generate(b)
    expect(await worstDiff(batchA![0]!, aloneA!)).toBeLessThanOrEqual(1)
    expect(await worstDiff(batchB![0]!, aloneB!)).toBeLessThanOrEqual(1)
  })

  it('loads a single community-style file by path, once per path, and sums two ControlNets', async () => {
    const first = await pipeline.loadControlNet(TINY_CONTROLNET_FILE)
    expect(await pipeline.loadControlNet(TINY_CONTROLNET_FILE)).toBe(first)
    const [two] = await pipeline.generate({
      ...base,
      controlnets: [
        { model: controlnet, image: pose(20, 40) },
        { model: TINY_CONTROLNET_FILE, image: pose(30, 30), strength: 0.5, start: 0.2, end: 0.8 },
      ],
    })
    expect(two!.settings.controlnets?.map((c) => c.name)).toEqual(['controlnet', 'controlnet-b-sdxl-tiny.safetensors'])
  })

  it('refuses a file that is no ControlNet with BAD_WEIGHTS naming the tensor', async () => {
    const error = await rejection(pipeline.loadControlNet(path.join(TINY_SDXL, 'unet', 'diffusion_pytorch_model.safetensors')))
    expect(error.code).toBe('BAD_WEIGHTS')
    expect(error.message).toContain("'controlnet_cond_embedding.")
  })

  it('refuses a window with start after end', async () => {
    const error = await rejection(pipeline.generate({ ...base, controlnets: [{ model: controlnet, image: pose(20, 40), start: 0.8, end: 0.2 }] }))
    expect(error.code).toBe('INVALID_ARGUMENT')
  })
})
