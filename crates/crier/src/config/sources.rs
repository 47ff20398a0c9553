//! Gathering raw values: defaults, the TOML file, `CRIER_*` variables and flags, each
//! value remembering where it came from. Typing happens later, in `parse`.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

use clap::error::ErrorKind;
use clap::parser::ValueSource;

use super::ConfigError;
use super::table::{self, CONFIG_ARG, CONFIG_ENV, ENV_PREFIX, NAMESPACES, PROXY, SETTINGS, Shape, WEBHOOKS};

/// Where a raw value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Source {
    Default,
    File(PathBuf),
    Env(String),
    Flag(String),
}

impl fmt::Display for Source {
    /// The words inside the parentheses of an error line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => f.write_str("the default"),
            Source::File(p) => write!(f, "from {}", p.display()),
            Source::Env(v) => write!(f, "from {v}"),
            Source::Flag(flag) => write!(f, "from {flag}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum RawValue {
    Text(String),
    /// Only from a TOML array, and only for list settings.
    List(Vec<String>),
}

#[derive(Clone, Debug)]
pub(super) struct Raw {
    pub value: RawValue,
    pub source: Source,
}

/// The winning raw value of each setting that has one.
pub(super) type RawSettings = HashMap<&'static str, Raw>;

/// One `[namespaces.<name>]` table of the TOML file, as written (checked in `parse`).
#[derive(Clone, Debug)]
pub(super) struct RawNamespace {
    pub name: String,
    pub options: toml::Value,
    pub source: Source,
}

/// Collects raw values from all sources, highest precedence last. Problems go to
/// `problems`; only `--help` / `--version` end the collection early.
pub(super) fn collect<I, T>(
    args: I,
    env: &HashMap<String, String>,
    problems: &mut Vec<String>,
    namespaces: &mut Vec<RawNamespace>,
    proxy: &mut Option<RawNamespace>,
    webhooks: &mut Option<RawNamespace>,
) -> Result<RawSettings, ConfigError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let mut raw = RawSettings::new();
    for s in SETTINGS {
        if let Some(default) = s.default {
            raw.insert(s.name, Raw { value: RawValue::Text(default.to_owned()), source: Source::Default });
        }
    }

    let matches = match table::command().try_get_matches_from(args) {
        Ok(m) => Some(m),
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            return Err(ConfigError::Help(e.to_string()));
        }
        Err(e) => {
            problems.push(clap_problem(&e));
            None
        }
    };

    let file = match matches.as_ref().and_then(|m| m.get_one::<String>(CONFIG_ARG)) {
        Some(path) => Some((path.clone(), "--config")),
        None => env.get(CONFIG_ENV).map(|p| (p.clone(), CONFIG_ENV)),
    };
    if let Some((path, from)) = file {
        if path.trim().is_empty() {
            problems.push(format!("config: `{path}` (from {from}): expected a file name"));
        } else {
            read_file(Path::new(&path), from, &mut raw, problems, namespaces, proxy, webhooks);
        }
    }

    read_env(env, &mut raw);

    if let Some(m) = &matches {
        for s in SETTINGS {
            if m.value_source(s.name) != Some(ValueSource::CommandLine) {
                continue;
            }
            if let Some(v) = m.get_one::<String>(s.name) {
                raw.insert(s.name, Raw { value: RawValue::Text(v.clone()), source: Source::Flag(s.flag()) });
            }
        }
    }
    Ok(raw)
}

/// One line from a clap error: its message and tips, without the usage block.
fn clap_problem(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    let mut parts = Vec::new();
    // Flags other servers use for the address: clap's closest match by spelling (`--port` →
    // `--api-rate`) would send the user the wrong way.
    let address_flag = ["'--port'", "'--host'", "'--bind'", "'--addr'", "'--address'", "'-p'"]
        .into_iter()
        .find(|f| e.kind() == ErrorKind::UnknownArgument && rendered.contains(&format!("argument {f}")));
    for line in rendered.lines().map(str::trim) {
        if let Some(msg) = line.strip_prefix("error: ") {
            parts.push(msg.to_owned());
        } else if line.starts_with("tip:") && address_flag.is_none() {
            parts.push(line.to_owned());
        }
    }
    if address_flag.is_some() {
        parts.push("tip: the address and port are one setting: --listen 0.0.0.0:8080 (CRIER_LISTEN)".to_owned());
    }
    if parts.is_empty() {
        parts.push(e.kind().to_string());
    }
    format!("command line: {} (see --help)", parts.join("; "))
}

