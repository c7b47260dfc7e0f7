/**
 * The `hyperlora` command line. Every command takes `--help`; `--json` prints one JSON document
 * on stdout instead of text. Exit codes: 0 success, 1 the engine failed (the error code is
 * printed), 2 bad usage (`INVALID_ARGUMENT`: a flag, a file or a request the engine refuses).
 * Warnings go to stderr as `warning: …` lines (also with --quiet), or into the JSON document's
 * `warnings` with --json.
 */
import * as path from 'node:path'
import { parseArgs, type ParseArgsConfig } from 'node:util'

import { generateCommand, identityCommand, scoreCommand, scoreTable, TINY_IMAGE_SIZE, type Warn } from './commands.js'
import { checkedOutputFile, joinNegativeNumbers, usageError } from './flags.js'
import { writeAtomic } from '../files.js'
import { HyperLoraError } from '../errors.js'
import { info, type RuntimeInfo } from '../info.js'
import { HyperLoRA, TINY_MODELS, type EngineProgress } from '../engine.js'
import { progressBar } from './progress-bar.js'
import { inspectWeights, type WeightsIndex } from '../weights.js'
import { modelsCommand, pullCommand } from './models.js'
import { workerCommand } from './worker.js'

const packageRoot = path.resolve(__dirname, '..', '..')

