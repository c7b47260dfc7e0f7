import { randomInt } from 'node:crypto'
import * as path from 'node:path'

import type * as Binding from '../index.js'
import './dispose.js'
import { HyperLoraError } from './errors.js'
import type { Identity } from './identity.js'
import { decodeRgb8, encodeWithParameters, type ImageFormat, type ImageInput } from './images.js'
import { a1111Parameters } from './metadata.js'
import { callNative, native, type CallOptions } from './native.js'

/** Samplers, as diffusers' schedulers of the same names (A1111: Euler, Euler a, DPM++ 2M, DPM++ 2M SDE, DDIM). */
export type Sampler = 'euler' | 'euler_ancestral' | 'dpmpp_2m' | 'dpmpp_2m_sde' | 'ddim'
/** Sigma schedules (A1111's "Schedule type"). */
export type SigmaScheduler = 'normal' | 'karras' | 'exponential'
/** Where models run; `auto` picks CUDA or Metal when the binary and the machine have it. */
export type DeviceName = 'auto' | 'cpu' | 'cuda' | 'metal'
/** Weight and activation precision; `auto` is f16 on GPUs, f32 on the CPU. */
export type Precision = 'auto' | 'f32' | 'f16' | 'bf16'

const packageRoot = path.resolve(__dirname, '..')

/** The small random-weight SDXL bundled for the demo and tests (diffusers layout). */
export const TINY_SDXL = path.join(packageRoot, 'models', 'tiny', 'sdxl')

/** CLIP's BPE merges, for single-file checkpoints (they carry no tokenizer). */
export const CLIP_MERGES = path.join(packageRoot, 'models', 'clip-tokenizer', 'merges.txt')

/** Options of {@link loadPipeline}. */
export interface LoadPipelineOptions {
  /** Default `auto`: CUDA or Metal when this build has it and a device exists, else the CPU. */
  device?: DeviceName
  /** Default `auto`: f16 on GPUs, f32 on the CPU. */
  dtype?: Precision
  /** A diffusers folder with the configs and tokenizers a single-file checkpoint lacks
   * (like diffusers' `config=`). Without it, SDXL base's published configs are used. */
  configDir?: string
  signal?: AbortSignal
}

/** One generation request. */
export interface GenerateOptions extends CallOptions {
  prompt: string
  negativePrompt?: string
  /** Default 1024; a multiple of 8. */
  width?: number
  /** Default 1024; a multiple of 8. */
  height?: number
  /** Default 20. */
  steps?: number
  /** Classifier-free guidance scale; default 5. At 1 or below the negative prompt is unused. */
  cfg?: number
  /** Default `dpmpp_2m` (DPM++ 2M). */
  sampler?: Sampler
  /** Sigma schedule; default `karras`. */
  scheduler?: SigmaScheduler
  /** Same seed, same picture: a whole number in [0, 2^64) (a bigint above 2^53). Image `k` of a
   * batch is drawn from `seed + k` (A1111's numbering), so each image's reported seed redraws it
   * alone; a single image is the same as diffusers' with `torch.Generator().manual_seed(seed)`.
   * Default: random, reported back in the result. */
  seed?: number | bigint
  /** Images in one batch (one UNet pass); default 1. */
  batchSize?: number
  /** Image-to-image: start from this picture (centre-cropped to width × height). */
  initImage?: ImageInput
  /** How much of `initImage` is re-drawn, 0..1; default 0.75. */
  strength?: number
  /** Default `png`. */
  format?: ImageFormat
  /** The person to draw (from `createIdentity` or `loadIdentity`), at `identityWeight`. */
  identity?: Identity
  /** LoRA weight of `identity`; default 0.85 (the HyperLoRA authors' recommendation). */
  identityWeight?: number
  /** Several identities with their own weights, which may be negative: a concept slider is
   * `[{ identity: a, weight: -0.7 }, { identity: b, weight: 0.7 }]`. */
  identities?: readonly { identity: Identity; weight: number }[]
  /** Other LoRA files (kohya with diffusers or SGM names, diffusers/PEFT), e.g. styles. */
  loras?: readonly { path: string; weight: number }[]
  /** Prepended to the prompt when an identity is active, unless the prompt already starts with
   * them; `false` turns this off. Default `'fcsks fxhks fhyks, '` (HyperLoRA's trigger words). */
  triggerWords?: string | false
}

/** The face refine pass ("face detailer"): each face is cropped with context, re-drawn at
 * `size` with the same identity and sampler, and blended back with a feathered mask. */
