// The package as published: version follows crier's, entry points exist, no runtime dependency.

import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, existsSync } from "node:fs";
import { join } from "node:path";
import { ROOT } from "./support.mjs";

const dir = join(ROOT, "clients", "js");
const pkg = JSON.parse(readFileSync(join(dir, "package.json"), "utf8"));

test("package.json: crier's version, ESM exports with types, only the shipped files", () => {
  const cargo = readFileSync(join(ROOT, "Cargo.toml"), "utf8");
  const version = /\[workspace\.package\][^[]*?\nversion\s*=\s*"([^"]+)"/.exec(cargo)?.[1];
  assert.equal(pkg.version, version, "the npm version follows the workspace version in Cargo.toml");
  assert.equal(pkg.name, "crier-client");
  assert.equal(pkg.type, "module");
  assert.equal(pkg.dependencies, undefined, "no runtime dependencies");
  const entry = pkg.exports["."];
  for (const f of [entry.default, entry.types, pkg.types, pkg.main]) assert.ok(existsSync(join(dir, f)), `${f} exists`);
  for (const f of [entry.default, entry.types]) assert.ok(pkg.files.includes(f.replace(/^\.\//, "")), `${f} is in files`);
  assert.ok(pkg.engines.node.includes("20"));
});

test("the module imports nothing", async () => {
  const src = readFileSync(join(dir, "src", "index.js"), "utf8");
  assert.doesNotMatch(src, /^\s*import\s/m);
  assert.doesNotMatch(src, /\brequire\(/);
  const mod = await import("../src/index.js");
  assert.equal(typeof mod.Crier, "function");
  assert.equal(mod.default, mod.Crier);
  assert.equal(mod.tokenExpiry("x." + Buffer.from('{"exp":42}').toString("base64url") + ".y"), 42);
  assert.equal(mod.tokenExpiry("garbage"), null);
});
