import { execFile } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import * as fs from 'node:fs'
import * as net from 'node:net'
import * as path from 'node:path'

import { afterAll, beforeAll, describe, expect, it } from 'vitest'

import { listModels, pullModels, resolveModel, type Manifest, type ModelEvent } from '../src/index.js'
import { speedAndEta } from '../src/cli/models.js'
import { formatDuration, RateMeter } from '../src/cli/rate.js'
import { gitSha1, sha256, startHub, type HubRepo, type HubServer } from './hub-server.js'
import { tempDir, rejection } from './helpers.js'

const cli = path.resolve(__dirname, '..', 'bin', 'hyperlora.js')

const commit = (n: number): string => n.toString(16).padStart(40, 'a')
const bytes = (n: number): Buffer => randomBytes(n)
const json = (value: unknown): Buffer => Buffer.from(JSON.stringify(value))

/** Small generated repositories in the layouts of the real ones. */
const REPOS: HubRepo[] = [
  {
    repo: 'test-org/sdxl-tiny',
    commit: commit(1),
    files: [
      { path: 'model_index.json', content: json({ _class_name: 'StableDiffusionXLPipeline' }) },
      { path: 'unet/config.json', content: json({ sample_size: 8 }) },
      { path: 'unet/diffusion_pytorch_model.fp16.safetensors', content: bytes(300_000) },
      { path: 'unet/diffusion_pytorch_model.safetensors', content: bytes(1000) },
    ],
  },
  { repo: 'test-org/single', commit: commit(2), files: [{ path: 'model.safetensors', content: bytes(200_000) }] },
  {
    repo: 'test-org/hyper',
    commit: commit(3),
    files: ['v1_fidelity', 'v1_edit'].flatMap((v) =>
      ['hyper_lora_modules.json', 'hyper_lora_modules.safetensors', 'id_projector.safetensors', 'resampler.safetensors'].map((f) => ({
        path: `${v}/${f}`,
        content: f.endsWith('.json') ? json({ variant: v }) : bytes(5000),
      })),
    ),
  },
  {
    repo: 'test-org/clip',
    commit: commit(4),
    files: [
      { path: 'config.json', content: json({ model_type: 'clip' }) },
      { path: 'model.safetensors', content: bytes(50_000) },
    ],
  },
  {
    repo: 'test-org/faces',
    commit: commit(5),
    files: ['scrfd_10g_bnkps.onnx', '2d106det.onnx', 'glintr100.onnx', 'genderage.onnx'].map((f) => ({ path: f, content: bytes(4000) })),
  },
  { repo: 'test-org/broken', commit: commit(6), files: [{ path: 'bad.safetensors', content: bytes(10_000) }] },
  { repo: 'test-org/slow', commit: commit(8), files: [{ path: 'slow.safetensors', content: bytes(400_000) }] },
  { repo: 'test-org/extra', commit: commit(7), files: [{ path: 'other.safetensors', content: bytes(3000) }, { path: 'README.md', content: Buffer.from('# x') }] },
]

const TOKEN = 'hf_test_token'

function file(repo: string, p: string): Buffer {
  return REPOS.find((r) => r.repo === repo)!.files.find((f) => f.path === p)!.content
}

/** Manifest files with real sizes and hashes, or `null`s to exercise the hub's LFS hash. */
function files(repo: string, paths: string[], known = true): Manifest['models'][string]['files'] {
  return paths.map((p) => ({ path: p, size: known ? file(repo, p).length : null, sha256: known ? sha256(file(repo, p)) : null }))
}

