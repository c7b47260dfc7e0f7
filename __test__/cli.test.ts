import { execFileSync, spawnSync } from 'node:child_process'
import * as fs from 'node:fs'
import * as path from 'node:path'

import sharp from 'sharp'
import { describe, expect, it } from 'vitest'

import { tempDir } from './helpers.js'

const cli = path.resolve(__dirname, '..', 'bin', 'hyperlora.js')

function hyperlora(...args: string[]) {
  const r = spawnSync('node', [cli, ...args], { encoding: 'utf8' })
  return { code: r.status, stdout: r.stdout, stderr: r.stderr }
}

const photo = path.resolve(__dirname, '..', 'models', 'tiny', 'photos', 'astronaut.png')

/** A mid-grey picture: no face in it. */
async function greyPhoto(dir: string): Promise<string> {
  const grey = path.join(dir, 'grey.png')
  await sharp({ create: { width: 120, height: 90, channels: 3, background: { r: 127, g: 127, b: 127 } } }).toFile(grey)
  return grey
}

describe('hyperlora CLI', () => {
  it('info --json reports version, backends and model locations', () => {
    const out = JSON.parse(execFileSync('node', [cli, 'info', '--json'], { encoding: 'utf8', env: { ...process.env, HYPERLORA_HOME: '/tmp/hl-models' } }))
    expect(out).toMatchObject({ version: '0.1.0', modelDir: '/tmp/hl-models' })
    expect(out.backends).toContain('cpu')
  })

  it('demo runs photo → face → identity → SDXL on the bundled models and writes a PNG', () => {
    const out = path.join(tempDir('demo'), 'demo.png')
    const r = hyperlora('demo', '--json', '--out', out)
    expect(r.code, r.stderr).toBe(0)
    const report = JSON.parse(r.stdout)
    expect(report).toMatchObject({ device: 'cpu', steps: 20, output: out })
    expect(report.face.landmarks).toHaveLength(106)
    expect(report.identityModules).toBeGreaterThan(0)
    expect(fs.readFileSync(out).subarray(1, 4).toString()).toBe('PNG')
  })

  it('identity and generate: photos → identity file → picture with parameters; bad input exits 1 or 2', async () => {
    const dir = tempDir('cli')
    const lora = path.join(dir, 'me.safetensors')
    const id = hyperlora('identity', '--tiny', '--face', photo, '--out', lora, '--json')
    expect(id.code, id.stderr).toBe(0)
    expect(JSON.parse(id.stdout)).toMatchObject({ output: lora, photos: 1 })
    const out = path.join(dir, 'me.webp')
    const gen = hyperlora('generate', '--tiny', '--identity', lora, '--prompt', 'a portrait', '--width', '64', '--height', '64', '--steps', '2', '--seed', '7', '--out', out, '--json')
    expect(gen.code, gen.stderr).toBe(0)
    expect(JSON.parse(gen.stdout)).toMatchObject({ output: out, seed: 7, width: 64, warnings: [] })
    expect(fs.readFileSync(out).subarray(8, 12).toString()).toBe('WEBP')
    // LoRA keys that match no layer are printed as warnings.
    const partial = path.resolve(__dirname, '..', 'crates', 'hyperlora', 'tests', 'fixtures', 'lora_kinds', 'partial.safetensors')
    const styled = hyperlora('generate', '--tiny', '--lora', `${partial}:0.8`, '--prompt', 'a portrait', '--width', '64', '--height', '64', '--steps', '1', '--out', path.join(dir, 's.png'), '--quiet')
    expect(styled.code, styled.stderr).toBe(0)
    expect(styled.stderr).toMatch(/^warning: partial\.safetensors: 4 keys ignored: /m)
    const refined = hyperlora('generate', '--tiny', '--face', photo, '--refine-face', '--prompt', 'a portrait', '--width', '64', '--height', '64', '--steps', '2', '--out', path.join(dir, 'r.png'), '--json')
    expect(refined.code, refined.stderr).toBe(0)
    expect(JSON.parse(refined.stdout).info).toMatch(/Face refine strength: 0.5/)

    const grey = await greyPhoto(dir)
    const noFace = hyperlora('identity', '--tiny', '--face', grey, '--out', path.join(dir, 'x.safetensors'), '--json')
    expect(noFace.code).toBe(1)
    expect(JSON.parse(noFace.stdout).error).toMatchObject({ code: 'NO_FACE', message: expect.stringMatching(/photo 0 \(grey\.png\)/) })
    expect(fs.existsSync(path.join(dir, 'x.safetensors'))).toBe(false)
  })

  it('generate without models lists every missing one, with pull and --tiny as the ways out', () => {
    const dir = tempDir('nomodels')
    const env = { ...process.env, HF_HOME: dir, HYPERLORA_HOME: dir }
    const missing = spawnSync('node', [cli, 'generate', '--prompt', 'x', '--face', photo, '--json'], { encoding: 'utf8', env })
    expect(missing.status).toBe(1)
    const { code, message } = JSON.parse(missing.stdout).error
    expect(code).toBe('MODEL_NOT_FOUND')
    expect(message).toMatch(/^4 models are not on this machine/)
    for (const name of ['realvisxl-v4', 'hyperlora-fidelity', 'clip-vit-large-patch14', 'antelopev2']) expect(message).toContain(`'${name}'`)
    expect(message).toMatch(/npx hyperlora pull[\s\S]*--tiny/)
    // Only SDXL is needed without photos.
    const one = spawnSync('node', [cli, 'generate', '--prompt', 'x'], { encoding: 'utf8', env })
    expect(one.stderr).toMatch(/^error MODEL_NOT_FOUND: 1 model is not on this machine[^\n]*\n  model 'realvisxl-v4'/)
  })

  it('refuses bad flags before any work, with one line naming the flag and what it accepts (exit 2)', () => {
    const dir = tempDir('flags')
    const cases: [string[], string][] = [
      [['--steps', '-3'], "--steps must be a whole number from 1 to 1000, got '-3'"],
      [['--steps', '5000'], "--steps must be a whole number from 1 to 1000, got '5000'"],
      [['--cfg', 'abc'], "--cfg must be a number from 0 to 100, got 'abc'"],
      [['--seed', '1.5'], "--seed must be a whole number from 0 to 18446744073709551615, got '1.5'"],
      [['--width', '100'], "--width must be a multiple of 8 from 8 to 4096, got '100'"],
      [['--out', path.join(dir, 'nope', 'x.png')], `--out ${path.join(dir, 'nope', 'x.png')}: the folder ${path.join(dir, 'nope')} does not exist`],
      [['--out', dir], `--out ${dir} is a folder; give a file name, e.g. ${path.join(dir, 'portrait.png')}`],
      [['--out', path.join(dir, 'x.gif')], `--out must end in .png, .jpg or .webp, got ${path.join(dir, 'x.gif')}`],
      [['--face', path.join(dir, 'me.jpg')], `--face ${path.join(dir, 'me.jpg')}: no such file`],
      [['--identity', 'nope.safetensors'], '--identity nope.safetensors: no such file'],
      [['--lora', 'style.safetensors:0.6'], '--lora style.safetensors: no such file'],
      [['--stepz', '3'], "unknown option --stepz ('hyperlora generate --help' lists the options)"],
      [['--steps'], "--steps needs a value ('hyperlora generate --help' lists the options)"],
    ]
    for (const [flags, message] of cases) {
      const r = hyperlora('generate', '--tiny', '--prompt', 'x', ...flags)
      expect(r.code, flags.join(' ')).toBe(2)
      expect(r.stderr, flags.join(' ')).toBe(`error INVALID_ARGUMENT: ${message}\n`)
      const json = hyperlora('generate', '--tiny', '--prompt', 'x', ...flags, '--json')
      expect(json.code).toBe(2)
      expect(JSON.parse(json.stdout).error).toEqual({ code: 'INVALID_ARGUMENT', message })
    }
    // The same kind of mistake caught by the engine instead of the CLI exits the same way.
    const engine = hyperlora('generate', '--tiny', '--prompt', 'x', '--steps', '1', '--sampler', 'bogus', '--out', path.join(dir, 'x.png'))
    expect(engine.code).toBe(2)
    expect(engine.stderr).toMatch(/^error INVALID_ARGUMENT: [^\n]*bogus[^\n]*\n$/)
    expect(hyperlora('demo', '--out', dir).stderr).toMatch(/^error INVALID_ARGUMENT: --out .* is a folder/)
    expect(hyperlora('identity', '--tiny', '--face', photo, '--out', path.join(dir, 'no', 'me.safetensors')).code).toBe(2)
    // A negative number is a value, not an option: --identity-weight -0.5 is accepted.
    expect(hyperlora('generate', '--tiny', '--prompt', 'x', '--identity-weight', '-0.5', '--steps', 'x').stderr).toMatch(/--steps must be/)
  })

  it('generate --tiny draws at the tiny model size; warnings reach stderr, or the JSON with --json', async () => {
    const dir = tempDir('warn')
    const out = path.join(dir, 'x.png')
    const text = hyperlora('generate', '--tiny', '--prompt', 'x', '--steps', '1', '--identity-weight', '0.5', '--out', out)
    expect(text.code, text.stderr).toBe(0)
    expect(text.stderr).toBe('warning: identityWeight 0.5 has no effect without an identity\n')
    expect((await sharp(out).metadata()).width).toBe(128)
    const json = hyperlora('generate', '--tiny', '--prompt', 'x', '--steps', '1', '--identity-weight', '0.5', '--out', out, '--json')
    expect(json.stderr).toBe('')
    expect(JSON.parse(json.stdout)).toMatchObject({ width: 128, height: 128, warnings: ['identityWeight 0.5 has no effect without an identity'] })
    // A photo without a face: skipped, said once with its name (not "photo 1 (grey.png) skipped: photo 1 (grey.png): …").
    const identity = hyperlora('identity', '--tiny', '--face', photo, '--face', await greyPhoto(dir), '--out', path.join(dir, 'me.safetensors'), '--json')
    expect(identity.code, identity.stderr).toBe(0)
    expect(JSON.parse(identity.stdout).warnings).toEqual(['photo 1 (grey.png) skipped: no face detected (tried 640, 512, 384 and 256)'])
  })

  it('score prints likeness and prompt alignment per picture; generate --best-of keeps the best', async () => {
    const dir = tempDir('cli-score')
    const lora = path.join(dir, 'me.safetensors')
    expect(hyperlora('identity', '--tiny', '--face', photo, '--out', lora, '--quiet').code).toBe(0)
    const grey = await greyPhoto(dir)
    const json = hyperlora('score', '--tiny', '--identity', lora, '--prompt', 'an astronaut', photo, grey, '--json')
    expect(json.code, json.stderr).toBe(0)
    const [a, b] = JSON.parse(json.stdout).images
    expect(a).toMatchObject({ file: photo, likeness: expect.any(Number), promptAlignment: expect.any(Number), face: expect.any(Array) })
    expect(b).toMatchObject({ file: grey, likeness: null, likenessReason: 'no face' })
    const table = hyperlora('score', '--tiny', '--face', photo, grey)
    expect(table.code, table.stderr).toBe(0)
    expect(table.stdout).toMatch(/^image +likeness +prompt +face$/m)
    expect(table.stdout).toMatch(/grey\.png +- +- +no face$/m)
    expect(hyperlora('score', '--tiny', photo).code).toBe(2)
    const best = hyperlora('generate', '--tiny', '--identity', lora, '--prompt', 'a portrait', '--width', '64', '--height', '64', '--steps', '1', '--seed', '5', '--best-of', '2', '--out', path.join(dir, 'b.png'), '--json')
    expect(best.code, best.stderr).toBe(0)
    const report = JSON.parse(best.stdout)
    expect(report.candidates).toHaveLength(2)
    expect(report.seed).toBe(report.candidates[0].seed)
    expect(hyperlora('generate', '--tiny', '--prompt', 'x', '--best-of', '0').code).toBe(2)
  })

  it('has --help for every command, with examples', () => {
    expect(hyperlora('--help').stdout).toMatch(/Examples:[\s\S]*hyperlora demo/)
    for (const command of ['generate', 'identity', 'score', 'info', 'demo', 'inspect']) {
      const r = hyperlora(command, '--help')
      expect(r.code, command).toBe(0)
      expect(r.stdout).toContain(`Usage: hyperlora ${command}`)
    }
  })

  it('exits 2 on bad usage and 1 with the error code on engine failures', () => {
    expect(hyperlora('frobnicate').code).toBe(2)
    expect(hyperlora('inspect').code).toBe(2)
    const r = hyperlora('inspect', __filename, '--json')
    expect(r.code).toBe(1)
    expect(JSON.parse(r.stdout).error.code).toBe('BAD_WEIGHTS')
  })
})
