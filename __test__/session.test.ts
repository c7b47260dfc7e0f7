import * as path from 'node:path'

import sharp from 'sharp'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'

import { ERROR_CODES, HyperLoRA, loadIdentity, TINY_MODELS, type Identity } from '../src/index.js'
import { native } from '../src/native.js'
import { rejection, tempDir } from './helpers.js'

const PHOTO = path.join(__dirname, '..', 'models', 'tiny', 'photos', 'astronaut.png')
const base = { prompt: 'a portrait photo', width: 64, height: 64, steps: 2, seed: 11 }

let engine: HyperLoRA
let me: Identity

beforeAll(async () => {
  engine = await HyperLoRA.load({ ...TINY_MODELS, device: 'cpu' })
  me = await engine.createIdentity(PHOTO)
})

afterAll(async () => {
  await engine.dispose()
})

async function pixels(data: Buffer): Promise<Buffer> {
  return sharp(data).raw().toBuffer()
}

describe('the engine owns defaults, word lists and LoRA sets', () => {
  it('fills unset fields with its own defaults and reports the settings each picture used', async () => {
    const defaults = native().generateDefaults()
    const images = await engine.generate({ ...base, batchSize: 2, identity: me })
    expect(images.map((i) => i.settings)).toEqual(
      [11, 12].map((seed) => ({
        prompt: 'fcsks fxhks fhyks, a portrait photo',
        negativePrompt: '',
        width: 64,
        height: 64,
        steps: 2,
        cfg: defaults.cfg,
        sampler: defaults.sampler,
        schedule: defaults.schedule,
        seed,
        identityWeights: [defaults.identityWeight],
        loras: [],
      })),
    )
    expect(defaults).toMatchObject({ width: 1024, height: 1024, steps: 20, cfg: 5, sampler: 'dpmpp_2m', schedule: 'karras', identityWeight: 0.85 })
  })

  it('takes the sigma schedule as `schedule`, and as the old `scheduler`', async () => {
    const [a] = await engine.generate({ ...base, schedule: 'exponential' })
    const [b] = await engine.generate({ ...base, scheduler: 'exponential' })
    expect(a!.settings.schedule).toBe('exponential')
    expect(b!.data.equals(a!.data)).toBe(true)
  })

  it('lists the generated error codes, and refuses a word outside a generated list', async () => {
    expect([...native().errorCodes(), 'NATIVE_MISSING'].sort()).toEqual([...ERROR_CODES].sort())
    // @ts-expect-error: not a sampler
    const error = await rejection(engine.generate({ ...base, sampler: 'plms' }))
    expect(error.code).toBe('INVALID_ARGUMENT')
    expect(error.message).toBe('unknown sampler "plms"')
  })

  it('applies the Base-LoRA at baseWeight (default 0), saves it, and refuses it for an identity without one', async () => {
    expect(me.hasBaseLora).toBe(true)
    const [plain] = await engine.generate({ ...base, identity: me })
    const [zero] = await engine.generate({ ...base, identity: me, baseWeight: 0 })
    const [withBase] = await engine.generate({ ...base, identity: me, baseWeight: 0.5 })
    expect((await pixels(zero!.data)).equals(await pixels(plain!.data))).toBe(true)
    expect((await pixels(withBase!.data)).equals(await pixels(plain!.data))).toBe(false)
    expect(withBase!.settings.identityWeights).toEqual([0.85, 0.5])
    expect((await me.lora({ base: true }))[0]!.downShape[0]).toBe(me.rank / 2)

    const dir = tempDir('base')
    await me.saveLora(path.join(dir, 'base.safetensors'), { base: true })
    const loaded = await loadIdentity(path.join(dir, 'base.safetensors'))
    expect(loaded.rank).toBe(me.rank / 2)
    expect(loaded.hasBaseLora).toBe(false)
    expect((await rejection(loaded.saveLora(path.join(dir, 'x.safetensors'), { base: true }))).code).toBe('INVALID_ARGUMENT')
    const refused = await rejection(engine.generate({ ...base, identity: loaded, baseWeight: 0.5 }))
    expect(refused.code).toBe('INVALID_ARGUMENT')
    expect(refused.message).toMatch(/has no Base-LoRA/)
  })

  it('plans batches in the engine: compatible requests together, whatever their identities', async () => {
    const friend = await engine.createIdentity(PHOTO, { grayscale: true })
    const requests = [
      { ...base, identity: me },
      { ...base, identity: friend, seed: 12 },
      { ...base, width: 128 },
      { ...base, identity: me, seed: 13 },
    ]
    const got: { index: number; seed: number | bigint }[] = []
    for await (const { index, images } of engine.generateMany(requests, { maxBatchSize: 4 })) got.push({ index, seed: images[0]!.seed })
    // Requests 0, 1 and 3 share a batch (yielded first, in order); 2 has another size.
    expect(got).toEqual([
      { index: 0, seed: 11 },
      { index: 1, seed: 12 },
      { index: 3, seed: 13 },
      { index: 2, seed: 11 },
    ])
  })
})
