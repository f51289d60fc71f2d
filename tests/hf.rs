//! End-to-end tests of `moelab export-hf` / `moelab import-hf` / `moelab eval --dump-logits`:
//! export -> import -> export is exact for an OLMoE-style and a Mixtral-style run, unsupported
//! features are all listed, a wrong-shape tensor is named, and (when torch and transformers
//! import) `scripts/hf_parity.py` finds the transformers logits within 1e-4.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{Device, Tensor};

/// A scratch folder with a tiny three-domain corpus; configs are written per test.
struct Fixture {
    dir: PathBuf,
}

impl Fixture {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("moelab-hf-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let corpus = dir.join("corpus");
        let words = [
            "the", "model", "routes", "tokens", "to", "experts", "and", "data", "mixture",
            "changes", "loss", "falls", "when", "training", "runs",
        ];
        for (d, domain) in ["prose", "code", "math"].iter().enumerate() {
            std::fs::create_dir_all(corpus.join(domain)).unwrap();
            let mut text = String::new();
            for doc in 0..40 {
                let line: Vec<String> = (0..40)
                    .map(|i| match *domain {
                        "code" => format!("x{} = x{} + {};", (doc + i) % 7, (i * 3) % 5, i % 9),
                        "math" => format!(
                            "{} + {} = {}",
                            (doc * i) % 13,
                            i % 11,
                            (doc * i) % 13 + i % 11
                        ),
                        _ => words[(doc * 7 + i * (d + 3)) % words.len()].to_string(),
                    })
                    .collect();
                text += &format!("{{\"text\": \"{}\"}}\n", line.join(" "));
            }
            std::fs::write(corpus.join(domain).join("part.jsonl"), text).unwrap();
        }
        Self { dir }
    }

