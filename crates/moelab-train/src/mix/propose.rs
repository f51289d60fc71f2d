//! `moelab mix propose`: the mixture that minimises an objective over the fitted laws.
//!
//! The objective is a non-negative weighted sum of targets (`mean` is the mean validation loss
//! over the fitted domains). Each log-linear term `a (c + exp(t . w))` is convex in the mixture
//! and each linear term is linear, so with the simplex, per-domain bounds, the repetition limit
//! (an upper bound per domain) and a KL bound to the base (`sum w log(w / base) <= K`, convex) the
//! search is a convex program. It is solved exactly by the Clarabel interior-point solver: each
//! exponential term is an epigraph variable in an exponential cone, and each KL summand a
//! relative-entropy cone. A local or penalised search would need tuning this does not.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clarabel::algebra::CscMatrix;
use clarabel::solver::{DefaultSettings, DefaultSolver, IPSolver, SolverStatus, SupportedConeT};
use serde::{Deserialize, Serialize};

use super::fit::{FitReport, Law, LawKind};
use super::runs::MIX_DIR;
use super::swarm::{
    fmt_shares, mixture_overrides, relative_path, toml_list, toml_string, write_ablation_file,
    DomainBudget, BASE_VARIANT, DEFAULT_MAX_EPOCHS,
};
use crate::run::RunDir;
use crate::{Config, TrainError};

/// Name of the proposed variant in the proposal's ablation file.
pub const PROPOSAL_VARIANT: &str = "proposal";
/// File in the ablation's `mix/` folder recording the latest proposal (read by the report).
pub const PROPOSAL_RECORD: &str = "proposal.json";

/// A parsed objective: weight per target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Objective {
    /// The expression as given.
    pub text: String,
    /// (target, weight), weights positive.
    pub terms: Vec<(String, f64)>,
}

/// Parses `mean`, `math`, `math + 0.5*code`, `2*task/arith + mean`: terms joined by `+`, each an
/// optional `WEIGHT*` and a target name; `mean` stands for every fitted domain loss with weight
/// 1/D. Weights must be positive (losses are minimised; see the module docs).
pub fn parse_objective(text: &str, fit: &FitReport) -> Result<Objective, TrainError> {
    let known: Vec<&str> = fit.targets.iter().map(|t| t.target.as_str()).collect();
    let fail = |why: String| {
        TrainError::Argument(format!(
            "--objective `{text}`: {why}; fitted targets: {} (and `mean`: the mean loss over the \
             domains)",
            known.join(", ")
        ))
    };
    let mut weights: BTreeMap<String, f64> = BTreeMap::new();
    for raw in text.split('+') {
        let term = raw.trim();
        if term.is_empty() {
            return Err(fail("an empty term".into()));
        }
        let (weight, name) = match term.split_once('*') {
            Some((w, n)) => {
                let w: f64 = w
                    .trim()
                    .parse()
                    .map_err(|_| fail(format!("`{}` is not a number", w.trim())))?;
                (w, n.trim())
            }
            None => (1.0, term),
        };
        if !(weight > 0.0 && weight.is_finite()) {
            return Err(fail(format!(
                "weight {weight} of `{name}`: weights must be positive (the objective is a sum of \
                 losses to minimise)"
            )));
        }
        if name == "mean" {
            let domains: Vec<&String> = fit
                .domains
                .iter()
                .filter(|d| fit.target(d).is_some())
                .collect();
            if domains.is_empty() {
                return Err(fail("`mean` needs the domain losses fitted".into()));
            }
            for d in &domains {
                *weights.entry((*d).clone()).or_default() += weight / domains.len() as f64;
            }
        } else if known.contains(&name) {
            *weights.entry(name.to_string()).or_default() += weight;
        } else {
            return Err(fail(format!("unknown target `{name}`")));
        }
    }
    Ok(Objective {
        text: text.to_string(),
        terms: weights.into_iter().collect(),
    })
}

