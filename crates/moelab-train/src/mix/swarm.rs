//! `moelab mix swarm`: an ablation file of mixtures drawn around a base mixture.
//!
//! Each variant's mixture is `min_share + (1 - D * min_share) * p` with `p ~ Dirichlet(A * base)`
//! over the D domains the base draws from, so the swarm is centred on the base (the mean of `p`
//! is the base) and tighter as the concentration A grows. A draw is kept only when every
//! domain's implied epochs at the base run's token budget stay at or below the repetition limit
//! (see [`DomainBudget`]); the base itself is the first variant. The generator is ChaCha8 seeded
//! with `--seed`, so the same seed writes the same file.

use std::fmt::Write as _;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use moelab_data::MixtureStream;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma};

use crate::ablate::Ablation;
use crate::{Config, TrainError};

/// Name of the base variant in a swarm (and of the base in a proposal file).
pub const BASE_VARIANT: &str = "base";
/// Decimals written for each share (the stream renormalises, so rounding never breaks the sum).
const SHARE_DECIMALS: i32 = 6;
/// Draws tried per requested variant before the limits are declared too tight.
const DRAWS_PER_VARIANT: usize = 2000;

/// What `moelab mix swarm` is asked for.
#[derive(Debug, Clone)]
pub struct SwarmOptions {
    /// Variants to write, the base included.
    pub runs: usize,
    /// Dirichlet concentration A (larger: mixtures closer to the base).
    pub concentration: f64,
    /// Seed of the draws.
    pub seed: u64,
    /// Every domain's share is at least this.
    pub min_share: f64,
    /// Repetition limit: implied epochs of any domain at most this (None: `data.max_repetition`,
    /// else [`DEFAULT_MAX_EPOCHS`]).
    pub max_epochs: Option<f64>,
    /// Overrides written into the file's top-level `set` (applied to every variant).
    pub overrides: Vec<String>,
}

/// Repetition limit when neither `--max-epochs` nor `data.max_repetition` gives one: about the
/// number of passes before repeated data stops helping as much as fresh data (Muennighoff et
/// al., 2023).
pub const DEFAULT_MAX_EPOCHS: f64 = 4.0;

/// How much of each domain a run at the base budget reads: epochs per unit of share.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DomainBudget {
    /// Domain names, in dataset order (those the base draws from).
    pub domains: Vec<String>,
    /// The base mixture (renormalised shares).
    pub base: Vec<f64>,
    /// Epochs of the domain's most-read source if the domain had share 1 (linear in the share).
    pub epochs_per_share: Vec<f64>,
    /// Training sequences of the run (steps x sequences per step).
    pub sequences: u64,
}

impl DomainBudget {
    /// Implied epochs of each domain under `mixture` (same order as `domains`).
    pub fn epochs(&self, mixture: &[f64]) -> Vec<f64> {
        mixture
            .iter()
            .zip(&self.epochs_per_share)
            .map(|(w, e)| w * e)
            .collect()
    }

    /// Largest share of each domain that keeps its epochs at most `max_epochs` (capped at 1).
    pub fn max_shares(&self, max_epochs: f64) -> Vec<f64> {
        self.epochs_per_share
            .iter()
            .map(|&e| {
                if e > 0.0 {
                    (max_epochs / e).min(1.0)
                } else {
                    1.0
                }
            })
            .collect()
    }

    /// Reads the budget of `cfg`: its dataset (prepared on first use, as training would), its
    /// base mixture and its token budget. Refuses staged mixtures.
    pub fn of_config(cfg: &Config) -> Result<Self, TrainError> {
        if !cfg.data.stages.is_empty() {
            return Err(TrainError::Argument(
                "mix search varies one mixture, but the base config has [[data.stages]]; remove \
                 the stages from the base config (or search each stage's mixture separately)"
                    .into(),
            ));
        }
        let dataset = Arc::new(moelab_data::ensure_prepared(&cfg.data)?);
        let stream = MixtureStream::new(dataset.clone(), &cfg.data, cfg.run.seed)?;
        let mixture = stream
            .stages()
            .first()
            .map(|s| s.mixture.clone())
            .unwrap_or_default();
        let sequences = cfg.train.steps * cfg.global_sequences() as u64;
        // Epochs are linear in a domain's share: measure them once with every domain at an
        // equal share, then scale.
        let domains: Vec<String> = dataset
            .domains()
            .iter()
            .filter(|d| mixture.get(*d).is_some_and(|&w| w > 0.0))
            .cloned()
            .collect();
        if domains.len() < 2 {
            return Err(TrainError::Argument(format!(
                "the base mixture draws from {} domain(s); a mixture search needs at least two \
                 with a positive share in [data.mixture]",
                domains.len()
            )));
        }
        let equal = 1.0 / domains.len() as f64;
        let mut probe = cfg.data.clone();
        probe.mixture = domains.iter().map(|d| (d.clone(), equal)).collect();
        let probe_stream = MixtureStream::new(dataset, &probe, cfg.run.seed)?;
        let mut epochs_per_share = vec![0.0f64; domains.len()];
        for usage in probe_stream.usage(sequences) {
            if let Some(i) = domains.iter().position(|d| *d == usage.domain) {
                epochs_per_share[i] = epochs_per_share[i].max(usage.epochs / equal);
            }
        }
        let base = domains.iter().map(|d| mixture[d]).collect();
        Ok(DomainBudget {
            domains,
            base,
            epochs_per_share,
            sequences,
        })
    }
}

