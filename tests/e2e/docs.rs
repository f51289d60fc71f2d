//! README and `--help` say what the tool does: the first command and the first-hour walkthrough
//! train into different run folders (a second `train` into a finished run is refused), help
//! examples name checkpoints configs/tiny.toml writes, TensorBoard is mentioned, and every
//! command has its row in the CLI table.

use crate::util::{moelab, ok, repo_root};

fn readme() -> String {
    std::fs::read_to_string(repo_root().join("README.md")).unwrap()
}

/// The run folder a `train configs/tiny.toml ...` command line writes: `--run-dir`, else
/// `runs/<--set run.name or tiny>`.
fn run_folder(line: &str) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    let after = |flag: &str| {
        words
            .windows(2)
            .find(|w| w[0] == flag)
            .map(|w| w[1].to_string())
    };
    if let Some(dir) = after("--run-dir") {
        return dir.trim_end_matches('/').to_string();
    }
    let name = words
        .windows(2)
        .find_map(|w| {
            (w[0] == "--set")
                .then(|| w[1].strip_prefix("run.name="))
                .flatten()
        })
        .unwrap_or("tiny");
    format!("runs/{}", name.trim_matches('"'))
}

#[test]
fn readme_first_command_and_first_hour_use_different_run_folders() {
    let text = readme();
    let trains: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && l.contains("train configs/tiny.toml"))
        .collect();
    let first = trains
        .iter()
        .find(|l| l.starts_with("cargo run"))
        .expect("the first command trains configs/tiny.toml");
    let walkthrough = trains
        .iter()
        .find(|l| l.starts_with("moelab train"))
        .expect("the first hour trains configs/tiny.toml");
    assert_ne!(
        run_folder(first),
        run_folder(walkthrough),
        "`{first}` and `{walkthrough}` train into the same folder: the second is refused"
    );
    // The walkthrough's later steps read the folder it trained.
    assert!(text.contains(&format!("moelab eval {}", run_folder(walkthrough))));
}

#[test]
fn readme_mentions_tensorboard_and_lists_every_new_command() {
    let text = readme();
    assert!(
        text.contains("log.tensorboard"),
        "TensorBoard is not mentioned"
    );
    for row in [
        "| `moelab data batches CONFIG",
        "| `moelab sample CHECKPOINT",
    ] {
        assert!(text.contains(row), "README's CLI table lacks {row}");
    }
}

#[test]
fn help_examples_name_checkpoints_tiny_toml_writes() {
    let config: toml::Table = std::fs::read_to_string(repo_root().join("configs/tiny.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let steps = config["train"]["steps"].as_integer().unwrap() as u64;
    let interval = config["checkpoint"]["interval"].as_integer().unwrap() as u64;
    let written =
        |step: u64| step == steps || (step > 0 && step.is_multiple_of(interval) && step <= steps);
    for command in [
        &["eval"][..],
        &["trace"],
        &["export-hf"],
        &["sample"],
        &["data", "batches"],
    ] {
        let mut args = command.to_vec();
        args.push("--help");
        let help = ok(&moelab(&args));
        assert!(
            help.contains("Example"),
            "{command:?} --help has no example"
        );
        for part in help.split("runs/tiny/checkpoints/step-").skip(1) {
            let step: u64 = part[..8].parse().unwrap();
            assert!(
                written(step),
                "{command:?} --help names step {step}, which configs/tiny.toml never writes"
            );
        }
    }
}
