import * as path from 'node:path'

import { describe, expect, it } from 'vitest'

import { HyperLoraError, inspectWeights, type ProgressEvent } from '../src/index.js'
import { sparseSafetensors, tempDir } from './helpers.js'

// Hashing 2 GiB takes a few seconds on any machine: long enough to watch the event loop.
const big = sparseSafetensors(path.join(tempDir('async'), 'big.safetensors'), 2 * 1024 ** 3)

describe('native calls run off the event loop', () => {
  it('keeps JavaScript timers firing during a multi-second native task, with progress', async () => {
    let ticks = 0
    const timer = setInterval(() => ticks++, 10)
    const events: ProgressEvent[] = []
    const started = performance.now()
    const index = await inspectWeights(big, { sha256: true, onProgress: (e) => events.push(e) })
    const elapsed = performance.now() - started
    clearInterval(timer)

    expect(index.sha256).toMatch(/^[0-9a-f]{64}$/)
    expect(elapsed).toBeGreaterThan(500)
    // A blocked loop would fire the timer at most once; a free one ~elapsed/10 times.
    expect(ticks).toBeGreaterThan(elapsed / 10 / 4)
    expect(events.length).toBeGreaterThan(10)
    expect(events.every((e) => e.stage === 'hash')).toBe(true)
    const steps = events.map((e) => e.step)
    expect(steps).toEqual([...steps].sort((a, b) => a - b))
    expect(events.at(-1)).toMatchObject({ step: index.fileSize, totalSteps: index.fileSize })
  })

  it('rejects with an AbortError soon after the signal aborts', async () => {
    const controller = new AbortController()
    const started = performance.now()
    setTimeout(() => controller.abort(), 100)
    const error = await inspectWeights(big, { sha256: true, signal: controller.signal }).then(
      () => undefined,
      (e: unknown) => e,
    )
    expect(error).toBeInstanceOf(HyperLoraError)
    expect((error as HyperLoraError).name).toBe('AbortError')
    expect((error as HyperLoraError).code).toBe('ABORTED')
    expect(performance.now() - started).toBeLessThan(1500)
  })

  it('rejects at once when the signal is already aborted', async () => {
    const error = await inspectWeights(big, { signal: AbortSignal.abort() }).catch((e: unknown) => e)
    expect((error as HyperLoraError).name).toBe('AbortError')
  })
})
