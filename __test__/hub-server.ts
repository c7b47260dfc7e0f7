/**
 * A small Hugging Face hub for tests, on 127.0.0.1: the hub's URL layout served from a temp
 * folder, with LFS files redirected to a "CDN" on another port (another origin, as on the real
 * hub), Range requests, a scripted dropped or stalled connection and a corrupted file.
 *
 *   HEAD/GET /{org}/{name}/resolve/{revision}/{path}   small files: 200 + ETag (git blob SHA-1);
 *                                                      LFS files: 302 to the CDN + X-Linked-Etag (SHA-256), X-Linked-Size
 *   GET      /api/models/{org}/{name}/revision/{rev}   { sha, siblings: [{ rfilename }] }
 *   GET      (CDN) /cdn/{sha256}                       the bytes, with Range
 */
import { createHash } from 'node:crypto'
import * as fs from 'node:fs'
import * as http from 'node:http'
import type { AddressInfo } from 'node:net'
import * as path from 'node:path'

import { tempDir } from './helpers.js'

export interface HubFile {
  path: string
  content: Buffer
}

export interface HubRepo {
  /** `org/name` */
  repo: string
  /** 40 hex digits. */
  commit: string
  files: HubFile[]
}

export interface HubOptions {
  repos: HubRepo[]
  /** When set, hub requests must carry `Authorization: Bearer <token>`. */
  token?: string
  /** `org/name/path` of LFS files whose first CDN transfer is cut off halfway. */
  dropOnce?: string[]
  /** `org/name/path` of LFS files the CDN serves with one byte changed. */
  corrupt?: string[]
  /** `org/name/path` of LFS files whose first CDN transfer stops halfway and hangs (to abort it). */
  stallOnce?: string[]
}

export interface LoggedRequest {
  server: 'hub' | 'cdn'
  method: string
  url: string
  authorization: string | undefined
  range: string | undefined
}

export interface HubServer {
  /** For HF_ENDPOINT. */
  endpoint: string
  requests: LoggedRequest[]
  close(): Promise<void>
}

/** Files above this are LFS files on the real hub; here: weights. */
export const isLfs = (file: string): boolean => /\.(safetensors|onnx|bin)$/.test(file)

export const sha256 = (data: Buffer): string => createHash('sha256').update(data).digest('hex')
export const gitSha1 = (data: Buffer): string => createHash('sha1').update(`blob ${data.length}\0`).update(data).digest('hex')

interface Stored {
  repo: HubRepo
  path: string
  disk: string
  size: number
  sha256: string
  gitSha1: string
}

function listen(server: http.Server): Promise<number> {
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve((server.address() as AddressInfo).port)))
}

/** Serves `[start, end]` of a file, honouring a `Range: bytes=N-` header. */
function serveBytes(req: http.IncomingMessage, res: http.ServerResponse, data: Buffer, headers: Record<string, string>, cut?: () => 'drop' | 'stall' | null): void {
  const range = /^bytes=(\d+)-$/.exec(req.headers.range ?? '')
  const start = range ? Number(range[1]) : 0
  if (start > data.length) {
    res.writeHead(416, { 'content-range': `bytes */${data.length}` }).end()
    return
  }
  const body = data.subarray(start)
  res.writeHead(range ? 206 : 200, {
    ...headers,
    'accept-ranges': 'bytes',
    'content-length': String(body.length),
    ...(range && { 'content-range': `bytes ${start}-${data.length - 1}/${data.length}` }),
  })
  if (req.method === 'HEAD') {
    res.end()
    return
  }
  const how = cut?.()
  if (how) {
    // Half the bytes, then the connection drops, or hangs until the client gives up.
    res.write(body.subarray(0, Math.floor(body.length / 2)), () => how === 'drop' && res.socket?.destroy())
    return
  }
  res.end(body)
}

