//! Standard output that a closed pipe cannot kill (`moelab train ... | head -3`): the first
//! failed write, EPIPE included, stops all later output and the work goes on, as ripgrep does.
//! Every line the CLI prints goes through [`outln!`] / [`out!`].

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

static CLOSED: AtomicBool = AtomicBool::new(false);

/// Writes to stdout and flushes, unless an earlier write failed.
pub fn write_fmt(args: std::fmt::Arguments<'_>) {
    if CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        CLOSED.store(true, Ordering::Relaxed);
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("moelab: cannot write to stdout ({e}); output stops, the work goes on");
        }
    }
}
