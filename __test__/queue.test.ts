// hyperlora/queue end to end: a real redis-server, real worker processes (`hyperlora worker` on
// the tiny models), images compared with the same requests drawn in this process.
import { spawn, type ChildProcess } from 'node:child_process'
import { createHash } from 'node:crypto'
import * as fs from 'node:fs'
import * as path from 'node:path'

import sharp from 'sharp'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'

import { HyperLoRA, HyperLoraError, TINY_MODELS, type Identity } from '../src/index.js'
import { PortraitQueue, type JobProgress, type PortraitJob, type QueuedGenerateOptions, type QueuedImage } from '../src/queue/index.js'
import { tempDir } from './helpers.js'
import { RedisServer } from './redis-server.js'

const cli = path.join(__dirname, '..', 'bin', 'hyperlora.js')
const photo = path.join(__dirname, '..', 'models', 'tiny', 'photos', 'astronaut.png')
/** Locks long enough that a worker slowed down by a loaded machine keeps its jobs … */
const LOCK_MS = 10_000
/** … and short ones where a killed worker's jobs must go to another within seconds. */
const SHORT_LOCK_MS = 2000

class WorkerProcess {
  readonly log: string[] = []
  readonly child: ChildProcess
  readonly ready: Promise<void>

  constructor(redis: string, queue: string, extra: string[] = []) {
    this.child = spawn('node', [cli, 'worker', '--redis', redis, '--queue', queue, '--tiny', '--max-batch-size', '4', '--lock-duration', String(LOCK_MS), ...extra], { stdio: ['ignore', 'ignore', 'pipe'] })
    this.ready = new Promise((resolve, reject) => {
      let buffered = ''
      this.child.stderr!.on('data', (d: Buffer) => {
        buffered += d.toString()
        const lines = buffered.split('\n')
        buffered = lines.pop()!
        this.log.push(...lines)
        if (lines.some((l) => l.includes(' ready on '))) resolve()
      })
      this.child.once('exit', (code) => reject(new Error(`worker exited (${code}) before it was ready: ${this.log.join('\n')}`)))
    })
  }

  get batches(): number[] {
    return this.log.filter((l) => l.startsWith('batch of ')).map((l) => Number(l.split(' ')[2]!.replace(':', '')))
  }

  async stop(signal: NodeJS.Signals = 'SIGTERM'): Promise<number | null> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return this.child.exitCode
    const exited = new Promise<number | null>((r) => this.child.once('exit', (code) => r(code)))
    this.child.kill(signal)
    return exited
  }
}

let redis: RedisServer
let engine: HyperLoRA
const identities: { id: string; identity: Identity }[] = []
const workers: WorkerProcess[] = []
const queues: PortraitQueue[] = []

function queue(name: string): PortraitQueue {
  const q = new PortraitQueue({ connection: redis.url, name })
  queues.push(q)
  return q
}

async function startWorkers(name: string, n: number, extra: string[] = []): Promise<WorkerProcess[]> {
  const started = Array.from({ length: n }, () => new WorkerProcess(redis.url, name, extra))
  workers.push(...started)
  await Promise.all(started.map((w) => w.ready))
  return started
}

async function pixels(data: Buffer): Promise<Buffer> {
  return sharp(data).raw().toBuffer()
}

/** The request of job `j`: identities A, B, C and none in turn, small and few steps. */
function request(j: number, ids: readonly (string | undefined)[]): QueuedGenerateOptions {
  return { prompt: `a portrait, style ${j % 3}`, width: 64, height: 64, steps: 2, seed: 1000 + j, ...(ids[j % ids.length] !== undefined && { identity: ids[j % ids.length]! }) }
}

/** The same request drawn here; the worker's image must match it pixel for pixel (the batch
 * may differ from a lone draw only by float rounding: at most 1 level). */
async function expectSameAsLocal(j: number, ids: readonly (string | undefined)[], image: QueuedImage): Promise<void> {
  const { identity, seed, ...rest } = request(j, ids)
  const local = identity === undefined ? undefined : identities.find((x) => x.id === identity)!.identity
  const [expected] = await engine.generate({ ...rest, seed: seed!, ...(local && { identity: local }) })
  const [a, b] = await Promise.all([pixels(image.data!), pixels(expected!.data)])
  expect(a.length).toBe(b.length)
  let max = 0
  for (let i = 0; i < a.length; i++) max = Math.max(max, Math.abs(a[i]! - b[i]!))
  expect(max, `job ${j}`).toBeLessThanOrEqual(1)
  expect(image.seed).toBe(seed)
}