const HELP: Record<string, string> = {
  main: `hyperlora — zero-shot identity portraits (HyperLoRA for SDXL)

Usage: hyperlora <command> [options]

Commands:
  generate  draw a picture, of the person in --face photos (or a saved --identity)
  identity  turn --face photos into an identity LoRA (.safetensors)
  score     likeness to a person and prompt alignment of pictures
  info      version, native backend, threads and where models are looked up
  demo      run the pipeline on the small bundled models (random weights)
  inspect   list the tensors of a .safetensors file
  pull      download models (default: the ones generate uses) into the Hugging Face cache
  models    list the known models: installed or not, where, sizes
  worker    serve portrait jobs from a Redis queue (hyperlora/queue)

Options:
  --json    machine-readable output (warnings go into it)
  --quiet   no progress output (warnings are still printed)
  --help    help for a command

Exit codes: 0 success, 1 the engine failed (its error code is printed), 2 bad usage
(INVALID_ARGUMENT: a flag value, a missing file, an --out that cannot be written).

Examples:
  npx hyperlora demo
  npx hyperlora generate --face me.jpg --prompt "portrait, astronaut suit" --out me.png \\
      --checkpoint RealVisXL_V4.0.safetensors --hyperlora sdxl_hyper_id_lora_v1_fidelity \\
      --clip-vision clip-vit-large-patch14 --face-models antelopev2
  npx hyperlora identity --face a.jpg --face b.jpg --out me.safetensors --tiny
  npx hyperlora pull
  npx hyperlora models
  npx hyperlora info --json
  npx hyperlora inspect model.safetensors --sha256`,
  info: `Usage: hyperlora info [--json]

Prints the package version, the native backends in this binary, CPU threads and the model
directories (HYPERLORA_HOME, the Hugging Face cache).`,
  demo: `Usage: hyperlora demo [--real] [--out file.png] [--json] [--quiet]

Runs the whole pipeline on the small bundled models (models/tiny): face detection, landmarks
and ArcFace on a bundled photo, CLIP + the HyperLoRA hypernetwork → an identity LoRA, then SDXL
(both text encoders, UNet with DPM++ 2M Karras, VAE) with that identity merged in. The weights
are random, so the picture is noise: the demo shows the install works end to end. Writes the
PNG to --out (default: demo.png in the current folder). With --real it runs the default real models
instead (downloading what is missing, about 9 GB, like 'hyperlora pull') at 1024², and the
picture is a portrait of the person in the bundled photo.`,
  generate: `Usage: hyperlora generate --prompt <text> [--face photo]... [--identity me.safetensors] [options]

Draws one picture. With --face photos (one or more of the same person) or a saved --identity,
the person's identity LoRA is merged in and HyperLoRA's trigger words are prepended.
  --out file            .png (default, with A1111 parameters), .jpg or .webp; default hyperlora-<seed>.png
  --negative text       negative prompt
  --seed n              a whole number from 0 to 2^64-1 (default: random, printed)
  --steps n             1 to 1000 (default 20)
  --cfg x               0 to 100 (default 5)
  --width n --height n  multiples of 8 up to 4096 (default 1024; 128 with --tiny)
  --sampler s           euler, euler_ancestral, dpmpp_2m (default), dpmpp_2m_sde, ddim
  --schedule s          sigma schedule: normal, karras (default), exponential
                        (--scheduler is the old name, still accepted)
  --identity-weight x   default 0.85
  --lora path[:weight]  another LoRA (repeatable)
  --controlnet model:image[:strength][:canny]
                        a ControlNet (path or manifest name, e.g. controlnet-openpose-sdxl)
                        with its control image, e.g. a pose skeleton you supply (repeatable);
                        ':canny' turns the image into its Canny edges first
  --controlnet instantid:keypoints=photo[:strength]
                        InstantID's IdentityNet on the face keypoints of photo
  --keep-background     skip the face background removal
  --refine-face         re-draw the faces at 1024² with the identity and blend them back
  --best-of n           draw n candidates in one batch (seeds seed…seed+n-1), keep the best:
                        by likeness with an identity, else by prompt alignment (--json lists
                        every candidate's seed and scores)
Models: a path, a model name ('hyperlora models') or a Hugging Face repo id, from the flag, else
the environment variable, else the default ('hyperlora pull' fetches the defaults; generate
never downloads):
  --checkpoint (HYPERLORA_CHECKPOINT)   SDXL: diffusers folder or single-file .safetensors
  --hyperlora (HYPERLORA_MODEL)         HyperLoRA release folder
  --clip-vision (HYPERLORA_CLIP_VISION) CLIP ViT-L/14 vision folder (transformers layout)
  --face-models (HYPERLORA_FACE_MODELS) insightface antelopev2 folder
  --comfyui dir (COMFYUI_MODELS)        also look in a ComfyUI models folder
  --tiny                                the bundled random-weight models (for trying the CLI)`,
  identity: `Usage: hyperlora identity --face photo [--face photo]... --out me.safetensors [models]

Turns photos of one person into an identity LoRA (kohya format, loads in ComfyUI/A1111/diffusers
and in 'hyperlora generate --identity'). Photos without a face are skipped with a warning.
Models: --hyperlora, --clip-vision, --face-models (or their environment variables, or --tiny);
see 'hyperlora generate --help'.`,
  score: `Usage: hyperlora score [--identity me.safetensors | --face photo...] [--prompt text] image... [--json]

Scores pictures as the HyperLoRA paper measures portraits: likeness, the ArcFace cosine of each
picture's largest face with the person (a saved --identity, or --face photos of them), and
prompt alignment, the CLIP ViT-L/14 cosine of the picture with --prompt (CLIP-T). Prints a
table (a '-' where there is no score, with the reason), or with --json the scores per picture.
Models: --hyperlora, --clip-vision, --face-models (or their environment variables, or --tiny);
SDXL is not loaded.`,
  pull: `Usage: hyperlora pull [name]... [--comfyui <models dir>] [--json] [--quiet]

Makes models available, by manifest name (see 'hyperlora models'); without a name, the default
set: RealVisXL V4.0, the HyperLoRA fidelity variant, CLIP ViT-L/14 and antelopev2 (about 9 GB).
Models already in your Hugging Face cache, a ComfyUI models folder (--comfyui or COMFYUI_MODELS)
or HYPERLORA_HOME are used where they are; the rest are downloaded into the Hugging Face cache
(HF_HUB_CACHE, HF_HOME/hub or ~/.cache/huggingface/hub, shared with Python tools), several files
at a time, resumable, each checked against its SHA-256 before use.
Environment: HF_TOKEN (gated/private repos), HF_ENDPOINT (a mirror), HF_HUB_OFFLINE=1 (no network).

Examples:
  npx hyperlora pull
  npx hyperlora pull sdxl-base-1.0 hyperlora-edit
  npx hyperlora pull --comfyui ~/ComfyUI/models --json`,
  models: `Usage: hyperlora models [--comfyui <models dir>] [--json]

Lists every model of the manifest: its role, whether it is installed, where (hf-cache, comfyui,
hyperlora-home), its size on disk (or its download size) and the path the engine loads.
Never touches the network.`,
  worker: `Usage: hyperlora worker --redis redis://host:port [options] [models]

Serves the jobs of a hyperlora/queue PortraitQueue: one engine in this process, waiting
generate jobs drawn together (mixed identities) in batches of up to --max-batch-size images.
SIGTERM or SIGINT: stop taking jobs, finish the batch in hand, exit. Run one per GPU.
  --redis url            redis://[user:password@]host[:port][/db] (rediss:// for TLS)
  --queue name           queue name (default hyperlora)
  --max-batch-size n     most images in one UNet batch (default 4)
  --concurrency n        batches fetched and stored at once (default 1)
  --output-dir dir       write images here and return their paths (default: PNG bytes in the
                         job result, up to 16 MiB per job)
  --lock-duration ms     how long a dead worker keeps its jobs before another takes them
                         (default 30000)
Models: --checkpoint, --hyperlora, --clip-vision, --face-models (or their environment
variables, or --tiny); see 'hyperlora generate --help'. Every worker of a queue must load the
same HyperLoRA model (identities are stored as its coefficients).`,
  inspect: `Usage: hyperlora inspect <file.safetensors> [--sha256] [--json] [--quiet]

Lists the tensors of a safetensors file (name, dtype, shape) without loading it.
  --sha256   also hash the whole file`,
}

