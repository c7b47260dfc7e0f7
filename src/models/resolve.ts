/**
 * Model resolution: turns a model spec (a path, a manifest name or a Hugging Face repo id) into a
 * local path the engine loads. Order: an explicit path → the user's Hugging Face cache (reused,
 * never duplicated) → a ComfyUI `models/` folder → `HYPERLORA_HOME/<name>` → a download into
 * the Hugging Face cache.
 */
import * as fs from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'

import { HyperLoraError } from '../errors.js'
import { huggingFaceCache, modelDir } from '../info.js'
import { blobFile, findInCache, linkIntoSnapshot, repoCacheDir, snapshotDirs, snapshotFile, snapshotHasBlob, writeRef } from './hfcache.js'
import { downloadBlob, fileMetadata, hubFromEnv, isOffline, isRepoPath, listRepoFiles, resolveUrl, type FileMetadata, type Hub } from './hub.js'
import { lookInComfyui, lookInHome, type LocalModel, type Lookup } from './local.js'
import { activeManifest, knownSize, type Manifest, type ManifestEntry, type ManifestFile, type ModelRole } from './manifest.js'
import { missingForRole, selectFiles } from './select.js'

/** Download progress of one file. */
export interface ModelEvent {
  stage: 'download'
  /** The manifest name, or the repo id for models outside the manifest. */
  model: string
  /** The file's path in the repository. */
  file: string
  /** Bytes of this file on disk so far (a resumed download starts above 0). */
  bytes: number
  totalBytes: number
}

/** Where and how models are looked up and fetched. */
export interface ResolveOptions {
  /** Environment to read (default `process.env`): `HF_HOME`, `HF_HUB_CACHE`, `HF_TOKEN`, `HF_HUB_OFFLINE`, `HF_ENDPOINT`, `COMFYUI_MODELS`, `HYPERLORA_HOME`, `HYPERLORA_MANIFEST`. */
  env?: NodeJS.ProcessEnv
  /** A ComfyUI `models/` folder to look in (else `COMFYUI_MODELS`). */
  comfyuiModels?: string
  /** Download what is missing (default true; `HF_HUB_OFFLINE=1` turns it off too). */
  download?: boolean
  signal?: AbortSignal
  onProgress?: (e: ModelEvent) => void
  /** A manifest (object or JSON file) to use instead of the bundled one (else `HYPERLORA_MANIFEST`). */
  manifest?: Manifest | string
}

/** Where an installed model was found. */
export type ModelSource = 'hf-cache' | 'comfyui' | 'hyperlora-home'

/** The outcome of pulling one model. */
export interface PulledModel {
  name: string
  role: ModelRole
  /** The local path the engine loads. */
  path: string
  source: ModelSource
  /** Bytes this pull fetched from the network (0 when everything was already there). */
  downloadedBytes: number
  /** Size of the model's files on disk. */
  bytes: number
}

/** A manifest entry and whether it is on this machine. */
export interface InstalledModel {
  name: string
  role: ModelRole
  description: string
  repo: string
  /** One of the models used when none is named ({@link DEFAULT_MODELS}). */
  isDefault: boolean
  installed: boolean
  source: ModelSource | null
  path: string | null
  /** On-disk size when installed, else the download size (`null` if the manifest lacks a size). */
  bytes: number | null
  /** What is missing where it would be downloaded to (the Hugging Face cache); empty when installed. */
  missing: string[]
}

const PARALLEL_FILES = 4
const PROGRESS_INTERVAL_MS = 100

/** Runs at most `n` tasks at a time. */
function limiter(n: number): <T>(task: () => Promise<T>) => Promise<T> {
  let active = 0
  const waiting: (() => void)[] = []
  return async (task) => {
    while (active >= n) await new Promise<void>((resolve) => waiting.push(resolve))
    active++
    try {
      return await task()
    } finally {
      active--
      waiting.shift()?.()
    }
  }
}

/**
 * Waits for every promise, then rejects with the first failure (naming the others): no download
 * keeps running unobserved after its caller has been told the outcome.
 */
async function allSettledOrThrow<T>(promises: readonly Promise<T>[]): Promise<T[]> {
  const settled = await Promise.allSettled(promises)
  const failures = settled.filter((s): s is PromiseRejectedResult => s.status === 'rejected').map((s) => s.reason as unknown)
  const [first, ...others] = failures
  if (failures.length === 0) return settled.map((s) => (s as PromiseFulfilledResult<T>).value)
  if (others.length === 0 || !(first instanceof HyperLoraError)) throw first
  const more = others.map((e) => (e instanceof HyperLoraError ? `${e.code}: ${e.message.split('\n')[0]}` : String(e))).join('; ')
  throw new HyperLoraError(first.code, `${first.message}\n(${others.length} more failed: ${more})`, { cause: first })
}

