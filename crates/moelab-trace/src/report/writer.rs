//! Writing a report folder: CSV/JSON/text files and plots, each recorded as it is written, plus
//! the cell formats and the file-name sanitiser every report shares.

use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Result, TraceError};
use crate::plot::{self, Heatmap, Lines};
use crate::safetensors_io;

/// Tracks written files under the report directory.
pub(crate) struct Out {
    pub(crate) dir: PathBuf,
    pub(crate) files: Vec<PathBuf>,
}

impl Out {
    /// Creates the report directory.
    pub(crate) fn new(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir).map_err(|e| TraceError::io("creating directory", dir, e))?;
        Ok(Out {
            dir: dir.to_path_buf(),
            files: Vec::new(),
        })
    }

    /// Writes a CSV table, quoting cells where needed.
    pub(crate) fn csv(&mut self, rel: &str, header: &[&str], rows: &[Vec<String>]) -> Result<()> {
        let mut text = header.join(",");
        text.push('\n');
        for row in rows {
            let cells: Vec<String> = row.iter().map(|c| csv_cell(c)).collect();
            text.push_str(&cells.join(","));
            text.push('\n');
        }
        self.text(rel, &text)
    }

    /// Writes pretty JSON.
    pub(crate) fn json<T: Serialize>(&mut self, rel: &str, value: &T) -> Result<()> {
        let path = self.dir.join(rel);
        let text = serde_json::to_string_pretty(value).map_err(|source| TraceError::Json {
            path: path.clone(),
            source,
        })?;
        self.text(rel, &text)
    }

    /// Writes a text file atomically, creating its folder.
    pub(crate) fn text(&mut self, rel: &str, text: &str) -> Result<()> {
        let path = self.dir.join(rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)
                .map_err(|e| TraceError::io("creating directory", parent, e))?;
        }
        safetensors_io::write_atomic(&path, text.as_bytes())?;
        self.files.push(path);
        Ok(())
    }

    /// Draws a heatmap as PNG + SVG; returns the PNG's path relative to the report.
    pub(crate) fn heatmap(&mut self, rel_stem: &str, h: &Heatmap<'_>) -> Result<String> {
        let stem = self.dir.join(rel_stem);
        self.ensure_parent(&stem)?;
        self.files.extend(plot::heatmap(&stem, h)?);
        Ok(format!("{rel_stem}.png"))
    }

    /// Draws a line plot as PNG + SVG; returns the PNG's path relative to the report.
    pub(crate) fn lines(&mut self, rel_stem: &str, l: &Lines<'_>) -> Result<String> {
        let stem = self.dir.join(rel_stem);
        self.ensure_parent(&stem)?;
        self.files.extend(plot::lines(&stem, l)?);
        Ok(format!("{rel_stem}.png"))
    }

    fn ensure_parent(&self, path: &Path) -> Result<()> {
        match path.parent() {
            Some(p) => {
                fs::create_dir_all(p).map_err(|e| TraceError::io("creating directory", p, e))
            }
            None => Ok(()),
        }
    }
}

/// Quotes a CSV cell when it contains a separator, quote or newline (RFC 4180).
fn csv_cell(c: &str) -> String {
    if c.contains([',', '"', '\n']) {
        format!("\"{}\"", c.replace('"', "\"\""))
    } else {
        c.to_string()
    }
}

/// Full-precision number, empty for undefined.
pub(crate) fn num(v: Option<f64>) -> String {
    v.map(|x| x.to_string()).unwrap_or_default()
}

/// Points of a per-layer series, skipping undefined values; x = block index.
pub(crate) fn layer_points(layers: &[usize], values: &[Option<f64>]) -> Vec<(f64, f64)> {
    layers
        .iter()
        .zip(values)
        .filter_map(|(&l, v)| v.map(|v| (l as f64, v)))
        .collect()
}

/// `name` with every character that is not safe in a file name on every platform (anything but
/// ASCII letters, digits, `-`, `_` and `.`) replaced by `_`; may be empty or start with `.`.
pub fn file_name_chars(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A name safe as a directory or file component: [`file_name_chars`], prefixed with `run` when
/// that would be empty or hidden (a leading `.`, which also rules out `.` and `..`).
pub fn slug(name: &str) -> String {
    let s = file_name_chars(name);
    if s.is_empty() || s.starts_with('.') {
        format!("run{s}")
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slug_keeps_safe_names_and_never_yields_a_hidden_or_empty_component() {
        assert_eq!(slug("no_code/seed-1.5"), "no_code_seed-1.5");
        assert_eq!(slug("a b,c"), "a_b_c");
        assert_eq!(slug(""), "run");
        assert_eq!(slug(".."), "run..");
        assert_eq!(slug("é"), "_");
        assert_eq!(file_name_chars("host.example"), "host.example");
        assert_eq!(file_name_chars(""), "");
    }

    #[test]
    fn csv_cells_with_separators_are_quoted() {
        assert_eq!(csv_cell("a,b"), "\"a,b\"");
        assert_eq!(csv_cell("say \"x\""), "\"say \"\"x\"\"\"");
        assert_eq!(csv_cell("plain"), "plain");
    }
}
