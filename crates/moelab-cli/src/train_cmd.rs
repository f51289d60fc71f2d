//! `moelab train` and `moelab eval`: run the trainer and draw its progress.

use std::path::PathBuf;

use clap::Args;
use std::rc::Rc;

use moelab_train::dist::{self, Collective};
use moelab_train::eval::evaluate_checkpoint_with;
use moelab_train::{checkpoint, train_on, Config, Event, Resume, RunOptions};

use crate::progress::{summary_lines, TrainProgress};

/// Arguments of `moelab train`.
#[derive(Debug, Args)]
#[command(
    after_help = "Example: moelab train configs/tiny.toml --set train.steps=50 --resume auto"
)]
pub struct TrainArgs {
    /// Run config (TOML).
    config: PathBuf,
    /// Run folder (default: run.out_dir/run.name).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Resume: `auto` (newest complete checkpoint, or fresh if none) or a checkpoint folder.
    #[arg(long, value_name = "auto|PATH")]
    resume: Option<String>,
    /// Override a config key, e.g. --set train.lr=1e-3 (repeatable).
    #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
    overrides: Vec<String>,
    /// On resume, accept a changed [data.mixture]; it becomes a new data stage from here on.
    #[arg(long)]
    allow_mixture_change: bool,
    /// Start even when the run's estimated memory exceeds what the device has.
    #[arg(long)]
    ignore_memory_check: bool,
}

/// Arguments of `moelab eval`.
#[derive(Debug, Args)]
#[command(
    after_help = "Example: moelab eval runs/tiny --json\n         moelab eval runs/tiny/checkpoints/step-00000200 --json\n         moelab eval runs/tiny/checkpoints/step-00000200 --dump-logits logits.safetensors --tokens 64"
)]
pub struct EvalArgs {
    /// Checkpoint folder, or a run folder (its newest complete checkpoint).
    checkpoint: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
    /// Instead of evaluating, write the logits on the first validation sequence of each domain
    /// (`input_ids` I64 (B,T), `logits` F32 (B,T,V)) as safetensors, for scripts/hf_parity.py.
    #[arg(long, value_name = "FILE")]
    dump_logits: Option<PathBuf>,
    /// With --dump-logits: tokens per sequence (default: data.seq_len).
    #[arg(long, value_name = "N", requires = "dump_logits")]
    tokens: Option<usize>,
}

/// Runs `moelab train`: in this process, or as one rank of an `mpirun`/`srun` job (rank 0
/// draws the progress and writes the run folder). A rank that fails ends the whole job.
pub fn run_train(args: TrainArgs) -> anyhow::Result<()> {
    let comm: Rc<dyn Collective> = Rc::from(dist::launch()?);
    if comm.world_size() == 1 {
        return train_rank(args, comm);
    }
    let (rank, world) = (comm.rank(), comm.world_size());
    match train_rank(args, comm.clone()) {
        Ok(()) => Ok(()),
        // Agreed on: every rank has this error. Each prints it before any exits (mpirun ends
        // the job at the first non-zero exit), then MPI is finalised and the rank exits 1.
        Err(e) if is_collective(&e) => {
            eprintln!("Error: {e:?}");
            comm.barrier();
            drop(comm);
            std::process::exit(1)
        }
        Err(e) => {
            eprintln!("error: moelab rank {rank} of {world}: {e:#}");
            // The other ranks may be waiting in a collective: take the whole job down.
            comm.abort(1)
        }
    }
}

/// Whether every rank of the job returns this error (it came out of an agreement).
fn is_collective(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<moelab_train::TrainError>(),
        Some(moelab_train::TrainError::Distributed(_))
    )
}

/// `moelab train` on one rank of `comm`.
fn train_rank(args: TrainArgs, comm: Rc<dyn Collective>) -> anyhow::Result<()> {
    let cfg = dist::agree(comm.as_ref(), Config::load(&args.config, &args.overrides))?;
    let resume = args.resume.map(|r| {
        if r == "auto" {
            Resume::Auto
        } else {
            Resume::Path(r.into())
        }
    });
    let options = RunOptions {
        run_dir: args.run_dir,
        resume,
        allow_mixture_change: args.allow_mixture_change,
        ignore_memory_check: args.ignore_memory_check,
    };
    if comm.rank() != 0 {
        train_on(cfg, options, comm, &mut |_| {})?;
        return Ok(());
    }
    let mut progress = TrainProgress::new(cfg.train.steps, "")?;
    let result = train_on(cfg, options, comm, &mut |event: &Event| {
        progress.on_event(event)
    });
    progress.finish();
    let summary = result?;
    progress.say(&summary_lines(&summary));
    Ok(())
}

/// Runs `moelab eval`.
pub fn run_eval(args: EvalArgs) -> anyhow::Result<()> {
    let checkpoint = checkpoint::resolve(&args.checkpoint)?;
    if let Some(file) = &args.dump_logits {
        let dump = moelab_train::hf_io::dump_logits(&checkpoint, file, args.tokens)?;
        outln!(
            "wrote logits of {} sequences x {} tokens ({}) to {}",
            dump.sequences,
            dump.tokens,
            dump.domains.join(", "),
            file.display()
        );
        return Ok(());
    }
    // The tokens behind each loss go to stderr (stdout may hold only JSON), before the work.
    let report = evaluate_checkpoint_with(&checkpoint, &mut |check| {
        eprintln!("{}", check.line());
        for warning in check.warnings() {
            eprintln!("warning: {warning}");
        }
    })?;
    if args.json {
        outln!("{}", report.to_json());
    } else {
        out!("{}", report.summary());
    }
    Ok(())
}