/** Downloads in flight in this process, by blob path: concurrent callers share one. */
const inFlight = new Map<string, Promise<number>>()

interface Context {
  manifest: Manifest
  cache: string
  home: string
  comfyui: string | null
  /** Why downloads are off, or null when they are on. */
  offline: string | null
  hub: Hub
  limit: <T>(task: () => Promise<T>) => Promise<T>
  onProgress: ((e: ModelEvent) => void) | undefined
}

function context(options: ResolveOptions): Context {
  const env = options.env ?? process.env
  const offline = isOffline(env) ? `HF_HUB_OFFLINE=${env['HF_HUB_OFFLINE']}` : options.download === false ? 'download: false' : null
  return {
    manifest: activeManifest(options.manifest, env),
    cache: huggingFaceCache(env),
    home: modelDir(env),
    comfyui: options.comfyuiModels ?? env['COMFYUI_MODELS'] ?? null,
    offline,
    hub: hubFromEnv(env, options.signal),
    limit: limiter(PARALLEL_FILES),
    onProgress: options.onProgress,
  }
}

type Found = LocalModel & { source: ModelSource }

/** Looks for a manifest model on disk: Hugging Face cache, ComfyUI, `HYPERLORA_HOME`. */
function findInstalled(ctx: Context, name: string, entry: ManifestEntry): { found: Found } | { looked: string[]; missing: string[] } {
  const places: [ModelSource, string, Lookup][] = [['hf-cache', 'Hugging Face cache', findInCache(ctx.cache, entry.repo, entry.revision, entry.files, entry.path)]]
  if (ctx.comfyui) for (const lookup of lookInComfyui(entry, ctx.comfyui)) places.push(['comfyui', 'ComfyUI', lookup])
  places.push(['hyperlora-home', 'HYPERLORA_HOME', lookInHome(entry, name, ctx.home)])
  const looked: string[] = []
  for (const [source, label, lookup] of places) {
    if ('found' in lookup) return { found: { ...lookup.found, source } }
    looked.push(`${label} ${lookup.looked}: missing ${lookup.missing.join(', ')}`)
  }
  const cacheLookup = places[0]![2]
  return { looked, missing: 'missing' in cacheLookup ? cacheLookup.missing : [] }
}

function offlineError(ctx: Context, what: string, missing: readonly string[], looked: readonly string[], remedy: string): HyperLoraError {
  return new HyperLoraError(
    'MODEL_NOT_FOUND',
    [
      `${what} is not on this machine and downloads are off (${ctx.offline}).`,
      `Missing: ${missing.join(', ')}`,
      'Looked in:',
      ...looked.map((l) => `  ${l}`),
      remedy,
    ].join('\n'),
  )
}

/** Emits progress for one file at most every 100 ms, and its last byte once. */
function progressOf(ctx: Context, model: string, file: string, total: number): (bytes: number) => void {
  let last = -Infinity
  let done = false
  return (bytes) => {
    const now = performance.now()
    if (!ctx.onProgress || done || (now - last < PROGRESS_INTERVAL_MS && bytes < total)) return
    last = now
    done = bytes >= total
    ctx.onProgress({ stage: 'download', model, file, bytes, totalBytes: total })
  }
}

/** Makes one file of a snapshot present: already linked, linked from an existing blob, or downloaded. Returns bytes fetched. */
async function ensureFile(ctx: Context, model: string, repo: string, file: ManifestFile, meta: FileMetadata): Promise<number> {
  const repoDir = repoCacheDir(ctx.cache, repo)
  if (snapshotHasBlob(repoDir, meta.commit, file.path, meta.etag, meta.size)) return 0
  const blob = blobFile(repoDir, meta.etag)
  let fetched = 0
  if (fs.statSync(blob, { throwIfNoEntry: false })?.size !== meta.size) {
    const shared = inFlight.get(blob)
    if (shared) {
      await shared
    } else {
      const lfs = meta.etag.length === 64
      const job = {
        url: resolveUrl(ctx.hub, repo, meta.commit, file.path),
        blob,
        size: meta.size,
        sha256: file.sha256 ?? (lfs ? meta.etag : null),
        gitSha1: lfs ? null : meta.etag,
        label: `${repo}/${file.path}`,
      }
      const download = ctx.limit(() => downloadBlob(ctx.hub, job, progressOf(ctx, model, file.path, meta.size))).finally(() => inFlight.delete(blob))
      inFlight.set(blob, download)
      fetched = await download
    }
  }
  linkIntoSnapshot(repoDir, meta.commit, file.path, meta.etag)
  return fetched
}

