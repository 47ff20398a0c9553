//! ARCHITECTURE.md stays a true map: every path, module and symbol it names in backticks still
//! exists in the repository. A rename or a move that forgets the map fails here, naming the
//! stale names.
//!
//! What a backticked span is taken for:
//! - a path (it has a `/` or a file extension): some file or directory of the repository ends
//!   with it (paths may be relative to the crate or module the paragraph is about);
//! - a Rust path (`Hub::deliver`, `crier_protocol::ws::deflate`): its first segment and its last
//!   are each defined (`fn`, `struct`, `enum`, `trait`, `type`, `mod`, `const`, `static`, a
//!   module file, a crate, or an enum variant / field name found in the sources);
//! - a CamelCase name: defined as above;
//! - a snake_case name: a whole word somewhere in the sources (a function, a module, a setting,
//!   a field, a metric label, a Lua or JavaScript name);
//! - anything else (prose in backticks: commands, expressions, key formats) is not checked.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// Every file and directory of the repository (relative, `/`-separated), without build output.
fn files(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if matches!(name.as_str(), "target" | ".git" | "node_modules") {
                continue;
            }
            let rel = path.strip_prefix(root).unwrap().to_string_lossy().replace('\\', "/");
            if path.is_dir() {
                out.push(format!("{rel}/"));
                stack.push(path);
            } else {
                out.push(rel);
            }
        }
    }
    out
}

fn is_ident(s: &str) -> bool {
    !s.is_empty()
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
}

/// The words of the sources, and the names they define.
struct Index {
    words: HashSet<String>,
    defined: HashSet<String>,
    /// The sources' text, for routes (`/api/v1/info`) and other literal strings.
    text: String,
}

/// Names the map takes from dependencies, not from this repository.
const EXTERNAL: &[&str] = &["UpgradeableConnection"];

fn index(root: &Path, files: &[String]) -> Index {
    let mut words = HashSet::new();
    let mut defined: HashSet<String> = EXTERNAL.iter().map(|s| s.to_string()).collect();
    let mut all = String::new();
    const KEYWORDS: [&str; 9] = ["fn", "struct", "enum", "trait", "type", "mod", "const", "static", "macro_rules!"];
    for f in files {
        let ext = f.rsplit('.').next().unwrap_or("");
        // Not the map itself, nor this test (its made-up names would count as found).
        if !matches!(ext, "rs" | "lua" | "js" | "toml" | "md" | "sh" | "html" | "py" | "conf")
            || f == "ARCHITECTURE.md"
            || f.ends_with("tests/architecture.rs")
        {
            continue;
        }
        // Module files and crates define their names.
        if let Some(stem) = f.strip_suffix(".rs") {
            let name = stem.rsplit('/').next().unwrap_or(stem);
            defined.insert(if name == "mod" { stem.rsplit('/').nth(1).unwrap_or(name) } else { name }.to_owned());
        }
        if let Some(krate) = f.strip_prefix("crates/").and_then(|r| r.strip_suffix("/Cargo.toml")) {
            defined.insert(krate.replace('-', "_"));
        }
        let Ok(text) = std::fs::read_to_string(root.join(f)) else { continue };
        if ext != "md" {
            all.push_str(&text);
        }
        let tokens: Vec<&str> = text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '!')).collect();
        for pair in tokens.windows(2) {
            let word = pair[1].trim_end_matches('!');
            if ext == "rs" && KEYWORDS.contains(&pair[0]) && is_ident(word) {
                defined.insert(word.to_owned());
            }
        }
        for t in tokens {
            let t = t.trim_end_matches('!');
            if is_ident(t) {
                words.insert(t.to_owned());
            }
        }
    }
    Index { words, defined, text: all }
}

