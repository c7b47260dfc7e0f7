/** The CLI's `generate` and `identity` commands: photos and models in, files out. */
import * as path from 'node:path'

import { HyperLoraError } from './errors.js'
import { writeAtomic } from './files.js'
import { TINY_ANTELOPEV2 } from './face.js'
import { loadIdentity, TINY_CLIP_VISION, TINY_HYPERLORA, type Identity } from './identity.js'
import { HyperLoRA, MODEL_ENV, type EngineGenerateOptions } from './engine.js'
import { DEFAULT_MODELS, resolveModel } from './models/index.js'
import { loadPipeline, TINY_SDXL, type Sampler, type SigmaScheduler } from './pipeline.js'
import type { StageEvent } from './progress-bar.js'

export class UsageError extends Error {}

/** The bundled random-weight models behind --tiny, and each model's flag. */
const MODELS = {
  checkpoint: { flag: 'checkpoint', tiny: TINY_SDXL },
  hyperlora: { flag: 'hyperlora', tiny: TINY_HYPERLORA },
  clipVision: { flag: 'clip-vision', tiny: TINY_CLIP_VISION },
  faceModels: { flag: 'face-models', tiny: TINY_ANTELOPEV2 },
} as const

export interface CommandValues {
  [key: string]: string | boolean | string[] | undefined
}

/**
 * A model's local path: the flag, else its environment variable, else (with --tiny) the bundled
 * one, else the manifest default. A path, manifest name or repo id; never downloads: a model
 * that is not on this machine is an error that names it and says to run `hyperlora pull`.
 */
async function model(values: CommandValues, role: keyof typeof MODELS): Promise<string> {
  const m = MODELS[role]
  const given = values[m.flag] ?? process.env[MODEL_ENV[role]]
  const named = typeof given === 'string' && given.length > 0 ? given : undefined
  if (named === undefined && values['tiny']) return m.tiny
  const comfyui = values['comfyui']
  return resolveModel(role, named ?? DEFAULT_MODELS[role], { download: false, ...(typeof comfyui === 'string' && { comfyuiModels: comfyui }) })
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

type OnProgress = ((e: StageEvent) => void) | undefined

/** The four models of the engine, from flags, environment, --tiny or the defaults. */
async function loadEngine(values: CommandValues, onProgress: OnProgress): Promise<HyperLoRA> {
  const [checkpoint, hyperlora, clipVision, faceModels] = await Promise.all(ROLES.map((role) => model(values, role)))
  return HyperLoRA.load({ checkpoint: checkpoint!, hyperlora: hyperlora!, clipVision: clipVision!, faceModels: faceModels!, ...(onProgress && { onProgress }) })
}

const ROLES = ['checkpoint', 'hyperlora', 'clipVision', 'faceModels'] as const

async function identityFromFaces(engine: HyperLoRA, values: CommandValues, onProgress: OnProgress, warn: (m: string) => void): Promise<Identity> {
  const faces = strings(values, 'face')
  if (faces.length === 0) throw new UsageError('give at least one --face photo')
  return engine.createIdentity(faces, { removeBackground: !values['keep-background'], onWarning: warn, ...(onProgress && { onProgress }) })
}

/** `hyperlora identity --face a.jpg [--face b.jpg] --out me.safetensors` */
export async function identityCommand(values: CommandValues, onProgress: OnProgress, warn: (m: string) => void): Promise<object> {
  const out = values['out']
  if (typeof out !== 'string') throw new UsageError('identity needs --out <file.safetensors>')
  const engine = await loadEngine(values, onProgress)
  const identity = await identityFromFaces(engine, values, onProgress, warn).finally(() => engine.dispose())
  const file = path.resolve(out)
  await identity.saveLora(file)
  return { output: file, modules: identity.modules, rank: identity.rank, photos: strings(values, 'face').length }
}

/** `hyperlora generate --prompt … [--face a.jpg | --identity me.safetensors] [--out out.png] …` */
export async function generateCommand(values: CommandValues, onProgress: OnProgress, warn: (m: string) => void): Promise<object> {
  const prompt = values['prompt']
  if (typeof prompt !== 'string') throw new UsageError('generate needs --prompt "<text>"')
  const savedIdentity = values['identity']
  if (typeof savedIdentity === 'string' && strings(values, 'face').length > 0) throw new UsageError('give --face photos or --identity, not both')
  // Photos and the face refine pass need all four models; a saved identity needs only SDXL.
  const engine = strings(values, 'face').length > 0 || values['refine-face'] ? await loadEngine(values, onProgress) : undefined
  try {
    const identity =
      typeof savedIdentity === 'string' ? await loadIdentity(savedIdentity) : engine ? await identityFromFaces(engine, values, onProgress, warn) : undefined
    return await draw(values, prompt, identity, engine, onProgress, warn)
  } finally {
    await engine?.dispose()
  }
}

async function draw(values: CommandValues, prompt: string, identity: Identity | undefined, engine: HyperLoRA | undefined, onProgress: OnProgress, warn: (m: string) => void): Promise<object> {
  const loras = strings(values, 'lora').map((spec) => {
    const at = spec.lastIndexOf(':')
    const weight = at > 0 ? Number(spec.slice(at + 1)) : 1
    if (!Number.isFinite(weight)) throw new UsageError(`--lora ${spec}: expected path[:weight]`)
    return { path: at > 0 ? spec.slice(0, at) : spec, weight }
  })
  const format = path.extname(typeof values['out'] === 'string' ? values['out'] : '.png').slice(1).replace('jpg', 'jpeg') || 'png'
  if (!['png', 'jpeg', 'webp'].includes(format)) throw new UsageError(`--out must end in .png, .jpg or .webp`)
  const seed = values['seed'] === undefined ? undefined : parseSeed(values['seed'])
  const options: Omit<EngineGenerateOptions, 'onProgress'> = {
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
  }
  const refine = values['refine-face'] ? { refineFace: true } : {}
  const [image] = engine
    ? await engine.generate({ ...options, ...refine, ...(onProgress && { onProgress }) })
    : await (await loadPipeline(await model(values, 'checkpoint'))).generate({ ...options, ...(onProgress && { onProgress: (e) => onProgress(e) }) })
  if (!image) throw new HyperLoraError('INTERNAL', 'no image was generated')
  image.warnings.forEach(warn)
  const file = path.resolve(typeof values['out'] === 'string' ? values['out'] : `hyperlora-${image.seed}.${format === 'jpeg' ? 'jpg' : format}`)
  writeAtomic(file, image.data)
  return { output: file, seed: image.seed.toString(), width: image.width, height: image.height, info: image.info }
}
