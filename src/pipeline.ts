import { randomInt } from 'node:crypto'
import * as path from 'node:path'

import type * as Binding from '../index.js'
import { HyperLoraError } from './errors.js'
import type { Identity } from './identity.js'
import { decodeRgb8, encodeWithParameters, type ImageFormat, type ImageInput } from './images.js'
import { a1111Parameters } from './metadata.js'
import { callNative, native, type CallOptions } from './native.js'

export type Sampler = 'euler' | 'euler_ancestral' | 'dpmpp_2m' | 'dpmpp_2m_sde' | 'ddim'
export type SigmaScheduler = 'normal' | 'karras' | 'exponential'
export type DeviceName = 'auto' | 'cpu' | 'cuda' | 'metal'
export type Precision = 'auto' | 'f32' | 'f16' | 'bf16'

const packageRoot = path.resolve(__dirname, '..')

/** The small random-weight SDXL bundled for the demo and tests (diffusers layout). */
export const TINY_SDXL = path.join(packageRoot, 'models', 'tiny', 'sdxl')

/** CLIP's BPE merges, for single-file checkpoints (they carry no tokenizer). */
export const CLIP_MERGES = path.join(packageRoot, 'models', 'clip-tokenizer', 'merges.txt')

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
  /** Same seed, same picture (and the same as diffusers with `torch.Generator().manual_seed(seed)`).
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

/** HyperLoRA's identity LoRAs were trained with these words at the start of the prompt. */
export const TRIGGER_WORDS = 'fcsks fxhks fhyks, '

function withTriggerWords(prompt: string, words: string | false): string {
  if (words === false || words.length === 0) return prompt
  return prompt.startsWith(words.trim()) ? prompt : words + prompt
}

export interface GeneratedImage {
  /** The encoded image. */
  data: Buffer
  format: ImageFormat
  width: number
  height: number
  /** The seed of the batch this image came from. */
  seed: bigint
  /** Position in its batch. */
  index: number
  /** The generation settings in A1111's `parameters` format (also stored in PNGs). */
  info: string
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

  /**
   * Draws `batchSize` images. Progress reports stages `text`, `denoise` (once per step) and
   * `decode`; an aborted signal stops the run within one step.
   */
  async generate(options: GenerateOptions): Promise<GeneratedImage[]> {
    const width = options.width ?? 1024
    const height = options.height ?? 1024
    const seed = BigInt(options.seed ?? randomInt(0, 2 ** 48))
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
    const raw = await callNative(options, (cancel, onProgress) =>
      this.#native.generate(
        request,
        identities.map((i) => i.identity.native),
        identities.map((i) => i.weight),
        loras,
        cancel,
        onProgress,
      ),
    )
    const info = a1111Parameters({
      prompt,
      negativePrompt: request.negativePrompt ?? '',
      steps: request.steps,
      sampler: request.sampler,
      scheduler: request.scheduler,
      cfg: request.cfg,
      seed,
      width: request.width,
      height: request.height,
      loras: [
        ...identities.map((i) => `identity: ${i.weight}`),
        ...loras.map((l) => `${path.basename(l.path, '.safetensors')}: ${l.weight}`),
      ],
      ...(initImage && { strength: request.strength ?? 0.75 }),
    })
    return Promise.all(
      raw.map(async (image, index) => {
        return {
          data: await encodeWithParameters(image, format, info),
          format,
          width: image.width,
          height: image.height,
          seed,
          index,
          info,
        }
      }),
    )
  }
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
