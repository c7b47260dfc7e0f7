/**
 * The worker: one engine per process, jobs fetched from BullMQ by hand so that up to
 * `maxBatchSize` waiting generate jobs run as one `generateMany` call (mixed identities in one
 * UNet batch). A job completes only once its images are stored; see docs/queue.md for the
 * delivery guarantees.
 */
import { createHash, randomUUID } from 'node:crypto'
import * as fs from 'node:fs/promises'
import * as path from 'node:path'

import { Worker, type Job } from 'bullmq'
import { Redis } from 'ioredis'

import { HyperLoRA, type EngineGenerateOptions, type HyperLoRALoadOptions } from '../engine.js'
import { HyperLoraError } from '../errors.js'
import type { Identity } from '../identity.js'
import type { GeneratedImage } from '../pipeline.js'
import { IdentityCache } from './identity-cache.js'
import {
  checkGenerateData,
  checkIdentityData,
  DEFAULT_QUEUE_NAME,
  failureMessage,
  GENERATE_JOB,
  IDENTITY_JOB,
  keys,
  redisOptions,
  seedValue,
  type Connection,
  type GenerateJobData,
  type GenerateJobResult,
  type IdentityJobResult,
  type JobProgress,
  type StoredImage,
} from './protocol.js'

/** Options of {@link startWorker}. */
export interface StartWorkerOptions {
  connection: Connection
  /** Queue name; default `hyperlora`. */
  name?: string
  /** BullMQ key prefix; default `bull`. */
  prefix?: string
  /** The models (as `HyperLoRA.load` takes them). */
  models: HyperLoRALoadOptions
  /** Most images drawn in one UNet batch; default 4. */
  maxBatchSize?: number
  /** Batches fetched and stored at once (the engine still draws one at a time): 2 overlaps
   * fetching and storing with drawing. Default 1. */
  concurrency?: number
  /** Write images here (temp file + rename) and return their paths, instead of returning the
   * encoded images in the job result. */
  outputDir?: string
  /** Most bytes of encoded images a job result may hold in Redis; default 16 MiB. */
  maxResultBytes?: number
  /** Memory bound of the expanded identities kept for reuse; default 2 GiB. */
  identityCacheBytes?: number
  /** How long a job stays locked to this worker without a renewal (renewed every half of it);
   * default 30 s. A worker that dies loses its jobs' locks after this. */
  lockDuration?: number
  /** How often jobs whose lock ran out are handed back to the queue; default `lockDuration`. */
  stalledInterval?: number
  /** How often one job may be handed back before it fails; default 2. */
  maxStalledCount?: number
  /** What the worker does, for logs. */
  onEvent?: (event: WorkerEvent) => void
}

export type WorkerEvent =
  | { type: 'ready'; device: string }
  | { type: 'batch'; jobs: string[] }
  | { type: 'completed'; job: string }
  | { type: 'failed'; job: string; reason: string }
  | { type: 'error'; message: string }

/** A running worker. */
export interface PortraitWorker {
  readonly engine: HyperLoRA
  /** Stops taking jobs, finishes the ones in hand, closes the connections and the engine. */
  close(): Promise<void>
}

/** A generate job in hand, once checked. */
interface Entry {
  job: Job
  data: GenerateJobData
  identity: Identity | undefined
}

const RESULT_LIMIT = 16 * 1024 * 1024

/** Codes a retry cannot fix: the job fails at once even when it has attempts left. */
const FINAL_CODES = new Set(['INVALID_ARGUMENT', 'ABORTED', 'NO_FACE'])

