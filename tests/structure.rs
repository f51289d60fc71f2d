//! Checks on the shape of the code that no compiler enforces: no import circle between the
//! modules of one crate, and no long function without a reason. Run with the other tests
//! (`cargo test --workspace`); `cargo test -p moelab-cli --test structure -- --nocapture`
//! prints the module graph's size and the longest functions.
//!
//! The module graph: one node per source file (a module); an edge A -> B when A names a path
//! into B (`crate::b::X`, `super::X`, a child `b::X`, grouped `use` lists included). A parent's
//! `pub use child::X` is a re-export, not a dependency: paths through it resolve to the child.
//! Test modules (`#[cfg(test)] mod ...` to the end of the file) are left out, and so is the
//! crate root (lib.rs / main.rs): it holds the crate's error type, which every module names,
//! and the entry points, which name the modules.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Longest non-test function allowed without a comment saying why it must be one piece.
const MAX_FN_LINES: usize = 100;
/// The comment that allows a longer function (on one of the three lines above its `fn`).
const ONE_PIECE: &str = "one piece:";

/// A module: its path in the crate (`["trainer", "step"]`) and its code without tests.
struct Module {
    path: Vec<String>,
    file: PathBuf,
    code: String,
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().flatten().collect();
    entries.sort_by_key(|e| e.path());
    for e in entries {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module path of `file` under `src`.
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap();
    let mut parts: Vec<String> = rel
        .iter()
        .map(|s| s.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    if !matches!(stem, "mod" | "lib" | "main") {
        parts.push(stem.to_string());
    }
    parts
}

/// `text` with comments and the contents of string and char literals blanked (line breaks
/// kept, so line numbers stay), cut at the first `#[cfg(test)]` that opens a module.
fn code_without_tests(text: &str) -> String {
    let code = blank_literals(text);
    let lines: Vec<&str> = code.lines().collect();
    let mut out = String::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim_start().starts_with("#[cfg(test)]")
            && lines
                .get(i + 1)
                .is_some_and(|n| n.trim_start().starts_with("mod ") || n.contains(" mod "))
        {
            break;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Comments, strings (raw ones too) and char literals replaced by spaces.
fn blank_literals(text: &str) -> String {
    let c: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let blank = |out: &mut String, ch: char| out.push(if ch == '\n' { '\n' } else { ' ' });
    let mut i = 0;
    while i < c.len() {
        let next = c.get(i + 1).copied();
        if c[i] == '/' && next == Some('/') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if c[i] == '/' && next == Some('*') {
            while i < c.len() && !(c[i] == '*' && c.get(i + 1) == Some(&'/')) {
                blank(&mut out, c[i]);
                i += 1;
            }
            i += 2;
        } else if c[i] == 'r' && (next == Some('"') || next == Some('#')) && !ident_before(&c, i) {
            let mut j = i + 1;
            while c.get(j) == Some(&'#') {
                j += 1;
            }
            if c.get(j) != Some(&'"') {
                out.push(c[i]);
                i += 1;
                continue;
            }
            let hashes = j - i - 1;
            out.push_str("\"\"");
            j += 1;
            while j < c.len()
                && !(c[j] == '"' && (0..hashes).all(|h| c.get(j + 1 + h) == Some(&'#')))
            {
                blank(&mut out, c[j]);
                j += 1;
            }
            i = j + 1 + hashes;
        } else if c[i] == '"' {
            out.push_str("\"\"");
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' {
                    i += 1;
                }
                if let Some(&ch) = c.get(i) {
                    blank(&mut out, ch);
                }
                i += 1;
            }
            i += 1;
        } else if c[i] == '\'' && (c.get(i + 2) == Some(&'\'') || next == Some('\\')) {
            // A char literal ('x' or an escape); a lifetime has no closing quote.
            let mut j = i + 1;
            if c[j] == '\\' {
                j += 1;
            }
            j += 1;
            while j < c.len() && c[j] != '\'' {
                j += 1;
            }
            out.push_str("' '");
            i = j + 1;
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

fn ident_before(c: &[char], i: usize) -> bool {
    i > 0 && (c[i - 1].is_alphanumeric() || c[i - 1] == '_')
}

fn modules(src: &Path) -> Vec<Module> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files
        .into_iter()
        .filter(|f| !f.components().any(|c| c.as_os_str() == "bin"))
        .map(|file| Module {
            path: module_path(src, &file),
            code: code_without_tests(&std::fs::read_to_string(&file).unwrap()),
            file,
        })
        .collect()
}

/// Expands a `use` tree's text (`a::{b, c::{d}}`) into its paths.
fn expand_tree(prefix: &str, tree: &str, out: &mut Vec<String>) {
    let tree = tree.trim();
    if let Some(open) = tree.find('{') {
        let head = tree[..open].trim_end_matches("::");
        let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
        let base = join(prefix, head);
        let mut depth = 0;
        let mut start = 0;
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand_tree(&base, &inner[start..i], out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        expand_tree(&base, &inner[start..], out);
    } else if !tree.is_empty() {
        let path = tree.split(" as ").next().unwrap_or(tree).trim();
        out.push(join(prefix, path));
    }
}

fn join(a: &str, b: &str) -> String {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_string(),
        (_, true) => a.to_string(),
        _ => format!("{a}::{b}"),
    }
}

/// Every path the code names: `use` trees (expanded) and inline `x::y` paths.
fn named_paths(code: &str) -> (Vec<String>, Vec<String>) {
    let mut uses = Vec::new();
    let mut reexports = Vec::new();
    let mut rest = String::new();
    // `use` statements end at `;`; collect them whole (they may span lines).
    let mut i = 0;
    let bytes = code.as_bytes();
    while i < code.len() {
        let tail = &code[i..];
        let at_word = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        let pub_use = tail.starts_with("pub use ") || tail.starts_with("pub(crate) use ");
        if at_word && (tail.starts_with("use ") || pub_use) {
            let end = tail.find(';').unwrap_or(tail.len());
            let stmt = &tail[..end];
            let tree = &stmt[stmt.find("use ").unwrap() + 4..];
            let target = if pub_use { &mut reexports } else { &mut uses };
            expand_tree("", tree, target);
            i += end;
            continue;
        }
        rest.push(code[i..].chars().next().unwrap());
        i += code[i..].chars().next().unwrap().len_utf8();
    }
    // Inline paths: identifier chains joined by `::`.
    let mut start = None;
    for (i, c) in rest.char_indices() {
        let ident = c.is_ascii_alphanumeric() || c == '_' || c == ':';
        match (ident, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                let chain = rest[s..i].trim_matches(':');
                if chain.contains("::") {
                    uses.push(chain.to_string());
                }
                start = None;
            }
            _ => {}
        }
    }
    (uses, reexports)
}

/// The module a path names from `from` and the item it names there (if any), or `None`
/// outside the crate.
fn resolve(
    from: &[String],
    path: &str,
    known: &BTreeSet<Vec<String>>,
) -> Option<(Vec<String>, Option<String>)> {
    let segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
    let first = *segs.first()?;
    let mut abs: Vec<String> = match first {
        "crate" => Vec::new(),
        "self" => from.to_vec(),
        "super" => from[..from.len().saturating_sub(1)].to_vec(),
        _ => {
            let mut child = from.to_vec();
            child.push(first.to_string());
            if !known.contains(&child) {
                return None;
            }
            from.to_vec()
        }
    };
    let skip = usize::from(matches!(first, "crate" | "self" | "super"));
    let mut rest = segs[skip..].iter().peekable();
    while rest.peek() == Some(&&"super") {
        abs.pop();
        rest.next();
    }
    abs.extend(rest.map(|s| s.to_string()));
    let n = (0..=abs.len()).rev().find(|&n| known.contains(&abs[..n]))?;
    Some((abs[..n].to_vec(), abs.get(n).cloned()))
}

/// The crate's module graph: module -> the modules it names.
fn graph(mods: &[Module]) -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let known: BTreeSet<Vec<String>> = mods.iter().map(|m| m.path.clone()).collect();
    // Re-exports: (module, name) -> the module that defines it.
    let mut reexported: BTreeMap<Vec<String>, Vec<String>> = BTreeMap::new();
    for m in mods {
        for p in named_paths(&m.code).1 {
            if let Some((target, _)) = resolve(&m.path, &p, &known) {
                let name = p.rsplit("::").next().unwrap_or_default().to_string();
                let mut key = m.path.clone();
                key.push(name);
                reexported.insert(key, target);
            }
        }
    }
    let mut edges = BTreeMap::new();
    for m in mods {
        let mut to = BTreeSet::new();
        for p in named_paths(&m.code).0 {
            let Some((mut target, item)) = resolve(&m.path, &p, &known) else {
                continue;
            };
            // Follow a re-export: `crate::run::RunDir` is defined in run::run_dir.
            if let Some(item) = item {
                let mut key = target.clone();
                key.push(item);
                if let Some(def) = reexported.get(&key) {
                    target = def.clone();
                }
            }
            if target != m.path && !target.is_empty() && !m.path.is_empty() {
                to.insert(target);
            }
        }
        edges.insert(m.path.clone(), to);
    }
    edges
}

/// A cycle through `start`, if any (depth-first search).
fn cycle_from(
    start: &Vec<String>,
    edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
) -> Option<Vec<Vec<String>>> {
    let mut stack = vec![(start.clone(), vec![start.clone()])];
    let mut seen = BTreeSet::new();
    while let Some((node, trail)) = stack.pop() {
        for next in edges.get(&node).into_iter().flatten() {
            if next == start {
                return Some(trail);
            }
            if seen.insert(next.clone()) {
                let mut t = trail.clone();
                t.push(next.clone());
                stack.push((next.clone(), t));
            }
        }
    }
    None
}

fn crates() -> Vec<(String, PathBuf)> {
    let mut out: Vec<(String, PathBuf)> = std::fs::read_dir(workspace().join("crates"))
        .unwrap()
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                e.path().join("src"),
            )
        })
        .filter(|(_, src)| src.is_dir())
        .collect();
    out.sort();
    out
}

