// The release path: packing never compiles, the tarball holds what users need and nothing of the
// tests', and the packed package plus the platform package install and run on a machine without
// Rust (scripts/tarball-install.ts, the same check CI can run alone).
import { spawnSync } from 'node:child_process'
import * as fs from 'node:fs'
import * as path from 'node:path'

import { describe, expect, it, onTestFinished } from 'vitest'

import { builtBinary, tarballInstall, userEnv } from '../scripts/tarball-install.js'
import { tempDir } from './helpers.js'

const root = path.resolve(__dirname, '..')

/** A PATH whose `cargo` and `rustc` only leave a mark that they were called, and fail. */
function rustTrap(): { env: NodeJS.ProcessEnv; called: () => boolean } {
  const bin = tempDir('trap')
  const mark = path.join(bin, 'called')
  for (const exe of ['cargo', 'rustc']) {
    fs.writeFileSync(path.join(bin, exe), `#!/bin/sh\necho "$0 $*" >> '${mark}'\nexit 1\n`, { mode: 0o755 })
  }
  const env = userEnv()
  return { env: { ...env, PATH: `${bin}${path.delimiter}${env['PATH']}` }, called: () => fs.existsSync(mark) }
}

const native = builtBinary()
const posix = process.platform !== 'win32'

describe('release path', () => {
  it.runIf(posix)('npm pack runs no build and ships LICENSE, no test-only weights, no source maps, no install script', () => {
    const trap = rustTrap()
    const r = spawnSync('npm', ['pack', '--dry-run', '--json'], { cwd: root, env: trap.env, encoding: 'utf8' })
    expect(r.status, r.stderr).toBe(0)
    expect(trap.called(), 'cargo was called by npm pack').toBe(false)
    expect(r.stderr).toContain("hyperlora: npm pack does not build; it ships dist/ as 'npm run build:ts' left it")
    const files = (JSON.parse(r.stdout) as [{ files: { path: string }[] }])[0].files.map((f) => f.path)
    expect(files).toEqual(expect.arrayContaining(['LICENSE', 'dist/cli/index.js', 'bin/hyperlora.js', 'models/tiny/sdxl/unet/config.json', 'models/tiny/photos/astronaut.png']))
    expect(files.filter((f) => /single-file|tests\/fixtures|hyperlora-fuzz|\.map$|^src\/|^crates\/|^scripts\//.test(f))).toEqual([])
    // npm flags packages with install scripts on every user's install; the build hook is `prepare`, which installs from the registry never run.
    const scripts = (JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8')) as { scripts: Record<string, string> }).scripts
    expect(Object.keys(scripts).filter((s) => ['preinstall', 'install', 'postinstall'].includes(s))).toEqual([])
    expect(fs.readFileSync(path.join(root, 'LICENSE'), 'utf8')).toMatch(/Apache License\s+Version 2\.0, January 2004[\s\S]*END OF TERMS AND CONDITIONS/)
  })

  it.runIf(posix && !('missing' in native))('npm install in a built clone, and npx hyperlora there, build nothing', () => {
    const trap = rustTrap()
    // What `npm install` runs in the clone after installing the dependencies.
    const prepare = spawnSync('npm', ['run', 'prepare'], { cwd: root, env: trap.env, encoding: 'utf8' })
    expect(prepare.status, prepare.stderr).toBe(0)
    expect(prepare.stderr).toContain('hyperlora: the native engine and dist/ are up to date')
    const npx = spawnSync('npx', ['hyperlora', 'info', '--json'], { cwd: root, env: trap.env, encoding: 'utf8' })
    expect(npx.status, npx.stderr).toBe(0)
    expect(JSON.parse(npx.stdout)).toMatchObject({ version: '0.1.0', backends: ['cpu'] })
    expect(trap.called(), 'cargo was called').toBe(false)
  })

  it.skipIf('missing' in native)(`the tarballs install without Rust and run the demo${'missing' in native ? ` (skipped: ${native.missing})` : ''}`, () => {
    const result = tarballInstall()
    onTestFinished(() => fs.rmSync(path.dirname(result.project), { recursive: true, force: true }))
    expect(result.demo).toMatchObject({ device: 'cpu', steps: 20 })
    expect(fs.readFileSync(result.demo.output).subarray(1, 4).toString()).toBe('PNG')
    expect(result.info).toMatchObject({ native: 'pkg' in native ? native.pkg : '', backends: ['cpu'], warnings: [] })
    const hyperlora = (...args: string[]) => spawnSync('npx', ['--no', 'hyperlora', ...args], { cwd: result.project, env: result.env, encoding: 'utf8' })

    // Without the platform package: info still answers and says what to install; engine calls fail with NATIVE_MISSING.
    const pkg = 'pkg' in native ? native.pkg : ''
    const installed = path.join(result.project, 'node_modules', pkg)
    fs.renameSync(installed, `${installed}.away`)
    try {
      const info = hyperlora('info', '--json')
      expect(info.status, info.stderr).toBe(0)
      expect(JSON.parse(info.stdout)).toMatchObject({ native: null, backends: [], version: '0.1.0' })
      expect(JSON.parse(info.stdout).warnings[0]).toMatch(new RegExp(`the package ${pkg} is not installed\\. Install it next to hyperlora: npm i ${pkg}@0\\.1\\.0`))
      const demo = hyperlora('demo', '--json')
      expect(demo.status).toBe(1)
      expect(JSON.parse(demo.stdout).error).toMatchObject({ code: 'NATIVE_MISSING', message: expect.stringContaining(`npm i ${pkg}@0.1.0`) })
    } finally {
      fs.renameSync(`${installed}.away`, installed)
    }

    // A CUDA build that cannot load (here: not a shared library at all) leaves the CPU build in use, and says why.
    if (process.platform === 'linux' && process.arch === 'x64') {
      const cuda = path.join(result.project, 'node_modules', 'hyperlora-linux-x64-gnu-cuda')
      fs.mkdirSync(cuda)
      fs.writeFileSync(path.join(cuda, 'package.json'), JSON.stringify({ name: 'hyperlora-linux-x64-gnu-cuda', version: '0.1.0', main: 'hyperlora.linux-x64-gnu.node' }))
      fs.writeFileSync(path.join(cuda, 'hyperlora.linux-x64-gnu.node'), 'not a shared library')
      const info = hyperlora('info')
      expect(info.status, info.stderr).toBe(0)
      expect(info.stdout).toMatch(/native: +hyperlora-linux-x64-gnu\n/)
      expect(info.stdout).toMatch(/warning: +hyperlora-linux-x64-gnu-cuda is installed but cannot load \(.+\); using the CPU build/)
    }
  }, 300_000)
})