/// The convex program: minimise `sum_k weight_k law_k(w)` over the mixture `w`.
#[derive(Debug, Clone)]
pub struct MixProblem<'a> {
    /// (weight, law) terms of the objective.
    pub terms: Vec<(f64, &'a Law)>,
    /// Lower bound of each share.
    pub lower: Vec<f64>,
    /// Upper bound of each share (bounds and repetition limit together).
    pub upper: Vec<f64>,
    /// The base mixture (for the KL bound).
    pub base: Vec<f64>,
    /// Bound on KL(w || base), in nats.
    pub max_kl: Option<f64>,
}

impl MixProblem<'_> {
    /// The objective at `mixture`.
    pub fn value(&self, mixture: &[f64]) -> f64 {
        self.terms
            .iter()
            .map(|(a, law)| a * law.predict(mixture))
            .sum()
    }
}

/// KL(w || base) in nats (infinite when w puts mass where the base has none).
pub fn kl_divergence(w: &[f64], base: &[f64]) -> f64 {
    w.iter()
        .zip(base)
        .map(|(&p, &q)| match (p > 0.0, q > 0.0) {
            (false, _) => 0.0,
            (true, true) => p * (p / q).ln(),
            (true, false) => f64::INFINITY,
        })
        .sum()
}

/// Sparse `A` of `A x + s = b` built row by row, with its cones.
#[derive(Default)]
struct Rows {
    i: Vec<usize>,
    j: Vec<usize>,
    v: Vec<f64>,
    b: Vec<f64>,
}

impl Rows {
    fn row(&mut self, entries: &[(usize, f64)], b: f64) {
        let r = self.b.len();
        for &(col, val) in entries {
            self.i.push(r);
            self.j.push(col);
            self.v.push(val);
        }
        self.b.push(b);
    }
}

/// The conic program of a [`MixProblem`]: objective `q`, constraint rows, the size of the
/// nonnegative cone, the exponential cones' count and the upper bounds actually imposed.
struct Program {
    q: Vec<f64>,
    rows: Rows,
    nonneg: usize,
    exp_cones: usize,
    upper: Vec<f64>,
}

/// Builds the program. Variables: w (d), one epigraph s_k per log-linear term, one u_d per
/// base-positive domain (the KL bound).
fn program(problem: &MixProblem<'_>) -> Program {
    let d = problem.base.len();
    let exp_terms: Vec<(f64, &Law)> = problem
        .terms
        .iter()
        .filter(|(_, l)| l.kind == LawKind::LogLinear)
        .copied()
        .collect();
    let kl_domains: Vec<usize> = match problem.max_kl {
        Some(_) => (0..d).filter(|&k| problem.base[k] > 0.0).collect(),
        None => Vec::new(),
    };
    let (s0, u0) = (d, d + exp_terms.len());
    let n = u0 + kl_domains.len();
    let mut q = vec![0.0; n];
    for (a, law) in &problem.terms {
        if law.kind == LawKind::Linear {
            for (k, b) in law.coefficients.iter().enumerate() {
                q[k] += a * b;
            }
        }
    }
    for (k, (a, _)) in exp_terms.iter().enumerate() {
        q[s0 + k] = *a;
    }
    let mut rows = Rows::default();
    let all_w: Vec<(usize, f64)> = (0..d).map(|k| (k, 1.0)).collect();
    rows.row(&all_w, 1.0);
    let mut upper = problem.upper.clone();
    if problem.max_kl.is_some() {
        // Finite KL keeps every domain the base lacks at zero.
        for (u, b) in upper.iter_mut().zip(&problem.base) {
            if *b <= 0.0 {
                *u = 0.0;
            }
        }
    }
    for (k, (lo, hi)) in problem.lower.iter().zip(&upper).enumerate() {
        rows.row(&[(k, -1.0)], -lo);
        rows.row(&[(k, 1.0)], *hi);
    }
    if let Some(max_kl) = problem.max_kl {
        let all_u: Vec<(usize, f64)> = (0..kl_domains.len()).map(|k| (u0 + k, 1.0)).collect();
        rows.row(&all_u, max_kl);
    }
    let nonneg = rows.b.len() - 1;
    for (k, (_, law)) in exp_terms.iter().enumerate() {
        // (t . w, 1, s_k) in K_exp: exp(t . w) <= s_k.
        let t: Vec<(usize, f64)> = law
            .coefficients
            .iter()
            .enumerate()
            .map(|(j, t)| (j, -t))
            .collect();
        rows.row(&t, 0.0);
        rows.row(&[], 1.0);
        rows.row(&[(s0 + k, -1.0)], 0.0);
    }
    for (k, &dom) in kl_domains.iter().enumerate() {
        // (-u, w, base) in K_exp: w exp(-u / w) <= base, i.e. u >= w ln(w / base).
        rows.row(&[(u0 + k, 1.0)], 0.0);
        rows.row(&[(dom, -1.0)], 0.0);
        rows.row(&[], problem.base[dom]);
    }
    Program {
        q,
        rows,
        nonneg,
        exp_cones: exp_terms.len() + kl_domains.len(),
        upper,
    }
}

