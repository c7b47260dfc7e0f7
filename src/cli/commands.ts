/** The CLI's `generate`, `identity` and `score` commands: photos and models in, files (or scores) out. */
import * as path from 'node:path'

import { HyperLoraError } from '../errors.js'
import { writeAtomic } from '../files.js'
import { loadFaceAnalyzer, TINY_ANTELOPEV2 } from '../face.js'
import { loadIdentity, loadIdentityEncoder, TINY_CLIP_VISION, TINY_HYPERLORA, type Identity } from '../identity.js'
import { scorePortraits, type ImageScore } from '../score.js'
import { HyperLoRA, MODEL_ENV, type EngineGenerateOptions } from '../engine.js'
import { DEFAULT_MODELS, resolveModel, type LoadRole } from '../models/index.js'
import { loadPipeline, TINY_SDXL, type GeneratedImage, type Sampler, type SigmaSchedule } from '../pipeline.js'
import type { StageEvent } from './progress-bar.js'
import { checkedInputFile, checkedOutputFile, numberFlag, seedFlag, usageError } from './flags.js'

/** The bundled random-weight models behind --tiny, and each model's flag. */
const MODELS = {
  checkpoint: { flag: 'checkpoint', tiny: TINY_SDXL },
  hyperlora: { flag: 'hyperlora', tiny: TINY_HYPERLORA },
  clipVision: { flag: 'clip-vision', tiny: TINY_CLIP_VISION },
  faceModels: { flag: 'face-models', tiny: TINY_ANTELOPEV2 },
} as const

/** The side the bundled tiny SDXL draws at (the demo's size): 1024² would take minutes of noise. */
export const TINY_IMAGE_SIZE = 128

export interface CommandValues {
  [key: string]: string | boolean | string[] | undefined
}

/** Reports a warning to the user (the CLI prints it, or puts it in the --json document). */
export type Warn = (message: string) => void

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

/**
 * Every model of `roles`, or one error listing each that is missing (not just the first), with
 * how to get them and how to try the CLI without them.
 */
async function models<R extends LoadRole>(values: CommandValues, roles: readonly R[]): Promise<Record<R, string>> {
  const settled = await Promise.allSettled(roles.map((role) => model(values, role)))
  const failures = settled.filter((s): s is PromiseRejectedResult => s.status === 'rejected').map((s) => s.reason as unknown)
  const other = failures.find((e) => !(e instanceof HyperLoraError && e.code === 'MODEL_NOT_FOUND'))
  if (other) throw other
  if (failures.length > 0) {
    // Each model's first line; the heading already says that these commands never download.
    const lines = (failures as HyperLoraError[]).map((e) => `  ${e.message.split('\n')[0]!.replace(/ and downloads are off \(download: false\)\.$/, '')}`)
    throw new HyperLoraError(
      'MODEL_NOT_FOUND',
      [
        `${failures.length === 1 ? '1 model is' : `${failures.length} models are`} not on this machine (generate and identity never download):`,
        ...lines,
        "Get the default models with 'npx hyperlora pull' (about 9 GB; 'npx hyperlora models' shows where they are looked for),",
        'or add --tiny to try the command on the small bundled random-weight models.',
      ].join('\n'),
    )
  }
  return Object.fromEntries(roles.map((role, i) => [role, (settled[i] as PromiseFulfilledResult<string>).value])) as Record<R, string>
}

function strings(values: CommandValues, key: string): string[] {
  const v = values[key]
  return Array.isArray(v) ? v : typeof v === 'string' ? [v] : []
}

type OnProgress = ((e: StageEvent) => void) | undefined

/** The four models of the engine, from flags, environment, --tiny or the defaults. */
export function engineModels(values: CommandValues): Promise<Record<LoadRole, string>> {
  return models(values, ['checkpoint', 'hyperlora', 'clipVision', 'faceModels'])
}

async function loadEngine(values: CommandValues, onProgress: OnProgress): Promise<HyperLoRA> {
  return HyperLoRA.load({ ...(await engineModels(values)), ...(onProgress && { onProgress }) })
}

/** The --face photos, each checked to exist before any model is loaded. */
function facePhotos(values: CommandValues): string[] {
  const faces = strings(values, 'face')
  if (faces.length === 0) throw usageError('give at least one --face photo')
  return faces.map((f) => checkedInputFile('face', f))
}

async function identityFromFaces(engine: HyperLoRA, faces: string[], values: CommandValues, onProgress: OnProgress, warn: Warn): Promise<Identity> {
  return engine.createIdentity(faces, { removeBackground: !values['keep-background'], onWarning: warn, ...(onProgress && { onProgress }) })
}

