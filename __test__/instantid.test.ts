import * as path from 'node:path'

import sharp from 'sharp'
import { beforeAll, describe, expect, it } from 'vitest'

import { loadFaceAnalyzer, TINY_ANTELOPEV2, type FaceAnalyzer } from '../src/index.js'
import { rejection } from './helpers.js'

const astronaut = path.resolve(__dirname, '..', 'models', 'tiny', 'photos', 'astronaut.png')
let analyzer: FaceAnalyzer
let grey: Buffer

beforeAll(async () => {
  analyzer = await loadFaceAnalyzer(TINY_ANTELOPEV2)
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
})
