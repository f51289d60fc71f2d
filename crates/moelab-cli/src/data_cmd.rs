//! `moelab prepare` and `moelab data inspect|mix|classify`: turn corpora into shards, look at
//! them, score their documents with a classifier, and check what a mixture will really feed the
//! model.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use moelab_data::{
    prepare as run_prepare, DataConfig, Dataset, FieldPath, Fields, Manifest, MixtureStream,
    PrepareEvent, PrepareOptions, TokenizerChoice,
};

use crate::progress::PrepareProgress;

/// Tokenize domain-tagged corpora into shards with a manifest and a validation split.
#[derive(Debug, clap::Args)]
#[command(
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = "Example: moelab prepare data/sample --out data/prepared/sample --train-tokenizer 4096\n\
         Example: moelab prepare dolma/*.json.gz --out data/prepared/dolma --tokenizer tokenizer.json \\\n\
         \x20        --domain-field metadata.domain --strict\n\
         Example (one Slurm array task of 8): moelab prepare corpus --out parts/$SLURM_ARRAY_TASK_ID \\\n\
         \x20        --tokenizer tokenizer.json --part $SLURM_ARRAY_TASK_ID/8\n\
         \x20        then: moelab prepare merge data/prepared/corpus parts/*"
)]
pub struct PrepareArgs {
    /// `merge OUT PART_DIRS...`: join the folders of `--part` runs.
    #[command(subcommand)]
    pub command: Option<PrepareCommand>,
    /// Corpus folders (one subfolder per domain, sub-subfolders are sources; corpus files at
    /// their root and files given directly name their domain in each record). Files: JSONL
    /// (.jsonl, .ndjson, .json.gz, .jsonl.gz, .jsonl.zst: Dolma, datatrove), Parquet, and in
    /// domain folders plain text (.txt, one document per file).
    #[arg(required = true, value_name = "INPUT")]
    pub inputs: Vec<PathBuf>,
    /// Output dataset folder (re-running reuses finished shards and encodes only new or
    /// changed files).
    #[arg(long, required = true)]
    pub out: Option<PathBuf>,
    /// Encode with this Hugging Face tokenizer.json, special tokens kept (the --eos-token is
    /// added if missing).
    #[arg(
        long,
        conflicts_with = "train_tokenizer",
        required_unless_present = "train_tokenizer"
    )]
    pub tokenizer: Option<PathBuf>,
    /// Train a byte-level BPE with this vocabulary size on the corpus (pinned: a re-run into
    /// the same folder reuses it).
    #[arg(long, value_name = "VOCAB")]
    pub train_tokenizer: Option<usize>,
    /// Field naming a record's domain, a dotted path for nested fields (e.g. metadata.domain);
    /// read for files whose folder gives no domain.
    #[arg(long, default_value = "domain")]
    pub domain_field: String,
    /// Field (or dotted path, or Parquet column) holding a record's text.
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// Field naming a record's source inside its domain (may hold '/', e.g. common-crawl/2019);
    /// absent means `default`.
    #[arg(long, default_value = "source")]
    pub source_field: String,
    /// Fail on the first skipped record (bad JSON, missing field, invalid UTF-8, empty
    /// document), naming file and line.
    #[arg(long)]
    pub strict: bool,
    /// Share of each domain's documents held out for validation (by content hash).
    #[arg(long, default_value_t = 0.01)]
    pub validation_fraction: f64,
    /// Validation tokens every domain's source gets at least, raising its share where needed
    /// up to what it can spare (a quarter of its tokens; a warning names any that stay below).
    /// 0: the plain --validation-fraction. Not applied with --part.
    #[arg(long, default_value_t = moelab_data::prepare::DEFAULT_MIN_VALIDATION_TOKENS, value_name = "TOKENS")]
    pub min_validation_tokens: u64,
    /// Largest shard token file, in bytes (suffixes K, M, G); a source gets as many shards as
    /// it needs.
    #[arg(long, default_value = "1G", value_parser = parse_bytes)]
    pub max_shard_bytes: u64,
    /// Prepare only slice i of N (0 <= i < N; e.g. $SLURM_ARRAY_TASK_ID/8), then join the
    /// parts with `moelab prepare merge`. Needs --tokenizer.
    #[arg(long, value_name = "i/N")]
    pub part: Option<moelab_data::Part>,
    /// The token appended after every document: the tokenizer's own end-of-document token
    /// (e.g. </s>), else it is added as a special token.
    #[arg(long, default_value = "<|endoftext|>")]
    pub eos_token: String,
    /// Worker threads (default: one per core; at most 1024).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Longest document kept, in bytes (suffixes K, M, G): a longer JSON line, text file or
    /// Parquet value is skipped as "too long" without being held in memory (named with --strict).
    #[arg(long, default_value = "64M", value_parser = parse_bytes)]
    pub max_document_bytes: u64,
    /// A compressed file may expand to at most this many times its size on disk (or 16 MiB);
    /// past it, prepare stops naming the file as a likely decompression bomb.
    #[arg(long, default_value_t = moelab_data::input::DEFAULT_MAX_EXPANSION)]
    pub max_expansion: u64,
    /// Read symbolic links in corpus folders that resolve outside the input folder (by
    /// default they are skipped and reported, with their targets).
    #[arg(long)]
    pub follow_outside_links: bool,
    /// Print the manifest as JSON instead of a summary.
    #[arg(long)]
    pub json: bool,
}

