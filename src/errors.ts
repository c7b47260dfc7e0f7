import type * as Binding from '../index.js'

/** Stable error codes: the engine's (generated into the binding's types) and `NATIVE_MISSING`,
 * which only this layer raises (no native engine to ask). Programs branch on `error.code`;
 * messages are for people. */
export type ErrorCode = Binding.ErrorCode | 'NATIVE_MISSING'

/** Every {@link ErrorCode} at run time, without loading the native engine (which may be missing);
 * the type checks it lists each code, and a test that it matches the engine's `errorCodes()`. */
export const ERROR_CODES = [
  'BAD_WEIGHTS',
  'MODEL_NOT_FOUND',
  'INVALID_ARGUMENT',
  'NO_FACE',
  'OUT_OF_MEMORY',
  'ABORTED',
  'IO',
  'NATIVE_MISSING',
  'INTERNAL',
] as const satisfies readonly ErrorCode[]

// Compile-time: no code of the engine is missing from the list.
const EVERY_CODE_LISTED: Exclude<ErrorCode, (typeof ERROR_CODES)[number]> extends never ? true : false = true
void EVERY_CODE_LISTED

/**
 * Every failure of the engine surfaces as a `HyperLoraError`. An aborted call rejects with one
 * whose `code` is `'ABORTED'` and whose `name` is `'AbortError'`, as `fetch` and Node's own APIs
 * do, so `err.name === 'AbortError'` checks keep working.
 */
export class HyperLoraError extends Error {
  readonly code: ErrorCode

  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options)
    this.code = code
    this.name = code === 'ABORTED' ? 'AbortError' : 'HyperLoraError'
  }
}

const NATIVE_MESSAGE = /^\[([A-Z_]+)\] ([\s\S]*)$/
/** napi's message for a string outside a generated word list: the value, then the field. */
const NAPI_UNKNOWN_WORD = /^value `(.*)` does not match any variant of enum `\w+` on `?\w+\.(\w+)`?/

/** Turns an error thrown by the native binding (`[CODE] message`) into a `HyperLoraError`. */
export function fromNativeError(error: unknown): HyperLoraError {
  if (error instanceof HyperLoraError) return error
  const message = error instanceof Error ? error.message : String(error)
  const match = NATIVE_MESSAGE.exec(message)
  const code = match?.[1]
  if (match && code && (ERROR_CODES as readonly string[]).includes(code)) {
    return new HyperLoraError(code as ErrorCode, match[2] ?? '', { cause: error })
  }
  // napi's own conversion of an argument (a word not in a generated list, a wrong type).
  if ((error as { code?: unknown } | null)?.code === 'InvalidArg') {
    const word = NAPI_UNKNOWN_WORD.exec(message)
    const readable = word ? `unknown ${word[2]} ${word[1]}` : message.replaceAll('`', '')
    return new HyperLoraError('INVALID_ARGUMENT', readable, { cause: error })
  }
  return new HyperLoraError('INTERNAL', message, { cause: error })
}
