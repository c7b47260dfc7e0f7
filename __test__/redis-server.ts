// A private redis-server for tests: a free port on 127.0.0.1, its own directory, stopped after.
// Jobs must survive a restart, so it keeps an append-only file (fsync on every write), no RDB
// snapshots.
import { spawn, type ChildProcess } from 'node:child_process'
import * as fs from 'node:fs'
import * as net from 'node:net'
import * as os from 'node:os'
import * as path from 'node:path'

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer()
    server.on('error', reject)
    server.listen(0, '127.0.0.1', () => {
      const port = (server.address() as net.AddressInfo).port
      server.close(() => resolve(port))
    })
  })
}

async function ping(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect(port, '127.0.0.1')
    let reply = ''
    socket.setTimeout(500, () => socket.destroy())
    socket.on('connect', () => socket.write('PING\r\n'))
    socket.on('data', (d) => {
      reply += d.toString()
      if (reply.includes('\r\n')) socket.end()
    })
    socket.on('close', () => resolve(reply.startsWith('+PONG')))
    socket.on('error', () => {})
  })
}

export class RedisServer {
  #process: ChildProcess | undefined

  private constructor(
    readonly port: number,
    readonly dir: string,
  ) {}

  get url(): string {
    return `redis://127.0.0.1:${this.port}`
  }

  static async start(): Promise<RedisServer> {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'hyperlora-redis-'))
    const server = new RedisServer(await freePort(), dir)
    await server.#launch()
    return server
  }

  async #launch(): Promise<void> {
    const args = ['--port', String(this.port), '--bind', '127.0.0.1', '--dir', this.dir, '--save', '', '--appendonly', 'yes', '--appendfsync', 'always', '--loglevel', 'warning', '--maxmemory-policy', 'noeviction']
    const child = spawn('redis-server', args, { stdio: ['ignore', 'ignore', 'inherit'] })
    this.#process = child
    let failed: Error | undefined
    child.on('error', (e) => (failed = new Error(`cannot run redis-server (Debian: apt-get install redis-server; .ci/run installs it): ${e.message}`)))
    const deadline = Date.now() + 15_000
    while (!(await ping(this.port))) {
      if (failed) throw failed
      if (child.exitCode !== null) throw new Error(`redis-server exited with ${child.exitCode}`)
      if (Date.now() > deadline) throw new Error('redis-server did not start in 15 s')
      await new Promise((r) => setTimeout(r, 50))
    }
  }

  /** Kills the server (SIGKILL: no goodbye) and starts it again on the same port and data. */
  async restart(downMs: number): Promise<void> {
    await this.#kill('SIGKILL')
    await new Promise((r) => setTimeout(r, downMs))
    await this.#launch()
  }

  async #kill(signal: NodeJS.Signals): Promise<void> {
    const child = this.#process
    if (!child || child.exitCode !== null || child.signalCode !== null) return
    const exited = new Promise((r) => child.once('exit', r))
    child.kill(signal)
    await exited
  }

  async stop(): Promise<void> {
    await this.#kill('SIGTERM')
    fs.rmSync(this.dir, { recursive: true, force: true })
  }
}
