import * as path from 'node:path'

import type * as Binding from '../index.js'
import './dispose.js'
import { HyperLoraError } from './errors.js'
import { decodeRgb8, type ImageInput } from './images.js'
import type { DetectedFace } from './face.js'
import { callNative, native, type CallOptions } from './native.js'
import type { DeviceName, Precision } from './pipeline.js'

const packageRoot = path.resolve(__dirname, '..')

/** The small random-weight HyperLoRA folder bundled for the demo and tests. */
export const TINY_HYPERLORA = path.join(packageRoot, 'models', 'tiny', 'hyperlora')
/** The bundled random-weight CLIP vision tower (transformers layout). */
export const TINY_CLIP_VISION = path.join(packageRoot, 'models', 'tiny', 'clip-vision')

/** What one photo of the person contributes (face analysis produces these from a photo). */
export interface FaceConditions {
  /** L2-normalised ArcFace embedding (512 values). */
  arcface: Float32Array | readonly number[]
  /** The face crop for CLIP; centre-cropped and resized to the tower's input size (224²). */
  clipCrop: ImageInput
  /** For models with a Base-LoRA: the photo around the face with the face blurred away, at the
   * same size (face analysis makes it). Without it (on any photo) no Base-LoRA is made. */
  baseCrop?: ImageInput
}

/** One module of an identity's LoRA: `delta W = alpha / rank · up @ down`, row-major f32. */
export type LoraModuleTensors = Binding.LoraModuleTensors

/** A photo an identity was made from: where it was in the request, the face used, and a preview
 * (512² PNG) of the face region as the hypernetwork saw it. */
export interface IdentityPhoto {
  index: number
  face: DetectedFace
  preview: Buffer
}

/** A person's identity: a LoRA for SDXL, written by the hypernetwork, held in native memory. */
export class Identity {
  /** @internal */
  readonly native: Binding.Identity
  /** The photos this identity was made from (empty for one loaded from a file). */
  readonly photos: readonly IdentityPhoto[]
  /** Photos that were skipped, and why. */
  readonly warnings: readonly string[]

  /** @internal */
  constructor(nativeIdentity: Binding.Identity, details: { photos?: readonly IdentityPhoto[]; warnings?: readonly string[] } = {}) {
    this.native = nativeIdentity
    this.photos = details.photos ?? []
    this.warnings = details.warnings ?? []
  }

  /** Number of LoRA modules (attention layers × projections). */
  get modules(): number {
    return this.native.modules
  }

  get rank(): number {
    return this.native.rank
  }

  /** Whether the identity has a Base-LoRA (clothes, background, lighting): its HyperLoRA model
   * has a base resampler. Generate applies it at `baseWeight` (default 0). */
  get hasBaseLora(): boolean {
    return this.native.hasBaseLora
  }

  /** The LoRA's tensors (f32), module by module: `delta W = alpha / rank · up @ down`; with
   * `base`, the Base-LoRA's. */
  async lora(options: { base?: boolean } = {}): Promise<LoraModuleTensors[]> {
    return callNative({}, () => this.native.tensors(options.base ?? false))
  }

  /** Saves as a kohya-format `.safetensors` LoRA that ComfyUI, A1111 and diffusers load; with
   * `base`, the Base-LoRA instead (`INVALID_ARGUMENT` when the identity has none). */
  async saveLora(file: string, options: { base?: boolean } = {}): Promise<void> {
    await callNative({}, () => this.native.save(path.resolve(file), options.base ?? false))
  }

  /** Bytes its LoRA tensors take in memory (the Base-LoRA's included). */
  get sizeBytes(): number {
    return this.native.sizeBytes
  }

  /**
   * The compact form (a few hundred KB at the released sizes, where the LoRA is tens of MB): the
   * hypernetwork's output coefficients with the id of the HyperLoRA model that made them.
   * {@link Identity.fromCoefficients} expands it back bit-equal. Only identities the
   * hypernetwork made have one: for an identity loaded from a LoRA file or interpolated this
   * rejects with `INVALID_ARGUMENT`.
   */
  async toCoefficients(): Promise<Buffer> {
    return callNative({}, () => this.native.toCoefficients())
  }

