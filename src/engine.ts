/**
 * `HyperLoRA`: the one object most programs need. It loads the four models (SDXL, the HyperLoRA
 * hypernetwork, CLIP's vision tower, insightface's face models), turns photos into identities and
 * draws portraits, taking calls from any number of callers one at a time.
 */
import { HyperLoraError } from './errors.js'
import { loadFaceAnalyzer, TINY_ANTELOPEV2, type FaceAnalyzer } from './face.js'
import { Identity, loadIdentity, loadIdentityEncoder, TINY_CLIP_VISION, TINY_HYPERLORA, type IdentityEncoder, type IdentityPhoto } from './identity.js'
import { decodeRgb8, type ImageInput, type Rgb8 } from './images.js'
import type { GenerateSettings, RefineSettings, Refined } from '../index.js'
import type { ProgressEvent } from './native.js'
import { finish, loadPipeline, prepare, TINY_SDXL, type ControlNet, type DeviceName, type GeneratedImage, type GenerateOptions, type Pipeline, type Precision, type Prepared, type RefineFaceOptions } from './pipeline.js'
import { DEFAULT_MODELS, resolveModel, type LoadRole, type ModelEvent, type ResolveOptions } from './models/index.js'
import { TaskQueue } from './task-queue.js'
import { identityEmbedding, keepsEmbedding, rankScores, scorePortraits, type ImageScore, type Rank, type ScoreTargets } from './score.js'

/** What every long call reports through `onProgress`: the native progress event (its `stage`
 * list is generated from the engine) with the time since the call started. Stages: `download`
 * (models fetched on first use; `step` counts bytes), `loading` (models), `face` (face analysis,
 * per photo), `identity` (CLIP per photo, then the hypernetwork), `text` (prompt encoding),
 * `denoise` (per step), `decode` (VAE), `refine` (the face refine pass: its steps over all faces),
 * `score` (portrait scores, per picture). */
export interface EngineProgress extends ProgressEvent {
  /** Milliseconds since the call started (queue time included). */
  elapsedMs: number
}

/** What every engine call takes: an `AbortSignal` and a progress callback. */
export interface EngineCallOptions {
  signal?: AbortSignal
  onProgress?: (event: EngineProgress) => void
}

/** The four models: local paths (a folder or file) once loaded; in `load`, also manifest names or
 * Hugging Face repo ids. */
export interface ModelPaths {
  /** SDXL: a diffusers folder, a Hugging Face cache entry or a single-file `.safetensors`. */
  checkpoint: string
  /** A HyperLoRA release folder (e.g. `sdxl_hyper_id_lora_v1_fidelity`). */
  hyperlora: string
  /** CLIP ViT-L/14's vision tower, transformers layout. */
  clipVision: string
  /** insightface's antelopev2 folder. */
  faceModels: string
}

/** Each model as a local path, a manifest name (`hyperlora models` lists them) or a Hugging Face
 * repo id (`org/name`, `org/name/file.safetensors`). */
export interface HyperLoRALoadOptions extends Partial<ModelPaths>, EngineCallOptions {
  /** Where models are looked up and whether missing ones are downloaded (default: yes, into the
   * Hugging Face cache); see `resolveModel`. */
  models?: Omit<ResolveOptions, 'signal' | 'onProgress'>
  /** Default `auto`: CUDA or Metal when this build has it and a device exists, else the CPU. */
  device?: DeviceName
  /** Default `auto`: f16 on GPUs, f32 on the CPU. */
  dtype?: Precision
  /** For single-file checkpoints: a diffusers folder with the configs and tokenizers to use. */
  configDir?: string
}

/** The small random-weight models bundled with the package: `HyperLoRA.load(TINY_MODELS)`. Their
 * pictures are noise; they exist so the whole chain can run anywhere (demo, tests). */
export const TINY_MODELS: ModelPaths = {
  checkpoint: TINY_SDXL,
  hyperlora: TINY_HYPERLORA,
  clipVision: TINY_CLIP_VISION,
  faceModels: TINY_ANTELOPEV2,
}

