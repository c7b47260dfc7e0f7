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
    const photo = path.resolve(__dirname, '..', 'models', 'tiny', 'photos', 'astronaut.png')
    const lora = path.join(dir, 'me.safetensors')
    const id = hyperlora('identity', '--tiny', '--face', photo, '--out', lora, '--json')
    expect(id.code, id.stderr).toBe(0)
    expect(JSON.parse(id.stdout)).toMatchObject({ output: lora, photos: 1 })
    const out = path.join(dir, 'me.webp')
    const gen = hyperlora('generate', '--tiny', '--identity', lora, '--prompt', 'a portrait', '--width', '64', '--height', '64', '--steps', '2', '--seed', '7', '--out', out, '--json')
    expect(gen.code, gen.stderr).toBe(0)
    expect(JSON.parse(gen.stdout)).toMatchObject({ output: out, seed: '7', width: 64 })
    expect(fs.readFileSync(out).subarray(8, 12).toString()).toBe('WEBP')
    // LoRA keys that match no layer are printed as warnings.
    const partial = path.resolve(__dirname, '..', 'crates', 'hyperlora', 'tests', 'fixtures', 'lora_kinds', 'partial.safetensors')
    const styled = hyperlora('generate', '--tiny', '--lora', `${partial}:0.8`, '--prompt', 'a portrait', '--width', '64', '--height', '64', '--steps', '1', '--out', path.join(dir, 's.png'), '--quiet')
    expect(styled.code, styled.stderr).toBe(0)
    expect(styled.stderr).toMatch(/^warning: partial\.safetensors: 4 keys ignored: /m)
    const refined = hyperlora('generate', '--tiny', '--face', photo, '--refine-face', '--prompt', 'a portrait', '--width', '64', '--height', '64', '--steps', '2', '--out', path.join(dir, 'r.png'), '--json')
    expect(refined.code, refined.stderr).toBe(0)
    expect(JSON.parse(refined.stdout).info).toMatch(/Face refine strength: 0.5/)

    const grey = path.join(dir, 'grey.png')
    await sharp({ create: { width: 120, height: 90, channels: 3, background: { r: 127, g: 127, b: 127 } } }).toFile(grey)
    const noFace = hyperlora('identity', '--tiny', '--face', grey, '--out', path.join(dir, 'x.safetensors'), '--json')
    expect(noFace.code).toBe(1)
    expect(JSON.parse(noFace.stdout).error).toMatchObject({ code: 'NO_FACE', message: expect.stringMatching(/photo 0 \(grey\.png\)/) })
    expect(fs.existsSync(path.join(dir, 'x.safetensors'))).toBe(false)
    // No models given and none installed: the defaults are named, with a hint to pull them.
    const missing = spawnSync('node', [cli, 'generate', '--prompt', 'x', '--json'], { encoding: 'utf8', env: { ...process.env, HF_HOME: dir, HYPERLORA_HOME: dir } })
    expect(missing.status).toBe(1)
    expect(JSON.parse(missing.stdout).error).toMatchObject({ code: 'MODEL_NOT_FOUND', message: expect.stringMatching(/hyperlora pull/) })
    expect(hyperlora('generate', '--tiny', '--prompt', 'x', '--seed', 'abc').code).toBe(2)
  })

  it('has --help for every command, with examples', () => {
    expect(hyperlora('--help').stdout).toMatch(/Examples:[\s\S]*hyperlora demo/)
    for (const command of ['generate', 'identity', 'info', 'demo', 'inspect']) {
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
