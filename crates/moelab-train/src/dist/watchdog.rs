//! `dist.timeout_s`: a rank whose peer stops responding (SIGSTOP, a hung node) would wait in a
//! collective forever. While armed (the training loop of a job of several ranks), every MPI
//! collective marks itself in flight, and a watchdog thread ends this process with an error
//! once one has waited longer; mpirun (or `srun --kill-on-bad-exit`) then ends the job, and
//! `--resume auto` continues from the last checkpoint. MPI is initialised `Funneled`, so the
//! watchdog cannot call MPI itself: it exits.
//!
//! MPI cannot say which rank a collective waits for, so the ranks keep a side channel: the
//! watchdog thread of each rank writes a small progress report (step, phase, collective in
//! flight, wall-clock time) every second into the run folder's `.progress/rank-N.json`,
//! atomically by rename. A stopped rank's reports stop (its watchdog thread stops with it), so
//! on a timeout the waiting rank reads them and names the rank that fell behind: one whose
//! report went stale, or one that is alive but in no collective.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

struct State {
    timeout: Option<Duration>,
    in_flight: Option<(&'static str, Instant)>,
    rank: usize,
    world: usize,
    /// Where the ranks' progress reports go (the run folder's `.progress/`), while armed.
    reports: Option<PathBuf>,
    step: u64,
    phase: &'static str,
    /// When the phase began (None before the first [`progress`]).
    phase_since: Option<Instant>,
    last_report: Option<Instant>,
}

static STATE: Mutex<State> = Mutex::new(State {
    timeout: None,
    in_flight: None,
    rank: 0,
    world: 1,
    reports: None,
    step: 0,
    phase: "setup",
    phase_since: None,
    last_report: None,
});
static WATCHER: Once = Once::new();

/// How often the watchdog looks.
const POLL: Duration = Duration::from_millis(200);
/// How often each rank writes its progress report.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// A report older than this comes from a rank that stopped (several missed heartbeats).
const STALE: Duration = Duration::from_millis(2500);
/// How long a timed-out rank waits for a stopped peer's report to go stale before it says
/// what it sees (the peer may have stopped just before the timeout fired).
const GRACE: Duration = Duration::from_secs(3);

/// One rank's progress report, `.progress/rank-N.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The reporting rank.
    pub rank: usize,
    /// Its world size (a report of another job's layout is ignored).
    pub world: usize,
    /// Its process id.
    pub pid: u32,
    /// The training step it works on (or finished, for the phases after a step).
    pub step: u64,
    /// What it is doing: forward, backward, optimizer, evaluation, checkpoint, ...
    pub phase: String,
    /// Seconds it has been in that phase.
    pub phase_s: f64,
    /// The collective it waits in, if any.
    pub collective: Option<String>,
    /// Seconds it has waited in that collective.
    pub collective_s: f64,
    /// When the report was written, milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
}

/// Arms the watchdog: a collective of rank `rank` of `world` that waits longer than
/// `timeout_s` ends the process. With `reports` (the run folder's `.progress/`, which every
/// rank must see), this rank writes its progress reports there and a timeout names the rank
/// that fell behind. Disarmed (and this rank's report removed) when the returned guard drops.
pub fn arm(timeout_s: u64, rank: usize, world: usize, reports: Option<PathBuf>) -> Armed {
    let reports = reports.filter(|dir| match std::fs::create_dir_all(dir) {
        Ok(()) => true,
        Err(e) => {
            eprintln!(
                "warning: rank {rank}: no progress reports in {} ({e}); a timeout will not name the rank that stopped",
                dir.display()
            );
            false
        }
    });
    if let Ok(mut state) = STATE.lock() {
        state.timeout = Some(Duration::from_secs(timeout_s));
        state.rank = rank;
        state.world = world;
        // The first report now: a rank stopped before the watchdog's first heartbeat (steps of
        // a small model take milliseconds) must still have one to go stale.
        if let Some(dir) = &reports {
            write_report(dir, &state.report());
        }
        state.last_report = Some(Instant::now());
        state.reports = reports;
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
            // A run that ends normally leaves no report behind.
            if let Some(dir) = state.reports.take() {
                let _ = std::fs::remove_file(report_path(&dir, state.rank));
                // The last rank to finish removes the folder (it fails while others remain).
                let _ = std::fs::remove_dir(&dir);
            }
        }
    }
}

