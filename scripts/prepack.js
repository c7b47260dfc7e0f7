#!/usr/bin/env node
'use strict'
// `npm pack` / `npm publish` never compile (scripts/build-if-stale.js steps aside for them): they
// ship what `npm run build:ts` (and, for the platform packages, the release build) made. This
// only refuses to pack a package whose compiled API is missing, which would install but not run.
const fs = require('node:fs')
const path = require('node:path')

const dist = path.resolve(__dirname, '..', 'dist')
const missing = ['index.js', 'index.mjs', 'index.d.ts', 'index.d.mts', 'cli/index.js'].filter((f) => !fs.existsSync(path.join(dist, f)))
if (missing.length > 0) {
  console.error(`hyperlora: dist/ lacks ${missing.join(', ')}: run 'npm run build:ts' before packing (packing never compiles)`)
  process.exitCode = 1
}