/// Solves `problem`; the error names the constraints when they leave no feasible mixture.
pub fn solve(problem: &MixProblem<'_>) -> Result<Vec<f64>, TrainError> {
    let d = problem.base.len();
    let Program {
        q,
        rows,
        nonneg,
        exp_cones,
        upper,
    } = program(problem);
    let (m, n) = (rows.b.len(), q.len());
    let a = CscMatrix::new_from_triplets(m, n, rows.i, rows.j, rows.v);
    let p = CscMatrix::zeros((n, n));
    let mut cones = vec![
        SupportedConeT::ZeroConeT(1),
        SupportedConeT::NonnegativeConeT(nonneg),
    ];
    cones.extend((0..exp_cones).map(|_| SupportedConeT::ExponentialConeT()));
    let settings = DefaultSettings {
        verbose: false,
        ..DefaultSettings::default()
    };
    let mut solver = DefaultSolver::new(&p, &q, &a, &rows.b, &cones, settings)
        .map_err(|e| TrainError::Argument(format!("the proposal program is malformed: {e:?}")))?;
    solver.solve();
    match solver.solution.status {
        SolverStatus::Solved | SolverStatus::AlmostSolved => {}
        SolverStatus::PrimalInfeasible | SolverStatus::AlmostPrimalInfeasible => {
            return Err(infeasible(problem, &upper))
        }
        other => {
            return Err(TrainError::Argument(format!(
                "the proposal solver stopped without a solution ({other:?})"
            )))
        }
    }
    // Interior-point solutions sit a hair inside the cones: clip and renormalise.
    let mut w: Vec<f64> = solver.solution.x[..d]
        .iter()
        .zip(&problem.lower)
        .zip(&upper)
        .map(|((x, lo), hi)| x.clamp(*lo, *hi).max(0.0))
        .collect();
    let total: f64 = w.iter().sum();
    w.iter_mut().for_each(|x| *x /= total);
    Ok(w)
}

/// The error for a program without a feasible mixture, naming the bounds that made it so.
fn infeasible(problem: &MixProblem<'_>, upper: &[f64]) -> TrainError {
    let shares = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.3}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    TrainError::Argument(format!(
        "no mixture satisfies every constraint: shares in [{}] .. [{}] (--bounds and the \
         repetition limit){}; widen --bounds, raise --max-epochs or --max-kl",
        shares(&problem.lower),
        shares(upper),
        problem
            .max_kl
            .map_or(String::new(), |k| format!(", KL to the base at most {k}"))
    ))
}

/// What `moelab mix propose` is asked for.
#[derive(Debug, Clone)]
pub struct ProposeOptions {
    /// The objective expression.
    pub objective: String,
    /// Bound on KL(proposal || base), nats.
    pub max_kl: Option<f64>,
    /// Repetition limit (None: the base's `data.max_repetition`, else 4).
    pub max_epochs: Option<f64>,
    /// `domain=lo:hi` bounds.
    pub bounds: Vec<String>,
    /// Seeds of the proposal ablation (empty: the seeds of the swarm's base runs).
    pub seeds: Vec<u64>,
    /// The ablation file to write.
    pub out: PathBuf,
    /// Its `out_dir` (None: `<ABLATION_DIR>-proposal`).
    pub out_dir: Option<PathBuf>,
}

