/**
 * hyperlora — HyperLoRA zero-shot identity portraits for Node.js.
 *
 * @packageDocumentation
 */
export { HyperLoraError, ERROR_CODES, type ErrorCode } from './errors.js'
export { inspectWeights, type InspectWeightsOptions, type TensorEntry, type WeightsIndex } from './weights.js'
export { info, type Backend, type RuntimeInfo } from './info.js'
export type { CallOptions, ProgressEvent } from './native.js'
export {
  ControlNet,
  loadPipeline,
  Pipeline,
  TINY_SDXL,
  TRIGGER_WORDS,
  type ControlNetOptions,
  type DeviceName,
  type GenerateOptions,
  type GeneratedImage,
  type GenerationSettings,
  type IdentityWeight,
  type LoadPipelineOptions,
  type Precision,
  type RefineFaceOptions,
  type Sampler,
  type SigmaSchedule,
  type SigmaScheduler,
} from './pipeline.js'
export type { ImageFormat, ImageInput } from './images.js'
export {
  Identity,
  IdentityEncoder,
  loadIdentity,
  loadIdentityEncoder,
  TINY_CLIP_VISION,
  TINY_HYPERLORA,
  type FaceConditions,
  type IdentityPhoto,
  type LoadIdentityEncoderOptions,
  type LoraModuleTensors,
} from './identity.js'
export {
  FaceAnalyzer,
  loadFaceAnalyzer,
  TINY_ANTELOPEV2,
  type AnalyzeFacesOptions,
  type AnalyzedFace,
  type DetectedFace,
  type FaceAnalysis,
  type KeypointFace,
} from './face.js'
export type { Rgb8 } from './images.js'
export {
  HyperLoRA,
  TINY_MODELS,
  type CreateIdentityOptions,
  type EngineCallOptions,
  type EngineGenerateOptions,
  type EngineProgress,
  type GenerateManyOptions,
  type GenerateManyResult,
  type HyperLoRALoadOptions,
  type ModelPaths,
  type RefineFacesOptions,
  type ScoredImage,
  type ScoreOptions,
} from './engine.js'
export { identityEmbedding, rankScores, type ImageScore, type Rank } from './score.js'
export {
  DEFAULT_MODELS,
  listModels,
  pullModels,
  resolveModel,
  type InstalledModel,
  type Manifest,
  type ManifestEntry,
  type ManifestFile,
  type LoadRole,
  type ModelEvent,
  type ModelRole,
  type ModelSource,
  type PulledModel,
  type ResolveOptions,
} from './models/index.js'
