/** The producer side: enqueue identities and portraits from any Node process, no models needed. */
import { createHash, randomBytes, randomUUID } from 'node:crypto'
import { EventEmitter } from 'node:events'
import * as fs from 'node:fs/promises'

import { Job, Queue, QueueEvents, type JobsOptions } from 'bullmq'
import { Redis } from 'ioredis'

import { HyperLoraError } from '../errors.js'
import type { ImageFormat } from '../images.js'
import type { GenerationSettings } from '../pipeline.js'
import {
  DEFAULT_QUEUE_NAME,
  failureError,
  GENERATE_JOB,
  IDENTITY_JOB,
  keys,
  redisOptions,
  seedValue,
  type Connection,
  type GenerateJobData,
  type GenerateJobResult,
  type IdentityJobData,
  type IdentityJobResult,
  type JobProgress,
  type StoredImage,
} from './protocol.js'

/** Options of {@link PortraitQueue}. */
export interface PortraitQueueOptions {
  connection: Connection
  /** Queue name; default `hyperlora` (workers must use the same). */
  name?: string
  /** BullMQ key prefix; default `bull`. */
  prefix?: string
  /** BullMQ options of every job (attempts, priority, removeOnComplete …). `jobId` is the
   * queue's own. */
  jobOptions?: Omit<JobsOptions, 'jobId'>
}

/** What {@link PortraitQueue.generate} takes: the generate options a job can carry, with the
 * seed as a number. */
export interface QueuedGenerateOptions extends Omit<GenerateJobData, 'seed'> {
  /** Default: random, chosen now, so a job re-run after a worker died draws the same images. */
  seed?: number | bigint
}

/** A finished job's picture. */
export interface QueuedImage {
  /** The encoded image, when the worker returns images in the job result. */
  data?: Buffer
  /** The file the worker wrote, when it was started with an output directory. */
  path?: string
  format: ImageFormat
  width: number
  height: number
  seed: number | bigint
  index: number
  info: string
  warnings: string[]
  settings: GenerationSettings
}

/** Photos for {@link PortraitQueue.createIdentity}: image files' bytes or paths (read here). */
export type QueuedPhoto = Buffer | Uint8Array | string

/** How often a waiting producer asks Redis for a job's state besides listening to its events
 * (events are not replayed across a Redis restart). */
const POLL_MS = 1000

type Settle = (outcome: { value: unknown } | { error: HyperLoraError }) => void

/** A queued generate job. Emits `progress` ({@link JobProgress}) while a worker draws it. */
export class PortraitJob extends EventEmitter<{ progress: [JobProgress] }> {
  /** @internal */
  constructor(
    readonly id: string,
    private readonly queue: PortraitQueue,
  ) {
    super()
  }

  /** The images, once a worker has stored them. Rejects with the job's `HyperLoraError` (its
   * `failedReason` is `[CODE] message`), `ABORTED` when it was cancelled. */
  async finished(): Promise<QueuedImage[]> {
    const result = (await this.queue.result(this.id)) as GenerateJobResult
    return result.images.map(image)
  }

  /** Cancels the job: a waiting one is removed, a running one is stopped by its worker at the
   * next step (its batch's other jobs are drawn again). Either way `finished()` rejects with
   * `ABORTED`. Resolves once the cancellation is recorded. */
  async cancel(): Promise<void> {
    await this.queue.cancel(this.id)
  }
}

function image(s: StoredImage): QueuedImage {
  const { data, path, seed, settings, ...rest } = s
  return {
    ...rest,
    ...(data !== undefined && { data: Buffer.from(data, 'base64') }),
    ...(path !== undefined && { path }),
    seed: seedValue(seed),
    settings: { ...settings, seed: seedValue(settings.seed) },
  }
}

/** Enqueues identity and portrait jobs for workers (`startWorker`, `hyperlora worker`). */
export class PortraitQueue {
  readonly name: string
  readonly #queue: Queue
  readonly #redis: Redis
  readonly #keys: ReturnType<typeof keys>
  readonly #jobOptions: Omit<JobsOptions, 'jobId'>
  readonly #connection: ReturnType<typeof redisOptions>
  readonly #prefix: string
  #events: QueueEvents | undefined
  readonly #jobs = new Map<string, PortraitJob>()
  /** Settles the `result` promises of the jobs waited for. */
  readonly #waiting = new Map<string, Set<Settle>>()

  constructor(options: PortraitQueueOptions) {
    this.name = options.name ?? DEFAULT_QUEUE_NAME
    this.#prefix = options.prefix ?? 'bull'
    this.#connection = redisOptions(options.connection)
    this.#queue = new Queue(this.name, { connection: this.#connection, prefix: this.#prefix })
    this.#queue.on('error', () => {})
    this.#redis = new Redis(this.#connection)
    this.#redis.on('error', () => {})
    this.#keys = keys(this.#prefix, this.name)
    this.#jobOptions = options.jobOptions ?? {}
  }

  /** The BullMQ queue underneath (counts, pausing, cleaning). */
  get queue(): Queue {
    return this.#queue
  }

