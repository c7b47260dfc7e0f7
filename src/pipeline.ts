import * as path from 'node:path'

import type * as Binding from '../index.js'
import './dispose.js'
import { HyperLoraError } from './errors.js'
import type { KeypointFace } from './face.js'
import type { Identity } from './identity.js'
import { decodeRgb8, encodeWithParameters, type ImageFormat, type ImageInput } from './images.js'
import { a1111Parameters } from './metadata.js'
import { callNative, native, type CallOptions } from './native.js'

/** Samplers, as diffusers' schedulers of the same names (A1111: Euler, Euler a, DPM++ 2M, DPM++ 2M SDE, DDIM). */
export type Sampler = Binding.Sampler
/** How the sampler spaces its noise levels (A1111's "Schedule type"). */
export type SigmaSchedule = Binding.SigmaSchedule
/** @deprecated The old name of {@link SigmaSchedule}. */
export type SigmaScheduler = SigmaSchedule
/** Where models run; `auto` picks CUDA or Metal when the binary and the machine have it. */
export type DeviceName = 'auto' | 'cpu' | 'cuda' | 'metal'
/** Weight and activation precision; `auto` is f16 on GPUs, f32 on the CPU. */
export type Precision = 'auto' | 'f32' | 'f16' | 'bf16'

const packageRoot = path.resolve(__dirname, '..')

/** The small random-weight SDXL bundled for the demo and tests (diffusers layout). */
export const TINY_SDXL = path.join(packageRoot, 'models', 'tiny', 'sdxl')

/** A small random-weight ControlNet for {@link TINY_SDXL} (tests; not in the published package). */
export const TINY_CONTROLNET = path.join(packageRoot, 'models', 'tiny', 'controlnet')

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
  /** How the sampler spaces its noise levels; default `karras`. */
  schedule?: SigmaSchedule
  /** @deprecated The old name of `schedule`, still accepted. */
  scheduler?: SigmaSchedule
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
  /** Weight of `identity`'s Base-LoRA (clothes, background, lighting) when its model has one;
   * default 0 (off, as the reference workflows leave it). */
  baseWeight?: number
  /** Several identities with their own weights, which may be negative: a concept slider is
   * `[{ identity: a, weight: -0.7 }, { identity: b, weight: 0.7 }]`. */
  identities?: readonly IdentityWeight[]
  /** Other LoRA files (kohya with diffusers or SGM names, diffusers/PEFT), e.g. styles. */
  loras?: readonly { path: string; weight: number }[]
  /** ControlNets with their control images (several are summed, as diffusers' MultiControlNet). */
  controlnets?: readonly ControlNetOptions[]
  /** Prepended to the prompt when an identity is active, unless the prompt already starts with
   * them; `false` turns this off. Default `'fcsks fxhks fhyks, '` (HyperLoRA's trigger words). */
  triggerWords?: string | false
}

/** A ControlNet in a request (see docs/controlnet.md). The control image (a pose skeleton, a
 * depth map, edges …) is supplied by the caller: no pose or depth estimator is run. */
export interface ControlNetOptions {
  /** A loaded ControlNet ({@link Pipeline.loadControlNet}) or a path: a diffusers folder or a
   * `.safetensors` file in diffusers naming. With `HyperLoRA`, also a manifest name such as
   * `controlnet-openpose-sdxl`. */
  model: ControlNet | string
  /** Any size: resized to width × height with Lanczos, as diffusers does. Required unless
   * `keypointsFrom` gives InstantID's keypoint picture. */
  image?: ImageInput
  /** InstantID (an `InstantX/InstantID` folder): the photo whose largest face gives IdentityNet
   * both its keypoint picture and its face embedding (docs/instantid.md); needs `HyperLoRA`
   * (face analysis). A photo without a face is `NO_FACE`. */
  keypointsFrom?: ImageInput
  /** `canny`: `image` becomes its Canny edges first (cv2-exact, as diffusers' Canny examples
   * call it), thresholds `low` (default 100) and `high` (default 200). */
  preprocess?: 'canny'
  low?: number
  high?: number
  /** diffusers' `controlnet_conditioning_scale`; default 1. 0 is the same as no ControlNet. */
  strength?: number
  /** Fraction of the steps where the ControlNet starts acting; default 0. */
  start?: number
  /** Fraction of the steps where it stops; default 1. */
  end?: number
}

