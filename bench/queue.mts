/**
 * Queue throughput: jobs per second through a private redis-server and `hyperlora worker`
 * processes on the bundled tiny models (CPU), with 1 and 2 workers, batched
 * (`--max-batch-size 4`) and one job at a time (`--max-batch-size 1`). Jobs rotate over three
 * identities and none, so batches mix identities.
 *   npx tsx bench/queue.mts [jobs=40] [size=64] [steps=4]
 */
import { spawn, type ChildProcess } from 'node:child_process'

import { PortraitQueue } from '../src/queue/index.js'
import { RedisServer } from '../__test__/redis-server.js'

const [jobs, size, steps] = [Number(process.argv[2] ?? 40), Number(process.argv[3] ?? 64), Number(process.argv[4] ?? 4)]
const cli = new URL('../bin/hyperlora.js', import.meta.url).pathname
const photo = new URL('../models/tiny/photos/astronaut.png', import.meta.url).pathname

function worker(url: string, queue: string, maxBatchSize: number): Promise<ChildProcess> {
  const child = spawn('node', [cli, 'worker', '--redis', url, '--queue', queue, '--tiny', '--max-batch-size', String(maxBatchSize)], { stdio: ['ignore', 'ignore', 'pipe'] })
  return new Promise((resolve, reject) => {
    child.stderr!.on('data', (d: Buffer) => d.toString().includes(' ready on ') && resolve(child))
    child.once('exit', (code) => reject(new Error(`worker exited with ${code}`)))
  })
}

const redis = await RedisServer.start()
const rows: [string, number][] = []
try {
  for (const [workers, maxBatchSize] of [
    [1, 1],
    [1, 4],
    [2, 1],
    [2, 4],
  ] as const) {
    const name = `bench-${workers}-${maxBatchSize}`
    const q = new PortraitQueue({ connection: redis.url, name })
    const children = await Promise.all(Array.from({ length: workers }, () => worker(redis.url, name, maxBatchSize)))
    const ids = [...(await Promise.all([{}, { grayscale: true }, { removeBackground: false }].map((o) => q.createIdentity(photo, o)))), undefined]
    // Warm-up: one job per worker.
    await Promise.all((await Promise.all(children.map((_, i) => q.generate({ prompt: 'warm-up', width: size, height: size, steps: 1, seed: i })))).map((j) => j.finished()))
    const started = performance.now()
    const handles = await Promise.all(
      Array.from({ length: jobs }, (_, j) => q.generate({ prompt: `portrait ${j}`, width: size, height: size, steps, seed: j, ...(ids[j % 4] && { identity: ids[j % 4]! }) })),
    )
    await Promise.all(handles.map((h) => h.finished()))
    const seconds = (performance.now() - started) / 1000
    rows.push([`${workers} worker${workers > 1 ? 's' : ''}, max batch ${maxBatchSize}`, jobs / seconds])
    for (const c of children) c.kill('SIGTERM')
    await Promise.all(children.map((c) => new Promise((r) => c.exitCode !== null ? r(null) : c.once('exit', r))))
    await q.close()
  }
} finally {
  await redis.stop()
}
console.log(`${jobs} jobs, 4 identities (3 + none), ${size}x${size}, ${steps} steps, tiny models, CPU`)
const base = rows[0]![1]
for (const [name, rate] of rows) console.log(`${name.padEnd(26)} ${rate.toFixed(2)} jobs/s  ${(rate / base).toFixed(2)}x`)