/// Subcommands of `moelab prepare`.
#[derive(Debug, clap::Subcommand)]
pub enum PrepareCommand {
    /// Join the folders of `moelab prepare ... --part i/N` (every i) into one dataset, equal
    /// to a single prepare of the same inputs.
    #[command(
        after_help = "Example: moelab prepare merge data/prepared/corpus parts/0 parts/1 parts/2"
    )]
    Merge {
        /// The dataset folder to write (new or empty).
        out: PathBuf,
        /// The part folders.
        #[arg(required = true)]
        parts: Vec<PathBuf>,
        /// Print the manifest as JSON instead of a summary.
        #[arg(long)]
        json: bool,
    },
}

/// `512M`, `1G`, `4096`: a byte count.
fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, scale) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    digits
        .trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| {
            format!("`{s}` is not a size: write bytes, or a number with K, M or G (e.g. 512M)")
        })
}

/// Show documents and tokens per domain and source of a prepared dataset.
#[derive(Debug, clap::Args)]
#[command(after_help = "Example: moelab data inspect data/prepared/sample --verify")]
pub struct InspectArgs {
    /// Prepared dataset folder.
    pub dir: PathBuf,
    /// Also check every shard against the manifest (sha256, ids below the vocabulary size,
    /// document index) and report the first problem with its file, offset and fix.
    #[arg(long)]
    pub verify: bool,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// Print target vs realised shares of a run config's mixture, and the epochs it implies.
#[derive(Debug, clap::Args)]
#[command(after_help = "Example: moelab data mix configs/tiny.toml --sequences 10000 --json")]
pub struct MixArgs {
    /// Run config (TOML); only its [data] table (and run.seed) is read.
    pub config: PathBuf,
    /// Global sequences to draw.
    #[arg(long)]
    pub sequences: u64,
    /// Seed of the data order (default: run.seed of the config, else 0).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// `moelab prepare`.
pub fn prepare(args: PrepareArgs) -> anyhow::Result<()> {
    if let Some(PrepareCommand::Merge { out, parts, json }) = args.command {
        let manifest = moelab_data::merge(&out, &parts)
            .with_context(|| format!("merging {} parts into {}", parts.len(), out.display()))?;
        return print_prepared(
            &out,
            &manifest,
            json,
            &format!("merged {} parts", parts.len()),
        );
    }
    let out = args.out.context("--out is required")?;
    let tokenizer = match (args.tokenizer, args.train_tokenizer) {
        (Some(path), None) => TokenizerChoice::File(path),
        (None, Some(vocab)) => TokenizerChoice::Train(vocab),
        _ => anyhow::bail!("give exactly one of --tokenizer FILE or --train-tokenizer VOCAB"),
    };
    let mut opts = PrepareOptions::new(args.inputs, out.clone(), tokenizer);
    opts.fields = Fields {
        text: FieldPath(args.text_field),
        domain: FieldPath(args.domain_field),
        source: FieldPath(args.source_field),
    };
    opts.strict = args.strict;
    opts.validation_fraction = args.validation_fraction;
    opts.min_validation_tokens = args.min_validation_tokens;
    opts.threads = args.threads;
    opts.max_shard_bytes = args.max_shard_bytes;
    opts.part = args.part;
    opts.eos_token = args.eos_token;
    opts.follow_outside_links = args.follow_outside_links;
    opts.limits = moelab_data::input::Limits {
        max_document_bytes: args.max_document_bytes,
        max_expansion: args.max_expansion,
    };

    let mut bar = PrepareProgress::new("")?.lines_to_stderr();
    let progress = |event: &PrepareEvent| bar.on_event(event);
    let report = run_prepare(&opts, &progress);
    bar.finish();
    let report = report.with_context(|| format!("preparing {}", out.display()))?;

    print_inputs(&report.manifest, &opts.fields);
    for link in &report.skipped_links {
        eprintln!(
            "skipped link {} -> {}: {}",
            link.link.display(),
            link.target.display(),
            link.reason.describe()
        );
    }
    if !report.ignored_files.is_empty() {
        eprintln!(
            "ignored {} files with unsupported extensions inside domain folders (first: {})",
            report.ignored_files.len(),
            report.ignored_files[0].display()
        );
    }
    for short in &report.short_validation {
        eprintln!("warning: {short}");
    }
    let what = format!(
        "{} units written, {} kept",
        report.written_units, report.reused_units
    );
    print_prepared(&out, &report.manifest, args.json, &what)
}

/// Per input file: documents kept and skipped, and why (stderr; every file with skips, and
/// the others up to a screenful).
fn print_inputs(manifest: &Manifest, fields: &Fields) {
    const SHOWN: usize = 40;
    let mut shown = 0;
    let mut hidden = 0;
    for input in &manifest.inputs {
        if input.skipped.total() == 0 && shown >= SHOWN {
            hidden += 1;
            continue;
        }
        shown += 1;
        eprintln!(
            "{}: {} kept, {} skipped ({})",
            input.path,
            input.documents,
            input.skipped.total(),
            input.skipped.describe(fields)
        );
    }
    if hidden > 0 {
        eprintln!(
            "... and {hidden} more files with nothing skipped (all in the manifest's `inputs`)"
        );
    }
    let kept: u64 = manifest.inputs.iter().map(|i| i.documents).sum();
    let skipped: u64 = manifest.inputs.iter().map(|i| i.skipped.total()).sum();
    eprintln!(
        "{} files: {kept} documents kept, {skipped} skipped",
        manifest.inputs.len()
    );
}

fn print_prepared(out: &Path, manifest: &Manifest, json: bool, what: &str) -> anyhow::Result<()> {
    if json {
        outln!(
            "{}",
            serde_json::to_string_pretty(manifest).context("serialising the manifest")?
        );
        return Ok(());
    }
    outln!("prepared {} ({what})", out.display());
    let dataset = Dataset::open(out).with_context(|| format!("opening {}", out.display()))?;
    out!("{}", inspect_table(&dataset));
    Ok(())
}

/// `moelab data inspect`.
pub fn inspect(args: InspectArgs) -> anyhow::Result<()> {
    let dataset =
        Dataset::open(&args.dir).with_context(|| format!("opening {}", args.dir.display()))?;
    if args.verify {
        dataset
            .verify()
            .with_context(|| format!("verifying {}", args.dir.display()))?;
    }
    if args.json {
        let mut rows = Vec::new();
        for (d, domain) in dataset.manifest().domains.iter().enumerate() {
            for source in &domain.sources {
                rows.push(serde_json::json!({
                    "domain": domain.name,
                    "domain_id": d,
                    "source": source.name,
                    "documents": source.train.documents,
                    "tokens": source.train.tokens,
                    "validation_documents": source.validation.documents,
                    "validation_tokens": source.validation.tokens,
                    "shards": source.shards.len(),
                }));
            }
        }
        let info = &dataset.manifest().tokenizer;
        let out = serde_json::json!({
            "dir": args.dir,
            "vocab_size": info.vocab_size,
            "eos_id": info.eos_id,
            "dtype": dataset.manifest().dtype,
            "tokenizer_sha256": info.sha256,
            "verified": args.verify,
            "sources": rows,
        });
        outln!(
            "{}",
            serde_json::to_string_pretty(&out).context("serialising")?
        );
        return Ok(());
    }
    outln!("{}", args.dir.display());
    out!("{}", inspect_table(&dataset));
    if args.verify {
        outln!(
            "verified: every shard matches the manifest (sha256, sizes, document index) and holds only ids below {}",
            dataset.vocab_size()
        );
    }
    Ok(())
}

fn inspect_table(dataset: &Dataset) -> String {
    let m = dataset.manifest();
    let mut out = format!(
        "tokenizer: vocab {} (ids stored as {:?}), {} = {}, validation fraction {}\n",
        m.tokenizer.vocab_size,
        m.dtype,
        m.tokenizer.eos_token,
        m.tokenizer.eos_id,
        m.validation_fraction
    );
    out += &format!(
        "{:<24} {:>10} {:>12} {:>10} {:>12}\n",
        "domain/source", "documents", "tokens", "val docs", "val tokens"
    );
    let (mut docs, mut tokens, mut vdocs, mut vtokens) = (0, 0, 0, 0);
    for domain in &m.domains {
        for source in &domain.sources {
            out += &format!(
                "{:<24} {:>10} {:>12} {:>10} {:>12}\n",
                format!("{}/{}", domain.name, source.name),
                source.train.documents,
                source.train.tokens,
                source.validation.documents,
                source.validation.tokens
            );
            docs += source.train.documents;
            tokens += source.train.tokens;
            vdocs += source.validation.documents;
            vtokens += source.validation.tokens;
        }
    }
    out += &format!(
        "{:<24} {docs:>10} {tokens:>12} {vdocs:>10} {vtokens:>12}\n",
        "total"
    );
    out
}

/// `moelab data mix`.
pub fn mix(args: MixArgs) -> anyhow::Result<()> {
    let cfg = DataConfig::from_run_config_file(&args.config)
        .with_context(|| format!("reading [data] of {}", args.config.display()))?;
    let seed = match args.seed {
        Some(seed) => seed,
        None => run_seed(&args.config)?,
    };
    let dataset = moelab_data::ensure_prepared(&cfg).context("opening the dataset")?;
    let stream =
        MixtureStream::new(Arc::new(dataset), &cfg, seed).context("building the mixture stream")?;
    let report = stream.report(args.sequences);
    if args.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&report).context("serialising")?
        );
        return Ok(());
    }
    outln!(
        "{} sequences of {} tokens, seed {seed}, shuffle block {}",
        report.sequences,
        cfg.seq_len,
        cfg.shuffle_block
    );
    outln!(
        "{:<30} {:>9} {:>9} {:>10}",
        "domain/source",
        "target",
        "realised",
        "sequences"
    );
    for row in &report.rows {
        let name = match &row.source {
            Some(s) => format!("  {}/{s}", row.domain),
            None => row.domain.clone(),
        };
        outln!(
            "{name:<30} {:>8.4}% {:>8.4}% {:>10}",
            100.0 * row.target,
            100.0 * row.realised,
            row.sequences
        );
    }
    outln!(
        "max prefix deviation: {:.2} sequences (bound: 1 without block shuffle, about shuffle_block with it)",
        report.max_prefix_deviation
    );
    outln!(
        "{:<30} {:>12} {:>10} {:>8}",
        "implied epochs",
        "sequences",
        "chunks",
        "epochs"
    );
    for u in &report.usage {
        outln!(
            "{:<30} {:>12.0} {:>10} {:>8.3}",
            format!("{}/{}", u.domain, u.source),
            u.sequences,
            u.chunks,
            u.epochs
        );
    }
    Ok(())
}

