import * as path from 'node:path'

import type * as Binding from '../index.js'
import './dispose.js'
import type { FaceConditions } from './identity.js'
import { decodeRgb8, encodeRgb8, type ImageInput, type Rgb8 } from './images.js'
import { callNative, native, type CallOptions } from './native.js'

/** The small random-weight antelopev2-layout ONNX models bundled for the demo and tests. */
export const TINY_ANTELOPEV2 = path.join(path.resolve(__dirname, '..'), 'models', 'tiny', 'antelopev2')

/** A face in image pixels: box, detector score, 5 keypoints and the 106 landmarks. */
export type DetectedFace = Binding.DetectedFace

/** Options of {@link FaceAnalyzer.analyzeFaces}. */
export interface AnalyzeFacesOptions extends CallOptions {
  /** Grey out everything outside the face outline before CLIP sees it (default true). */
  removeBackground?: boolean
  /** Feed CLIP a greyscale crop (default false). */
  grayscale?: boolean
  /** Which face when a photo has several: `best` (highest detector score, default),
   * `largest` (biggest box), or an index into the detections sorted by score. */
  face?: 'best' | 'largest' | number
  /** CLIP crop side: the identity encoder's `clipImageSize` (default 224). */
  clipSize?: number
  /** Called for each photo skipped because it has no usable face. */
  onWarning?: (warning: { index: number; name?: string; message: string }) => void
}

/** One photo's result: the face used and what the identity encoder takes from it. */
export interface AnalyzedFace {
  /** Position of the photo in the request. */
  index: number
  /** What the identity encoder takes. */
  conditions: FaceConditions
  face: DetectedFace
  /** The background-removed face region, 512², PNG. */
  preview: Buffer
  /** The detector input size that found the face. */
  detSize: number
}

/** The result of {@link FaceAnalyzer.analyzeFaces}: faces found, photos skipped. */
export interface FaceAnalysis {
  faces: AnalyzedFace[]
  /** Photos without a usable face (reported only when some other photo had one). */
  skipped: { index: number; name?: string; message: string }[]
}

/** What InstantID takes from a photo (docs/instantid.md): its largest face. */
export interface KeypointFace {
  /** `[x1, y1, x2, y2]`. */
  bbox: number[]
  score: number
  /** Left eye, right eye, nose, left and right mouth corners. */
  keypoints: number[][]
  /** insightface's raw ArcFace `embedding` (not normalised): IdentityNet's face condition. */
  embedding: Float32Array
  /** The keypoints drawn as InstantID's `draw_kps` draws them, at the photo's size. */
  keypointsImage: Rgb8
}

function toRgb8(image: Binding.RawImage): Rgb8 {
  return { width: image.width, height: image.height, data: image.data }
}

/** insightface's antelopev2 (SCRFD detector, 2d106det landmarks, glintr100 ArcFace), in-process. */
export class FaceAnalyzer {
  readonly #native: Binding.FaceAnalyzer

  /** @internal */
  constructor(nativeAnalyzer: Binding.FaceAnalyzer) {
    this.#native = nativeAnalyzer
  }

  /** @internal The native models (for scoring). */
  get native(): Binding.FaceAnalyzer {
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

  /** Every face in the picture, best score first. EXIF orientation is applied first. */
  async detectFaces(image: ImageInput, options: CallOptions = {}): Promise<DetectedFace[]> {
    const rgb = await decodeRgb8(image)
    return callNative({ signal: options.signal }, (cancel) => this.#native.detect(rgb, cancel))
  }

  /**
   * InstantID's face analysis: the photo's largest face, its keypoints and raw ArcFace
   * embedding, and the keypoint picture IdentityNet is given. Rejects with `NO_FACE` when the
   * photo has no face. EXIF orientation is applied first.
   */
  async keypointFace(image: ImageInput, options: CallOptions = {}): Promise<KeypointFace> {
    const rgb = await decodeRgb8(image)
    const label = typeof image === 'string' ? `keypoints photo ${path.basename(image)}` : 'keypoints photo'
    const f = await callNative({ signal: options.signal }, (cancel) => this.#native.instantidFace(rgb, label, cancel))
    return { bbox: f.bbox, score: f.score, keypoints: f.keypoints, embedding: f.embedding, keypointsImage: toRgb8(f.keypointsImage) }
  }

  /** {@link analyzeFaces} for one photo: rejects with `NO_FACE` when it has no usable face. */
  async analyzeFace(image: ImageInput, options: AnalyzeFacesOptions = {}): Promise<AnalyzedFace> {
    const { faces } = await this.analyzeFaces([image], options)
    return faces[0]!
  }

  /**
   * HyperLoRA's per-photo conditions (ArcFace embedding, CLIP face crop) plus the face and a
   * preview. A photo without a face is skipped with a warning when others have one; when none
   * has, the call rejects with `NO_FACE` naming the photo.
   */
  async analyzeFaces(photos: readonly ImageInput[], options: AnalyzeFacesOptions = {}): Promise<FaceAnalysis> {
    const decoded = await Promise.all(photos.map((p) => decodeRgb8(p)))
    const names = photos.map((p) => (typeof p === 'string' ? path.basename(p) : null))
    const request: Binding.AnalyzeFacesOptions = {
      removeBackground: options.removeBackground ?? true,
      grayscale: options.grayscale ?? false,
      face: String(options.face ?? 'best'),
      clipSize: options.clipSize ?? 224,
    }
    const result = await callNative(options, (cancel, onProgress) => this.#native.analyze(decoded, names, request, cancel, onProgress))
    const skipped = result.skipped.map((s) => ({ index: s.index, message: s.message, ...(s.name ? { name: s.name } : {}) }))
    for (const s of skipped) options.onWarning?.(s)
    const faces = await Promise.all(
      result.faces.map(async (f) => ({
        index: f.index,
        conditions: { arcface: f.arcface, clipCrop: toRgb8(f.clipCrop), ...(f.baseCrop && { baseCrop: toRgb8(f.baseCrop) }) },
        face: f.face,
        preview: await encodeRgb8(toRgb8(f.preview), 'png'),
        detSize: f.detSize,
      })),
    )
    return { faces, skipped }
  }
}

/** Loads an antelopev2 folder (buffalo_l's equivalent files are accepted too). */
export async function loadFaceAnalyzer(dir: string): Promise<FaceAnalyzer> {
  return new FaceAnalyzer(await callNative({}, () => native().loadFaceAnalyzer(dir)))
}