function printInfo(runtime: RuntimeInfo): void {
  console.log(`hyperlora ${runtime.version}`)
  console.log(`native:      ${runtime.native ?? 'none (see the warning below)'}`)
  console.log(`backend:     ${runtime.backends.join(', ') || 'none'}`)
  console.log(`cpu threads: ${runtime.cpuThreads}`)
  console.log(`models:      ${runtime.modelDir}`)
  console.log(`hf cache:    ${runtime.huggingFaceCache}`)
  for (const warning of runtime.warnings) console.log(`warning:     ${warning}`)
}

function summary(index: WeightsIndex): string {
  const mib = (index.fileSize / (1 << 20)).toFixed(2)
  return `${index.path}: ${index.tensors.length} tensors, ${mib} MiB, sha256 ${index.sha256?.slice(0, 16) ?? '-'}…`
}

/** The bundled demo photo (NASA, public domain). */
const DEMO_PHOTO = path.join(packageRoot, 'models', 'tiny', 'photos', 'astronaut.png')

async function demo(flags: Flags, out: string | undefined, real: boolean, warn: Warn): Promise<void> {
  const file = checkedOutputFile(out ?? 'demo.png')
  const runtime = info()
  if (!flags.json && !flags.quiet) printInfo(runtime)
  const bar = progressBar(!flags.quiet && !flags.json)
  const timings = stageTimings(bar)
  // Without model options, load() takes the manifest's defaults and downloads what is missing.
  const engine = await HyperLoRA.load({ ...(real ? {} : TINY_MODELS), onProgress: timings.call() })
  const size = real ? 1024 : TINY_IMAGE_SIZE
  try {
    const identity = await engine.createIdentity(DEMO_PHOTO, { onProgress: timings.call() })
    const steps = 20
    const [image] = await engine.generate({
      prompt: 'a portrait photo of a person in a spacesuit, (studio lighting:1.2)',
      negativePrompt: 'blurry, low quality',
      identity,
      width: size,
      height: size,
      steps,
      seed: 42,
      onProgress: timings.call(),
    })
    for (const warning of image!.warnings) warn(warning)
    writeAtomic(file, image!.data)
    const face = identity.photos[0]!.face
    const stages = timings.result()
    if (flags.json) {
      console.log(JSON.stringify({ info: runtime, photo: DEMO_PHOTO, face, identityModules: identity.modules, device: engine.device, steps, timingsMs: stages, output: file, warnings: flags.warnings }, null, 2))
      return
    }
    if (flags.quiet) return
    const box = face.bbox.map((v) => v.toFixed(0)).join(', ')
    console.log(`photo:       ${path.relative(process.cwd(), DEMO_PHOTO) || DEMO_PHOTO} → face [${box}] score ${face.score.toFixed(2)}`)
    console.log(`identity:    LoRA of ${identity.modules} modules, rank ${identity.rank}`)
    console.log(`generated:   ${size}x${size}, ${steps} steps DPM++ 2M Karras on ${engine.device}`)
    console.log(`timings:     ${Object.entries(stages).map(([stage, ms]) => `${stage} ${(ms / 1000).toFixed(2)} s`).join(', ')}`)
    console.log(`wrote:       ${file}`)
    if (!real) console.log('note:        the bundled models have random weights, so the picture is noise; --real uses real models.')
  } finally {
    await engine.dispose()
  }
}

