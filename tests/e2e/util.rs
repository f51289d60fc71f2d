//! What every end-to-end test needs: running the built `moelab` binary, assertions that show its
//! output when they fail, and scratch folders that cannot collide between parallel tests.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The repository's root folder (where `configs/` and `scripts/` live).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A `moelab` command with `args`, run from the repository root, ready to spawn.
pub fn command<S: AsRef<OsStr>>(args: &[S]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_moelab"));
    cmd.args(args)
        .current_dir(repo_root())
        // A backtrace setting inherited from the developer's shell would change error texts.
        .env("RUST_BACKTRACE", "0");
    cmd
}

/// Runs `moelab` with `args` and waits for it.
pub fn moelab<S: AsRef<OsStr>>(args: &[S]) -> Output {
    moelab_with_env(args, &[])
}

/// Runs `moelab` with `args` and extra environment variables, and waits for it.
pub fn moelab_with_env<S: AsRef<OsStr>>(args: &[S], env: &[(&str, &str)]) -> Output {
    let mut cmd = command(args);
    cmd.envs(env.iter().copied());
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", env!("CARGO_BIN_EXE_moelab")))
}

/// The command's standard output as text.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The command's standard error as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts `out` succeeded, showing its exit status and both streams if not; returns stdout.
pub fn ok(out: &Output) -> String {
    ok_for("moelab", out)
}

/// [`ok`] that says `what` was being run when it fails.
pub fn ok_for(what: &str, out: &Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed: exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        stdout(out),
        stderr(out)
    );
    stdout(out)
}

/// Asserts `out` failed, showing both streams if it succeeded; returns stderr.
pub fn fails(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "expected a failure, got exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        stdout(out),
        stderr(out)
    );
    stderr(out)
}

/// A path as a command-line argument (the scratch folders are ASCII).
pub fn arg(path: &Path) -> &str {
    path.to_str()
        .unwrap_or_else(|| panic!("not UTF-8: {}", path.display()))
}

/// A fresh temporary folder, unique to one test even when tests run in parallel threads or
/// several test processes share the machine; removed on drop unless the test failed, so that a
/// failure leaves its files to look at.
pub struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    /// Creates `TMP/moelab-e2e-{name}-{pid}-{n}`, `n` counting scratch folders in this process.
    pub fn new(name: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("moelab-e2e-{name}-{}-{n}", std::process::id()));
        // A folder of this name can only be left from an earlier process with a reused pid.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        Self { dir }
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// A path inside the folder.
    pub fn join(&self, relative: impl AsRef<Path>) -> PathBuf {
        self.dir.join(relative)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept the failed test's files in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Every tensor of a safetensors file, by name, on the CPU.
pub fn tensors(path: &Path) -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap()
}
