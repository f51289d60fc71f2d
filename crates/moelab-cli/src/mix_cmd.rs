//! `moelab mix swarm|fit|propose`: mixture search over ablations (see docs/MIXTURES.md).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use moelab_train::mix::fit::{fit_runs, FitReport, LawKind};
use moelab_train::mix::propose::{propose, ProposeOptions};
use moelab_train::mix::report::{fit_table, recorded_proposal, write_report};
use moelab_train::mix::runs::read_runs;
use moelab_train::mix::swarm::{write_swarm, SwarmOptions};

/// The `moelab mix` subcommands.
#[derive(Debug, Subcommand)]
pub enum MixCommand {
    /// Write an ablation file of N mixtures drawn around a base config's mixture.
    Swarm(SwarmArgs),
    /// Fit each measure of a trained swarm as a function of the mixture; write mix_report.md.
    Fit(FitArgs),
    /// Propose the mixture minimising an objective over the fitted laws, as an ablation file.
    Propose(ProposeArgs),
}

/// Arguments of `moelab mix fit`.
#[derive(Debug, Args)]
#[command(after_help = "Example: moelab mix fit runs/mix/swarm --json\n\n\
Reads every finished run under the folder (its realised mixture and final evaluation), fits each target \
as c + exp(sum_j t_j w_j) and as sum_j b_j w_j, keeps the one with the lower leave-one-out RMSE, and \
writes DIR/mix/fit.json, DIR/mix/mix_report.md and its plots. Targets: <domain> (validation loss), \
bpb/<domain> (bits per byte, when evaluated), task/<task> (task bits per byte).")]
pub struct FitArgs {
    /// Output folder of `moelab ablate SWARM.toml`.
    dir: PathBuf,
    /// Fit only these targets (repeatable; default: every measured one).
    #[arg(long = "target", value_name = "NAME")]
    targets: Vec<String>,
    /// Fit only this law: log-linear or linear (default: both, chosen by leave-one-out).
    #[arg(long, value_name = "MODEL")]
    model: Option<String>,
    /// Machine-readable output (the fit: laws, leave-one-out errors and predictions).
    #[arg(long)]
    json: bool,
}

/// Arguments of `moelab mix propose`.
#[derive(Debug, Args)]
#[command(
    after_help = "Example: moelab mix propose runs/mix/swarm --objective mean --max-kl 0.5 --seeds 1,2,3 --out runs/mix/proposal.toml\n\n\
The objective is a sum of positive multiples of fitted targets: `mean` (mean validation loss over the \
domains), `math + 0.5*code`, `task/arith + mean`. The proposal minimises it under the simplex, --bounds, \
the repetition limit and --max-kl (KL to the base, nats). Writes OUT (proposal against base, ready for \
`moelab ablate`), OUT's stem .base.toml (the base run's config), OUT with .json (prediction and \
leave-one-out band) and refreshes DIR/mix/mix_report.md."
)]
pub struct ProposeArgs {
    /// Output folder of `moelab ablate SWARM.toml`.
    dir: PathBuf,
    /// The objective to minimise.
    #[arg(long)]
    objective: String,
    /// Bound on KL(proposal || base) in nats.
    #[arg(long, value_name = "K")]
    max_kl: Option<f64>,
    /// Repetition limit: implied epochs of any domain (default: data.max_repetition, else 4).
    #[arg(long, value_name = "R")]
    max_epochs: Option<f64>,
    /// Share bounds of a domain, e.g. --bounds math=0.1:0.4 (repeatable).
    #[arg(long = "bounds", value_name = "DOMAIN=LO:HI")]
    bounds: Vec<String>,
    /// Seeds of the proposal's ablation, comma-separated (default: the swarm base's seeds).
    #[arg(long, value_delimiter = ',', value_name = "S,S")]
    seeds: Vec<u64>,
    /// Fit only this law: log-linear or linear (default: chosen by leave-one-out per target).
    #[arg(long, value_name = "MODEL")]
    model: Option<String>,
    /// The ablation file to write.
    #[arg(long)]
    out: PathBuf,
    /// Output folder written into the file (default: DIR-proposal).
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,
    /// Machine-readable output (the proposal JSON).
    #[arg(long)]
    json: bool,
}

/// Arguments of `moelab mix swarm`.
#[derive(Debug, Args)]
#[command(
    after_help = "Example: moelab mix swarm configs/tiny.toml --runs 16 --out runs/mix/swarm.toml --set train.steps=150\n\n\
Mixtures are drawn from Dirichlet(A x base) and floored at --min-share; a draw that would read any \
domain more than --max-epochs times at the base run's token budget is drawn again. The base mixture is \
the first variant (`base`). Train the file with `moelab ablate` (also --parallel N or --slurm)."
)]
pub struct SwarmArgs {
    /// Base run config (TOML); its mixture is the centre of the swarm.
    base: PathBuf,
    /// Variants to write, the base included.
    #[arg(long)]
    runs: usize,
    /// The ablation file to write.
    #[arg(long)]
    out: PathBuf,
    /// Dirichlet concentration A: larger keeps mixtures closer to the base.
    #[arg(long, default_value_t = 10.0)]
    concentration: f64,
    /// Seed of the draws (the same seed writes the same file).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Smallest share any domain gets.
    #[arg(long, default_value_t = 0.0)]
    min_share: f64,
    /// Repetition limit: implied epochs of any domain (default: data.max_repetition, else 4).
    #[arg(long)]
    max_epochs: Option<f64>,
    /// Ablation output folder written into the file (`out_dir`; default runs/ablations/<stem>).
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,
    /// Override for every variant, e.g. --set train.steps=150 (repeatable; goes into `set`).
    #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
    overrides: Vec<String>,
    /// Machine-readable output (the swarm: domains, budget, every variant's mixture and epochs).
    #[arg(long)]
    json: bool,
}

