/**
 * Generation metadata in the form A1111, ComfyUI and civitai read: a `parameters` text chunk in
 * PNGs, the EXIF UserComment (`UNICODE` + UTF-16BE, as A1111 writes it) in JPEG and WebP. sharp
 * writes neither (its UserComment is ASCII only), so these add them to its output.
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
  /** More `Key: value` settings, e.g. the face refine pass's. */
  extra?: readonly string[]
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
    ...(p.extra ?? []),
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

/** A minimal little-endian EXIF block: IFD0 → Exif IFD → UserComment, in A1111's encoding. */
function exifUserComment(text: string): Buffer {
  const utf16be = Buffer.from(text, 'utf16le').swap16()
  const comment = Buffer.concat([Buffer.from('UNICODE\0', 'latin1'), utf16be])
  const tiff = Buffer.alloc(44)
  tiff.write('II', 0, 'latin1')
  tiff.writeUInt16LE(42, 2)
  tiff.writeUInt32LE(8, 4) // IFD0
  tiff.writeUInt16LE(1, 8)
  tiff.writeUInt16LE(0x8769, 10) // ExifIFDPointer, LONG
  tiff.writeUInt16LE(4, 12)
  tiff.writeUInt32LE(1, 14)
  tiff.writeUInt32LE(26, 18)
  tiff.writeUInt32LE(0, 22) // no IFD1
  tiff.writeUInt16LE(1, 26)
  tiff.writeUInt16LE(0x9286, 28) // UserComment, UNDEFINED
  tiff.writeUInt16LE(7, 30)
  tiff.writeUInt32LE(comment.length, 32)
  tiff.writeUInt32LE(44, 36)
  tiff.writeUInt32LE(0, 40)
  return Buffer.concat([Buffer.from('Exif\0\0', 'latin1'), tiff, comment])
}

/** JPEG segments carry at most 65533 payload bytes; longer texts are cut to fit. */
const JPEG_EXIF_MAX = 65533

/** Inserts an APP1 EXIF segment with `text` as UserComment after SOI (and after a JFIF APP0). */
export function withJpegComment(jpeg: Buffer, text: string): Buffer {
  let exif = exifUserComment(text)
  if (exif.length > JPEG_EXIF_MAX) exif = exifUserComment(text.slice(0, (JPEG_EXIF_MAX - 60) / 2))
  let at = 2
  if (jpeg[2] === 0xff && jpeg[3] === 0xe0) at = 4 + jpeg.readUInt16BE(4)
  const head = Buffer.from([0xff, 0xe1, 0, 0])
  head.writeUInt16BE(exif.length + 2, 2)
  return Buffer.concat([jpeg.subarray(0, at), head, exif, jpeg.subarray(at)])
}

/**
 * Replaces the EXIF chunk of an extended-format WebP (sharp writes one when asked for any EXIF,
 * with the VP8X flag set) with `text` as UserComment, keeping its `Exif\0\0` convention.
 */
export function withWebpComment(webp: Buffer, text: string): Buffer {
  const chunks: Buffer[] = []
  let found = false
  for (let at = 12; at + 8 <= webp.length; ) {
    const size = webp.readUInt32LE(at + 4)
    const end = at + 8 + size + (size & 1)
    if (webp.toString('latin1', at, at + 4) === 'EXIF') {
      const keepsPrefix = webp.toString('latin1', at + 8, at + 14) === 'Exif\0\0'
      const exif = keepsPrefix ? exifUserComment(text) : exifUserComment(text).subarray(6)
      const head = Buffer.alloc(8)
      head.write('EXIF', 0, 'latin1')
      head.writeUInt32LE(exif.length, 4)
      chunks.push(head, exif, Buffer.alloc(exif.length & 1))
      found = true
    } else {
      chunks.push(webp.subarray(at, end))
    }
    at = end
  }
  if (!found) throw new Error('withWebpComment: the WebP has no EXIF chunk to replace')
  const body = Buffer.concat(chunks)
  const riff = Buffer.alloc(12)
  riff.write('RIFF', 0, 'latin1')
  riff.writeUInt32LE(body.length + 4, 4)
  riff.write('WEBP', 8, 'latin1')
  return Buffer.concat([riff, body])
}