/** A loaded SDXL ControlNet, held until {@link dispose} (or its pipeline's). */
export class ControlNet {
  readonly #native: Binding.ControlNet

  /** @internal */
  constructor(nativeControlNet: Binding.ControlNet) {
    this.#native = nativeControlNet
  }

  /** The file or folder name it was loaded from. */
  get name(): string {
    return this.#native.name
  }

  /** @internal */
  get native(): Binding.ControlNet {
    return this.#native
  }

  /** Frees the weights once no running request uses them. */
  dispose(): void {
    this.#native.dispose()
  }
}

/** Turns a request's ControlNet `model` string into a loaded ControlNet. */
export type ControlNetLoader = (model: string) => Promise<ControlNet>

/** InstantID's face analysis of a keypoint photo ({@link FaceAnalyzer.keypointFace}). */
export type KeypointFaceFinder = (photo: ImageInput) => Promise<KeypointFace>

/** An identity in a request, with its weights (default 0.85; Base-LoRA default 0). */
export interface IdentityWeight {
  identity: Identity
  weight?: number | undefined
  baseWeight?: number | undefined
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
  /** What the picture was drawn with, every default filled in by the engine (the same as
   * `info`, as values). */
  settings: GenerationSettings
  /** The generation settings in A1111's `parameters` format (also stored in PNGs). */
  info: string
  /** What the caller should know about the call that drew this image, one sentence each (options
   * that had no effect; from the engine, e.g. LoRA keys that matched no layer). The same list on
   * every image of a call; empty when all went as asked. */
  warnings: string[]
}

/** The settings one picture was drawn with. */
export interface GenerationSettings {
  prompt: string
  negativePrompt: string
  width: number
  height: number
  steps: number
  cfg: number
  sampler: Sampler
  schedule: SigmaSchedule
  /** This picture's own seed (see {@link GeneratedImage.seed}). */
  seed: number | bigint
  /** With an init image. */
  strength?: number
  /** The weight of each identity in the request, in order (a Base-LoRA in use follows its
   * identity). */
  identityWeights: number[]
  loras: { path: string; weight: number }[]
  /** The ControlNets used, with their strength and window (absent without one). */
  controlnets?: { name: string; strength: number; start: number; end: number }[]
}

/** A loaded SDXL model. Create with {@link loadPipeline}. */
export class Pipeline {
  readonly #native: Binding.Pipeline
  /** ControlNets loaded by path, held for the pipeline's lifetime. */
  readonly #controlnets = new Map<string, Promise<ControlNet>>()

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
    for (const loaded of this.#controlnets.values()) void loaded.then((c) => c.dispose(), () => {})
    this.#controlnets.clear()
    this.#native.dispose()
  }

