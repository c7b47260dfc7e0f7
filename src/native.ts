/**
 * The one place that touches the native binding: loads it and runs its async calls with an
 * `AbortSignal`, a progress callback and error mapping. Every engine call goes through
 * {@link callNative}.
 */
import { createRequire } from 'node:module'
import * as path from 'node:path'

import type * as Binding from '../index.js'
import { HyperLoraError, fromNativeError } from './errors.js'

export type NativeBinding = typeof Binding
/** A native progress report: `stage`, `step` of `total`. */
export type ProgressEvent = Binding.ProgressEvent

const packageRoot = path.resolve(__dirname, '..')
const requireFromHere = createRequire(__filename)

/**
 * A CUDA build, when the user installed it (`npm i hyperlora-linux-x64-gnu-cuda`) and did not ask
 * for the CPU with `HYPERLORA_BACKEND=cpu`, wins over the default CPU build.
 */
function loadBinding(): NativeBinding {
  if (process.env['HYPERLORA_BACKEND'] !== 'cpu' && process.platform === 'linux' && process.arch === 'x64') {
    try {
      return requireFromHere('hyperlora-linux-x64-gnu-cuda') as NativeBinding
    } catch {
      // not installed: fall through to the default build
    }
  }
  return requireFromHere(path.join(packageRoot, 'index.js')) as NativeBinding
}

let binding: NativeBinding | undefined

/** The native binding, loaded on first use so that importing the package stays cheap. */
export function native(): NativeBinding {
  binding ??= loadBinding()
  return binding
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
 * between steps); native errors become {@link HyperLoraError}s with their codes.
 */
export async function callNative<T>(
  options: CallOptions,
  run: (cancel: Binding.CancelHandle, onProgress: ((event: ProgressEvent) => void) | null) => Promise<T>,
): Promise<T> {
  const { signal, onProgress } = options
  if (signal?.aborted) throw abortError()
  const cancel = new (native().CancelHandle)()
  const onAbort = (): void => cancel.cancel()
  signal?.addEventListener('abort', onAbort, { once: true })
  // A throwing progress callback must not take the process down from inside a native callback.
  let received = 0
  const progress = onProgress
    ? (event: ProgressEvent): void => {
        received++
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
    await progressDelivered(() => received >= cancel.progressSent)
    return result
  } catch (error) {
    throw fromNativeError(error)
  } finally {
    signal?.removeEventListener('abort', onAbort)
  }
}

/**
 * Progress reports travel on their own queue and can arrive after the promise settles; give the
 * last ones a few event-loop turns so that every report comes before the result, as callers expect.
 */
async function progressDelivered(done: () => boolean): Promise<void> {
  for (let turn = 0; turn < 1000 && !done(); turn++) {
    await new Promise<void>((resolve) => setImmediate(resolve))
  }
}

function abortError(): HyperLoraError {
  return new HyperLoraError('ABORTED', 'the operation was aborted')
}
