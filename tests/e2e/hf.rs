//! `moelab export-hf` / `moelab import-hf` / `moelab eval --dump-logits`: export -> import ->
//! export is exact for an OLMoE-style and a Mixtral-style run, unsupported features are all
//! listed, a wrong-shape tensor is named, and (when torch and transformers import)
//! `scripts/hf_parity.py` finds the transformers logits within 1e-4.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};

use crate::corpus::{Corpus, RunConfig};
use crate::util::{arg, fails, moelab, ok_for, repo_root, tensors, Scratch};

/// A scratch folder with a tiny three-domain corpus; configs are written per test.
struct Fixture {
    dir: Scratch,
}

impl Fixture {
    fn new(name: &str) -> Self {
        let dir = Scratch::new(&format!("hf-{name}"));
        Corpus::three_domains()
            .documents(40)
            .vocabulary(15)
            .write(&dir.join("corpus"));
        Self { dir }
    }

    /// Writes `{name}.toml`: 2 steps of 128 tokens, a checkpoint at the end, experts of width
    /// 16, and `sets` (`key.path=value`) on top.
    fn config(&self, name: &str, sets: &[&str]) -> PathBuf {
        RunConfig::small(self.dir.path())
            .set_all(&[
                &format!("run.name={name:?}"),
                "run.seed=3",
                "model.moe.expert_ff=16",
                "data.validation_tokens=128",
                "train.steps=2",
                "train.global_batch_tokens=128",
                "train.lr=1e-2",
                "train.warmup_steps=1",
                "checkpoint.interval=2",
            ])
            .set_all(sets)
            .write(&self.dir.join(format!("{name}.toml")))
    }

    /// Trains `config` for its 2 steps; returns the checkpoint folder.
    fn train(&self, name: &str, config: &Path) -> PathBuf {
        let run_dir = self.dir.join("runs").join(name);
        ok_for(
            "train",
            &moelab(&["train", arg(config), "--run-dir", arg(&run_dir)]),
        );
        run_dir.join("checkpoints").join("step-00000002")
    }
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
/// `sets` shape the model (`key.path=value`, see [`Fixture::config`]).
fn round_trip(name: &str, sets: &[&str], arch: &str, expected_names: &[&str]) {
    let fx = Fixture::new(name);
    let config = fx.config(name, sets);
    let ckpt = fx.train(name, &config);
    let export = fx.dir.join("export");
    let out = moelab(&["export-hf", arg(&ckpt), "--out", arg(&export)]);
    ok_for("export-hf", &out);
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
    let again = moelab(&["export-hf", arg(&ckpt), "--out", arg(&export)]);
    let err = fails(&again);
    assert!(err.contains("already exists"), "{err}");

    let dump = fx.dir.join("dump.safetensors");
    let out = moelab(&[
        "eval",
        arg(&ckpt),
        "--dump-logits",
        arg(&dump),
        "--tokens",
        "24",
    ]);
    ok_for("eval --dump-logits", &out);
    let dumped = tensors(&dump);
    assert_eq!(dumped["input_ids"].dims(), &[3, 24]);
    assert_eq!(dumped["logits"].dims(), &[3, 24, 512]);

    if python_has_transformers() {
        let script = repo_root().join("scripts/hf_parity.py");
        let out = Command::new(python())
            .arg(script)
            .arg(&export)
            .arg(&dump)
            .output()
            .unwrap();
        ok_for("scripts/hf_parity.py", &out);
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
        arg(&export),
        "--out",
        arg(&imported),
        "--config",
        arg(&config),
    ]);
    ok_for("import-hf", &out);
    // The imported model is the trained one, tensor for tensor.
    assert_same_tensors(
        &ckpt.join("model.safetensors"),
        &imported.join("model.safetensors"),
    );
    let export2 = fx.dir.join("export2");
    let out = moelab(&["export-hf", arg(&imported), "--out", arg(&export2)]);
    ok_for("export-hf of the import", &out);
    assert_same_tensors(
        &export.join("model.safetensors"),
        &export2.join("model.safetensors"),
    );

    // The imported checkpoint evaluates and resumes.
    ok_for("eval of the import", &moelab(&["eval", arg(&imported)]));
    let out = moelab(&[
        "train",
        arg(&config),
        "--run-dir",
        arg(&fx.dir.join("runs").join("resumed")),
        "--resume",
        arg(&imported),
        "--set",
        "train.steps=1",
    ]);
    ok_for("train --resume of the import", &out);
}