/// Records that this rank entered `phase` of step `step` (for the progress reports).
pub fn progress(step: u64, phase: &'static str) {
    if let Ok(mut state) = STATE.lock() {
        state.step = step;
        state.phase = phase;
        state.phase_since = Some(Instant::now());
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

/// Rank `rank`'s report in `dir`.
fn report_path(dir: &Path, rank: usize) -> PathBuf {
    dir.join(format!("rank-{rank}.json"))
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl State {
    fn report(&self) -> Report {
        let (collective, collective_s) = match self.in_flight {
            Some((name, since)) => (Some(name.to_string()), since.elapsed().as_secs_f64()),
            None => (None, 0.0),
        };
        Report {
            rank: self.rank,
            world: self.world,
            pid: std::process::id(),
            step: self.step,
            phase: self.phase.to_string(),
            phase_s: self.phase_since.map_or(0.0, |t| t.elapsed().as_secs_f64()),
            collective,
            collective_s,
            at_unix_ms: unix_ms(),
        }
    }
}

/// Writes `report` as `dir/rank-N.json` through a temporary file and a rename, so that a
/// reader never sees half a report. Best effort: a failed write only makes a timeout's
/// message less precise.
fn write_report(dir: &Path, report: &Report) {
    let path = report_path(dir, report.rank);
    let tmp = dir.join(format!(".rank-{}.json.tmp", report.rank));
    let Ok(json) = serde_json::to_vec(report) else {
        return;
    };
    if std::fs::write(&tmp, json).is_ok() {
        let _ = std::fs::rename(&tmp, &path);
    }
}

/// Every other rank's report in `dir` for a job of `world` ranks (None where none is readable).
fn read_reports(dir: &Path, me: usize, world: usize) -> Vec<(usize, Option<Report>)> {
    (0..world)
        .filter(|&r| r != me)
        .map(|r| {
            let report = std::fs::read(report_path(dir, r))
                .ok()
                .and_then(|bytes| serde_json::from_slice::<Report>(&bytes).ok())
                .filter(|rep| rep.rank == r && rep.world == world);
            (r, report)
        })
        .collect()
}

/// How old `report` is at `now_ms`.
fn age(report: &Report, now_ms: u64) -> Duration {
    Duration::from_millis(now_ms.saturating_sub(report.at_unix_ms))
}

/// What `report` says a peer was doing.
fn doing(report: &Report) -> String {
    let mut s = format!(
        "step {}, phase {} for {:.1} s",
        report.step, report.phase, report.phase_s
    );
    if let Some(c) = &report.collective {
        s += &format!(", waiting in `{c}` for {:.1} s", report.collective_s);
    }
    s
}

/// The part of a timeout's message about the other ranks: who fell behind (a stale report:
/// stopped; a fresh one outside any collective: busy or hung elsewhere), then who waits too.
pub fn describe_peers(peers: &[(usize, Option<Report>)], now_ms: u64) -> String {
    let mut behind = Vec::new();
    let mut waiting = Vec::new();
    for (rank, report) in peers {
        match report {
            None => behind.push(format!(
                "rank {rank} left no progress report (it may not have reached the training loop)"
            )),
            Some(rep) if age(rep, now_ms) > STALE => behind.push(format!(
                "rank {rank} stopped responding (stopped, hung or unreachable): its last progress report, {:.1} s ago, said {}",
                age(rep, now_ms).as_secs_f64(),
                doing(rep)
            )),
            Some(rep) if rep.collective.is_none() => behind.push(format!(
                "rank {rank} is running but in no collective: {}",
                doing(rep)
            )),
            Some(rep) => waiting.push(format!("rank {rank} ({})", doing(rep))),
        }
    }
    let mut parts = Vec::new();
    if !behind.is_empty() {
        parts.push(behind.join("; "));
    }
    if !waiting.is_empty() {
        parts.push(format!("waiting too: {}", waiting.join(", ")));
    }
    parts.join("; ")
}

/// The other ranks as seen after a timeout: waits up to [`GRACE`] for a stopped rank's report
/// to go stale, then describes them.
fn diagnose(dir: &Path, me: usize, world: usize) -> String {
    let start = Instant::now();
    loop {
        let peers = read_reports(dir, me, world);
        let now = unix_ms();
        // A peer outside collectives may just be between two; only a stale report is sure.
        let stopped = peers
            .iter()
            .any(|(_, rep)| rep.as_ref().is_some_and(|rep| age(rep, now) > STALE));
        if stopped || start.elapsed() >= GRACE {
            return describe_peers(&peers, now);
        }
        std::thread::sleep(POLL);
    }
}

fn watch_forever() {
    loop {
        std::thread::sleep(POLL);
        let Ok(mut state) = STATE.lock() else { return };
        let Some(timeout) = state.timeout else {
            continue;
        };
        if let Some(dir) = state.reports.clone() {
            if state.last_report.is_none_or(|t| t.elapsed() >= HEARTBEAT) {
                let report = state.report();
                state.last_report = Some(Instant::now());
                drop(state);
                write_report(&dir, &report);
                continue;
            }
        }
        let Some((name, since)) = state.in_flight else {
            continue;
        };
        if since.elapsed() > timeout {
            let (rank, world, step, phase) = (state.rank, state.world, state.step, state.phase);
            let mine = state.report();
            let reports = state.reports.clone();
            drop(state);
            let peers = match &reports {
                Some(dir) => {
                    write_report(dir, &mine);
                    diagnose(dir, rank, world)
                }
                None => String::new(),
            };
            let peers = match peers.as_str() {
                "" => "another rank stopped responding (stopped, hung or unreachable)",
                said => said,
            };
            eprintln!(
                "error: moelab rank {rank} of {world}: the collective `{name}` (step {step}, phase {phase}) did not complete within dist.timeout_s = {} s: {peers}; ending this rank so that the job ends (resume with --resume auto)",
                timeout.as_secs()
            );
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn report(rank: usize, at_unix_ms: u64, collective: Option<&str>) -> Report {
        Report {
            rank,
            world: 3,
            pid: 1,
            step: 4,
            phase: "forward".into(),
            phase_s: 1.0,
            collective: collective.map(String::from),
            collective_s: 2.0,
            at_unix_ms,
        }
    }

    #[test]
    fn a_stale_report_names_its_rank_and_a_waiting_one_is_listed_apart() {
        let now = 100_000;
        let peers = vec![
            (1, Some(report(1, now - 9_000, Some("all_to_all_v")))),
            (2, Some(report(2, now - 300, Some("all_reduce_f32")))),
        ];
        let said = describe_peers(&peers, now);
        assert!(
            said.starts_with("rank 1 stopped responding (stopped, hung or unreachable): its last progress report, 9.0 s ago, said step 4, phase forward for 1.0 s"),
            "{said}"
        );
        assert!(
            said.contains(
                "waiting too: rank 2 (step 4, phase forward for 1.0 s, waiting in `all_reduce_f32` for 2.0 s)"
            ),
            "{said}"
        );
    }

    #[test]
    fn a_live_rank_outside_collectives_and_a_missing_report_are_named() {
        let now = 50_000;
        let peers = vec![(0, None), (2, Some(report(2, now - 100, None)))];
        let said = describe_peers(&peers, now);
        assert!(said.contains("rank 0 left no progress report"), "{said}");
        assert!(
            said.contains("rank 2 is running but in no collective: step 4, phase forward"),
            "{said}"
        );
        assert!(!said.contains("waiting too"), "{said}");
    }

    #[test]
    fn reports_round_trip_through_the_folder_and_other_layouts_are_ignored() {
        let dir = std::env::temp_dir().join(format!("moelab-watchdog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        write_report(&dir, &report(1, 7, None));
        let mut other = report(2, 7, None);
        other.world = 5;
        write_report(&dir, &other);
        let read = read_reports(&dir, 0, 3);
        assert_eq!(read.len(), 2);
        assert_eq!(read[0], (1, Some(report(1, 7, None))));
        assert_eq!(read[1], (2, None));
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