const MANIFEST: Manifest = {
  version: 1,
  models: {
    'tiny-sdxl': {
      role: 'checkpoint',
      description: 'diffusers folder',
      repo: 'test-org/sdxl-tiny',
      revision: 'main',
      path: '',
      files: [
        ...files('test-org/sdxl-tiny', ['model_index.json', 'unet/config.json']),
        { ...files('test-org/sdxl-tiny', ['unet/diffusion_pytorch_model.fp16.safetensors'])[0]!, alternatives: ['unet/diffusion_pytorch_model.safetensors'] },
      ],
      comfyui: ['diffusers/sdxl-tiny', 'checkpoints/sdxl-tiny.safetensors'],
    },
    'tiny-single': {
      role: 'checkpoint',
      description: 'single file, hashes unknown to the manifest',
      repo: 'test-org/single',
      revision: 'main',
      path: 'model.safetensors',
      files: files('test-org/single', ['model.safetensors'], false),
      comfyui: ['checkpoints/single.safetensors'],
    },
    'tiny-hyper': {
      role: 'hyperlora',
      description: 'HyperLoRA folder',
      repo: 'test-org/hyper',
      revision: 'main',
      path: 'v1_fidelity',
      files: files(
        'test-org/hyper',
        ['hyper_lora_modules.json', 'hyper_lora_modules.safetensors', 'id_projector.safetensors', 'resampler.safetensors'].map((f) => `v1_fidelity/${f}`),
      ),
      comfyui: ['hyper_lora/hyper_lora/v1_fidelity'],
    },
    'tiny-clip': {
      role: 'clipVision',
      description: 'CLIP',
      repo: 'test-org/clip',
      revision: 'main',
      path: '',
      files: [{ path: 'config.json', size: null, sha256: null }, ...files('test-org/clip', ['model.safetensors'])],
    },
    'tiny-faces': {
      role: 'faceModels',
      description: 'antelopev2',
      repo: 'test-org/faces',
      revision: 'main',
      path: '',
      files: files('test-org/faces', ['scrfd_10g_bnkps.onnx', '2d106det.onnx', 'glintr100.onnx']),
      comfyui: ['insightface/models/antelopev2'],
    },
    'tiny-slow': {
      role: 'checkpoint',
      description: 'first transfer stalls',
      repo: 'test-org/slow',
      revision: 'main',
      path: 'slow.safetensors',
      files: files('test-org/slow', ['slow.safetensors']),
    },
    'tiny-bad': {
      role: 'checkpoint',
      description: 'served corrupted',
      repo: 'test-org/broken',
      revision: 'main',
      path: 'bad.safetensors',
      files: files('test-org/broken', ['bad.safetensors']),
    },
  },
  defaults: { checkpoint: 'tiny-single', hyperlora: 'tiny-hyper', clipVision: 'tiny-clip', faceModels: 'tiny-faces' },
}

let hub: HubServer

beforeAll(async () => {
  hub = await startHub({ repos: REPOS, token: TOKEN, dropOnce: ['test-org/single/model.safetensors'], corrupt: ['test-org/broken/bad.safetensors'], stallOnce: ['test-org/slow/slow.safetensors'] })
})

afterAll(async () => {
  await hub.close()
})

/** A fresh machine: empty HF_HOME and HYPERLORA_HOME, the test hub, the token. */
function machine(extra: NodeJS.ProcessEnv = {}): { env: NodeJS.ProcessEnv; hfHome: string; cache: string } {
  const hfHome = tempDir('hf-home')
  const env = { HF_ENDPOINT: hub.endpoint, HF_HOME: hfHome, HF_TOKEN: TOKEN, HYPERLORA_HOME: tempDir('hl-home'), ...extra }
  return { env, hfHome, cache: path.join(hfHome, 'hub') }
}

/** Requests made while `run` runs. */
async function requestsDuring<T>(run: () => Promise<T>): Promise<{ result: T; requests: HubServer['requests'] }> {
  const before = hub.requests.length
  const result = await run()
  return { result, requests: hub.requests.slice(before) }
}

