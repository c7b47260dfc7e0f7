import * as path from 'node:path'

import sharp from 'sharp'
import { beforeAll, describe, expect, it } from 'vitest'

import {
  HyperLoraError,
  loadFaceAnalyzer,
  loadIdentityEncoder,
  loadPipeline,
  TINY_ANTELOPEV2,
  TINY_CLIP_VISION,
  TINY_HYPERLORA,
  TINY_SDXL,
  type FaceAnalyzer,
} from '../src/index.js'

const astronaut = path.resolve(__dirname, '..', 'models', 'tiny', 'photos', 'astronaut.png')
let analyzer: FaceAnalyzer
let grey: Buffer

beforeAll(async () => {
  analyzer = await loadFaceAnalyzer(TINY_ANTELOPEV2)
  grey = await sharp({ create: { width: 200, height: 150, channels: 3, background: { r: 127, g: 127, b: 127 } } })
    .png()
    .toBuffer()
})

describe('face analysis from TypeScript', () => {
  it('detects faces with boxes, keypoints and 106 landmarks', async () => {
    const faces = await analyzer.detectFaces(astronaut)
    expect(faces.length).toBeGreaterThan(0)
    const [best] = faces
    expect(best!.bbox).toHaveLength(4)
    expect(best!.keypoints).toHaveLength(5)
    expect(best!.landmarks).toHaveLength(106)
    expect(faces.map((f) => f.score)).toEqual([...faces.map((f) => f.score)].sort((a, b) => b - a))
  })

  it('applies EXIF orientation: a rotated-EXIF photo gives the same boxes as the upright one', async () => {
    // Pixels stored turned 90° anticlockwise with orientation 6 ("rotate 90° clockwise to view").
    const rotated = await sharp(astronaut).rotate(270).withMetadata({ orientation: 6 }).webp({ lossless: true }).toBuffer()
    expect((await sharp(rotated).metadata()).orientation).toBe(6)
    expect(await analyzer.detectFaces(rotated)).toEqual(await analyzer.detectFaces(astronaut))
  })

  it('skips photos without a face with a warning, and fails with NO_FACE naming the photo when none has one', async () => {
    const warnings: unknown[] = []
    const result = await analyzer.analyzeFaces([grey, astronaut], { clipSize: 28, onWarning: (w) => warnings.push(w) })
    expect(result.faces.map((f) => f.index)).toEqual([1])
    expect(result.skipped).toHaveLength(1)
    expect(warnings).toEqual([expect.objectContaining({ index: 0 })])
    const [face] = result.faces
    expect(face!.conditions.arcface).toHaveLength(512)
    expect((await sharp(face!.preview).metadata()).width).toBe(512)

    const error = (await analyzer.analyzeFaces([astronaut, grey].slice(1)).catch((e: unknown) => e)) as HyperLoraError
    expect(error).toBeInstanceOf(HyperLoraError)
    expect(error.code).toBe('NO_FACE')
    expect(error.message).toMatch(/photo 0/)
    const missing = (await loadFaceAnalyzer(path.join(TINY_ANTELOPEV2, 'nope')).catch((e: unknown) => e)) as HyperLoraError
    expect(missing.code).toBe('MODEL_NOT_FOUND')
  })

  it('runs the whole chain: photo → face → identity → portrait', async () => {
    const encoder = await loadIdentityEncoder(TINY_HYPERLORA, TINY_CLIP_VISION, { device: 'cpu' })
    const face = await analyzer.analyzeFace(astronaut, { clipSize: encoder.clipImageSize, face: 'largest' })
    expect(face.conditions.clipCrop).toMatchObject({ width: encoder.clipImageSize, height: encoder.clipImageSize })
    const identity = await encoder.createIdentity([face.conditions])
    const sdxl = await loadPipeline(TINY_SDXL, { device: 'cpu' })
    const [image] = await sdxl.generate({ prompt: 'a portrait', identity, width: 64, height: 64, steps: 3, seed: 1 })
    expect((await sharp(image!.data).metadata()).format).toBe('png')
  })
})
