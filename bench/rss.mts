/**
 * Long-run memory check (hardening issue): N sequential generations with an identity on the
 * bundled model, RSS sampled after each; prints RSS after 20 and after N and their ratio.
 *   npx tsx bench/rss.mts [N=200]
 */
import { HyperLoRA, TINY_MODELS } from '../src/index.js'

const PHOTO = new URL('../models/tiny/photos/astronaut.png', import.meta.url).pathname
const total = Number(process.argv[2] ?? 200)
const mib = (bytes: number): string => (bytes / 2 ** 20).toFixed(1)

const engine = await HyperLoRA.load({ ...TINY_MODELS, device: 'cpu' })
const identity = await engine.createIdentity(PHOTO)
const rss: number[] = []
const started = performance.now()
for (let i = 0; i < total; i++) {
  // Alternate identity weights so the LoRA merge runs every time, the path that allocates most.
  await engine.generate({ prompt: `portrait ${i}`, width: 64, height: 64, steps: 2, seed: i, identity, identityWeight: i % 2 ? 0.85 : 0.6 })
  rss.push(process.memoryUsage().rss)
}
await engine.dispose()
const at20 = rss[Math.min(19, rss.length - 1)]!
const atEnd = rss.at(-1)!
console.log(`generations: ${total} in ${((performance.now() - started) / 1000).toFixed(1)} s`)
console.log(`rss after 20: ${mib(at20)} MiB, after ${total}: ${mib(atEnd)} MiB, ratio ${(atEnd / at20).toFixed(3)}`)
