//! The inputs of a report: a run folder's router log, a trace, a bare router folder or one
//! chunk file, loaded under a display name.

use std::path::Path;

use crate::error::{Result, TraceError};
use crate::router_log::{self, RouterLog};
use crate::trace::{self, Trace};

/// One named run (or checkpoint) to analyse: router counts, optionally per chunk and a trace.
#[derive(Debug, Clone)]
pub struct AnalysisInput {
    /// Display name (also the sub-directory of the report).
    pub name: String,
    /// Summed router counts (a run's total, or a trace's aggregate).
    pub counts: RouterLog,
    /// The router-log chunks the total was summed from, by step (empty when not from a log).
    pub chunks: Vec<RouterLog>,
    /// The per-token trace, when the input is a trace directory.
    pub trace: Option<Trace>,
    /// Text of each token id (the run's tokenizer), for readable vocabulary tables.
    pub token_text: Option<Vec<String>>,
}

/// Loads a run dir (its `router/` chunks), a trace dir (`trace.safetensors`), a bare router
/// directory, or a single chunk file. The name is `run@step`: a run dir's name and the steps its
/// router log covers (`run@first..last`), a trace's run (from its checkpoint path) and
/// checkpoint step, a chunk file's stem.
pub fn load_input(path: &Path) -> Result<AnalysisInput> {
    let stem = path
        .file_stem()
        .or_else(|| path.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "run".to_string());
    // A run folder `R/router` is named after R.
    let run_name = if stem == router_log::ROUTER_LOG_DIR {
        path.parent().map_or(stem.clone(), run_label)
    } else {
        run_label(path)
    };
    let name = stem;
    if path.is_file() {
        let chunk = router_log::read_chunk(path)?;
        return Ok(AnalysisInput {
            name,
            counts: chunk.clone(),
            chunks: vec![chunk],
            trace: None,
            token_text: None,
        });
    }
    if path.join(trace::TRACE_FILE).is_file() {
        let trace = Trace::read(path)?;
        // checkpoint = .../<run>/checkpoints/step-N: the run is two folders up.
        let run = Path::new(&trace.checkpoint)
            .parent()
            .and_then(Path::parent)
            .map_or(name, run_label);
        return Ok(AnalysisInput {
            name: format!("{run}@{}", trace.step),
            counts: trace.counts(),
            chunks: Vec::new(),
            trace: Some(trace),
            token_text: None,
        });
    }
    if !path.is_dir() {
        return Err(TraceError::NothingToRead {
            path: path.to_path_buf(),
            reason: "no such file or directory".to_string(),
        });
    }
    let chunks = router_log::read_dir(path)?;
    if chunks.is_empty() {
        return Err(TraceError::NothingToRead {
            path: path.to_path_buf(),
            reason: format!(
                "no {} (trace dir), no {}/chunk-*.safetensors (run dir) and no chunk files",
                trace::TRACE_FILE,
                router_log::ROUTER_LOG_DIR
            ),
        });
    }
    let counts = router_log::total(&chunks)?;
    Ok(AnalysisInput {
        // Router logs cover a range of steps; a trace is one checkpoint.
        name: if counts.step_start == counts.step_end {
            format!("{run_name}@{}", counts.step_end)
        } else {
            format!("{run_name}@{}..{}", counts.step_start, counts.step_end)
        },
        counts,
        chunks,
        trace: None,
        token_text: None,
    })
}

/// A run folder's display name: its name, with the variant in front for an ablation replicate
/// (`<variant>/seed-<s>`).
fn run_label(path: &Path) -> String {
    let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    match (name(path), path.parent().and_then(name)) {
        (Some(n), Some(parent)) if n.starts_with("seed-") => format!("{parent}/{n}"),
        (Some(n), _) => n,
        (None, _) => "run".to_string(),
    }
}
