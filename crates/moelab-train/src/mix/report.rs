//! `mix_report.md` and its plots (PNG and SVG, as the trace crate draws them): held-out
//! predictions against measured values per target, the log-linear laws' domain-interaction
//! matrix `t_dj` as a diverging heatmap, and the proposal against the base per target,
//! predicted and, once the proposal's ablation has run, measured.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use moelab_trace::stats::{bootstrap_mean_interval, spread, Interval};
use plotters::coord::Shift;
use plotters::prelude::*;
use serde::Serialize;

use super::fit::{FitReport, LawKind};
use super::propose::{Proposal, PROPOSAL_RECORD, PROPOSAL_VARIANT};
use super::runs::{read_runs, MIX_DIR};
use super::swarm::BASE_VARIANT;
use crate::TrainError;

/// The report's file name inside the ablation's `mix/` folder.
pub const REPORT_FILE: &str = "mix_report.md";
/// The fit's JSON inside the ablation's `mix/` folder.
pub const FIT_FILE: &str = "fit.json";

/// DejaVu Sans, the font the trace crate's plots use (Bitstream Vera license, see
/// crates/moelab-trace/assets/DejaVuSans-LICENSE.txt).
static FONT: &[u8] = include_bytes!("../../../moelab-trace/assets/DejaVuSans.ttf");

fn plot_error(path: &Path, reason: impl std::fmt::Display) -> TrainError {
    TrainError::Argument(format!("plot {}: {reason}", path.display()))
}

/// Registers the font once; plotters looks it up by family name.
fn ensure_font() -> Result<(), TrainError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(plot_error(
            Path::new("DejaVuSans.ttf"),
            "bundled font could not be parsed",
        ))
    }
}

/// Something drawn on either backend.
trait Figure {
    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<(), String>;
}

/// Draws `figure` to `stem.png` and `stem.svg`; returns the PNG's file name.
fn draw_both<F: Figure>(stem: &Path, size: (u32, u32), figure: &F) -> Result<String, TrainError> {
    ensure_font()?;
    let with = |ext: &str| {
        let mut name = stem.as_os_str().to_os_string();
        name.push(ext);
        PathBuf::from(name)
    };
    let (png, svg) = (with(".png"), with(".svg"));
    {
        let root = BitMapBackend::new(&png, size).into_drawing_area();
        figure.draw(&root).map_err(|e| plot_error(&png, e))?;
        root.present().map_err(|e| plot_error(&png, e))?;
    }
    {
        let root = SVGBackend::new(&svg, size).into_drawing_area();
        figure.draw(&root).map_err(|e| plot_error(&svg, e))?;
        root.present().map_err(|e| plot_error(&svg, e))?;
    }
    Ok(png
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned()))
}

/// Held-out prediction against measured value, one panel per target.
struct Scatter {
    panels: Vec<(String, Vec<(f64, f64)>)>,
}

