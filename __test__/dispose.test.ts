import * as path from 'node:path'

import { describe, expect, it } from 'vitest'

import {
  HyperLoRA,
  loadFaceAnalyzer,
  loadIdentityEncoder,
  loadPipeline,
  TINY_ANTELOPEV2,
  TINY_CLIP_VISION,
  TINY_HYPERLORA,
  TINY_MODELS,
  TINY_SDXL,
  type FaceAnalyzer,
  type FaceConditions,
  type IdentityEncoder,
  type Pipeline,
} from '../src/index.js'
import { rejection } from './helpers.js'

const PHOTO = path.join(__dirname, '..', 'models', 'tiny', 'photos', 'astronaut.png')
const request = { prompt: 'a portrait photo', width: 64, height: 64, steps: 1, seed: 3 }
const conditions: FaceConditions = { arcface: new Float32Array(512).fill(1 / Math.sqrt(512)), clipCrop: PHOTO }

describe('await using', () => {
  it('disposes the engine when its block ends', async () => {
    let escaped: HyperLoRA | undefined
    {
      await using engine = await HyperLoRA.load({ ...TINY_MODELS, device: 'cpu' })
      escaped = engine
      expect(await engine.generate(request)).toHaveLength(1)
    }
    const error = await rejection(escaped.generate(request))
    expect(error.code).toBe('INVALID_ARGUMENT')
    expect(error.message).toMatch(/disposed/)
  })

  it('disposes a pipeline, a face analyzer and an identity encoder when their block ends', async () => {
    let models: [Pipeline, FaceAnalyzer, IdentityEncoder] | undefined
    {
      await using pipeline = await loadPipeline(TINY_SDXL, { device: 'cpu' })
      await using faces = await loadFaceAnalyzer(TINY_ANTELOPEV2)
      await using encoder = await loadIdentityEncoder(TINY_HYPERLORA, TINY_CLIP_VISION, { device: 'cpu' })
      models = [pipeline, faces, encoder]
      expect(await pipeline.generate(request)).toHaveLength(1)
      expect(await faces.detectFaces(PHOTO)).not.toHaveLength(0)
      expect((await encoder.createIdentity([conditions])).photos).toEqual([])
    }
    const [pipeline, faces, encoder] = models
    expect((await rejection(pipeline.generate(request))).code).toBe('INVALID_ARGUMENT')
    expect((await rejection(faces.detectFaces(PHOTO))).code).toBe('INVALID_ARGUMENT')
    expect((await rejection(encoder.createIdentity([conditions]))).code).toBe('INVALID_ARGUMENT')
  })
})
