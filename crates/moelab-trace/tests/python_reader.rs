//! Runs `scripts/read_trace.py` on a trace written by this crate, when Python has `safetensors`
//! and `numpy` (skipped with a note otherwise): the format must be readable without moelab.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use moelab_trace::trace::{TraceBatch, TraceBuilder, COUNTS_FILE};

fn python_ready() -> bool {
    Command::new("python3")
        .args(["-c", "import safetensors, numpy"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/read_trace.py")
}

fn write_trace(dir: &Path) -> moelab_trace::Trace {
    let mut b = TraceBuilder::new(vec![1, 2], vec!["web".into(), "code".into()], 4, 2)
        .checkpoint("runs/t/checkpoints/step-00000005", 5);
    b.push(TraceBatch {
        token_ids: &[3, 4, 5],
        target_ids: &[4, 5, 6],
        predicted_ids: &[4, 4, 6],
        domain_ids: &[0, 1, 1],
        source_ids: &[0, 1, 1],
        positions: &[0, 0, 1],
        expert_ids: &[vec![0, 1, 2, 3, 3, 0], vec![1, 0, 1, 2, 2, 3]],
        gate_weights: &[vec![0.6, 0.4, 0.5, 0.5, 0.7, 0.3], vec![0.5; 6]],
        router_probs: Some(&[vec![0.25; 12], vec![0.25; 12]]),
    })
    .unwrap();
    let trace = b.finish();
    trace.write(dir).unwrap();
    trace
}

#[test]
fn python_script_reads_trace_and_detects_mismatch() {
    if !python_ready() {
        println!(
            "note: python3 with safetensors+numpy not available; skipping read_trace.py check"
        );
        return;
    }
    let dir = std::env::temp_dir().join(format!("moelab-trace-py-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let trace = write_trace(&dir);

    let ok = Command::new("python3")
        .arg(script())
        .arg(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(stdout.contains("OK:"), "{stdout}");
    assert!(
        stdout.contains("expert_ids") && stdout.contains("(2, 3, 2)"),
        "{stdout}"
    );

    // Tamper with the aggregated counts: the script must notice and fail.
    let mut counts = trace.counts();
    counts.counts[0] += 1;
    counts.write_to(&dir.join(COUNTS_FILE)).unwrap();
    let bad = Command::new("python3")
        .arg(script())
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("MISMATCH"));
    std::fs::remove_dir_all(&dir).unwrap();
}
