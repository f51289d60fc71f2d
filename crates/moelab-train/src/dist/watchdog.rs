//! `dist.timeout_s`: a rank whose peer stops responding (SIGSTOP, a hung node) would wait in a
//! collective forever. While armed (the training loop of a job of several ranks), every MPI
//! collective marks itself in flight, and a watchdog thread ends this process with an error
//! naming the collective and the timeout once one has waited longer; mpirun (or
//! `srun --kill-on-bad-exit`) then ends the job, and `--resume auto` continues from the last
//! checkpoint. MPI is initialised `Funneled`, so the watchdog cannot call MPI itself: it exits.

use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

struct State {
    timeout: Option<Duration>,
    in_flight: Option<(&'static str, Instant)>,
    rank: usize,
    world: usize,
}

static STATE: Mutex<State> = Mutex::new(State {
    timeout: None,
    in_flight: None,
    rank: 0,
    world: 1,
});
static WATCHER: Once = Once::new();

/// How often the watchdog looks.
const POLL: Duration = Duration::from_millis(200);

/// Arms the watchdog: a collective of rank `rank` of `world` that waits longer than
/// `timeout_s` ends the process. Disarmed when the returned guard drops.
pub fn arm(timeout_s: u64, rank: usize, world: usize) -> Armed {
    if let Ok(mut state) = STATE.lock() {
        state.timeout = Some(Duration::from_secs(timeout_s));
        state.rank = rank;
        state.world = world;
    }
    WATCHER.call_once(|| {
        let spawned = std::thread::Builder::new()
            .name("moelab-watchdog".into())
            .spawn(watch_forever);
        if let Err(e) = spawned {
            eprintln!("warning: dist.timeout_s is not enforced: no watchdog thread ({e})");
        }
    });
    Armed(())
}

/// Keeps the watchdog armed while it lives.
pub struct Armed(());

impl Drop for Armed {
    fn drop(&mut self) {
        if let Ok(mut state) = STATE.lock() {
            state.timeout = None;
        }
    }
}

/// Marks collective `name` in flight until the returned guard drops.
pub fn collective(name: &'static str) -> InFlight {
    if let Ok(mut state) = STATE.lock() {
        state.in_flight = Some((name, Instant::now()));
    }
    InFlight(())
}

/// A collective in flight (see [`collective`]).
pub struct InFlight(());

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut state) = STATE.lock() {
            state.in_flight = None;
        }
    }
}

fn watch_forever() {
    loop {
        std::thread::sleep(POLL);
        let Ok(state) = STATE.lock() else { return };
        let (Some(timeout), Some((name, since))) = (state.timeout, state.in_flight) else {
            continue;
        };
        if since.elapsed() > timeout {
            eprintln!(
                "error: moelab rank {} of {}: the collective `{name}` did not complete within dist.timeout_s = {} s: another rank stopped responding (stopped, hung or unreachable); ending this rank so that the job ends (resume with --resume auto)",
                state.rank,
                state.world,
                timeout.as_secs()
            );
            std::process::exit(1);
        }
    }
}