describe('model manager', () => {
  it('downloads a manifest model into the Hugging Face cache layout; the token goes to the hub only', async () => {
    const { env, cache } = machine()
    const events: ModelEvent[] = []
    const { result, requests } = await requestsDuring(() => pullModels(['tiny-sdxl'], { env, manifest: MANIFEST, onProgress: (e) => events.push(e) }))
    const repoDir = path.join(cache, 'models--test-org--sdxl-tiny')
    const snapshot = path.join(repoDir, 'snapshots', commit(1))
    expect(result).toEqual([{ name: 'tiny-sdxl', role: 'checkpoint', path: snapshot, source: 'hf-cache', downloadedBytes: expect.any(Number), bytes: 300_000 + file('test-org/sdxl-tiny', 'model_index.json').length + file('test-org/sdxl-tiny', 'unet/config.json').length }])
    expect(result[0]!.downloadedBytes).toBe(result[0]!.bytes)
    expect(fs.readFileSync(path.join(repoDir, 'refs', 'main'), 'utf8')).toBe(commit(1))
    // huggingface_hub's layout: relative symlinks into blobs named by SHA-256 (LFS) or git SHA-1.
    const weights = file('test-org/sdxl-tiny', 'unet/diffusion_pytorch_model.fp16.safetensors')
    const link = path.join(snapshot, 'unet', 'diffusion_pytorch_model.fp16.safetensors')
    expect(fs.readlinkSync(link)).toBe(path.join('..', '..', '..', 'blobs', sha256(weights)))
    expect(fs.readFileSync(link)).toEqual(weights)
    expect(fs.readlinkSync(path.join(snapshot, 'model_index.json'))).toBe(path.join('..', '..', 'blobs', gitSha1(file('test-org/sdxl-tiny', 'model_index.json'))))
    // The alternative (fp32) weights are never downloaded; no partial files remain.
    expect(fs.existsSync(path.join(snapshot, 'unet', 'diffusion_pytorch_model.safetensors'))).toBe(false)
    expect(fs.readdirSync(path.join(repoDir, 'blobs')).filter((b) => b.endsWith('.incomplete'))).toEqual([])
    // The LFS file went through the CDN redirect; the token reached the hub, never the CDN.
    expect(requests.filter((r) => r.server === 'cdn').map((r) => r.url)).toEqual([`/cdn/${sha256(weights)}`])
    expect(requests.filter((r) => r.server === 'hub').every((r) => r.authorization === `Bearer ${TOKEN}`)).toBe(true)
    expect(requests.filter((r) => r.server === 'cdn').every((r) => r.authorization === undefined)).toBe(true)
    // Progress: per file, ending at its size.
    const last = events.filter((e) => e.file === 'unet/diffusion_pytorch_model.fp16.safetensors').at(-1)
    expect(last).toEqual({ stage: 'download', model: 'tiny-sdxl', file: 'unet/diffusion_pytorch_model.fp16.safetensors', bytes: 300_000, totalBytes: 300_000 })

    // Resolving again finds it in the cache without a request.
    const again = await requestsDuring(() => resolveModel('checkpoint', 'tiny-sdxl', { env, manifest: MANIFEST }))
    expect(again.result).toBe(snapshot)
    expect(again.requests).toEqual([])
  })

  it('resumes a download after the connection drops mid-file, with a Range request', async () => {
    const { env, cache } = machine()
    const { result, requests } = await requestsDuring(() => resolveModel('checkpoint', 'tiny-single', { env, manifest: MANIFEST }))
    const content = file('test-org/single', 'model.safetensors')
    expect(result).toBe(path.join(cache, 'models--test-org--single', 'snapshots', commit(2), 'model.safetensors'))
    expect(fs.readFileSync(result)).toEqual(content)
    const cdn = requests.filter((r) => r.server === 'cdn')
    expect(cdn.map((r) => r.range)).toEqual([undefined, `bytes=${content.length / 2}-`])
    // Verified against the hub's LFS hash (the manifest has none for this file).
    expect(fs.readdirSync(path.join(cache, 'models--test-org--single', 'blobs'))).toEqual([sha256(content)])
  })

  it('rejects a file whose checksum does not match and leaves nothing under its name', async () => {
    const { env, cache } = machine()
    const error = await rejection(resolveModel('checkpoint', 'tiny-bad', { env, manifest: MANIFEST }))
    expect(error.code).toBe('BAD_WEIGHTS')
    const expected = sha256(file('test-org/broken', 'bad.safetensors'))
    expect(error.message).toContain('test-org/broken/bad.safetensors')
    expect(error.message).toContain(`expected sha256 ${expected}`)
    expect(error.message).toMatch(/got [0-9a-f]{64}/)
    const repoDir = path.join(cache, 'models--test-org--broken')
    expect(fs.readdirSync(path.join(repoDir, 'blobs'))).toEqual([])
    expect(fs.existsSync(path.join(repoDir, 'snapshots', commit(6), 'bad.safetensors'))).toBe(false)
  })

  it('offline (HF_HUB_OFFLINE=1): no request, an error listing what is missing and where it looked', async () => {
    const { env, cache } = machine({ HF_HUB_OFFLINE: '1', COMFYUI_MODELS: tempDir('comfy') })
    const { result: error, requests } = await requestsDuring(() => rejection(resolveModel('faceModels', 'tiny-faces', { env, manifest: MANIFEST })))
    expect(requests).toEqual([])
    expect(error.code).toBe('MODEL_NOT_FOUND')
    expect(error.message).toContain('HF_HUB_OFFLINE=1')
    expect(error.message).toContain('Missing: scrfd_10g_bnkps.onnx, 2d106det.onnx, glintr100.onnx')
    expect(error.message).toContain(path.join(cache, 'models--test-org--faces'))
    expect(error.message).toContain(path.join(env['COMFYUI_MODELS']!, 'insightface', 'models', 'antelopev2'))
    expect(error.message).toContain(path.join(env['HYPERLORA_HOME']!, 'tiny-faces'))
    expect(error.message).toContain('hyperlora pull tiny-faces')
    // `download: false` works the same without the environment variable.
    const off = await rejection(resolveModel('faceModels', 'tiny-faces', { env: machine().env, manifest: MANIFEST, download: false }))
    expect(off.message).toContain('download: false')
  })

  it("reuses the user's existing Hugging Face cache without any request", async () => {
    const { env, cache } = machine({ HF_HUB_OFFLINE: '0' })
    // A cache as huggingface_hub leaves it, at another commit than the hub's current one.
    const repoDir = path.join(cache, 'models--test-org--clip')
    const old = commit(99)
    for (const name of ['config.json', 'model.safetensors']) {
      const content = file('test-org/clip', name)
      const blob = name.endsWith('.safetensors') ? sha256(content) : gitSha1(content)
      fs.mkdirSync(path.join(repoDir, 'blobs'), { recursive: true })
      fs.mkdirSync(path.join(repoDir, 'snapshots', old), { recursive: true })
      fs.writeFileSync(path.join(repoDir, 'blobs', blob), content)
      fs.symlinkSync(path.join('..', '..', 'blobs', blob), path.join(repoDir, 'snapshots', old, name))
    }
    fs.mkdirSync(path.join(repoDir, 'refs'))
    fs.writeFileSync(path.join(repoDir, 'refs', 'main'), old)
    const { result, requests } = await requestsDuring(() => resolveModel('clipVision', 'tiny-clip', { env, manifest: MANIFEST }))
    expect(result).toBe(path.join(repoDir, 'snapshots', old))
    expect(requests).toHaveLength(0)
    // Also by repo id, and listed as installed there.
    expect(await resolveModel('clipVision', 'test-org/clip', { env, manifest: MANIFEST })).toBe(result)
    const listing = await requestsDuring(() => listModels({ env, manifest: MANIFEST }))
    expect(listing.result.find((m) => m.name === 'tiny-clip')).toMatchObject({ installed: true, source: 'hf-cache', path: result, bytes: 50_000 + file('test-org/clip', 'config.json').length })
    expect(listing.requests).toEqual([])
  })

  it('a cached file with other content (another blob) is not taken for the model', async () => {
    const { env, cache } = machine()
    const repoDir = path.join(cache, 'models--test-org--faces', 'snapshots', commit(5))
    fs.mkdirSync(repoDir, { recursive: true })
    for (const f of ['scrfd_10g_bnkps.onnx', '2d106det.onnx', 'glintr100.onnx']) fs.writeFileSync(path.join(repoDir, f), bytes(10))
    const listed = (await listModels({ env, manifest: MANIFEST })).find((m) => m.name === 'tiny-faces')!
    expect(listed.installed).toBe(false)
    expect(listed.missing[0]).toBe('scrfd_10g_bnkps.onnx (10 bytes, expected 4000)')
    // Pulling replaces the wrong files with the right ones.
    const [pulled] = await pullModels(['tiny-faces'], { env, manifest: MANIFEST })
    expect(fs.readFileSync(path.join(pulled!.path, 'glintr100.onnx'))).toEqual(file('test-org/faces', 'glintr100.onnx'))
  })

  it('finds models in a ComfyUI models folder (option or COMFYUI_MODELS), without a request', async () => {
    const comfy = tempDir('comfy')
    const hyper = path.join(comfy, 'hyper_lora', 'hyper_lora', 'v1_fidelity')
    fs.mkdirSync(hyper, { recursive: true })
    for (const f of MANIFEST.models['tiny-hyper']!.files) fs.writeFileSync(path.join(hyper, path.basename(f.path)), file('test-org/hyper', f.path))
    fs.mkdirSync(path.join(comfy, 'checkpoints'))
    fs.writeFileSync(path.join(comfy, 'checkpoints', 'sdxl-tiny.safetensors'), bytes(100))
    const { env } = machine()
    const { result, requests } = await requestsDuring(async () => [
      await resolveModel('hyperlora', 'tiny-hyper', { env, manifest: MANIFEST, comfyuiModels: comfy }),
      await resolveModel('hyperlora', 'tiny-hyper', { env: { ...env, COMFYUI_MODELS: comfy }, manifest: MANIFEST }),
      // A diffusers model may sit in ComfyUI as one equivalent checkpoint file.
      await resolveModel('checkpoint', 'tiny-sdxl', { env, manifest: MANIFEST, comfyuiModels: comfy }),
    ])
    expect(result).toEqual([hyper, hyper, path.join(comfy, 'checkpoints', 'sdxl-tiny.safetensors')])
    expect(requests).toEqual([])
    const listed = await listModels({ env, manifest: MANIFEST, comfyuiModels: comfy })
    expect(listed.find((m) => m.name === 'tiny-hyper')).toMatchObject({ installed: true, source: 'comfyui', path: hyper })
  })

  it('finds models in HYPERLORA_HOME/<name>', async () => {
    const { env } = machine()
    const dir = path.join(env['HYPERLORA_HOME']!, 'tiny-single')
    fs.mkdirSync(dir, { recursive: true })
    fs.writeFileSync(path.join(dir, 'model.safetensors'), bytes(10))
    expect(await resolveModel('checkpoint', 'tiny-single', { env, manifest: MANIFEST })).toBe(path.join(dir, 'model.safetensors'))
  })

  it('resolves repo ids: manifest repos, other folders and files by listing the repository', async () => {
    const { env, cache } = machine()
    const snapshot = (repo: string, n: number): string => path.join(cache, `models--${repo.replace('/', '--')}`, 'snapshots', commit(n))
    // A repo the manifest knows uses the manifest's files (the extra genderage.onnx is not fetched).
    expect(await resolveModel('faceModels', 'test-org/faces', { env, manifest: MANIFEST })).toBe(snapshot('test-org/faces', 5))
    expect(fs.readdirSync(snapshot('test-org/faces', 5)).sort()).toEqual(['2d106det.onnx', 'glintr100.onnx', 'scrfd_10g_bnkps.onnx'])
    // A folder the manifest does not name: the role's files in it.
    const edit = await resolveModel('hyperlora', 'test-org/hyper/v1_edit', { env, manifest: MANIFEST })
    expect(edit).toBe(path.join(snapshot('test-org/hyper', 3), 'v1_edit'))
    expect(fs.readdirSync(edit).sort()).toEqual(['hyper_lora_modules.json', 'hyper_lora_modules.safetensors', 'id_projector.safetensors', 'resampler.safetensors'])
    expect(fs.existsSync(path.join(snapshot('test-org/hyper', 3), 'v1_fidelity'))).toBe(false)
    // One file of a repo.
    const other = await resolveModel('checkpoint', 'test-org/extra/other.safetensors', { env, manifest: MANIFEST })
    expect(other).toBe(path.join(snapshot('test-org/extra', 7), 'other.safetensors'))
    expect(fs.readdirSync(snapshot('test-org/extra', 7))).toEqual(['other.safetensors'])
    // Ambiguous: two HyperLoRA folders.
    const ambiguous = await rejection(resolveModel('hyperlora', 'test-org/hyper', { env, manifest: MANIFEST }))
    expect(ambiguous.code).toBe('MODEL_NOT_FOUND')
    expect(ambiguous.message).toContain('name one: test-org/hyper/v1_edit, test-org/hyper/v1_fidelity')
    // Offline, a cached repo-id model is still found.
    expect(await resolveModel('hyperlora', 'test-org/hyper/v1_edit', { env: { ...env, HF_HUB_OFFLINE: '1' }, manifest: MANIFEST })).toBe(edit)
    const missing = await rejection(resolveModel('checkpoint', 'test-org/nothing', { env: { ...env, HF_HUB_OFFLINE: '1' }, manifest: MANIFEST }))
    expect(missing.code).toBe('MODEL_NOT_FOUND')
    const unknownRepo = await rejection(resolveModel('checkpoint', 'test-org/nothing', { env, manifest: MANIFEST }))
    expect(unknownRepo.message).toContain('not found')
  })

  it('explicit paths, unknown names, wrong roles', async () => {
    const { env } = machine()
    const dir = tempDir('explicit')
    expect(await resolveModel('faceModels', dir, { env, manifest: MANIFEST })).toBe(dir)
    expect((await rejection(resolveModel('faceModels', path.join(dir, 'nope'), { env, manifest: MANIFEST }))).code).toBe('MODEL_NOT_FOUND')
    expect((await rejection(resolveModel('faceModels', './nope', { env, manifest: MANIFEST }))).code).toBe('MODEL_NOT_FOUND')
    const unknown = await rejection(resolveModel('faceModels', 'nope', { env, manifest: MANIFEST }))
    expect(unknown.code).toBe('MODEL_NOT_FOUND')
    expect(unknown.message).toContain('tiny-faces')
    expect((await rejection(resolveModel('hyperlora', 'tiny-faces', { env, manifest: MANIFEST }))).code).toBe('INVALID_ARGUMENT')
    expect((await rejection(pullModels(['tiny-faces', 'nope'], { env, manifest: MANIFEST }))).code).toBe('MODEL_NOT_FOUND')
    // A repo path or manifest file that would leave the cache folder is refused before any request.
    expect((await rejection(resolveModel('faceModels', 'org/name/../../../etc', { env, manifest: MANIFEST }))).code).toBe('INVALID_ARGUMENT')
    const escaping = { ...MANIFEST, models: { evil: { ...MANIFEST.models['tiny-faces']!, files: [{ path: 'a/../../x.onnx', size: 1, sha256: null }] } } }
    expect((await rejection(resolveModel('faceModels', 'evil', { env, manifest: escaping }))).code).toBe('INVALID_ARGUMENT')
  })

  it('without the token a gated hub says so; an aborted call rejects with ABORTED', async () => {
    const { env } = machine()
    const denied = await rejection(resolveModel('clipVision', 'tiny-clip', { env: { ...env, HF_TOKEN: '' }, manifest: MANIFEST }))
    expect(denied.code).toBe('MODEL_NOT_FOUND')
    expect(denied.message).toContain('401')
    expect(denied.message).toContain('HF_TOKEN')
    const controller = new AbortController()
    controller.abort()
    const aborted = await rejection(resolveModel('clipVision', 'tiny-clip', { env, manifest: MANIFEST, signal: controller.signal }))
    expect(aborted.code).toBe('ABORTED')
    expect(aborted.name).toBe('AbortError')
  })

  it('aborting mid-download rejects with ABORTED and keeps the partial data, which the next call resumes', async () => {
    const { env, cache } = machine()
    const controller = new AbortController()
    // The transfer stalls halfway; the caller gives up a little after it started.
    const options = { env, manifest: MANIFEST, signal: controller.signal, onProgress: () => setTimeout(() => controller.abort(), 300) }
    const aborted = await rejection(resolveModel('checkpoint', 'tiny-slow', options))
    expect(aborted.code).toBe('ABORTED')
    const blob = path.join(cache, 'models--test-org--slow', 'blobs', sha256(file('test-org/slow', 'slow.safetensors')))
    expect(fs.existsSync(blob)).toBe(false)
    const kept = fs.statSync(`${blob}.incomplete`).size
    expect(kept).toBeGreaterThan(0)
    const { result, requests } = await requestsDuring(() => resolveModel('checkpoint', 'tiny-slow', { env, manifest: MANIFEST }))
    expect(fs.readFileSync(result)).toEqual(file('test-org/slow', 'slow.safetensors'))
    expect(requests.filter((r) => r.server === 'cdn').map((r) => r.range)).toEqual([`bytes=${kept}-`])
  })

  it('concurrent calls for the same model share one download', async () => {
    const { env } = machine()
    const { result, requests } = await requestsDuring(() => Promise.all([0, 1, 2].map(() => resolveModel('faceModels', 'tiny-faces', { env, manifest: MANIFEST }))))
    expect(new Set(result).size).toBe(1)
    expect(requests.filter((r) => r.server === 'cdn')).toHaveLength(3) // one per file, not per call
  })

  it('listModels: every manifest entry, installed or not', async () => {
    const { env } = machine()
    await pullModels(['tiny-clip'], { env, manifest: MANIFEST })
    const listed = await listModels({ env, manifest: MANIFEST })
    expect(listed.map((m) => m.name)).toEqual(Object.keys(MANIFEST.models))
    expect(listed.find((m) => m.name === 'tiny-clip')).toMatchObject({ role: 'clipVision', installed: true, source: 'hf-cache', isDefault: true })
    expect(listed.find((m) => m.name === 'tiny-sdxl')).toMatchObject({ installed: false, source: null, path: null, isDefault: false, bytes: expect.any(Number) })
    expect(listed.find((m) => m.name === 'tiny-single')).toMatchObject({ installed: false, bytes: null, missing: ['model.safetensors'] })
  })
})

