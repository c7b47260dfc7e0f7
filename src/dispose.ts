/**
 * `Symbol.asyncDispose`, the method `await using` calls. Node 20 has it from 20.4 on; on the
 * earlier 20.x releases that `engines` allows it is defined here, as the registered symbol Node
 * itself uses, so TypeScript's `await using` helper and later Node agree on it. Imported for its
 * effect by every module whose classes have a `[Symbol.asyncDispose]` method (`engine.ts` gets it
 * through `pipeline.ts`), before those classes are defined.
 */
if (typeof Symbol.asyncDispose !== 'symbol') {
  Object.defineProperty(Symbol, 'asyncDispose', { value: Symbol.for('nodejs.asyncDispose') })
}

export {}