#[test]
fn olmoe_round_trip_is_exact() {
    round_trip(
        "olmoe",
        &["model.qk_norm=true", "model.rope_theta=500000.0"],
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
        &[
            "model.qk_norm=false",
            "model.tie_embeddings=true",
            "model.moe.renormalize=true",
        ],
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
        &[
            "model.qk_norm=false",
            "model.ffn_hidden=32",
            "model.moe.router=\"sigmoid\"",
            "model.moe.dense_layers=1",
            "model.moe.expert_bias=true",
        ],
    );
    let ckpt = fx.train("bad", &config);
    let export = fx.dir.join("export");
    let out = moelab(&["export-hf", arg(&ckpt), "--out", arg(&export)]);
    let err = fails(&out);
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
    let config = fx.config("olmoe", &["model.qk_norm=true"]);
    let ckpt = fx.train("olmoe", &config);
    let export = fx.dir.join("export");
    ok_for(
        "export-hf",
        &moelab(&["export-hf", arg(&ckpt), "--out", arg(&export)]),
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
        arg(&export),
        "--out",
        arg(&imported),
        "--config",
        arg(&config),
    ]);
    let err = fails(&out);
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
        arg(&export),
        "--out",
        arg(&imported),
        "--config",
        arg(&config),
    ]);
    let err = fails(&out);
    assert!(
        err.contains("model.layers.0.mlp.shared_expert.up_proj.weight"),
        "{err}"
    );
}

#[test]
fn aux_coefficient_is_converted_where_the_losses_agree() {
    let fx = Fixture::new("aux");
    let one_layer = ["model.n_layers=1", "model.moe.aux_loss_coef=0.01"];
    let config = fx.config("plain", &one_layer);
    let ckpt = fx.train("plain", &config);
    let export = fx.dir.join("export");
    let out = moelab(&["export-hf", arg(&ckpt), "--out", arg(&export)]);
    ok_for("export-hf", &out);
    // One MoE layer, top-2: transformers' pooled loss is 2x ours, so its weight is half, and
    // nothing needs saying about it.
    let config_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(export.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config_json["router_aux_loss_coef"].as_f64(), Some(0.005));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("router_aux_loss_coef"), "{err}");
    // Imported with its own config: the coefficient it was trained with.
    let imported = fx.dir.join("imported");
    let out = moelab(&[
        "import-hf",
        arg(&export),
        "--out",
        arg(&imported),
        "--config",
        arg(&config),
    ]);
    ok_for("import-hf", &out);
    let cfg: toml::Table = std::fs::read_to_string(imported.join("config.toml"))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(cfg["model"]["moe"]["aux_loss_coef"].as_float(), Some(0.01));
}

#[test]
fn import_with_expert_bias_writes_zero_biases_and_resumes() {
    let fx = Fixture::new("bias");
    let one_layer = ["model.n_layers=1", "model.moe.aux_loss_coef=0.01"];
    let config = fx.config("plain", &one_layer);
    let ckpt = fx.train("plain", &config);
    let export = fx.dir.join("export");
    ok_for(
        "export-hf",
        &moelab(&["export-hf", arg(&ckpt), "--out", arg(&export)]),
    );
    // Imported with a config that balances by expert bias: zero biases, and the run resumes.
    let biased = fx.config(
        "biased",
        &[one_layer[0], one_layer[1], "model.moe.expert_bias=true"],
    );
    let imported = fx.dir.join("imported");
    let out = moelab(&[
        "import-hf",
        arg(&export),
        "--out",
        arg(&imported),
        "--config",
        arg(&biased),
    ]);
    ok_for("import-hf", &out);
    let model = tensors(&imported.join("model.safetensors"));
    let bias = &model["blocks.0.moe.router.expert_bias"];
    assert_eq!(bias.to_vec1::<f32>().unwrap(), vec![0.0; 4]);
    let cfg: toml::Table = std::fs::read_to_string(imported.join("config.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let moe = &cfg["model"]["moe"];
    assert_eq!(moe["expert_bias"].as_bool(), Some(true));
    assert_eq!(moe["aux_loss_coef"].as_float(), Some(0.01));
    let out = moelab(&[
        "train",
        arg(&biased),
        "--run-dir",
        arg(&fx.dir.join("runs").join("resumed")),
        "--resume",
        arg(&imported),
        "--set",
        "train.steps=1",
    ]);
    ok_for("train --resume of the import", &out);
}
