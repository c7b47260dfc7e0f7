/**
 * Portrait scores as the HyperLoRA paper measures methods: likeness (ArcFace cosine with the
 * person, "Face Sim") and prompt alignment (CLIP ViT-L/14 image–text cosine, "CLIP-T"). The
 * numbers and the ranking come from the engine; this file converts types.
 */
import type * as Binding from '../index.js'
import { fromNativeError, HyperLoraError } from './errors.js'
import type { FaceAnalyzer } from './face.js'
import type { Identity, IdentityEncoder } from './identity.js'
import { decodeRgb8, type ImageInput } from './images.js'
import { callNative, native, type CallOptions } from './native.js'
import { CLIP_MERGES } from './pipeline.js'

/** One picture's scores. */
export interface ImageScore {
  /** ArcFace cosine (−1…1) of the picture's largest face with the person; `null` when the picture
   * has no face or no person was given (`likenessReason` says which). */
  likeness: number | null
  likenessReason?: string
  /** The face scored, `[x1, y1, x2, y2]` in pixels. */
  face?: [number, number, number, number]
  /** CLIP ViT-L/14 cosine (−1…1) of the picture with the prompt (CLIPScore is 100 × this, floored
   * at 0); present when a prompt was given. */
  promptAlignment?: number
}

/** What best-of-N sorts by, best first: likeness, prompt alignment, or
 * `likeness · w.likeness + promptAlignment · w.prompt`. Pictures missing the value ranked on (no
 * face) come last; equal values keep their order. */
export type Rank = 'likeness' | 'prompt' | { likeness: number; prompt: number }

/** The reason of a `null` likeness when no person was given. */
export const NO_PERSON_REASON = 'no identity or photos given'

/** The mean ArcFace embedding an identity keeps; `INVALID_ARGUMENT` when it has none (a LoRA
 * saved by an older version or by another tool, or a blend of two identities). */
export function identityEmbedding(identity: Identity): Float32Array {
  let embedding: Float32Array | null
  try {
    embedding = identity.native.arcface()
  } catch (error) {
    throw fromNativeError(error)
  }
  if (!embedding) {
    throw new HyperLoraError('INVALID_ARGUMENT', 'this identity carries no ArcFace embedding (made before scores existed, by another tool, or interpolated): pass photos of the person instead')
  }
  return embedding
}

/** Whether an identity keeps its ArcFace embedding (see {@link identityEmbedding}). */
export function keepsEmbedding(identity: Identity): boolean {
  try {
    return identity.native.arcface() !== null
  } catch {
    return false
  }
}

/** Who and what to score against. */
export interface ScoreTargets {
  /** The person: an identity (it keeps the mean ArcFace embedding of its photos)… */
  identity?: Identity | undefined
  /** …or photos of them (the mean of their ArcFace embeddings, as identity creation takes it). */
  photos?: ImageInput | readonly ImageInput[] | undefined
  /** Scores prompt alignment (CLIP ViT-L/14; its text tower loads on first use). */
  prompt?: string | undefined
}

/** @internal {@link ScoreTargets} → references, then the scores (what `HyperLoRA.score` runs). */
export async function scorePortraits(faces: FaceAnalyzer, encoder: IdentityEncoder, images: readonly ImageInput[], options: ScoreTargets & CallOptions): Promise<ImageScore[]> {
  if (options.identity && options.photos !== undefined) throw new HyperLoraError('INVALID_ARGUMENT', 'give identity or photos, not both')
  if (!options.identity && options.photos === undefined && options.prompt === undefined) {
    throw new HyperLoraError('INVALID_ARGUMENT', 'nothing to score: give an identity (or photos) and/or a prompt')
  }
  let references: Float32Array[] | undefined
  if (options.identity) references = [identityEmbedding(options.identity)]
  else if (options.photos !== undefined) {
    const photos = Array.isArray(options.photos) ? (options.photos as readonly ImageInput[]) : [options.photos as ImageInput]
    const analysis = await faces.analyzeFaces(photos, { clipSize: encoder.clipImageSize, signal: options.signal, onProgress: options.onProgress })
    references = analysis.faces.map((f) => Float32Array.from(f.conditions.arcface))
  }
  return scoreImages(faces, encoder, images, {
    ...(references && { references }),
    ...(options.prompt !== undefined && { prompt: options.prompt }),
    signal: options.signal,
    onProgress: options.onProgress,
  })
}

/** Scores pictures against reference embeddings and/or a prompt. */
async function scoreImages(
  faces: FaceAnalyzer,
  encoder: IdentityEncoder,
  images: readonly ImageInput[],
  options: CallOptions & { references?: readonly Float32Array[]; prompt?: string },
): Promise<ImageScore[]> {
  const decoded = await Promise.all(images.map((image) => decodeRgb8(image)))
  const request: Binding.ScoreImagesOptions = {
    ...(options.references && { references: [...options.references] }),
    ...(options.prompt !== undefined && { prompt: options.prompt }),
    mergesFile: CLIP_MERGES,
  }
  const scores = await callNative(options, (cancel, onProgress) => native().scoreImages(faces.native, encoder.native, decoded, request, cancel, onProgress))
  return scores.map((s) => fromNative(s, options.references !== undefined))
}

function fromNative(s: Binding.ImageScore, person: boolean): ImageScore {
  const reason = s.likenessReason ?? (person ? undefined : NO_PERSON_REASON)
  return {
    likeness: s.likeness ?? null,
    ...(reason !== undefined && { likenessReason: reason }),
    ...(s.face && { face: s.face as [number, number, number, number] }),
    ...(s.promptAlignment !== undefined && s.promptAlignment !== null && { promptAlignment: s.promptAlignment }),
  }
}

/** Positions of `scores`, best first (see {@link Rank}). */
export function rankScores(scores: readonly ImageScore[], rank: Rank): number[] {
  const by: Binding.RankBy = typeof rank === 'string' ? { by: rank } : { by: 'weighted', likeness: rank.likeness, prompt: rank.prompt }
  try {
    return native().rankScores(
      scores.map((s) => ({
        ...(s.likeness !== null && { likeness: s.likeness }),
        ...(s.promptAlignment !== undefined && { promptAlignment: s.promptAlignment }),
      })),
      by,
    )
  } catch (error) {
    throw fromNativeError(error)
  }
}