export interface RefineFaceOptions {
  /** How much of the face is re-drawn, (0, 1]; default 0.5. */
  strength?: number
  /** Scheduler steps; `steps × strength` of them run. Default: the image's steps. */
  steps?: number
  /** Side the square face crop is re-drawn at (a multiple of 8); default 1024. */
  size?: number
  /** Crop side as a multiple of the face box's longer side; default 3 (head and shoulders). */
  padding?: number
  /** Smallest crop side in pixels; default 128. */
  minSize?: number
  /** Mask growth around the face box, pixels; default 10. */
  dilate?: number
  /** Mask edge softness (Gaussian sigma), pixels; default 5. */
  feather?: number
  /** `all` detected faces (default) or only the `largest`. */
  faces?: 'all' | 'largest'
  /** A prompt for the face pass; default: the image's prompt. */
  prompt?: string
}

/** HyperLoRA's identity LoRAs were trained with these words at the start of the prompt. */
export const TRIGGER_WORDS = 'fcsks fxhks fhyks, '

function withTriggerWords(prompt: string, words: string | false): string {
  if (words === false || words.length === 0) return prompt
  return prompt.startsWith(words.trim()) ? prompt : words + prompt
}

/** A generated picture, encoded, with its settings. */
export interface GeneratedImage {
  /** The encoded image. */
  data: Buffer
  format: ImageFormat
  width: number
  height: number
  /** The seed that draws this image alone: the request's seed plus the image's position in its
   * batch. A `number` when it is a safe integer (so `JSON.stringify` works), else a `bigint`. */
  seed: number | bigint
  /** Position in its batch. */
  index: number
  /** The generation settings in A1111's `parameters` format (also stored in PNGs). */
  info: string
  /** What the caller should know about the call that drew this image, one sentence each (options
   * that had no effect; from the engine, e.g. LoRA keys that matched no layer). The same list on
   * every image of a call; empty when all went as asked. */
  warnings: string[]
}

/** A loaded SDXL model. Create with {@link loadPipeline}. */
export class Pipeline {
  readonly #native: Binding.Pipeline

  /** @internal */
  constructor(nativePipeline: Binding.Pipeline) {
    this.#native = nativePipeline
  }

  /** Where the model runs: `cpu`, `cuda` or `metal`. */
  get device(): Exclude<DeviceName, 'auto'> {
    return this.#native.device as Exclude<DeviceName, 'auto'>
  }

  /** Frees the native model; calls after this reject with `INVALID_ARGUMENT`. */
  dispose(): void {
    this.#native.dispose()
  }

  /** {@link dispose}, for `await using`. */
  async [Symbol.asyncDispose](): Promise<void> {
    this.dispose()
  }

  /**
   * Draws `batchSize` images. Progress reports stages `text`, `denoise` (once per step) and
   * `decode`; an aborted signal stops the run within one step.
   */
  async generate(options: GenerateOptions): Promise<GeneratedImage[]> {
    const prepared = await prepare(options)
    return finish(await this.generatePixels(prepared, options), prepared)
  }

