// Builds a tiny consumer project against `npm pack` output and imports the package from ES
// modules and CommonJS, with type checking, as a user installing from the registry would.
import { execFileSync } from 'node:child_process'
import * as fs from 'node:fs'
import * as path from 'node:path'

import { beforeAll, describe, expect, it } from 'vitest'

import { tempDir } from './helpers.js'

const root = path.resolve(__dirname, '..')
const consumer = tempDir('consumer')
const installed = path.join(consumer, 'node_modules', 'hyperlora')

function run(cmd: string, args: string[], cwd = consumer): string {
  return execFileSync(cmd, args, { cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] })
}

beforeAll(() => {
  const tarball = run('npm', ['pack', '--ignore-scripts', '--silent', '--pack-destination', consumer], root).trim().split('\n').at(-1)!
  fs.mkdirSync(installed, { recursive: true })
  run('tar', ['-xzf', path.join(consumer, tarball), '-C', installed, '--strip-components=1'])
  // The registry delivers the binary through a per-platform package; here we place the one we built.
  for (const f of fs.readdirSync(root).filter((f) => f.endsWith('.node'))) {
    fs.copyFileSync(path.join(root, f), path.join(installed, f))
  }
  fs.symlinkSync(path.join(root, 'node_modules', 'sharp'), path.join(consumer, 'node_modules', 'sharp'))
  fs.writeFileSync(path.join(consumer, 'package.json'), JSON.stringify({ name: 'consumer', private: true }))
})

describe('the packed package', () => {
  it('ships the compiled API, the loader, its types and the CLI, and no build output from Rust', () => {
    const files = run('tar', ['-tzf', path.join(consumer, fs.readdirSync(consumer).find((f) => f.endsWith('.tgz'))!)])
    for (const f of ['dist/index.js', 'dist/index.mjs', 'dist/index.d.ts', 'dist/index.d.mts', 'index.js', 'index.d.ts', 'bin/hyperlora.js']) {
      expect(files).toContain(`package/${f}`)
    }
    expect(files).not.toMatch(/target\/|crates\//)
  })

  it('keeps the native test hooks and @internal members out of its types', () => {
    const dist = fs.readdirSync(path.join(installed, 'dist'), { recursive: true, encoding: 'utf8' })
    const types = ['index.d.ts', ...dist.filter((f) => /\.d\.m?ts$/.test(f)).map((f) => path.join('dist', f))]
    expect(types).toContain(path.join('dist', 'models', 'index.d.ts'))
    for (const f of types) {
      const text = fs.readFileSync(path.join(installed, f), 'utf8')
      expect(text, f).not.toMatch(/ForTests|@internal/)
    }
  })

  it('imports from an ES module', () => {
    fs.writeFileSync(
      path.join(consumer, 'esm.mjs'),
      `import { info, HyperLoraError, inspectWeights } from 'hyperlora'
       const e = await inspectWeights('/nonexistent.safetensors').catch((e) => e)
       console.log(JSON.stringify({ version: info().version, isError: e instanceof HyperLoraError, code: e.code }))`,
    )
    expect(JSON.parse(run('node', ['esm.mjs']))).toEqual({ version: '0.1.0', isError: true, code: 'MODEL_NOT_FOUND' })
  })

  it('requires from CommonJS', () => {
    fs.writeFileSync(
      path.join(consumer, 'cjs.cjs'),
      `const { info, HyperLoraError } = require('hyperlora')
       console.log(JSON.stringify({ version: info().version, ctor: typeof HyperLoraError }))`,
    )
    expect(JSON.parse(run('node', ['cjs.cjs']))).toEqual({ version: '0.1.0', ctor: 'function' })
  })

  it('type-checks consumers of both module systems', () => {
    fs.writeFileSync(
      path.join(consumer, 'esm.mts'),
      `import { HyperLoRA, inspectWeights, TINY_MODELS, type WeightsIndex, type ErrorCode } from 'hyperlora'
       const index: WeightsIndex = await inspectWeights('x.safetensors', { sha256: true, signal: AbortSignal.timeout(1000) })
       const code: ErrorCode = 'BAD_WEIGHTS'
       export const n: number = index.tensors.length + code.length
       export async function draw(): Promise<number> {
         await using engine = await HyperLoRA.load(TINY_MODELS)
         return (await engine.generate({ prompt: 'a portrait' })).length
       }`,
    )
    fs.writeFileSync(
      path.join(consumer, 'cjs.cts'),
      `import hyperlora = require('hyperlora')
       export const v: string = hyperlora.info().version`,
    )
    fs.writeFileSync(
      path.join(consumer, 'bad.mts'),
      `import { inspectWeights } from 'hyperlora'
       await inspectWeights('x', { sha256: 'yes' })`,
    )
    const tsconfig = (files: string[]) =>
      JSON.stringify({
        compilerOptions: { module: 'nodenext', moduleResolution: 'nodenext', target: 'es2022', strict: true, noEmit: true, types: ['node'], typeRoots: [path.join(root, 'node_modules', '@types')] },
        files,
      })
    const tsc = path.join(root, 'node_modules', 'typescript', 'bin', 'tsc')
    fs.writeFileSync(path.join(consumer, 'tsconfig.json'), tsconfig(['esm.mts', 'cjs.cts']))
    run('node', [tsc, '-p', '.'])
    fs.writeFileSync(path.join(consumer, 'tsconfig.json'), tsconfig(['bad.mts']))
    const failure = (() => {
      try {
        run('node', [tsc, '-p', '.'])
        return ''
      } catch (error) {
        return String((error as { stdout?: string }).stdout)
      }
    })()
    expect(failure).toMatch(/bad\.mts\(2,\d+\): error TS2322: Type 'string' is not assignable to type 'boolean/)
  })

  it('exports hyperlora/queue to ES modules and CommonJS, with types', () => {
    // bullmq and ioredis come with the package's dependencies; here, from this checkout.
    for (const dep of ['bullmq', 'ioredis']) fs.symlinkSync(path.join(root, 'node_modules', dep), path.join(consumer, 'node_modules', dep))
    fs.writeFileSync(path.join(consumer, 'queue.mjs'), `import { PortraitQueue, startWorker } from 'hyperlora/queue'\nconsole.log(typeof PortraitQueue, typeof startWorker)`)
    fs.writeFileSync(path.join(consumer, 'queue.cjs'), `const { PortraitQueue } = require('hyperlora/queue')\nconsole.log(typeof PortraitQueue)`)
    expect(run('node', ['queue.mjs']).trim()).toBe('function function')
    expect(run('node', ['queue.cjs']).trim()).toBe('function')
    fs.writeFileSync(
      path.join(consumer, 'queue.mts'),
      `import { PortraitQueue, type QueuedImage } from 'hyperlora/queue'
       export async function draw(): Promise<QueuedImage[]> {
         const q = new PortraitQueue({ connection: 'redis://127.0.0.1:6379' })
         return (await q.generate({ prompt: 'a portrait', seed: 1n })).finished()
       }`,
    )
    const tsc = path.join(root, 'node_modules', 'typescript', 'bin', 'tsc')
    const compilerOptions = { module: 'nodenext', moduleResolution: 'nodenext', target: 'es2022', strict: true, noEmit: true, skipLibCheck: true, types: ['node'], typeRoots: [path.join(root, 'node_modules', '@types')] }
    fs.writeFileSync(path.join(consumer, 'tsconfig.json'), JSON.stringify({ compilerOptions, files: ['queue.mts'] }))
    run('node', [tsc, '-p', '.'])
  })
})
