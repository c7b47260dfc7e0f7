/** `hyperlora worker --redis redis://…`: serve the queue's jobs until SIGTERM or SIGINT. */
import { startWorker } from '../queue/worker.js'
import { engineModels, type CommandValues } from './commands.js'
import { usageError } from './flags.js'

function count(values: CommandValues, flag: string, fallback: number): number {
  const given = values[flag]
  if (given === undefined) return fallback
  const n = typeof given === 'string' && /^\d+$/.test(given) ? Number(given) : NaN
  if (!Number.isSafeInteger(n) || n < 1) throw usageError(`--${flag} must be a positive whole number, got '${String(given)}'`)
  return n
}

/** Runs until a signal: then stops taking jobs, finishes the batch in hand and exits. */
export async function workerCommand(values: CommandValues, log: (line: string) => void): Promise<void> {
  const redis = values['redis']
  if (typeof redis !== 'string') throw usageError('worker needs --redis redis://host:port')
  const outputDir = values['output-dir']
  const queue = values['queue']
  const worker = await startWorker({
    connection: redis,
    models: await engineModels(values),
    maxBatchSize: count(values, 'max-batch-size', 4),
    concurrency: count(values, 'concurrency', 1),
    lockDuration: count(values, 'lock-duration', 30_000),
    ...(typeof outputDir === 'string' && { outputDir }),
    ...(typeof queue === 'string' && { name: queue }),
    onEvent: (e) => {
      if (e.type === 'ready') log(`worker ${process.pid} ready on ${e.device}`)
      else if (e.type === 'batch') log(`batch of ${e.jobs.length}: ${e.jobs.join(' ')}`)
      else if (e.type === 'failed') log(`failed ${e.job}: ${e.reason}`)
      else if (e.type === 'error') log(`error: ${e.message}`)
    },
  })
  await new Promise<void>((resolve) => {
    const stop = (signal: string): void => {
      log(`${signal}: finishing the jobs in hand`)
      resolve()
    }
    process.once('SIGTERM', () => stop('SIGTERM'))
    process.once('SIGINT', () => stop('SIGINT'))
  })
  await worker.close()
  log('worker closed')
}
