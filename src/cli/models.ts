/** The CLI's `pull` and `models` commands. */
import * as path from 'node:path'

import { formatDuration, RateMeter } from './rate.js'
import { defaultModelNames, listModels, pullModels, type InstalledModel, type ModelEvent, type PulledModel, type ResolveOptions } from '../models/resolve.js'

/** The flags these commands read. */
export interface ModelCommandFlags {
  json: boolean
  quiet: boolean
  /** A ComfyUI `models/` folder (`--comfyui`). */
  comfyui?: string | undefined
}

/** `1234567` → `1.2 MB` (decimal units, as the hub shows sizes). */
export function formatBytes(bytes: number): string {
  const units = ['B', 'kB', 'MB', 'GB', 'TB']
  let value = bytes
  let unit = 0
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000
    unit++
  }
  return `${unit === 0 ? value : value.toFixed(1)} ${units[unit]}`
}

/** `12.3 MB/s, 1m05s left` once there is a speed to tell. */
export function speedAndEta(bytesPerSecond: number | null, remaining: number): string {
  if (bytesPerSecond === null) return ''
  const eta = bytesPerSecond > 0 ? formatDuration(remaining / bytesPerSecond) : null
  return `${formatBytes(bytesPerSecond)}/s${eta ? `, ${eta} left` : ''}`
}

/**
 * Download progress on stderr: one bar redrawn in place on a terminal (with speed and time
 * left), a line per file start and end otherwise (logs, CI).
 */
function progressReporter(): { onProgress: (e: ModelEvent) => void; finish: () => void } {
  const files = new Map<string, { bytes: number; total: number; resumedFrom: number }>()
  const meter = new RateMeter()
  const tty = process.stderr.isTTY === true
  let drawn = false
  const onProgress = (e: ModelEvent): void => {
    const key = `${e.model}\0${e.file}`
    const known = files.get(key)
    // Bytes already on disk from an earlier, interrupted run do not count towards the speed.
    files.set(key, { bytes: e.bytes, total: e.totalBytes, resumedFrom: known?.resumedFrom ?? e.bytes })
    if (!tty) {
      if (!known) process.stderr.write(`downloading ${e.model}: ${e.file} (${formatBytes(e.totalBytes)})\n`)
      if (e.bytes === e.totalBytes) process.stderr.write(`downloaded  ${e.model}: ${e.file}\n`)
      return
    }
    let done = 0
    let total = 0
    let fresh = 0
    for (const f of files.values()) {
      done += f.bytes
      total += f.total
      fresh += f.bytes - f.resumedFrom
    }
    meter.add(performance.now(), fresh)
    const fraction = total > 0 ? done / total : 1
    const width = 24
    const filled = Math.round(fraction * width)
    const speed = speedAndEta(meter.bytesPerSecond(), total - done)
    const line = `[${'#'.repeat(filled)}${'-'.repeat(width - filled)}] ${Math.floor(fraction * 100)}% ${formatBytes(done)}/${formatBytes(total)}${speed ? ` ${speed}` : ''} ${e.model}: ${path.posix.basename(e.file)}`
    process.stderr.write(`\r${line.slice(0, (process.stderr.columns || 80) - 1)}\x1b[K`)
    drawn = true
  }
  return { onProgress, finish: () => drawn && process.stderr.write('\n') }
}

function resolveOptions(flags: ModelCommandFlags): ResolveOptions {
  return flags.comfyui ? { comfyuiModels: path.resolve(flags.comfyui) } : {}
}

/** `hyperlora pull [names…]`: the default models when no name is given. */
export async function pullCommand(names: readonly string[], flags: ModelCommandFlags): Promise<PulledModel[]> {
  const options = resolveOptions(flags)
  const wanted = names.length > 0 ? names : defaultModelNames(options)
  const progress = flags.quiet ? undefined : progressReporter()
  let pulled: PulledModel[]
  try {
    pulled = await pullModels(wanted, { ...options, ...(progress && { onProgress: progress.onProgress }) })
  } finally {
    progress?.finish()
  }
  if (flags.json) console.log(JSON.stringify(pulled, null, 2))
  else if (!flags.quiet) {
    const width = Math.max(...pulled.map((p) => p.name.length))
    for (const p of pulled) {
      const fetched = p.downloadedBytes > 0 ? `, downloaded ${formatBytes(p.downloadedBytes)}` : ''
      console.log(`${p.name.padEnd(width)}  ${p.source} (${formatBytes(p.bytes)}${fetched})  ${p.path}`)
    }
  }
  return pulled
}

function sizeColumn(m: InstalledModel): string {
  if (m.installed) return formatBytes(m.bytes ?? 0)
  return m.bytes === null ? '?' : `${formatBytes(m.bytes)} to get`
}

/** `hyperlora models`: every manifest model, installed or not, where, and its size. */
export async function modelsCommand(flags: ModelCommandFlags): Promise<InstalledModel[]> {
  const models = await listModels(resolveOptions(flags))
  if (flags.json) {
    console.log(JSON.stringify(models, null, 2))
    return models
  }
  const rows = [
    ['NAME', 'ROLE', 'INSTALLED', 'WHERE', 'SIZE', 'PATH'],
    ...models.map((m) => [`${m.name}${m.isDefault ? ' *' : ''}`, m.role, m.installed ? 'yes' : 'no', m.source ?? '-', sizeColumn(m), m.path ?? '-']),
  ]
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => r[c]!.length)))
  for (const row of rows) console.log(row.map((cell, c) => (c === row.length - 1 ? cell : cell.padEnd(widths[c]!))).join('  '))
  console.log('\n* used when no model of that role is given; get them with: hyperlora pull')
  return models
}
