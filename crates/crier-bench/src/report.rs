//! The report: a readable table on stdout and the same figures as JSON (`--json FILE`).

use std::path::Path;

use serde::Serialize;

use crate::gateway::GatewayInfo;
use crate::procfs::Machine;

#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    pub crier_bench_version: &'static str,
    pub started_at_unix: u64,
    pub command_line: Vec<String>,
    pub machine: Machine,
    pub gateway: GatewayInfo,
    pub params: serde_json::Value,
    pub results: serde_json::Value,
    pub notes: Vec<String>,
}

impl Report {
    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text + "\n")?;
        Ok(())
    }
}

/// Rows of `metric | value per column`: one column per step (rate or size).
pub struct Table {
    pub title: String,
    pub columns: Vec<String>,
    pub rows: Vec<(String, Vec<String>)>,
}

impl Table {
    pub fn new(title: impl Into<String>, columns: Vec<String>) -> Table {
        Table { title: title.into(), columns, rows: Vec::new() }
    }

    pub fn row(&mut self, name: &str, values: Vec<String>) {
        self.rows.push((name.to_owned(), values));
    }

    pub fn render(&self) -> String {
        let name_w = self.rows.iter().map(|(n, _)| n.len()).chain([self.title.len().min(40)]).max().unwrap_or(0);
        let mut widths: Vec<usize> = self.columns.iter().map(|c| c.len()).collect();
        for (_, vals) in &self.rows {
            for (i, v) in vals.iter().enumerate() {
                if i < widths.len() {
                    widths[i] = widths[i].max(v.len());
                }
            }
        }
        let mut out = format!("\n{}\n", self.title);
        let mut header = format!("  {:<name_w$}", "");
        for (c, w) in self.columns.iter().zip(&widths) {
            header.push_str(&format!("  {c:>w$}"));
        }
        out.push_str(header.trim_end());
        out.push('\n');
        let total: usize = 2 + name_w + widths.iter().map(|w| w + 2).sum::<usize>();
        out.push_str(&format!("  {}\n", "-".repeat(total.saturating_sub(2))));
        for (name, vals) in &self.rows {
            let mut line = format!("  {name:<name_w$}");
            for (v, w) in vals.iter().zip(&widths) {
                line.push_str(&format!("  {v:>w$}"));
            }
            out.push_str(&line);
            out.push('\n');
        }
        out
    }
}

/// Formats a number with thousands separators.
pub fn int(n: impl Into<f64>) -> String {
    let n: f64 = n.into();
    let neg = n < 0.0;
    let s = format!("{:.0}", n.abs());
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if neg { format!("-{out}") } else { out }
}

pub fn opt_f(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.digits$}"),
        _ => "n/a".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(int(1234567.0), "1,234,567");
        assert_eq!(int(-1000.0), "-1,000");
        assert_eq!(int(12.0), "12");
        assert_eq!(opt_f(None, 1), "n/a");
        let mut t = Table::new("t", vec!["a".into(), "bb".into()]);
        t.row("metric", vec!["1".into(), "22".into()]);
        assert!(t.render().contains("  metric  1  22\n"), "{}", t.render());
    }
}
