import * as os from 'node:os'
import * as path from 'node:path'

import { native } from './native.js'

/** A compute backend a native binary can contain. */
export type Backend = 'cpu' | 'cuda' | 'metal'

/** What this installation can do and where it looks for models. */
export interface RuntimeInfo {
  /** Version of the native engine. */
  version: string
  /** Backends compiled into the loaded native binary; `cpu` is always there. */
  backends: Backend[]
  /** Threads the CPU backend uses. */
  cpuThreads: number
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

/** Version, backends and model locations of this installation. */
export function info(): RuntimeInfo {
  const backend = native().backendInfo()
  return {
    version: backend.version,
    backends: ['cpu', ...(backend.features as Backend[])],
    cpuThreads: backend.cpuThreads,
    modelDir: modelDir(),
    huggingFaceCache: huggingFaceCache(),
  }
}
