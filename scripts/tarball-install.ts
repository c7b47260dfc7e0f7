/**
 * The release path as a user meets it, runnable in CI: packs the main package and this
 * platform's package (with the `.node` built here), installs both into a new project with cargo
 * and rustc off PATH, and runs `npx hyperlora demo` there on the bundled tiny models. Packing
 * and installing must not compile anything: without Rust on PATH, any attempt would fail.
 *
 *   npm run build && npx tsx scripts/tarball-install.ts    # prints a JSON summary, exits 1 on failure
 */
import { execFileSync } from 'node:child_process'
import * as fs from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'

import { NAPI_BINARY, platformPackage } from '../src/platform.js'

const root = path.resolve(__dirname, '..')

/** What the installed package did. */
export interface TarballInstall {
  /** The temporary project the tarballs were installed into. */
  project: string
  /** The environment it ran in (PATH without cargo and rustc). */
  env: NodeJS.ProcessEnv
  /** Files of the main tarball, as `npm pack --json` lists them. */
  files: string[]
  /** `hyperlora demo --json` there. */
  demo: { output: string; device: string; steps: number }
  /** `hyperlora info --json` there. */
  info: { native: string | null; backends: string[]; warnings: string[] }
}

/** The native build of this platform in the repository, or why there is none. */
export function builtBinary(): { file: string; pkg: string } | { missing: string } {
  const pkg = platformPackage()
  if (!pkg) return { missing: `no platform package for ${process.platform}-${process.arch}` }
  const file = path.join(root, `${NAPI_BINARY}.${pkg.slice('hyperlora-'.length)}.node`)
  return fs.existsSync(file) ? { file, pkg } : { missing: `${path.basename(file)} is not built (npm run build)` }
}

/** PATH without the folders that hold cargo or rustc: a user's machine without Rust. */
export function pathWithoutRust(env: NodeJS.ProcessEnv = process.env): string {
  const hasRust = (dir: string): boolean => ['cargo', 'rustc', 'cargo.exe', 'rustc.exe'].some((exe) => fs.existsSync(path.join(dir, exe)))
  return (env['PATH'] ?? '').split(path.delimiter).filter((dir) => dir && !hasRust(dir)).join(path.delimiter)
}

/** The environment of a user's shell: no Rust, and none of the variables `npm run` sets for this project. */
export function userEnv(): NodeJS.ProcessEnv {
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !/^npm_(package|lifecycle)_|^INIT_CWD$/.test(k)))
  return { ...env, PATH: pathWithoutRust(env) }
}

function run(cmd: string, args: string[], cwd: string, env: NodeJS.ProcessEnv): string {
  return execFileSync(cmd, args, { cwd, env, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], shell: process.platform === 'win32' })
}

/** `npm pack` of `dir` into `dest`: the tarball's path and its file list. */
function pack(dir: string, dest: string, env: NodeJS.ProcessEnv): { tarball: string; files: string[] } {
  const [report] = JSON.parse(run('npm', ['pack', '--json', '--pack-destination', dest], dir, env)) as [{ filename: string; files: { path: string }[] }]
  return { tarball: path.join(dest, report.filename), files: report.files.map((f) => f.path) }
}

export function tarballInstall(): TarballInstall {
  const built = builtBinary()
  if ('missing' in built) throw new Error(built.missing)
  const env = userEnv()
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'hyperlora-tarball-'))
  const main = pack(root, work, env)

  // The per-platform package as the release workflow fills it: its package.json plus the binary.
  const platformDir = path.join(work, built.pkg)
  fs.cpSync(path.join(root, 'npm', built.pkg.slice('hyperlora-'.length)), platformDir, { recursive: true })
  fs.copyFileSync(built.file, path.join(platformDir, path.basename(built.file)))
  const platform = pack(platformDir, work, env)

  const project = path.join(work, 'project')
  fs.mkdirSync(project)
  fs.writeFileSync(path.join(project, 'package.json'), JSON.stringify({ name: 'tarball-user', private: true }))
  run('npm', ['install', '--no-audit', '--no-fund', '--prefer-offline', main.tarball, platform.tarball], project, env)

  // `npx --no`: run the installed bin, never install anything.
  const demo = JSON.parse(run('npx', ['--no', 'hyperlora', 'demo', '--json', '--quiet'], project, env)) as TarballInstall['demo']
  const info = JSON.parse(run('npx', ['--no', 'hyperlora', 'info', '--json'], project, env)) as TarballInstall['info']
  return { project, env, files: main.files, demo, info }
}

// Run as a script (tsx), not when a test imports it.
if (process.argv[1] !== undefined && path.resolve(process.argv[1]) === __filename) {
  try {
    const result = tarballInstall()
    console.log(JSON.stringify({ project: result.project, files: result.files.length, demo: result.demo, info: result.info }, null, 2))
  } catch (error) {
    const e = error as Error & { stderr?: string }
    console.error(`tarball install failed: ${e.message}${e.stderr ? `\n${e.stderr}` : ''}`)
    process.exitCode = 1
  }
}