/** `hyperlora identity --face a.jpg [--face b.jpg] --out me.safetensors` */
export async function identityCommand(values: CommandValues, onProgress: OnProgress, warn: Warn): Promise<object> {
  const out = values['out']
  if (typeof out !== 'string') throw usageError('identity needs --out <file.safetensors>')
  const file = checkedOutputFile(out)
  const faces = facePhotos(values)
  const engine = await loadEngine(values, onProgress)
  const identity = await identityFromFaces(engine, faces, values, onProgress, warn).finally(() => engine.dispose())
  await identity.saveLora(file)
  return { output: file, modules: identity.modules, rank: identity.rank, photos: faces.length }
}

const FORMATS: Record<string, 'png' | 'jpeg' | 'webp'> = { '.png': 'png', '.jpg': 'jpeg', '.jpeg': 'jpeg', '.webp': 'webp' }

/** Everything `generate` reads from its flags, checked before any model is loaded. */
function generateOptions(values: CommandValues, prompt: string): Omit<EngineGenerateOptions, 'onProgress' | 'identity'> & { out: string | undefined } {
  const out = typeof values['out'] === 'string' ? checkedOutputFile(values['out']) : undefined
  const format = out === undefined ? 'png' : FORMATS[path.extname(out).toLowerCase()]
  if (!format) throw usageError(`--out must end in .png, .jpg or .webp, got ${values['out'] as string}`)
  const loras = strings(values, 'lora').map((spec) => {
    // `path:weight`; a colon that is not followed by a number belongs to the path (C:\…).
    const weighted = /^(.*):(-?\d*\.?\d+)$/.exec(spec)
    return { path: checkedInputFile('lora', weighted ? weighted[1]! : spec), weight: weighted ? Number(weighted[2]) : 1 }
  })
  const controlnets = strings(values, 'controlnet').map((spec) => {
    // `model:image[:strength][:canny]`, or InstantID's `model:keypoints=photo[:strength]`.
    const parts = /^([^:]+):(.+?)(?::(\d*\.?\d+))?(:canny)?$/.exec(spec)
    if (!parts) throw usageError(`--controlnet takes model:image[:strength][:canny] or instantid:keypoints=photo[:strength], got ${spec}`)
    const keypoints = /^keypoints=(.+)$/.exec(parts[2]!)
    return {
      model: parts[1]!,
      ...(keypoints ? { keypointsFrom: checkedInputFile('controlnet keypoints', keypoints[1]!) } : { image: checkedInputFile('controlnet', parts[2]!) }),
      ...(parts[3] !== undefined && { strength: Number(parts[3]) }),
      ...(parts[4] !== undefined && { preprocess: 'canny' as const }),
    }
  })
  const size = values['tiny'] ? TINY_IMAGE_SIZE : undefined
  const numbers = {
    identityWeight: numberFlag(values, 'identity-weight'),
    steps: numberFlag(values, 'steps'),
    cfg: numberFlag(values, 'cfg'),
    width: numberFlag(values, 'width') ?? size,
    height: numberFlag(values, 'height') ?? size,
  }
  const seed = seedFlag(values)
  const bestOf = numberFlag(values, 'best-of')
  return {
    out,
    ...(bestOf !== undefined && { bestOf }),
    prompt,
    loras,
    ...(controlnets.length > 0 && { controlnets }),
    format,
    ...Object.fromEntries(Object.entries(numbers).filter(([, v]) => v !== undefined)),
    ...(seed !== undefined && { seed }),
    ...(typeof values['negative'] === 'string' && { negativePrompt: values['negative'] }),
    ...(typeof values['sampler'] === 'string' && { sampler: values['sampler'] as Sampler }),
    ...(typeof (values['schedule'] ?? values['scheduler']) === 'string' && { schedule: (values['schedule'] ?? values['scheduler']) as SigmaSchedule }),
    ...(values['refine-face'] && { refineFace: true }),
  }
}