/// One variant of the swarm.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SwarmVariant {
    /// Variant name (`base`, `mix-001`, ...).
    pub name: String,
    /// Share per domain (same order as the budget's domains), rounded as written.
    pub mixture: Vec<f64>,
    /// Implied epochs per domain at the base budget.
    pub epochs: Vec<f64>,
}

/// A drawn swarm: the budget it respects and its variants, base first.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Swarm {
    /// Domains, base mixture, epochs per share.
    pub budget: DomainBudget,
    /// The repetition limit every variant respects.
    pub max_epochs: f64,
    /// Variants, the base first.
    pub variants: Vec<SwarmVariant>,
}

/// Draws `options.runs` mixtures around `budget.base` (the base first); every one respects the
/// repetition limit and the minimum share.
pub fn draw_swarm(
    budget: &DomainBudget,
    options: &SwarmOptions,
    max_epochs: f64,
) -> Result<Swarm, TrainError> {
    check_options(budget, options, max_epochs)?;
    let caps = budget.max_shares(max_epochs);
    let base = round_shares(&budget.base);
    let mut variants = vec![SwarmVariant {
        name: BASE_VARIANT.into(),
        epochs: budget.epochs(&base),
        mixture: base,
    }];
    let d = budget.domains.len();
    let gammas = budget
        .base
        .iter()
        .map(|&w| {
            Gamma::new(options.concentration * w, 1.0).map_err(|e| {
                TrainError::Argument(format!(
                    "--concentration {}: cannot draw a Dirichlet around share {w}: {e}",
                    options.concentration
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
    let free = 1.0 - d as f64 * options.min_share;
    let mut draws = 0usize;
    while variants.len() < options.runs {
        draws += 1;
        if draws > DRAWS_PER_VARIANT * options.runs {
            return Err(TrainError::Argument(format!(
                "only {} of {} mixtures within the limits after {} draws: the repetition limit \
                 (--max-epochs {max_epochs}: max shares {}) or --min-share {} leaves too little \
                 room around the base; raise --max-epochs, lower --min-share or raise \
                 --concentration",
                variants.len(),
                options.runs,
                draws - 1,
                fmt_shares(&budget.domains, &caps),
                options.min_share
            )));
        }
        let g: Vec<f64> = gammas.iter().map(|g| g.sample(&mut rng)).collect();
        let total: f64 = g.iter().sum();
        // Very small shapes can underflow every component to zero: draw again.
        if !(total > 0.0 && total.is_finite()) {
            continue;
        }
        let mixture = round_shares(
            &g.iter()
                .map(|x| options.min_share + free * x / total)
                .collect::<Vec<_>>(),
        );
        if mixture.iter().zip(&caps).any(|(w, cap)| *w > *cap) {
            continue;
        }
        variants.push(SwarmVariant {
            name: format!("mix-{:03}", variants.len()),
            epochs: budget.epochs(&mixture),
            mixture,
        });
    }
    Ok(Swarm {
        budget: budget.clone(),
        max_epochs,
        variants,
    })
}

/// Refuses options no swarm can satisfy, naming the option.
fn check_options(
    budget: &DomainBudget,
    options: &SwarmOptions,
    max_epochs: f64,
) -> Result<(), TrainError> {
    let d = budget.domains.len() as f64;
    if options.runs < 2 {
        return Err(TrainError::Argument(format!(
            "--runs {}: a swarm needs at least 2 variants (the base and one drawn mixture); a fit \
             needs more runs than the law has parameters (domains + 1 = {})",
            options.runs,
            budget.domains.len() + 1
        )));
    }
    if !(options.concentration > 0.0 && options.concentration.is_finite()) {
        return Err(TrainError::Argument(format!(
            "--concentration {}: must be a positive number (e.g. 10: wide, 100: close to the base)",
            options.concentration
        )));
    }
    if !(options.min_share >= 0.0 && options.min_share * d < 1.0) {
        return Err(TrainError::Argument(format!(
            "--min-share {}: must be in [0, 1/{d}) so that {d} domains fit in the simplex",
            options.min_share
        )));
    }
    if !(max_epochs > 0.0 && max_epochs.is_finite()) {
        return Err(TrainError::Argument(format!(
            "--max-epochs {max_epochs}: must be a positive number of passes"
        )));
    }
    let base_epochs = budget.epochs(&budget.base);
    if let Some(i) = base_epochs.iter().position(|e| *e > max_epochs) {
        return Err(TrainError::Argument(format!(
            "the base mixture already reads `{}` {:.2} times (share {:.4}, {} sequences) over the \
             repetition limit --max-epochs {max_epochs}; raise --max-epochs, shorten the run or \
             add data",
            budget.domains[i], base_epochs[i], budget.base[i], budget.sequences
        )));
    }
    if let Some(i) = budget.base.iter().position(|w| *w < options.min_share) {
        return Err(TrainError::Argument(format!(
            "--min-share {}: the base mixture gives `{}` only {:.4}; lower --min-share so the base \
             is one of the variants",
            options.min_share, budget.domains[i], budget.base[i]
        )));
    }
    Ok(())
}

/// Shares rounded to the written precision and renormalised by the largest share, so that the
/// rounded vector still sums to one within one unit of the last decimal.
fn round_shares(shares: &[f64]) -> Vec<f64> {
    let scale = 10f64.powi(SHARE_DECIMALS);
    let total: f64 = shares.iter().sum();
    let mut rounded: Vec<f64> = shares
        .iter()
        .map(|w| (w / total * scale).round() / scale)
        .collect();
    let drift = 1.0 - rounded.iter().sum::<f64>();
    if let Some(largest) = (0..rounded.len()).max_by(|&a, &b| rounded[a].total_cmp(&rounded[b])) {
        rounded[largest] = ((rounded[largest] + drift) * scale).round() / scale;
    }
    rounded
}

/// `web=0.35, code=0.2` for messages.
pub(crate) fn fmt_shares(domains: &[String], shares: &[f64]) -> String {
    domains
        .iter()
        .zip(shares)
        .map(|(d, w)| format!("{d}={w:.4}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `data.mixture.<d>=<w>` for every domain: a complete mixture as overrides.
pub fn mixture_overrides(domains: &[String], mixture: &[f64]) -> Vec<String> {
    domains
        .iter()
        .zip(mixture)
        .map(|(d, w)| format!("data.mixture.{d}={w}"))
        .collect()
}

/// The ablation file of `swarm`: `base` (relative to the file's folder), the top-level `set`, and
/// one variant per mixture. `header` lines become comments at the top.
pub fn swarm_toml(
    swarm: &Swarm,
    base: &str,
    out_dir: Option<&Path>,
    overrides: &[String],
    header: &[String],
) -> String {
    let mut text = String::new();
    for line in header {
        let _ = writeln!(text, "# {line}");
    }
    let _ = writeln!(text, "base = {}", toml_string(base));
    if let Some(out) = out_dir {
        let _ = writeln!(text, "out_dir = {}", toml_string(&out.to_string_lossy()));
    }
    let _ = writeln!(text, "set = {}", toml_list(overrides));
    for v in &swarm.variants {
        let epochs: Vec<String> = v.epochs.iter().map(|e| format!("{e:.3}")).collect();
        let _ = writeln!(
            text,
            "\n[[variant]]  # implied epochs: {}\nname = {}\nset = {}",
            epochs.join(" "),
            toml_string(&v.name),
            toml_list(&mixture_overrides(&swarm.budget.domains, &v.mixture))
        );
    }
    text
}

/// A TOML basic string.
pub(crate) fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// A TOML array of strings, one per line when long.
pub(crate) fn toml_list(items: &[String]) -> String {
    if items.is_empty() {
        return "[]".into();
    }
    let inner: Vec<String> = items
        .iter()
        .map(|s| format!("  {},", toml_string(s)))
        .collect();
    format!("[\n{}\n]", inner.join("\n"))
}

/// `target` written relative to the folder `from` (both made absolute first), for the `base` of
/// a file written in `from`.
pub fn relative_path(target: &Path, from: &Path) -> Result<PathBuf, TrainError> {
    let absolute = |p: &Path| -> Result<PathBuf, TrainError> {
        std::fs::canonicalize(p).map_err(TrainError::io(p))
    };
    let target = absolute(target)?;
    let from = absolute(from)?;
    let t: Vec<Component> = target.components().collect();
    let f: Vec<Component> = from.components().collect();
    let common = t.iter().zip(&f).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..f.len() {
        out.push("..");
    }
    for c in &t[common..] {
        out.push(c.as_os_str());
    }
    Ok(out)
}

/// Writes `text` to `path` atomically, then loads it as an ablation to prove `moelab ablate`
/// takes it unchanged; the file is removed again when it does not load.
pub fn write_ablation_file(path: &Path, text: &str) -> Result<Ablation, TrainError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(TrainError::io(dir))?;
    }
    moelab_io::write_atomic(path, text.as_bytes()).map_err(TrainError::io(path))?;
    Ablation::load(path).inspect_err(|_| {
        let _ = std::fs::remove_file(path);
    })
}

/// Everything `moelab mix swarm` does: load the base (with `options.overrides`), read its
/// budget, draw, and write the ablation file at `out`; returns the swarm.
pub fn write_swarm(
    base_config: &Path,
    options: &SwarmOptions,
    out: &Path,
    out_dir: Option<&Path>,
) -> Result<Swarm, TrainError> {
    let cfg = Config::load(base_config, &options.overrides)?;
    let budget = DomainBudget::of_config(&cfg)?;
    let max_epochs = options
        .max_epochs
        .or(cfg.data.max_repetition)
        .unwrap_or(DEFAULT_MAX_EPOCHS);
    let swarm = draw_swarm(&budget, options, max_epochs)?;
    let folder = match out.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => dir.to_path_buf(),
        None => PathBuf::from("."),
    };
    std::fs::create_dir_all(&folder).map_err(TrainError::io(&folder))?;
    let base = relative_path(base_config, &folder)?;
    let header =
        vec![
        format!(
            "Written by `moelab mix swarm`: {} mixtures drawn from Dirichlet({} x base), seed {}, \
             min share {}, at most {} epochs per domain at {} sequences.",
            options.runs,
            options.concentration,
            options.seed,
            options.min_share,
            max_epochs,
            budget.sequences
        ),
        format!("Base mixture: {}.", fmt_shares(&budget.domains, &budget.base)),
        "Train it with `moelab ablate THIS.toml` (also --parallel N or --slurm), then fit with \
         `moelab mix fit OUT`."
            .into(),
    ];
    let text = swarm_toml(
        &swarm,
        &base.to_string_lossy(),
        out_dir,
        &options.overrides,
        &header,
    );
    write_ablation_file(out, &text)?;
    Ok(swarm)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn budget() -> DomainBudget {
        DomainBudget {
            domains: vec!["web".into(), "code".into(), "math".into()],
            base: vec![0.5, 0.3, 0.2],
            // math is scarce: at share 1 it would be read 10 times.
            epochs_per_share: vec![1.0, 2.0, 10.0],
            sequences: 1000,
        }
    }

    fn options(runs: usize, seed: u64) -> SwarmOptions {
        SwarmOptions {
            runs,
            concentration: 5.0,
            seed,
            min_share: 0.01,
            max_epochs: None,
            overrides: vec![],
        }
    }

    #[test]
    fn every_variant_respects_the_repetition_limit_and_the_simplex() {
        let b = budget();
        // math may have at most 0.3 of the mixture (3 epochs / 10 per share).
        let swarm = draw_swarm(&b, &options(200, 7), 3.0).unwrap();
        assert_eq!(swarm.variants.len(), 200);
        assert_eq!(swarm.variants[0].name, BASE_VARIANT);
        assert_eq!(swarm.variants[0].mixture, vec![0.5, 0.3, 0.2]);
        let mut near_limit = 0;
        for v in &swarm.variants {
            let total: f64 = v.mixture.iter().sum();
            assert!((total - 1.0).abs() < 1e-9, "{}: {:?}", v.name, v.mixture);
            for (e, w) in v.epochs.iter().zip(&v.mixture) {
                assert!(*e <= 3.0 + 1e-12, "{}: {:?}", v.name, v.epochs);
                assert!(*w >= 0.01 - 1e-6, "{}: {:?}", v.name, v.mixture);
            }
            if v.mixture[2] > 0.25 {
                near_limit += 1;
            }
        }
        // The limit binds (draws near it exist) without being exceeded.
        assert!(near_limit > 0, "no variant near the math cap");
    }

    #[test]
    fn same_seed_same_swarm_other_seed_other_swarm() {
        let b = budget();
        let a = draw_swarm(&b, &options(6, 11), 4.0).unwrap();
        let again = draw_swarm(&b, &options(6, 11), 4.0).unwrap();
        let other = draw_swarm(&b, &options(6, 12), 4.0).unwrap();
        let mixtures = |s: &Swarm| {
            s.variants
                .iter()
                .map(|v| v.mixture.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(mixtures(&a), mixtures(&again));
        assert_ne!(mixtures(&a)[1..], mixtures(&other)[1..]);
    }

    #[test]
    fn concentration_centres_the_swarm_on_the_base() {
        let b = budget();
        let spread = |a: f64| {
            let mut o = options(400, 3);
            o.concentration = a;
            o.min_share = 0.0;
            let s = draw_swarm(&b, &o, 100.0).unwrap();
            let n = s.variants.len() as f64;
            let mean_web: f64 = s.variants.iter().map(|v| v.mixture[0]).sum::<f64>() / n;
            let var: f64 = s
                .variants
                .iter()
                .map(|v| (v.mixture[0] - 0.5).powi(2))
                .sum::<f64>()
                / n;
            (mean_web, var)
        };
        let (mean_wide, var_wide) = spread(4.0);
        let (mean_tight, var_tight) = spread(200.0);
        assert!((mean_wide - 0.5).abs() < 0.03, "{mean_wide}");
        assert!((mean_tight - 0.5).abs() < 0.01, "{mean_tight}");
        // Dirichlet variance of a share w is w(1-w)/(A+1).
        assert!((var_wide - 0.25 / 5.0).abs() < 0.015, "{var_wide}");
        assert!(var_tight < var_wide / 20.0, "{var_tight} vs {var_wide}");
    }

    #[test]
    fn refuses_impossible_requests() {
        let b = budget();
        let err = |o: SwarmOptions, r: f64| draw_swarm(&b, &o, r).unwrap_err().to_string();
        assert!(err(options(8, 1), 1.0).contains("base mixture already reads `math`"));
        let mut o = options(8, 1);
        o.min_share = 0.4;
        assert!(err(o, 4.0).contains("--min-share"));
        let mut o = options(8, 1);
        o.concentration = 0.0;
        assert!(err(o, 4.0).contains("--concentration"));
        assert!(err(options(1, 1), 4.0).contains("--runs 1"));
        // Every domain capped at its base share: only the base itself fits, so no draw does,
        // and the error says which limits to relax.
        let tight = DomainBudget {
            epochs_per_share: vec![2.0, 1.0 / 0.3, 5.0],
            ..b.clone()
        };
        let e = draw_swarm(&tight, &options(3, 1), 1.0)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--max-epochs 1") && e.contains("math=0.2000"),
            "{e}"
        );
    }

    #[test]
    fn written_file_loads_as_an_ablation() {
        let b = budget();
        let swarm = draw_swarm(&b, &options(3, 5), 4.0).unwrap();
        let text = swarm_toml(
            &swarm,
            "../base.toml",
            None,
            &["train.steps=5".into()],
            &["a comment".into()],
        );
        let parsed: toml::Table = text.parse().unwrap();
        assert_eq!(parsed["base"].as_str(), Some("../base.toml"));
        let variants = parsed["variant"].as_array().unwrap();
        assert_eq!(variants.len(), 3);
        assert_eq!(variants[0]["name"].as_str(), Some("base"));
        let set = variants[1]["set"].as_array().unwrap();
        assert_eq!(set.len(), 3);
        assert!(set[0].as_str().unwrap().starts_with("data.mixture.web="));
    }

    #[test]
    fn relative_paths_walk_up_and_down() {
        let root = std::env::temp_dir().join(format!("moelab-mix-rel-{}", std::process::id()));
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::create_dir_all(root.join("c")).unwrap();
        std::fs::write(root.join("c/base.toml"), "").unwrap();
        let rel = relative_path(&root.join("c/base.toml"), &root.join("a/b")).unwrap();
        assert_eq!(rel, PathBuf::from("../../c/base.toml"));
        let _ = std::fs::remove_dir_all(&root);
    }
}
