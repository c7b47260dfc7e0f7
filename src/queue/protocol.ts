/**
 * What travels through Redis between producers and workers: job payloads (a plain JSON mirror of
 * the generate options the queue supports), results, Redis key names and connection options.
 * Workers check every payload here, so a malformed job fails alone with `INVALID_ARGUMENT`.
 */
import { HyperLoraError, type ErrorCode } from '../errors.js'
import type { ImageFormat } from '../images.js'
import type { GenerationSettings, Sampler, SigmaSchedule } from '../pipeline.js'
import type { EngineProgress } from '../engine.js'

/** Where Redis is, as options (ioredis' names). */
export interface RedisConnectionOptions {
  host?: string
  port?: number
  db?: number
  username?: string
  password?: string
  /** Node's TLS options; `{}` for TLS with the defaults. */
  tls?: object
}

/** Where Redis is: a `redis://[user:password@]host[:port][/db]` (or `rediss://`) URL, or options. */
export type Connection = string | RedisConnectionOptions

/** Connection options with what BullMQ needs of workers. */
export type ResolvedConnection = RedisConnectionOptions & { maxRetriesPerRequest: null }

/** BullMQ job names. */
export const IDENTITY_JOB = 'identity'
export const GENERATE_JOB = 'generate'

/** The queue's name when none is given. */
export const DEFAULT_QUEUE_NAME = 'hyperlora'

/** The generate options a job carries: JSON values only. Init images, extra LoRA files
 * (worker-local paths), several identities and the face refine pass are not supported yet. */
export interface GenerateJobData {
  prompt: string
  negativePrompt?: string
  width?: number
  height?: number
  steps?: number
  cfg?: number
  sampler?: Sampler
  schedule?: SigmaSchedule
  /** Decimal string (seeds go up to 2^64); the producer fills a random one in when none is
   * given, so a job re-run after a worker died draws the same images. */
  seed: string
  batchSize?: number
  format?: ImageFormat
  /** An identity id from `createIdentity` / `putIdentity`. */
  identity?: string
  identityWeight?: number
  baseWeight?: number
  triggerWords?: string | false
}

/** Photos as base64-encoded image files (PNG, JPEG, WebP …). */
export interface IdentityJobData {
  photos: string[]
  removeBackground?: boolean
  grayscale?: boolean
}

/** One stored picture of a finished job. */
export interface StoredImage {
  /** Base64 of the encoded image, when results travel in Redis. */
  data?: string
  /** The file the worker wrote, when it has an output directory. */
  path?: string
  format: ImageFormat
  width: number
  height: number
  /** Decimal string (see `GeneratedImage.seed`). */
  seed: string
  index: number
  info: string
  warnings: string[]
  settings: Omit<GenerationSettings, 'seed'> & { seed: string }
}

export interface GenerateJobResult {
  images: StoredImage[]
}

export interface IdentityJobResult {
  id: string
  warnings: string[]
}

/** What a job's progress carries (BullMQ job progress). */
export type JobProgress = Pick<EngineProgress, 'stage' | 'step' | 'totalSteps'>

/** Redis keys the queue keeps beside BullMQ's, under the same prefix and queue name. */
export function keys(prefix: string, name: string): { identity(id: string): string; cancel(jobId: string): string } {
  const base = `${prefix}:${name}:hyperlora`
  return {
    identity: (id) => `${base}:identity:${id}`,
    cancel: (jobId) => `${base}:cancel:${jobId}`,
  }
}

/** ioredis options of a connection; `maxRetriesPerRequest: null` as BullMQ requires of workers
 * (commands wait for a reconnect instead of failing while Redis restarts). */