/** Wall time per stage: each call's events carry the time since that call started. */
function stageTimings(bar: ((e: EngineProgress) => void) | undefined): { call(): (e: EngineProgress) => void; result(): Record<string, number> } {
  const totals: Record<string, number> = {}
  return {
    call() {
      let since = 0
      return (e) => {
        totals[e.stage] = (totals[e.stage] ?? 0) + (e.elapsedMs - since)
        since = e.elapsedMs
        bar?.(e)
      }
    },
    result: () => Object.fromEntries(Object.entries(totals).map(([k, v]) => [k, Math.round(v)])),
  }
}

async function inspect(file: string | undefined, sha256: boolean, flags: Flags): Promise<void> {
  if (!file) throw usageError('inspect needs a file: hyperlora inspect <file.safetensors>')
  const index = await inspectWeights(path.resolve(file), { sha256, onProgress: progressBar(!flags.quiet && !flags.json) })
  if (flags.json) {
    console.log(JSON.stringify(index, null, 2))
    return
  }
  console.log(summary(index))
  for (const t of index.tensors) console.log(`  ${t.name}  ${t.dtype}  [${t.shape.join(', ')}]`)
}

const OPTIONS = {
  help: { type: 'boolean', short: 'h' },
  json: { type: 'boolean' },
  quiet: { type: 'boolean', short: 'q' },
  sha256: { type: 'boolean' },
  out: { type: 'string', short: 'o' },
  face: { type: 'string', multiple: true },
  identity: { type: 'string' },
  'identity-weight': { type: 'string' },
  prompt: { type: 'string', short: 'p' },
  negative: { type: 'string', short: 'n' },
  seed: { type: 'string' },
  steps: { type: 'string' },
  cfg: { type: 'string' },
  width: { type: 'string' },
  height: { type: 'string' },
  sampler: { type: 'string' },
  schedule: { type: 'string' },
  scheduler: { type: 'string' },
  lora: { type: 'string', multiple: true },
  controlnet: { type: 'string', multiple: true },
  'keep-background': { type: 'boolean' },
  'refine-face': { type: 'boolean' },
  'best-of': { type: 'string' },
  real: { type: 'boolean' },
  checkpoint: { type: 'string' },
  hyperlora: { type: 'string' },
  'clip-vision': { type: 'string' },
  'face-models': { type: 'string' },
  comfyui: { type: 'string' },
  tiny: { type: 'boolean' },
  version: { type: 'boolean', short: 'v' },
  redis: { type: 'string' },
  queue: { type: 'string' },
  'max-batch-size': { type: 'string' },
  concurrency: { type: 'string' },
  'output-dir': { type: 'string' },
  'lock-duration': { type: 'string' },
} as const satisfies ParseArgsConfig['options']

const VALUE_FLAGS = new Set(Object.entries(OPTIONS).filter(([, o]) => o.type === 'string').map(([name]) => name))

