//! `moelab mix fit`: each measure as a function of the mixture, two ways, chosen by
//! leave-one-out error.
//!
//! - Log-linear (Data Mixing Laws, Olmix): `y = c + exp(sum_j t_j w_j)`, D + 1 parameters. Shares
//!   sum to one, so a constant inside the exponent is already a shift of every `t_j`; `c` is the
//!   part of the measure no mixture removes and is kept in `[0, min y)`. Fitted by variable
//!   projection (for a fixed `c`, `ln(y - c)` is linear in `w`: least squares by SVD; `c` by
//!   Brent's method over the SSE in the measure's own units), then refined jointly by
//!   Gauss-Newton with a line search on the same SSE.
//! - Linear (RegMix): `y = sum_j b_j w_j`, D parameters (no intercept: it would be collinear with
//!   the shares).
//!
//! Leave-one-out refits the model without each run in turn and predicts that run; its RMSE picks
//! the model, and the Spearman rank correlation of those held-out predictions against the
//! measured values says whether the law ranks mixtures right, which is what a search needs.

use argmin::core::{CostFunction, Error as ArgminError, Executor, Jacobian, Operator};
use argmin::solver::brent::BrentOpt;
use argmin::solver::gaussnewton::GaussNewtonLS;
use argmin::solver::linesearch::{condition::ArmijoCondition, BacktrackingLineSearch};
use nalgebra::{DMatrix, DVector};
use serde::Serialize;

use super::runs::SwarmRuns;
use crate::TrainError;

/// Which law.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LawKind {
    /// `c + exp(sum_j t_j w_j)`.
    LogLinear,
    /// `sum_j b_j w_j`.
    Linear,
}

impl LawKind {
    /// Parameters of the law over `domains` domains.
    pub fn parameters(self, domains: usize) -> usize {
        match self {
            LawKind::LogLinear => domains + 1,
            LawKind::Linear => domains,
        }
    }

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            LawKind::LogLinear => "log-linear",
            LawKind::Linear => "linear",
        }
    }

    /// Parses `log-linear` or `linear`.
    pub fn parse(s: &str) -> Result<Self, TrainError> {
        match s {
            "log-linear" => Ok(LawKind::LogLinear),
            "linear" => Ok(LawKind::Linear),
            other => Err(TrainError::Argument(format!(
                "--model {other}: expected `log-linear` or `linear`"
            ))),
        }
    }
}

/// A fitted law.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Law {
    /// Which form.
    pub kind: LawKind,
    /// `c` of the log-linear law (0 for the linear one).
    pub c: f64,
    /// `t_j` (log-linear) or `b_j` (linear), one per domain.
    pub coefficients: Vec<f64>,
}

impl Law {
    /// The law's value at `mixture`.
    pub fn predict(&self, mixture: &[f64]) -> f64 {
        let dot: f64 = self
            .coefficients
            .iter()
            .zip(mixture)
            .map(|(t, w)| t * w)
            .sum();
        match self.kind {
            LawKind::LogLinear => self.c + dot.exp(),
            LawKind::Linear => dot,
        }
    }
}

/// Why a model cannot be fitted to `runs` runs over `domains` domains, if it cannot: leave-one-out
/// fits on `runs - 1` runs, which must be at least the number of parameters.
pub fn too_few_runs(kind: LawKind, runs: usize, domains: usize) -> Option<String> {
    let p = kind.parameters(domains);
    (runs < p + 1).then(|| {
        format!(
            "the {} law over {domains} domains has {p} parameters; fitting it and checking it by \
             leave-one-out needs at least {} finished runs, and there are {runs}. Train more \
             swarm variants (`moelab mix swarm --runs N`, N >= {}), or fit fewer domains",
            kind.name(),
            p + 1,
            p + 1
        )
    })
}

/// Least squares `x` of `a x = b` by SVD (the minimum-norm solution when `a` is rank deficient).
fn least_squares(a: &DMatrix<f64>, b: &DVector<f64>) -> Result<DVector<f64>, TrainError> {
    a.clone()
        .svd(true, true)
        .solve(b, 1e-12)
        .map_err(|e| TrainError::Argument(format!("least squares failed: {e}")))
}

