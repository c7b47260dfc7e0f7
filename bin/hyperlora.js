#!/usr/bin/env node
'use strict'
// Thin launcher: the CLI lives in dist/ (compiled from src/cli/).
let cli
try {
  cli = require('../dist/cli/index.js')
} catch (error) {
  if (error && error.code === 'MODULE_NOT_FOUND' && String(error.message).includes('dist/cli/index.js')) {
    console.error('hyperlora: the package is not built yet; run `npm install` (or `npm run build`) in its folder first.')
    process.exit(1)
  }
  throw error
}
cli.main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code
  },
  (error) => {
    console.error(error)
    process.exitCode = 1
  },
)