fn show(path: &[String]) -> String {
    if path.is_empty() {
        "crate".into()
    } else {
        path.join("::")
    }
}

/// An op and its own CUDA launcher may name each other (the one exception the design allows):
/// a circle of two modules, one of them under `cuda`.
fn allowed(cycle: &[Vec<String>]) -> bool {
    let under_cuda = |m: &Vec<String>| m.first().is_some_and(|n| n == "cuda");
    cycle.len() == 2 && cycle.iter().filter(|m| under_cuda(m)).count() == 1
}

#[test]
fn no_module_imports_a_module_that_imports_it_back() {
    let mut circles = Vec::new();
    let mut n_edges = 0;
    for (name, src) in crates() {
        let mods = modules(&src);
        let edges = graph(&mods);
        n_edges += edges.values().map(BTreeSet::len).sum::<usize>();
        let mut reported = BTreeSet::new();
        for m in &mods {
            if let Some(cycle) = cycle_from(&m.path, &edges) {
                let key: BTreeSet<_> = cycle.iter().cloned().collect();
                if !allowed(&cycle) && reported.insert(key) {
                    let names: Vec<String> = cycle.iter().map(|p| show(p)).collect();
                    circles.push(format!("{name}: {} -> {}", names.join(" -> "), names[0]));
                }
            }
        }
    }
    println!("{n_edges} module-to-module imports checked");
    assert!(
        circles.is_empty(),
        "import circles between modules:\n{}",
        circles.join("\n")
    );
}

