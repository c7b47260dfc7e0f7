/**
 * Throughput of `generateMany` (mixed identities in one UNet batch) against the same requests
 * one by one through `generate`, on the bundled model (CPU unless HYPERLORA_DEVICE says otherwise).
 *   npx tsx bench/generate_many.mts [requests=8] [size=256] [steps=10]
 */
import { HyperLoRA, Identity, TINY_MODELS } from '../src/index.js'

const [count, size, steps] = [Number(process.argv[2] ?? 8), Number(process.argv[3] ?? 256), Number(process.argv[4] ?? 10)]
const PHOTO = new URL('../models/tiny/photos/astronaut.png', import.meta.url).pathname
const device = (process.env['HYPERLORA_DEVICE'] ?? 'cpu') as 'cpu' | 'cuda'

const engine = await HyperLoRA.load({ ...TINY_MODELS, device })
const me = await engine.createIdentity(PHOTO)
// Four different identities, as four different people would give.
const people = await Promise.all([0.5, 1, -1, 2].map((t) => Identity.interpolate(me, me, t)))
const requests = Array.from({ length: count }, (_, i) => ({ prompt: `portrait ${i}`, width: size, height: size, steps, seed: i, identity: people[i % people.length]! }))

await engine.generate({ ...requests[0]!, steps: 1 }) // warm-up
let started = performance.now()
for (const r of requests) await engine.generate(r)
const sequential = (performance.now() - started) / 1000
const rows = [['one by one', sequential]] as [string, number][]
for (const maxBatchSize of [4, 8]) {
  started = performance.now()
  for await (const _ of engine.generateMany(requests, { maxBatchSize })) void _
  rows.push([`generateMany, batches of ${maxBatchSize}`, (performance.now() - started) / 1000])
}
await engine.dispose()
console.log(`${count} requests, ${people.length} identities, ${size}x${size}, ${steps} steps, ${engine.device}`)
for (const [name, seconds] of rows) {
  console.log(`${name.padEnd(28)} ${seconds.toFixed(2)} s  ${(count / seconds).toFixed(2)} images/s  ${(sequential / seconds).toFixed(2)}x`)
}