  /**
   * An identity id from 1..N photos of one person: a worker runs face analysis and the
   * hypernetwork and stores the identity's coefficients in Redis under the id (the SHA-256 of
   * the coefficients, so the same identity always gets the same id). Photos without a face are
   * skipped; none with one fails with `NO_FACE`.
   */
  async createIdentity(photos: QueuedPhoto | readonly QueuedPhoto[], options: { removeBackground?: boolean; grayscale?: boolean } = {}): Promise<string> {
    const list = (Array.isArray(photos) ? photos : [photos]) as QueuedPhoto[]
    if (list.length === 0) throw new HyperLoraError('INVALID_ARGUMENT', 'createIdentity needs at least one photo')
    const encoded = await Promise.all(list.map(async (p) => Buffer.from(typeof p === 'string' ? await fs.readFile(p) : p).toString('base64')))
    const data: IdentityJobData = { photos: encoded, ...options }
    const id = await this.#add(IDENTITY_JOB, data)
    return ((await this.result(id)) as IdentityJobResult).id
  }

  /** Stores coefficients made locally (`identity.toCoefficients()`) and returns their id. Workers
   * check they were made by their own HyperLoRA model. */
  async putIdentity(coefficients: Uint8Array): Promise<string> {
    const bytes = Buffer.from(coefficients)
    const id = createHash('sha256').update(bytes).digest('hex')
    await this.#redis.set(this.#keys.identity(id), bytes)
    return id
  }

  /** The stored coefficients of an identity id, or `undefined`. */
  async getIdentity(id: string): Promise<Buffer | undefined> {
    return (await this.#redis.getBuffer(this.#keys.identity(id))) ?? undefined
  }

  async deleteIdentity(id: string): Promise<void> {
    await this.#redis.del(this.#keys.identity(id))
  }

  /** Enqueues a portrait; resolves once it is in Redis. */
  async generate(options: QueuedGenerateOptions): Promise<PortraitJob> {
    if (typeof options !== 'object' || options === null || typeof options.prompt !== 'string') throw new HyperLoraError('INVALID_ARGUMENT', 'generate needs options with a prompt')
    const seed = options.seed ?? randomBytes(8).readBigUInt64LE()
    if (!/^\d+$/.test(String(seed)) || BigInt(seed) >= 2n ** 64n) throw new HyperLoraError('INVALID_ARGUMENT', `seed must be a whole number in [0, 2^64), got ${String(seed)}`)
    const data: GenerateJobData = { ...options, seed: String(seed) }
    const id = await this.#add(GENERATE_JOB, data)
    return this.#track(id)
  }

  /** A handle to a job enqueued earlier (by this process or another). */
  job(id: string): PortraitJob {
    return this.#track(id)
  }

  /** @internal The job's result once it has one. */
  async result(id: string): Promise<unknown> {
    await this.#queueEvents()
    return new Promise((resolve, reject) => {
      const waiting = this.#waiting.get(id) ?? new Set<Settle>()
      this.#waiting.set(id, waiting)
      const settle: Settle = (outcome) => {
        if (!waiting.delete(settle)) return
        if (waiting.size === 0) {
          this.#waiting.delete(id)
          this.#jobs.delete(id)
        }
        clearInterval(poll)
        if ('error' in outcome) reject(outcome.error)
        else resolve(outcome.value)
      }
      waiting.add(settle)
      const check = async (): Promise<void> => {
        const job = await Job.fromId(this.#queue, id)
        if (!job) return settle({ error: new HyperLoraError('ABORTED', `job ${id} was cancelled or removed`) })
        if (job.finishedOn === undefined) return
        if (job.failedReason && job.returnvalue == null) settle({ error: failureError(job.failedReason) })
        else settle({ value: job.returnvalue })
      }
      const poll = setInterval(() => void check().catch(() => {}), POLL_MS)
      void check().catch(() => {})
    })
  }

  /** @internal */
  async cancel(id: string): Promise<void> {
    const job = await Job.fromId(this.#queue, id)
    if (!job) return
    // A finished job keeps its result.
    if (job.finishedOn !== undefined) return
    // The flag first: a worker that takes the job meanwhile sees it.
    await this.#redis.set(this.#keys.cancel(id), '1', 'EX', 24 * 3600)
    try {
      // A waiting job goes at once; an active one is locked and stays for its worker to stop.
      await job.remove()
    } catch {
      // Locked by a worker: it polls the flag.
    }
  }

  /** Closes the connections (jobs stay in Redis). */
  async close(): Promise<void> {
    await this.#events?.close()
    await this.#queue.close()
    await this.#redis.quit().catch(() => {})
  }

  async #add(name: string, data: object): Promise<string> {
    const id = randomUUID()
    await this.#queue.add(name, data, { ...this.#jobOptions, jobId: id })
    return id
  }

  #track(id: string): PortraitJob {
    let job = this.#jobs.get(id)
    if (!job) {
      job = new PortraitJob(id, this)
      this.#jobs.set(id, job)
      void this.#queueEvents().catch(() => {})
    }
    return job
  }

  async #queueEvents(): Promise<QueueEvents> {
    if (!this.#events) {
      const events = new QueueEvents(this.name, { connection: this.#connection, prefix: this.#prefix })
      events.on('error', () => {})
      events.on('progress', ({ jobId, data }: { jobId: string; data: unknown }) => {
        this.#jobs.get(jobId)?.emit('progress', data as JobProgress)
      })
      events.on('completed', ({ jobId, returnvalue }: { jobId: string; returnvalue: unknown }) => {
        const value = typeof returnvalue === 'string' ? JSON.parse(returnvalue) : returnvalue
        for (const settle of this.#waiting.get(jobId) ?? []) settle({ value })
      })
      events.on('failed', ({ jobId, failedReason }: { jobId: string; failedReason: string }) => {
        for (const settle of this.#waiting.get(jobId) ?? []) settle({ error: failureError(failedReason) })
      })
      this.#events = events
    }
    await this.#events.waitUntilReady()
    return this.#events
  }
}
