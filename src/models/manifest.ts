/**
 * The model manifest (`models/manifest.json`): the real models hyperlora knows by name, where
 * they come from on the Hugging Face hub, their files with sizes and SHA-256, and where a ComfyUI
 * install keeps them. The format is described in `models/README.md`.
 */
import * as fs from 'node:fs'
import * as path from 'node:path'

import { isRepoPath } from './hub.js'
import { HyperLoraError } from '../errors.js'

/** What a model is for in the pipeline. */
export type ModelRole = LoadRole | 'controlnet'

/** The roles `HyperLoRA.load` needs, each with a default model (a ControlNet is optional and per request). */
export type LoadRole = 'checkpoint' | 'hyperlora' | 'clipVision' | 'faceModels'

const LOAD_ROLES: readonly LoadRole[] = ['checkpoint', 'hyperlora', 'clipVision', 'faceModels']
const MODEL_ROLES: readonly ModelRole[] = [...LOAD_ROLES, 'controlnet']

/** One file of a model, by its path in the hub repository. */
export interface ManifestFile {
  /** Path inside the repository, `/`-separated. */
  path: string
  /** Size in bytes; `null` where unknown (the hub's size is used). */
  size: number | null
  /** SHA-256 of the content; `null` where unknown (the hub's LFS hash is checked instead). */
  sha256: string | null
  /** Other paths that serve instead of this one when already on disk (e.g. the fp32 weights of an fp16 file); never downloaded. */
  alternatives?: string[]
}

/** A model the manifest knows by name. */
export interface ManifestEntry {
  role: ModelRole
  description: string
  license?: string
  /** Hugging Face repository id, `org/name`. */
  repo: string
  /** Branch, tag or commit; `main` unless pinned. */
  revision: string
  /** What the engine loads, relative to the repository root: `''` (the root folder), a subfolder or a file. */
  path: string
  files: ManifestFile[]
  /** Where a ComfyUI `models/` folder keeps it: the model folder, or an equivalent single `.safetensors` file. */
  comfyui?: string[]
}

/** The whole manifest. */
export interface Manifest {
  version: 1
  models: Record<string, ManifestEntry>
  /** The model of each role used when none is named. */
  defaults: Record<LoadRole, string>
}

const packageRoot = path.resolve(__dirname, '..', '..')

/** The manifest shipped with the package. */
export const BUNDLED_MANIFEST_PATH = path.join(packageRoot, 'models', 'manifest.json')

function invalid(source: string, message: string): HyperLoraError {
  return new HyperLoraError('INVALID_ARGUMENT', `model manifest ${source}: ${message}`)
}

function isSha256(value: unknown): value is string {
  return typeof value === 'string' && /^[0-9a-f]{64}$/.test(value)
}

/** Checks the shape of a parsed manifest, so that later code can trust it. */
export function validateManifest(value: unknown, source: string): Manifest {
  const m = value as Partial<Manifest> | null
  if (!m || typeof m !== 'object' || m.version !== 1 || !m.models || typeof m.models !== 'object') {
    throw invalid(source, 'expected { "version": 1, "models": { ... }, "defaults": { ... } }')
  }
  for (const [name, entry] of Object.entries(m.models)) {
    const where = `model '${name}'`
    if (!MODEL_ROLES.includes(entry.role)) throw invalid(source, `${where}: role must be one of ${MODEL_ROLES.join(', ')}`)
    if (typeof entry.repo !== 'string' || !/^[\w.-]+\/[\w.-]+$/.test(entry.repo)) throw invalid(source, `${where}: repo must be 'org/name'`)
    if (typeof entry.revision !== 'string' || !isRepoPath(entry.revision)) throw invalid(source, `${where}: revision must be a branch, tag or commit`)
    if (typeof entry.path !== 'string') throw invalid(source, `${where}: path missing`)
    if (!Array.isArray(entry.files) || entry.files.length === 0) throw invalid(source, `${where}: files missing`)
    for (const file of entry.files) {
      if (typeof file.path !== 'string' || !isRepoPath(file.path)) throw invalid(source, `${where}: bad file path ${String(file.path)}`)
      if (file.size !== null && !(Number.isSafeInteger(file.size) && file.size >= 0)) throw invalid(source, `${where}: ${file.path}: size must be a byte count or null`)
      if (file.sha256 !== null && !isSha256(file.sha256)) throw invalid(source, `${where}: ${file.path}: sha256 must be 64 lowercase hex digits or null`)
      if (entry.path !== '' && file.path !== entry.path && !file.path.startsWith(`${entry.path}/`)) {
        throw invalid(source, `${where}: ${file.path} lies outside the model path '${entry.path}'`)
      }
    }
  }
  for (const role of LOAD_ROLES) {
    const name = m.defaults?.[role]
    if (name === undefined || m.models[name]?.role !== role) throw invalid(source, `defaults.${role} must name a ${role} model`)
  }
  return m as Manifest
}

/** Reads and validates a manifest file. */
export function readManifest(file: string): Manifest {
  let text: string
  try {
    text = fs.readFileSync(file, 'utf8')
  } catch (error) {
    throw new HyperLoraError('MODEL_NOT_FOUND', `model manifest ${file}: ${(error as Error).message}`, { cause: error })
  }
  let parsed: unknown
  try {
    parsed = JSON.parse(text)
  } catch (error) {
    throw invalid(file, (error as Error).message)
  }
  return validateManifest(parsed, file)
}

let bundled: Manifest | undefined

/** The manifest shipped with the package (read once). */
export function bundledManifest(): Manifest {
  bundled ??= readManifest(BUNDLED_MANIFEST_PATH)
  return bundled
}

/**
 * The manifest in effect: the one given (an object or a file path), else the file named by the
 * `HYPERLORA_MANIFEST` environment variable, else the bundled one.
 */
export function activeManifest(given: Manifest | string | undefined, env: NodeJS.ProcessEnv): Manifest {
  if (typeof given === 'object') return validateManifest(given, '(given object)')
  const file = given ?? env['HYPERLORA_MANIFEST']
  return file ? readManifest(path.resolve(file)) : bundledManifest()
}

/** The manifest names used when `HyperLoRA.load` is given no model of a role. */
export const DEFAULT_MODELS: Readonly<Record<LoadRole, string>> = Object.freeze({ ...bundledManifest().defaults })

/**
 * The folder that holds what the engine loads: the model path itself for a folder model, its
 * parent for a single-file model. Manifest files are found relative to it outside the hub layout
 * (ComfyUI, `HYPERLORA_HOME`).
 */
function modelFolder(entry: ManifestEntry): string {
  return isSingleFile(entry) ? path.posix.dirname(entry.path).replace(/^\.$/, '') : entry.path
}

/** Whether the model is one file (a single-file checkpoint) rather than a folder. */
export function isSingleFile(entry: ManifestEntry): boolean {
  return entry.files.length === 1 && entry.files[0]!.path === entry.path
}

/** A file path relative to the model folder (see {@link modelFolder}). */
export function relativeToModel(entry: ManifestEntry, repoPath: string): string {
  const folder = modelFolder(entry)
  return folder === '' ? repoPath : repoPath.slice(folder.length + 1)
}

/** Total download size, or `null` when a size is unknown. */
export function knownSize(entry: ManifestEntry): number | null {
  let total = 0
  for (const f of entry.files) {
    if (f.size === null) return null
    total += f.size
  }
  return total
}
