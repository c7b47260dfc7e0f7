import * as path from 'node:path'

import sharp from 'sharp'
import { beforeAll, describe, expect, it } from 'vitest'

import { HyperLoRA, loadFaceAnalyzer, TINY_ANTELOPEV2, TINY_MODELS, type FaceAnalyzer } from '../src/index.js'
import { rejection } from './helpers.js'

const astronaut = path.resolve(__dirname, '..', 'models', 'tiny', 'photos', 'astronaut.png')
const TINY_INSTANTID = path.resolve(__dirname, '..', 'models', 'tiny', 'instantid')
const TINY_CONTROLNET = path.resolve(__dirname, '..', 'models', 'tiny', 'controlnet')
let analyzer: FaceAnalyzer
let engine: HyperLoRA
let grey: Buffer

beforeAll(async () => {
  analyzer = await loadFaceAnalyzer(TINY_ANTELOPEV2)
  engine = await HyperLoRA.load({ ...TINY_MODELS, device: 'cpu' })
  grey = await sharp({ create: { width: 200, height: 150, channels: 3, background: { r: 127, g: 127, b: 127 } } })
    .png()
    .toBuffer()
})

describe('InstantID from TypeScript', () => {
  it("finds the largest face's keypoints and raw embedding, and draws the keypoint picture", async () => {
    const face = await analyzer.keypointFace(astronaut)
    expect(face.keypoints).toHaveLength(5)
    expect(face.embedding).toHaveLength(512)
    // Raw, not normalised.
    const norm = Math.hypot(...face.embedding)
    expect(Math.abs(norm - 1)).toBeGreaterThan(1e-3)
    expect(face.keypointsImage).toMatchObject({ width: 256, height: 256 })
    // The nose's circle is pure blue on black.
    const [x, y] = face.keypoints[2]!.map(Math.trunc) as [number, number]
    const at = (y * 256 + x) * 3
    expect([...face.keypointsImage.data.subarray(at, at + 3)]).toEqual([0, 0, 255])
  })

  it('rejects a keypoint photo without a face with NO_FACE', async () => {
    const error = await rejection(analyzer.keypointFace(grey))
    expect(error.code).toBe('NO_FACE')
    expect(error.message).toMatch(/keypoints photo/)
  })

  const base = { prompt: 'a portrait photo', width: 64, height: 64, steps: 2, seed: 5 }

  it('generates with IdentityNet from a keypoint photo, and strength 0 is no ControlNet', async () => {
    const [plain] = await engine.generate(base)
    const [guided] = await engine.generate({ ...base, controlnets: [{ model: TINY_INSTANTID, keypointsFrom: astronaut, strength: 0.6 }] })
    const [zero] = await engine.generate({ ...base, controlnets: [{ model: TINY_INSTANTID, keypointsFrom: astronaut, strength: 0 }] })
    const raw = (i: { data: Buffer }) => sharp(i.data).raw().toBuffer()
    expect((await raw(guided!)).equals(await raw(plain!))).toBe(false)
    expect((await raw(zero!)).equals(await raw(plain!))).toBe(true)
    expect(guided!.settings.controlnets).toEqual([{ name: 'instantid', strength: 0.6, start: 0, end: 1 }])
    // IdentityNet's default strength is the reference workflow's 0.6.
    const [byDefault] = await engine.generate({ ...base, controlnets: [{ model: TINY_INSTANTID, keypointsFrom: astronaut }] })
    expect(byDefault!.settings.controlnets?.[0]?.strength).toBe(0.6)
    expect((await raw(byDefault!)).equals(await raw(guided!))).toBe(true)
  })

  it('rejects NO_FACE for a keypoint photo without a face, and InstantID without one', async () => {
    expect((await rejection(engine.generate({ ...base, controlnets: [{ model: TINY_INSTANTID, keypointsFrom: grey }] }))).code).toBe('NO_FACE')
    expect((await rejection(engine.generate({ ...base, controlnets: [{ model: TINY_INSTANTID, image: grey }] }))).code).toBe('INVALID_ARGUMENT')
  })

  it('runs the Canny preprocessor on a control image, and refuses other preprocessors', async () => {
    // The tiny ControlNet's output barely depends on its image, so this checks the call path;
    // the edges themselves are compared with cv2.Canny in the Rust parity tests.
    const [edges] = await engine.generate({ ...base, controlnets: [{ model: TINY_CONTROLNET, image: astronaut, strength: 0.8, preprocess: 'canny', low: 50, high: 150 }] })
    expect(edges).toMatchObject({ width: 64, height: 64 })
    const bad = { model: TINY_CONTROLNET, image: astronaut, preprocess: 'sobel' as 'canny' }
    expect((await rejection(engine.generate({ ...base, controlnets: [bad] }))).code).toBe('INVALID_ARGUMENT')
  })
})
