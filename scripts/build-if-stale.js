#!/usr/bin/env node
'use strict'
// The project's `prepare` script. npm runs it after `npm install` / `npm ci` in a clone (and when
// a clone is installed as a directory, e.g. by `npx hyperlora` into its cache), and also on
// `npm pack` / `npm publish`. It builds the native engine and dist/ when either is missing or
// older than its sources, so `npm install && npx hyperlora demo` builds once and later installs
// find the build current; under pack and publish it does nothing: they ship what was built.
// Its notes go to stderr: stdout may be a JSON document (npm pack --json).
// (Not `postinstall`: the published package would then carry an install script, which npm
// flags on every user's install, for a step that only ever matters in a clone.)
const { spawnSync } = require('node:child_process')
const fs = require('node:fs')
const path = require('node:path')

const root = path.resolve(__dirname, '..')

/** Newest modification time under `dir` of files whose names pass `keep`. */
function newest(dir, keep) {
  let time = 0
  for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
    const full = path.join(dir, entry.name)
    if (entry.isDirectory()) time = Math.max(time, newest(full, keep))
    else if (keep(entry.name)) time = Math.max(time, fs.statSync(full).mtimeMs)
  }
  return time
}

function mtime(file) {
  return fs.statSync(file, { throwIfNoEntry: false })?.mtimeMs ?? 0
}

/** Why a build is needed, or null when the outputs are newer than every source. */
function staleReason() {
  const binaries = fs.readdirSync(root).filter((f) => /^hyperlora\..+\.node$/.test(f))
  if (binaries.length === 0) return 'the native engine is not built'
  if (!fs.existsSync(path.join(root, 'dist', 'cli', 'index.js'))) return 'dist/ is not built'
  const rust = Math.max(newest(path.join(root, 'crates'), (f) => /\.(rs|toml|cu|ptx)$/.test(f)), mtime(path.join(root, 'Cargo.toml')), mtime(path.join(root, 'Cargo.lock')))
  if (rust > Math.min(...binaries.map((f) => mtime(path.join(root, f))))) return 'the Rust sources changed since the last build'
  const ts = Math.max(newest(path.join(root, 'src'), (f) => f.endsWith('.ts')), mtime(path.join(root, 'tsconfig.json')), mtime(path.join(root, 'tsconfig.build.json')))
  if (ts > mtime(path.join(root, 'dist', 'cli', 'index.js'))) return 'the TypeScript sources changed since the last build'
  return null
}

function main() {
  const command = process.env['npm_command']
  if (command === 'pack' || command === 'publish') {
    console.error(`hyperlora: npm ${command} does not build; it ships dist/ as 'npm run build:ts' left it`)
    return 0
  }
  // Not a source checkout (an unpacked package): there is nothing to build.
  if (!fs.existsSync(path.join(root, 'crates', 'hyperlora-node', 'Cargo.toml'))) return 0
  const reason = staleReason()
  if (!reason) {
    console.error('hyperlora: the native engine and dist/ are up to date (npm run build rebuilds them)')
    return 0
  }
  const cargo = spawnSync('cargo', ['--version'], { stdio: 'ignore', shell: process.platform === 'win32' })
  if (cargo.status !== 0) {
    console.error(`hyperlora: ${reason}, and building it needs Rust: install it from https://rustup.rs, then run 'npm run build'`)
    return 1
  }
  console.error(`hyperlora: ${reason}; building (npm run build; the first build takes several minutes)`)
  const npm = process.env['npm_execpath']
  const build = npm ? spawnSync(process.execPath, [npm, 'run', 'build'], { cwd: root, stdio: 'inherit' }) : spawnSync('npm', ['run', 'build'], { cwd: root, stdio: 'inherit', shell: process.platform === 'win32' })
  return build.status ?? 1
}

process.exitCode = main()