/** Runs the CLI asynchronously (the hub answers from this process). */
function hyperlora(env: NodeJS.ProcessEnv, ...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const clean = Object.fromEntries(Object.entries(process.env).filter(([k]) => !/^(HF_|HUGGING_FACE|COMFYUI_|HYPERLORA_)/.test(k)))
  return new Promise((resolve) => {
    execFile('node', [cli, ...args], { env: { ...clean, ...env } }, (error, stdout, stderr) => {
      resolve({ code: error ? ((error as { code?: number }).code ?? 1) : 0, stdout, stderr })
    })
  })
}

describe('hyperlora pull / models', () => {
  let env: NodeJS.ProcessEnv
  beforeAll(() => {
    const manifest = path.join(tempDir('manifest'), 'manifest.json')
    fs.writeFileSync(manifest, JSON.stringify(MANIFEST))
    env = { ...machine().env, HYPERLORA_MANIFEST: manifest }
  })

  it('pull downloads named models with progress on stderr and a JSON summary', async () => {
    const r = await hyperlora(env, 'pull', 'tiny-clip', 'tiny-faces', '--json')
    expect(r.code, r.stderr).toBe(0)
    const pulled = JSON.parse(r.stdout)
    expect(pulled.map((p: { name: string }) => p.name)).toEqual(['tiny-clip', 'tiny-faces'])
    expect(pulled[0]).toMatchObject({ role: 'clipVision', source: 'hf-cache', downloadedBytes: expect.any(Number) })
    expect(r.stderr).toContain('downloading tiny-clip: model.safetensors (50.0 kB)')
    expect(r.stderr).toContain('downloaded  tiny-faces: glintr100.onnx')
  })

  it('pull without names gets the default set; --quiet prints nothing', async () => {
    const r = await hyperlora(env, 'pull', '--quiet')
    expect(r.code, r.stderr).toBe(0)
    expect(r.stdout).toBe('')
    expect(r.stderr).toBe('')
    const listed = JSON.parse((await hyperlora(env, 'models', '--json')).stdout) as { name: string; installed: boolean }[]
    expect(listed.filter((m) => m.installed).map((m) => m.name).sort()).toEqual(['tiny-clip', 'tiny-faces', 'tiny-hyper', 'tiny-single'])
  })

  it('models prints a table', async () => {
    const r = await hyperlora(env, 'models')
    expect(r.code, r.stderr).toBe(0)
    expect(r.stdout).toMatch(/^NAME\s+ROLE\s+INSTALLED\s+WHERE\s+SIZE\s+PATH/)
    expect(r.stdout).toMatch(/tiny-clip \*\s+clipVision\s+yes\s+hf-cache\s+50\.\d kB/)
    expect(r.stdout).toMatch(/tiny-bad\s+checkpoint\s+no\s+-\s+10\.0 kB to get\s+-/)
  })

  it('exit codes: 1 for engine errors (with the code), 2 for bad usage', async () => {
    const unknown = await hyperlora(env, 'pull', 'nope', '--json')
    expect(unknown.code).toBe(1)
    expect(JSON.parse(unknown.stdout).error.code).toBe('MODEL_NOT_FOUND')
    const bad = await hyperlora(env, 'pull', 'tiny-bad')
    expect(bad.code).toBe(1)
    expect(bad.stderr).toContain('error BAD_WEIGHTS')
    expect((await hyperlora(env, 'pull', '--bogus')).code).toBe(2)
    expect((await hyperlora(env, 'models', 'extra')).code).toBe(2)
    for (const command of ['pull', 'models']) {
      const help = await hyperlora(env, command, '--help')
      expect(help.code).toBe(0)
      expect(help.stdout).toContain(`Usage: hyperlora ${command}`)
    }
  })
})