/// run.seed of a run config, or 0 when it has none.
fn run_seed(path: &std::path::Path) -> anyhow::Result<u64> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value: toml::Table = text
        .parse()
        .with_context(|| format!("parsing {}", path.display()))?;
    Ok(value
        .get("run")
        .and_then(|r| r.get("seed"))
        .and_then(|s| s.as_integer())
        .and_then(|s| u64::try_from(s).ok())
        .unwrap_or(0))
}

/// Train a fastText-style document classifier (hashed word and character n-grams, linear).
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example: moelab data classify train --positive data/sample/code --negative data/sample/web \
--negative data/sample/math/text --out runs/classifiers/code_like.bin\n\n\
Inputs are folders (searched recursively) or files: .jsonl (optionally .gz/.zst) with a `text` \
field per line, or .txt (one document). Every tenth document of each class (by a fixed hash of \
its position) is held out; accuracy, precision and recall on it are reported (threshold 0.5)."
)]
pub struct ClassifyTrainArgs {
    /// Documents of the positive class (repeatable).
    #[arg(long, required = true)]
    pub positive: Vec<PathBuf>,
    /// Documents of the negative class (repeatable).
    #[arg(long, required = true)]
    pub negative: Vec<PathBuf>,
    /// The model file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Passes over the training documents.
    #[arg(long, default_value_t = 10)]
    pub epochs: u32,
    /// log2 of the hash buckets (weights).
    #[arg(long, default_value_t = 18)]
    pub buckets_log2: u32,
    /// Longest document read, in bytes (suffixes K, M, G); longer ones are left out and counted.
    #[arg(long, default_value = "64M", value_parser = parse_bytes)]
    pub max_document_bytes: u64,
    /// A compressed file may expand to at most this many times its size on disk (or 16 MiB).
    #[arg(long, default_value_t = moelab_data::input::DEFAULT_MAX_EXPANSION)]
    pub max_expansion: u64,
    /// Machine-readable output (keys `accuracy`, `precision`, `recall`, ...).
    #[arg(long)]
    pub json: bool,
}

