/** The CLI's progress display: one redrawn line per stage on a terminal, nothing elsewhere. */

/** A progress report from any call (engine and native events alike). */
export interface StageEvent {
  stage: string
  step: number
  totalSteps: number
}

/** Bars appear only for work that has already taken this long, so quick commands stay quiet. */
const SHOW_AFTER_MS = 1000
const WIDTH = 24

/**
 * A callback that draws `stage [#####-----] step/total  1.2s` on `stream` when it is a terminal.
 * A stage's line is finished (newline) when the stage completes or the next one starts.
 */
export function progressBar(enabled: boolean, stream: NodeJS.WriteStream = process.stderr): ((e: StageEvent) => void) | undefined {
  if (!enabled || !stream.isTTY) return undefined
  const started = performance.now()
  let open: string | undefined
  return (e) => {
    const total = e.totalSteps
    const elapsed = performance.now() - started
    if (elapsed < SHOW_AFTER_MS && open === undefined) return
    if (open !== undefined && open !== e.stage) stream.write('\n')
    const fraction = total > 0 ? Math.min(1, e.step / total) : 1
    const filled = Math.round(fraction * WIDTH)
    const count = Number.isInteger(e.step) ? `${e.step}/${total}` : `${Math.round(fraction * 100)}%`
    stream.write(`\r${e.stage.padEnd(9)} [${'#'.repeat(filled)}${'-'.repeat(WIDTH - filled)}] ${count}  ${(elapsed / 1000).toFixed(1)}s`)
    open = e.stage
    if (fraction >= 1) {
      stream.write('\n')
      open = undefined
    }
  }
}
