//! SIGINT and SIGTERM as a request to stop: the first sets a process-wide flag that the trainer,
//! evaluation and ablations check at safe points (they save, then return); a second one ends
//! the process at once (exit 130), for a user who does not want to wait.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

static STOP: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// Installs the handlers (once per process; later calls do nothing).
pub fn install() -> std::io::Result<()> {
    if STOP.get().is_some() {
        return Ok(());
    }
    let flag = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // Registered first, so it sees the flag as the previous signal left it.
        signal_hook::flag::register_conditional_shutdown(signal, 130, flag.clone())?;
        signal_hook::flag::register(signal, flag.clone())?;
    }
    let _ = STOP.set(flag);
    Ok(())
}

/// True once a stop was requested (never before [`install`]).
pub fn requested() -> bool {
    STOP.get().is_some_and(|flag| flag.load(Ordering::SeqCst))
}