/// Why `span` does not name something that exists, or `None` when it does (or is not a name).
fn stale(span: &str, files: &[String], ix: &Index) -> Option<String> {
    let span = span.trim_end_matches("()");
    let looks_like_path = !span.contains(char::is_whitespace)
        && !span.contains("::")
        && !span.contains(['{', '<', '*', '=', '(', ':', '?'])
        && (span.contains('/')
            || [".rs", ".md", ".toml", ".js", ".lua", ".json", ".conf", ".py", ".html"]
                .iter()
                .any(|e| span.ends_with(e)));
    if looks_like_path && span.starts_with('/') {
        // A route or a system path: a string the code uses.
        return (!ix.text.contains(span)).then(|| format!("`{span}` appears nowhere in the sources"));
    }
    if looks_like_path {
        let want = span.trim_start_matches("./");
        let found = files.iter().any(|f| {
            let f = f.as_str();
            f == want
                || f.trim_end_matches('/') == want.trim_end_matches('/')
                || f.ends_with(&format!("/{want}"))
                || f.trim_end_matches('/').ends_with(&format!("/{}", want.trim_end_matches('/')))
        });
        return (!found).then(|| format!("no file or directory `{span}`"));
    }
    let segments: Vec<&str> = span.split("::").collect();
    if segments.len() > 1 {
        if !segments.iter().all(|s| is_ident(s) || s.starts_with('{')) {
            return None;
        }
        let first = segments[0];
        let last = segments[segments.len() - 1];
        let known = |s: &str| ix.defined.contains(s) || (s == "crier");
        if EXTERNAL.contains(&first) {
            return None;
        }
        if !known(first) {
            return Some(format!("`{first}` (of `{span}`) is defined nowhere"));
        }
        if let Some(group) = last.strip_prefix('{').and_then(|l| l.strip_suffix('}')) {
            // `auth::{mint_hs256, generate_secret}`
            let missing: Vec<&str> =
                group.split(',').map(str::trim).filter(|n| !known(n) && !ix.words.contains(*n)).collect();
            return (!missing.is_empty()).then(|| format!("`{}` (of `{span}`) not found", missing.join(", ")));
        }
        if !(known(last) || (last.starts_with(char::is_uppercase) && ix.words.contains(last))) {
            return Some(format!("`{last}` (of `{span}`) is defined nowhere"));
        }
        return None;
    }
    if !is_ident(span) {
        return None;
    }
    if span.starts_with(char::is_uppercase) && span.chars().any(char::is_lowercase) {
        return (!ix.defined.contains(span) && !ix.words.contains(span))
            .then(|| format!("`{span}` is defined nowhere"));
    }
    (!ix.words.contains(span)).then(|| format!("`{span}` appears nowhere in the sources"))
}

#[test]
fn every_name_architecture_md_uses_exists() {
    let root = root();
    let doc = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let files = files(&root);
    let ix = index(&root, &files);
    let mut problems = Vec::new();
    let mut checked = 0;
    for (i, line) in doc.lines().enumerate() {
        // Code blocks (the diagram) are pictures, not names.
        let spans = line.split('`').skip(1).step_by(2);
        for span in spans {
            checked += 1;
            if let Some(why) = stale(span, &files, &ix) {
                problems.push(format!("ARCHITECTURE.md:{}: {why}", i + 1));
            }
        }
    }
    assert!(checked > 100, "the map names things: {checked} spans");
    assert!(problems.is_empty(), "ARCHITECTURE.md names what no longer exists:\n{}", problems.join("\n"));
}

/// The checker itself: a renamed symbol or a moved file is caught.
#[test]
fn stale_names_are_caught() {
    let root = root();
    let files = files(&root);
    let ix = index(&root, &files);
    assert_eq!(stale("crates/crier-core/src/hub.rs", &files, &ix), None);
    assert_eq!(stale("hub/subscribers.rs", &files, &ix), None);
    assert_eq!(stale("Hub::deliver", &files, &ix), None);
    assert_eq!(stale("crier_protocol::frames::encode_message", &files, &ix), None);
    assert!(stale("crates/crier-core/src/no_such_file.rs", &files, &ix).is_some());
    assert!(stale("Hub::no_such_method", &files, &ix).is_some());
    assert!(stale("NoSuchType", &files, &ix).is_some());
    assert!(stale("no_such_function_anywhere", &files, &ix).is_some());
    assert_eq!(stale("mean × (1 + threshold)", &files, &ix), None, "prose is not a name");
}
