/**
 * Talking to a Hugging Face hub (or a mirror, `HF_ENDPOINT`) with Node's fetch: file metadata,
 * repository listings and resumable, verified downloads. Redirects are followed by hand so the
 * token goes to the hub only, never to the CDN a file redirects to.
 */
import { createHash, type Hash } from 'node:crypto'
import * as fs from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'

import { HyperLoraError } from '../errors.js'

/** Where and as whom to download. */
export interface Hub {
  /** e.g. `https://huggingface.co`, without a trailing slash. */
  endpoint: string
  token: string | null
  signal?: AbortSignal | undefined
  /** A request is given up (and retried) when the server sends nothing for this long: no
   * connection, no answer, or no body bytes (`HYPERLORA_DOWNLOAD_TIMEOUT`, seconds; default 30). */
  timeoutMs: number
}

const TRUE_VALUES = new Set(['1', 'on', 'yes', 'true'])

/** `HF_HUB_OFFLINE` as huggingface_hub reads it. */
export function isOffline(env: NodeJS.ProcessEnv): boolean {
  return TRUE_VALUES.has((env['HF_HUB_OFFLINE'] ?? '').trim().toLowerCase())
}

/** `HF_TOKEN`, else the token `huggingface-cli login` saved (`HF_TOKEN_PATH`, `HF_HOME/token`). */
function tokenFromEnv(env: NodeJS.ProcessEnv): string | null {
  const given = env['HF_TOKEN']?.trim()
  if (given) return given
  const home = env['HF_HOME'] ?? path.join(os.homedir(), '.cache', 'huggingface')
  try {
    return fs.readFileSync(env['HF_TOKEN_PATH'] ?? path.join(home, 'token'), 'utf8').trim() || null
  } catch {
    return null
  }
}

const DEFAULT_TIMEOUT_S = 30

/** `HYPERLORA_DOWNLOAD_TIMEOUT` in seconds (fractions allowed), default 30. */
function timeoutFromEnv(env: NodeJS.ProcessEnv): number {
  const given = env['HYPERLORA_DOWNLOAD_TIMEOUT']?.trim()
  if (!given) return DEFAULT_TIMEOUT_S * 1000
  const seconds = Number(given)
  if (!Number.isFinite(seconds) || seconds <= 0) {
    throw new HyperLoraError('INVALID_ARGUMENT', `HYPERLORA_DOWNLOAD_TIMEOUT must be a number of seconds above 0, got '${given}'`)
  }
  return seconds * 1000
}

export function hubFromEnv(env: NodeJS.ProcessEnv, signal?: AbortSignal): Hub {
  const endpoint = (env['HF_ENDPOINT']?.trim() || 'https://huggingface.co').replace(/\/+$/, '')
  return { endpoint, token: tokenFromEnv(env), signal, timeoutMs: timeoutFromEnv(env) }
}

/** `{endpoint}/{repo}/resolve/{revision}/{path}` */
export function resolveUrl(hub: Hub, repo: string, revision: string, repoPath: string): string {
  const file = repoPath.split('/').map(encodeURIComponent).join('/')
  return `${hub.endpoint}/${repo}/resolve/${encodeURIComponent(revision)}/${file}`
}

class RetryableError extends Error {}

/**
 * Gives up on a request when the server stays silent for `hub.timeoutMs`: `fetch` alone waits
 * minutes for a connection that was accepted but never answered, or a body that stopped.
 * `touch()` on every sign of life (an answer, a chunk) restarts the clock.
 */
class SilenceWatch {
  readonly #controller = new AbortController()
  readonly #ms: number
  #timer: NodeJS.Timeout | undefined
  expired = false
  readonly signal: AbortSignal
  /** The server being waited for (`host:port`): the hub, or the CDN it redirected to. */
  server: string

