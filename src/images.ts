/** Image IO with sharp: decoding user pictures to RGB8 for the engine, encoding its output. */
import sharp from 'sharp'

import { HyperLoraError } from './errors.js'
import { withJpegComment, withPngText, withWebpComment } from './metadata.js'

/** An image: a file path, encoded bytes in any format sharp reads (JPEG, PNG, WebP, AVIF, TIFF,
 * …), or already-decoded RGB8 pixels. */
export type ImageInput = string | Buffer | Uint8Array | Rgb8

/** Encodings of generated pictures. */
export type ImageFormat = 'png' | 'jpeg' | 'webp'

/** Decoded pixels: packed 8-bit RGB, rows top to bottom. */
export interface Rgb8 {
  width: number
  height: number
  /** width × height × 3 bytes. */
  data: Buffer
}

/** Photos larger than this many pixels are refused rather than decoded (decompression bombs). */
export const MAX_INPUT_PIXELS = 100_000_000

/**
 * Decodes to packed RGB8: EXIF orientation applied, alpha flattened onto white, greyscale/CMYK
 * converted to sRGB. With `size`, centre-cropped and resized to exactly that size.
 */
export async function decodeRgb8(input: ImageInput, size?: { width: number; height: number }): Promise<Rgb8> {
  if (isRgb8(input)) {
    if (input.data.length !== input.width * input.height * 3) {
      throw new HyperLoraError('INVALID_ARGUMENT', `RGB8 image of ${input.width}x${input.height} needs ${input.width * input.height * 3} bytes, got ${input.data.length}`)
    }
    if (!size || (size.width === input.width && size.height === input.height)) return input
  }
  try {
    const source = isRgb8(input) ? sharp(input.data, { raw: { width: input.width, height: input.height, channels: 3 } }) : sharp(input, { limitInputPixels: MAX_INPUT_PIXELS })
    let image = source.rotate().flatten({ background: '#ffffff' }).toColourspace('srgb')
    if (size) image = image.resize(size.width, size.height, { fit: 'cover', kernel: 'lanczos3' })
    const { data, info } = await image.removeAlpha().raw().toBuffer({ resolveWithObject: true })
    if (info.channels !== 3) throw new Error(`decoded to ${info.channels} channels`)
    return { width: info.width, height: info.height, data }
  } catch (error) {
    const what = typeof input === 'string' ? input : isRgb8(input) ? `${input.width}x${input.height} RGB8 image` : `${input.byteLength}-byte buffer`
    // A photo path that does not exist is the caller's mistake, not a missing model.
    const missing = (error as NodeJS.ErrnoException).code === 'ENOENT' || /Input file is missing/.test(String(error))
    const reason = missing ? 'no such file' : (error as Error).message
    throw new HyperLoraError('INVALID_ARGUMENT', `cannot read image ${what}: ${reason}`, { cause: error })
  }
}

function isRgb8(input: ImageInput): input is Rgb8 {
  return typeof input === 'object' && !(input instanceof Uint8Array) && 'data' in input
}

/** Encodes RGB8 pixels. */
export async function encodeRgb8(image: Rgb8, format: ImageFormat): Promise<Buffer> {
  const pipeline = sharp(image.data, { raw: { width: image.width, height: image.height, channels: 3 } })
  switch (format) {
    case 'png':
      return pipeline.png().toBuffer()
    case 'jpeg':
      return pipeline.jpeg({ quality: 95 }).toBuffer()
    case 'webp':
      return pipeline.webp({ quality: 95 }).toBuffer()
  }
}

/** Encodes with generation metadata: a PNG text chunk, or the EXIF UserComment in JPEG/WebP. */
export async function encodeWithParameters(image: Rgb8, format: ImageFormat, parameters: string): Promise<Buffer> {
  if (format === 'webp') {
    // An EXIF placeholder makes sharp write the extended layout (VP8X with the EXIF flag).
    const raw = sharp(image.data, { raw: { width: image.width, height: image.height, channels: 3 } })
    return withWebpComment(await raw.webp({ quality: 95 }).withExif({ IFD0: { Software: 'hyperlora' } }).toBuffer(), parameters)
  }
  const encoded = await encodeRgb8(image, format)
  return format === 'png' ? withPngText(encoded, 'parameters', parameters) : withJpegComment(encoded, parameters)
}
