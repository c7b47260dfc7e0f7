/** The CLI's `generate` and `identity` commands: photos and models in, files out. */
import * as fs from 'node:fs'
import * as path from 'node:path'

import { HyperLoraError } from './errors.js'
import { loadFaceAnalyzer, TINY_ANTELOPEV2 } from './face.js'
import { loadIdentity, loadIdentityEncoder, TINY_CLIP_VISION, TINY_HYPERLORA, type Identity } from './identity.js'
import type { ProgressEvent } from './native.js'
import { loadPipeline, TINY_SDXL, type GenerateOptions, type Sampler, type SigmaScheduler } from './pipeline.js'

export class UsageError extends Error {}

/** Where each model comes from: a flag, else an environment variable, else (with --tiny) the bundled one. */
const MODELS = {
  checkpoint: { flag: 'checkpoint', env: 'HYPERLORA_CHECKPOINT', tiny: TINY_SDXL },
  hyperlora: { flag: 'hyperlora', env: 'HYPERLORA_MODEL', tiny: TINY_HYPERLORA },
  clipVision: { flag: 'clip-vision', env: 'HYPERLORA_CLIP_VISION', tiny: TINY_CLIP_VISION },
  faceModels: { flag: 'face-models', env: 'HYPERLORA_FACE_MODELS', tiny: TINY_ANTELOPEV2 },
} as const

export interface CommandValues {
  [key: string]: string | boolean | string[] | undefined
}

function model(values: CommandValues, which: keyof typeof MODELS): string {
  const m = MODELS[which]
  const given = values[m.flag] ?? process.env[m.env]
  if (typeof given === 'string' && given.length > 0) return given
  if (values['tiny']) return m.tiny
  throw new UsageError(`no ${m.flag} model: pass --${m.flag} <path> or set ${m.env} (or --tiny for the bundled random-weight models)`)
}

function number(values: CommandValues, key: string): number | undefined {
  const v = values[key]
  if (v === undefined) return undefined
  const n = Number(v)
  if (typeof v !== 'string' || v.trim() === '' || !Number.isFinite(n)) throw new UsageError(`--${key} must be a number, got ${String(v)}`)
  return n
}

function strings(values: CommandValues, key: string): string[] {
  const v = values[key]
  return Array.isArray(v) ? v : typeof v === 'string' ? [v] : []
}

function parseSeed(value: unknown): bigint {
  if (typeof value === 'string' && /^\d+$/.test(value)) return BigInt(value)
  throw new UsageError(`--seed must be a non-negative integer, got ${String(value)}`)
}

/** Writes next to the target, then renames: a reader never sees a half-written file. */
export function writeAtomic(file: string, data: Buffer): void {
  const temp = `${file}.${process.pid}.tmp`
  fs.writeFileSync(temp, data)
  fs.renameSync(temp, file)
}

async function identityFromFaces(values: CommandValues, onProgress: ((e: ProgressEvent) => void) | undefined, warn: (m: string) => void): Promise<Identity> {
  const faces = strings(values, 'face')
  if (faces.length === 0) throw new UsageError('give at least one --face photo')
  const [analyzer, encoder] = await Promise.all([
    loadFaceAnalyzer(model(values, 'faceModels')),
    loadIdentityEncoder(model(values, 'hyperlora'), model(values, 'clipVision')),
  ])
  const { faces: found } = await analyzer.analyzeFaces(faces, {
    clipSize: encoder.clipImageSize,
    removeBackground: !values['keep-background'],
    onWarning: (w) => warn(`photo ${w.index} (${w.name ?? '?'}) skipped: ${w.message}`),
  })
  return encoder.createIdentity(
    found.map((f) => f.conditions),
    { onProgress },
  )
}

/** `hyperlora identity --face a.jpg [--face b.jpg] --out me.safetensors` */
export async function identityCommand(values: CommandValues, onProgress: ((e: ProgressEvent) => void) | undefined, warn: (m: string) => void): Promise<object> {
  const out = values['out']
  if (typeof out !== 'string') throw new UsageError('identity needs --out <file.safetensors>')
  const identity = await identityFromFaces(values, onProgress, warn)
  const file = path.resolve(out)
  await identity.saveLora(file)
  return { output: file, modules: identity.modules, rank: identity.rank, photos: strings(values, 'face').length }
}

/** `hyperlora generate --prompt … [--face a.jpg | --identity me.safetensors] [--out out.png] …` */
export async function generateCommand(values: CommandValues, onProgress: ((e: ProgressEvent) => void) | undefined, warn: (m: string) => void): Promise<object> {
  const prompt = values['prompt']
  if (typeof prompt !== 'string') throw new UsageError('generate needs --prompt "<text>"')
  const savedIdentity = values['identity']
  if (typeof savedIdentity === 'string' && strings(values, 'face').length > 0) throw new UsageError('give --face photos or --identity, not both')
  const identity =
    typeof savedIdentity === 'string'
      ? await loadIdentity(savedIdentity)
      : strings(values, 'face').length > 0
        ? await identityFromFaces(values, undefined, warn)
        : undefined
  const loras = strings(values, 'lora').map((spec) => {
    const at = spec.lastIndexOf(':')
    const weight = at > 0 ? Number(spec.slice(at + 1)) : 1
    if (!Number.isFinite(weight)) throw new UsageError(`--lora ${spec}: expected path[:weight]`)
    return { path: at > 0 ? spec.slice(0, at) : spec, weight }
  })
  const pipeline = await loadPipeline(model(values, 'checkpoint'))
  const format = path.extname(typeof values['out'] === 'string' ? values['out'] : '.png').slice(1).replace('jpg', 'jpeg') || 'png'
  if (!['png', 'jpeg', 'webp'].includes(format)) throw new UsageError(`--out must end in .png, .jpg or .webp`)
  const seed = values['seed'] === undefined ? undefined : parseSeed(values['seed'])
  const options: GenerateOptions = {
    prompt,
    loras,
    format: format as 'png' | 'jpeg' | 'webp',
    ...(identity && { identity }),
    ...(seed !== undefined && { seed }),
    ...(typeof values['negative'] === 'string' && { negativePrompt: values['negative'] }),
    ...(number(values, 'identity-weight') !== undefined && { identityWeight: number(values, 'identity-weight')! }),
    ...(number(values, 'steps') !== undefined && { steps: number(values, 'steps')! }),
    ...(number(values, 'cfg') !== undefined && { cfg: number(values, 'cfg')! }),
    ...(number(values, 'width') !== undefined && { width: number(values, 'width')! }),
    ...(number(values, 'height') !== undefined && { height: number(values, 'height')! }),
    ...(typeof values['sampler'] === 'string' && { sampler: values['sampler'] as Sampler }),
    ...(typeof values['scheduler'] === 'string' && { scheduler: values['scheduler'] as SigmaScheduler }),
    ...(onProgress && { onProgress }),
  }
  const [image] = await pipeline.generate(options)
  if (!image) throw new HyperLoraError('INTERNAL', 'no image was generated')
  const file = path.resolve(typeof values['out'] === 'string' ? values['out'] : `hyperlora-${image.seed}.${format === 'jpeg' ? 'jpg' : format}`)
  writeAtomic(file, image.data)
  return { output: file, seed: image.seed.toString(), width: image.width, height: image.height, info: image.info }
}
