//! The docs check: every `moelab ...` command shown in a fenced code block of README.md or
//! docs/*.md is parsed by the binary's own parser ([`Cli`]), so a flag renamed or removed in the
//! code fails `cargo test` naming the file and line where the docs still show it.
//!
//! How a shown line becomes the words clap sees (as a shell would, to the extent docs need):
//! - a line ending in `\` continues on the next; the command is reported at its first line;
//! - a leading `$ ` prompt is dropped, and so is a `#` comment;
//! - `&&`, `||`, `;`, `|` and `&` separate commands; a redirection (`>`, `>>`, `<`, `2>`, `&>`)
//!   and its target are dropped;
//! - the command is the one whose program is `moelab` (or a path ending in `/moelab`), also after
//!   a launcher (`mpirun -n 2 moelab ...`, `/usr/bin/time -v moelab ...`) and inside a quoted
//!   argument (`sbatch --wrap "moelab ..."`);
//! - `$NAME` is replaced by its value where the same code block assigns it (`S="--set a=1"`; a
//!   word that is only `$NAME` splits into the value's words); any other variable or `$(...)`
//!   (set by the environment, e.g. `$SLURM_ARRAY_TASK_ID`) stands for one value and reads `1`;
//! - a line holding a placeholder, `<name>` or `...`, is skipped: it is a template, not a command.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::error::ErrorKind;
use clap::Parser;

use super::Cli;

/// One command shown in the docs.
#[derive(Debug, Clone, PartialEq)]
struct Shown {
    /// Where it is shown: `README.md:38`.
    place: String,
    /// The words after `moelab`.
    args: Vec<String>,
}

/// A word of a shell line, or an operator between commands.
#[derive(Debug, Clone, PartialEq)]
enum Word {
    /// A word; `quoted` when any of it was inside quotes.
    Text { text: String, quoted: bool },
    /// `&&`, `||`, `;`, `|`, `&`: ends a command.
    Separator,
}

/// The Markdown files whose commands are checked: README.md and docs/*.md.
fn doc_files(root: &Path) -> Vec<PathBuf> {
    let mut files = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .map(|dir| {
            dir.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "md"))
                .collect()
        })
        .unwrap_or_default();
    docs.sort();
    files.extend(docs);
    files
}

/// Every `moelab` command in the fenced code blocks of `text` (the file `name`).
fn shown_commands(name: &str, text: &str) -> Vec<Shown> {
    let mut shown = Vec::new();
    let mut in_block = false;
    let mut vars = BTreeMap::new();
    let mut pending: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let trimmed = raw.trim();
        if trimmed.starts_with("```") || trimmed.starts_with("~~~") {
            in_block = !in_block;
            vars.clear();
            pending = None;
            continue;
        }
        if !in_block {
            continue;
        }
        let (start, mut line) = pending.take().unwrap_or((i + 1, String::new()));
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                line.push_str(head);
                line.push(' ');
                pending = Some((start, line));
            }
            None => {
                line.push_str(trimmed);
                let place = format!("{name}:{start}");
                commands_of_line(&line, &place, &mut vars, &mut shown);
            }
        }
    }
    shown
}

/// Adds the `moelab` commands of one logical line; records the variables it assigns.
fn commands_of_line(
    line: &str,
    place: &str,
    vars: &mut BTreeMap<String, String>,
    shown: &mut Vec<Shown>,
) {
    let line = line.strip_prefix("$ ").unwrap_or(line);
    if is_template(line) {
        return;
    }
    let words = shell_words(line);
    for command in words.split(|w| *w == Word::Separator) {
        let mut texts: Vec<(&str, bool)> = command
            .iter()
            .filter_map(|w| match w {
                Word::Text { text, quoted } => Some((text.as_str(), *quoted)),
                Word::Separator => None,
            })
            .collect();
        if texts.first().is_some_and(|(w, _)| *w == "export") {
            texts.remove(0);
        }
        // Leading NAME=value words: a variable for later lines, or the command's environment.
        let assignments = texts.iter().take_while(|(w, _)| assignment(w).is_some());
        let n_assigned = assignments.clone().count();
        for (name, value) in assignments.filter_map(|(w, _)| assignment(w)) {
            if n_assigned == texts.len() {
                vars.insert(name.to_string(), value.to_string());
            }
        }
        let texts = &texts[n_assigned..];
        match moelab_position(texts) {
            Some(at) => {
                let args = texts[at + 1..]
                    .iter()
                    .flat_map(|(w, quoted)| expand(w, *quoted, vars))
                    .collect();
                shown.push(Shown {
                    place: place.to_string(),
                    args,
                });
            }
            // A quoted argument may itself be a command line (`sbatch --wrap "moelab ..."`).
            None => {
                for (w, _) in texts.iter().filter(|(w, q)| *q && w.contains("moelab ")) {
                    commands_of_line(w, place, vars, shown);
                }
            }
        }
    }
}