  constructor(hub: Hub, url: string) {
    this.server = new URL(url).host
    this.#ms = hub.timeoutMs
    this.signal = hub.signal ? AbortSignal.any([hub.signal, this.#controller.signal]) : this.#controller.signal
    this.touch()
  }

  touch(): void {
    clearTimeout(this.#timer)
    this.#timer = setTimeout(() => {
      this.expired = true
      this.#controller.abort()
    }, this.#ms)
  }

  stop(): void {
    clearTimeout(this.#timer)
  }
}

/** Runs one attempt under a {@link SilenceWatch}; silence becomes a retryable error naming the server. */
async function watched<T>(hub: Hub, url: string, attempt: (watch: SilenceWatch) => Promise<T>): Promise<T> {
  const watch = new SilenceWatch(hub, url)
  try {
    return await attempt(watch)
  } catch (error) {
    if (watch.expired && !hub.signal?.aborted) {
      throw new RetryableError(`${watch.server} sent nothing for ${hub.timeoutMs / 1000} s (HYPERLORA_DOWNLOAD_TIMEOUT)`)
    }
    throw error
  } finally {
    watch.stop()
  }
}

function aborted(hub: Hub): HyperLoraError {
  return new HyperLoraError('ABORTED', 'download aborted', { cause: hub.signal?.reason })
}

/** A non-success HTTP answer as an error: missing or forbidden models are not worth retrying. */
function httpError(hub: Hub, response: Response, what: string): Error {
  const status = `${response.status} ${response.statusText}`.trim()
  if (response.status === 401 || response.status === 403) {
    const hint = hub.token ? 'the token has no access to it' : 'it may be gated or private: set HF_TOKEN'
    return new HyperLoraError('MODEL_NOT_FOUND', `${what}: ${status} from ${hub.endpoint} (${hint})`)
  }
  if (response.status === 404) return new HyperLoraError('MODEL_NOT_FOUND', `${what}: not found on ${hub.endpoint} (${status})`)
  if (response.status === 429 || response.status >= 500) return new RetryableError(`${what}: ${status}`)
  return new HyperLoraError('IO', `${what}: unexpected answer ${status} from ${response.url || hub.endpoint}`)
}

/**
 * One request, following redirects by hand: the token is sent to the hub's own origin only.
 * With `stopAtOtherOrigin` the redirect to another origin (the CDN) is returned as is: for a HEAD
 * its headers are the file's metadata.
 */
async function request(
  hub: Hub,
  url: string,
  watch: SilenceWatch,
  init: { method: 'GET' | 'HEAD'; headers?: Record<string, string>; stopAtOtherOrigin?: boolean },
): Promise<Response> {
  const hubOrigin = new URL(hub.endpoint).origin
  let current = url
  for (let hop = 0; hop < 10; hop++) {
    const headers: Record<string, string> = { 'user-agent': 'hyperlora', 'accept-encoding': 'identity', ...init.headers }
    if (hub.token && new URL(current).origin === hubOrigin) headers['authorization'] = `Bearer ${hub.token}`
    watch.server = new URL(current).host
    const response = await fetch(current, { method: init.method, headers, redirect: 'manual', signal: watch.signal })
    watch.touch()
    const location = response.headers.get('location')
    if (response.status < 300 || response.status >= 400 || !location) return response
    const next = new URL(location, current)
    if (init.stopAtOtherOrigin && next.origin !== new URL(current).origin) return response
    await response.body?.cancel()
    current = next.href
  }
  throw new HyperLoraError('IO', `${url}: too many redirects`)
}

const ATTEMPTS = 5

function sleep(ms: number, signal: AbortSignal | undefined): Promise<void> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort)
      resolve()
    }, ms)
    const onAbort = (): void => {
      clearTimeout(timer)
      reject(signal!.reason)
    }
    signal?.addEventListener('abort', onAbort, { once: true })
  })
}

