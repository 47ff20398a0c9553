//! No import cycle between the modules of a crate (ARCHITECTURE.md): within every crate of the
//! workspace, a module that uses another (`crate::a::…`, `super::…`, outside its tests) is not
//! used back by it, directly or through others. A module's own submodules and ancestors do not
//! count (a parent declares its children; a child may use its parent's items).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Module = Vec<String>;
type Graph = BTreeMap<Module, BTreeSet<Module>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `src/a/b.rs` and `src/a/b/mod.rs` → `[a, b]`; `lib.rs`/`main.rs` → `[]`.
fn module_of(src: &Path, file: &Path) -> Module {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Module = rel.iter().map(|s| s.to_string_lossy().into_owned()).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
        parts.pop();
    }
    parts
}

/// The source a module's imports count from: comments dropped, and nothing from an inline
/// `#[cfg(test)] mod … {` on (tests may use anything).
fn code(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = String::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim() == "#[cfg(test)]" {
            let next = lines[i + 1..].iter().find(|l| !l.trim_start().starts_with("#["));
            if next.is_some_and(|l| l.starts_with("mod ") && l.trim_end().ends_with('{')) {
                break;
            }
        }
        out.push_str(line.split("//").next().unwrap_or(""));
        out.push('\n');
    }
    out
}

fn ident_at(s: &str) -> (&str, &str) {
    let end = s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(s.len());
    (&s[..end], &s[end..])
}

/// A path's segments from `s` on (`a::b::c`); a `{` group yields each item's path.
fn paths_at(s: &str) -> Vec<Module> {
    if let Some(group) = s.strip_prefix('{') {
        let body = &group[..group.find('}').unwrap_or(group.len())];
        return body.split(',').map(|item| paths_at(item.trim()).into_iter().next().unwrap_or_default()).collect();
    }
    let mut segs = Vec::new();
    let mut rest = s;
    loop {
        let (id, after) = ident_at(rest);
        if id.is_empty() {
            break;
        }
        segs.push(id.to_owned());
        match after.strip_prefix("::") {
            Some(more) if !more.starts_with('{') => rest = more,
            _ => break,
        }
    }
    vec![segs]
}

/// Every module path `text` (the code of `module`) refers to.
fn references(module: &Module, text: &str) -> Vec<Module> {
    let mut refs = Vec::new();
    for (i, _) in text.match_indices("crate::") {
        let before = text[..i].chars().last();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue; // `crier_core::…`-like: another crate
        }
        refs.extend(paths_at(&text[i + "crate::".len()..]));
    }
    let mut at = 0;
    while let Some(i) = text[at..].find("super::") {
        let start = at + i;
        let before = text[..start].chars().last();
        let mut rest = &text[start..];
        let mut ups = 0;
        while let Some(r) = rest.strip_prefix("super::") {
            ups += 1;
            rest = r;
        }
        at = text.len() - rest.len();
        if before.is_some_and(|c| c == ':' || c.is_ascii_alphanumeric()) || ups > module.len() {
            continue;
        }
        let base = &module[..module.len() - ups];
        for p in paths_at(rest) {
            refs.push(base.iter().cloned().chain(p).collect());
        }
    }
    refs
}

fn graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let texts: BTreeMap<Module, String> =
        files.iter().map(|f| (module_of(src, f), code(&std::fs::read_to_string(f).unwrap()))).collect();
    let modules: BTreeSet<&Module> = texts.keys().collect();
    let mut g = Graph::new();
    for (m, text) in &texts {
        let targets = g.entry(m.clone()).or_default();
        for r in references(m, text) {
            let Some(t) = (1..=r.len()).rev().map(|n| r[..n].to_vec()).find(|p| modules.contains(p)) else { continue };
            let related = t.starts_with(m) || m.starts_with(&t);
            if !related {
                targets.insert(t);
            }
        }
    }
    g
}

/// The groups of modules that reach each other (strongly connected, more than one module).
fn cycles(g: &Graph) -> Vec<BTreeSet<Module>> {
    let reach = |from: &Module| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.clone()];
        while let Some(m) = stack.pop() {
            for t in g.get(&m).into_iter().flatten() {
                if seen.insert(t.clone()) {
                    stack.push(t.clone());
                }
            }
        }
        seen
    };
    let all: BTreeMap<&Module, BTreeSet<Module>> = g.keys().map(|m| (m, reach(m))).collect();
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for (m, r) in &all {
        if done.contains(*m) {
            continue;
        }
        let scc: BTreeSet<Module> =
            all.iter().filter(|(n, rn)| r.contains(**n) && rn.contains(*m)).map(|(n, _)| (*n).clone()).collect();
        if scc.len() > 1 {
            done.extend(scc.iter().cloned());
            out.push(scc);
        }
    }
    out
}

fn name(m: &Module) -> String {
    if m.is_empty() { "crate".into() } else { m.join("::") }
}

#[test]
fn no_crate_has_an_import_cycle_between_its_modules() {
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut found = Vec::new();
    let mut checked = 0;
    for e in std::fs::read_dir(&crates).unwrap().flatten() {
        let src = e.path().join("src");
        if !src.is_dir() {
            continue;
        }
        let krate = e.file_name().to_string_lossy().into_owned();
        let g = graph(&src);
        checked += g.len();
        for c in cycles(&g) {
            let detail: Vec<String> = c
                .iter()
                .map(|m| {
                    let to: Vec<String> = g[m].iter().filter(|t| c.contains(*t)).map(name).collect();
                    format!("{} -> {}", name(m), to.join(", "))
                })
                .collect();
            found.push(format!("{krate}: {}", detail.join("; ")));
        }
    }
    assert!(checked > 100, "the crates' modules were found ({checked})");
    assert!(found.is_empty(), "import cycles between modules:\n{}", found.join("\n"));
}

#[test]
fn a_cycle_is_found() {
    let a =
        code("use crate::b::Thing;\nfn f() { super::c::g(); }\n#[cfg(test)]\nmod tests {\n    use crate::c::X;\n}\n");
    let refs = references(&vec!["a".into()], &a);
    assert_eq!(refs, vec![vec!["b".to_owned(), "Thing".into()], vec!["c".into(), "g".into()]]);
    let grouped = references(&vec!["b".into()], "use crate::{a, c::Y};");
    assert_eq!(grouped, vec![vec!["a".to_owned()], vec!["c".to_owned(), "Y".into()]]);
    let mut g = Graph::new();
    let m = |s: &str| vec![s.to_owned()];
    g.insert(m("a"), [m("b")].into());
    g.insert(m("b"), [m("a")].into());
    g.insert(m("c"), [m("a")].into());
    assert_eq!(cycles(&g), vec![[m("a"), m("b")].into()]);
}
