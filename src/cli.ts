/**
 * The `hyperlora` command line. Every command takes `--help`; `--json` prints one JSON document
 * on stdout instead of text. Exit codes: 0 success, 1 the engine failed (the error code is
 * printed), 2 bad usage.
 */
import * as fs from 'node:fs'
import * as path from 'node:path'
import { parseArgs } from 'node:util'

import { HyperLoraError } from './errors.js'
import { info, type RuntimeInfo } from './info.js'
import { inspectWeights, type WeightsIndex } from './weights.js'

const packageRoot = path.resolve(__dirname, '..')

const HELP: Record<string, string> = {
  main: `hyperlora — zero-shot identity portraits (HyperLoRA for SDXL)

Usage: hyperlora <command> [options]

Commands:
  info      version, native backend, threads and where models are looked up
  demo      run the pipeline on the small bundled model (random weights)
  inspect   list the tensors of a .safetensors file

Options:
  --json    machine-readable output
  --quiet   no progress output
  --help    help for a command

Examples:
  npx hyperlora demo
  npx hyperlora info --json
  npx hyperlora inspect model.safetensors --sha256`,
  info: `Usage: hyperlora info [--json]

Prints the package version, the native backends in this binary, CPU threads and the model
directories (HYPERLORA_HOME, the Hugging Face cache).`,
  demo: `Usage: hyperlora demo [--json] [--quiet]

Runs on the small bundled model (random weights, in models/tiny): checks the runtime and reads
every bundled weight file with the native engine.`,
  inspect: `Usage: hyperlora inspect <file.safetensors> [--sha256] [--json] [--quiet]

Lists the tensors of a safetensors file (name, dtype, shape) without loading it.
  --sha256   also hash the whole file`,
}

class UsageError extends Error {}

interface Flags {
  json: boolean
  quiet: boolean
}

function printInfo(runtime: RuntimeInfo): void {
  console.log(`hyperlora ${runtime.version}`)
  console.log(`backend:     ${runtime.backends.join(', ')}`)
  console.log(`cpu threads: ${runtime.cpuThreads}`)
  console.log(`models:      ${runtime.modelDir}`)
  console.log(`hf cache:    ${runtime.huggingFaceCache}`)
}

function progressLine(flags: Flags, label: string): ((e: { step: number; total: number }) => void) | undefined {
  if (flags.quiet || flags.json || !process.stderr.isTTY) return undefined
  return (e) => {
    const pct = e.total > 0 ? Math.floor((100 * e.step) / e.total) : 100
    process.stderr.write(`\r${label} ${pct}%${e.step >= e.total ? '\n' : ''}`)
  }
}

function bundledWeights(): string[] {
  const root = path.join(packageRoot, 'models', 'tiny')
  if (!fs.existsSync(root)) return []
  return (fs.readdirSync(root, { recursive: true, withFileTypes: false }) as string[])
    .filter((f) => f.endsWith('.safetensors'))
    .map((f) => path.join(root, f))
    .sort()
}

function summary(index: WeightsIndex): string {
  const mib = (index.fileSize / (1 << 20)).toFixed(2)
  return `${path.relative(packageRoot, index.path)}: ${index.tensors.length} tensors, ${mib} MiB, sha256 ${index.sha256?.slice(0, 16) ?? '-'}…`
}

async function demo(flags: Flags): Promise<void> {
  const runtime = info()
  const files = bundledWeights()
  if (files.length === 0) throw new HyperLoraError('MODEL_NOT_FOUND', `no bundled model under ${path.join(packageRoot, 'models', 'tiny')}`)
  const indexes: WeightsIndex[] = []
  if (!flags.json) printInfo(runtime)
  for (const file of files) {
    const index = await inspectWeights(file, { sha256: true, onProgress: progressLine(flags, path.basename(file)) })
    indexes.push(index)
    if (!flags.json) console.log(summary(index))
  }
  if (flags.json) {
    console.log(JSON.stringify({ info: runtime, weights: indexes.map(({ tensors, ...rest }) => ({ ...rest, tensors: tensors.length })) }, null, 2))
  }
}

async function inspect(file: string | undefined, sha256: boolean, flags: Flags): Promise<void> {
  if (!file) throw new UsageError('inspect needs a file: hyperlora inspect <file.safetensors>')
  const index = await inspectWeights(path.resolve(file), { sha256, onProgress: progressLine(flags, 'hashing') })
  if (flags.json) {
    console.log(JSON.stringify(index, null, 2))
    return
  }
  console.log(summary(index))
  for (const t of index.tensors) console.log(`  ${t.name}  ${t.dtype}  [${t.shape.join(', ')}]`)
}

export async function main(argv: string[]): Promise<number> {
  let parsed
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        help: { type: 'boolean', short: 'h' },
        json: { type: 'boolean' },
        quiet: { type: 'boolean', short: 'q' },
        sha256: { type: 'boolean' },
        version: { type: 'boolean', short: 'v' },
      },
    })
  } catch (error) {
    console.error(`${(error as Error).message}\n\n${HELP['main']}`)
    return 2
  }
  const { values, positionals } = parsed
  const [command, ...rest] = positionals
  const flags: Flags = { json: values.json ?? false, quiet: values.quiet ?? false }
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
        await demo(flags)
        return 0
      case 'inspect':
        await inspect(rest[0], values.sha256 ?? false, flags)
        return 0
      default:
        throw new UsageError(`unknown command '${command}'`)
    }
  } catch (error) {
    if (error instanceof UsageError) {
      console.error(`${error.message}\n\n${HELP['main']}`)
      return 2
    }
    const e = error instanceof HyperLoraError ? error : new HyperLoraError('INTERNAL', String(error))
    if (flags.json) console.log(JSON.stringify({ error: { code: e.code, message: e.message } }))
    else console.error(`error ${e.code}: ${e.message}`)
    return 1
  }
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