/** Options of {@link HyperLoRA.createIdentity}. */
export interface CreateIdentityOptions extends EngineCallOptions {
  /** Grey out everything around the face before CLIP sees it (default true, as HyperLoRA does). */
  removeBackground?: boolean
  /** Give CLIP a greyscale crop (default false). */
  grayscale?: boolean
  /** Which face in a photo with several: `best` (detector score, default), `largest`, or an index. */
  face?: 'best' | 'largest' | number
  /** Called for each photo skipped because it has no usable face (also listed in `warnings`). */
  onWarning?: (warning: string) => void
}

/** Options of {@link HyperLoRA.generate}: those of `Pipeline.generate`, with engine progress and the face refine pass. */
export interface EngineGenerateOptions extends Omit<GenerateOptions, 'onProgress' | 'signal'>, EngineCallOptions {
  /** Re-draw each face at high resolution with the identity after the picture is made (HyperLoRA
   * keeps likeness best on large faces; this helps half-body and group shots). `true` uses the
   * defaults of {@link RefineFaceOptions}. Progress then also reports stage `refine`. */
  refineFace?: boolean | RefineFaceOptions
  /** Draw this many candidates in one batch (seeds `seed … seed + N − 1`, so each redraws alone)
   * and return them best first, each with its `scores` (likeness when `identity` keeps its
   * ArcFace embedding, prompt alignment with `prompt`). Replaces `batchSize`. */
  bestOf?: number
  /** What `bestOf` sorts by; default `likeness` with an `identity`, else `prompt`. */
  rank?: Rank
}

/** A picture from {@link HyperLoRA.generate}; with `bestOf`, it carries its scores. */
export interface ScoredImage extends GeneratedImage {
  scores?: ImageScore
}

/** Options of {@link HyperLoRA.score}. */
export interface ScoreOptions extends ScoreTargets, EngineCallOptions {}

/** What {@link HyperLoRA.refineFaces} takes: the prompt, identity and sampling of a generation
 * (size and batch come from the image) plus the refine pass's own settings. */
export interface RefineFacesOptions
  extends Omit<EngineGenerateOptions, 'width' | 'height' | 'batchSize' | 'initImage' | 'strength' | 'refineFace' | 'controlnets'>,
    Omit<RefineFaceOptions, 'prompt'> {}

/** Maps the native reports of one call onto {@link EngineProgress}, with the elapsed time. */
function reporter(options: EngineCallOptions, started: number): (stage: EngineProgress['stage'], step: number, totalSteps: number) => void {
  return (stage, step, totalSteps) => options.onProgress?.({ stage, step, totalSteps, elapsedMs: performance.now() - started })
}

function nativeProgress(report: ReturnType<typeof reporter>): (e: ProgressEvent) => void {
  return (e) => report(e.stage, e.step, e.totalSteps)
}

/**
 * A loaded HyperLoRA setup. Create with {@link HyperLoRA.load}; free with {@link HyperLoRA.dispose}.
 * Safe to share: concurrent calls wait their turn (each result depends only on its own options and
 * seed, never on what ran before or beside it).
 */
export class HyperLoRA {
  readonly #pipeline: Pipeline
  readonly #encoder: IdentityEncoder
  readonly #faces: FaceAnalyzer
  readonly #generation = new TaskQueue()
  readonly #identities = new TaskQueue()
  /** How ControlNets named by requests are looked up (the `models` option of {@link load}). */
  readonly #modelOptions: Omit<ResolveOptions, 'signal' | 'onProgress'>
  /** The models this engine was loaded from. */
  readonly models: Readonly<ModelPaths>

  private constructor(models: ModelPaths, pipeline: Pipeline, encoder: IdentityEncoder, faces: FaceAnalyzer, modelOptions: Omit<ResolveOptions, 'signal' | 'onProgress'> = {}) {
    this.#modelOptions = modelOptions
    this.models = Object.freeze({ ...models })
    this.#pipeline = pipeline
    this.#encoder = encoder
    this.#faces = faces
  }

