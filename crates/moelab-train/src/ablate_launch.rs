//! An ablation's variants as separate `moelab train` processes: `moelab ablate --parallel N`
//! runs N at once on this machine (one device each), `moelab ablate --slurm` writes (and
//! submits) a Slurm job array with one `srun` task per variant, and `moelab ablate --compare`
//! then compares them (`ablate::compare_finished`). Every variant's resolved config is written
//! to `OUT/.variants/NAME.toml` (variant names cannot start with `.`), so each process trains
//! exactly what the sequential `moelab ablate` would.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::ablate::{check_variants, finished_step, Ablation};
use crate::config::DeviceKind;
use crate::{interrupt, TrainError};

/// Folder of the ablation output holding the variants' configs, logs and the Slurm script.
pub const VARIANTS_DIR: &str = ".variants";

/// Writes every variant's resolved config (with `run.out_dir = out_dir`) to
/// `out_dir/.variants/LABEL.toml`; returns (label, config path) in variant order.
pub fn write_variant_configs(
    ablation: &Ablation,
    out_dir: &Path,
) -> Result<Vec<(String, PathBuf)>, TrainError> {
    let dir = out_dir.join(VARIANTS_DIR);
    std::fs::create_dir_all(&dir).map_err(TrainError::io(&dir))?;
    let mut written = Vec::with_capacity(ablation.variants.len());
    for variant in &ablation.variants {
        let mut cfg = variant.config.clone();
        cfg.run.out_dir = out_dir.to_path_buf();
        // The label is the run folder's path under `out_dir` (`name/seed-S` with seeds).
        let path = dir.join(format!("{}.toml", variant.label));
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(TrainError::io(parent))?;
        }
        moelab_io::write_atomic(&path, cfg.to_toml().as_bytes()).map_err(TrainError::io(&path))?;
        written.push((variant.label.clone(), path));
    }
    Ok(written)
}

/// How [`run_parallel`] ended.
#[derive(Debug)]
pub struct ParallelOutcome {
    /// Variants trained now (name), in the order they finished.
    pub trained: Vec<String>,
    /// Variants already finished before (name).
    pub skipped: Vec<String>,
    /// True when a signal stopped the runs (each saved a checkpoint; run again to resume).
    pub interrupted: bool,
}

/// Trains the unfinished variants with up to `parallel` `moelab train` processes (`exe`) at
/// once, each resuming its run folder; on CUDA, process slot i sees only GPU i. Each
/// variant's output goes to `out_dir/.variants/NAME.log`. `on_line` hears what starts and ends.
pub fn run_parallel(
    ablation: &Ablation,
    out_dir: &Path,
    parallel: usize,
    exe: &Path,
    on_line: &mut dyn FnMut(String),
) -> Result<ParallelOutcome, TrainError> {
    if parallel == 0 {
        return Err(TrainError::Argument("--parallel must be at least 1".into()));
    }
    interrupt::install().map_err(TrainError::io(out_dir))?;
    let configs = write_variant_configs(ablation, out_dir)?;
    // Variants sharing a dataset must not all prepare it at once: it is prepared here first,
    // and every variant gets train's checks before any process starts (each process checks
    // its own device's memory).
    check_variants(ablation, out_dir, false, &mut |_, _| {})?;
    let mut outcome = ParallelOutcome {
        trained: Vec::new(),
        skipped: Vec::new(),
        interrupted: false,
    };
    let mut queue = Vec::new();
    for (variant, (name, config)) in ablation.variants.iter().zip(configs) {
        let mut cfg = variant.config.clone();
        cfg.run.out_dir = out_dir.to_path_buf();
        match finished_step(&out_dir.join(&name), &cfg)? {
            Some(step) => {
                on_line(format!("{name}: skip (finished at step {step})"));
                outcome.skipped.push(name);
            }
            None => queue.push((name, config, cfg.run.device)),
        }
    }
    queue.reverse();
    let mut running: Vec<(usize, String, PathBuf, Child)> = Vec::new();
    let mut failures = Vec::new();
    loop {
        while running.len() < parallel && !interrupt::requested() {
            let Some((name, config, device)) = queue.pop() else {
                break;
            };
            let slot = (0..parallel)
                .find(|s| running.iter().all(|(r, ..)| r != s))
                .unwrap_or(0);
            let log = out_dir.join(VARIANTS_DIR).join(format!("{name}.log"));
            let file = std::fs::File::create(&log).map_err(TrainError::io(&log))?;
            let err = file.try_clone().map_err(TrainError::io(&log))?;
            let mut cmd = Command::new(exe);
            cmd.arg("train")
                .arg(&config)
                .arg("--run-dir")
                .arg(out_dir.join(&name))
                .args(["--resume", "auto"])
                .stdin(Stdio::null())
                .stdout(file)
                .stderr(err);
            if device == DeviceKind::Cuda {
                cmd.env("CUDA_VISIBLE_DEVICES", slot.to_string());
            }
            let child = cmd.spawn().map_err(TrainError::io(exe))?;
            on_line(format!(
                "{name}: training (process {}, slot {slot}, log {})",
                child.id(),
                log.display()
            ));
            running.push((slot, name, log, child));
        }
        if running.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        let mut i = 0;
        while i < running.len() {
            let status = running[i].3.try_wait().map_err(TrainError::io(exe))?;
            let Some(status) = status else {
                i += 1;
                continue;
            };
            let (_, name, log, _) = running.swap_remove(i);
            if status.success() {
                on_line(format!("{name}: done"));
                outcome.trained.push(name);
            } else {
                on_line(format!("{name}: failed ({status}); see {}", log.display()));
                failures.push(format!("{name} ({status}, log {})", log.display()));
            }
        }
    }
    outcome.interrupted = interrupt::requested();
    if !failures.is_empty() {
        return Err(TrainError::Ablation {
            path: ablation.path.clone(),
            message: format!("variants failed: {}", failures.join(", ")),
        });
    }
    Ok(outcome)
}