/** Runs `attempt` until it succeeds, retrying network failures and 5xx/429 with backoff. */
async function withRetries<T>(hub: Hub, what: string, attempt: () => Promise<T>): Promise<T> {
  let last: unknown
  for (let n = 0; n < ATTEMPTS; n++) {
    if (hub.signal?.aborted) throw aborted(hub)
    try {
      return await attempt()
    } catch (error) {
      if (hub.signal?.aborted) throw aborted(hub)
      if (error instanceof HyperLoraError) throw error
      last = error
    }
    if (n + 1 < ATTEMPTS) {
      try {
        await sleep(Math.min(250 * 2 ** n, 4000), hub.signal)
      } catch {
        throw aborted(hub)
      }
    }
  }
  const cause = last instanceof Error ? (last.cause instanceof Error ? `${last.message} (${last.cause.message})` : last.message) : String(last)
  throw new HyperLoraError('IO', `${what}: failed after ${ATTEMPTS} attempts: ${cause}`, { cause: last })
}

/** What the hub says about one file before downloading it. */
export interface FileMetadata {
  /** The commit the revision resolves to. */
  commit: string
  /** The blob name: the SHA-256 for LFS files, the git blob SHA-1 otherwise. */
  etag: string
  size: number
}

function cleanEtag(value: string | null): string | null {
  return value?.replace(/^W\//, '').replace(/"/g, '').trim() || null
}

/** A commit id names a folder in the cache: only a git hash may (no `/`, no `..`). */
function isCommit(value: string): boolean {
  return /^[0-9a-f]{40}$/.test(value)
}

/** A file path from a hub (or a mirror posing as one) lands under the snapshot folder: refuse
 * any that could leave it. */
export function isRepoPath(file: string): boolean {
  return file.length > 0 && !file.startsWith('/') && !file.includes('\\') && !file.split('/').some((part) => part === '..' || part === '.' || part === '')
}

/** HEAD `resolve/...`: commit, ETag and size, as huggingface_hub reads them. */
export async function fileMetadata(hub: Hub, repo: string, revision: string, repoPath: string): Promise<FileMetadata> {
  const what = `${repo}/${repoPath}`
  const url = resolveUrl(hub, repo, revision, repoPath)
  return withRetries(hub, what, () => watched(hub, url, async (watch) => {
    const response = await request(hub, url, watch, { method: 'HEAD', stopAtOtherOrigin: true })
    if (response.status >= 400) throw httpError(hub, response, what)
    const commit = response.headers.get('x-repo-commit')
    const etag = cleanEtag(response.headers.get('x-linked-etag') ?? response.headers.get('etag'))
    const size = Number(response.headers.get('x-linked-size') ?? response.headers.get('content-length'))
    if (!commit || !isCommit(commit) || !etag || !/^[0-9a-f]{40}$|^[0-9a-f]{64}$/.test(etag) || !Number.isSafeInteger(size)) {
      throw new HyperLoraError('IO', `${what}: ${hub.endpoint} did not send the hub's file headers (X-Repo-Commit, ETag, size); is HF_ENDPOINT a Hugging Face hub?`)
    }
    return { commit, etag, size }
  }))
}

/** Every file path of a repository at a revision (`/api/models/{repo}/revision/{revision}`). */
export async function listRepoFiles(hub: Hub, repo: string, revision: string): Promise<{ commit: string; files: string[] }> {
  const url = `${hub.endpoint}/api/models/${repo}/revision/${encodeURIComponent(revision)}`
  return withRetries(hub, repo, () => watched(hub, url, async (watch) => {
    const response = await request(hub, url, watch, { method: 'GET' })
    if (!response.ok) throw httpError(hub, response, repo)
    const body = (await response.json()) as { sha?: string; siblings?: { rfilename?: string }[] }
    const files = (body.siblings ?? []).map((s) => s.rfilename).filter((f): f is string => typeof f === 'string' && isRepoPath(f))
    if (!body.sha || !isCommit(body.sha)) throw new HyperLoraError('IO', `${repo}: the hub's listing has no commit`)
    return { commit: body.sha, files }
  }))
}

/** A file to download into a blob, with what it must hash to. */
export interface DownloadJob {
  url: string
  /** The final blob path; data lands in `<blob>.incomplete` first. */
  blob: string
  size: number
  /** Expected SHA-256 (from the manifest or the hub's LFS ETag), if known. */
  sha256: string | null
  /** Expected git blob SHA-1 (the hub's ETag of a small file), if that is what the hub gave. */
  gitSha1: string | null
  /** For messages: `org/name/path`. */
  label: string
}

/** Hashes the bytes already downloaded, so a resumed download is verified whole. */
async function hashExisting(file: string, job: DownloadJob): Promise<{ sha256: Hash; sha1: Hash | null }> {
  const sha256 = createHash('sha256')
  const sha1 = job.gitSha1 ? createHash('sha1').update(`blob ${job.size}\0`) : null
  for await (const chunk of fs.createReadStream(file)) {
    sha256.update(chunk as Buffer)
    sha1?.update(chunk as Buffer)
  }
  return { sha256, sha1 }
}

function sizeOf(file: string): number {
  return fs.statSync(file, { throwIfNoEntry: false })?.size ?? 0
}

/**
 * Downloads `job.url` into `job.blob`: appends to `<blob>.incomplete` (resuming with `Range` from
 * its length, also after a dropped connection), checks the SHA-256 (and git SHA-1) of the whole
 * file, and only then renames it to the blob name. A bad file is deleted: nothing partial or
 * wrong ever sits under the final name. Returns the bytes received over the network.
 */
export async function downloadBlob(hub: Hub, job: DownloadJob, onBytes: (bytes: number) => void): Promise<number> {
  const partial = `${job.blob}.incomplete`
  fs.mkdirSync(path.dirname(partial), { recursive: true })
  let received = 0
  await withRetries(hub, `download ${job.label}`, () => watched(hub, job.url, async (watch) => {
    let have = sizeOf(partial)
    if (have > job.size) {
      fs.truncateSync(partial, 0)
      have = 0
    }
    if (have < job.size) {
      const response = await request(hub, job.url, watch, { method: 'GET', headers: have > 0 ? { range: `bytes=${have}-` } : {} })
      const resumed = response.status === 206 && (response.headers.get('content-range') ?? '').startsWith(`bytes ${have}-`)
      if (!resumed && response.status !== 200) {
        await response.body?.cancel()
        if (response.status === 206 || response.status === 416) {
          fs.truncateSync(partial, 0) // the server disagrees about what we have: start over
          throw new RetryableError(`${job.label}: range not served`)
        }
        throw httpError(hub, response, job.label)
      }
      if (!resumed) have = 0 // a full answer: the server ignored the range
      const out = await fs.promises.open(partial, resumed ? 'a' : 'w')
      try {
        onBytes(have)
        for await (const chunk of response.body ?? []) {
          watch.touch()
          await out.write(chunk as Uint8Array)
          have += (chunk as Uint8Array).byteLength
          received += (chunk as Uint8Array).byteLength
          onBytes(have)
        }
      } finally {
        await out.close()
      }
      if (have !== job.size) throw new RetryableError(`${job.label}: connection closed at ${have} of ${job.size} bytes`)
    }
    onBytes(have)
  }))
  await verifyAndPublish(job, partial)
  return received
}

async function verifyAndPublish(job: DownloadJob, partial: string): Promise<void> {
  const { sha256, sha1 } = await hashExisting(partial, job)
  const actual = sha256.digest('hex')
  const actualSha1 = sha1?.digest('hex')
  if (job.sha256 && actual !== job.sha256) {
    fs.rmSync(partial, { force: true })
    throw new HyperLoraError('BAD_WEIGHTS', `${job.label}: checksum mismatch: expected sha256 ${job.sha256}, got ${actual}; the download was deleted`)
  }
  if (job.gitSha1 && actualSha1 !== job.gitSha1) {
    fs.rmSync(partial, { force: true })
    throw new HyperLoraError('BAD_WEIGHTS', `${job.label}: checksum mismatch: expected git sha1 ${job.gitSha1}, got ${actualSha1} (sha256 ${actual}); the download was deleted`)
  }
  fs.renameSync(partial, job.blob)
}