    /// Writes `{name}.toml` with the given extra `[model]` and `[model.moe]` lines.
    fn config(&self, name: &str, model: &str, moe: &str) -> PathBuf {
        let path = self.dir.join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                r#"
[run]
name = "{name}"
seed = 3
out_dir = "{out}"
threads = 1

[model]
vocab_size = 512
d_model = 32
n_layers = 2
n_heads = 4
n_kv_heads = 2
max_seq_len = 32
init_std = 0.05
{model}

[model.moe]
n_experts = 4
top_k = 2
expert_ff = 16
{moe}

[data]
dataset = "{prepared}"
sources = "{corpus}"
tokenizer_vocab = 400
seq_len = 32
validation_tokens = 128

[data.mixture]
prose = 0.5
code = 0.3
math = 0.2

[train]
steps = 2
micro_batch = 4
global_batch_tokens = 128
lr = 1e-2
warmup_steps = 1

[checkpoint]
interval = 2

[log]
interval = 1
router_interval = 5
"#,
                out = self.dir.join("runs").display(),
                prepared = self.dir.join("prepared").display(),
                corpus = self.dir.join("corpus").display(),
            ),
        )
        .unwrap();
        path
    }

    /// Trains `config` for its 2 steps; returns the checkpoint folder.
    fn train(&self, name: &str, config: &Path) -> PathBuf {
        let out = moelab(&[
            "train",
            config.to_str().unwrap(),
            "--run-dir",
            self.dir.join("runs").join(name).to_str().unwrap(),
        ]);
        assert_ok(&out, "train");
        self.dir
            .join("runs")
            .join(name)
            .join("checkpoints")
            .join("step-00000002")
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn moelab(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moelab"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// Every tensor of `a` and `b` has the same name, shape, dtype and bits.
fn assert_same_tensors(a: &Path, b: &Path) {
    let (a, b) = (tensors(a), tensors(b));
    let mut names: Vec<&String> = a.keys().collect();
    names.sort();
    let mut b_names: Vec<&String> = b.keys().collect();
    b_names.sort();
    assert_eq!(names, b_names);
    for name in names {
        let (x, y) = (&a[name], &b[name]);
        assert_eq!(x.dims(), y.dims(), "{name}");
        assert_eq!(x.dtype(), y.dtype(), "{name}");
        let bits = |t: &Tensor| -> Vec<u32> {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .into_iter()
                .map(f32::to_bits)
                .collect()
        };
        assert_eq!(bits(x), bits(y), "tensor {name} differs");
    }
}

/// The interpreter for the parity script: `MOELAB_HF_PYTHON` (e.g. `.venv-hf/bin/python`) or
/// `python3`.
fn python() -> String {
    std::env::var("MOELAB_HF_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn python_has_transformers() -> bool {
    Command::new(python())
        .args(["-c", "import torch, transformers, safetensors"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Export, dump, parity (when possible), import, export again: exact round trip.
fn round_trip(name: &str, model: &str, moe: &str, arch: &str, expected_names: &[&str]) {
    let fx = Fixture::new(name);
    let config = fx.config(name, model, moe);
    let ckpt = fx.train(name, &config);
    let export = fx.dir.join("export");
    let out = moelab(&[
        "export-hf",
        ckpt.to_str().unwrap(),
        "--out",
        export.to_str().unwrap(),
    ]);
    assert_ok(&out, "export-hf");
    assert!(String::from_utf8_lossy(&out.stdout).contains(arch));
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(export.join(file).is_file(), "{file} missing");
    }
    let config_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(export.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config_json["architectures"][0], arch);
    let exported = tensors(&export.join("model.safetensors"));
    for expected in expected_names {
        assert!(exported.contains_key(*expected), "{expected} missing");
    }

    // Exporting over an existing folder is refused.
    let again = moelab(&[
        "export-hf",
        ckpt.to_str().unwrap(),
        "--out",
        export.to_str().unwrap(),
    ]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("already exists"),
        "{}",
        stderr(&again)
    );

    let dump = fx.dir.join("dump.safetensors");
    let out = moelab(&[
        "eval",
        ckpt.to_str().unwrap(),
        "--dump-logits",
        dump.to_str().unwrap(),
        "--tokens",
        "24",
    ]);
    assert_ok(&out, "eval --dump-logits");
    let dumped = tensors(&dump);
    assert_eq!(dumped["input_ids"].dims(), &[3, 24]);
    assert_eq!(dumped["logits"].dims(), &[3, 24, 512]);

    if python_has_transformers() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/hf_parity.py");
        let out = Command::new(python())
            .arg(script)
            .arg(&export)
            .arg(&dump)
            .output()
            .unwrap();
        assert_ok(&out, "scripts/hf_parity.py");
        println!("{}", String::from_utf8_lossy(&out.stdout));
    } else {
        println!(
            "note: {} cannot import torch + transformers; skipping the logit parity check",
            python()
        );
    }

    let imported = fx.dir.join("imported");
    let out = moelab(&[
        "import-hf",
        export.to_str().unwrap(),
        "--out",
        imported.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]);
    assert_ok(&out, "import-hf");
    // The imported model is the trained one, tensor for tensor.
    assert_same_tensors(
        &ckpt.join("model.safetensors"),
        &imported.join("model.safetensors"),
    );
    let export2 = fx.dir.join("export2");
    let out = moelab(&[
        "export-hf",
        imported.to_str().unwrap(),
        "--out",
        export2.to_str().unwrap(),
    ]);
    assert_ok(&out, "export-hf of the import");
    assert_same_tensors(
        &export.join("model.safetensors"),
        &export2.join("model.safetensors"),
    );

    // The imported checkpoint evaluates and resumes.
    assert_ok(
        &moelab(&["eval", imported.to_str().unwrap()]),
        "eval of the import",
    );
    let out = moelab(&[
        "train",
        config.to_str().unwrap(),
        "--run-dir",
        fx.dir.join("runs").join("resumed").to_str().unwrap(),
        "--resume",
        imported.to_str().unwrap(),
        "--set",
        "train.steps=1",
    ]);
    assert_ok(&out, "train --resume of the import");
}

#[test]
fn olmoe_round_trip_is_exact() {
    round_trip(
        "olmoe",
        "qk_norm = true\nrope_theta = 500000.0",
        "",
        "OlmoeForCausalLM",
        &[
            "model.layers.1.self_attn.q_norm.weight",
            "model.layers.1.mlp.gate.weight",
            "model.layers.1.mlp.experts.3.down_proj.weight",
            "lm_head.weight",
        ],
    );
}

#[test]
fn mixtral_round_trip_is_exact() {
    round_trip(
        "mixtral",
        "qk_norm = false\ntie_embeddings = true",
        "renormalize = true",
        "MixtralForCausalLM",
        &[
            "model.layers.0.block_sparse_moe.gate.weight",
            "model.layers.0.block_sparse_moe.experts.2.w1.weight",
            "model.layers.0.block_sparse_moe.experts.2.w2.weight",
            "model.layers.0.block_sparse_moe.experts.2.w3.weight",
        ],
    );
}

#[test]
fn unsupported_features_are_all_listed() {
    let fx = Fixture::new("unsupported");
    let config = fx.config(
        "bad",
        "qk_norm = false\nffn_hidden = 32",
        "router = \"sigmoid\"\ndense_layers = 1\nexpert_bias = true",
    );
    let ckpt = fx.train("bad", &config);
    let export = fx.dir.join("export");
    let out = moelab(&[
        "export-hf",
        ckpt.to_str().unwrap(),
        "--out",
        export.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    for feature in [
        "model.moe.router = \"sigmoid\"",
        "model.moe.dense_layers = 1",
        "model.moe.expert_bias",
        "model.qk_norm = false with model.moe.renormalize = false",
    ] {
        assert!(err.contains(feature), "`{feature}` not in: {err}");
    }
    assert!(!export.exists());
}

#[test]
fn import_names_a_wrong_shape_tensor() {
    let fx = Fixture::new("wrongshape");
    let config = fx.config("olmoe", "qk_norm = true", "");
    let ckpt = fx.train("olmoe", &config);
    let export = fx.dir.join("export");
    assert_ok(
        &moelab(&[
            "export-hf",
            ckpt.to_str().unwrap(),
            "--out",
            export.to_str().unwrap(),
        ]),
        "export-hf",
    );
    let path = export.join("model.safetensors");
    let mut map = tensors(&path);
    let name = "model.layers.1.self_attn.k_proj.weight";
    map.insert(
        name.into(),
        Tensor::zeros((8, 32), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&map, &path).unwrap();
    let imported = fx.dir.join("imported");
    let out = moelab(&[
        "import-hf",
        export.to_str().unwrap(),
        "--out",
        imported.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains(name) && err.contains("[8, 32]"), "{err}");
    assert!(!imported.exists());

    // An unexpected extra tensor is named too.
    map.insert(
        name.into(),
        Tensor::zeros((16, 32), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    map.insert(
        "model.layers.0.mlp.shared_expert.up_proj.weight".into(),
        Tensor::zeros(4, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&map, &path).unwrap();
    let out = moelab(&[
        "import-hf",
        export.to_str().unwrap(),
        "--out",
        imported.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("model.layers.0.mlp.shared_expert.up_proj.weight"),
        "{err}"
    );
}