/// Score every document of a prepared dataset into per-shard side files.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example: moelab data classify score runs/classifiers/code_like.bin data/prepared/sample --name code_like\n\n\
Writes DATASET/scores/NAME/<shard>.scores (one f32 per document). Shards already scored by the \
same model file are kept, so an interrupted run resumes. A mixture then takes a share of a \
domain from documents scored at or above a threshold: [data.select.math] scores = \"NAME\", \
threshold = 0.5, share = 0.75; `moelab data mix` shows the realised shares."
)]
pub struct ClassifyScoreArgs {
    /// The model (`moelab data classify train --out`).
    pub model: PathBuf,
    /// Prepared dataset folder.
    pub dataset: PathBuf,
    /// Name of the scores (the `scores` of `[data.select.<domain>]`).
    #[arg(long)]
    pub name: String,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// Runs `moelab data classify train`.
pub fn classify_train(args: ClassifyTrainArgs) -> anyhow::Result<()> {
    use moelab_data::classify::{read_documents_within, train_classifier, ClassifierOptions};
    anyhow::ensure!(
        args.max_document_bytes > 0 && args.max_expansion > 0,
        "--max-document-bytes and --max-expansion must be at least 1"
    );
    let limits = moelab_data::input::Limits {
        max_document_bytes: args.max_document_bytes,
        max_expansion: args.max_expansion,
    };
    let read = |paths: &[PathBuf]| -> anyhow::Result<Vec<String>> {
        let mut docs = Vec::new();
        for p in paths {
            let read = read_documents_within(p, &limits)
                .with_context(|| format!("reading {}", p.display()))?;
            if read.too_long > 0 {
                eprintln!(
                    "{}: left out {} documents longer than --max-document-bytes {}",
                    p.display(),
                    read.too_long,
                    args.max_document_bytes
                );
            }
            docs.extend(read.documents);
        }
        Ok(docs)
    };
    let (positives, negatives) = (read(&args.positive)?, read(&args.negative)?);
    let opts = ClassifierOptions {
        epochs: args.epochs,
        buckets_log2: args.buckets_log2,
        ..ClassifierOptions::default()
    };
    let (model, report) = train_classifier(&positives, &negatives, &opts)?;
    model
        .save(&args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    if args.json {
        let mut json = serde_json::to_value(&report).context("serialising")?;
        json["model"] = serde_json::json!(args.out);
        outln!(
            "{}",
            serde_json::to_string_pretty(&json).context("serialising")?
        );
        return Ok(());
    }
    outln!(
        "trained on {} positive and {} negative documents; held out {} + {}",
        report.train_positive,
        report.train_negative,
        report.heldout_positive,
        report.heldout_negative
    );
    outln!(
        "held-out accuracy {:.4}  precision {:.4}  recall {:.4}",
        report.accuracy,
        report.precision,
        report.recall
    );
    outln!("model {}", args.out.display());
    Ok(())
}

/// Runs `moelab data classify score`.
pub fn classify_score(args: ClassifyScoreArgs) -> anyhow::Result<()> {
    let report = moelab_data::classify::score_dataset(&args.model, &args.dataset, &args.name)?;
    if args.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&report).context("serialising")?
        );
        return Ok(());
    }
    outln!(
        "scores `{}`: {} documents, {} shards scored, {} already scored",
        report.name,
        report.documents,
        report.shards_scored,
        report.shards_kept
    );
    outln!(
        "{:<28} {:>9} {:>9} {:>8}",
        "domain/source",
        "documents",
        ">= 0.5",
        "mean"
    );
    for s in &report.sources {
        outln!(
            "{:<28} {:>9} {:>9} {:>8.4}",
            format!("{}/{}", s.domain, s.source),
            s.documents,
            s.above_half,
            s.mean
        );
    }
    Ok(())
}