export async function startHub(options: HubOptions): Promise<HubServer> {
  const root = tempDir('hub')
  const byRepoPath = new Map<string, Stored>()
  const bySha = new Map<string, Stored>()
  for (const repo of options.repos) {
    for (const file of repo.files) {
      const disk = path.join(root, repo.repo, file.path)
      fs.mkdirSync(path.dirname(disk), { recursive: true })
      fs.writeFileSync(disk, file.content)
      const stored = { repo, path: file.path, disk, size: file.content.length, sha256: sha256(file.content), gitSha1: gitSha1(file.content) }
      byRepoPath.set(`${repo.repo}/${file.path}`, stored)
      bySha.set(stored.sha256, stored)
    }
  }
  const requests: LoggedRequest[] = []
  const log = (server: 'hub' | 'cdn', req: http.IncomingMessage): void => {
    requests.push({ server, method: req.method ?? '', url: req.url ?? '', authorization: req.headers.authorization, range: req.headers.range })
  }
  const dropped = new Set<string>()

  const cdn = http.createServer((req, res) => {
    log('cdn', req)
    const sha = /^\/cdn\/([0-9a-f]{64})$/.exec(new URL(req.url ?? '/', 'http://x').pathname)?.[1]
    const stored = sha ? bySha.get(sha) : undefined
    if (!stored) {
      res.writeHead(404).end()
      return
    }
    const key = `${stored.repo.repo}/${stored.path}`
    let data = fs.readFileSync(stored.disk)
    if (options.corrupt?.includes(key)) {
      data = Buffer.from(data)
      data[0] = data[0]! ^ 0xff
    }
    const cut = (): 'drop' | 'stall' | null => {
      const how = options.dropOnce?.includes(key) ? 'drop' : options.stallOnce?.includes(key) ? 'stall' : null
      if (!how || dropped.has(key)) return null
      dropped.add(key)
      return how
    }
    serveBytes(req, res, data, { 'content-type': 'application/octet-stream' }, cut)
  })
  const cdnPort = await listen(cdn)

  const hub = http.createServer((req, res) => {
    log('hub', req)
    if (options.token && req.headers.authorization !== `Bearer ${options.token}`) {
      res.writeHead(401, { 'x-error-code': 'GatedRepo', 'content-type': 'application/json' }).end('{"error":"Access restricted"}')
      return
    }
    const url = new URL(req.url ?? '/', 'http://x')
    const parts = url.pathname.split('/').slice(1).map(decodeURIComponent)
    const api = parts[0] === 'api' && parts[1] === 'models' && parts[4] === 'revision'
    const repoId = api ? `${parts[2]}/${parts[3]}` : `${parts[0]}/${parts[1]}`
    const repo = options.repos.find((r) => r.repo === repoId)
    const revision = api ? parts[5] : parts[3]
    if (!repo || (revision !== 'main' && revision !== repo.commit)) {
      res.writeHead(404, { 'x-error-code': repo ? 'RevisionNotFound' : 'RepoNotFound' }).end()
      return
    }
    if (api) {
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ id: repo.repo, sha: repo.commit, siblings: repo.files.map((f) => ({ rfilename: f.path })) }))
      return
    }
    const stored = parts[2] === 'resolve' ? byRepoPath.get(`${repo.repo}/${parts.slice(4).join('/')}`) : undefined
    if (!stored) {
      res.writeHead(404, { 'x-error-code': 'EntryNotFound' }).end()
      return
    }
    const common = { 'x-repo-commit': repo.commit }
    if (isLfs(stored.path)) {
      res
        .writeHead(302, {
          ...common,
          location: `http://127.0.0.1:${cdnPort}/cdn/${stored.sha256}`,
          'x-linked-etag': `"${stored.sha256}"`,
          'x-linked-size': String(stored.size),
          etag: `"${stored.gitSha1}"`,
        })
        .end()
      return
    }
    serveBytes(req, res, fs.readFileSync(stored.disk), { ...common, etag: `"${stored.gitSha1}"` })
  })
  const hubPort = await listen(hub)

  return {
    endpoint: `http://127.0.0.1:${hubPort}`,
    requests,
    close: async () => {
      hub.closeAllConnections()
      cdn.closeAllConnections()
      await Promise.all([new Promise((r) => hub.close(r)), new Promise((r) => cdn.close(r))])
    },
  }
}