/** Checks what the hub serves against what the manifest expects before fetching gigabytes. */
function checkAgainstManifest(repo: string, file: ManifestFile, meta: FileMetadata): void {
  const label = `${repo}/${file.path}`
  if (file.sha256 && meta.etag.length === 64 && meta.etag !== file.sha256) {
    throw new HyperLoraError('BAD_WEIGHTS', `${label}: the hub serves sha256 ${meta.etag}, the manifest expects ${file.sha256}`)
  }
  if (file.size !== null && meta.size !== file.size) {
    throw new HyperLoraError('BAD_WEIGHTS', `${label}: the hub serves ${meta.size} bytes, the manifest expects ${file.size}`)
  }
}

/**
 * Downloads the files of one snapshot into the Hugging Face cache (reusing blobs already there)
 * and returns the snapshot folder and the bytes fetched. All files come from the commit the
 * first one resolves to, so a push during the download cannot mix two versions.
 */
async function downloadFiles(ctx: Context, model: string, repo: string, revision: string, files: readonly ManifestFile[]): Promise<{ snapshot: string; fetched: number }> {
  const [first, ...rest] = files
  const firstMeta = await ctx.limit(() => fileMetadata(ctx.hub, repo, revision, first!.path))
  const metas = [firstMeta, ...(await allSettledOrThrow(rest.map((f) => ctx.limit(() => fileMetadata(ctx.hub, repo, firstMeta.commit, f.path)))))]
  files.forEach((f, i) => checkAgainstManifest(repo, f, metas[i]!))
  const fetched = await allSettledOrThrow(files.map((f, i) => ensureFile(ctx, model, repo, f, metas[i]!)))
  const repoDir = repoCacheDir(ctx.cache, repo)
  writeRef(repoDir, revision, firstMeta.commit)
  return { snapshot: snapshotFile(repoDir, firstMeta.commit, ''), fetched: fetched.reduce((a, b) => a + b, 0) }
}

function joinRepoPath(root: string, repoPath: string): string {
  return path.join(root, ...repoPath.split('/').filter(Boolean))
}

/** Finds or downloads a manifest model. */
async function resolveEntry(ctx: Context, name: string, entry: ManifestEntry): Promise<Found & { downloadedBytes: number }> {
  const local = findInstalled(ctx, name, entry)
  if ('found' in local) return { ...local.found, downloadedBytes: 0 }
  if (ctx.offline) {
    const remedy = `Run 'npx hyperlora pull ${name}' where the network is reachable, or put the files in one of those places.`
    throw offlineError(ctx, `model '${name}' (${entry.role}, ${entry.repo})`, local.missing, local.looked, remedy)
  }
  const { snapshot, fetched } = await downloadFiles(ctx, name, entry.repo, entry.revision, entry.files)
  const bytes = entry.files.reduce((sum, f) => sum + (fs.statSync(joinRepoPath(snapshot, f.path), { throwIfNoEntry: false })?.size ?? 0), 0)
  return { path: joinRepoPath(snapshot, entry.path), bytes, source: 'hf-cache', downloadedBytes: fetched }
}

/** A model given as `org/name[/path]` that the manifest does not list. */
async function resolveRepo(ctx: Context, role: ModelRole, repo: string, prefix: string): Promise<string> {
  const revision = 'main'
  const looked: string[] = []
  for (const snapshot of snapshotDirs(repoCacheDir(ctx.cache, repo), revision)) {
    const target = joinRepoPath(snapshot, prefix)
    const missing = missingForRole(role, target)
    if (!missing) return target
    looked.push(`Hugging Face cache ${target}: missing ${missing.join(', ')}`)
  }
  const spec = prefix ? `${repo}/${prefix}` : repo
  if (ctx.offline) {
    if (looked.length === 0) looked.push(`Hugging Face cache ${repoCacheDir(ctx.cache, repo)}: not there`)
    throw offlineError(ctx, `${role} model '${spec}'`, [spec], looked, 'Run once where the network is reachable to download it into the Hugging Face cache.')
  }
  const listing = await listRepoFiles(ctx.hub, repo, revision)
  const selection = selectFiles(role, repo, listing.files, prefix)
  const files = selection.files.map((f): ManifestFile => ({ path: f, size: null, sha256: null }))
  const { snapshot } = await downloadFiles(ctx, spec, repo, listing.commit, files)
  writeRef(repoCacheDir(ctx.cache, repo), revision, listing.commit)
  return joinRepoPath(snapshot, selection.modelPath)
}

function expandHome(spec: string): string {
  return spec === '~' || spec.startsWith('~/') ? path.join(os.homedir(), spec.slice(1)) : spec
}

/** Paths are absolute, start with `.`/`~`, or use backslashes; anything else existing on disk also counts. */
function looksLikePath(spec: string): boolean {
  return path.isAbsolute(spec) || /^(\.{1,2}|~)([\\/]|$)/.test(spec) || spec.includes('\\')
}

