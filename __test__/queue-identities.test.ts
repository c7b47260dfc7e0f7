// Compact identities: coefficients out, the same LoRA back (bit-equal), only on their own model.
import * as fs from 'node:fs'
import * as path from 'node:path'

import sharp from 'sharp'
import { beforeAll, describe, expect, it } from 'vitest'

import { HyperLoraError, Identity, loadIdentity, loadIdentityEncoder, TINY_CLIP_VISION, TINY_HYPERLORA, type FaceConditions, type IdentityEncoder, type LoraModuleTensors } from '../src/index.js'
import { IdentityCache } from '../src/queue/identity-cache.js'
import { tempDir } from './helpers.js'

const dir = tempDir('queue-identities')
let encoder: IdentityEncoder

function arcface(seed: number): Float32Array {
  const v = Float32Array.from({ length: 512 }, (_, i) => Math.cos(i * seed + 0.3))
  const norm = Math.hypot(...v)
  return v.map((x) => x / norm)
}

async function photo(seed: number): Promise<FaceConditions> {
  const crop = (colour: number): Promise<Buffer> =>
    sharp({ create: { width: 224, height: 224, channels: 3, background: { r: colour, g: 90 + seed, b: 255 - colour } } })
      .png()
      .toBuffer()
  return { arcface: arcface(seed), clipCrop: await crop(30 * seed), baseCrop: await crop(20 * seed + 7) }
}

async function expectCode(p: Promise<unknown>, code: string, message?: RegExp): Promise<void> {
  const error = await p.then(
    () => undefined,
    (e: unknown) => e,
  )
  expect(error).toBeInstanceOf(HyperLoraError)
  expect((error as HyperLoraError).code).toBe(code)
  if (message) expect((error as HyperLoraError).message).toMatch(message)
}

function bits(modules: LoraModuleTensors[]): unknown[] {
  return modules.map((m) => ({
    name: m.name,
    alpha: m.alpha,
    down: Buffer.from(m.down.buffer, m.down.byteOffset, m.down.byteLength).toString('hex'),
    up: Buffer.from(m.up.buffer, m.up.byteOffset, m.up.byteLength).toString('hex'),
  }))
}

beforeAll(async () => {
  encoder = await loadIdentityEncoder(TINY_HYPERLORA, TINY_CLIP_VISION, { device: 'cpu', dtype: 'f32' })
})

describe('compact identities', () => {
  it('expand back to a bit-equal LoRA and Base-LoRA, at a fraction of the size', async () => {
    const identity = await encoder.createIdentity([await photo(1), await photo(2)])
    expect(identity.hasBaseLora).toBe(true)
    const coefficients = await identity.toCoefficients()
    const back = await Identity.fromCoefficients(encoder, coefficients)
    expect(bits(await back.lora())).toEqual(bits(await identity.lora()))
    expect(bits(await back.lora({ base: true }))).toEqual(bits(await identity.lora({ base: true })))
    expect(coefficients.length).toBeLessThan(identity.sizeBytes / 2)
    // The expanded identity has coefficients too, the same bytes.
    expect((await back.toCoefficients()).equals(coefficients)).toBe(true)
    // Saved LoRA files of both are the same bytes.
    await identity.saveLora(path.join(dir, 'a.safetensors'))
    await back.saveLora(path.join(dir, 'b.safetensors'))
    expect(fs.readFileSync(path.join(dir, 'a.safetensors')).equals(fs.readFileSync(path.join(dir, 'b.safetensors')))).toBe(true)
  })

  it('are refused by another HyperLoRA model, and when damaged', async () => {
    const coefficients = await (await encoder.createIdentity([await photo(3)])).toCoefficients()
    // A copy of the model with one changed file is another model (same shapes).
    const other = path.join(dir, 'other-hyperlora')
    fs.cpSync(TINY_HYPERLORA, other, { recursive: true })
    fs.appendFileSync(path.join(other, 'hyper_lora_config.json'), '\n')
    const otherEncoder = await loadIdentityEncoder(other, TINY_CLIP_VISION, { device: 'cpu', dtype: 'f32' })
    await expectCode(Identity.fromCoefficients(otherEncoder, coefficients), 'INVALID_ARGUMENT', /made by HyperLoRA model/)
    otherEncoder.dispose()

    await expectCode(Identity.fromCoefficients(encoder, coefficients.subarray(0, coefficients.length - 3)), 'INVALID_ARGUMENT', /coefficients/)
    await expectCode(Identity.fromCoefficients(encoder, Buffer.from('not coefficients at all, just some bytes of text')), 'INVALID_ARGUMENT')
    await expectCode(Identity.fromCoefficients(encoder, Buffer.alloc(0)), 'INVALID_ARGUMENT')
    const versioned = Buffer.from(coefficients)
    versioned.writeUInt32LE(99, 8)
    await expectCode(Identity.fromCoefficients(encoder, versioned), 'INVALID_ARGUMENT', /version 99/)
  })

  it('exist only for identities the hypernetwork made', async () => {
    const identity = await encoder.createIdentity([await photo(4)])
    const file = path.join(dir, 'saved.safetensors')
    await identity.saveLora(file)
    await expectCode((await loadIdentity(file)).toCoefficients(), 'INVALID_ARGUMENT', /no coefficients/)
    await expectCode((await Identity.interpolate(identity, identity, 0.5)).toCoefficients(), 'INVALID_ARGUMENT', /no coefficients/)
  })

  it('are kept expanded on workers in an LRU bounded by their memory', () => {
    const cache = new IdentityCache(100)
    const identity = (sizeBytes: number): Identity => ({ sizeBytes }) as Identity
    const [a, b, c] = [identity(40), identity(40), identity(40)]
    cache.set('a', a)
    cache.set('b', b)
    expect(cache.get('a')).toBe(a) // a is now the most recently used
    cache.set('c', c) // 120 > 100: b, the least recently used, goes
    expect([cache.get('a'), cache.get('b'), cache.get('c')]).toEqual([a, undefined, c])
    expect(cache.bytes).toBe(80)
    const big = identity(500)
    cache.set('big', big) // alone over the bound: it stays, the others go
    expect([cache.get('a'), cache.get('c'), cache.get('big')]).toEqual([undefined, undefined, big])
    expect(cache.bytes).toBe(500)
  })
})
