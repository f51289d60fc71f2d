//! Expert-activation traces and their analyses (specialisation, Jensen-Shannon divergence,
//! co-activation, saturation), plots and reports.
//!
//! - [`router_log`]: per (layer, domain, expert) counts the trainer writes while training;
//! - [`trace`]: per-token routing of a checkpoint over fixed validation streams;
//! - [`analysis`]: pure metric functions over both;
//! - [`report`]: CSV/JSON tables, PNG/SVG plots and a `report.md` (per input, per trace, and
//!   variants against a baseline), and the file-name sanitiser [`report::slug`];
//! - [`curves`]: training curves from metrics.jsonl;
//! - [`compare`]: ablation comparisons over seed replicates;
//! - [`stats`]: spread and bootstrap intervals over seed replicates;
//! - [`align`]: matching experts across runs (Hungarian assignment on co-assigned tokens);
//! - `safetensors_io` (private): typed safetensors reads and writes, atomic file writes.

mod error;
mod plot;
mod safetensors_io;

pub mod align;
pub mod analysis;
pub mod compare;
pub mod curves;
pub mod report;
pub mod router_log;
pub mod stats;
pub mod trace;

pub use error::{Result, TraceError};
pub use router_log::RouterLog;
pub use trace::{Trace, TraceBatch, TraceBuilder};

#[cfg(test)]
pub(crate) mod test_util {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::path::PathBuf;

    /// A fresh, empty temp directory unique to this process and test thread.
    pub(crate) fn tmp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "moelab-trace-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