impl Figure for Scatter {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let cols = (self.panels.len() as f64).sqrt().ceil().max(1.0) as usize;
        let rows = self.panels.len().div_ceil(cols).max(1);
        let areas = root.split_evenly((rows, cols));
        for ((title, points), area) in self.panels.iter().zip(areas.iter()) {
            let lo = points
                .iter()
                .flat_map(|p| [p.0, p.1])
                .fold(f64::INFINITY, f64::min);
            let hi = points
                .iter()
                .flat_map(|p| [p.0, p.1])
                .fold(f64::NEG_INFINITY, f64::max);
            let pad = ((hi - lo) * 0.08).max(1e-6);
            let (lo, hi) = (lo - pad, hi + pad);
            let mut chart = ChartBuilder::on(area)
                .caption(title, ("sans-serif", 15))
                .margin(8)
                .x_label_area_size(32)
                .y_label_area_size(48)
                .build_cartesian_2d(lo..hi, lo..hi)
                .map_err(|e| e.to_string())?;
            chart
                .configure_mesh()
                .x_desc("measured")
                .y_desc("held-out prediction")
                .x_labels(4)
                .y_labels(4)
                .label_style(("sans-serif", 11))
                .draw()
                .map_err(|e| e.to_string())?;
            chart
                .draw_series(LineSeries::new([(lo, lo), (hi, hi)], BLACK.mix(0.4)))
                .map_err(|e| e.to_string())?;
            chart
                .draw_series(
                    points
                        .iter()
                        .map(|&(x, y)| Circle::new((x, y), 3, RGBColor(33, 102, 172).filled())),
                )
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// Blue (negative) - white (0) - red (positive), ColorBrewer RdBu end points.
fn diverging(value: f64, limit: f64) -> RGBColor {
    let t = if limit > 0.0 && value.is_finite() {
        (value / limit).clamp(-1.0, 1.0)
    } else {
        0.0
    };
    let (end, white) = if t < 0.0 {
        ((33.0, 102.0, 172.0), (247.0, 247.0, 247.0))
    } else {
        ((178.0, 24.0, 43.0), (247.0, 247.0, 247.0))
    };
    let u = t.abs();
    let mix = |a: f64, b: f64| (a + (b - a) * u).round() as u8;
    RGBColor(
        mix(white.0, end.0),
        mix(white.1, end.1),
        mix(white.2, end.2),
    )
}

/// The interaction matrix: rows targets, columns domains.
struct Interactions {
    rows: Vec<String>,
    cols: Vec<String>,
    values: Vec<Vec<f64>>,
}

impl Figure for Interactions {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let limit = self
            .values
            .iter()
            .flatten()
            .fold(0.0f64, |m, v| m.max(v.abs()));
        let (nr, nc) = (self.rows.len(), self.cols.len());
        let label_chars = self
            .rows
            .iter()
            .map(|r| r.chars().count())
            .max()
            .unwrap_or(4);
        let mut chart = ChartBuilder::on(root)
            .caption(
                "log-linear t_dj, centred per target (red: more of the domain raises the target)",
                ("sans-serif", 15),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size((8 * label_chars + 16) as u32)
            .build_cartesian_2d(0.0..nc as f64, 0.0..nr as f64)
            .map_err(|e| e.to_string())?;
        let cols = self.cols.clone();
        let rows = self.rows.clone();
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(nc * 2 + 1)
            .y_labels(nr * 2 + 1)
            .x_label_formatter(&|x| label_at(&cols, *x))
            .y_label_formatter(&|y| label_at(&rows, nr as f64 - *y))
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(|e| e.to_string())?;
        for (r, row) in self.values.iter().enumerate() {
            for (c, v) in row.iter().enumerate() {
                let y0 = (nr - 1 - r) as f64;
                let x0 = c as f64;
                chart
                    .draw_series([Rectangle::new(
                        [(x0, y0), (x0 + 1.0, y0 + 1.0)],
                        diverging(*v, limit).filled(),
                    )])
                    .map_err(|e| e.to_string())?;
                chart
                    .draw_series([Text::new(
                        format!("{v:+.2}"),
                        (x0 + 0.3, y0 + 0.6),
                        ("sans-serif", 12).into_font(),
                    )])
                    .map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }
}

/// The name whose cell centre is at `x` (cells are unit wide from 0), else empty.
fn label_at(names: &[String], x: f64) -> String {
    let centre = x - 0.5;
    if (centre - centre.round()).abs() < 1e-6 && centre >= 0.0 {
        names
            .get(centre.round() as usize)
            .cloned()
            .unwrap_or_default()
    } else {
        String::new()
    }
}

/// Proposal minus base per target: predicted (with the LOO band) and measured (with the
/// interval over seeds).
struct Deltas {
    targets: Vec<String>,
    predicted: Vec<(f64, f64)>,
    measured: Vec<Option<(f64, Interval)>>,
}

impl Figure for Deltas {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut lo: f64 = 0.0;
        let mut hi: f64 = 0.0;
        for (v, band) in &self.predicted {
            lo = lo.min(v - band);
            hi = hi.max(v + band);
        }
        for (v, iv) in self.measured.iter().flatten() {
            lo = lo.min(iv.lo.min(*v));
            hi = hi.max(iv.hi.max(*v));
        }
        let pad = ((hi - lo) * 0.1).max(1e-4);
        let n = self.targets.len();
        let names = self.targets.clone();
        let mut chart = ChartBuilder::on(root)
            .caption(
                "proposal - base per target: predicted (blue, +- LOO RMSE), measured (red, 95% interval over seeds)",
                ("sans-serif", 14),
            )
            .margin(12)
            .x_label_area_size(60)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..n as f64, (lo - pad)..(hi + pad))
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_labels(n * 2 + 1)
            .x_label_formatter(&|x| label_at(&names, *x))
            .y_desc("difference")
            .label_style(("sans-serif", 11))
            .draw()
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(LineSeries::new(
                [(0.0, 0.0), (n as f64, 0.0)],
                BLACK.mix(0.5),
            ))
            .map_err(|e| e.to_string())?;
        let blue = RGBColor(33, 102, 172);
        let red = RGBColor(178, 24, 43);
        for (i, (v, band)) in self.predicted.iter().enumerate() {
            let x = i as f64 + 0.38;
            chart
                .draw_series([
                    PathElement::new(vec![(x, v - band), (x, v + band)], blue.stroke_width(2)),
                    PathElement::new(vec![(x, *v), (x, *v)], blue),
                ])
                .map_err(|e| e.to_string())?;
            chart
                .draw_series([Circle::new((x, *v), 4, blue.filled())])
                .map_err(|e| e.to_string())?;
        }
        for (i, m) in self.measured.iter().enumerate() {
            let Some((v, iv)) = m else { continue };
            let x = i as f64 + 0.62;
            chart
                .draw_series([PathElement::new(
                    vec![(x, iv.lo), (x, iv.hi)],
                    red.stroke_width(2),
                )])
                .map_err(|e| e.to_string())?;
            chart
                .draw_series([TriangleMarker::new((x, *v), 5, red.filled())])
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// One target measured in the proposal's ablation: mean over seeds of each arm and the paired
/// difference.
#[derive(Debug, Clone, Serialize)]
pub struct MeasuredTarget {
    /// Target name.
    pub target: String,
    /// Mean over seeds at the base.
    pub base: f64,
    /// Seed-to-seed standard deviation at the base (the noise floor); none with one seed.
    pub base_std: Option<f64>,
    /// Mean over seeds at the proposal.
    pub proposal: f64,
    /// Mean of the per-seed differences proposal - base.
    pub delta: f64,
    /// 95% bootstrap interval of that mean (as the ablation comparison computes it).
    pub delta_interval: Option<Interval>,
    /// Seeds paired.
    pub seeds: usize,
}

/// Reads the proposal's ablation folder, when it holds finished pairs; None before it has run.
pub fn measure_proposal(proposal: &Proposal) -> Option<Vec<MeasuredTarget>> {
    let runs = read_runs(&proposal.out_dir).ok()?;
    let mut objective = Vec::new();
    let mut out = Vec::new();
    let mut targets: Vec<String> = proposal.targets.iter().map(|t| t.target.clone()).collect();
    targets.push(OBJECTIVE.into());
    for target in targets {
        let value = |r: &super::runs::RunMeasures| -> Option<f64> {
            if target == OBJECTIVE {
                proposal
                    .objective
                    .terms
                    .iter()
                    .map(|(t, a)| r.measures.get(t).map(|v| a * v))
                    .sum()
            } else {
                r.measures.get(&target).copied()
            }
        };
        let mut pairs = Vec::new();
        for base in runs.runs.iter().filter(|r| r.variant == BASE_VARIANT) {
            let other = runs
                .runs
                .iter()
                .find(|r| r.variant == PROPOSAL_VARIANT && r.seed == base.seed);
            if let (Some(b), Some(p)) = (value(base), other.and_then(value)) {
                pairs.push((b, p));
            }
        }
        if pairs.is_empty() {
            continue;
        }
        let bases: Vec<f64> = pairs.iter().map(|p| p.0).collect();
        let props: Vec<f64> = pairs.iter().map(|p| p.1).collect();
        let diffs: Vec<f64> = pairs.iter().map(|p| p.1 - p.0).collect();
        let (b, p, d) = (spread(&bases)?, spread(&props)?, spread(&diffs)?);
        let m = MeasuredTarget {
            target: target.clone(),
            base: b.mean,
            base_std: b.std,
            proposal: p.mean,
            delta: d.mean,
            delta_interval: bootstrap_mean_interval(&diffs, 0.95),
            seeds: pairs.len(),
        };
        if target == OBJECTIVE {
            objective.push(m);
        } else {
            out.push(m);
        }
    }
    out.extend(objective);
    (!out.is_empty()).then_some(out)
}

/// Name of the objective's row among the measured targets.
pub const OBJECTIVE: &str = "objective";

/// Reads the latest proposal recorded in `<dir>/mix/` (None when there is none or it is
/// unreadable).
pub fn recorded_proposal(dir: &Path) -> Option<Proposal> {
    let text = std::fs::read_to_string(dir.join(MIX_DIR).join(PROPOSAL_RECORD)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Writes `<ablation>/mix/`: fit.json, mix_report.md and the plots; returns the report's path.
pub fn write_report(fit: &FitReport, proposal: Option<&Proposal>) -> Result<PathBuf, TrainError> {
    let dir = fit.dir.join(MIX_DIR);
    std::fs::create_dir_all(&dir).map_err(TrainError::io(&dir))?;
    let json = serde_json::to_string_pretty(fit)
        .map_err(|e| TrainError::Argument(format!("serialising the fit: {e}")))?;
    let fit_path = dir.join(FIT_FILE);
    moelab_io::write_atomic(&fit_path, json.as_bytes()).map_err(TrainError::io(&fit_path))?;
    let mut md = String::new();
    let _ = writeln!(md, "# Mixture search: {}\n", fit.dir.display());
    let _ = writeln!(
        md,
        "{} finished runs over {} domains ({}). Each target is fitted as a log-linear law \
         `c + exp(sum_j t_j w_j)` and as a linear law `sum_j b_j w_j` of the realised mixture; the \
         one with the lower leave-one-out (LOO) RMSE is kept. Spearman is the rank correlation of \
         the held-out predictions with the measured values.\n",
        fit.runs,
        fit.domains.len(),
        fit.domains.join(", ")
    );
    md += &fit_table(fit);
    let panels: Vec<(String, Vec<(f64, f64)>)> = fit
        .targets
        .iter()
        .filter_map(|t| {
            let c = t.chosen()?;
            Some((
                format!("{} ({})", t.target, t.law.kind.name()),
                t.measured
                    .iter()
                    .copied()
                    .zip(c.loo_predictions.iter().copied())
                    .collect(),
            ))
        })
        .collect();
    if !panels.is_empty() {
        let cols = (panels.len() as f64).sqrt().ceil() as u32;
        let rows = (panels.len() as u32).div_ceil(cols);
        let png = draw_both(
            &dir.join("predicted_vs_measured"),
            (300 * cols, 280 * rows),
            &Scatter { panels },
        )?;
        let _ = writeln!(
            md,
            "\n![held-out prediction against measured value]({png})\n"
        );
    }
    md += &interaction_section(fit, &dir)?;
    if let Some(p) = proposal {
        md += &proposal_section(p, &dir)?;
    }
    if !fit.notes.is_empty() {
        md += "\n## Notes\n\n";
        for n in &fit.notes {
            let _ = writeln!(md, "- {n}");
        }
    }
    let path = dir.join(REPORT_FILE);
    moelab_io::write_atomic(&path, md.as_bytes()).map_err(TrainError::io(&path))?;
    Ok(path)
}

/// The per-target table of the fit.
pub fn fit_table(fit: &FitReport) -> String {
    let mut md = String::from(
        "| target | model | runs | LOO RMSE | LOO Spearman | other model LOO RMSE | measured range |\n|---|---|---:|---:|---:|---:|---:|\n",
    );
    for t in &fit.targets {
        let other = t
            .checks
            .iter()
            .find(|c| c.model != t.law.kind)
            .map_or("-".to_string(), |c| {
                format!("{:.4} ({})", c.loo_rmse, c.model.name())
            });
        let lo = t.measured.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = t.measured.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.4} | {} | {} | {:.4} - {:.4} |",
            t.target,
            t.law.kind.name(),
            t.runs.len(),
            t.loo_rmse,
            t.loo_spearman.map_or("-".into(), |r| format!("{r:.3}")),
            other,
            lo,
            hi
        );
    }
    md
}

/// The t_dj heatmap of every target with a log-linear fit (the chosen law or, when the linear
/// one was kept, the log-linear law refitted for the picture).
fn interaction_section(fit: &FitReport, dir: &Path) -> Result<String, TrainError> {
    let mut rows = Vec::new();
    let mut values = Vec::new();
    for t in &fit.targets {
        let law = match t.law.kind {
            LawKind::LogLinear => t.law.clone(),
            LawKind::Linear => {
                match super::fit::fit_law(LawKind::LogLinear, &t.mixtures, &t.measured) {
                    Ok(l) if t.measured.len() > fit.domains.len() + 1 => l,
                    _ => continue,
                }
            }
        };
        let mean = law.coefficients.iter().sum::<f64>() / law.coefficients.len().max(1) as f64;
        rows.push(t.target.clone());
        values.push(
            law.coefficients
                .iter()
                .map(|x| x - mean)
                .collect::<Vec<_>>(),
        );
    }
    if rows.is_empty() {
        return Ok(String::new());
    }
    let label = rows.iter().map(|r| r.chars().count()).max().unwrap_or(4);
    let size = (
        (160 + 8 * label + 90 * fit.domains.len()) as u32,
        (120 + 34 * rows.len()) as u32,
    );
    let png = draw_both(
        &dir.join("interactions"),
        size,
        &Interactions {
            rows,
            cols: fit.domains.clone(),
            values,
        },
    )?;
    Ok(format!(
        "\n## Domain interactions\n\nThe log-linear law's `t_dj` (target d, domain j), centred per \
         target: moving share from domain k to domain j multiplies the target's reducible part \
         `y - c` by `exp((t_dj - t_dk) x share)`. Blue: more of the domain lowers the target.\n\n![t_dj]({png})\n"
    ))
}

/// The proposal against the base: predicted, then measured once its ablation has run.
fn proposal_section(p: &Proposal, dir: &Path) -> Result<String, TrainError> {
    let mut md = format!(
        "\n## Proposal for `{}`\n\n| domain | base | proposal | implied epochs | bounds |\n|---|---:|---:|---:|---:|\n",
        p.objective.text
    );
    for (k, d) in p.domains.iter().enumerate() {
        let _ = writeln!(
            md,
            "| {d} | {:.4} | {:.4} | {:.2} | {:.3} - {:.3} |",
            p.base[k], p.proposal[k], p.epochs[k], p.lower[k], p.upper[k]
        );
    }
    let _ = writeln!(
        md,
        "\nPredicted objective: {:.4} at the proposal (LOO band +- {:.4}) against {:.4} at the base; \
         KL to the base {:.4} nats{}; repetition limit {} epochs. Ablation file: `{}` (out_dir `{}`, seeds {:?}).\n",
        p.predicted,
        p.loo_rmse,
        p.predicted_base,
        p.kl_to_base,
        p.max_kl.map_or(String::new(), |k| format!(" (bound {k})")),
        p.max_epochs,
        p.ablation.display(),
        p.out_dir.display(),
        p.seeds
    );
    let measured = measure_proposal(p);
    md += "| target | predicted base | predicted proposal | LOO RMSE | measured base | measured proposal | measured delta [95%] | base seed sd |\n|---|---:|---:|---:|---:|---:|---:|---:|\n";
    let find = |t: &str| {
        measured
            .as_ref()
            .and_then(|m| m.iter().find(|x| x.target == t))
    };
    for t in &p.targets {
        let m = find(&t.target);
        let _ = writeln!(
            md,
            "| {} | {:.4} | {:.4} | {:.4} | {} |",
            t.target,
            t.base,
            t.proposal,
            t.loo_rmse,
            measured_cells(m)
        );
    }
    let _ = writeln!(
        md,
        "| **objective** | {:.4} | {:.4} | {:.4} | {} |",
        p.predicted_base,
        p.predicted,
        p.loo_rmse,
        measured_cells(find(OBJECTIVE))
    );
    match &measured {
        None => {
            let _ = writeln!(
                md,
                "\nNot measured yet: run `moelab ablate {}`, then `moelab mix fit {}` again.",
                p.ablation.display(),
                p.swarm_dir.display()
            );
        }
        Some(m) => {
            if let Some(o) = m.iter().find(|x| x.target == OBJECTIVE) {
                let verdict = match o.delta_interval {
                    Some(iv) if iv.hi < 0.0 => "the proposal beat the base: the whole interval of the paired difference is below zero",
                    Some(iv) if iv.lo > 0.0 => "the proposal was worse than the base beyond the noise",
                    _ => "the difference is inside the noise (the interval of the paired difference holds zero)",
                };
                let _ = writeln!(
                    md,
                    "\nMeasured over {} seeds: objective delta {:+.4}; {verdict}.",
                    o.seeds, o.delta
                );
            }
        }
    }
    let deltas = Deltas {
        targets: p.targets.iter().map(|t| t.target.clone()).collect(),
        predicted: p
            .targets
            .iter()
            .map(|t| (t.proposal - t.base, t.loo_rmse))
            .collect(),
        measured: p
            .targets
            .iter()
            .map(|t| find(&t.target).and_then(|m| Some((m.delta, m.delta_interval?))))
            .collect(),
    };
    let width = (160 + 110 * deltas.targets.len()).max(600) as u32;
    let png = draw_both(&dir.join("proposal_vs_base"), (width, 420), &deltas)?;
    let _ = writeln!(md, "\n![proposal - base per target]({png})");
    Ok(md)
}

fn measured_cells(m: Option<&MeasuredTarget>) -> String {
    match m {
        None => "- | - | - | -".into(),
        Some(m) => format!(
            "{:.4} | {:.4} | {:+.4} {} | {}",
            m.base,
            m.proposal,
            m.delta,
            m.delta_interval.map_or(String::new(), |iv| format!(
                "[{:+.4}, {:+.4}]",
                iv.lo, iv.hi
            )),
            m.base_std
                .map_or("n/a (one seed)".to_string(), |s| format!("{s:.4}"))
        ),
    }
}
