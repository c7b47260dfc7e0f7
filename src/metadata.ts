/**
 * Generation metadata in the form A1111, ComfyUI and civitai read: a `parameters` text chunk in
 * PNGs. sharp cannot write arbitrary PNG text chunks, so this adds one to its output.
 */
import { crc32 } from 'node:zlib'

const SAMPLER_NAMES: Record<string, string> = {
  euler: 'Euler',
  euler_ancestral: 'Euler a',
  dpmpp_2m: 'DPM++ 2M',
  dpmpp_2m_sde: 'DPM++ 2M SDE',
  ddim: 'DDIM',
}

export interface ParametersInfo {
  prompt: string
  negativePrompt: string
  steps: number
  sampler: string
  scheduler: string
  cfg: number
  seed: bigint
  width: number
  height: number
  /** Identity and LoRA weights, e.g. `identity: 0.85`. */
  loras: string[]
  strength?: number
}

/** A1111's `parameters` text: prompt, negative prompt, then one line of settings. */
export function a1111Parameters(p: ParametersInfo): string {
  const settings = [
    `Steps: ${p.steps}`,
    `Sampler: ${SAMPLER_NAMES[p.sampler] ?? p.sampler}`,
    `Schedule type: ${p.scheduler[0]!.toUpperCase()}${p.scheduler.slice(1)}`,
    `CFG scale: ${p.cfg}`,
    `Seed: ${p.seed}`,
    `Size: ${p.width}x${p.height}`,
    ...(p.strength === undefined ? [] : [`Denoising strength: ${p.strength}`]),
    ...(p.loras.length > 0 ? [`Lora weights: "${p.loras.join(', ')}"`] : []),
    'Version: hyperlora',
  ]
  const negative = p.negativePrompt ? `\nNegative prompt: ${p.negativePrompt}` : ''
  return `${p.prompt}${negative}\n${settings.join(', ')}`
}

function chunk(type: string, data: Buffer): Buffer {
  const head = Buffer.alloc(8)
  head.writeUInt32BE(data.length, 0)
  head.write(type, 4, 'latin1')
  const crc = Buffer.alloc(4)
  crc.writeUInt32BE(crc32(Buffer.concat([head.subarray(4), data])), 0)
  return Buffer.concat([head, data, crc])
}

/** Inserts a text chunk after IHDR: tEXt when the text is Latin-1, else iTXt (UTF-8). */
export function withPngText(png: Buffer, keyword: string, text: string): Buffer {
  const ihdrEnd = 8 + 8 + png.readUInt32BE(8) + 4
  const latin1 = /^[\u0000-\u00ff]*$/.test(text)
  const data = latin1
    ? Buffer.concat([Buffer.from(`${keyword}\0`, 'latin1'), Buffer.from(text, 'latin1')])
    : Buffer.concat([Buffer.from(`${keyword}\0\0\0\0\0`, 'latin1'), Buffer.from(text, 'utf8')])
  return Buffer.concat([png.subarray(0, ihdrEnd), chunk(latin1 ? 'tEXt' : 'iTXt', data), png.subarray(ihdrEnd)])
}