export function redisOptions(connection: Connection): ResolvedConnection {
  if (typeof connection !== 'string') return { maxRetriesPerRequest: null, ...connection }
  let url: URL
  try {
    url = new URL(connection)
  } catch {
    throw new HyperLoraError('INVALID_ARGUMENT', `not a Redis URL: ${connection}`)
  }
  if (url.protocol !== 'redis:' && url.protocol !== 'rediss:') throw new HyperLoraError('INVALID_ARGUMENT', `a Redis URL starts with redis:// or rediss://, got ${connection}`)
  const db = url.pathname.length > 1 ? Number(url.pathname.slice(1)) : 0
  if (!Number.isSafeInteger(db) || db < 0) throw new HyperLoraError('INVALID_ARGUMENT', `bad Redis database in ${connection}`)
  return {
    host: url.hostname || '127.0.0.1',
    port: url.port ? Number(url.port) : 6379,
    db,
    maxRetriesPerRequest: null,
    ...(url.username && { username: decodeURIComponent(url.username) }),
    ...(url.password && { password: decodeURIComponent(url.password) }),
    ...(url.protocol === 'rediss:' && { tls: {} }),
  }
}

/** A job's failure as BullMQ stores it: `[CODE] message`. */
export function failureMessage(error: unknown): string {
  const e = error instanceof HyperLoraError ? error : new HyperLoraError('INTERNAL', error instanceof Error ? error.message : String(error))
  return `[${e.code}] ${e.message}`
}

/** The error of a failed job from its `failedReason`. */
export function failureError(reason: string | undefined): HyperLoraError {
  const m = /^\[([A-Z_]+)\] ([\s\S]*)$/.exec(reason ?? '')
  return m ? new HyperLoraError(m[1] as ErrorCode, m[2]!) : new HyperLoraError('INTERNAL', reason ?? 'the job failed')
}

const GENERATE_FIELDS: Record<keyof GenerateJobData, 'string' | 'number' | 'boolean' | 'words'> = {
  prompt: 'string',
  negativePrompt: 'string',
  width: 'number',
  height: 'number',
  steps: 'number',
  cfg: 'number',
  sampler: 'string',
  schedule: 'string',
  seed: 'string',
  batchSize: 'number',
  format: 'string',
  identity: 'string',
  identityWeight: 'number',
  baseWeight: 'number',
  triggerWords: 'words',
}

function invalid(message: string): HyperLoraError {
  return new HyperLoraError('INVALID_ARGUMENT', message)
}

/** Checks the shape of a generate payload (the engine checks the values). */
export function checkGenerateData(data: unknown): GenerateJobData {
  if (typeof data !== 'object' || data === null || Array.isArray(data)) throw invalid('a generate job needs an object payload')
  const record = data as Record<string, unknown>
  for (const [key, value] of Object.entries(record)) {
    const kind = GENERATE_FIELDS[key as keyof GenerateJobData]
    if (kind === undefined) throw invalid(`a generate job cannot carry '${key}' (supported: ${Object.keys(GENERATE_FIELDS).join(', ')})`)
    const ok = kind === 'words' ? typeof value === 'string' || value === false : typeof value === kind && (kind !== 'number' || Number.isFinite(value))
    if (!ok) throw invalid(`generate job field '${key}' must be ${kind === 'words' ? 'a string or false' : `a ${kind === 'number' ? 'finite number' : kind}`}`)
  }
  if (typeof record['prompt'] !== 'string') throw invalid("a generate job needs a 'prompt' string")
  if (typeof record['seed'] !== 'string' || !/^\d{1,20}$/.test(record['seed']) || BigInt(record['seed']) >= 2n ** 64n) throw invalid("a generate job needs a 'seed': a decimal string in [0, 2^64)")
  return record as unknown as GenerateJobData
}

export function checkIdentityData(data: unknown): IdentityJobData {
  const record = (typeof data === 'object' && data !== null ? data : {}) as Record<string, unknown>
  const photos = record['photos']
  if (!Array.isArray(photos) || photos.length === 0 || !photos.every((p) => typeof p === 'string' && p.length > 0)) throw invalid("an identity job needs 'photos': base64 image files")
  for (const key of ['removeBackground', 'grayscale']) {
    if (record[key] !== undefined && typeof record[key] !== 'boolean') throw invalid(`identity job field '${key}' must be a boolean`)
  }
  return record as unknown as IdentityJobData
}

/** A seed as the engine takes it. */
export function seedValue(seed: string): number | bigint {
  const n = BigInt(seed)
  return n <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(n) : n
}
