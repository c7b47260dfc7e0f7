/**
 * The HyperLoRA paper's comparison table for your own photos: for each identity weight, the mean
 * Face Sim (ArcFace cosine of the generated face with the person) and the mean CLIP-T (CLIP
 * ViT-L/14 cosine of the picture with its prompt) over every prompt × seed, plus what scoring
 * costs per picture.
 *
 *   npx tsx bench/eval.mts --photos me/ --prompts prompts.txt [--weights 0.6,0.7,0.8,0.9,1.0]
 *       [--seeds 2] [--steps 20] [--size 1024] [--out dir] [--tiny]
 *
 * Real models come from the environment (HYPERLORA_CHECKPOINT, …) or the manifest defaults, as
 * `HyperLoRA.load` takes them (missing ones are downloaded). `--tiny` runs the bundled random-weight
 * models as a smoke check (its numbers mean nothing: the tiny detector finds no face in noise).
 * `--prompts`: one prompt a line (`#` comments and blank lines skipped); `--photos`: a folder of
 * reference photos of one person (.jpg, .jpeg, .png, .webp).
 */
import * as fs from 'node:fs'
import * as path from 'node:path'
import { parseArgs } from 'node:util'

import { HyperLoRA, TINY_MODELS, type ImageScore } from '../src/index.js'

const { values } = parseArgs({
  options: {
    photos: { type: 'string' },
    prompts: { type: 'string' },
    weights: { type: 'string', default: '0.6,0.7,0.8,0.9,1.0' },
    seeds: { type: 'string', default: '2' },
    steps: { type: 'string' },
    size: { type: 'string' },
    out: { type: 'string' },
    tiny: { type: 'boolean', default: false },
  },
})
const photosDir = values.photos ?? new URL('../models/tiny/photos', import.meta.url).pathname
const photos = fs
  .readdirSync(photosDir)
  .filter((f) => /\.(jpe?g|png|webp)$/i.test(f))
  .map((f) => path.join(photosDir, f))
const prompts = values.prompts
  ? fs
      .readFileSync(values.prompts, 'utf8')
      .split('\n')
      .map((l) => l.trim())
      .filter((l) => l && !l.startsWith('#'))
  : ['a portrait photo of a person in a spacesuit', 'a person reading in a library, oil painting']
const weights = values.weights.split(',').map(Number)
const seeds = Number(values.seeds)
const size = Number(values.size ?? (values.tiny ? 64 : 1024))
const steps = Number(values.steps ?? (values.tiny ? 2 : 20))
if (photos.length === 0 || prompts.length === 0 || weights.some((w) => !Number.isFinite(w))) {
  throw new Error('need --photos with pictures in it, --prompts with prompts in it, and numeric --weights')
}
const device = (process.env['HYPERLORA_DEVICE'] ?? 'auto') as 'auto' | 'cpu' | 'cuda'

const engine = await HyperLoRA.load({ ...(values.tiny ? TINY_MODELS : {}), device })
const identity = await engine.createIdentity(photos, { onWarning: (w) => console.error(`warning: ${w}`) })
// The text tower loads on the first prompt score: kept out of the per-picture cost.
await engine.score(photos[0]!, { identity, prompt: prompts[0]! })

const mean = (xs: number[]): string => (xs.length ? (xs.reduce((a, b) => a + b, 0) / xs.length).toFixed(4) : '-')
const rows: string[][] = []
let scoreMs = 0
let scored = 0
for (const identityWeight of weights) {
  const faceSim: number[] = []
  const clipT: number[] = []
  let faceless = 0
  for (const prompt of prompts) {
    // One batch of `seeds` pictures per prompt (seeds 0 … seeds − 1).
    const images = await engine.generate({ prompt, identity, identityWeight, width: size, height: size, steps, seed: 0, batchSize: seeds })
    const started = performance.now()
    const scores: ImageScore[] = await engine.score(
      images.map((i) => i.data),
      { identity, prompt },
    )
    scoreMs += performance.now() - started
    scored += images.length
    for (const [k, s] of scores.entries()) {
      if (s.likeness === null) faceless++
      else faceSim.push(s.likeness)
      clipT.push(s.promptAlignment!)
      if (values.out) {
        fs.mkdirSync(values.out, { recursive: true })
        fs.writeFileSync(path.join(values.out, `w${identityWeight}-p${prompts.indexOf(prompt)}-s${k}.png`), images[k]!.data)
      }
    }
  }
  rows.push([identityWeight.toFixed(2), mean(faceSim), mean(clipT), `${faceless}/${prompts.length * seeds}`])
}
await engine.dispose()

console.log(`${photos.length} reference photo(s), ${prompts.length} prompt(s) × ${seeds} seed(s), ${size}², ${steps} steps, ${engine.device}${values.tiny ? ' (tiny random-weight models: a smoke check, not a result)' : ''}`)
console.log('| identity weight | Face Sim (mean) | CLIP-T (mean) | pictures without a face |')
console.log('| ---: | ---: | ---: | ---: |')
for (const r of rows) console.log(`| ${r.join(' | ')} |`)
console.log(`scoring: ${(scoreMs / scored).toFixed(1)} ms per picture (likeness + prompt alignment, ${scored} pictures, text tower already loaded)`)