  /**
   * Draws several requests in one UNet batch, each with its own prompt, seed and identities:
   * identities are applied per sample, so requests for different people share every step.
   * The requests must agree on size, steps, cfg, sampler, scheduler and LoRA files, and have no
   * `initImage`; each one's pictures equal what {@link generate} draws for it (within float
   * rounding). Resolves to one list of images per request, in order.
   */
  async generateBatch(requests: readonly GenerateOptions[], options: CallOptions = {}): Promise<GeneratedImage[][]> {
    const prepared = await Promise.all(requests.map((r) => prepare(r)))
    const raw = await callNative(options, (cancel, onProgress) =>
      this.#native.generateMany(
        prepared.map((p) => p.request),
        prepared.map((p) => p.identities),
        prepared.map((p) => p.identityWeights),
        prepared[0]?.loras ?? [],
        cancel,
        onProgress,
      ),
    )
    return Promise.all(raw.map((images, i) => finish(drawn(images, prepared[i]!), prepared[i]!)))
  }

  /** @internal Pixels out, for callers that post-process before encoding. */
  async generatePixels(prepared: Prepared, options: CallOptions): Promise<Drawn> {
    const images = await callNative(options, (cancel, onProgress) =>
      this.#native.generate(prepared.request, prepared.identities, prepared.identityWeights, prepared.loras, cancel, onProgress),
    )
    return drawn(images, prepared)
  }

  /**
   * @internal The face refine pass on `image` for the given faces (from a face detector), with
   * the request's identities and LoRAs merged. Progress reports stage `refine`.
   */
  async refinePixels(
    image: Binding.RawImage,
    imageIndex: number,
    faces: readonly { bbox: number[] }[],
    prepared: Prepared,
    refine: RefineFaceOptions,
    options: CallOptions,
  ): Promise<Binding.RawImage> {
    const r = prepared.request
    const request: Binding.RefineRequest = {
      prompt: refine.prompt === undefined ? r.prompt : refine.prompt,
      negativePrompt: r.negativePrompt ?? '',
      steps: checkedInt('refineFace.steps', refine.steps ?? r.steps),
      cfg: r.cfg,
      sampler: r.sampler,
      scheduler: r.scheduler,
      seed: imageSeed(prepared.seed, imageIndex),
      ...(refine.strength !== undefined && { strength: refine.strength }),
      ...(refine.size !== undefined && { size: checkedInt('refineFace.size', refine.size) }),
      ...(refine.padding !== undefined && { padding: refine.padding }),
      ...(refine.minSize !== undefined && { minSize: checkedInt('refineFace.minSize', refine.minSize) }),
      ...(refine.dilate !== undefined && { dilate: refine.dilate }),
      ...(refine.feather !== undefined && { feather: refine.feather }),
      ...(refine.faces !== undefined && { faces: refine.faces }),
    }
    return callNative(options, (cancel, onProgress) =>
      this.#native.refineFaces(image, faces.map((f) => ({ bbox: [...f.bbox] })), request, prepared.identities, prepared.identityWeights, prepared.loras, cancel, onProgress),
    )
  }
}

/** @internal A request validated and filled in, ready for the engine. */
export interface Prepared {
  request: Binding.GenerateRequest
  identities: Binding.Identity[]
  identityWeights: number[]
  loras: { path: string; weight: number }[]
  format: ImageFormat
  seed: bigint
  /** The `parameters` text of image `k`, whose seed is `seed + k`. */
  info(imageIndex: number): string
  /** Options that had no effect, as warnings. */
  warnings: string[]
}

/** @internal What a native generation gave: each image's pixels and the call's warnings. */
export interface Drawn {
  images: Binding.RawImage[]
  warnings: string[]
}

/**
 * @internal The one place where a native generation's result is read, and the call's warnings
 * gathered: those `prepare` found in the options, then the engine's own. The native result is
 * the images alone today; engine warnings (e.g. LoRA keys that matched no layer) join here.
 */
function drawn(images: Binding.RawImage[], prepared: Prepared): Drawn {
  return { images, warnings: [...prepared.warnings] }
}

const MAX_SEED = 2n ** 64n

/** A seed as the engine takes it, or `INVALID_ARGUMENT` (never a bare `RangeError` from `BigInt`). */
function checkedSeed(seed: unknown): bigint {
  if (seed === undefined) return BigInt(randomInt(0, 2 ** 48 - 1))
  if (typeof seed === 'number' && Number.isSafeInteger(seed) && seed >= 0) return BigInt(seed)
  if (typeof seed === 'bigint' && seed >= 0n && seed < MAX_SEED) return seed
  const shown = typeof seed === 'bigint' ? `${seed}n` : typeof seed === 'string' ? `'${seed}'` : String(seed)
  throw new HyperLoraError('INVALID_ARGUMENT', `seed must be a whole number in [0, 2^64) (a number up to 2^53, else a bigint), got ${shown}`)
}

/** The seed of image `k` of a batch, as the engine draws it (wrapping at 2^64). */
function imageSeed(seed: bigint, k: number): bigint {
  return BigInt.asUintN(64, seed + BigInt(k))
}

/** A seed as results report it: a `number` when it is exact as one. */
function reportedSeed(seed: bigint): number | bigint {
  return seed <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(seed) : seed
}

/** Options given that this request does not use: silently dropping them would hide a mistake. */
function unusedOptions(options: GenerateOptions, hasIdentity: boolean): string[] {
  const warnings: string[] = []
  if (options.identityWeight !== undefined && !options.identity) {
    warnings.push(`identityWeight ${options.identityWeight} has no effect without an identity`)
  }
  if (options.strength !== undefined && options.initImage === undefined) {
    warnings.push(`strength ${options.strength} has no effect without an initImage`)
  }
  if (typeof options.triggerWords === 'string' && !hasIdentity) {
    warnings.push('triggerWords have no effect without an identity')
  }
  return warnings
}