/** node's parser errors, as one line naming the flag. */
function parseError(error: unknown, argv: readonly string[]): string {
  const message = (error as Error).message
  const command = argv.find((a) => !a.startsWith('-'))
  const help = `'hyperlora ${command && HELP[command] ? `${command} ` : ''}--help' lists the options`
  const unknown = /Unknown option '([^']+)'/.exec(message)
  if (unknown) return `unknown option ${unknown[1]} (${help})`
  // A value missing at the end, or followed by another option (`--steps --json`).
  const missing = /Option '(-\w, )?(--[\w-]+)[^']*' argument (missing|is ambiguous)/.exec(message)
  if (missing) return `${missing[2]} needs a value (${help})`
  return `${message.split('. ')[0]} (${help})`
}

interface Flags {
  json: boolean
  quiet: boolean
  /** Every warning of the run, for the --json document. */
  warnings: string[]
}

export async function main(argv: string[]): Promise<number> {
  let parsed
  const json = argv.includes('--json')
  try {
    parsed = parseArgs({ args: joinNegativeNumbers(argv, VALUE_FLAGS), allowPositionals: true, options: OPTIONS })
  } catch (error) {
    return fail(usageError(parseError(error, argv)), json)
  }
  const { values, positionals } = parsed
  const [command, ...rest] = positionals
  const flags: Flags = { json: values.json ?? false, quiet: values.quiet ?? false, warnings: [] }
  // Printed as they happen (a progress bar may be drawing), collected for --json.
  const warn: Warn = (message) => {
    flags.warnings.push(message)
    if (!flags.json) console.error(`warning: ${message}`)
  }
  if (values.version) {
    console.log(info().version)
    return 0
  }
  if (values.help || !command) {
    console.log(HELP[command ?? 'main'] ?? HELP['main'])
    return command || values.help ? 0 : 2
  }
  try {
    switch (command) {
      case 'info': {
        const runtime = info()
        if (flags.json) console.log(JSON.stringify(runtime, null, 2))
        else printInfo(runtime)
        return 0
      }
      case 'demo':
        await demo(flags, values.out, values.real ?? false, warn)
        return 0
      case 'inspect':
        await inspect(rest[0], values.sha256 ?? false, flags)
        return 0
      case 'pull':
        await pullCommand(rest, { ...flags, comfyui: values.comfyui })
        return 0
      case 'models':
        if (rest.length > 0) throw usageError(`models takes no arguments, got ${rest.join(' ')}`)
        await modelsCommand({ ...flags, comfyui: values.comfyui })
        return 0
      case 'worker':
        await workerCommand(values, (line) => flags.quiet || console.error(line))
        return 0
      case 'score': {
        const result = await scoreCommand(values, rest, progressBar(!flags.quiet && !flags.json))
        if (flags.json) console.log(JSON.stringify({ ...result, warnings: flags.warnings }, null, 2))
        else console.log(scoreTable(result))
        return 0
      }
      case 'generate':
      case 'identity': {
        const run = command === 'generate' ? generateCommand : identityCommand
        const result = await run(values, progressBar(!flags.quiet && !flags.json), warn)
        if (flags.json) console.log(JSON.stringify({ ...result, warnings: flags.warnings }, null, 2))
        else if (!flags.quiet) console.log(`wrote ${(result as { output: string }).output}`)
        return 0
      }
      default:
        throw usageError(`unknown command '${command}' ('hyperlora --help' lists the commands)`)
    }
  } catch (error) {
    return fail(error, flags.json)
  }
}

/**
 * Reports a failure: one line (or a JSON document) with the code. Exit 2 for `INVALID_ARGUMENT`
 * (the same for a flag the CLI refuses and one the engine refuses), 1 for everything else.
 */
function fail(error: unknown, json: boolean): number {
  const e = error instanceof HyperLoraError ? error : new HyperLoraError('INTERNAL', String(error))
  if (json) console.log(JSON.stringify({ error: { code: e.code, message: e.message } }))
  else console.error(`error ${e.code}: ${e.message}`)
  return e.code === 'INVALID_ARGUMENT' ? 2 : 1
}

if (require.main === module) {
  main(process.argv.slice(2)).then(
    (code) => {
      process.exitCode = code
    },
    (error: unknown) => {
      console.error(error)
      process.exitCode = 1
    },
  )
}