/// Whether a line shows a template rather than a command (`<name>` or `...`).
fn is_template(line: &str) -> bool {
    let angle = line.split('<').skip(1).any(|rest| {
        rest.split_once('>').is_some_and(|(inner, _)| {
            !inner.is_empty()
                && inner
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_- ".contains(c))
        })
    });
    angle || line.split_whitespace().any(|w| w.contains("..."))
}

/// `NAME=value` as (name, value).
fn assignment(word: &str) -> Option<(&str, &str)> {
    let (name, value) = word.split_once('=')?;
    let is_name = !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    is_name.then_some((name, value))
}

/// Index of the `moelab` program word: the first word, or the first after a launcher.
fn moelab_position(texts: &[(&str, bool)]) -> Option<usize> {
    const LAUNCHERS: [&str; 7] = [
        "mpirun", "mpiexec", "srun", "time", "env", "nice", "timeout",
    ];
    let program = |w: &str| w.rsplit('/').next().unwrap_or(w).to_string();
    let first = program(texts.first()?.0);
    if first == "moelab" {
        return Some(0);
    }
    if !LAUNCHERS.contains(&first.as_str()) {
        return None;
    }
    texts.iter().position(|(w, q)| !q && program(w) == "moelab")
}

/// A word after variable expansion: one word, or the value's words for an unquoted `$NAME`.
fn expand(word: &str, quoted: bool, vars: &BTreeMap<String, String>) -> Vec<String> {
    if let Some(name) = word.strip_prefix('$') {
        if let (false, Some(value)) = (quoted, vars.get(name.trim_matches(['{', '}']))) {
            return shell_words(value)
                .into_iter()
                .filter_map(|w| match w {
                    Word::Text { text, .. } => Some(text),
                    Word::Separator => None,
                })
                .collect();
        }
    }
    vec![substitute(word, vars)]
}

/// `word` with each `$NAME`, `${NAME}` or `$(...)` replaced by its value (`1` when unknown).
fn substitute(word: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = word;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, len) = if let Some(inner) = after.strip_prefix('(') {
            (None, inner.find(')').map_or(after.len(), |e| e + 2))
        } else if let Some(inner) = after.strip_prefix('{') {
            let end = inner.find('}').unwrap_or(inner.len());
            (Some(&inner[..end]), (end + 2).min(after.len()))
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (Some(&after[..end]), end)
        };
        let value = name.and_then(|n| vars.get(n)).map_or("1", String::as_str);
        out.push_str(value);
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

/// Splits a shell line into words and separators: quotes, backslash escapes, comments and
/// redirections (dropped with their target) as a POSIX shell reads them.
fn shell_words(line: &str) -> Vec<Word> {
    let mut words = Vec::new();
    let mut chars = line.chars().peekable();
    let mut current: Option<(String, bool)> = None;
    let mut skip_next_word = false;
    // Ends the word being read; a redirection's target is dropped.
    fn finish(current: &mut Option<(String, bool)>, words: &mut Vec<Word>, skip: &mut bool) {
        if let Some((text, quoted)) = current.take() {
            if !std::mem::take(skip) {
                words.push(Word::Text { text, quoted });
            }
        }
    }
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' => finish(&mut current, &mut words, &mut skip_next_word),
            '#' if current.is_none() => break,
            '\'' | '"' => {
                let word = current.get_or_insert_with(|| (String::new(), true));
                word.1 = true;
                while let Some(q) = chars.next() {
                    match q {
                        _ if q == c => break,
                        '\\' if c == '"' => word.0.extend(chars.next()),
                        _ => word.0.push(q),
                    }
                }
            }
            '\\' => current
                .get_or_insert_with(|| (String::new(), false))
                .0
                .extend(chars.next()),
            '>' | '<' => {
                // A file descriptor before the operator (`2>`) belongs to it.
                if current
                    .as_ref()
                    .is_some_and(|(t, q)| !q && t.chars().all(|d| d.is_ascii_digit()))
                {
                    current = None;
                }
                finish(&mut current, &mut words, &mut skip_next_word);
                while chars.next_if(|&n| n == '>' || n == '&').is_some() {}
                // `2>&1` names a descriptor, not a file.
                if chars.next_if(|n| n.is_ascii_digit()).is_none() {
                    skip_next_word = true;
                }
            }
            '&' if chars.peek() == Some(&'>') => {
                chars.next();
                finish(&mut current, &mut words, &mut skip_next_word);
                skip_next_word = true;
            }
            '&' | '|' | ';' => {
                finish(&mut current, &mut words, &mut skip_next_word);
                chars.next_if(|&n| n == c);
                words.push(Word::Separator);
            }
            _ => current
                .get_or_insert_with(|| (String::new(), false))
                .0
                .push(c),
        }
    }
    finish(&mut current, &mut words, &mut skip_next_word);
    words
}

