/**
 * The CLI's checks on what the user typed, made before any work starts: each mistake is one
 * `INVALID_ARGUMENT` line naming the flag and what it accepts (the CLI exits 2 on them).
 */
import * as fs from 'node:fs'
import * as path from 'node:path'

import { HyperLoraError } from '../errors.js'

/** A mistake in the command line. */
export function usageError(message: string): HyperLoraError {
  return new HyperLoraError('INVALID_ARGUMENT', message)
}

interface NumberRule {
  integer: boolean
  min: number
  max: number
  multipleOf?: number
  /** What the flag takes, in words. */
  accepts: string
}

/** The engine's limits (README, "Limits"), checked here so a typo fails before models load. */
const NUMBER_FLAGS: Record<string, NumberRule> = {
  steps: { integer: true, min: 1, max: 1000, accepts: 'a whole number from 1 to 1000' },
  cfg: { integer: false, min: 0, max: 100, accepts: 'a number from 0 to 100' },
  width: { integer: true, min: 8, max: 4096, multipleOf: 8, accepts: 'a multiple of 8 from 8 to 4096' },
  height: { integer: true, min: 8, max: 4096, multipleOf: 8, accepts: 'a multiple of 8 from 8 to 4096' },
  'identity-weight': { integer: false, min: -100, max: 100, accepts: 'a number from -100 to 100, e.g. 0.85 (negative pushes away from the person)' },
  'best-of': { integer: true, min: 1, max: 64, accepts: 'a whole number from 1 to 64' },
}

type Values = Readonly<Record<string, string | boolean | string[] | undefined>>

/** The numeric flag `--key`, or `undefined` when not given. */
export function numberFlag(values: Values, key: keyof typeof NUMBER_FLAGS & string): number | undefined {
  const given = values[key]
  if (given === undefined) return undefined
  const rule = NUMBER_FLAGS[key]!
  const n = typeof given === 'string' && given.trim() !== '' ? Number(given) : NaN
  const ok = Number.isFinite(n) && (!rule.integer || Number.isInteger(n)) && n >= rule.min && n <= rule.max && (!rule.multipleOf || n % rule.multipleOf === 0)
  if (!ok) throw usageError(`--${key} must be ${rule.accepts}, got '${String(given)}'`)
  return n
}

const MAX_SEED = 2n ** 64n - 1n

/** `--seed`: a whole number in [0, 2^64), kept exact as a bigint. */
export function seedFlag(values: Values): bigint | undefined {
  const given = values['seed']
  if (given === undefined) return undefined
  if (typeof given === 'string' && /^\d+$/.test(given.trim()) && BigInt(given.trim()) <= MAX_SEED) return BigInt(given.trim())
  throw usageError(`--seed must be a whole number from 0 to ${MAX_SEED}, got '${String(given)}'`)
}

/** An input file of `--flag`, absolute; it must exist and be a file. */
export function checkedInputFile(flag: string, file: string): string {
  const absolute = path.resolve(file)
  const stat = fs.statSync(absolute, { throwIfNoEntry: false })
  if (!stat) throw usageError(`--${flag} ${file}: no such file`)
  if (!stat.isFile()) throw usageError(`--${flag} ${file}: is a folder, not a file`)
  return absolute
}

/** The `--out` file, absolute: not a folder, and its folder must exist (checked before any work). */
export function checkedOutputFile(file: string): string {
  const absolute = path.resolve(file)
  if (fs.statSync(absolute, { throwIfNoEntry: false })?.isDirectory() || /[\\/]$/.test(file)) {
    throw usageError(`--out ${file} is a folder; give a file name, e.g. ${path.join(file, 'portrait.png')}`)
  }
  const folder = path.dirname(absolute)
  const stat = fs.statSync(folder, { throwIfNoEntry: false })
  if (!stat) throw usageError(`--out ${file}: the folder ${folder} does not exist`)
  if (!stat.isDirectory()) throw usageError(`--out ${file}: ${folder} is not a folder`)
  return absolute
}

/**
 * `--steps -3` as `--steps=-3`: node's parser would refuse a value starting with a dash as
 * ambiguous, when it is a (possibly valid, e.g. `--identity-weight -0.5`) negative number.
 */
export function joinNegativeNumbers(argv: readonly string[], valueFlags: ReadonlySet<string>): string[] {
  const out: string[] = []
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!
    const next = argv[i + 1]
    if (arg.startsWith('--') && valueFlags.has(arg.slice(2)) && next !== undefined && /^-\.?\d/.test(next)) {
      out.push(`${arg}=${next}`)
      i++
    } else {
      out.push(arg)
    }
  }
  return out
}