const REPO_ID = /^([\w.-]+\/[\w.-]+)(?:\/(.+))?$/

/**
 * Resolves a model spec to a local path the engine loads.
 *
 * `spec` is a local path (file or folder), a manifest name (e.g. `'realvisxl-v4'`, see
 * `hyperlora models`), or a Hugging Face repo id (`'org/name'`, optionally followed by a path
 * in the repository: `'org/name/folder'` or `'org/name/file.safetensors'`). A relative path that
 * exists wins over a repo id of the same spelling.
 *
 * @throws HyperLoraError `MODEL_NOT_FOUND` (unknown name, missing path, offline with files
 *   missing — the message lists them and where it looked), `BAD_WEIGHTS` (a checksum mismatch),
 *   `IO` (the network failed after retries), `ABORTED`, `INVALID_ARGUMENT` (a model of another
 *   role, a bad manifest).
 */
export async function resolveModel(role: ModelRole, spec: string, options: ResolveOptions = {}): Promise<string> {
  const given = expandHome(spec.trim())
  if (given === '') throw new HyperLoraError('INVALID_ARGUMENT', `no ${role} model given`)
  if (looksLikePath(given) || fs.existsSync(given)) {
    if (!fs.existsSync(given)) throw new HyperLoraError('MODEL_NOT_FOUND', `${role} model ${path.resolve(given)}: no such file or folder`)
    return path.resolve(given)
  }
  const ctx = context(options)
  const entry = ctx.manifest.models[given]
  if (entry) {
    if (entry.role !== role) throw new HyperLoraError('INVALID_ARGUMENT', `'${given}' is a ${entry.role} model, not a ${role} model`)
    return (await resolveEntry(ctx, given, entry)).path
  }
  const repoId = REPO_ID.exec(given)
  if (repoId && (repoId[2] ?? '') !== '' && !isRepoPath(repoId[2]!.replace(/\/+$/, ''))) {
    throw new HyperLoraError('INVALID_ARGUMENT', `${role} model '${spec}': a path inside a repository may not contain '.', '..' or empty parts`)
  }
  if (repoId) {
    const [, repo, prefix = ''] = repoId
    const known = Object.entries(ctx.manifest.models).find(([, e]) => e.role === role && e.repo === repo && e.path === prefix)
    if (known) return (await resolveEntry(ctx, known[0], known[1])).path
    return resolveRepo(ctx, role, repo!, prefix.replace(/\/+$/, ''))
  }
  const names = Object.entries(ctx.manifest.models).filter(([, e]) => e.role === role).map(([n]) => n)
  throw new HyperLoraError('MODEL_NOT_FOUND', `${role} model '${spec}': not a file, not a known model (${names.join(', ')}), not a Hugging Face repo id (org/name)`)
}

function entryOrThrow(ctx: Context, name: string): ManifestEntry {
  const entry = ctx.manifest.models[name]
  if (!entry) throw new HyperLoraError('MODEL_NOT_FOUND', `unknown model '${name}'; known: ${Object.keys(ctx.manifest.models).join(', ')}`)
  return entry
}

/**
 * Makes manifest models available locally: those already installed (Hugging Face cache,
 * ComfyUI, `HYPERLORA_HOME`) are reported where they are; the rest are downloaded into the
 * Hugging Face cache, several files in parallel.
 */
export async function pullModels(names: readonly string[], options: ResolveOptions = {}): Promise<PulledModel[]> {
  const ctx = context(options)
  const entries = names.map((name) => [name, entryOrThrow(ctx, name)] as const)
  return allSettledOrThrow(
    entries.map(async ([name, entry]) => {
      const found = await resolveEntry(ctx, name, entry)
      return { name, role: entry.role, path: found.path, source: found.source, downloadedBytes: found.downloadedBytes, bytes: found.bytes }
    }),
  )
}

/** Every manifest model: whether it is installed, where, and its size. Never touches the network. */
export async function listModels(options: ResolveOptions = {}): Promise<InstalledModel[]> {
  const ctx = context(options)
  const defaults = new Set(Object.values(ctx.manifest.defaults))
  return Object.entries(ctx.manifest.models).map(([name, entry]): InstalledModel => {
    const local = findInstalled(ctx, name, entry)
    const common = { name, role: entry.role, description: entry.description, repo: entry.repo, isDefault: defaults.has(name) }
    if ('found' in local) return { ...common, installed: true, source: local.found.source, path: local.found.path, bytes: local.found.bytes, missing: [] }
    return { ...common, installed: false, source: null, path: null, bytes: knownSize(entry), missing: local.missing }
  })
}

/** The default model names of the manifest in effect (the bundled one unless overridden). */
export function defaultModelNames(options: ResolveOptions = {}): string[] {
  const ctx = context(options)
  return [...new Set(Object.values(ctx.manifest.defaults))]
}
