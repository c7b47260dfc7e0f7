// ES module entry of `hyperlora/queue`: the same implementation as the CommonJS one.
export * from './index.js'
