// The judge's half of a JavaScript/TypeScript test run: `node harness.js PROGRAM FD`.
//
// This module reads the per-run secret from the pipe FD before any candidate
// code runs and keeps it in this closure, which candidate code cannot name.
// The program is split at the tests marker: the candidate's code and the tests
// are compiled as two separate functions, so the tests see the candidate only
// through its entry point, wrapped so that the tests compare plain data.  The
// tests get a `require` of their own, and the assert module is locked before
// the candidate runs.  The secret is printed only after the tests returned.
'use strict';

const fs = require('fs');
const Module = require('module');
const path = require('path');
const util = require('util');
const vm = require('vm');

const program = process.argv[2];
const secretFd = Number(process.argv[process.argv.length - 1]);
const secret = fs.readFileSync(secretFd, 'utf8').trim();
fs.closeSync(secretFd);
process.argv.splice(1, process.argv.length - 1, program);

const MARKER = '\nvoid "rr-tests-begin";\n';
const writeSync = fs.writeSync;
const inspect = util.inspect;
const isProxy = util.types.isProxy;
const { defineProperty, getOwnPropertyDescriptor, getOwnPropertySymbols, getPrototypeOf } =
  Object;
const { ownKeys, apply } = Reflect;
const objectCreate = Object.create;
const arrayFrom = Array.from;
const { isDate, isRegExp, isBoxedPrimitive, isTypedArray } = util.types;
const MapPrototype = Map.prototype;
const SetPrototype = Set.prototype;
const MapEntries = Map.prototype.entries;
const SetValues = Set.prototype.values;
const SafeMap = Map;
const SafeSet = Set;
const isArray = Array.isArray;
const ObjectPrototype = Object.prototype;
const ArrayPrototype = Array.prototype;
const exit = process.exit;
let tampered = null;

class Tampered extends Error {}

function tamper(reason) {
  tampered = tampered || reason;
  throw new Tampered(reason);
}

// Each function of the assert module (and of assert.strict) becomes a fixed
// accessor: the tests always get the real one, and an attempt to replace it is
// recorded as tampering.
const asserts = require('assert');
for (const target of [asserts, asserts.strict]) {
  for (const key of ownKeys(target)) {
    const descriptor = getOwnPropertyDescriptor(target, key);
    if (!descriptor.configurable || typeof descriptor.value !== 'function') continue;
    const original = descriptor.value;
    defineProperty(target, key, {
      get: () => original,
      set: () => {
        tampered = tampered || `the program replaced assert.${String(key)}`;
      },
      enumerable: descriptor.enumerable,
      configurable: false,
    });
  }
}
const builtinModules = new Map([
  ['assert', asserts],
  ['node:assert', asserts],
  ['assert/strict', asserts.strict],
  ['node:assert/strict', asserts.strict],
]);

// Plain data of the result: arrays, objects (with their prototype, which a
// loose deepEqual ignores) and the entries of Maps and Sets are copied; a
// function (which `==` converts through its own code), a Proxy, an accessor or
// a symbol-keyed property is tampering.  Dates, regular expressions, boxed
// primitives and typed arrays are compared by assert through internal slots.
function plain(value, depth) {
  if (typeof value === 'function') tamper('the entry point returned a function');
  if (typeof value !== 'object' || value === null) return value;
  if (depth > 1000) tamper('the entry point returned data nested over 1000 deep');
  if (isProxy(value)) tamper('the entry point returned a Proxy');
  const proto = getPrototypeOf(value);
  if (proto === MapPrototype) {
    return new SafeMap(arrayFrom(apply(MapEntries, value, []), ([k, v]) => [
      plain(k, depth + 1),
      plain(v, depth + 1),
    ]));
  }
  if (proto === SetPrototype) {
    return new SafeSet(arrayFrom(apply(SetValues, value, []), (v) => plain(v, depth + 1)));
  }
  if (isDate(value) || isRegExp(value) || isBoxedPrimitive(value) || isTypedArray(value)) {
    return value;
  }
  const array = isArray(value) && proto === ArrayPrototype;
  if (getOwnPropertySymbols(value).length) tamper('the result has symbol-keyed properties');
  const copy = array ? [] : objectCreate(proto);
  for (const key of ownKeys(value)) {
    const descriptor = getOwnPropertyDescriptor(value, key);
    if (!('value' in descriptor)) tamper(`the result has an accessor property ${key}`);
    if (array && key === 'length') {
      copy.length = descriptor.value; // holes at the end count too
      continue;
    }
    defineProperty(copy, key, {
      value: plain(descriptor.value, depth + 1),
      writable: true,
      enumerable: descriptor.enumerable,
      configurable: true,
    });
  }
  return copy;
}

function plainResults(entry) {
  if (typeof entry !== 'function') return entry;
  return function (...args) {
    return plain(apply(entry, this, args), 0);
  };
}

function fail(error) {
  const text = error instanceof Tampered ? '' : inspect(error);
  if (text) writeSync(2, text + '\n');
  if (tampered) writeSync(2, `rr-tampered: ${tampered}\n`);
  exit.call(process, 1);
}

const text = fs.readFileSync(program, 'utf8');
const split = text.lastIndexOf(MARKER);
const code = text.slice(0, split);
const tests = text.slice(split + MARKER.length);
const entryName = /\bcandidate\s*=\s*([A-Za-z_$][\w$]*)\s*;/.exec(tests);
const params = ['exports', 'require', 'module', '__filename', '__dirname'];
const candidateRequire = Module.createRequire(program);
const testsRequire = (id) => builtinModules.get(id) || candidateRequire(id);
const programModule = { exports: {} };
const COMPILE_ERROR_STATUS = 97; // the runner's: the program does not parse

function compile(source, parameters, lineOffset) {
  try {
    return vm.compileFunction(source, parameters, { filename: program, lineOffset });
  } catch (error) {
    if (!(error instanceof SyntaxError)) throw error;
    writeSync(2, inspect(error) + '\n');
    exit.call(process, COMPILE_ERROR_STATUS);
  }
}
const dirname = path.dirname(program);

try {
  if (entryName) {
    const name = entryName[1];
    const entryReturn = `\n;return typeof ${name} === 'undefined' ? undefined : ${name};`;
    compile(code + '\n' + tests, params, 0); // the whole program parses
    const candidate = compile(code + entryReturn, params, 0);
    const moduleArgs = [programModule.exports, candidateRequire, programModule, program, dirname];
    const entry = apply(candidate, programModule.exports, moduleArgs);
    const lineOffset = code.split('\n').length + 1;
    const testsFunction = compile(tests, [...params, name], lineOffset);
    if (tampered) tamper(tampered);
    const testsArgs = [programModule.exports, testsRequire, programModule, program, dirname];
    apply(testsFunction, programModule.exports, [...testsArgs, plainResults(entry)]);
  } else {
    // Tests that do not name an entry point run in the candidate's scope.
    const whole = compile(code + '\n' + tests, params, 0);
    const moduleArgs = [programModule.exports, candidateRequire, programModule, program, dirname];
    apply(whole, programModule.exports, moduleArgs);
  }
  if (tampered) tamper(tampered);
} catch (error) {
  fail(error);
}
writeSync(1, `\n${secret}\n`);