/** `hyperlora generate --prompt … [--face a.jpg | --identity me.safetensors] [--out out.png] …` */
export async function generateCommand(values: CommandValues, onProgress: OnProgress, warn: Warn): Promise<object> {
  const prompt = values['prompt']
  if (typeof prompt !== 'string') throw usageError('generate needs --prompt "<text>"')
  const savedIdentity = typeof values['identity'] === 'string' ? checkedInputFile('identity', values['identity']) : undefined
  const faces = strings(values, 'face').length > 0 ? facePhotos(values) : []
  if (savedIdentity !== undefined && faces.length > 0) throw usageError('give --face photos or --identity, not both')
  const { out, refineFace, bestOf, controlnets, ...rest } = generateOptions(values, prompt)
  // ControlNets by manifest name or path, never downloaded (as the other models here).
  const comfyui = values['comfyui']
  const resolved = await Promise.all(
    (controlnets ?? []).map(async (c) => ({
      ...c,
      model: await resolveModel('controlnet', c.model as string, { download: false, ...(typeof comfyui === 'string' && { comfyuiModels: comfyui }) }),
    })),
  )
  const options = { ...rest, ...(resolved.length > 0 && { controlnets: resolved }) }
  // Photos, InstantID's keypoint photos, the face refine pass and best-of-N need all four models;
  // otherwise SDXL alone does.
  const keypoints = resolved.some((c) => 'keypointsFrom' in c)
  const engine = faces.length > 0 || refineFace || keypoints || bestOf !== undefined ? await loadEngine(values, onProgress) : undefined
  const pipeline = engine ? undefined : await loadPipeline((await models(values, ['checkpoint'])).checkpoint)
  let image: GeneratedImage | undefined
  let candidates: { seed: number | string; scores: ImageScore | undefined }[] | undefined
  try {
    const identity = savedIdentity ? await loadIdentity(savedIdentity) : engine && faces.length > 0 ? await identityFromFaces(engine, faces, values, onProgress, warn) : undefined
    const request = { ...options, ...(identity && { identity }), ...(onProgress && { onProgress }) }
    const images = engine ? await engine.generate({ ...request, ...(refineFace && { refineFace }), ...(bestOf !== undefined && { bestOf }) }) : await pipeline!.generate(request)
    image = images[0]
    if (bestOf !== undefined) candidates = images.map((c) => ({ seed: jsonSeed(c.seed), scores: 'scores' in c ? (c.scores as ImageScore | undefined) : undefined }))
  } finally {
    await engine?.dispose()
    pipeline?.dispose()
  }
  if (!image) throw new HyperLoraError('INTERNAL', 'no image was generated')
  for (const warning of image.warnings) warn(warning)
  const file = out ?? path.resolve(`hyperlora-${image.seed}.${image.format === 'jpeg' ? 'jpg' : image.format}`)
  writeAtomic(file, image.data)
  return { output: file, seed: jsonSeed(image.seed), width: image.width, height: image.height, info: image.info, ...(candidates && { candidates }) }
}

/** Seeds above 2^53 are bigints, which JSON cannot hold: those are written as strings. */
function jsonSeed(seed: number | bigint): number | string {
  return typeof seed === 'bigint' ? seed.toString() : seed
}

/** `hyperlora score [--identity me.safetensors | --face a.jpg…] [--prompt …] img…`: the scores of
 * each picture, in the order given. Loads only the face models, CLIP and the hypernetwork folder's
 * encoder (not SDXL). */
export async function scoreCommand(values: CommandValues, files: readonly string[], onProgress: OnProgress): Promise<{ images: (ImageScore & { file: string })[] }> {
  if (files.length === 0) throw usageError('score needs at least one picture: hyperlora score [--identity me.safetensors] [--prompt "…"] a.png b.png')
  const images = files.map((f) => checkedInputFile('image', f))
  const savedIdentity = typeof values['identity'] === 'string' ? checkedInputFile('identity', values['identity']) : undefined
  const faces = strings(values, 'face').length > 0 ? facePhotos(values) : []
  if (savedIdentity !== undefined && faces.length > 0) throw usageError('give --face photos or --identity, not both')
  const prompt = typeof values['prompt'] === 'string' ? values['prompt'] : undefined
  if (savedIdentity === undefined && faces.length === 0 && prompt === undefined) throw usageError('give --identity (or --face photos) and/or --prompt')
  const paths = await models(values, ['hyperlora', 'clipVision', 'faceModels'])
  const identity = savedIdentity ? await loadIdentity(savedIdentity) : undefined
  const [analyzer, encoder] = await Promise.all([loadFaceAnalyzer(paths.faceModels), loadIdentityEncoder(paths.hyperlora, paths.clipVision)])
  try {
    const scores = await scorePortraits(analyzer, encoder, images, {
      identity,
      ...(faces.length > 0 && { photos: faces }),
      prompt,
      ...(onProgress && { onProgress }),
    })
    return { images: scores.map((s, i) => ({ file: images[i]!, ...s })) }
  } finally {
    analyzer.dispose()
    encoder.dispose()
  }
}

/** The scores as a table, one picture a line. */
export function scoreTable(result: { images: (ImageScore & { file: string })[] }): string {
  const cell = (v: number | null | undefined): string => (v === null || v === undefined ? '-' : v.toFixed(4))
  const rows = result.images.map((s) => [
    path.relative(process.cwd(), s.file) || s.file,
    cell(s.likeness),
    cell(s.promptAlignment),
    s.face ? `[${s.face.map((v) => v.toFixed(0)).join(', ')}]` : (s.likenessReason ?? ''),
  ])
  const table = [['image', 'likeness', 'prompt', 'face'], ...rows]
  const widths = table[0]!.map((_, c) => Math.max(...table.map((r) => r[c]!.length)))
  return table.map((r) => r.map((v, c) => v.padEnd(widths[c]!)).join('  ').trimEnd()).join('\n')
}