async function rejection(p: Promise<unknown>): Promise<HyperLoraError> {
  const e = await p.then(
    () => undefined,
    (error: unknown) => error,
  )
  expect(e).toBeInstanceOf(HyperLoraError)
  return e as HyperLoraError
}

beforeAll(async () => {
  redis = await RedisServer.start()
  engine = await HyperLoRA.load({ ...TINY_MODELS, device: 'cpu' })
  const q = queue('identities')
  for (const options of [{}, { grayscale: true }, { removeBackground: false }]) {
    const identity = await engine.createIdentity(photo, options)
    identities.push({ id: await q.putIdentity(await identity.toCoefficients()), identity })
  }
})

afterAll(async () => {
  await Promise.all(workers.map((w) => w.stop('SIGKILL')))
  await Promise.all(queues.map((q) => q.close()))
  await engine?.dispose()
  await redis?.stop()
})

describe('hyperlora/queue', () => {
  it('2 workers × 40 mixed-identity jobs: all complete once, each image as drawn locally; identities made by a worker', async () => {
    const name = 'main'
    const q = queue(name)
    const [w1, w2] = await startWorkers(name, 2)
    const ids = [...identities.map((x) => x.id), undefined]
    // Each identity's coefficients, copied under this queue's keys.
    for (const x of identities) expect(await q.putIdentity(await x.identity.toCoefficients())).toBe(x.id)

    const jobs = await Promise.all(Array.from({ length: 40 }, (_, j) => q.generate(request(j, ids))))
    const progress = new Map<string, JobProgress[]>()
    for (const job of jobs) job.on('progress', (p) => progress.set(job.id, [...(progress.get(job.id) ?? []), p]))
    const results = await Promise.all(jobs.map((job) => job.finished()))
    expect(new Set(jobs.map((j) => j.id)).size).toBe(40)
    for (const [j, images] of results.entries()) {
      expect(images).toHaveLength(1)
      await expectSameAsLocal(j, ids, images[0]!)
    }
    // Nothing ran twice: 40 completions, no failures, each job processed once.
    const counts = await q.queue.getJobCounts('completed', 'failed', 'wait', 'active')
    expect(counts).toEqual({ completed: 40, failed: 0, wait: 0, active: 0 })
    const stored = await q.queue.getJobs(['completed'])
    expect(stored.every((j) => j.attemptsStarted === 1 && (j.stalledCounter ?? 0) === 0)).toBe(true)
    // Both workers served, in batches of several (mixed identities in one batch).
    expect(w1!.batches.length).toBeGreaterThan(0)
    expect(w2!.batches.length).toBeGreaterThan(0)
    expect(Math.max(...w1!.batches, ...w2!.batches)).toBeGreaterThan(1)
    // Progress events arrived, with denoising steps.
    expect([...progress.values()].flat().some((p) => p.stage === 'denoise' && p.totalSteps === 2)).toBe(true)

    // An identity made by a worker is the same as one made here, bit for bit.
    const id = await q.createIdentity(photo)
    const local = await identities[0]!.identity.toCoefficients()
    expect(id).toBe(createHash('sha256').update(local).digest('hex'))
    expect((await q.getIdentity(id))!.equals(local)).toBe(true)
  })

  it('bad payloads fail alone with coded errors; the worker keeps serving', async () => {
    const name = 'bad'
    const q = queue(name)
    await q.putIdentity(await identities[0]!.identity.toCoefficients())
    const bad = [
      { name: 'generate', data: { width: 64 } },
      { name: 'generate', data: { prompt: 'x', seed: '1', initImage: 'photo.png' } },
      { name: 'generate', data: { prompt: 'x', seed: '1', identity: 'nobody' } },
      { name: 'generate', data: { prompt: 'x', seed: '1', width: 63, height: 64, steps: 2 } },
      { name: 'generate', data: { prompt: 'x', seed: 'abc' } },
      { name: 'identity', data: { photos: [Buffer.from('not an image').toString('base64')] } },
      { name: 'paint', data: {} },
    ]
    const added = await Promise.all(bad.map((b) => q.queue.add(b.name, b.data)))
    const good = await q.generate(request(0, [identities[0]!.id]))
    await startWorkers(name, 1)
    const images = await good.finished()
    await expectSameAsLocal(0, [identities[0]!.id], images[0]!)
    for (const job of added) {
      const e = await rejection(q.job(job.id!).finished())
      expect(e.code, e.message).toBe('INVALID_ARGUMENT')
      const failed = await q.queue.getJob(job.id!)
      expect(failed!.failedReason).toMatch(/^\[INVALID_ARGUMENT\] /)
    }
    // The producer refuses what it can check itself.
    expect((await rejection(q.generate({ prompt: 'x', seed: -1 }))).code).toBe('INVALID_ARGUMENT')
    expect((await rejection(q.generate({ prompt: 'x', seed: 1.5 }))).code).toBe('INVALID_ARGUMENT')
    // Still serving.
    const after = await q.generate(request(1, [identities[0]!.id]))
    expect(await after.finished()).toHaveLength(1)
  })

  it('cancels waiting and running jobs', async () => {
    const name = 'cancel'
    const q = queue(name)
    const [w] = await startWorkers(name, 1, ['--max-batch-size', '1'])
    const long = await q.generate({ prompt: 'long', width: 64, height: 64, steps: 400, seed: 1 })
    const waiting = await q.generate({ prompt: 'behind', width: 64, height: 64, steps: 2, seed: 2 })
    const next = await q.generate({ prompt: 'next', width: 64, height: 64, steps: 2, seed: 3 })
    await new Promise<void>((resolve) => long.on('progress', (p) => p.stage === 'denoise' && p.step >= 2 && resolve()))
    await waiting.cancel()
    expect((await rejection(waiting.finished())).code).toBe('ABORTED')
    await long.cancel()
    const e = await rejection(long.finished())
    expect(e.code).toBe('ABORTED')
    // The worker goes on with the next job.
    expect(await next.finished()).toHaveLength(1)
    expect(w!.log.some((l) => l.includes('ABORTED'))).toBe(true)
  })

  it('a worker killed mid-batch: its jobs are drawn by another, the same images', async () => {
    const name = 'sigkill'
    const q = queue(name)
    const ids = [...identities.map((x) => x.id), undefined]
    for (const x of identities) await q.putIdentity(await x.identity.toCoefficients())
    const short = ['--lock-duration', String(SHORT_LOCK_MS)]
    const [victim] = await startWorkers(name, 1, short)
    const jobs: PortraitJob[] = await Promise.all(Array.from({ length: 12 }, (_, j) => q.generate({ ...request(j, ids), steps: 12 })))
    // Killed once it is drawing its first batch.
    await new Promise<void>((resolve) => jobs[0]!.on('progress', (p) => p.stage === 'denoise' && resolve()))
    await victim!.stop('SIGKILL')
    await startWorkers(name, 1, short)
    const results = await Promise.all(jobs.map((job) => job.finished()))
    for (const [j, images] of results.entries()) {
      const { identity, seed, ...rest } = { ...request(j, ids), steps: 12 }
      const local = identity === undefined ? undefined : identities.find((x) => x.id === identity)!.identity
      const [expected] = await engine.generate({ ...rest, seed: seed!, ...(local && { identity: local }) })
      const [a, b] = await Promise.all([pixels(images[0]!.data!), pixels(expected!.data)])
      expect(a.every((v, i) => Math.abs(v - b[i]!) <= 1), `job ${j}`).toBe(true)
    }
    const stored = await q.queue.getJobs(['completed'])
    expect(stored).toHaveLength(12)
    // At least the killed batch was handed back once.
    expect(stored.some((j) => (j.stalledCounter ?? 0) > 0 || j.attemptsStarted > 1)).toBe(true)
  })

  it('Redis restarting mid-run: workers reconnect and every job completes', async () => {
    const name = 'restart'
    const q = queue(name)
    await startWorkers(name, 2)
    const jobs = await Promise.all(Array.from({ length: 16 }, (_, j) => q.generate({ ...request(j, [undefined]), steps: 6 })))
    await jobs[0]!.finished()
    expect(await q.queue.getJobCountByTypes('completed')).toBeLessThan(16)
    await redis.restart(1000)
    const results = await Promise.all(jobs.map((job) => job.finished()))
    expect(results.every((images) => images.length === 1 && images[0]!.data!.length > 0)).toBe(true)
    expect(await q.queue.getJobCountByTypes('completed')).toBe(16)
  })

  it('writes images into an output directory; SIGTERM finishes the batch in hand, then exits', async () => {
    const name = 'files'
    const q = queue(name)
    const dir = tempDir('queue-out')
    const [w] = await startWorkers(name, 1, ['--output-dir', dir])
    const job = await q.generate({ ...request(3, [undefined]), steps: 30 })
    await new Promise<void>((resolve) => job.on('progress', (p) => p.stage === 'denoise' && resolve()))
    const exited = w!.stop('SIGTERM')
    const [image] = await job.finished()
    expect(await exited).toBe(0)
    expect(w!.log.at(-1)).toBe('worker closed')
    expect(image!.data).toBeUndefined()
    expect(path.dirname(image!.path!)).toBe(dir)
    expect(fs.readdirSync(dir)).toEqual([path.basename(image!.path!)])
    expect((await sharp(image!.path!).metadata()).width).toBe(64)
  })
})
