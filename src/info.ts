import * as os from 'node:os'
import * as path from 'node:path'

import { bindingStatus, native } from './native.js'
import { packageVersion } from './platform.js'

/** A compute backend a native binary can contain. */
export type Backend = 'cpu' | 'cuda' | 'metal'

/** What this installation can do and where it looks for models. */
export interface RuntimeInfo {
  /** Version of the native engine (of the package when the engine cannot load). */
  version: string
  /** Backends compiled into the loaded native binary; `cpu` is always there, none when no
   * native binary loads. */
  backends: Backend[]
  /** Threads the CPU backend uses. */
  cpuThreads: number
  /** Where the native engine comes from (`hyperlora-linux-x64-gnu`, `hyperlora-linux-x64-gnu-cuda`,
   * a local build), or `null` when none loads. */
  native: string | null
  /** What keeps this installation from working fully: a missing native engine (then every
   * engine call fails with `NATIVE_MISSING`), a CUDA build that cannot load (the CPU build runs). */
  warnings: string[]
  /** Where hyperlora keeps downloaded models (`HYPERLORA_HOME`, default `~/.cache/hyperlora`). */
  modelDir: string
  /** The Hugging Face cache searched for models (`HF_HUB_CACHE`, `HF_HOME/hub`, `~/.cache/huggingface/hub`). */
  huggingFaceCache: string
}

/** `HYPERLORA_HOME`, default `~/.cache/hyperlora`. */
export function modelDir(env: NodeJS.ProcessEnv = process.env): string {
  return env['HYPERLORA_HOME'] ?? path.join(os.homedir(), '.cache', 'hyperlora')
}

/** The Hugging Face hub cache: `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`. */
export function huggingFaceCache(env: NodeJS.ProcessEnv = process.env): string {
  if (env['HF_HUB_CACHE']) return env['HF_HUB_CACHE']
  if (env['HF_HOME']) return path.join(env['HF_HOME'], 'hub')
  return path.join(os.homedir(), '.cache', 'huggingface', 'hub')
}

/** Version, backends and model locations of this installation. Never throws: a native engine
 * that cannot load is reported in `warnings`. */
export function info(): RuntimeInfo {
  const status = bindingStatus()
  const backend = status.source === null ? null : native().backendInfo()
  return {
    version: backend?.version ?? packageVersion(),
    backends: backend ? ['cpu', ...(backend.features as Backend[])] : [],
    cpuThreads: backend?.cpuThreads ?? os.availableParallelism(),
    native: status.source,
    warnings: status.warnings,
    modelDir: modelDir(),
    huggingFaceCache: huggingFaceCache(),
  }
}