/// Why clap refuses `shown`, or None when it parses (an explicit --help or --version parses).
fn refusal(shown: &Shown) -> Option<String> {
    let argv = std::iter::once("moelab".to_string()).chain(shown.args.iter().cloned());
    match Cli::try_parse_from(argv) {
        Ok(_) => None,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => None,
        Err(e) => {
            let message = e.to_string();
            let first = message.lines().next().unwrap_or("").trim().to_string();
            Some(format!(
                "{}: `moelab {}`: {first}",
                shown.place,
                shown.args.join(" ")
            ))
        }
    }
}

/// The refusals of every command shown in `files`, and how many commands were checked.
fn check_files(root: &Path, files: &[PathBuf]) -> (Vec<String>, usize) {
    let mut refusals = Vec::new();
    let mut checked = 0;
    for file in files {
        let text = std::fs::read_to_string(file)
            .unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        let name = file
            .strip_prefix(root)
            .unwrap_or(file)
            .display()
            .to_string();
        for shown in shown_commands(&name, &text) {
            checked += 1;
            refusals.extend(refusal(&shown));
        }
    }
    (refusals, checked)
}

#[test]
fn every_command_shown_in_the_readme_and_docs_parses() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let files = doc_files(&root);
    assert!(files.len() > 1, "docs/*.md found: {files:?}");
    let (refusals, checked) = check_files(&root, &files);
    // The docs show dozens of commands; a broken extractor that finds none must not pass.
    assert!(checked >= 40, "only {checked} commands found in {files:?}");
    assert!(
        refusals.is_empty(),
        "{} of {checked} commands shown in the docs are refused by the CLI; fix the docs or the \
         CLI:\n{}",
        refusals.len(),
        refusals.join("\n")
    );
}

#[test]
fn a_shown_command_with_an_unknown_flag_fails_naming_file_and_line() {
    let md = "text\n```sh\nmoelab train configs/tiny.toml\nmoelab eval runs/tiny \\\n  --no-such-flag\n```\n";
    let refused: Vec<String> = shown_commands("X.md", md)
        .iter()
        .filter_map(refusal)
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(
        refused[0].starts_with("X.md:4: `moelab eval runs/tiny --no-such-flag`: error: unexpected argument '--no-such-flag'"),
        "{}",
        refused[0]
    );
}

#[test]
fn shell_lines_become_the_words_clap_sees() {
    let md = r#"
moelab train outside/a/block.toml
```sh
$ moelab train a.toml --set train.lr=1e-3   # a comment
S="--set train.steps=30 --set run.threads=1"
rm -rf runs/x && moelab train a.toml --run-dir /tmp/b $S | tee log 2>&1 > out.txt
mpirun -n 2 --oversubscribe target/release/moelab bench a.toml --steps 5
sbatch --wrap "moelab data inspect d --verify && moelab eval r"
moelab prepare c --out parts/$TASK_ID --part ${TASK_ID}/$(nproc)
moelab train <config> --set ...
echo moelab is here
```
"#;
    let got: Vec<(String, String)> = shown_commands("D.md", md)
        .into_iter()
        .map(|s| (s.place, s.args.join(" ")))
        .collect();
    let want = [
        ("D.md:4", "train a.toml --set train.lr=1e-3"),
        (
            "D.md:6",
            "train a.toml --run-dir /tmp/b --set train.steps=30 --set run.threads=1",
        ),
        ("D.md:7", "bench a.toml --steps 5"),
        ("D.md:8", "data inspect d --verify"),
        ("D.md:8", "eval r"),
        ("D.md:9", "prepare c --out parts/1 --part 1/1"),
    ];
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(p, a)| (p.to_string(), a.to_string()))
        .collect();
    assert_eq!(got, want);
}