/// Non-test functions: (file, line, name, lines, allowed by a comment).
fn long_functions() -> Vec<(PathBuf, usize, String, usize, bool)> {
    let mut out = Vec::new();
    for (_, src) in crates() {
        for m in modules(&src) {
            let raw = std::fs::read_to_string(&m.file).unwrap();
            let raw_lines: Vec<&str> = raw.lines().collect();
            let lines: Vec<&str> = m.code.lines().collect();
            for (i, line) in lines.iter().enumerate() {
                let t = line.trim_start();
                let Some(at) = t.find("fn ") else { continue };
                let head = &t[..at];
                if !head.split_whitespace().all(|w| {
                    matches!(
                        w,
                        "pub" | "pub(crate)" | "pub(super)" | "const" | "async" | "unsafe"
                    ) || w.starts_with("extern")
                }) {
                    continue;
                }
                let name: String = t[at + 3..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                // The body: from the first `{` after the signature to its matching `}`.
                let mut depth = 0i64;
                let mut opened = false;
                let mut end = None;
                'scan: for (j, l) in lines.iter().enumerate().skip(i) {
                    for c in l.chars() {
                        match c {
                            '{' => {
                                depth += 1;
                                opened = true;
                            }
                            '}' => depth -= 1,
                            ';' if !opened => break 'scan,
                            _ => {}
                        }
                        if opened && depth == 0 {
                            end = Some(j);
                            break 'scan;
                        }
                    }
                }
                let Some(end) = end else { continue };
                let n = end - i + 1;
                if n > MAX_FN_LINES {
                    let why = raw_lines[i.saturating_sub(3)..i]
                        .iter()
                        .any(|l| l.contains(ONE_PIECE));
                    out.push((m.file.clone(), i + 1, name, n, why));
                }
            }
        }
    }
    out
}

#[test]
fn no_function_runs_past_a_hundred_lines_without_a_reason() {
    let long = long_functions();
    for (file, line, name, n, why) in &long {
        println!(
            "{}:{line} {name}: {n} lines{}",
            file.strip_prefix(workspace()).unwrap_or(file).display(),
            if *why { " (says why)" } else { "" }
        );
    }
    let bad: Vec<String> = long
        .iter()
        .filter(|f| !f.4)
        .map(|(file, line, name, n, _)| format!("{}:{line} {name} ({n} lines)", file.display()))
        .collect();
    assert!(
        bad.is_empty(),
        "functions over {MAX_FN_LINES} lines without a `// {ONE_PIECE} ...` comment above them:\n{}",
        bad.join("\n")
    );
}