/// The mixtures as an `n x D` matrix.
fn design(mixtures: &[Vec<f64>]) -> DMatrix<f64> {
    let d = mixtures.first().map_or(0, Vec::len);
    DMatrix::from_fn(mixtures.len(), d, |i, j| mixtures[i][j])
}

/// Fits the linear law by least squares.
pub fn fit_linear(mixtures: &[Vec<f64>], y: &[f64]) -> Result<Law, TrainError> {
    let b = least_squares(&design(mixtures), &DVector::from_column_slice(y))?;
    Ok(Law {
        kind: LawKind::Linear,
        c: 0.0,
        coefficients: b.iter().copied().collect(),
    })
}

/// Sum of squared errors of `law` on the runs.
fn sse(law: &Law, mixtures: &[Vec<f64>], y: &[f64]) -> f64 {
    mixtures
        .iter()
        .zip(y)
        .map(|(w, v)| (law.predict(w) - v).powi(2))
        .sum()
}

/// For a fixed `c`: `t` from least squares of `ln(y - c)` on the mixtures.
fn projected(c: f64, w: &DMatrix<f64>, y: &[f64]) -> Result<Law, TrainError> {
    let z = DVector::from_iterator(y.len(), y.iter().map(|v| (v - c).ln()));
    let t = least_squares(w, &z)?;
    Ok(Law {
        kind: LawKind::LogLinear,
        c,
        coefficients: t.iter().copied().collect(),
    })
}

/// The SSE of the variable-projection fit as a function of `c` (what Brent minimises).
struct ProjectedCost<'a> {
    w: DMatrix<f64>,
    mixtures: &'a [Vec<f64>],
    y: &'a [f64],
}

impl CostFunction for ProjectedCost<'_> {
    type Param = f64;
    type Output = f64;
    fn cost(&self, c: &f64) -> Result<f64, ArgminError> {
        let law = projected(*c, &self.w, self.y)?;
        let value = sse(&law, self.mixtures, self.y);
        Ok(if value.is_finite() { value } else { f64::MAX })
    }
}

/// Residuals `c + exp(w_i . t) - y_i` and their Jacobian in `(c, t)`, for Gauss-Newton.
struct Residuals<'a> {
    mixtures: &'a [Vec<f64>],
    y: &'a [f64],
}

impl Operator for Residuals<'_> {
    type Param = DVector<f64>;
    type Output = DVector<f64>;
    fn apply(&self, p: &DVector<f64>) -> Result<DVector<f64>, ArgminError> {
        let law = Law {
            kind: LawKind::LogLinear,
            c: p[0],
            coefficients: p.iter().skip(1).copied().collect(),
        };
        Ok(DVector::from_iterator(
            self.y.len(),
            self.mixtures
                .iter()
                .zip(self.y)
                .map(|(w, v)| law.predict(w) - v),
        ))
    }
}

impl Jacobian for Residuals<'_> {
    type Param = DVector<f64>;
    type Jacobian = DMatrix<f64>;
    fn jacobian(&self, p: &DVector<f64>) -> Result<DMatrix<f64>, ArgminError> {
        let d = p.len() - 1;
        Ok(DMatrix::from_fn(self.y.len(), d + 1, |i, j| {
            if j == 0 {
                return 1.0;
            }
            let dot: f64 = (0..d).map(|k| p[k + 1] * self.mixtures[i][k]).sum();
            dot.exp() * self.mixtures[i][j - 1]
        }))
    }
}