describe('downloads from a server that stops answering', () => {
  /** Accepts connections and never sends a byte. */
  async function silentServer(): Promise<{ endpoint: string; connections: () => number; close: () => Promise<void> }> {
    const sockets: net.Socket[] = []
    const server = net.createServer((socket) => sockets.push(socket))
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
    const { port } = server.address() as net.AddressInfo
    return {
      endpoint: `http://127.0.0.1:${port}`,
      connections: () => sockets.length,
      close: async () => {
        for (const socket of sockets) socket.destroy()
        await new Promise((resolve) => server.close(resolve))
      },
    }
  }

  it('a server that accepts and then says nothing: each attempt times out, then one IO error names it', async () => {
    const silent = await silentServer()
    try {
      const env = { HF_ENDPOINT: silent.endpoint, HF_HOME: tempDir('hf-home'), HYPERLORA_HOME: tempDir('hl-home'), HYPERLORA_DOWNLOAD_TIMEOUT: '0.2' }
      const started = performance.now()
      const error = await rejection(pullModels(['tiny-clip'], { env, manifest: MANIFEST }))
      expect(error.code).toBe('IO')
      expect(error.message).toMatch(new RegExp(`failed after 5 attempts: ${silent.endpoint.slice(7)} sent nothing for 0.2 s \\(HYPERLORA_DOWNLOAD_TIMEOUT\\)`))
      expect(silent.connections()).toBe(5)
      expect(performance.now() - started).toBeLessThan(15_000)
    } finally {
      await silent.close()
    }
  })

  it('a transfer that stalls mid-body is given up after the idle timeout and resumed where it stopped', async () => {
    const repo: HubRepo = { repo: 'test-org/stall', commit: commit(9), files: [{ path: 'model.safetensors', content: bytes(300_000) }] }
    const stalling = await startHub({ repos: [repo], stallOnce: ['test-org/stall/model.safetensors'] })
    try {
      const hfHome = tempDir('hf-home')
      const env = { HF_ENDPOINT: stalling.endpoint, HF_HOME: hfHome, HYPERLORA_HOME: tempDir('hl-home'), HYPERLORA_DOWNLOAD_TIMEOUT: '0.3' }
      const result = await resolveModel('checkpoint', 'test-org/stall/model.safetensors', { env })
      expect(fs.readFileSync(result)).toEqual(repo.files[0]!.content)
      const ranges = stalling.requests.filter((r) => r.server === 'cdn').map((r) => r.range)
      expect(ranges).toEqual([undefined, 'bytes=150000-'])
    } finally {
      await stalling.close()
    }
  })

  it('the download bar shows speed and time left', () => {
    const meter = new RateMeter()
    expect(meter.bytesPerSecond()).toBeNull()
    meter.add(0, 0)
    meter.add(1000, 2_000_000)
    meter.add(2000, 5_000_000)
    expect(meter.bytesPerSecond()).toBe(2_500_000)
    expect(speedAndEta(meter.bytesPerSecond(), 10_000_000)).toBe('2.5 MB/s, 4s left')
    expect(speedAndEta(null, 10)).toBe('')
    expect([formatDuration(75), formatDuration(4000), formatDuration(null)]).toEqual(['1m15s', '1h06m', null])
  })
})
