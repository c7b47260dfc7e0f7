import * as fs from 'node:fs'
import * as path from 'node:path'

import sharp from 'sharp'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'

import { HyperLoRA, Identity, loadFaceAnalyzer, TINY_MODELS, type EngineProgress } from '../src/index.js'
import { tempDir, rejection } from './helpers.js'

const PHOTO = path.join(__dirname, '..', 'models', 'tiny', 'photos', 'astronaut.png')
const base = { prompt: 'a portrait photo', width: 64, height: 64, steps: 3, seed: 7 }

let engine: HyperLoRA
let me: Identity
const loadEvents: EngineProgress[] = []

beforeAll(async () => {
  engine = await HyperLoRA.load({ ...TINY_MODELS, device: 'cpu', onProgress: (e) => loadEvents.push(e) })
  me = await engine.createIdentity(PHOTO)
})

afterAll(async () => {
  await engine.dispose()
})

/** The decoded pixels of an encoded image. */
async function pixels(data: Buffer): Promise<Buffer> {
  return sharp(data).raw().toBuffer()
}

describe('HyperLoRA engine', () => {
  it('loads the four models and reports it', () => {
    expect(engine.device).toBe('cpu')
    expect(engine.models).toEqual(TINY_MODELS)
    expect(loadEvents.map((e) => [e.stage, e.step, e.totalSteps])).toEqual([
      ['loading', 0, 3],
      ['loading', 1, 3],
      ['loading', 2, 3],
      ['loading', 3, 3],
    ])
  })

  it('takes the default model for one not given, and names what is missing when it may not download', async () => {
    const { hyperlora: _, ...others } = TINY_MODELS
    const env = { HF_HOME: tempDir('hf'), HYPERLORA_HOME: tempDir('home') }
    const error = await rejection(HyperLoRA.load({ ...others, models: { download: false, env } }))
    expect(error.code).toBe('MODEL_NOT_FOUND')
    expect(error.message).toMatch(/hyperlora-fidelity/)
    expect(error.message).toMatch(/hyperlora pull/)
  })

  it('makes an identity from one photo, with the face and a preview', async () => {
    expect(me.photos).toHaveLength(1)
    expect(me.photos[0]!.index).toBe(0)
    expect(me.photos[0]!.face.score).toBeGreaterThan(0.5)
    expect((await sharp(me.photos[0]!.preview).metadata()).format).toBe('png')
    expect(me.warnings).toEqual([])
    expect(me.modules).toBeGreaterThan(0)
  })

  it('makes an identity from three photos given as a path, a Buffer and a Uint8Array, reporting face then identity', async () => {
    const bytes = fs.readFileSync(PHOTO)
    const events: EngineProgress[] = []
    const three = await engine.createIdentity([PHOTO, bytes, new Uint8Array(bytes)], { onProgress: (e) => events.push(e) })
    expect(three.photos.map((p) => p.index)).toEqual([0, 1, 2])
    expect(events.map((e) => [e.stage, e.step, e.totalSteps])).toEqual([
      ['face', 1, 3],
      ['face', 2, 3],
      ['face', 3, 3],
      ['identity', 1, 4],
      ['identity', 2, 4],
      ['identity', 3, 4],
      ['identity', 4, 4],
    ])
    const times = events.map((e) => e.elapsedMs)
    expect(times).toEqual([...times].sort((a, b) => a - b))
    // Three copies of one photo average to that photo's identity.
    const [one, avg] = await Promise.all([me.lora(), three.lora()])
    for (let m = 0; m < one.length; m += 17) {
      const a = one[m]!.down
      const b = avg[m]!.down
      for (let i = 0; i < a.length; i += 7) expect(Math.abs(a[i]! - b[i]!)).toBeLessThan(1e-4)
    }
  })

  it('skips a photo without a face with a warning, and rejects NO_FACE when none has one', async () => {
    const blank = await sharp({ create: { width: 128, height: 128, channels: 3, background: '#808080' } })
      .png()
      .toBuffer()
    const warned: string[] = []
    const identity = await engine.createIdentity([blank, PHOTO], { onWarning: (w) => warned.push(w) })
    expect(identity.photos.map((p) => p.index)).toEqual([1])
    expect(identity.warnings).toEqual(warned)
    expect(warned).toEqual(['photo 0 skipped: no face detected (tried 640, 512, 384 and 256)'])
    expect((await rejection(engine.createIdentity(blank))).code).toBe('NO_FACE')
    const missing = await rejection(engine.createIdentity([PHOTO, path.join(tempDir('nophoto'), 'me.jpg')]))
    expect(missing.code).toBe('INVALID_ARGUMENT')
    expect(missing.message).toMatch(/^cannot read image .*me\.jpg: no such file$/)
  })

  it('generates with an identity: stages in order, elapsed time, PNG parameters', async () => {
    const events: EngineProgress[] = []
    const [image] = await engine.generate({ ...base, identity: me, onProgress: (e) => events.push(e) })
    expect(events.map((e) => `${e.stage}:${e.step}/${e.totalSteps}`)).toEqual([
      'text:0/1',
      'text:1/1',
      'denoise:1/3',
      'denoise:2/3',
      'denoise:3/3',
      'decode:0/1',
      'decode:1/1',
    ])
    expect(events.every((e, i) => i === 0 || e.elapsedMs >= events[i - 1]!.elapsedMs)).toBe(true)
    const meta = await sharp(image!.data).metadata()
    expect(meta.comments?.[0]).toEqual({ keyword: 'parameters', text: image!.info })
    expect(image!.info).toMatch(/^fcsks fxhks fhyks, a portrait photo\nSteps: 3, .*Seed: 7, Size: 64x64, Lora weights: "identity: 0.85"/)
  })

  it('generates with two identities and with an extra LoRA file; weight 0 equals no identity', async () => {
    const dir = tempDir('engine')
    const file = path.join(dir, 'me.safetensors')
    await me.saveLora(file)
    const other = await HyperLoRA.loadIdentity(file)
    const noTrigger = { ...base, triggerWords: false as const }
    const [plain] = await engine.generate(noTrigger)
    const [zero] = await engine.generate({ ...noTrigger, identity: me, identityWeight: 0 })
    const [two] = await engine.generate({ ...noTrigger, identities: [{ identity: me, weight: 0.5 }, { identity: other, weight: 0.4 }] })
    const [lora] = await engine.generate({ ...noTrigger, identity: me, loras: [{ path: file, weight: 0.3 }] })
    expect((await pixels(zero!.data)).equals(await pixels(plain!.data))).toBe(true)
    expect((await pixels(two!.data)).equals(await pixels(plain!.data))).toBe(false)
    expect((await pixels(lora!.data)).equals(await pixels(two!.data))).toBe(false)
    expect(lora!.info).toMatch(/Lora weights: "identity: 0.85, me: 0.3"/)
  })

  it('picks a random seed when none is given and reports it', async () => {
    const { seed: _, ...unseeded } = base
    const [a] = await engine.generate(unseeded)
    const [b] = await engine.generate({ ...base, seed: a!.seed })
    expect(typeof a!.seed).toBe('number')
    expect(a!.info).toContain(`Seed: ${a!.seed}`)
    expect(b!.data.equals(a!.data)).toBe(true)
  })

  it('writes the parameters into JPEG and WebP as the EXIF UserComment', async () => {
    for (const format of ['jpeg', 'webp'] as const) {
      const [image] = await engine.generate({ ...base, steps: 1, format, prompt: 'Ångström 漢字' })
      const exif = (await sharp(image!.data).metadata()).exif!
      const at = exif.indexOf('UNICODE\0', 0, 'latin1') + 8
      expect(at).toBeGreaterThan(8)
      expect(Buffer.from(exif.subarray(at)).swap16().toString('utf16le')).toBe(image!.info)
    }
  })

  it('runs 8 concurrent calls, each equal to the same call run alone', async () => {
    const seeds = [1, 2, 3, 4, 1, 2, 3, 4]
    const alone = new Map<number, Buffer>()
    for (const seed of [1, 2, 3, 4]) alone.set(seed, (await engine.generate({ ...base, seed, identity: me }))[0]!.data)
    const together = await Promise.all(
      seeds.map((seed, i) => engine.generate({ ...base, seed, ...(i % 2 === 0 ? { identity: me } : { identity: me, identityWeight: 0.85 }) })),
    )
    together.forEach(([image], i) => expect(image!.data.equals(alone.get(seeds[i]!)!)).toBe(true))
  })

  it('aborts mid-denoise, and a call waiting in the queue leaves it when aborted', async () => {
    const controller = new AbortController()
    const steps: number[] = []
    const running = engine.generate({
      ...base,
      steps: 50,
      signal: controller.signal,
      onProgress: (e) => {
        if (e.stage === 'denoise') {
          steps.push(e.step)
          if (e.step === 2) controller.abort()
        }
      },
    })
    const waiting = new AbortController()
    const queued = engine.generate({ ...base, signal: waiting.signal })
    waiting.abort()
    const [a, b] = await Promise.all([rejection(running), rejection(queued)])
    expect([a.code, a.name, b.code]).toEqual(['ABORTED', 'AbortError', 'ABORTED'])
    expect(Math.max(...steps)).toBeLessThan(50)
    // The engine keeps working.
    expect(await engine.generate({ ...base, steps: 1 })).toHaveLength(1)
  })

  it('refineFaces re-draws the faces of a photo and leaves every pixel outside their crops as it was', async () => {
    const faces = await (await loadFaceAnalyzer(TINY_MODELS.faceModels)).detectFaces(PHOTO)
    expect(faces.length).toBeGreaterThan(0)
    const events: EngineProgress[] = []
    const options = { prompt: 'a face', steps: 4, seed: 1, size: 64, identity: me }
    const refined = await engine.refineFaces(PHOTO, { ...options, onProgress: (e) => events.push(e) })
    const again = await engine.refineFaces(PHOTO, options)
    expect(refined.data.equals(again.data)).toBe(true)
    expect(refined.info).toMatch(/Face refine strength: 0.5, Face refine size: 64/)
    expect(events.every((e) => e.stage === 'refine')).toBe(true)
    expect(events.at(-1)).toMatchObject({ step: events.at(-1)!.totalSteps })
    const [before, after] = await Promise.all([sharp(PHOTO).raw().toBuffer(), pixels(refined.data)])
    // Crops are squares of 3× the face box's longer side around its centre (the default padding).
    const inCrop = (x: number, y: number): boolean =>
      faces.some(({ bbox: [x1, y1, x2, y2] }) => {
        const half = (1.5 * Math.max(x2! - x1!, y2! - y1!)) + 1
        return Math.abs(x - (x1! + x2!) / 2) <= half && Math.abs(y - (y1! + y2!) / 2) <= half
      })
    let inside = 0
    for (let p = 0; p < before.length; p++) {
      if (before[p] === after[p]) continue
      const pixel = Math.floor(p / 3)
      expect(inCrop(pixel % 256, Math.floor(pixel / 256)), `pixel ${pixel}`).toBe(true)
      inside++
    }
    expect(inside).toBeGreaterThan(1000)
  })

  it('generate with refineFace: a picture without faces comes back as without it, the settings recorded', async () => {
    // The tiny random VAE cannot draw a face, so the detector finds none in its pictures; the pass
    // itself is checked on a photo above and, pixel by pixel, in the engine's tests.
    const [plain] = await engine.generate({ ...base, identity: me })
    const [refined] = await engine.generate({ ...base, identity: me, refineFace: { strength: 0.4 } })
    expect((await pixels(refined!.data)).equals(await pixels(plain!.data))).toBe(true)
    expect(refined!.info).toBe(`${plain!.info.replace(', Version', ', Face refine strength: 0.4, Face refine size: 1024, Version')}`)
  })

  it('generateMany batches mixed identities and matches the requests run one by one', async () => {
    const other = await Identity.interpolate(me, me, -1) // a different LoRA: -1·me
    const requests = [
      { ...base, seed: 11, identity: me },
      { ...base, seed: 12, identity: other, prompt: 'a painting' },
      { ...base, seed: 13 },
      { ...base, seed: 14, identities: [{ identity: me, weight: 0.85 }, { identity: other, weight: -0.5 }], batchSize: 2 },
      { ...base, seed: 15, width: 72, identity: me }, // another size: its own batch
    ]
    const events: EngineProgress[] = []
    const results = []
    for await (const result of engine.generateMany(requests, { maxBatchSize: 5, onProgress: (e) => events.push(e) })) results.push(result)
    expect(results.map((r) => r.index)).toEqual([0, 1, 2, 3, 4])
    expect(results.map((r) => r.images.length)).toEqual([1, 1, 1, 2, 1])
    // One batch of four requests (5 images) and one of one: two denoise runs of 3 steps.
    expect(events.filter((e) => e.stage === 'denoise')).toHaveLength(6)
    for (const [i, request] of requests.entries()) {
      const alone = await engine.generate(request)
      for (const [k, image] of results[i]!.images.entries()) {
        expect(image.info).toBe(alone[k]!.info)
        const [a, b] = await Promise.all([pixels(image.data), pixels(alone[k]!.data)])
        let worst = 0
        for (let p = 0; p < a.length; p++) worst = Math.max(worst, Math.abs(a[p]! - b[p]!))
        expect(worst, `request ${i} image ${k}`).toBeLessThanOrEqual(2)
      }
    }
  })

  it('dispose stops the running call, rejects queued ones and refuses new ones', async () => {
    const other = await HyperLoRA.load({ ...TINY_MODELS, device: 'cpu' })
    const running = other.generate({ ...base, steps: 200 })
    const settled = Promise.all([rejection(running), rejection(other.generate(base))])
    await new Promise((resolve) => setTimeout(resolve, 50))
    await other.dispose()
    const [a, b] = await settled
    expect([a.code, b.code]).toEqual(['ABORTED', 'ABORTED'])
    expect((await rejection(other.generate(base))).code).toBe('INVALID_ARGUMENT')
    expect((await rejection(other.createIdentity(PHOTO))).message).toMatch(/disposed/)
  })
})