/// Fits the log-linear law (see the module docs).
pub fn fit_log_linear(mixtures: &[Vec<f64>], y: &[f64]) -> Result<Law, TrainError> {
    let y_min = y.iter().copied().fold(f64::INFINITY, f64::min);
    let y_max = y.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !(y_min > 0.0 && y_max.is_finite()) {
        return Err(TrainError::Argument(format!(
            "the log-linear law needs positive measures (a loss or bits per byte); the smallest \
             is {y_min}"
        )));
    }
    let w = design(mixtures);
    // c stays below the smallest measure, so every ln(y - c) exists.
    let upper = y_min - 1e-6 * (y_max - y_min).max(y_min * 1e-3);
    let cost = ProjectedCost {
        w: w.clone(),
        mixtures,
        y,
    };
    // The SSE in c can have more than one dip: start Brent in the bracket of the best grid point.
    let grid = 40;
    let points: Vec<f64> = (0..=grid).map(|k| upper * k as f64 / grid as f64).collect();
    let costs: Vec<f64> = points
        .iter()
        .map(|c| cost.cost(c).unwrap_or(f64::MAX))
        .collect();
    let best = (0..points.len())
        .min_by(|&a, &b| costs[a].total_cmp(&costs[b]))
        .unwrap_or(0);
    let lo = points[best.saturating_sub(1)];
    let hi = points[(best + 1).min(grid)];
    let c = Executor::new(cost, BrentOpt::new(lo, hi))
        .configure(|state| state.max_iters(200))
        .ctrlc(false)
        .run()
        .ok()
        .and_then(|r| r.state.best_param)
        .unwrap_or(points[best]);
    let start = projected(c, &w, y)?;
    Ok(refine(start, mixtures, y, upper))
}

/// Gauss-Newton with a backtracking line search from `start`, kept when it lowers the SSE and
/// leaves `c` in `[0, upper]`.
fn refine(start: Law, mixtures: &[Vec<f64>], y: &[f64], upper: f64) -> Law {
    let mut p = vec![start.c];
    p.extend(&start.coefficients);
    let Ok(linesearch) =
        ArmijoCondition::new(1e-4).and_then(|cond| BacktrackingLineSearch::new(cond).rho(0.5))
    else {
        return start;
    };
    let solved = Executor::new(Residuals { mixtures, y }, GaussNewtonLS::new(linesearch))
        .configure(|state| state.param(DVector::from_vec(p)).max_iters(100))
        .ctrlc(false)
        .run();
    let Some(best) = solved.ok().and_then(|r| r.state.best_param) else {
        return start;
    };
    let refined = Law {
        kind: LawKind::LogLinear,
        c: best[0],
        coefficients: best.iter().skip(1).copied().collect(),
    };
    let better = sse(&refined, mixtures, y) < sse(&start, mixtures, y);
    if better
        && (0.0..=upper).contains(&refined.c)
        && refined.coefficients.iter().all(|t| t.is_finite())
    {
        refined
    } else {
        start
    }
}

/// Fits `kind` to the runs.
pub fn fit_law(kind: LawKind, mixtures: &[Vec<f64>], y: &[f64]) -> Result<Law, TrainError> {
    match kind {
        LawKind::LogLinear => fit_log_linear(mixtures, y),
        LawKind::Linear => fit_linear(mixtures, y),
    }
}

/// Held-out predictions of `kind`: run `i` predicted by the law fitted on every other run.
pub fn leave_one_out(
    kind: LawKind,
    mixtures: &[Vec<f64>],
    y: &[f64],
) -> Result<Vec<f64>, TrainError> {
    let domains = mixtures.first().map_or(0, Vec::len);
    if let Some(why) = too_few_runs(kind, y.len(), domains) {
        return Err(TrainError::Argument(why));
    }
    (0..y.len())
        .map(|i| {
            let keep = |v: &[f64]| -> Vec<f64> {
                v.iter()
                    .enumerate()
                    .filter(|(k, _)| *k != i)
                    .map(|(_, x)| *x)
                    .collect()
            };
            let rest: Vec<Vec<f64>> = mixtures
                .iter()
                .enumerate()
                .filter(|(k, _)| *k != i)
                .map(|(_, m)| m.clone())
                .collect();
            Ok(fit_law(kind, &rest, &keep(y))?.predict(&mixtures[i]))
        })
        .collect()
}

/// Root mean square of `predicted - measured`.
pub fn rmse(predicted: &[f64], measured: &[f64]) -> f64 {
    let n = predicted.len().max(1) as f64;
    (predicted
        .iter()
        .zip(measured)
        .map(|(p, m)| (p - m).powi(2))
        .sum::<f64>()
        / n)
        .sqrt()
}

