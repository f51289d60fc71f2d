//! A training fixture shared by the train and runs tests: a scratch folder with a three-domain
//! corpus and the small 40-step config (checkpoints every 20, five kept), plus settings.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use crate::corpus::{Corpus, RunConfig};
use crate::util::{self, Scratch};

/// A scratch folder with a corpus and a run config; runs go to `runs/<name>` inside it.
pub struct Fixture {
    /// The scratch folder.
    pub dir: Scratch,
    /// The run config.
    pub config: PathBuf,
}

impl Fixture {
    /// The small config with `settings` (`key.path=value`) applied on top.
    pub fn new(name: &str, settings: &[&str]) -> Self {
        let dir = Scratch::new(name);
        Corpus::three_domains().write(&dir.join("corpus"));
        let config = RunConfig::small(dir.path())
            .set_all(&["checkpoint.interval=20", "checkpoint.keep_last=5"])
            .set_all(settings)
            .write(&dir.join("run.toml"));
        Self { dir, config }
    }

    /// The run folder of run `name`.
    pub fn run_dir(&self, name: &str) -> PathBuf {
        self.dir.join("runs").join(name)
    }

    /// The checkpoint of run `name` after `step` steps.
    pub fn checkpoint(&self, run: &str, step: u64) -> PathBuf {
        self.run_dir(run)
            .join("checkpoints")
            .join(format!("step-{step:08}"))
    }

    /// `moelab train CONFIG --run-dir runs/<run> EXTRA...`, ready to spawn.
    pub fn command(&self, run: &str, extra: &[&str]) -> Command {
        let mut cmd = util::command(&["train"]);
        cmd.arg(&self.config)
            .arg("--run-dir")
            .arg(self.run_dir(run))
            .args(extra);
        cmd
    }

    /// Runs [`Fixture::command`] to the end.
    pub fn train(&self, run: &str, extra: &[&str]) -> Output {
        self.command(run, extra).output().unwrap()
    }
}

/// A file's bytes, naming the file when it cannot be read.
pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Waits until `path` exists, failing when `child` ends first or after five minutes.
pub fn wait_for(path: &Path, child: &mut Child) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before {} appeared",
            path.display()
        );
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