/// Runs a `moelab mix` subcommand.
pub fn run(command: MixCommand) -> anyhow::Result<()> {
    match command {
        MixCommand::Swarm(args) => swarm(args),
        MixCommand::Fit(args) => fit(args),
        MixCommand::Propose(args) => run_propose(args),
    }
}

/// Reads the runs under `dir` and fits them.
fn fit_dir(
    dir: &std::path::Path,
    targets: &[String],
    model: Option<&str>,
) -> anyhow::Result<FitReport> {
    let model = model.map(LawKind::parse).transpose()?;
    let runs = read_runs(dir).with_context(|| format!("reading the runs of {}", dir.display()))?;
    Ok(fit_runs(&runs, targets, model)?)
}

fn fit(args: FitArgs) -> anyhow::Result<()> {
    let report = fit_dir(&args.dir, &args.targets, args.model.as_deref())?;
    let path = write_report(&report, recorded_proposal(&args.dir).as_ref())?;
    if args.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&report).context("serialising the fit")?
        );
        return Ok(());
    }
    outln!(
        "{} runs over {} domains ({})",
        report.runs,
        report.domains.len(),
        report.domains.join(", ")
    );
    out!("{}", fit_table(&report));
    for note in &report.notes {
        outln!("note: {note}");
    }
    outln!("report: {}", path.display());
    Ok(())
}

fn run_propose(args: ProposeArgs) -> anyhow::Result<()> {
    let model = args.model.as_deref().map(LawKind::parse).transpose()?;
    let runs = read_runs(&args.dir)
        .with_context(|| format!("reading the runs of {}", args.dir.display()))?;
    let report = fit_runs(&runs, &[], model)?;
    let options = ProposeOptions {
        objective: args.objective.clone(),
        max_kl: args.max_kl,
        max_epochs: args.max_epochs,
        bounds: args.bounds.clone(),
        seeds: args.seeds.clone(),
        out: args.out.clone(),
        out_dir: args.out_dir.clone(),
    };
    let proposal = propose(&report, &runs, &options)?;
    let path = write_report(&report, Some(&proposal))?;
    if args.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&proposal).context("serialising the proposal")?
        );
        return Ok(());
    }
    outln!(
        "{:<12} {:>8} {:>9} {:>7}",
        "domain",
        "base",
        "proposal",
        "epochs"
    );
    for (k, d) in proposal.domains.iter().enumerate() {
        outln!(
            "{d:<12} {:>8.4} {:>9.4} {:>7.2}",
            proposal.base[k],
            proposal.proposal[k],
            proposal.epochs[k]
        );
    }
    outln!(
        "objective `{}`: predicted {:.4} +- {:.4} (LOO) at the proposal, {:.4} at the base; KL to base {:.4}",
        proposal.objective.text, proposal.predicted, proposal.loo_rmse, proposal.predicted_base, proposal.kl_to_base
    );
    outln!(
        "wrote {} (+ .json); report: {}",
        args.out.display(),
        path.display()
    );
    outln!("next: moelab ablate {}", args.out.display());
    Ok(())
}

fn swarm(args: SwarmArgs) -> anyhow::Result<()> {
    let options = SwarmOptions {
        runs: args.runs,
        concentration: args.concentration,
        seed: args.seed,
        min_share: args.min_share,
        max_epochs: args.max_epochs,
        overrides: args.overrides.clone(),
    };
    let swarm = write_swarm(&args.base, &options, &args.out, args.out_dir.as_deref())
        .with_context(|| format!("writing the swarm {}", args.out.display()))?;
    if args.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&swarm).context("serialising the swarm")?
        );
        return Ok(());
    }
    let domains = &swarm.budget.domains;
    outln!(
        "{} variants -> {} (at most {} epochs per domain over {} sequences)",
        swarm.variants.len(),
        args.out.display(),
        swarm.max_epochs,
        swarm.budget.sequences
    );
    let header: Vec<String> = domains.iter().map(|d| format!("{d:>10}")).collect();
    outln!("{:<10} {}  max epochs", "variant", header.join(" "));
    for v in &swarm.variants {
        let shares: Vec<String> = v.mixture.iter().map(|w| format!("{w:>10.4}")).collect();
        let max_epochs = v.epochs.iter().copied().fold(0.0, f64::max);
        outln!("{:<10} {}  {max_epochs:.3}", v.name, shares.join(" "));
    }
    outln!("next: moelab ablate {}", args.out.display());
    Ok(())
}
