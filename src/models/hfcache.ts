/**
 * The Hugging Face hub cache layout, shared with huggingface_hub so Python tools and hyperlora
 * reuse each other's downloads:
 *
 *   <cache>/models--org--name/
 *     blobs/<etag>                  file contents, named by the hub's ETag: the SHA-256 for LFS
 *                                   files, the git blob SHA-1 for small ones
 *     blobs/<etag>.incomplete       a download in progress (resumed from its length)
 *     refs/<revision>               the commit a branch or tag pointed at when downloaded
 *     snapshots/<commit>/<path>     relative symlinks into blobs/
 */
import * as fs from 'node:fs'
import * as path from 'node:path'

import { writeAtomic } from '../files.js'

import { inspectFiles, type ExpectedFile, type Lookup } from './local.js'

/** `<cache>/models--org--name` */
export function repoCacheDir(cache: string, repo: string): string {
  return path.join(cache, `models--${repo.split('/').join('--')}`)
}

export function blobFile(repoDir: string, blob: string): string {
  return path.join(repoDir, 'blobs', blob)
}

export function snapshotFile(repoDir: string, commit: string, repoPath: string): string {
  return path.join(repoDir, 'snapshots', commit, ...repoPath.split('/'))
}

function readRef(repoDir: string, revision: string): string | null {
  try {
    return fs.readFileSync(path.join(repoDir, 'refs', ...revision.split('/')), 'utf8').trim()
  } catch {
    return null
  }
}

/**
 * Snapshot folders to look in, best first: the one `refs/<revision>` names (or the commit itself
 * when the revision is one), then every other snapshot, newest first — a user's cache made at
 * another commit often holds the very same files.
 */
export function snapshotDirs(repoDir: string, revision: string): string[] {
  const root = path.join(repoDir, 'snapshots')
  let names: string[]
  try {
    names = fs.readdirSync(root).filter((n) => fs.statSync(path.join(root, n)).isDirectory())
  } catch {
    return []
  }
  const preferred = readRef(repoDir, revision) ?? (/^[0-9a-f]{40}$/.test(revision) ? revision : null)
  const mtime = (n: string): number => fs.statSync(path.join(root, n)).mtimeMs
  names.sort((a, b) => (a === preferred ? -1 : b === preferred ? 1 : mtime(b) - mtime(a)))
  return names.map((n) => path.join(root, n))
}

/**
 * Finds a snapshot holding all `files` (repository paths) and returns `<snapshot>/<modelPath>`;
 * otherwise what the best snapshot lacks.
 */
export function findInCache(cache: string, repo: string, revision: string, files: readonly ExpectedFile[], modelPath: string): Lookup {
  const repoDir = repoCacheDir(cache, repo)
  let best: string[] | undefined
  for (const dir of snapshotDirs(repoDir, revision)) {
    const check = inspectFiles(dir, files)
    if (check.complete) return { found: { path: path.join(dir, ...modelPath.split('/').filter(Boolean)), bytes: check.bytes } }
    best ??= check.missing
  }
  return { looked: repoDir, missing: best ?? files.map((f) => f.path) }
}

/** Whether the snapshot already serves `repoPath` from exactly this blob. */
export function snapshotHasBlob(repoDir: string, commit: string, repoPath: string, blob: string, size: number): boolean {
  const file = snapshotFile(repoDir, commit, repoPath)
  try {
    const link = fs.lstatSync(file)
    if (link.isSymbolicLink()) return path.basename(fs.readlinkSync(file)) === blob && fs.statSync(file).size === size
    // A hard link or copy (filesystems without symlinks): same size and, for a hard link, same inode.
    const stat = fs.statSync(blobFile(repoDir, blob), { throwIfNoEntry: false })
    return link.size === size && (!stat || stat.ino === link.ino)
  } catch {
    return false
  }
}

/**
 * Makes `snapshots/<commit>/<repoPath>` serve the blob: a relative symlink as huggingface_hub
 * makes, else (Windows without symlink rights) a hard link, else a copy.
 */
export function linkIntoSnapshot(repoDir: string, commit: string, repoPath: string, blob: string): void {
  const target = snapshotFile(repoDir, commit, repoPath)
  const source = blobFile(repoDir, blob)
  fs.mkdirSync(path.dirname(target), { recursive: true })
  fs.rmSync(target, { force: true })
  try {
    fs.symlinkSync(path.relative(path.dirname(target), source), target)
    return
  } catch {
    // fall through: no symlink permission
  }
  try {
    fs.linkSync(source, target)
  } catch {
    fs.copyFileSync(source, target)
  }
}

/** Records which commit a branch or tag pointed at (only for names, as huggingface_hub does). */
export function writeRef(repoDir: string, revision: string, commit: string): void {
  if (revision === commit) return
  const file = path.join(repoDir, 'refs', ...revision.split('/'))
  fs.mkdirSync(path.dirname(file), { recursive: true })
  writeAtomic(file, commit)
}
