/**
 * `hyperlora/queue`: portraits as jobs on Redis with BullMQ. Producers (`PortraitQueue`) need no
 * models; workers (`startWorker`, `hyperlora worker`) run one engine each and batch waiting jobs.
 * See docs/queue.md.
 *
 * @packageDocumentation
 */
export { PortraitJob, PortraitQueue, type PortraitQueueOptions, type QueuedGenerateOptions, type QueuedImage, type QueuedPhoto } from './producer.js'
export { startWorker, type PortraitWorker, type StartWorkerOptions, type WorkerEvent } from './worker.js'
export { DEFAULT_QUEUE_NAME, type Connection, type RedisConnectionOptions, type GenerateJobData, type IdentityJobData, type JobProgress } from './protocol.js'