/// Per-target prediction at the proposal and the base.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetPrediction {
    /// Target name.
    pub target: String,
    /// Objective weight (0 when not in the objective).
    pub weight: f64,
    /// Model used.
    pub model: String,
    /// Predicted at the proposal.
    pub proposal: f64,
    /// Predicted at the base.
    pub base: f64,
    /// Measured at the base in the swarm (mean over its base runs), when measured.
    pub base_measured: Option<f64>,
    /// The law's leave-one-out RMSE (the band of each prediction).
    pub loo_rmse: f64,
}

/// The proposal JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Proposal {
    /// The swarm's ablation folder.
    pub swarm_dir: PathBuf,
    /// The objective.
    pub objective: Objective,
    /// Domains, in order.
    pub domains: Vec<String>,
    /// Proposed shares.
    pub proposal: Vec<f64>,
    /// Base shares.
    pub base: Vec<f64>,
    /// Objective predicted at the proposal.
    pub predicted: f64,
    /// Objective predicted at the base.
    pub predicted_base: f64,
    /// Leave-one-out RMSE of the objective over the runs measuring all its targets (the
    /// prediction's band: predicted +- loo_rmse).
    pub loo_rmse: f64,
    /// [predicted - loo_rmse, predicted + loo_rmse].
    pub interval: [f64; 2],
    /// Every fitted target at the proposal and the base.
    pub targets: Vec<TargetPrediction>,
    /// KL(proposal || base), nats.
    pub kl_to_base: f64,
    /// The KL bound given.
    pub max_kl: Option<f64>,
    /// The repetition limit.
    pub max_epochs: f64,
    /// Implied epochs of each domain at the proposal.
    pub epochs: Vec<f64>,
    /// Lower and upper share bound of each domain (bounds and repetition limit).
    pub lower: Vec<f64>,
    /// Upper share bounds.
    pub upper: Vec<f64>,
    /// The ablation file written (proposal against base).
    pub ablation: PathBuf,
    /// Its output folder.
    pub out_dir: PathBuf,
    /// Its seeds.
    pub seeds: Vec<u64>,
}

/// Parses `domain=lo:hi` into per-domain bounds over `domains` (defaults [0, 1]).
pub fn parse_bounds(
    specs: &[String],
    domains: &[String],
) -> Result<(Vec<f64>, Vec<f64>), TrainError> {
    let mut lower = vec![0.0; domains.len()];
    let mut upper = vec![1.0; domains.len()];
    for spec in specs {
        let fail = |why: &str| {
            TrainError::Argument(format!(
                "--bounds {spec}: {why}; write DOMAIN=LO:HI with 0 <= LO <= HI <= 1, e.g. \
                 --bounds math=0.1:0.4 (domains: {})",
                domains.join(", ")
            ))
        };
        let (name, range) = spec.split_once('=').ok_or_else(|| fail("no `=`"))?;
        let k = domains
            .iter()
            .position(|d| d == name.trim())
            .ok_or_else(|| fail("unknown domain"))?;
        let (lo, hi) = range.split_once(':').ok_or_else(|| fail("no `:`"))?;
        let parse = |s: &str| -> Result<f64, TrainError> {
            s.trim().parse::<f64>().map_err(|_| fail("not a number"))
        };
        let (lo, hi) = (parse(lo)?, parse(hi)?);
        if !(0.0..=1.0).contains(&lo) || !(0.0..=1.0).contains(&hi) || lo > hi {
            return Err(fail("out of order or outside [0, 1]"));
        }
        lower[k] = lo;
        upper[k] = hi;
    }
    Ok((lower, upper))
}

