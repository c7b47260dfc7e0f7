/**
 * One-at-a-time execution for calls on one native model. The native side would serialise them
 * anyway (behind a lock), but waiting there would park a libuv worker per caller and starve
 * everything else that uses the pool (sharp, fs); waiting here costs nothing.
 */
import { HyperLoraError } from './errors.js'

export class TaskQueue {
  /** Settles when the last queued task is done; never rejects. */
  #tail: Promise<void> = Promise.resolve()
  readonly #closing = new AbortController()

  /**
   * Runs `task` after every task queued before it. The task gets a signal that fires when the
   * caller's signal does or when the queue closes. A caller that aborts while waiting leaves the
   * queue at once.
   */
  run<T>(signal: AbortSignal | undefined, task: (signal: AbortSignal) => Promise<T>): Promise<T> {
    if (this.#closing.signal.aborted) return Promise.reject(new HyperLoraError('INVALID_ARGUMENT', 'the engine was disposed'))
    const combined = signal ? AbortSignal.any([signal, this.#closing.signal]) : this.#closing.signal
    const previous = this.#tail
    let release!: () => void
    this.#tail = new Promise<void>((resolve) => (release = resolve))
    return (async () => {
      try {
        await untilSettledOrAborted(previous, combined, this.#closing.signal)
        return await task(combined)
      } finally {
        // A task that left the queue early still holds its place until the one before it is done.
        void previous.then(release)
      }
    })()
  }

  /** Refuses new tasks, aborts the waiting and running ones, and resolves once none runs. */
  async close(): Promise<void> {
    this.#closing.abort()
    await this.#tail
  }
}

function aborted(disposed: boolean): HyperLoraError {
  return new HyperLoraError('ABORTED', disposed ? 'the engine was disposed' : 'the operation was aborted')
}

/** Waits for `previous`; rejects as soon as `signal` fires, leaving no listener behind. */
function untilSettledOrAborted(previous: Promise<unknown>, signal: AbortSignal, closing: AbortSignal): Promise<void> {
  if (signal.aborted) return Promise.reject(aborted(closing.aborted))
  return new Promise<void>((resolve, reject) => {
    const onAbort = (): void => reject(aborted(closing.aborted))
    signal.addEventListener('abort', onAbort, { once: true })
    void previous.then(() => {
      signal.removeEventListener('abort', onAbort)
      resolve()
    })
  })
}
