/** Download speed and time left, for the progress display. */

/** Speeds are averaged over this window: steady, yet quick to follow a change. */
const WINDOW_MS = 5000

/** Bytes per second over the last few seconds, from running totals of new bytes. */
export class RateMeter {
  readonly #samples: { at: number; bytes: number }[] = []

  /** Records that `bytes` new bytes (a running total) had arrived at time `at` (ms). */
  add(at: number, bytes: number): void {
    this.#samples.push({ at, bytes })
    while (this.#samples.length > 2 && at - this.#samples[1]!.at >= WINDOW_MS) this.#samples.shift()
  }

  /** Bytes per second, or `null` before there is enough to tell. */
  bytesPerSecond(): number | null {
    const first = this.#samples[0]
    const last = this.#samples.at(-1)
    if (!first || !last || last.at - first.at < 250) return null
    return ((last.bytes - first.bytes) * 1000) / (last.at - first.at)
  }
}

/** `75` → `1m15s`, `4000` → `1h06m`; `null` for no estimate. */
export function formatDuration(seconds: number | null): string | null {
  if (seconds === null || !Number.isFinite(seconds) || seconds < 0) return null
  const s = Math.ceil(seconds)
  if (s < 60) return `${s}s`
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s`
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, '0')}m`
}