  /**
   * Loads a ControlNet for this pipeline (its device and precision), once per path: a diffusers
   * folder (`config.json` + `diffusion_pytorch_model[.fp16].safetensors`) or a `.safetensors`
   * file in diffusers naming (e.g. `controlnet-openpose-sdxl-1.0.safetensors`), whose config is
   * read off its tensor shapes. Original-layout files and control-LoRAs reject with `BAD_WEIGHTS`.
   */
  loadControlNet(source: string, options: CallOptions = {}): Promise<ControlNet> {
    if (typeof source !== 'string' || source.length === 0) {
      return Promise.reject(new HyperLoraError('INVALID_ARGUMENT', 'loadControlNet: source must be a path'))
    }
    const key = path.resolve(source)
    let loaded = this.#controlnets.get(key)
    if (!loaded) {
      loaded = callNative(options, () => native().loadControlNet(this.#native, key)).then((n) => new ControlNet(n))
      this.#controlnets.set(key, loaded)
      loaded.catch(() => this.#controlnets.delete(key))
    }
    return loaded
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
    const prepared = await prepare(options, (m) => this.loadControlNet(m))
    return finish(await this.generatePixels(prepared, options), prepared)
  }

  /**
   * Draws several requests in one UNet batch, each with its own prompt, seed and identities:
   * identities are applied per sample, so requests for different people share every step.
   * The requests must agree on size, steps, cfg, sampler, schedule, LoRA files and ControlNets
   * (the same models, strengths and windows; their images may differ), and have no
   * `initImage` ({@link planBatches} groups requests that do); each one's pictures equal what
   * {@link generate} draws for it (within float rounding). Resolves to one list of images per
   * request, in order.
   */
  async generateBatch(requests: readonly GenerateOptions[], options: CallOptions = {}): Promise<GeneratedImage[][]> {
    const prepared = await Promise.all(requests.map((r) => prepare(r, (m) => this.loadControlNet(m))))
    const drawn = await this.generateManyPixels(prepared, options)
    return Promise.all(drawn.map((d, i) => finish(d, prepared[i]!)))
  }

  /** @internal Which prepared requests can share a batch of at most `maxImages` images, as the
   * engine groups them: indices, batch by batch. */
  planBatches(prepared: readonly Prepared[], maxImages: number): number[][] {
    return this.#native.planBatches(
      prepared.map((p) => p.request),
      maxImages,
    )
  }

  /** @internal Pixels out, for callers that post-process before encoding. */
  async generatePixels(prepared: Prepared, options: CallOptions): Promise<Binding.Generated> {
    return callNative(options, (cancel, onProgress) => this.#native.generate(prepared.request, cancel, onProgress))
  }

  /** @internal {@link generatePixels} for requests that share one batch. */
  async generateManyPixels(prepared: readonly Prepared[], options: CallOptions): Promise<Binding.Generated[]> {
    return callNative(options, (cancel, onProgress) =>
      this.#native.generateMany(
        prepared.map((p) => p.request),
        cancel,
        onProgress,
      ),
    )
  }

  /**
   * @internal The face refine pass on `image` for the given faces (from a face detector), with
   * the request's identities and LoRAs merged and, unless `refine` says otherwise, the sampling
   * settings `image` was drawn with (its own seed: image `imageIndex` of its batch). Progress
   * reports stage `refine`.
   */
  async refinePixels(
    image: Binding.RawImage,
    faces: readonly { bbox: number[] }[],
    prepared: Prepared,
    drawnWith: Pick<Binding.GenerateSettings, 'prompt' | 'negativePrompt' | 'steps' | 'cfg' | 'sampler' | 'schedule' | 'seed'> | undefined,
    imageIndex: number,
    refine: RefineFaceOptions,
    options: CallOptions,
  ): Promise<Binding.Refined> {
    const r = prepared.request
    const request: Binding.RefineRequest = {
      prompt: refine.prompt ?? drawnWith?.prompt ?? r.prompt,
      ...(drawnWith && {
        negativePrompt: drawnWith.negativePrompt,
        steps: drawnWith.steps,
        cfg: drawnWith.cfg,
        sampler: drawnWith.sampler,
        schedule: drawnWith.schedule,
        seed: imageSeed(drawnWith.seed, imageIndex),
      }),
      ...(!drawnWith && pick(r, ['negativePrompt', 'steps', 'cfg', 'sampler', 'schedule', 'seed'])),
      ...(refine.steps !== undefined && { steps: checkedInt('refineFace.steps', refine.steps) }),
      ...(refine.strength !== undefined && { strength: refine.strength }),
      ...(refine.size !== undefined && { size: checkedInt('refineFace.size', refine.size) }),
      ...(refine.padding !== undefined && { padding: refine.padding }),
      ...(refine.minSize !== undefined && { minSize: checkedInt('refineFace.minSize', refine.minSize) }),
      ...(refine.dilate !== undefined && { dilate: refine.dilate }),
      ...(refine.feather !== undefined && { feather: refine.feather }),
      ...(refine.faces !== undefined && { faces: refine.faces }),
      ...(r.identities && { identities: r.identities }),
      ...(r.loras && { loras: r.loras }),
    }
    return callNative(options, (cancel, onProgress) =>
      this.#native.refineFaces(image, faces.map((f) => ({ bbox: [...f.bbox] })), request, cancel, onProgress),
    )
  }
}

/** The fields of `o` among `keys` that are set. */
function pick<T extends object, K extends keyof T>(o: T, keys: readonly K[]): Partial<Pick<T, K>> {
  return Object.fromEntries(keys.filter((k) => o[k] !== undefined).map((k) => [k, o[k]])) as Partial<Pick<T, K>>
}

/** @internal A request validated, ready for the engine (which fills in the defaults). */
export interface Prepared {
  request: Binding.GenerateRequest
  format: ImageFormat
  /** Options that had no effect, as warnings. */
  warnings: string[]
}

const MAX_SEED = 2n ** 64n

/** A seed as the engine takes it, or `INVALID_ARGUMENT` (never a bare `RangeError` from `BigInt`). */
function checkedSeed(seed: unknown): bigint {
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
  if (options.baseWeight !== undefined && !options.identity) {
    warnings.push(`baseWeight ${options.baseWeight} has no effect without an identity`)
  }
  if (options.strength !== undefined && options.initImage === undefined) {
    warnings.push(`strength ${options.strength} has no effect without an initImage`)
  }
  if (typeof options.triggerWords === 'string' && !hasIdentity) {
    warnings.push('triggerWords have no effect without an identity')
  }
  return warnings
}

/** @internal Validates a request and puts it in the engine's terms; the engine fills in what is
 * left unset and reports the settings it used. */
export async function prepare(options: GenerateOptions, loadControlNet?: ControlNetLoader, keypointFace?: KeypointFaceFinder): Promise<Prepared> {
  const format = options.format ?? 'png'
  if (!['png', 'jpeg', 'webp'].includes(format)) throw new HyperLoraError('INVALID_ARGUMENT', `unknown format ${format}`)
  if (typeof options.prompt !== 'string') throw new HyperLoraError('INVALID_ARGUMENT', 'prompt must be a string')
  const identities: IdentityWeight[] = [
    ...(options.identity ? [{ identity: options.identity, weight: options.identityWeight, baseWeight: options.baseWeight }] : []),
    ...(options.identities ?? []),
  ]
  const prompt = identities.length > 0 ? withTriggerWords(options.prompt, options.triggerWords ?? TRIGGER_WORDS) : options.prompt
  const schedule = options.schedule ?? options.scheduler
  const request: Binding.GenerateRequest = {
    prompt,
    ...(options.negativePrompt !== undefined && { negativePrompt: options.negativePrompt }),
    ...(options.width !== undefined && { width: checkedInt('width', options.width) }),
    ...(options.height !== undefined && { height: checkedInt('height', options.height) }),
    ...(options.steps !== undefined && { steps: checkedInt('steps', options.steps) }),
    ...(options.cfg !== undefined && { cfg: options.cfg }),
    ...(options.sampler !== undefined && { sampler: options.sampler }),
    ...(schedule !== undefined && { schedule }),
    ...(options.seed !== undefined && { seed: checkedSeed(options.seed) }),
    ...(options.batchSize !== undefined && { batchSize: checkedInt('batchSize', options.batchSize) }),
    ...(options.strength !== undefined && { strength: options.strength }),
    identities: identities.map((i) => ({
      identity: i.identity.native,
      ...(i.weight !== undefined && { weight: i.weight }),
      ...(i.baseWeight !== undefined && { baseWeight: i.baseWeight }),
    })),
    loras: (options.loras ?? []).map((l) => ({ path: path.resolve(l.path), weight: l.weight })),
  }
  if (options.controlnets !== undefined && options.controlnets.length > 0) {
    request.controlnets = await Promise.all(options.controlnets.map((c, i) => controlNetRequest(c, i, loadControlNet, keypointFace)))
  }
  if (options.initImage !== undefined) {
    const defaults = native().generateDefaults()
    request.initImage = await decodeRgb8(options.initImage, { width: request.width ?? defaults.width, height: request.height ?? defaults.height })
  }
  return { request, format, warnings: unusedOptions(options, identities.length > 0) }
}

/** One ControlNet of a request in the engine's terms: the model loaded, the image decoded at
 * its own size (the engine resizes it as diffusers does). */
async function controlNetRequest(c: ControlNetOptions, i: number, load: ControlNetLoader | undefined, keypointFace?: KeypointFaceFinder): Promise<Binding.ControlNetRequest> {
  if (!c || (typeof c.model !== 'string' && !(c.model instanceof ControlNet))) {
    throw new HyperLoraError('INVALID_ARGUMENT', `controlnets[${i}].model must be a ControlNet or a path`)
  }
  if (typeof c.model === 'string' && !load) throw new HyperLoraError('INVALID_ARGUMENT', `controlnets[${i}].model: load it first (loadControlNet)`)
  const model = typeof c.model === 'string' ? await load!(c.model) : c.model
  let face: KeypointFace | undefined
  if (c.keypointsFrom !== undefined) {
    if (!keypointFace) throw new HyperLoraError('INVALID_ARGUMENT', `controlnets[${i}].keypointsFrom needs face analysis: use HyperLoRA.generate`)
    face = await keypointFace(c.keypointsFrom)
  } else if (c.image === undefined) {
    throw new HyperLoraError('INVALID_ARGUMENT', `controlnets[${i}]: give image (or keypointsFrom for InstantID)`)
  }
  return {
    model: model.native,
    image: face ? face.keypointsImage : await decodeRgb8(c.image!),
    ...(face && { faceEmbedding: face.embedding }),
    ...(c.preprocess !== undefined && { preprocess: c.preprocess }),
    ...(c.low !== undefined && { low: c.low }),
    ...(c.high !== undefined && { high: c.high }),
    ...(c.strength !== undefined && { strength: c.strength }),
    ...(c.start !== undefined && { start: c.start }),
    ...(c.end !== undefined && { end: c.end }),
  }
}

/** The A1111 `parameters` text of image `k` of a request drawn with `s`. */
function parametersOf(s: Binding.GenerateSettings, k: number, extra: readonly string[]): string {
  return a1111Parameters({
    prompt: s.prompt,
    negativePrompt: s.negativePrompt,
    steps: s.steps,
    sampler: s.sampler,
    scheduler: s.schedule,
    cfg: s.cfg,
    seed: imageSeed(s.seed, k),
    width: s.width,
    height: s.height,
    loras: [...s.identityWeights.map((w) => `identity: ${w}`), ...s.loras.map((l) => `${path.basename(l.path, '.safetensors')}: ${l.weight}`)],
    ...(s.strength != null && { strength: s.strength }),
    extra: [...s.controlnets.map((c, i) => `ControlNet ${i}: "Model: ${c.name}, Weight: ${c.strength}, Guidance Start: ${c.start}, Guidance End: ${c.end}"`), ...extra],
  })
}

/** @internal Encodes the engine's pixels, with the settings it used as metadata (and `extra`
 * settings lines, e.g. the refine pass's). */
export async function finish(drawn: Binding.Generated, p: Prepared, extra: readonly string[] = []): Promise<GeneratedImage[]> {
  const s = drawn.settings
  return Promise.all(
    drawn.images.map(async (image, index) => {
      const info = parametersOf(s, index, extra)
      const seed = reportedSeed(imageSeed(s.seed, index))
      return {
        data: await encodeWithParameters(image, p.format, info),
        format: p.format,
        width: image.width,
        height: image.height,
        seed,
        index,
        settings: {
          prompt: s.prompt,
          negativePrompt: s.negativePrompt,
          width: s.width,
          height: s.height,
          steps: s.steps,
          cfg: s.cfg,
          sampler: s.sampler,
          schedule: s.schedule,
          seed,
          ...(s.strength != null && { strength: s.strength }),
          identityWeights: [...s.identityWeights],
          loras: s.loras.map((l) => ({ path: l.path, weight: l.weight ?? 1 })),
          ...(s.controlnets.length > 0 && { controlnets: s.controlnets.map((c) => ({ ...c })) }),
        },
        info,
        warnings: [...p.warnings, ...drawn.warnings],
      }
    }),
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
