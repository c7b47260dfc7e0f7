// ES module entry: the same implementation as the CommonJS one, so `instanceof HyperLoraError`
// holds whichever way a program imports the package.
export * from './index.js'
