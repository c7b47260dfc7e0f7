/** The per-platform packages that carry the prebuilt native engine, and this package's version. */
import * as fs from 'node:fs'
import * as path from 'node:path'

/** `napi.binaryName` of package.json: binaries are named `<it>.<platform>.node`. */
export const NAPI_BINARY = 'hyperlora'

/** The prebuilt engines published (package.json `napi.targets`), by `${platform}-${arch}`. */
export const PLATFORM_PACKAGES: Readonly<Record<string, string>> = {
  'linux-x64': 'hyperlora-linux-x64-gnu',
  'linux-arm64': 'hyperlora-linux-arm64-gnu',
  'darwin-arm64': 'hyperlora-darwin-arm64',
  'win32-x64': 'hyperlora-win32-x64-msvc',
}

/** Linux builds are for glibc; musl systems (Alpine) have none. */
function isGlibc(): boolean {
  const report = process.report?.getReport() as { header?: { glibcVersionRuntime?: string } } | undefined
  return typeof report?.header?.glibcVersionRuntime === 'string'
}

/** The package with this machine's prebuilt engine, or `null` when none is published. */
export function platformPackage(): string | null {
  const pkg = PLATFORM_PACKAGES[`${process.platform}-${process.arch}`]
  if (!pkg || (process.platform === 'linux' && !isGlibc())) return null
  return pkg
}

/** The version of this package (package.json), known even when the native engine is not. */
export function packageVersion(): string {
  const file = path.join(__dirname, '..', 'package.json')
  return (JSON.parse(fs.readFileSync(file, 'utf8')) as { version: string }).version
}