/// The swarm's base runs: (run folders, their mixture by fit domain order, seeds).
fn base_runs(
    fit: &FitReport,
    runs: &super::runs::SwarmRuns,
) -> Result<(PathBuf, Vec<u64>), TrainError> {
    let base: Vec<&super::runs::RunMeasures> = runs
        .runs
        .iter()
        .filter(|r| r.variant == BASE_VARIANT)
        .collect();
    let first = base.first().ok_or_else(|| {
        TrainError::Argument(format!(
            "{} has no finished `{BASE_VARIANT}` run; the swarm's first variant is its base \
             (`moelab mix swarm` writes it), and the proposal is compared against it",
            fit.dir.display()
        ))
    })?;
    let mut seeds: Vec<u64> = base.iter().map(|r| r.seed).collect();
    seeds.dedup();
    Ok((fit.dir.join(&first.label), seeds))
}

/// Everything `moelab mix propose` does; returns the proposal (also written as JSON beside the
/// ablation file and into the swarm's `mix/` folder).
pub fn propose(
    fit: &FitReport,
    runs: &super::runs::SwarmRuns,
    options: &ProposeOptions,
) -> Result<Proposal, TrainError> {
    let objective = parse_objective(&options.objective, fit)?;
    let (base_dir, base_seeds) = base_runs(fit, runs)?;
    let base_cfg = Config::load(&RunDir::new(&base_dir).config(), &[])?;
    let domains = &fit.domains;
    let (base, epochs_per_share) = base_shares(&DomainBudget::of_config(&base_cfg)?, domains);
    let max_epochs = options
        .max_epochs
        .or(base_cfg.data.max_repetition)
        .unwrap_or(DEFAULT_MAX_EPOCHS);
    check_limits(max_epochs, options.max_kl)?;
    let (lower, mut upper) = parse_bounds(&options.bounds, domains)?;
    for (u, e) in upper.iter_mut().zip(&epochs_per_share) {
        if *e > 0.0 {
            *u = u.min(max_epochs / e);
        }
    }
    let laws: Vec<(f64, &Law)> = objective
        .terms
        .iter()
        .map(|(t, a)| fit.target(t).map(|f| (*a, &f.law)))
        .collect::<Option<_>>()
        .ok_or_else(|| TrainError::Argument("objective names an unfitted target".into()))?;
    let problem = MixProblem {
        terms: laws,
        lower: lower.clone(),
        upper: upper.clone(),
        base: base.clone(),
        max_kl: options.max_kl,
    };
    let proposal = solve(&problem)?;
    let seeds = if options.seeds.is_empty() {
        base_seeds
    } else {
        options.seeds.clone()
    };
    let out_dir = options.out_dir.clone().unwrap_or_else(|| {
        let mut name = fit
            .dir
            .file_name()
            .map_or_else(|| "swarm".into(), |n| n.to_os_string());
        name.push("-proposal");
        fit.dir.with_file_name(name)
    });
    write_proposal_ablation(
        &options.out,
        &base_dir,
        &out_dir,
        &seeds,
        domains,
        &proposal,
        &objective,
    )?;
    let result = Proposal {
        swarm_dir: fit.dir.clone(),
        predicted: problem.value(&proposal),
        predicted_base: problem.value(&base),
        loo_rmse: objective_loo_rmse(fit, &objective),
        interval: [0.0, 0.0],
        targets: target_predictions(fit, runs, &objective, &proposal, &base),
        kl_to_base: kl_divergence(&proposal, &base),
        max_kl: options.max_kl,
        max_epochs,
        epochs: proposal
            .iter()
            .zip(&epochs_per_share)
            .map(|(w, e)| w * e)
            .collect(),
        lower,
        upper,
        ablation: options.out.clone(),
        out_dir,
        seeds,
        objective,
        domains: domains.clone(),
        proposal,
        base,
    };
    let result = Proposal {
        interval: [
            result.predicted - result.loo_rmse,
            result.predicted + result.loo_rmse,
        ],
        ..result
    };
    write_record(
        &result,
        &[
            options.out.with_extension("json"),
            fit.dir.join(MIX_DIR).join(PROPOSAL_RECORD),
        ],
    )?;
    Ok(result)
}

