//! Generated inputs: a small multi-domain JSONL corpus laid out as `moelab prepare` reads it
//! (`DOMAIN/[SOURCE/]part.jsonl`) and a small run config that trains on it in seconds.

use std::path::{Path, PathBuf};

/// Words the prose domain is drawn from (a prefix of it, see [`Corpus::vocabulary`]).
const WORDS: [&str; 20] = [
    "the", "model", "routes", "tokens", "to", "experts", "and", "data", "mixture", "changes",
    "loss", "falls", "when", "training", "runs", "long", "enough", "for", "every", "domain",
];

/// A generated corpus: each (domain, source) unit gets one `part.jsonl` of documents whose text
/// is a pure function of (unit, document, word position), so every test sees the same bytes.
pub struct Corpus {
    /// (domain, source) pairs; an empty source puts the file directly in the domain folder.
    units: Vec<(&'static str, &'static str)>,
    documents: usize,
    words_per_document: usize,
    vocabulary: usize,
    /// Every word names its domain and source instead of looking like that domain's text.
    labelled: bool,
    /// A domain whose file ends with one line that is not JSON.
    malformed_in: Option<&'static str>,
}

impl Corpus {
    /// prose, code and math, one source each: 60 documents of 40 words, text shaped like the
    /// domain (words, assignments, sums), so that the router can tell the domains apart.
    pub fn three_domains() -> Self {
        Self {
            units: vec![("prose", ""), ("code", ""), ("math", "")],
            documents: 60,
            words_per_document: 40,
            vocabulary: WORDS.len(),
            labelled: false,
            malformed_in: None,
        }
    }

    /// [`Corpus::three_domains`] with math split into a `structured` and a `plain` source.
    pub fn with_math_sources() -> Self {
        Self {
            units: vec![
                ("prose", ""),
                ("code", ""),
                ("math", "structured"),
                ("math", "plain"),
            ],
            ..Self::three_domains()
        }
    }

    /// prose, math/plain and math/structured with 40 documents of 30 labelled words each, and a
    /// malformed line 41 at the end of prose's file.
    pub fn labelled_with_a_bad_line() -> Self {
        Self {
            units: vec![("prose", ""), ("math", "plain"), ("math", "structured")],
            documents: 40,
            words_per_document: 30,
            vocabulary: WORDS.len(),
            labelled: true,
            malformed_in: Some("prose"),
        }
    }

    /// The same corpus with `n` documents per unit.
    pub fn documents(mut self, n: usize) -> Self {
        self.documents = n;
        self
    }

    /// The same corpus with prose drawn from the first `n` words only.
    pub fn vocabulary(mut self, n: usize) -> Self {
        self.vocabulary = n.clamp(1, WORDS.len());
        self
    }

    /// Writes the corpus under `dir` (created); returns `dir`.
    pub fn write(&self, dir: &Path) -> PathBuf {
        for &(domain, source) in &self.units {
            let folder = dir.join(domain).join(source);
            std::fs::create_dir_all(&folder)
                .unwrap_or_else(|e| panic!("creating {}: {e}", folder.display()));
            let mut text = String::new();
            for doc in 0..self.documents {
                let words: Vec<String> = (0..self.words_per_document)
                    .map(|i| self.word(domain, source, doc, i))
                    .collect();
                text += &format!("{{\"text\": \"{}\"}}\n", words.join(" "));
            }
            if self.malformed_in == Some(domain) {
                text += "{ this line is not json\n";
            }
            let file = folder.join("part.jsonl");
            std::fs::write(&file, text)
                .unwrap_or_else(|e| panic!("writing {}: {e}", file.display()));
        }
        dir.to_path_buf()
    }

    /// Word `i` of document `doc` of one unit.
    fn word(&self, domain: &str, source: &str, doc: usize, i: usize) -> String {
        if self.labelled {
            return format!("{domain} {source} word{} {i}", (doc * 31 + i) % 17);
        }
        match (domain, source) {
            ("code", _) => format!("x{} = x{} + {};", (doc + i) % 7, (i * 3) % 5, i % 9),
            ("math", "structured") => format!(
                "step {}: {} + {} = {}",
                i % 4,
                (doc * i) % 13,
                i % 11,
                (doc * i) % 13 + i % 11
            ),
            ("math", "plain") => format!("{} plus {}", (doc + i) % 17, WORDS[i % 5]),
            ("math", _) => format!(
                "{} + {} = {}",
                (doc * i) % 13,
                i % 11,
                (doc * i) % 13 + i % 11
            ),
            _ => WORDS[(doc * 7 + i * 3) % self.vocabulary].to_string(),
        }
    }
}

/// A run config for a two-layer, four-expert model that reads `DIR/corpus`, prepares it into
/// `DIR/prepared` and keeps its runs in `DIR/runs`; tests change it with [`RunConfig::set`].
pub struct RunConfig {
    table: toml::Table,
}

impl RunConfig {
    /// The base config over the scratch folder `dir`: 40 steps of 256 tokens on prose 0.5,
    /// code 0.3, math 0.2, logging every step and the router every 5; no `[checkpoint]` table.
    pub fn small(dir: &Path) -> Self {
        let text = format!(
            r#"
[run]
name = "e2e"
seed = 7
out_dir = "{out}"
threads = 1

[model]
vocab_size = 512
d_model = 32
n_layers = 2
n_heads = 4
n_kv_heads = 2
max_seq_len = 32
qk_norm = true
init_std = 0.05

[model.moe]
n_experts = 4
top_k = 2
expert_ff = 32

[data]
dataset = "{prepared}"
sources = "{corpus}"
tokenizer_vocab = 400
seq_len = 32
validation_tokens = 256

[data.mixture]
prose = 0.5
code = 0.3
math = 0.2

[train]
steps = 40
micro_batch = 4
global_batch_tokens = 256
lr = 3e-3
warmup_steps = 4

[log]
interval = 1
router_interval = 5
"#,
            out = dir.join("runs").display(),
            prepared = dir.join("prepared").display(),
            corpus = dir.join("corpus").display(),
        );
        let table = text
            .parse()
            .unwrap_or_else(|e| panic!("the base config is not TOML: {e}"));
        Self { table }
    }

    /// Sets `key.path=value` (a TOML value), as the CLI's `--set` does; missing tables are
    /// created.
    pub fn set(mut self, assignment: &str) -> Self {
        let (key, value) = assignment
            .split_once('=')
            .unwrap_or_else(|| panic!("`{assignment}` is not key.path=value"));
        let value = format!("value = {value}")
            .parse::<toml::Table>()
            .unwrap_or_else(|e| panic!("`{assignment}`: {e}"))
            .remove("value")
            .unwrap_or_else(|| panic!("`{assignment}` has no value"));
        let mut parts: Vec<&str> = key.trim().split('.').collect();
        let last = parts.pop().unwrap_or_default();
        let mut table = &mut self.table;
        for part in parts {
            table = table
                .entry(part)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .unwrap_or_else(|| panic!("`{assignment}`: `{part}` is not a table"));
        }
        table.insert(last.to_string(), value);
        self
    }

    /// [`RunConfig::set`] for each assignment.
    pub fn set_all(self, assignments: &[&str]) -> Self {
        assignments.iter().fold(self, |config, a| config.set(a))
    }

    /// Writes the config to `path`; returns `path`.
    pub fn write(&self, path: &Path) -> PathBuf {
        let text = toml::to_string(&self.table).unwrap_or_else(|e| panic!("serialising: {e}"));
        std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path.to_path_buf()
    }
}