fn read_file(
    path: &Path,
    from: &str,
    raw: &mut RawSettings,
    problems: &mut Vec<String>,
    namespaces: &mut Vec<RawNamespace>,
    proxy: &mut Option<RawNamespace>,
    webhooks: &mut Option<RawNamespace>,
) {
    let shown = path.display();
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => {
            problems.push(format!("config: `{shown}` (from {from}): cannot read it: {e}"));
            return;
        }
    };
    let doc: toml::Table = match text.parse() {
        Ok(doc) => doc,
        Err(e) => {
            // Not the error's Display: it quotes the offending line, which may hold a secret.
            let at = match e.span() {
                Some(span) => {
                    let (line, column) = line_column(&text, span.start);
                    format!(" at line {line}, column {column}")
                }
                None => String::new(),
            };
            problems.push(format!("config: `{shown}` (from {from}): invalid TOML{at}: {}", e.message()));
            return;
        }
    };
    let source = Source::File(path.to_path_buf());
    for (key, value) in doc {
        if key == NAMESPACES {
            match value {
                toml::Value::Table(tables) => {
                    for (name, options) in tables {
                        namespaces.push(RawNamespace { name, options, source: source.clone() });
                    }
                }
                _ => problems.push(format!(
                    "{NAMESPACES}: expected tables like [{NAMESPACES}.chat] in {shown}, one per namespace"
                )),
            }
            continue;
        }
        if key == WEBHOOKS {
            // Typed (and its shape checked) in `parse`.
            *webhooks = Some(RawNamespace { name: key, options: value, source: source.clone() });
            continue;
        }
        if key == PROXY {
            // Typed (and its shape checked) in `parse`.
            *proxy = Some(RawNamespace { name: key, options: value, source: source.clone() });
            continue;
        }
        let Some(s) = table::find(&key) else {
            problems.push(format!(
                "{key}: unknown key in {shown}{}",
                suggest(&key, SETTINGS.iter().map(|s| s.name.to_owned()))
            ));
            continue;
        };
        match toml_to_raw(s.shape, value) {
            Ok(value) => {
                raw.insert(s.name, Raw { value, source: source.clone() });
            }
            Err((shown_value, problem)) => {
                let shown_value = if s.secret { "the value".to_owned() } else { format!("`{shown_value}`") };
                problems.push(format!("{key}: {shown_value} ({source}): {problem}"));
            }
        }
    }
}

/// 1-based line and column of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// A TOML value as a raw value; on a shape mismatch, the value as written and the problem.
fn toml_to_raw(shape: Shape, value: toml::Value) -> Result<RawValue, (String, &'static str)> {
    use toml::Value as V;
    match (shape, value) {
        (_, V::String(s)) => Ok(RawValue::Text(s)),
        (Shape::List, V::Array(items)) => {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    V::String(s) => out.push(s),
                    other => return Err((other.to_string(), "list items must be strings")),
                }
            }
            Ok(RawValue::List(out))
        }
        (_, V::Array(a)) => Err((V::Array(a).to_string(), "expected a single value, not a list")),
        (_, V::Table(t)) => {
            Err((V::Table(t).to_string().replace('\n', " ").trim().to_owned(), "expected a value, not a table"))
        }
        // Numbers, booleans and dates keep their TOML spelling; the typed pass judges them.
        (_, other) => Ok(RawValue::Text(other.to_string())),
    }
}

/// Takes the `CRIER_*` variables that name a setting. Others are skipped here (not an error:
/// Kubernetes service links and wrapper scripts put their own `CRIER_*` names in the
/// environment); [`unknown_env`] lists them for a warning.
fn read_env(env: &HashMap<String, String>, raw: &mut RawSettings) {
    for (key, value) in env.iter().filter(|(k, _)| k.starts_with(ENV_PREFIX) && k.as_str() != CONFIG_ENV) {
        if let Some(s) = SETTINGS.iter().find(|s| s.env() == *key) {
            raw.insert(s.name, Raw { value: RawValue::Text(value.clone()), source: Source::Env(key.clone()) });
        }
    }
}

/// One line per `CRIER_*` variable that names no setting, sorted, with a "did you mean" hint
/// when a setting's name is close.
pub(super) fn unknown_env(env: &HashMap<String, String>) -> Vec<String> {
    let mut unknown: Vec<&String> = env
        .keys()
        .filter(|k| k.starts_with(ENV_PREFIX) && k.as_str() != CONFIG_ENV)
        .filter(|k| !SETTINGS.iter().any(|s| s.env() == **k))
        .collect();
    unknown.sort();
    unknown
        .into_iter()
        .map(|key| {
            format!(
                "{key}: not a crier setting (from the environment), ignored{}",
                suggest(key, SETTINGS.iter().map(|s| s.env()).chain([CONFIG_ENV.to_owned()]))
            )
        })
        .collect()
}

/// `; did you mean `x`?` when a known name is close enough, else nothing.
pub(super) fn suggest(unknown: &str, known: impl Iterator<Item = String>) -> String {
    let unknown_lower = unknown.to_ascii_lowercase();
    let best = known.map(|k| (edit_distance(&unknown_lower, &k.to_ascii_lowercase()), k)).min_by_key(|(d, _)| *d);
    match best {
        Some((d, k)) if d <= 1.max(unknown.len() / 3) => format!("; did you mean `{k}`?"),
        _ => String::new(),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = Vec::with_capacity(b.len() + 1);
        cur.push(i + 1);
        for (j, cb) in b.iter().enumerate() {
            let substitute = prev[j] + usize::from(ca != *cb);
            cur.push(substitute.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}