/// The base mixture's shares and the epochs one unit of share costs, per fitted domain (0 for
/// a domain the base config lacks).
fn base_shares(budget: &DomainBudget, domains: &[String]) -> (Vec<f64>, Vec<f64>) {
    let per_share = |d: &String| {
        budget
            .domains
            .iter()
            .position(|b| b == d)
            .map_or((0.0, 0.0), |k| (budget.base[k], budget.epochs_per_share[k]))
    };
    domains.iter().map(per_share).unzip()
}

/// Refuses a non-positive repetition limit or a negative / non-finite KL bound.
fn check_limits(max_epochs: f64, max_kl: Option<f64>) -> Result<(), TrainError> {
    if max_epochs.is_nan() || max_epochs <= 0.0 {
        return Err(TrainError::Argument(format!(
            "--max-epochs {max_epochs}: must be positive"
        )));
    }
    if let Some(k) = max_kl.filter(|k| !(*k >= 0.0 && k.is_finite())) {
        return Err(TrainError::Argument(format!(
            "--max-kl {k}: must be a non-negative number of nats"
        )));
    }
    Ok(())
}

/// Writes the proposal as JSON to each of `paths`.
fn write_record(result: &Proposal, paths: &[PathBuf]) -> Result<(), TrainError> {
    let json = serde_json::to_string_pretty(result)
        .map_err(|e| TrainError::Argument(format!("serialising the proposal: {e}")))?;
    for path in paths {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(TrainError::io(dir))?;
        }
        moelab_io::write_atomic(path, json.as_bytes()).map_err(TrainError::io(path))?;
    }
    Ok(())
}

/// Leave-one-out RMSE of the whole objective: per run, the weighted sum of every term's held-out
/// error, over the runs that measured every term.
fn objective_loo_rmse(fit: &FitReport, objective: &Objective) -> f64 {
    let mut errors: BTreeMap<&str, (usize, f64)> = BTreeMap::new();
    for (target, weight) in &objective.terms {
        let Some(t) = fit.target(target) else {
            continue;
        };
        let Some(check) = t.chosen() else { continue };
        for ((label, measured), predicted) in
            t.runs.iter().zip(&t.measured).zip(&check.loo_predictions)
        {
            let e = errors.entry(label.as_str()).or_default();
            e.0 += 1;
            e.1 += weight * (predicted - measured);
        }
    }
    let complete: Vec<f64> = errors
        .values()
        .filter(|(count, _)| *count == objective.terms.len())
        .map(|(_, e)| *e)
        .collect();
    if complete.is_empty() {
        return f64::NAN;
    }
    (complete.iter().map(|e| e * e).sum::<f64>() / complete.len() as f64).sqrt()
}

/// Every fitted target at the proposal and at the base.
fn target_predictions(
    fit: &FitReport,
    runs: &super::runs::SwarmRuns,
    objective: &Objective,
    proposal: &[f64],
    base: &[f64],
) -> Vec<TargetPrediction> {
    fit.targets
        .iter()
        .map(|t| {
            let measured: Vec<f64> = runs
                .runs
                .iter()
                .filter(|r| r.variant == BASE_VARIANT)
                .filter_map(|r| r.measures.get(&t.target).copied())
                .collect();
            TargetPrediction {
                target: t.target.clone(),
                weight: objective
                    .terms
                    .iter()
                    .find(|(n, _)| *n == t.target)
                    .map_or(0.0, |x| x.1),
                model: t.law.kind.name().into(),
                proposal: t.law.predict(proposal),
                base: t.law.predict(base),
                base_measured: (!measured.is_empty())
                    .then(|| measured.iter().sum::<f64>() / measured.len() as f64),
                loo_rmse: t.loo_rmse,
            }
        })
        .collect()
}

