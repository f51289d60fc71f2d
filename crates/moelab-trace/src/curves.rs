//! Training curves from runs' `metrics.jsonl`: train loss, per-domain train and validation
//! loss, aux and z loss, load imbalance and task scores, one line per run or group of runs
//! (a group, e.g. one ablation variant over its seeds, is averaged step by step).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Result, TraceError};
use crate::plot::Lines;
use crate::report::{slug, Out};

/// The file every run folder logs its metrics to.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// One series: metric name -> step -> value, from one run.
type Series = BTreeMap<String, BTreeMap<u64, f64>>;

/// Mean over layers of a per-layer array.
fn layer_mean(v: &serde_json::Value) -> Option<f64> {
    let a = v.as_array()?;
    let vals: Vec<f64> = a.iter().filter_map(serde_json::Value::as_f64).collect();
    (!vals.is_empty()).then(|| vals.iter().sum::<f64>() / vals.len() as f64)
}

/// Reads a run's metrics.jsonl into named series (`train/loss`, `train/<domain>`,
/// `val/<domain>`, `aux_loss`, `z_loss`, `load_imbalance`, `task/<name>/<metric>`).
pub fn read_metrics(run_dir: &Path) -> Result<Series> {
    let path = run_dir.join(METRICS_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| TraceError::io("reading", &path, e))?;
    let mut out: Series = BTreeMap::new();
    let mut put = |name: String, step: u64, v: f64| {
        if v.is_finite() {
            out.entry(name).or_default().insert(step, v);
        }
    };
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        // A line cut off by a crash is skipped, like every other reader of the file does.
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(step) = v.get("step").and_then(serde_json::Value::as_u64) else {
            continue;
        };
        if let Some(x) = v.get("loss").and_then(serde_json::Value::as_f64) {
            put("train/loss".into(), step, x);
        }
        for (key, name) in [
            ("aux_loss", "aux_loss"),
            ("z_loss", "z_loss"),
            ("load_imbalance", "load_imbalance"),
        ] {
            if let Some(x) = v.get(key).and_then(layer_mean) {
                put(name.into(), step, x);
            }
        }
        for (field, prefix) in [("domain_loss", "train"), ("eval", "val"), ("task", "task")] {
            if let Some(map) = v.get(field).and_then(serde_json::Value::as_object) {
                for (k, x) in map {
                    if let Some(x) = x.as_f64() {
                        put(format!("{prefix}/{k}"), step, x);
                    }
                }
            }
        }
    }
    if out.is_empty() {
        return Err(TraceError::NothingToRead {
            path,
            reason: "no metric lines".into(),
        });
    }
    Ok(out)
}

/// Step-by-step mean of several runs' series (steps that every run has).
fn average(runs: &[Series]) -> Series {
    let mut out: Series = BTreeMap::new();
    let Some(first) = runs.first() else {
        return out;
    };
    for (name, steps) in first {
        for &step in steps.keys() {
            let vals: Vec<f64> = runs
                .iter()
                .filter_map(|r| r.get(name).and_then(|s| s.get(&step)).copied())
                .collect();
            if vals.len() == runs.len() {
                out.entry(name.clone())
                    .or_default()
                    .insert(step, vals.iter().sum::<f64>() / vals.len() as f64);
            }
        }
    }
    out
}

/// What [`plot_curves`] wrote.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CurvesSummary {
    /// The output folder.
    pub out_dir: PathBuf,
    /// Every file written (PNG, SVG, `curves.md`).
    pub files: Vec<PathBuf>,
    /// The plots, by metric, relative to the output folder.
    pub plots: Vec<String>,
}

/// Plots `groups` (label, run folders averaged into one line) into `out`: one plot per metric
/// with every group overlaid, and `curves.md` embedding them.
pub fn plot_curves(groups: &[(String, Vec<PathBuf>)], out: &Path) -> Result<CurvesSummary> {
    let mut lines: Vec<(String, Series)> = Vec::with_capacity(groups.len());
    for (label, dirs) in groups {
        let runs = dirs
            .iter()
            .map(|d| read_metrics(d))
            .collect::<Result<Vec<_>>>()?;
        lines.push((label.clone(), average(&runs)));
    }
    let mut metrics: Vec<String> = Vec::new();
    for (_, series) in &lines {
        for name in series.keys() {
            if !metrics.contains(name) {
                metrics.push(name.clone());
            }
        }
    }
    // Training loss first, then per domain train + validation together, then the rest.
    let mut domains: Vec<String> = metrics
        .iter()
        .filter_map(|m| m.strip_prefix("train/").or_else(|| m.strip_prefix("val/")))
        .filter(|d| *d != "loss")
        .map(str::to_string)
        .collect();
    domains.sort();
    domains.dedup();
    let mut p = CurvePlots {
        w: Out::new(out)?,
        md: String::from("# Training curves\n\n"),
        plots: Vec::new(),
        lines: &lines,
    };
    p.draw(
        "loss_train",
        "Training loss (mean over each log interval)",
        "loss (nats/token)",
        &[("", "train/loss".into())],
    )?;
    for d in &domains {
        p.draw(
            &format!("loss_{}", slug(d)),
            &format!("Loss on {d}: train (last logged step) and validation"),
            "loss (nats/token)",
            &[("train", format!("train/{d}")), ("val", format!("val/{d}"))],
        )?;
    }
    p.draw(
        "aux_loss",
        "Load-balancing loss (mean over MoE layers)",
        "aux loss",
        &[("", "aux_loss".into())],
    )?;
    p.draw(
        "z_loss",
        "Router z-loss (mean over MoE layers)",
        "z loss",
        &[("", "z_loss".into())],
    )?;
    p.draw(
        "load_imbalance",
        "Load imbalance (max / mean expert load, mean over layers)",
        "max / mean",
        &[("", "load_imbalance".into())],
    )?;
    for m in metrics.iter().filter(|m| m.starts_with("task/")) {
        p.draw(
            &slug(&m.replace('/', "_")),
            &format!("Task {}", &m["task/".len()..]),
            m.rsplit('/').next().unwrap_or("score"),
            &[("", m.clone())],
        )?;
    }
    let CurvePlots {
        mut w, md, plots, ..
    } = p;
    w.text("curves.md", &md)?;
    Ok(CurvesSummary {
        out_dir: out.to_path_buf(),
        files: w.files,
        plots,
    })
}

