import * as fs from 'node:fs'
import * as path from 'node:path'

import sharp from 'sharp'
import { beforeAll, describe, expect, it } from 'vitest'

import {
  HyperLoraError,
  Identity,
  inspectWeights,
  loadIdentity,
  loadIdentityEncoder,
  TINY_CLIP_VISION,
  TINY_HYPERLORA,
  type FaceConditions,
  type IdentityEncoder,
  type ProgressEvent,
} from '../src/index.js'
import { tempDir } from './helpers.js'

const dir = tempDir('identity')
let encoder: IdentityEncoder

function arcface(seed: number): Float32Array {
  const v = Float32Array.from({ length: 512 }, (_, i) => Math.sin(i * seed))
  const norm = Math.hypot(...v)
  return v.map((x) => x / norm)
}

async function photo(seed: number): Promise<FaceConditions> {
  const crop = await sharp({ create: { width: 300, height: 260, channels: 3, background: { r: 40 * seed, g: 120, b: 200 - 20 * seed } } })
    .png()
    .toBuffer()
  return { arcface: arcface(seed), clipCrop: crop }
}

beforeAll(async () => {
  encoder = await loadIdentityEncoder(TINY_HYPERLORA, TINY_CLIP_VISION, { device: 'cpu' })
})

describe('identities from TypeScript', () => {
  it('creates an identity from photos, saves it as a kohya LoRA and loads it back bit-identical', async () => {
    const events: ProgressEvent[] = []
    const identity = await encoder.createIdentity([await photo(1), await photo(2)], { onProgress: (e) => events.push(e) })
    expect(events.map((e) => [e.stage, e.step, e.totalSteps])).toEqual([
      ['identity', 1, 3],
      ['identity', 2, 3],
      ['identity', 3, 3],
    ])
    expect(identity.modules).toBeGreaterThan(0)
    expect(identity.rank).toBe(4)

    const modules = await identity.lora()
    expect(modules).toHaveLength(identity.modules)
    const [first] = modules
    expect(first!.downShape[0]).toBe(4)
    expect(first!.down).toHaveLength(first!.downShape[0]! * first!.downShape[1]!)
    expect(first!.up).toHaveLength(first!.upShape[0]! * first!.upShape[1]!)
    expect(first!.alpha).toBe(2)

    const file = path.join(dir, 'me.safetensors')
    await identity.saveLora(file)
    const index = await inspectWeights(file)
    expect(index.tensors.some((t) => t.name.endsWith('_to_q.lora_down.weight'))).toBe(true)
    expect(index.tensors.some((t) => t.name.endsWith('_to_out_0.alpha'))).toBe(true)
    expect(fs.readdirSync(dir)).toEqual(['me.safetensors']) // no temp file left behind

    const again = path.join(dir, 'again.safetensors')
    await (await loadIdentity(file)).saveLora(again)
    expect(fs.readFileSync(again).equals(fs.readFileSync(file))).toBe(true)
  })

  it('interpolates: t = 0 is the first identity, t = 1 the second', async () => {
    const a = await encoder.createIdentity([await photo(1)])
    const b = await encoder.createIdentity([await photo(3)])
    const save = async (identity: Identity, name: string) => {
      const file = path.join(dir, name)
      await identity.saveLora(file)
      return fs.readFileSync(file)
    }
    const [bytesA, bytesB] = [await save(a, 'a.safetensors'), await save(b, 'b.safetensors')]
    expect(bytesA.equals(bytesB)).toBe(false)
    expect((await save(await Identity.interpolate(a, b, 0), 'a0.safetensors')).equals(bytesA)).toBe(true)
    expect((await save(await Identity.interpolate(a, b, 1), 'b1.safetensors')).equals(bytesB)).toBe(true)
    const mid = await save(await Identity.interpolate(a, b, 0.5), 'mid.safetensors')
    expect(mid.equals(bytesA) || mid.equals(bytesB)).toBe(false)
  })

  it('rejects bad inputs with codes', async () => {
    const code = async (p: Promise<unknown>) => ((await p.catch((e: unknown) => e)) as HyperLoraError).code
    expect(await code(encoder.createIdentity([]))).toBe('INVALID_ARGUMENT')
    expect(await code(encoder.createIdentity([{ arcface: [1, 2, 3], clipCrop: (await photo(1)).clipCrop }]))).toBe('INVALID_ARGUMENT')
    expect(await code(loadIdentity(path.join(dir, 'missing.safetensors')))).toBe('MODEL_NOT_FOUND')
    expect(await code(loadIdentityEncoder(path.join(dir, 'nope'), TINY_CLIP_VISION))).toBe('MODEL_NOT_FOUND')
    const controller = new AbortController()
    controller.abort()
    expect(await code(encoder.createIdentity([await photo(1)], { signal: controller.signal }))).toBe('ABORTED')
  })
})

describe('generating with identities', () => {
  const base = { prompt: 'portrait photo of a person', width: 64, height: 64, steps: 3, seed: 9 }

  it('applies identities and LoRA files; weight 0 is the base model; trigger words are added once', async () => {
    const { loadPipeline, TINY_SDXL, TRIGGER_WORDS } = await import('../src/index.js')
    const pipeline = await loadPipeline(TINY_SDXL, { device: 'cpu' })
    const a = await encoder.createIdentity([await photo(1)])
    const b = await encoder.createIdentity([await photo(4)])
    // Pixels, not PNG bytes: the embedded parameters text differs between equivalent requests.
    const png = async (options: Partial<Parameters<typeof pipeline.generate>[0]>) =>
      sharp((await pipeline.generate({ ...base, ...options }))[0]!.data)
        .raw()
        .toBuffer()

    const plain = await png({})
    const withA = await png({ identity: a, triggerWords: false })
    expect(withA.equals(plain)).toBe(false)
    expect((await png({ identity: a, identityWeight: 0, triggerWords: false })).equals(plain)).toBe(true)
    // Switching back and forth never drifts: the base weights stay resident.
    expect((await png({})).equals(plain)).toBe(true)
    expect((await png({ identity: a, triggerWords: false })).equals(withA)).toBe(true)

    // A saved identity is an ordinary LoRA file.
    const file = path.join(dir, 'a-for-lora.safetensors')
    await a.saveLora(file)
    expect((await png({ loras: [{ path: file, weight: 0.85 }] })).equals(withA)).toBe(true)

    // Trigger words: prepended when an identity is active, never twice.
    const triggered = await png({ identity: a })
    expect(triggered.equals(withA)).toBe(false)
    const [withWords] = await pipeline.generate({ ...base, identity: a })
    expect(withWords!.info).toMatch(/^fcsks fxhks fhyks, portrait photo[\s\S]*Lora weights: "identity: 0.85"/)
    expect((await png({ identity: a, prompt: TRIGGER_WORDS + base.prompt })).equals(triggered)).toBe(true)

    // Concept slider: identity A at -0.7 and B at +0.7 in one pass.
    const slider = await png({ identities: [{ identity: a, weight: -0.7 }, { identity: b, weight: 0.7 }] })
    expect(slider.equals(plain)).toBe(false)
    expect(slider).toHaveLength(64 * 64 * 3)

    const missing = await pipeline.generate({ ...base, loras: [{ path: path.join(dir, 'none.safetensors'), weight: 1 }] }).catch((e: unknown) => e)
    expect((missing as HyperLoraError).code).toBe('MODEL_NOT_FOUND')
    expect((await png({})).equals(plain)).toBe(true)
  })
})