/** @internal Validates and fills in defaults; the generation parameters text is made here too. */
export async function prepare(options: GenerateOptions, extraSettings: readonly string[] = []): Promise<Prepared> {
  const width = options.width ?? 1024
  const height = options.height ?? 1024
  const seed = checkedSeed(options.seed)
  const format = options.format ?? 'png'
  if (!['png', 'jpeg', 'webp'].includes(format)) throw new HyperLoraError('INVALID_ARGUMENT', `unknown format ${format}`)
  const initImage = options.initImage === undefined ? undefined : await decodeRgb8(options.initImage, { width, height })
  const identities = [
    ...(options.identity ? [{ identity: options.identity, weight: options.identityWeight ?? 0.85 }] : []),
    ...(options.identities ?? []),
  ]
  if (typeof options.prompt !== 'string') throw new HyperLoraError('INVALID_ARGUMENT', 'prompt must be a string')
  const prompt = identities.length > 0 ? withTriggerWords(options.prompt, options.triggerWords ?? TRIGGER_WORDS) : options.prompt
  const loras = (options.loras ?? []).map((l) => ({ path: path.resolve(l.path), weight: l.weight }))
  const request: Binding.GenerateRequest = {
    prompt,
    negativePrompt: options.negativePrompt ?? '',
    width: checkedInt('width', width),
    height: checkedInt('height', height),
    steps: checkedInt('steps', options.steps ?? 20),
    cfg: options.cfg ?? 5,
    sampler: options.sampler ?? 'dpmpp_2m',
    scheduler: options.scheduler ?? 'karras',
    seed,
    batchSize: checkedInt('batchSize', options.batchSize ?? 1),
    strength: options.strength ?? 0.75,
    ...(initImage && { initImage }),
  }
  const info = (imageIndex: number): string =>
    a1111Parameters({
    prompt,
    negativePrompt: request.negativePrompt ?? '',
    steps: request.steps,
    sampler: request.sampler,
    scheduler: request.scheduler,
    cfg: request.cfg,
    seed: imageSeed(seed, imageIndex),
    width: request.width,
    height: request.height,
    loras: [...identities.map((i) => `identity: ${i.weight}`), ...loras.map((l) => `${path.basename(l.path, '.safetensors')}: ${l.weight}`)],
    ...(initImage && { strength: request.strength ?? 0.75 }),
    extra: extraSettings,
  })
  return {
    request,
    identities: identities.map((i) => i.identity.native),
    identityWeights: identities.map((i) => i.weight),
    loras,
    format,
    seed,
    info,
    warnings: unusedOptions(options, identities.length > 0),
  }
}

/** @internal Encodes the engine's pixels, with the parameters as metadata. */
export async function finish(raw: Drawn, p: Prepared): Promise<GeneratedImage[]> {
  return Promise.all(
    raw.images.map(async (image, index) => ({
      data: await encodeWithParameters(image, p.format, p.info(index)),
      format: p.format,
      width: image.width,
      height: image.height,
      seed: reportedSeed(imageSeed(p.seed, index)),
      index,
      info: p.info(index),
      warnings: [...raw.warnings],
    })),
  )
}

function checkedInt(name: string, value: number): number {
  if (!Number.isSafeInteger(value) || value < 0 || value > 0xffffffff) {
    throw new HyperLoraError('INVALID_ARGUMENT', `${name} must be a non-negative integer, got ${value}`)
  }
  return value
}

/**
 * Loads an SDXL model: a diffusers folder (`unet`, `vae`, `text_encoder`, `tokenizer` subfolders,
 * fp16 variants included), a Hugging Face cache entry (`models--org--name`), or a single-file
 * checkpoint such as RealVisXL's `.safetensors`.
 */
export async function loadPipeline(source: string, options: LoadPipelineOptions = {}): Promise<Pipeline> {
  if (typeof source !== 'string' || source.length === 0) {
    throw new HyperLoraError('INVALID_ARGUMENT', 'loadPipeline: source must be a path')
  }
  const nativePipeline = await callNative({ signal: options.signal }, () =>
    native().loadPipeline(source, {
      device: options.device ?? 'auto',
      dtype: options.dtype ?? 'auto',
      mergesFile: CLIP_MERGES,
      ...(options.configDir !== undefined && { configDir: options.configDir }),
    }),
  )
  return new Pipeline(nativePipeline)
}