/// Checks every unfinished variant before an array is submitted, as `train` would before its
/// first step (no memory check: the tasks run on other nodes), which prepares each dataset once:
/// the array's tasks then only open it (without this, every task would prepare on first use,
/// queueing on the dataset's lock while holding its nodes). Says one line per dataset.
pub fn check_before_submitting(
    ablation: &Ablation,
    out_dir: &Path,
    say: &mut dyn FnMut(String),
) -> Result<(), TrainError> {
    check_variants(ablation, out_dir, false, &mut |_, _| {})?;
    let mut seen: Vec<&Path> = Vec::new();
    for variant in &ablation.variants {
        let dataset = variant.config.data.dataset.as_path();
        if !seen.contains(&dataset) {
            say(format!(
                "dataset {}: ready (every variant checked)",
                dataset.display()
            ));
            seen.push(dataset);
        }
    }
    Ok(())
}

/// What `--slurm` needs besides the ablation.
#[derive(Debug, Clone)]
pub struct SlurmOptions {
    /// The `moelab` binary every task runs (an absolute path every node sees).
    pub exe: PathBuf,
    /// Ranks per variant (`srun --ntasks`): data parallel within a variant.
    pub ranks: usize,
}

/// Writes the Slurm job-array script `out_dir/.variants/ablate.sbatch`: array task i trains
/// variant i with `srun moelab train` (one GPU per rank on CUDA configs, resuming its run
/// folder, so a requeued or resubmitted task continues). Returns its path. The datasets must
/// already be prepared ([`check_before_submitting`]): the tasks only open them.
pub fn write_slurm_script(
    ablation: &Ablation,
    out_dir: &Path,
    options: &SlurmOptions,
) -> Result<PathBuf, TrainError> {
    std::fs::create_dir_all(out_dir).map_err(TrainError::io(out_dir))?;
    let out_dir = std::path::absolute(out_dir).map_err(TrainError::io(out_dir))?;
    let configs = write_variant_configs(ablation, &out_dir)?;
    let exe = std::path::absolute(&options.exe).map_err(TrainError::io(&options.exe))?;
    let name = ablation
        .path
        .file_stem()
        .map_or_else(|| "ablation".into(), |s| s.to_string_lossy().into_owned());
    let cuda = ablation
        .variants
        .iter()
        .any(|v| v.config.run.device == DeviceKind::Cuda);
    let ranks = options.ranks.max(1);
    let quote = |p: &Path| format!("'{}'", p.display().to_string().replace('\'', r"'\''"));
    let mut text = String::from("#!/usr/bin/env bash\n");
    text += &format!(
        "# moelab ablate {} --slurm: one array task per variant; compare with\n",
        ablation.path.display()
    );
    text += &format!(
        "#   moelab ablate {} --out {} --compare\n",
        ablation.path.display(),
        out_dir.display()
    );
    text += &format!("#SBATCH --job-name=moelab-{name}\n");
    text += &format!("#SBATCH --array=0-{}\n", configs.len() - 1);
    text += &format!("#SBATCH --ntasks={ranks}\n");
    if cuda {
        text += "#SBATCH --gpus-per-task=1\n";
    }
    text += &format!(
        "#SBATCH --output={}/%x-%A_%a.out\n",
        out_dir.join(VARIANTS_DIR).display()
    );
    // Slurm signals the tasks before the time limit; moelab saves a checkpoint and exits 0.
    text += "#SBATCH --signal=TERM@120\n";
    text += "# The datasets were prepared once by `moelab ablate --slurm` before submission.\n";
    text += "set -euo pipefail\n";
    text += "variants=(";
    for (variant, _) in &configs {
        text += &format!(" {variant}");
    }
    text += " )\n";
    text += "name=${variants[$SLURM_ARRAY_TASK_ID]}\n";
    text += &format!(
        "srun --kill-on-bad-exit=1 {} train {}/\"$name\".toml --run-dir {}/\"$name\" --resume auto\n",
        quote(&exe),
        quote(&out_dir.join(VARIANTS_DIR)),
        quote(&out_dir),
    );
    let path = out_dir.join(VARIANTS_DIR).join("ablate.sbatch");
    moelab_io::write_atomic(&path, text.as_bytes()).map_err(TrainError::io(&path))?;
    Ok(path)
}

/// Submits `script` with `sbatch`; returns what sbatch printed (the job id).
pub fn submit_slurm(script: &Path) -> Result<String, TrainError> {
    let out = Command::new("sbatch").arg(script).output().map_err(|e| {
        TrainError::Argument(format!(
            "cannot run sbatch ({e}); is this a Slurm login node? The script is {}; submit it there with `sbatch {}`",
            script.display(),
            script.display()
        ))
    })?;
    if !out.status.success() {
        return Err(TrainError::Argument(format!(
            "sbatch {} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}