  /**
   * The identity of {@link Identity.toCoefficients} output, its LoRA bit-equal to the original's
   * on an encoder loaded with the same HyperLoRA model, dtype and device. Coefficients of
   * another HyperLoRA model, or a damaged buffer, reject with `INVALID_ARGUMENT`.
   */
  static async fromCoefficients(encoder: IdentityEncoder, coefficients: Uint8Array): Promise<Identity> {
    return encoder.expandCoefficients(coefficients)
  }

  /**
   * `(1 − t)·a + t·b` of the LoRA weights (down and up matrices separately). Both are linear in
   * the hypernetwork's output, so this equals the identity of the blended hypernetwork tokens:
   * t = 0 is `a`, t = 1 is `b`, values outside [0, 1] extrapolate.
   */
  static async interpolate(a: Identity, b: Identity, t: number): Promise<Identity> {
    return new Identity(await callNative({}, () => native().interpolateIdentities(a.native, b.native, t)))
  }
}

/** Loads an identity saved with {@link Identity.saveLora}. */
export async function loadIdentity(file: string): Promise<Identity> {
  return new Identity(await callNative({}, () => native().loadIdentity(path.resolve(file))))
}

/** Where {@link loadIdentityEncoder} runs the models. */
export interface LoadIdentityEncoderOptions {
  device?: DeviceName
  dtype?: Precision
}

/** CLIP ViT-L/14 vision tower + HyperLoRA hypernetwork. Create with {@link loadIdentityEncoder}. */
export class IdentityEncoder {
  readonly #native: Binding.IdentityEncoder

  /** @internal */
  constructor(nativeEncoder: Binding.IdentityEncoder) {
    this.#native = nativeEncoder
  }

  /** Side of the square face crop the CLIP tower takes (224 for ViT-L/14); pass it to
   * `analyzeFaces` as `clipSize`. */
  get clipImageSize(): number {
    return this.#native.clipImageSize
  }

  /** @internal The native models (for scoring). */
  get native(): Binding.IdentityEncoder {
    return this.#native
  }

  /** Frees the native models; calls after this reject with `INVALID_ARGUMENT`. */
  dispose(): void {
    this.#native.dispose()
  }

  /** {@link dispose}, for `await using`. */
  async [Symbol.asyncDispose](): Promise<void> {
    this.dispose()
  }

  /** @internal {@link Identity.fromCoefficients}. */
  async expandCoefficients(coefficients: Uint8Array): Promise<Identity> {
    if (!(coefficients instanceof Uint8Array)) throw new HyperLoraError('INVALID_ARGUMENT', 'identity coefficients must be a Buffer or Uint8Array')
    const buffer = Buffer.from(coefficients.buffer, coefficients.byteOffset, coefficients.byteLength)
    return new Identity(await callNative({}, () => this.#native.expandCoefficients(buffer)))
  }

  /**
   * The identity of 1..N photos of one person (the hypernetwork averages over them). Progress
   * reports `clip` once per photo, then `hypernet`.
   */
  async createIdentity(photos: readonly FaceConditions[], options: CallOptions = {}): Promise<Identity> {
    if (!Array.isArray(photos) || photos.length === 0) {
      throw new HyperLoraError('INVALID_ARGUMENT', 'createIdentity needs at least one photo')
    }
    const size = this.#native.clipImageSize
    const inputs = await Promise.all(
      photos.map(async (p) => ({
        arcface: Float32Array.from(p.arcface),
        clipCrop: await decodeRgb8(p.clipCrop, { width: size, height: size }),
        ...(p.baseCrop !== undefined && { baseCrop: await decodeRgb8(p.baseCrop, { width: size, height: size }) }),
      })),
    )
    return new Identity(await callNative(options, (cancel, onProgress) => this.#native.create(inputs, cancel, onProgress)))
  }
}

/** Loads a HyperLoRA release folder and a CLIP vision folder (transformers layout). */
export async function loadIdentityEncoder(
  hyperlora: string,
  clipVision: string,
  options: LoadIdentityEncoderOptions = {},
): Promise<IdentityEncoder> {
  const nativeEncoder = await callNative({}, () =>
    native().loadIdentityEncoder(hyperlora, clipVision, { device: options.device ?? 'auto', dtype: options.dtype ?? 'auto' }),
  )
  return new IdentityEncoder(nativeEncoder)
}
