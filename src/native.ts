/**
 * The one place that touches the native binding: loads it and runs its async calls with an
 * `AbortSignal`, a progress callback and error mapping. Every engine call goes through
 * {@link callNative}.
 */
import * as fs from 'node:fs'
import { createRequire } from 'node:module'
import * as path from 'node:path'

import type * as Binding from '../index.js'
import { HyperLoraError, fromNativeError } from './errors.js'
import { NAPI_BINARY, packageVersion, PLATFORM_PACKAGES, platformPackage } from './platform.js'

export type NativeBinding = typeof Binding
/** A native progress report: `stage`, `step` of `total`. */
export type ProgressEvent = Binding.ProgressEvent

const packageRoot = path.resolve(__dirname, '..')
const requireFromHere = createRequire(__filename)

/** The optional CUDA build for Linux x64, used instead of the CPU build when it loads. */
const CUDA_PACKAGE = 'hyperlora-linux-x64-gnu-cuda'

/** Which native binary is in use, and what went wrong with the others. */
export interface BindingStatus {
  /** The package (or local build) the engine was loaded from; `null` when none loads. */
  source: string | null
  /** Why a binary that should have loaded did not (the CUDA build, the platform package). */
  warnings: string[]
}

/** The outcome of loading: the binding, or the error every engine call then rejects with. */
type Loaded = { binding: NativeBinding; status: BindingStatus } | { binding?: undefined; status: BindingStatus; error: HyperLoraError }

let loaded: Loaded | undefined

function isNotInstalled(error: unknown, name: string): boolean {
  const e = error as NodeJS.ErrnoException
  return e?.code === 'MODULE_NOT_FOUND' && String(e.message).includes(`'${name}'`)
}

function firstLine(error: unknown): string {
  return String(error instanceof Error ? error.message : error).split('\n')[0]!
}

/**
 * The CUDA build, when the user installed it (`npm i hyperlora-linux-x64-gnu-cuda`) and did not ask
 * for the CPU with `HYPERLORA_BACKEND=cpu`. One that is installed but cannot load (no NVIDIA
 * driver, no cuDNN) leaves a warning and the CPU build is used.
 */
function loadCuda(warnings: string[]): NativeBinding | undefined {
  if (process.env['HYPERLORA_BACKEND'] === 'cpu' || process.platform !== 'linux' || process.arch !== 'x64') return undefined
  try {
    return requireFromHere(CUDA_PACKAGE) as NativeBinding
  } catch (error) {
    if (!isNotInstalled(error, CUDA_PACKAGE)) {
      warnings.push(`${CUDA_PACKAGE} is installed but cannot load (${firstLine(error)}); using the CPU build`)
    }
    return undefined
  }
}

/** Where the default build came from: a local build next to the loader, else the platform package. */
function defaultSource(): string {
  const pkg = platformPackage()
  const local = pkg && path.join(packageRoot, `${NAPI_BINARY}.${pkg.slice('hyperlora-'.length)}.node`)
  return local && fs.existsSync(local) ? `local build (${path.basename(local)})` : (pkg ?? 'unknown')
}

function loadBinding(): Loaded {
  const warnings: string[] = []
  const cuda = loadCuda(warnings)
  if (cuda) return { binding: cuda, status: { source: CUDA_PACKAGE, warnings } }
  try {
    const binding = requireFromHere(path.join(packageRoot, 'index.js')) as NativeBinding
    return { binding, status: { source: defaultSource(), warnings } }
  } catch (error) {
    const missingError = nativeMissing(error)
    return { status: { source: null, warnings: [...warnings, missingError.message] }, error: missingError }
  }
}

/** Why no native binary loads, and what to install or run. */
function nativeMissing(loaderError: unknown): HyperLoraError {
  return new HyperLoraError('NATIVE_MISSING', missingMessage(loaderError), { cause: loaderError })
}

function missingMessage(loaderError: unknown): string {
  const where = `${process.platform}-${process.arch}`
  if (fs.existsSync(path.join(packageRoot, 'crates'))) {
    return `the native engine is not built in this source checkout (${packageRoot}): run 'npm run build' (needs Rust, https://rustup.rs)`
  }
  const pkg = platformPackage()
  if (!pkg) {
    return `hyperlora has no prebuilt native engine for ${where}; prebuilt: ${Object.values(PLATFORM_PACKAGES).join(', ')}. Build it from a clone of the repository with 'npm install' (needs Rust)`
  }
  const install = `npm i ${pkg}@${packageVersion()}`
  try {
    requireFromHere(pkg)
  } catch (error) {
    if (isNotInstalled(error, pkg)) {
      return `the native engine for ${where} is missing: the package ${pkg} is not installed. Install it next to hyperlora: ${install} (it is an optional dependency, so installs with --omit=optional, or from a lockfile made on another platform, leave it out)`
    }
    return `${pkg}, the native engine for ${where}, is installed but cannot load (${firstLine(error)}); reinstall it: ${install}`
  }
  return `the native engine for ${where} (${pkg}) cannot load: ${firstLine(loaderError)}`
}

/** The native binding, loaded on first use so that importing the package stays cheap. */
export function native(): NativeBinding {
  loaded ??= loadBinding()
  if (!loaded.binding) throw loaded.error
  return loaded.binding
}

/** Which native binary is in use (loading it if needed); never throws. */
export function bindingStatus(): BindingStatus {
  loaded ??= loadBinding()
  return loaded.status
}

/** Cancellation and progress for one native call. */
export interface CallOptions {
  /** Stops the call at its next step; the promise then rejects with an `AbortError`. */
  signal?: AbortSignal | undefined
  /** Called from the engine's progress reports, on the main thread. */
  onProgress?: ((event: ProgressEvent) => void) | undefined
}

/**
 * Runs one native async call. The signal is wired to a native cancel flag (the engine checks it
 * between steps); native errors become {@link HyperLoraError}s with their codes. With a progress
 * callback, the promise settles only after the call's last report: the native side ends its
 * reports with `null`, through the same queue, so nothing arrives after the result.
 */
export async function callNative<T>(
  options: CallOptions,
  run: (cancel: Binding.CancelHandle, onProgress: ((event: ProgressEvent | null) => void) | null) => Promise<T>,
): Promise<T> {
  const { signal, onProgress } = options
  if (signal?.aborted) throw abortError()
  const cancel = new (native().CancelHandle)()
  const onAbort = (): void => cancel.cancel()
  signal?.addEventListener('abort', onAbort, { once: true })
  let reportsEnded = (): void => {}
  const lastReport = new Promise<void>((resolve) => (reportsEnded = resolve))
  // A throwing progress callback must not take the process down from inside a native callback.
  const progress = onProgress
    ? (event: ProgressEvent | null): void => {
        if (event === null) return reportsEnded()
        try {
          onProgress(event)
        } catch (error) {
          queueMicrotask(() => {
            throw error
          })
        }
      }
    : null
  try {
    const result = await run(cancel, progress)
    if (progress) await lastReport
    return result
  } catch (error) {
    throw fromNativeError(error)
  } finally {
    signal?.removeEventListener('abort', onAbort)
  }
}

function abortError(): HyperLoraError {
  return new HyperLoraError('ABORTED', 'the operation was aborted')
}
