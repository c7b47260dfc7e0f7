/**
 * Models already on disk outside the hub cache layout: a ComfyUI `models/` folder and
 * `HYPERLORA_HOME`. Presence is decided by names and sizes (and, for hub-cache symlinks, by the
 * blob's hash in its name), never by hashing gigabytes on every load.
 */
import * as fs from 'node:fs'
import * as path from 'node:path'

import { isSingleFile, relativeToModel, type ManifestEntry, type ManifestFile } from './manifest.js'

/** A file a model needs, relative to the folder being checked. */
export interface ExpectedFile {
  path: string
  size: number | null
  sha256: string | null
  alternatives?: string[]
}

/** What {@link inspectFiles} found. */
export interface FileCheck {
  /** Every expected file is there. */
  complete: boolean
  /** Bytes of the files found. */
  bytes: number
  /** The files not there, or there with other content (with the reason in brackets). */
  missing: string[]
}

function statOrNull(file: string): fs.Stats | null {
  try {
    return fs.statSync(file)
  } catch {
    return null
  }
}

/** The name of the blob a hub-cache symlink points at, if it is one. */
function linkedBlob(file: string): string | null {
  try {
    return fs.lstatSync(file).isSymbolicLink() ? path.basename(fs.readlinkSync(file)) : null
  } catch {
    return null
  }
}

function checkOne(root: string, file: ExpectedFile): { bytes: number } | { problem: string } {
  const primary = path.join(root, file.path)
  const stat = statOrNull(primary)
  if (stat?.isFile()) {
    if (file.size !== null && stat.size !== file.size) return { problem: `${file.path} (${stat.size} bytes, expected ${file.size})` }
    const blob = linkedBlob(primary)
    if (file.sha256 !== null && blob !== null && /^[0-9a-f]{64}$/.test(blob) && blob !== file.sha256) {
      return { problem: `${file.path} (other content: sha256 ${blob})` }
    }
    return { bytes: stat.size }
  }
  // An alternative (e.g. fp32 weights instead of fp16) is accepted as it is: the engine reads either.
  for (const alternative of file.alternatives ?? []) {
    const alt = statOrNull(path.join(root, alternative))
    if (alt?.isFile()) return { bytes: alt.size }
  }
  return { problem: file.path }
}

/** Checks that `root` holds the expected files, by stat only. */
export function inspectFiles(root: string, files: readonly ExpectedFile[]): FileCheck {
  let bytes = 0
  const missing: string[] = []
  for (const file of files) {
    const result = checkOne(root, file)
    if ('problem' in result) missing.push(result.problem)
    else bytes += result.bytes
  }
  return { complete: missing.length === 0, bytes, missing }
}

/** The manifest files relative to the model folder, as they sit outside the hub layout. */
function filesInModelFolder(entry: ManifestEntry): ExpectedFile[] {
  return entry.files.map((f: ManifestFile) => ({
    path: relativeToModel(entry, f.path),
    size: f.size,
    sha256: f.sha256,
    alternatives: (f.alternatives ?? []).map((a) => relativeToModel(entry, a)),
  }))
}

/** A model found on disk: the path to hand to the engine and its size. */
export interface LocalModel {
  path: string
  bytes: number
}

/** The result of looking in one place: found, or what was missing there. */
export type Lookup = { found: LocalModel } | { looked: string; missing: string[] }

/**
 * Looks for a model in a folder laid out like its model folder (`dir/<files relative to the
 * model folder>`); returns the path the engine loads.
 */
function lookInFolder(entry: ManifestEntry, dir: string): Lookup {
  const check = inspectFiles(dir, filesInModelFolder(entry))
  if (!check.complete) return { looked: dir, missing: check.missing }
  const file = isSingleFile(entry) ? path.join(dir, relativeToModel(entry, entry.path)) : dir
  return { found: { path: file, bytes: check.bytes } }
}

/**
 * Looks in a ComfyUI `models/` folder at the places the manifest names: the model folder (as the
 * ComfyUI-HyperLoRA README lays it out), or one `.safetensors` checkpoint: the model itself under
 * ComfyUI's file name, or, for a diffusers model, an equivalent single-file checkpoint.
 */
export function lookInComfyui(entry: ManifestEntry, comfyuiModels: string): Lookup[] {
  return (entry.comfyui ?? []).map((candidate): Lookup => {
    const place = path.join(comfyuiModels, candidate)
    if (!candidate.endsWith('.safetensors')) return lookInFolder(entry, place)
    const expected = isSingleFile(entry) ? entry.files[0]!.size : null
    const stat = statOrNull(place)
    if (!stat?.isFile()) return { looked: place, missing: [path.basename(place)] }
    if (expected !== null && stat.size !== expected) return { looked: place, missing: [`${path.basename(place)} (${stat.size} bytes, expected ${expected})`] }
    return { found: { path: place, bytes: stat.size } }
  })
}

/** Looks in `HYPERLORA_HOME/<name>/`, laid out like the model folder. */
export function lookInHome(entry: ManifestEntry, name: string, home: string): Lookup {
  return lookInFolder(entry, path.join(home, name))
}
