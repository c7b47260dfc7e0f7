/** File writes that never leave a truncated file under the final name. */
import * as fs from 'node:fs'

/** Writes next to the target, then renames: a reader never sees a half-written file, and a
 * failed write leaves nothing behind. */
export function writeAtomic(file: string, data: string | Buffer): void {
  const temp = `${file}.${process.pid}.tmp`
  try {
    fs.writeFileSync(temp, data)
    fs.renameSync(temp, file)
  } catch (error) {
    fs.rmSync(temp, { force: true })
    throw error
  }
}
