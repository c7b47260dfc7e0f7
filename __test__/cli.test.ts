import { execFileSync, spawnSync } from 'node:child_process'
import * as fs from 'node:fs'
import * as path from 'node:path'

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

  it('has --help for every command, with examples', () => {
    expect(hyperlora('--help').stdout).toMatch(/Examples:[\s\S]*hyperlora demo/)
    for (const command of ['info', 'demo', 'inspect']) {
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