/** Loads the models and starts serving jobs. */
export async function startWorker(options: StartWorkerOptions): Promise<PortraitWorker> {
  const maxBatchSize = options.maxBatchSize ?? 4
  const concurrency = options.concurrency ?? 1
  for (const [name, v] of [
    ['maxBatchSize', maxBatchSize],
    ['concurrency', concurrency],
  ] as const) {
    if (!Number.isSafeInteger(v) || v < 1) throw new HyperLoraError('INVALID_ARGUMENT', `${name} must be a positive integer, got ${v}`)
  }
  const lockDuration = options.lockDuration ?? 30_000
  const name = options.name ?? DEFAULT_QUEUE_NAME
  const prefix = options.prefix ?? 'bull'
  const key = keys(prefix, name)
  const connection = redisOptions(options.connection)
  const emit = options.onEvent ?? (() => {})
  const maxResultBytes = options.maxResultBytes ?? RESULT_LIMIT
  if (options.outputDir !== undefined) await fs.mkdir(options.outputDir, { recursive: true })

  const engine = await HyperLoRA.load(options.models)
  const redis = new Redis(connection)
  redis.on('error', (e: Error) => emit({ type: 'error', message: e.message }))
  const worker = new Worker(name, null, {
    connection,
    prefix,
    autorun: false,
    lockDuration,
    stalledInterval: options.stalledInterval ?? lockDuration,
    maxStalledCount: options.maxStalledCount ?? 2,
    // Seconds a blocking fetch waits: also how long a closing worker may wait for it.
    drainDelay: 1,
  })
  worker.on('error', (e: Error) => emit({ type: 'error', message: e.message }))
  await worker.waitUntilReady()
  void worker.startStalledCheckTimer().catch((e: unknown) => emit({ type: 'error', message: String(e) }))
  const cache = new IdentityCache(options.identityCacheBytes ?? 2 ** 31)
  /** Jobs in hand and their lock tokens. */
  const held = new Map<Job, string>()
  let closing = false
  let tokens = 0
  const workerId = randomUUID()
  emit({ type: 'ready', device: engine.device })

  // Locks are renewed by hand: BullMQ renews only the jobs its own processing loop runs.
  const renewal = setInterval(() => {
    for (const [job, token] of held) void job.extendLock(token, lockDuration).catch(() => {})
  }, lockDuration / 2)

  async function fetch(block: boolean): Promise<Job | undefined> {
    const token = `${workerId}:${tokens++}`
    const job = (await worker.getNextJob(token, { block })) as Job | undefined
    if (job) held.set(job, token)
    return job
  }

  async function finish(job: Job, outcome: { result: GenerateJobResult | IdentityJobResult } | { error: unknown }): Promise<void> {
    const token = held.get(job)
    if (token === undefined) return
    try {
      if ('result' in outcome) {
        await job.moveToCompleted(outcome.result, token, false)
        emit({ type: 'completed', job: job.id! })
      } else {
        const reason = failureMessage(outcome.error)
        const code = outcome.error instanceof HyperLoraError ? outcome.error.code : 'INTERNAL'
        const error = new Error(reason)
        if (FINAL_CODES.has(code)) error.name = 'UnrecoverableError'
        await job.moveToFailed(error, token, false)
        emit({ type: 'failed', job: job.id!, reason })
      }
    } catch (e) {
      // The lock was lost (this worker stalled and another took the job): its result is that one's.
      emit({ type: 'error', message: `job ${job.id}: ${e instanceof Error ? e.message : String(e)}` })
    } finally {
      held.delete(job)
    }
  }

  async function cancelled(jobs: readonly Job[]): Promise<Set<Job>> {
    if (jobs.length === 0) return new Set()
    const flags = await redis.mget(jobs.map((j) => key.cancel(j.id!)))
    return new Set(jobs.filter((_, i) => flags[i] !== null))
  }

  async function identityById(id: string): Promise<Identity> {
    const cached = cache.get(id)
    if (cached) return cached
    const bytes = await redis.getBuffer(key.identity(id))
    if (bytes === null) throw new HyperLoraError('INVALID_ARGUMENT', `unknown identity ${id} (create it with createIdentity or putIdentity on this queue)`)
    const identity = await engine.identityFromCoefficients(bytes)
    cache.set(id, identity)
    return identity
  }

  /** Runs `task` with a signal that fires when one of `jobs` is cancelled; resolves to the jobs
   * cancelled meanwhile. */
  async function watched<T>(jobs: readonly Job[], task: (signal: AbortSignal) => Promise<T>): Promise<{ value?: T; error?: unknown; cancelled: Set<Job> }> {
    const controller = new AbortController()
    let hit = new Set<Job>()
    const poll = setInterval(() => {
      void cancelled(jobs).then(
        (c) => {
          if (c.size > 0 && !controller.signal.aborted) {
            hit = c
            controller.abort()
          }
        },
        () => {},
      )
    }, 250)
    try {
      return { value: await task(controller.signal), cancelled: hit }
    } catch (error) {
      return { error, cancelled: hit }
    } finally {
      clearInterval(poll)
    }
  }

  function progress(jobs: () => Iterable<Job>): (e: JobProgress) => void {
    const last = new Map<Job, { stage: string; at: number }>()
    return (e) => {
      const now = performance.now()
      for (const job of jobs()) {
        const before = last.get(job)
        if (before && before.stage === e.stage && now - before.at < 200 && e.step < e.totalSteps) continue
        last.set(job, { stage: e.stage, at: now })
        void job.updateProgress({ stage: e.stage, step: e.step, totalSteps: e.totalSteps }).catch(() => {})
      }
    }
  }

  async function store(job: Job, images: GeneratedImage[]): Promise<GenerateJobResult> {
    let bytes = 0
    const stored: StoredImage[] = []
    for (const [k, image] of images.entries()) {
      const meta = {
        format: image.format,
        width: image.width,
        height: image.height,
        seed: String(image.seed),
        index: image.index,
        info: image.info,
        warnings: image.warnings,
        settings: { ...image.settings, seed: String(image.settings.seed) },
      }
      if (options.outputDir !== undefined) {
        const file = path.resolve(options.outputDir, `${job.id!.replace(/[^\w.-]/g, '_')}-${k}.${image.format === 'jpeg' ? 'jpg' : image.format}`)
        const temp = `${file}.${process.pid}.tmp`
        await fs.writeFile(temp, image.data)
        await fs.rename(temp, file)
        stored.push({ ...meta, path: file })
      } else {
        bytes += image.data.length
        stored.push({ ...meta, data: image.data.toString('base64') })
      }
    }
    if (bytes > maxResultBytes) {
      throw new HyperLoraError(
        'INVALID_ARGUMENT',
        `the job's images take ${(bytes / 2 ** 20).toFixed(1)} MiB, more than the ${(maxResultBytes / 2 ** 20).toFixed(1)} MiB a result may hold in Redis: start the worker with an output directory (--output-dir)`,
      )
    }
    return { images: stored }
  }

  /** Draws `group` as one `generateMany` call; returns the jobs left to run again (after a
   * cancellation, or one by one after a failure of a batch of several). */
  async function draw(group: Entry[]): Promise<Entry[]> {
    const done = new Set<Entry>()
    const stores: Promise<void>[] = []
    const requests: EngineGenerateOptions[] = group.map(({ data, identity }) => {
      const { seed, identity: _, ...rest } = data
      return { ...rest, seed: seedValue(seed), ...(identity && { identity }) } as EngineGenerateOptions
    })
    const onProgress = progress(() => group.filter((e) => !done.has(e)).map((e) => e.job))
    const run = await watched(
      group.map((e) => e.job),
      async (signal) => {
        for await (const { index, images } of engine.generateMany(requests, { maxBatchSize, signal, onProgress })) {
          const entry = group[index]!
          done.add(entry)
          stores.push(
            store(entry.job, images).then(
              (result) => finish(entry.job, { result }),
              (error: unknown) => finish(entry.job, { error }),
            ),
          )
        }
      },
    )
    await Promise.all(stores)
    const left = group.filter((e) => !done.has(e))
    if (run.error === undefined) return []
    if (run.cancelled.size > 0) {
      await Promise.all(left.filter((e) => run.cancelled.has(e.job)).map((e) => finish(e.job, { error: new HyperLoraError('ABORTED', 'the job was cancelled') })))
      return left.filter((e) => !run.cancelled.has(e.job))
    }
    if (left.length === 1) {
      await finish(left[0]!.job, { error: run.error })
      return []
    }
    // One bad request fails the whole call: find it by running each alone.
    for (const entry of left) for (let again = [entry]; again.length > 0; ) again = await draw(again)
    return []
  }

  async function generateJobs(jobs: Job[]): Promise<void> {
    const stop = await cancelled(jobs)
    const entries: Entry[] = []
    for (const job of jobs) {
      if (stop.has(job)) {
        await finish(job, { error: new HyperLoraError('ABORTED', 'the job was cancelled') })
        continue
      }
      try {
        const data = checkGenerateData(job.data)
        entries.push({ job, data, identity: data.identity === undefined ? undefined : await identityById(data.identity) })
      } catch (error) {
        await finish(job, { error })
      }
    }
    if (entries.length === 0) return
    emit({ type: 'batch', jobs: entries.map((e) => e.job.id!) })
    for (let group = entries; group.length > 0; ) group = await draw(group)
  }

  async function identityJob(job: Job): Promise<void> {
    let data
    try {
      data = checkIdentityData(job.data)
    } catch (error) {
      return finish(job, { error })
    }
    const { photos, ...rest } = data
    const run = await watched([job], async (signal) => {
      const identity = await engine.createIdentity(
        photos.map((p) => Buffer.from(p, 'base64')),
        { ...rest, signal, onProgress: progress(() => [job]) },
      )
      const coefficients = await identity.toCoefficients()
      const id = createHash('sha256').update(coefficients).digest('hex')
      await redis.set(key.identity(id), coefficients)
      cache.set(id, identity)
      return { id, warnings: [...identity.warnings] }
    })
    if (run.error !== undefined) {
      const error = run.cancelled.size > 0 ? new HyperLoraError('ABORTED', 'the job was cancelled') : run.error
      return finish(job, { error })
    }
    return finish(job, { result: run.value! })
  }

  async function serve(): Promise<void> {
    while (!closing) {
      let first: Job | undefined
      try {
        first = await fetch(true)
      } catch (e) {
        // Redis is away: BullMQ reconnects; try again shortly.
        emit({ type: 'error', message: e instanceof Error ? e.message : String(e) })
        await new Promise((r) => setTimeout(r, 500))
        continue
      }
      if (!first) continue
      const jobs = [first]
      try {
        if (first.name === GENERATE_JOB) {
          let images = imagesOf(first)
          while (images < maxBatchSize && !closing) {
            const next = await fetch(false)
            if (!next) break
            jobs.push(next)
            images += imagesOf(next)
          }
        }
        const generate = jobs.filter((j) => j.name === GENERATE_JOB)
        for (const job of jobs) {
          if (job.name === IDENTITY_JOB) await identityJob(job)
          else if (job.name !== GENERATE_JOB) await finish(job, { error: new HyperLoraError('INVALID_ARGUMENT', `unknown job type '${job.name}' (${GENERATE_JOB} or ${IDENTITY_JOB})`) })
        }
        await generateJobs(generate)
      } catch (e) {
        // Redis failed under a call: the jobs still held go back to the queue when their locks
        // run out.
        emit({ type: 'error', message: e instanceof Error ? e.message : String(e) })
        for (const job of jobs) held.delete(job)
      }
    }
  }

  const loops = Array.from({ length: concurrency }, () => serve())
  let closed: Promise<void> | undefined
  return {
    engine,
    close() {
      closed ??= (async () => {
        closing = true
        await Promise.all(loops)
        clearInterval(renewal)
        await worker.close()
        await redis.quit().catch(() => {})
        await engine.dispose()
      })()
      return closed
    },
  }
}

function imagesOf(job: Job): number {
  const n = (job.data as { batchSize?: unknown } | null)?.batchSize
  return typeof n === 'number' && Number.isSafeInteger(n) && n > 0 ? n : 1
}
