/** The model manager's public API: resolve, pull and list models (see `models/README.md`). */
export { DEFAULT_MODELS, type Manifest, type ManifestEntry, type ManifestFile, type LoadRole, type ModelRole } from './manifest.js'
export {
  listModels,
  pullModels,
  resolveModel,
  type InstalledModel,
  type ModelEvent,
  type ModelSource,
  type PulledModel,
  type ResolveOptions,
} from './resolve.js'