/// The plots of [`plot_curves`] as they are drawn: the files, `curves.md` and the lines to draw.
struct CurvePlots<'a> {
    w: Out,
    md: String,
    plots: Vec<String>,
    /// (group label, its averaged series).
    lines: &'a [(String, Series)],
}

impl CurvePlots<'_> {
    /// One plot of the `picks` (legend suffix, metric) of every group; nothing when no group
    /// has any of them.
    fn draw(
        &mut self,
        stem: &str,
        title: &str,
        y_label: &str,
        picks: &[(&str, String)],
    ) -> Result<()> {
        let mut series = Vec::new();
        for (label, s) in self.lines {
            for (suffix, metric) in picks {
                if let Some(points) = s.get(metric) {
                    let name = if suffix.is_empty() {
                        label.clone()
                    } else {
                        format!("{label} {suffix}")
                    };
                    series.push((name, points.iter().map(|(&x, &y)| (x as f64, y)).collect()));
                }
            }
        }
        if series.is_empty() {
            return Ok(());
        }
        let png = self.w.lines(
            stem,
            &Lines {
                title,
                x_label: "step",
                y_label,
                series: &series,
                integer_x: true,
            },
        )?;
        self.md.push_str(&format!("![]({png})\n\n"));
        self.plots.push(png);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::test_util::tmp_dir;

    fn run(dir: &Path, shift: f64) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let lines = [
            format!(
                r#"{{"step":1,"loss":{},"domain_loss":{{"web":3.0}},"aux_loss":[1.0,2.0],"z_loss":[0.5,0.5],"load_imbalance":[1.5,2.5]}}"#,
                4.0 + shift
            ),
            format!(
                r#"{{"step":2,"loss":{},"domain_loss":{{"web":2.5}},"aux_loss":[1.0,1.0],"z_loss":[0.25,0.25],"load_imbalance":[1.0,2.0]}}"#,
                3.0 + shift
            ),
            format!(
                r#"{{"step":2,"eval":{{"web":2.75}},"task":{{"arith/bpb":{}}}}}"#,
                2.0 + shift
            ),
            r#"{"step":3,"loss":"#.to_string(),
        ];
        std::fs::write(dir.join(METRICS_FILE), lines.join("\n")).unwrap();
        dir.to_path_buf()
    }

    #[test]
    fn reads_averages_and_plots_every_metric() {
        let dir = tmp_dir("curves");
        let a = run(&dir.join("a"), 0.0);
        let b = run(&dir.join("b"), 1.0);
        let m = read_metrics(&a).unwrap();
        assert_eq!(m["train/loss"][&2], 3.0);
        assert_eq!(m["aux_loss"][&1], 1.5);
        assert_eq!(m["val/web"][&2], 2.75);
        assert_eq!(m["task/arith/bpb"][&2], 2.0);
        assert!(
            !m["train/loss"].contains_key(&3),
            "a torn last line is skipped"
        );
        let avg = average(&[m, read_metrics(&b).unwrap()]);
        assert_eq!(avg["train/loss"][&1], 4.5);
        let summary = plot_curves(
            &[("base".into(), vec![a.clone(), b]), ("a".into(), vec![a])],
            &dir.join("out"),
        )
        .unwrap();
        for stem in [
            "loss_train",
            "loss_web",
            "aux_loss",
            "z_loss",
            "load_imbalance",
            "task_arith_bpb",
        ] {
            assert!(
                dir.join("out").join(format!("{stem}.png")).is_file(),
                "{stem}"
            );
        }
        let md = std::fs::read_to_string(dir.join("out/curves.md")).unwrap();
        assert_eq!(md.matches("![](").count(), summary.plots.len());
        let svg = std::fs::read_to_string(dir.join("out/loss_web.svg")).unwrap();
        assert!(
            svg.contains("base val") && svg.contains("a train"),
            "legend names"
        );
        assert!(read_metrics(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