/// Ranks from 1, ties sharing their average rank.
fn ranks(values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut out = vec![0.0; values.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && values[order[j + 1]] == values[order[i]] {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        for k in &order[i..=j] {
            out[*k] = rank;
        }
        i = j + 1;
    }
    out
}

/// Spearman's rank correlation (Pearson's on the ranks); None when either side is constant.
pub fn spearman(a: &[f64], b: &[f64]) -> Option<f64> {
    let (ra, rb) = (ranks(a), ranks(b));
    let n = ra.len() as f64;
    let (ma, mb) = (ra.iter().sum::<f64>() / n, rb.iter().sum::<f64>() / n);
    let cov: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = ra.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = rb.iter().map(|y| (y - mb).powi(2)).sum();
    (va > 0.0 && vb > 0.0).then(|| cov / (va * vb).sqrt())
}

/// One model's leave-one-out record on a target.
#[derive(Debug, Clone, Serialize)]
pub struct ModelCheck {
    /// Which law.
    pub model: LawKind,
    /// Leave-one-out RMSE, in the target's units.
    pub loo_rmse: f64,
    /// Spearman correlation of held-out predictions with the measured values.
    pub loo_spearman: Option<f64>,
    /// Held-out prediction of each run (order of [`TargetFit::runs`]).
    pub loo_predictions: Vec<f64>,
}

/// The fit of one target.
#[derive(Debug, Clone, Serialize)]
pub struct TargetFit {
    /// Target name.
    pub target: String,
    /// The chosen law, fitted on every run.
    pub law: Law,
    /// Leave-one-out RMSE of the chosen law.
    pub loo_rmse: f64,
    /// Leave-one-out Spearman of the chosen law.
    pub loo_spearman: Option<f64>,
    /// Every model tried (the chosen one among them).
    pub checks: Vec<ModelCheck>,
    /// Labels of the runs used.
    pub runs: Vec<String>,
    /// Their measured values.
    pub measured: Vec<f64>,
    /// Their mixtures.
    #[serde(skip)]
    pub mixtures: Vec<Vec<f64>>,
}

impl TargetFit {
    /// The chosen model's leave-one-out record.
    pub fn chosen(&self) -> Option<&ModelCheck> {
        self.checks.iter().find(|c| c.model == self.law.kind)
    }
}

/// Every target's fit over the same domains.
#[derive(Debug, Clone, Serialize)]
pub struct FitReport {
    /// The ablation folder.
    pub dir: std::path::PathBuf,
    /// Domains (order of every mixture and coefficient vector).
    pub domains: Vec<String>,
    /// Finished runs read.
    pub runs: usize,
    /// One fit per target.
    pub targets: Vec<TargetFit>,
    /// Runs or targets left out and why.
    pub notes: Vec<String>,
}

impl FitReport {
    /// The fit of `target`.
    pub fn target(&self, target: &str) -> Option<&TargetFit> {
        self.targets.iter().find(|t| t.target == target)
    }
}

/// Fits `targets` (every measured target when empty) with `model`, or both models and the one
/// with the lower leave-one-out RMSE when `model` is None.
pub fn fit_runs(
    runs: &SwarmRuns,
    targets: &[String],
    model: Option<LawKind>,
) -> Result<FitReport, TrainError> {
    let available = runs.targets();
    let wanted: Vec<String> = if targets.is_empty() {
        available.clone()
    } else {
        for t in targets {
            if !available.contains(t) {
                return Err(TrainError::Argument(format!(
                    "--target {t}: no run measured it; measured targets: {}",
                    available.join(", ")
                )));
            }
        }
        targets.to_vec()
    };
    let mut notes = runs.notes.clone();
    let mut fits = Vec::with_capacity(wanted.len());
    for target in &wanted {
        let used: Vec<_> = runs
            .runs
            .iter()
            .filter_map(|r| r.measures.get(target).map(|v| (r, *v)))
            .collect();
        let mixtures: Vec<Vec<f64>> = used.iter().map(|(r, _)| r.mixture.clone()).collect();
        let y: Vec<f64> = used.iter().map(|(_, v)| *v).collect();
        let labels: Vec<String> = used.iter().map(|(r, _)| r.label.clone()).collect();
        fits.push(fit_target(target, labels, mixtures, y, model, &mut notes)?);
    }
    Ok(FitReport {
        dir: runs.dir.clone(),
        domains: runs.domains.clone(),
        runs: runs.runs.len(),
        targets: fits,
        notes,
    })
}

/// Fits one target (see [`fit_runs`]).
pub fn fit_target(
    target: &str,
    labels: Vec<String>,
    mixtures: Vec<Vec<f64>>,
    y: Vec<f64>,
    model: Option<LawKind>,
    notes: &mut Vec<String>,
) -> Result<TargetFit, TrainError> {
    let domains = mixtures.first().map_or(0, Vec::len);
    let kinds: Vec<LawKind> = match model {
        Some(kind) => vec![kind],
        None => vec![LawKind::LogLinear, LawKind::Linear],
    };
    let mut checks = Vec::new();
    let mut refusals = Vec::new();
    for kind in kinds {
        if let Some(why) = too_few_runs(kind, y.len(), domains) {
            refusals.push(why);
            continue;
        }
        match leave_one_out(kind, &mixtures, &y) {
            Ok(loo) => checks.push(ModelCheck {
                model: kind,
                loo_rmse: rmse(&loo, &y),
                loo_spearman: spearman(&loo, &y),
                loo_predictions: loo,
            }),
            Err(e) => refusals.push(format!("{}: {e}", kind.name())),
        }
    }
    let Some(best) = checks
        .iter()
        .min_by(|a, b| a.loo_rmse.total_cmp(&b.loo_rmse))
        .cloned()
    else {
        return Err(TrainError::Argument(format!(
            "target `{target}`: {}",
            refusals.join("; ")
        )));
    };
    for why in refusals {
        notes.push(format!("target `{target}`: {why}"));
    }
    Ok(TargetFit {
        target: target.to_string(),
        law: fit_law(best.model, &mixtures, &y)?,
        loo_rmse: best.loo_rmse,
        loo_spearman: best.loo_spearman,
        checks,
        runs: labels,
        measured: y,
        mixtures,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, Gamma, Normal};

    /// `n` mixtures over `d` domains from Dirichlet(2, .., 2).
    pub(crate) fn mixtures(n: usize, d: usize, seed: u64) -> Vec<Vec<f64>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let g = Gamma::new(2.0, 1.0).unwrap();
        (0..n)
            .map(|_| {
                let x: Vec<f64> = (0..d).map(|_| g.sample(&mut rng)).collect();
                let s: f64 = x.iter().sum();
                x.iter().map(|v| v / s).collect()
            })
            .collect()
    }

    fn noisy(law: &Law, mixtures: &[Vec<f64>], sd: f64, seed: u64) -> Vec<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let noise = Normal::new(0.0, sd).unwrap();
        mixtures
            .iter()
            .map(|w| law.predict(w) + noise.sample(&mut rng))
            .collect()
    }

    #[test]
    fn log_linear_recovers_a_known_law() {
        // Tolerance: 0.05 on every t_j and c with noise sd 0.002 over 40 runs.
        let truth = Law {
            kind: LawKind::LogLinear,
            c: 1.2,
            coefficients: vec![0.9, -0.6, 0.3, -1.2],
        };
        let m = mixtures(40, 4, 1);
        let y = noisy(&truth, &m, 0.002, 2);
        let fit = fit_log_linear(&m, &y).unwrap();
        assert!((fit.c - truth.c).abs() < 0.05, "{fit:?}");
        for (a, b) in fit.coefficients.iter().zip(&truth.coefficients) {
            assert!((a - b).abs() < 0.05, "{fit:?}");
        }
        // Without noise the law is recovered to solver precision.
        let exact: Vec<f64> = m.iter().map(|w| truth.predict(w)).collect();
        let fit = fit_log_linear(&m, &exact).unwrap();
        assert!((fit.c - truth.c).abs() < 1e-4, "{fit:?}");
        // And leave-one-out picks it over the linear model.
        let report = fit_target("t", vec![String::new(); 40], m, y, None, &mut vec![]).unwrap();
        assert_eq!(report.law.kind, LawKind::LogLinear);
        assert!(
            report.loo_spearman.unwrap() > 0.95,
            "{:?}",
            report.loo_spearman
        );
    }

    #[test]
    fn linear_recovers_a_known_law() {
        // Tolerance: 0.05 on every b_j with noise sd 0.005 over 30 runs.
        let truth = Law {
            kind: LawKind::Linear,
            c: 0.0,
            coefficients: vec![3.0, 2.5, 4.0],
        };
        let m = mixtures(30, 3, 3);
        let y = noisy(&truth, &m, 0.005, 4);
        let fit = fit_linear(&m, &y).unwrap();
        for (a, b) in fit.coefficients.iter().zip(&truth.coefficients) {
            assert!((a - b).abs() < 0.05, "{fit:?}");
        }
        let report = fit_target("t", vec![String::new(); 30], m, y, None, &mut vec![]).unwrap();
        let linear = report
            .checks
            .iter()
            .find(|c| c.model == LawKind::Linear)
            .unwrap();
        // The chosen model is never worse out of sample than the other.
        assert!(report.loo_rmse <= linear.loo_rmse);
        assert!(report.loo_rmse < 0.01, "{}", report.loo_rmse);
    }

    #[test]
    fn leave_one_out_matches_a_hand_computed_case() {
        // Linear, two domains, three runs: (1,0) -> 1, (0,1) -> 2, (0.5,0.5) -> 2.
        // Without run 1: b = (2, 2), predicts 2 (error 1). Without run 2: b = (1, 3), predicts 3
        // (error 1). Without run 3: b = (1, 2), predicts 1.5 (error 0.5). RMSE = sqrt(0.75).
        let m = vec![vec![1.0, 0.0], vec![0.0, 1.0], vec![0.5, 0.5]];
        let y = vec![1.0, 2.0, 2.0];
        let loo = leave_one_out(LawKind::Linear, &m, &y).unwrap();
        for (got, want) in loo.iter().zip([2.0, 3.0, 1.5]) {
            assert!((got - want).abs() < 1e-9, "{loo:?}");
        }
        assert!((rmse(&loo, &y) - 0.75f64.sqrt()).abs() < 1e-9);
        // Predictions 2, 3, 1.5 against 1, 2, 2: ranks (2,3,1) vs (1,2.5,2.5).
        let rho = spearman(&loo, &y).unwrap();
        assert!((rho - 0.0).abs() < 1e-9, "{rho}");
    }

    #[test]
    fn refuses_with_too_few_runs() {
        let m = mixtures(4, 4, 5);
        let y = vec![2.0, 2.1, 2.2, 2.3];
        // Log-linear over 4 domains has 5 parameters: 4 runs cannot fit it, nor the linear law
        // (4 parameters) with one run held out.
        let err = fit_target(
            "math",
            vec![String::new(); 4],
            m.clone(),
            y.clone(),
            None,
            &mut vec![],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("target `math`")
                && err.contains("at least 6")
                && err.contains("at least 5"),
            "{err}"
        );
        let err = leave_one_out(LawKind::LogLinear, &m, &y)
            .unwrap_err()
            .to_string();
        assert!(err.contains("5 parameters"), "{err}");
        // With 5 runs the linear law fits and the log-linear one is noted as refused.
        let m = mixtures(5, 4, 6);
        let mut notes = vec![];
        let fit = fit_target(
            "math",
            vec![String::new(); 5],
            m,
            vec![2.0, 2.1, 2.2, 2.3, 2.4],
            None,
            &mut notes,
        )
        .unwrap();
        assert_eq!(fit.law.kind, LawKind::Linear);
        assert!(notes[0].contains("log-linear"), "{notes:?}");
    }

    #[test]
    fn spearman_handles_ties_and_constants() {
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[10.0, 20.0, 30.0]), Some(1.0));
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]), Some(-1.0));
        assert_eq!(spearman(&[1.0, 1.0], &[1.0, 2.0]), None);
        assert_eq!(ranks(&[5.0, 1.0, 5.0]), vec![2.5, 1.0, 2.5]);
    }
}