  /**
   * Loads the four models. A model left out comes from its `HYPERLORA_*` environment variable,
   * else the default of the manifest (`DEFAULT_MODELS`: RealVisXL V4.0, HyperLoRA fidelity, CLIP
   * ViT-L/14, antelopev2). Models not on this machine are downloaded (progress stage `download`)
   * unless `models.download` is false. Progress then reports `loading` as each model is ready.
   * `load(TINY_MODELS)` runs the bundled random-weight models.
   */
  static async load(options: HyperLoRALoadOptions = {}): Promise<HyperLoRA> {
    const started = performance.now()
    const report = reporter(options, started)
    const models = await resolveModels(options, report)
    const device = { device: options.device ?? 'auto', dtype: options.dtype ?? 'auto' } as const
    let loaded = 0
    const done = <T>(value: T): T => {
      report('loading', ++loaded, 3)
      return value
    }
    report('loading', 0, 3)
    const [pipeline, encoder, faces] = await Promise.all([
      loadPipeline(models.checkpoint, { ...device, ...(options.configDir !== undefined && { configDir: options.configDir }), ...(options.signal && { signal: options.signal }) }).then(done),
      loadIdentityEncoder(models.hyperlora, models.clipVision, device).then(done),
      loadFaceAnalyzer(models.faceModels).then(done),
    ])
    options.signal?.throwIfAborted()
    return new HyperLoRA(models, pipeline, encoder, faces, options.models)
  }

  /** Loads an identity saved with `identity.saveLora(file)` (any kohya SDXL LoRA of HyperLoRA's layout). */
  static loadIdentity(file: string): Promise<Identity> {
    return loadIdentity(file)
  }

