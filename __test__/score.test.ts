import * as path from 'node:path'

import { afterAll, beforeAll, describe, expect, it } from 'vitest'

import { HyperLoRA, Identity, rankScores, TINY_MODELS, type EngineProgress } from '../src/index.js'
import { rejection, tempDir } from './helpers.js'

const PHOTO = path.join(__dirname, '..', 'models', 'tiny', 'photos', 'astronaut.png')
const GREY = { width: 64, height: 48, data: Buffer.alloc(64 * 48 * 3, 127) }
const base = { prompt: 'a portrait photo of an astronaut', width: 64, height: 64, steps: 2, seed: 11 }

let engine: HyperLoRA
let me: Identity

beforeAll(async () => {
  engine = await HyperLoRA.load({ ...TINY_MODELS, device: 'cpu' })
  me = await engine.createIdentity(PHOTO)
})

afterAll(async () => {
  await engine.dispose()
})

describe('scores', () => {
  it('scores likeness and prompt alignment; a faceless picture has likeness null with a reason', async () => {
    const events: EngineProgress[] = []
    const [photo, grey] = await engine.score([PHOTO, GREY], { identity: me, prompt: base.prompt, onProgress: (e) => events.push(e) })
    expect(photo!.likeness).toBeGreaterThan(0.9)
    expect(photo!.likeness).toBeLessThanOrEqual(1 + 1e-6)
    expect(photo!.face).toHaveLength(4)
    expect(photo!.likenessReason).toBeUndefined()
    expect(grey!.likeness).toBeNull()
    expect(grey!.likenessReason).toBe('no face')
    expect(grey!.face).toBeUndefined()
    for (const s of [photo!, grey!]) {
      expect(s.promptAlignment).toBeGreaterThanOrEqual(-1)
      expect(s.promptAlignment).toBeLessThanOrEqual(1)
    }
    expect(events.filter((e) => e.stage === 'score').map((e) => [e.step, e.totalSteps])).toEqual([
      [1, 2],
      [2, 2],
    ])
  })

  it('is deterministic, and per picture (the same whatever is scored beside it)', async () => {
    const a = await engine.score([PHOTO, GREY], { identity: me, prompt: base.prompt })
    const b = await engine.score([GREY, PHOTO], { identity: me, prompt: base.prompt })
    expect([b[1], b[0]]).toEqual(a)
    // Photos instead of the identity: the same mean embedding (up to float rounding).
    const [fromPhotos] = await engine.score(PHOTO, { photos: [PHOTO], prompt: base.prompt })
    expect(fromPhotos!.likeness).toBeCloseTo(a[0]!.likeness!, 6)
    expect(fromPhotos!.promptAlignment).toBe(a[0]!.promptAlignment)
  })

  it('keeps the embedding in the saved identity; a LoRA without one is a coded error', async () => {
    const file = path.join(tempDir('score'), 'me.safetensors')
    await me.saveLora(file)
    const loaded = await HyperLoRA.loadIdentity(file)
    expect(await engine.score(PHOTO, { identity: loaded })).toEqual(await engine.score(PHOTO, { identity: me }))
    const blend = await Identity.interpolate(me, loaded, 0.5)
    const error = await rejection(engine.score(PHOTO, { identity: blend }))
    expect(error.code).toBe('INVALID_ARGUMENT')
    expect(error.message).toMatch(/ArcFace embedding.*photos/)
    expect((await rejection(engine.score(PHOTO, {}))).code).toBe('INVALID_ARGUMENT')
    expect((await rejection(engine.score(PHOTO, { identity: me, photos: PHOTO }))).code).toBe('INVALID_ARGUMENT')
  })

  it('bestOf draws N in one batch and returns them sorted, with the scores score gives', async () => {
    const n = 3
    const best = await engine.generate({ ...base, identity: me, bestOf: n, rank: 'prompt' })
    expect(best).toHaveLength(n)
    // Seeds seed … seed + N − 1, each image once.
    expect(best.map((b) => Number(b.seed) - base.seed).sort()).toEqual([0, 1, 2])
    expect(best.map((b) => b.seed)).toEqual(best.map((b) => base.seed + b.index))
    const alignment = best.map((b) => b.scores!.promptAlignment!)
    expect([...alignment].sort((x, y) => y - x)).toEqual(alignment)
    const again = await engine.score(
      best.map((b) => b.data),
      { identity: me, prompt: base.prompt },
    )
    expect(best.map((b) => b.scores)).toEqual(again)
    // The same batch drawn plainly holds the same pictures.
    const plain = await engine.generate({ ...base, identity: me, batchSize: n })
    for (const b of best) expect(b.data.equals(plain[b.index]!.data)).toBe(true)
    expect((await rejection(engine.generate({ ...base, bestOf: 2, batchSize: 3 }))).code).toBe('INVALID_ARGUMENT')
    expect((await rejection(engine.generate({ ...base, bestOf: 0 }))).code).toBe('INVALID_ARGUMENT')
    expect((await rejection(engine.generate({ ...base, bestOf: 2, rank: 'likeness' }))).code).toBe('INVALID_ARGUMENT')
  })

  it('ranks best first, pictures without a face last, ties in order', () => {
    const s = [
      { likeness: 0.2, promptAlignment: 0.3 },
      { likeness: null, likenessReason: 'no face', promptAlignment: 0.9 },
      { likeness: 0.5, promptAlignment: 0.1 },
      { likeness: 0.2, promptAlignment: 0.2 },
    ]
    expect(rankScores(s, 'likeness')).toEqual([2, 0, 3, 1])
    expect(rankScores(s, 'prompt')).toEqual([1, 0, 3, 2])
    expect(rankScores(s, { likeness: 1, prompt: 2 })).toEqual([0, 2, 3, 1])
    expect(() => rankScores(s, { likeness: 0, prompt: 0 })).toThrow(/rank weights/)
  })
})
