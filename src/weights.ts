import { callNative, native, type CallOptions } from './native.js'
import { HyperLoraError } from './errors.js'

/** One tensor in a safetensors file's header. */
export interface TensorEntry {
  name: string
  /** safetensors dtype: `F32`, `F16`, `BF16`, `I64`, … */
  dtype: string
  shape: number[]
  /** Byte offset of the tensor's data from the start of the file. */
  offset: number
  byteSize: number
}

/** The index of a safetensors file. */
export interface WeightsIndex {
  path: string
  fileSize: number
  headerSize: number
  /** In file order. */
  tensors: TensorEntry[]
  /** The header's free-form `__metadata__` strings. */
  metadata: Record<string, string>
  /** Lower-case hex SHA-256 of the file, when `sha256: true` was asked for. */
  sha256?: string
}

/** Options of {@link inspectWeights}. */
export interface InspectWeightsOptions extends CallOptions {
  /** Also hash the whole file (reads every byte, reports `hash` progress). Default false. */
  sha256?: boolean
}

/**
 * Reads the tensor index of a `.safetensors` file without loading its data (memory-mapped, off
 * the event loop). Malformed files reject with code `BAD_WEIGHTS`, missing ones with
 * `MODEL_NOT_FOUND`.
 */
export async function inspectWeights(path: string, options: InspectWeightsOptions = {}): Promise<WeightsIndex> {
  if (typeof path !== 'string' || path.length === 0) {
    throw new HyperLoraError('INVALID_ARGUMENT', 'inspectWeights: path must be a non-empty string')
  }
  const result = await callNative(options, (cancel, onProgress) =>
    native().inspectWeights(path, { sha256: options.sha256 ?? false }, cancel, onProgress),
  )
  const { sha256, ...rest } = result
  return sha256 === undefined ? { path, ...rest } : { path, ...rest, sha256 }
}