  /** An identity from `identity.toCoefficients()` output, expanded by this engine's HyperLoRA
   * model (see `Identity.fromCoefficients`). */
  identityFromCoefficients(coefficients: Uint8Array): Promise<Identity> {
    return Identity.fromCoefficients(this.#encoder, coefficients)
  }

  /** Where the models run: `cpu`, `cuda` or `metal`. */
  get device(): Exclude<DeviceName, 'auto'> {
    return this.#pipeline.device
  }

  /**
   * A ControlNet for requests' `controlnets`, loaded once and held until {@link dispose}: a path,
   * a manifest name (`controlnet-openpose-sdxl`) or a Hugging Face repo id, looked up (and
   * downloaded unless `models.download` is false) as {@link load} looks up its models.
   */
  async loadControlNet(model: string, options: EngineCallOptions = {}): Promise<ControlNet> {
    const file = await resolveModel('controlnet', model, { ...this.#modelOptions, ...(options.signal && { signal: options.signal }) })
    return this.#pipeline.loadControlNet(file, options.signal ? { signal: options.signal } : {})
  }

  /**
   * A person's identity from 1..N photos of them (paths, encoded bytes or RGB8 pixels). Photos
   * without a face are skipped with a warning; if none has one the call rejects with `NO_FACE`.
   * The identity lists the faces used, with previews of what CLIP saw.
   */
  async createIdentity(photos: ImageInput | readonly ImageInput[], options: CreateIdentityOptions = {}): Promise<Identity> {
    const list = Array.isArray(photos) ? (photos as readonly ImageInput[]) : [photos as ImageInput]
    if (list.length === 0) throw new HyperLoraError('INVALID_ARGUMENT', 'createIdentity needs at least one photo')
    const started = performance.now()
    const report = reporter(options, started)
    return this.#identities.run(options.signal, async (signal) => {
      const warnings: string[] = []
      const analysis = await this.#faces.analyzeFaces(list, {
        clipSize: this.#encoder.clipImageSize,
        removeBackground: options.removeBackground ?? true,
        grayscale: options.grayscale ?? false,
        face: options.face ?? 'best',
        signal,
        onProgress: nativeProgress(report),
        onWarning: (w) => {
          const message = skippedPhotoWarning(w)
          warnings.push(message)
          options.onWarning?.(message)
        },
      })
      const photosUsed: IdentityPhoto[] = analysis.faces.map((f) => ({ index: f.index, face: f.face, preview: f.preview }))
      const identity = await this.#encoder.createIdentity(
        analysis.faces.map((f) => f.conditions),
        { signal, onProgress: nativeProgress(report) },
      )
      return new Identity(identity.native, { photos: photosUsed, warnings })
    })
  }

  /**
   * Draws `batchSize` pictures (default 1) with the identity (or several, or none) merged into
   * SDXL. Calls queue behind each other; the same options and seed give the same pictures.
   * Image `k` reports seed `seed + k`, which redraws it alone, and every image carries the call's
   * `warnings`.
   */
  async generate(options: EngineGenerateOptions): Promise<ScoredImage[]> {
    if (options.bestOf !== undefined) return this.#bestOf(options.bestOf, options)
    const started = performance.now()
    const report = reporter(options, started)
    return this.#generation.run(options.signal, async (signal) => (await this.#draw([options], signal, nativeProgress(report)))[0]!)
  }

  /** `generate` with `bestOf`: one batch of candidates, scored, best first. */
  async #bestOf(bestOf: number, { bestOf: _, rank, ...options }: EngineGenerateOptions): Promise<ScoredImage[]> {
    if (!Number.isSafeInteger(bestOf) || bestOf < 1) throw new HyperLoraError('INVALID_ARGUMENT', `bestOf must be a positive integer, got ${bestOf}`)
    if (options.batchSize !== undefined && options.batchSize !== bestOf) throw new HyperLoraError('INVALID_ARGUMENT', 'give bestOf or batchSize, not both')
    const by = rank ?? (options.identity ? 'likeness' : 'prompt')
    const needsLikeness = by === 'likeness' || (typeof by === 'object' && by.likeness !== 0)
    if (needsLikeness && !options.identity) throw new HyperLoraError('INVALID_ARGUMENT', 'bestOf ranked by likeness needs an identity')
    // Checked before drawing: an identity without its embedding cannot be ranked by likeness.
    const identity = options.identity && (needsLikeness || keepsEmbedding(options.identity)) ? options.identity : undefined
    if (identity) identityEmbedding(identity)
    const images = await this.generate({ ...options, batchSize: bestOf })
    const { onProgress, signal } = options
    const scores = await this.score(
      images.map((image) => image.data),
      { prompt: options.prompt, ...(identity && { identity }), ...(signal && { signal }), ...(onProgress && { onProgress }) },
    )
    return rankScores(scores, by).map((i) => ({ ...images[i]!, scores: scores[i]! }))
  }

  /**
   * Likeness and prompt scores of pictures, as the HyperLoRA paper measures portraits: the ArcFace
   * cosine of each picture's largest face with the person (`identity`, or `photos` of them), and
   * the CLIP ViT-L/14 cosine of the picture with `prompt`. Progress reports `score` per picture.
   */
  async score(images: ImageInput | readonly ImageInput[], options: ScoreOptions): Promise<ImageScore[]> {
    const list = Array.isArray(images) ? (images as readonly ImageInput[]) : [images as ImageInput]
    const report = reporter(options, performance.now())
    return this.#identities.run(options.signal, (signal) => scorePortraits(this.#faces, this.#encoder, list, { ...options, signal, onProgress: nativeProgress(report) }))
  }

  /**
   * The face refine pass on a picture from anywhere (image-to-image on each face region): faces
   * are found with the face models, re-drawn with the identity, and blended back; the rest of
   * the picture is left exactly as it was. A picture without faces comes back unchanged.
   */
  async refineFaces(image: ImageInput, options: RefineFacesOptions): Promise<GeneratedImage> {
    const started = performance.now()
    const report = reporter(options, started)
    const { signal: _, onProgress: __, ...rest } = options
    return this.#generation.run(options.signal, async (signal) => {
      const rgb = await decodeRgb8(image)
      const prepared = await prepare(rest)
      const refined = await this.#refine(rgb, prepared, undefined, 0, refineOptions(options), signal, nativeProgress(report))
      const s = refined.settings
      const settings: GenerateSettings = {
        ...s,
        width: rgb.width,
        height: rgb.height,
        batchSize: 1,
        controlnets: [],
      }
      return (await finish({ images: [refined.image], settings, warnings: refined.warnings }, prepared, refineSettings(s)))[0]!
    })
  }

  /** A request's generation part, for the engine (the caller's signal and progress are folded
   * into the queue's, the refine pass runs after; ControlNets are looked up by name). */
  #prepare({ refineFace: _, onProgress: __, signal: ___, bestOf: _b, rank: _r, ...request }: EngineGenerateOptions): Promise<Prepared> {
    return prepare(
      request,
      (m) => this.loadControlNet(m),
      (photo) => this.#faces.keypointFace(photo),
    )
  }

  /** Draws requests that share one batch (or one request alone), with the refine pass on the
   * pictures of those that ask for it; runs inside the generation queue. */
  async #draw(requests: readonly EngineGenerateOptions[], signal: AbortSignal, onProgress: (e: ProgressEvent) => void, ready?: readonly Prepared[]): Promise<GeneratedImage[][]> {
    const prepared = ready ?? (await Promise.all(requests.map((r) => this.#prepare(r))))
    const drawn =
      prepared.length === 1
        ? [await this.#pipeline.generatePixels(prepared[0]!, { signal, onProgress })]
        : await this.#pipeline.generateManyPixels(prepared, { signal, onProgress })
    return Promise.all(
      drawn.map(async (d, r) => {
        const refineFace = requests[r]!.refineFace
        if (!refineFace) return finish(d, prepared[r]!)
        const refine = refineFace === true ? {} : refineFace
        const refined = []
        for (const [k, image] of d.images.entries()) refined.push(await this.#refine(image, prepared[r]!, d.settings, k, refine, signal, onProgress))
        return finish({ ...d, images: refined.map((x) => x.image) }, prepared[r]!, refineSettings(refined[0]?.settings))
      }),
    )
  }

  /** The refine pass on image `imageIndex` of a request drawn with `drawnWith` (its faces are
   * re-drawn with that image's seed), or on any picture when `drawnWith` is undefined. */
  async #refine(
    image: Rgb8,
    prepared: Prepared,
    drawnWith: GenerateSettings | undefined,
    imageIndex: number,
    refine: RefineFaceOptions,
    signal: AbortSignal,
    onProgress: (e: ProgressEvent) => void,
  ): Promise<Refined> {
    const faces = await this.#faces.detectFaces(image, { signal })
    return this.#pipeline.refinePixels(image, faces, prepared, drawnWith, imageIndex, refine, { signal, onProgress })
  }

  /**
   * Many requests, batched: requests that agree on size, steps, cfg, sampler, scheduler, LoRA
   * files and ControlNets (model, strength, window; the control images may differ) are drawn together in one UNet batch of up to `maxBatchSize` images, even when their
   * identities differ (each sample gets its own identity's update). Yields each request's
   * images as its batch finishes, tagged with the request's position; each request's pictures
   * equal what {@link generate} draws for it alone (within float rounding). Other callers' calls
   * may run between batches.
   */
  async *generateMany(requests: Iterable<EngineGenerateOptions>, options: GenerateManyOptions = {}): AsyncGenerator<GenerateManyResult> {
    const maxBatchSize = options.maxBatchSize ?? 4
    if (!Number.isSafeInteger(maxBatchSize) || maxBatchSize < 1) throw new HyperLoraError('INVALID_ARGUMENT', `maxBatchSize must be a positive integer, got ${maxBatchSize}`)
    const started = performance.now()
    const report = reporter(options, started)
    const list = [...requests]
    if (list.some((r) => r.bestOf !== undefined)) throw new HyperLoraError('INVALID_ARGUMENT', 'bestOf is for generate, not generateMany')
    const prepared = await Promise.all(list.map((r) => this.#prepare(r)))
    for (const batch of this.#pipeline.planBatches(prepared, maxBatchSize)) {
      const images = await this.#generation.run(options.signal, (signal) =>
        this.#draw(
          batch.map((i) => list[i]!),
          signal,
          nativeProgress(report),
          batch.map((i) => prepared[i]!),
        ),
      )
      for (const [k, index] of batch.entries()) yield { index, images: images[k]! }
    }
  }

  /**
   * Frees the models. Calls still waiting reject with `ABORTED`; a running call is stopped at its
   * next step. Later calls reject with `INVALID_ARGUMENT`. Resolves when nothing runs any more.
   */
  async dispose(): Promise<void> {
    await Promise.all([this.#generation.close(), this.#identities.close()])
    this.#pipeline.dispose()
    this.#encoder.dispose()
    this.#faces.dispose()
  }

  /** {@link dispose}, for `await using engine = await HyperLoRA.load(…)`. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.dispose()
  }
}


/** `photo 1 (b.jpg) skipped: no face detected …`: the engine's reason already starts with the
 * photo's label, which is said once. */
function skippedPhotoWarning(w: { index: number; name?: string; message: string }): string {
  const label = `photo ${w.index}${w.name ? ` (${w.name})` : ''}`
  const reason = w.message.startsWith(`${label}: `) ? w.message.slice(label.length + 2) : w.message
  return `${label} skipped: ${reason}`
}

/** Options of {@link HyperLoRA.generateMany} as a whole (each request has its own). */
export interface GenerateManyOptions extends EngineCallOptions {
  /** Most images in one UNet batch (the sum of the requests' `batchSize`); default 4. Larger
   * batches use the GPU better and need more memory. */
  maxBatchSize?: number
}

/** One request's pictures from {@link HyperLoRA.generateMany}. */
export interface GenerateManyResult {
  /** Position of the request in the list given to `generateMany`. */
  index: number
  images: GeneratedImage[]
}

function refineOptions(o: RefineFacesOptions): RefineFaceOptions {
  const keys = ['strength', 'steps', 'size', 'padding', 'minSize', 'dilate', 'feather', 'faces'] as const
  return Object.fromEntries(keys.filter((k) => o[k] !== undefined).map((k) => [k, o[k]])) as RefineFaceOptions
}

/** The refine pass in the picture's parameters text. */
function refineSettings(s: RefineSettings | undefined): string[] {
  return s ? [`Face refine strength: ${s.strength}`, `Face refine size: ${s.size}`] : []
}

/** The environment variable each model falls back to (the CLI reads the same ones). */
export const MODEL_ENV: Record<LoadRole, string> = {
  checkpoint: 'HYPERLORA_CHECKPOINT',
  hyperlora: 'HYPERLORA_MODEL',
  clipVision: 'HYPERLORA_CLIP_VISION',
  faceModels: 'HYPERLORA_FACE_MODELS',
}

/** Each role's spec (option, else environment, else the manifest default) as a local path. */
async function resolveModels(options: HyperLoRALoadOptions, report: ReturnType<typeof reporter>): Promise<ModelPaths> {
  const env = options.models?.env ?? process.env
  const files = new Map<string, { bytes: number; totalBytes: number }>()
  const onProgress = (e: ModelEvent): void => {
    files.set(`${e.model}/${e.file}`, { bytes: e.bytes, totalBytes: e.totalBytes })
    let bytes = 0
    let totalBytes = 0
    for (const f of files.values()) {
      bytes += f.bytes
      totalBytes += f.totalBytes
    }
    report('download', bytes, totalBytes)
  }
  const resolve = (role: LoadRole): Promise<string> => {
    const given = options[role] ?? env[MODEL_ENV[role]]
    const spec = typeof given === 'string' && given.length > 0 ? given : DEFAULT_MODELS[role]
    return resolveModel(role, spec, { ...options.models, onProgress, ...(options.signal && { signal: options.signal }) })
  }
  const [checkpoint, hyperlora, clipVision, faceModels] = await Promise.all(ROLES.map(resolve))
  return { checkpoint: checkpoint!, hyperlora: hyperlora!, clipVision: clipVision!, faceModels: faceModels! }
}

const ROLES = ['checkpoint', 'hyperlora', 'clipVision', 'faceModels'] as const
