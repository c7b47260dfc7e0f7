/**
 * Models named by a Hugging Face repository id that the manifest does not know: which of the
 * repository's files a role needs, and whether a folder on disk holds them.
 */
import * as fs from 'node:fs'
import * as path from 'node:path'

import { HyperLoraError } from '../errors.js'
import type { ModelRole } from './manifest.js'

/** The files each folder model must hold (a checkpoint is a diffusers folder or one `.safetensors`). */
const REQUIRED: Record<Exclude<ModelRole, 'checkpoint'>, readonly string[]> = {
  hyperlora: ['hyper_lora_modules.json', 'hyper_lora_modules.safetensors', 'id_projector.safetensors', 'resampler.safetensors'],
  clipVision: ['config.json', 'model.safetensors'],
  faceModels: ['scrfd_10g_bnkps.onnx', '2d106det.onnx', 'glintr100.onnx'],
  controlnet: ['config.json', 'diffusion_pytorch_model.safetensors'],
}

/** An InstantID folder (docs/instantid.md): IdentityNet and the face projection. */
const INSTANTID = ['ControlNetModel/config.json', 'ControlNetModel/diffusion_pytorch_model.safetensors', 'ip-adapter.bin']

/** Optional files of a HyperLoRA folder the engine reads when present. */
const HYPERLORA_OPTIONAL = ['base_resampler.safetensors', 'hyper_lora_config.json']

/** What the engine needs to find in a diffusers folder (it reports anything finer itself). */
const DIFFUSERS_MARKERS = ['model_index.json', 'unet/config.json']

/** Whether a path on disk looks loadable for the role; `null` if so, else what is missing. */
export function missingForRole(role: ModelRole, target: string): string[] | null {
  const stat = fs.statSync(target, { throwIfNoEntry: false })
  if (!stat) return [target]
  if (role === 'checkpoint') {
    if (stat.isFile()) return target.endsWith('.safetensors') ? null : [target]
    return DIFFUSERS_MARKERS.every((m) => fs.existsSync(path.join(target, m))) ? null : DIFFUSERS_MARKERS.filter((m) => !fs.existsSync(path.join(target, m)))
  }
  if (role === 'controlnet' && stat.isFile()) return target.endsWith('.safetensors') ? null : [target]
  if (!stat.isDirectory()) return [target]
  const required = role === 'controlnet' && fs.existsSync(path.join(target, 'ip-adapter.bin')) ? INSTANTID : REQUIRED[role]
  const missing = required.filter((f) => !fs.existsSync(path.join(target, f)))
  return missing.length === 0 ? null : missing
}

/** The files of a repository a role needs, and the path (relative to the repository) the engine loads. */
export interface Selection {
  files: string[]
  modelPath: string
}

function notFound(message: string): HyperLoraError {
  return new HyperLoraError('MODEL_NOT_FOUND', message)
}

/** Folders (relative to the repository) that directly hold `name`, the shallowest first. */
function foldersHolding(files: readonly string[], name: string): string[] {
  return files
    .filter((f) => path.posix.basename(f) === name)
    .map((f) => path.posix.dirname(f).replace(/^\.$/, ''))
    .sort((a, b) => a.split('/').length - b.split('/').length || a.localeCompare(b))
}

/** The one folder under `prefix` holding `marker`: the prefix itself, else a single subfolder. */
function pickFolder(repo: string, files: readonly string[], prefix: string, marker: string): string {
  const inside = foldersHolding(files, marker).filter((d) => prefix === '' || d === prefix || d.startsWith(`${prefix}/`))
  if (inside.includes(prefix)) return prefix
  if (inside.length === 1) return inside[0]!
  const at = `${repo}${prefix ? `/${prefix}` : ''}`
  if (inside.length === 0) throw notFound(`${at}: no ${marker} in this repository`)
  throw notFound(`${at} holds several models; name one: ${inside.map((d) => `${repo}/${d}`).join(', ')}`)
}

const PLAIN_WEIGHTS = /^[a-z_]+(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$/

/** A diffusers folder: configs, tokenizers and, per weighted component, the fp16 variant if there is one. */
function selectDiffusers(files: readonly string[], root: string): string[] {
  const at = (f: string): string => (root ? `${root}/${f}` : f)
  const inFolder = (folder: string): string[] =>
    files.filter((f) => path.posix.dirname(f) === (root ? `${root}/${folder}` : folder)).map((f) => path.posix.basename(f))
  const chosen = [at('model_index.json')]
  for (const folder of ['scheduler', 'tokenizer', 'tokenizer_2']) chosen.push(...inFolder(folder).map((n) => at(`${folder}/${n}`)))
  for (const folder of ['unet', 'vae', 'text_encoder', 'text_encoder_2']) {
    const names = inFolder(folder)
    const weights = names.filter((n) => n.includes('.safetensors'))
    const fp16 = weights.filter((n) => n.includes('.fp16'))
    const pick = fp16.some((n) => n.endsWith('.safetensors')) ? fp16 : weights.filter((n) => PLAIN_WEIGHTS.test(n))
    chosen.push(...['config.json', ...pick].map((n) => at(`${folder}/${n}`)))
  }
  return chosen.filter((f) => files.includes(f))
}

/**
 * Chooses the files of a repository (listed by the hub) that a role needs under `prefix`
 * (`''`, a folder, or a file).
 */
export function selectFiles(role: ModelRole, repo: string, files: readonly string[], prefix: string): Selection {
  if (files.includes(prefix)) return { files: [prefix], modelPath: prefix }
  const within = files.filter((f) => prefix === '' || f.startsWith(`${prefix}/`))
  if (within.length === 0) throw notFound(`${repo}/${prefix}: no such file or folder in the repository`)
  if (role === 'checkpoint') {
    if (within.includes(prefix ? `${prefix}/model_index.json` : 'model_index.json')) return { files: selectDiffusers(files, prefix), modelPath: prefix }
    const single = within.filter((f) => f.endsWith('.safetensors') && path.posix.dirname(f) === (prefix || '.'))
    if (single.length === 1) return { files: single, modelPath: single[0]! }
    const at = `${repo}${prefix ? `/${prefix}` : ''}`
    throw notFound(single.length === 0 ? `${at}: neither a diffusers folder nor a .safetensors checkpoint` : `${at} holds several checkpoints; name one: ${single.map((f) => `${repo}/${f}`).join(', ')}`)
  }
  const required = REQUIRED[role]
  const folder = pickFolder(repo, files, prefix, required.find((f) => f.endsWith('.safetensors') || f.endsWith('.onnx'))!)
  const wanted = role === 'hyperlora' ? [...required, ...HYPERLORA_OPTIONAL] : required
  const chosen = wanted.map((f) => (folder ? `${folder}/${f}` : f)).filter((f) => files.includes(f))
  const missing = required.filter((f) => !chosen.includes(folder ? `${folder}/${f}` : f))
  if (missing.length > 0) throw notFound(`${repo}/${folder}: not a ${role} model, it lacks ${missing.join(', ')}`)
  return { files: chosen, modelPath: folder }
}
