// The README's install lines work: the package is not on the npm registry, so it is installed
// from the checkout, as a packed tarball (`npm pack <dir>`, then `npm install ./<tgz>`) or as a
// link (`npm install <dir>`). Each is run here in a fresh project, offline (no runtime
// dependencies), and the installed package is imported by its name.

import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ROOT } from "./support.mjs";

const dir = join(ROOT, "clients", "js");
const pkg = JSON.parse(readFileSync(join(dir, "package.json"), "utf8"));
const readme = readFileSync(join(dir, "README.md"), "utf8");
const npm = process.platform === "win32" ? "npm.cmd" : "npm";

function project(t) {
  const p = mkdtempSync(join(tmpdir(), "crier-install-"));
  t.after(() => rmSync(p, { recursive: true, force: true }));
  writeFileSync(join(p, "package.json"), JSON.stringify({ name: "app", version: "1.0.0", private: true, type: "module" }));
  return p;
}

function run(cwd, ...args) {
  return execFileSync(npm, [...args, "--offline", "--no-audit", "--no-fund", "--loglevel=error"], {
    cwd, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"], timeout: 120_000,
  });
}

function importsByName(cwd) {
  const out = execFileSync(process.execPath, ["--input-type=module", "-e",
    'import { Crier, tokenExpiry } from "crier-client"; console.log(typeof Crier, typeof tokenExpiry)'],
  { cwd, encoding: "utf8", timeout: 30_000 });
  assert.equal(out.trim(), "function function");
}

test("README: no registry install line; the tarball and link lines it shows", () => {
  const block = /```sh\n([\s\S]*?)```/.exec(readme)?.[1] ?? "";
  assert.doesNotMatch(block, /npm install crier-client\b/, "crier-client is not on the registry");
  assert.match(block, /^npm pack \/path\/to\/crier\/clients\/js\b/m);
  assert.match(block, new RegExp(`^npm install \\./crier-client-${pkg.version.replace(/\./g, "\\.")}\\.tgz\\b`, "m"));
  assert.match(block, /^npm install \/path\/to\/crier\/clients\/js\b/m);
});

test("npm pack <dir> + npm install ./<tgz> in a fresh project: imported as crier-client, with its types", (t) => {
  const p = project(t);
  const tgz = run(p, "pack", dir).trim().split("\n").pop();
  assert.equal(tgz, `crier-client-${pkg.version}.tgz`, "the file name the README installs");
  run(p, "install", `./${tgz}`);
  const app = JSON.parse(readFileSync(join(p, "package.json"), "utf8"));
  assert.equal(app.dependencies["crier-client"], `file:${tgz}`);
  importsByName(p);
  const installed = join(p, "node_modules", "crier-client");
  assert.ok(existsSync(join(installed, "src", "index.d.ts")), "types are in the tarball");
  assert.ok(!existsSync(join(installed, "test")), "the tests are not");
});

test("npm install <checkout dir> in a fresh project: imported as crier-client", (t) => {
  const p = project(t);
  run(p, "install", dir);
  importsByName(p);
});