/// Writes the proposal's ablation file: the swarm base's resolved config as a snapshot beside
/// it (`<stem>.base.toml`, so the file does not depend on the swarm's folder), then `base` and
/// `proposal` variants over `seeds`.
fn write_proposal_ablation(
    out: &Path,
    base_run: &Path,
    out_dir: &Path,
    seeds: &[u64],
    domains: &[String],
    proposal: &[f64],
    objective: &Objective,
) -> Result<(), TrainError> {
    let folder = match out.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => d.to_path_buf(),
        None => PathBuf::from("."),
    };
    std::fs::create_dir_all(&folder).map_err(TrainError::io(&folder))?;
    let stem = out
        .file_stem()
        .map_or_else(|| "proposal".into(), |s| s.to_string_lossy().into_owned());
    let snapshot = folder.join(format!("{stem}.base.toml"));
    let config_path = RunDir::new(base_run).config();
    let config = std::fs::read_to_string(&config_path).map_err(TrainError::io(&config_path))?;
    let text = format!(
        "# The resolved config of the swarm's base run ({}), copied by `moelab mix propose`.\n{config}",
        config_path.display()
    );
    moelab_io::write_atomic(&snapshot, text.as_bytes()).map_err(TrainError::io(&snapshot))?;
    let rounded: Vec<f64> = proposal.iter().map(|w| (w * 1e6).round() / 1e6).collect();
    let seeds_text: Vec<String> = seeds.iter().map(u64::to_string).collect();
    let file = format!(
        "# Written by `moelab mix propose` for objective `{}`: the proposed mixture against the \
         swarm's base, over the base's seeds.\n# Proposal: {}.\n# Train it with `moelab ablate {}`.\n\
         base = {}\nout_dir = {}\nset = []\nseeds = [{}]\n\n[[variant]]\nname = {}\nset = []\n\n\
         [[variant]]\nname = {}\nset = {}\n",
        objective.text,
        fmt_shares(domains, &rounded),
        out.display(),
        toml_string(&relative_path(&snapshot, &folder)?.to_string_lossy()),
        toml_string(&out_dir.to_string_lossy()),
        seeds_text.join(", "),
        toml_string(BASE_VARIANT),
        toml_string(PROPOSAL_VARIANT),
        toml_list(&mixture_overrides(domains, &rounded)),
    );
    write_ablation_file(out, &file)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn loglin(c: f64, t: &[f64]) -> Law {
        Law {
            kind: LawKind::LogLinear,
            c,
            coefficients: t.to_vec(),
        }
    }

    /// The best point of a 0.002 grid over the 3-simplex that satisfies `ok`.
    fn grid_optimum(problem: &MixProblem<'_>, ok: &dyn Fn(&[f64]) -> bool) -> (Vec<f64>, f64) {
        let steps = 500;
        let mut best = (vec![], f64::INFINITY);
        for i in 0..=steps {
            for j in 0..=(steps - i) {
                let w = [
                    i as f64 / steps as f64,
                    j as f64 / steps as f64,
                    (steps - i - j) as f64 / steps as f64,
                ];
                if !ok(&w) {
                    continue;
                }
                let v = problem.value(&w);
                if v < best.1 {
                    best = (w.to_vec(), v);
                }
            }
        }
        best
    }

    #[test]
    fn finds_the_known_optimum_of_log_linear_laws() {
        // Two targets pulling different ways: the optimum is interior.
        let a = loglin(1.0, &[0.5, -1.0, 0.8]);
        let b = loglin(0.5, &[-0.7, 0.6, 0.4]);
        let problem = MixProblem {
            terms: vec![(1.0, &a), (0.5, &b)],
            lower: vec![0.0; 3],
            upper: vec![1.0; 3],
            base: vec![1.0 / 3.0; 3],
            max_kl: None,
        };
        let w = solve(&problem).unwrap();
        let (grid_w, grid_v) = grid_optimum(&problem, &|_| true);
        assert!(
            problem.value(&w) <= grid_v + 1e-6,
            "{w:?} vs grid {grid_w:?}"
        );
        for (x, y) in w.iter().zip(&grid_w) {
            assert!((x - y).abs() < 0.01, "{w:?} vs grid {grid_w:?}");
        }
    }

    #[test]
    fn respects_bounds_repetition_and_kl() {
        let a = loglin(1.0, &[0.5, -1.0, 0.8]);
        let lin = Law {
            kind: LawKind::Linear,
            c: 0.0,
            coefficients: vec![2.0, 1.0, 3.0],
        };
        let base = vec![0.5, 0.3, 0.2];
        let problem = MixProblem {
            terms: vec![(1.0, &a), (1.0, &lin)],
            lower: vec![0.1, 0.0, 0.0],
            upper: vec![1.0, 0.5, 1.0],
            base: base.clone(),
            max_kl: Some(0.05),
        };
        let w = solve(&problem).unwrap();
        assert!(w[0] >= 0.1 - 1e-6 && w[1] <= 0.5 + 1e-6, "{w:?}");
        let kl = kl_divergence(&w, &base);
        assert!(kl <= 0.05 + 1e-5, "{kl}");
        // Domain 1 is the cheapest for both terms, so the KL bound binds.
        assert!(kl > 0.045, "{kl}");
        let ok = |v: &[f64]| v[0] >= 0.1 && v[1] <= 0.5 && kl_divergence(v, &base) <= 0.05;
        let (_, grid_v) = grid_optimum(&problem, &ok);
        assert!(
            problem.value(&w) <= grid_v + 1e-4,
            "{} vs {grid_v}",
            problem.value(&w)
        );
        assert!(problem.value(&w) < problem.value(&base));
    }

    #[test]
    fn infeasible_constraints_are_named() {
        let a = loglin(1.0, &[0.0, 0.0]);
        let problem = MixProblem {
            terms: vec![(1.0, &a)],
            lower: vec![0.7, 0.7],
            upper: vec![1.0, 1.0],
            base: vec![0.5, 0.5],
            max_kl: None,
        };
        let err = solve(&problem).unwrap_err().to_string();
        assert!(
            err.contains("no mixture satisfies") && err.contains("--bounds"),
            "{err}"
        );
    }

    fn report(targets: &[&str]) -> FitReport {
        let law = loglin(1.0, &[0.0, 0.0]);
        FitReport {
            dir: PathBuf::from("swarm"),
            domains: vec!["web".into(), "math".into()],
            runs: 5,
            targets: targets
                .iter()
                .map(|t| super::super::fit::TargetFit {
                    target: (*t).into(),
                    law: law.clone(),
                    loo_rmse: 0.1,
                    loo_spearman: None,
                    checks: vec![],
                    runs: vec![],
                    measured: vec![],
                    mixtures: vec![],
                })
                .collect(),
            notes: vec![],
        }
    }

    #[test]
    fn objectives_parse_mean_weights_and_refuse_the_rest() {
        let fit = report(&["web", "math", "task/arith"]);
        let o = parse_objective("mean", &fit).unwrap();
        assert_eq!(o.terms, vec![("math".into(), 0.5), ("web".into(), 0.5)]);
        let o = parse_objective("math + 0.5*web + 2 * task/arith", &fit).unwrap();
        assert_eq!(
            o.terms,
            vec![
                ("math".into(), 1.0),
                ("task/arith".into(), 2.0),
                ("web".into(), 0.5)
            ]
        );
        let o = parse_objective("mean + math", &fit).unwrap();
        assert_eq!(o.terms, vec![("math".into(), 1.5), ("web".into(), 0.5)]);
        for (bad, needle) in [
            ("code", "unknown target `code`"),
            ("-1*math", "weights must be positive"),
            ("math +", "empty term"),
            ("x*math", "`x` is not a number"),
        ] {
            let err = parse_objective(bad, &fit).unwrap_err().to_string();
            assert!(
                err.contains(needle) && err.contains("task/arith"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn bounds_parse_and_refuse() {
        let domains = vec!["web".to_string(), "math".to_string()];
        let (lo, hi) = parse_bounds(&["math=0.1:0.4".into()], &domains).unwrap();
        assert_eq!((lo, hi), (vec![0.0, 0.1], vec![1.0, 0.4]));
        for bad in ["code=0:1", "math=0.5:0.1", "math0.1:0.2", "math=x:1"] {
            let err = parse_bounds(&[bad.into()], &domains)
                .unwrap_err()
                .to_string();
            assert!(err.contains(bad), "{err}");
        }
    }
}
