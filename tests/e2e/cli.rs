//! `moelab model-info` and config validation.

use crate::util::{arg, fails, moelab, ok, repo_root, Scratch};

#[test]
fn model_info_of_tiny_matches_a_hand_count() {
    let out = moelab(&["model-info", "configs/tiny.toml", "--json"]);
    let info: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    // tiny: vocab 4096, d 128, 4 layers, 4 heads (head_dim 32), 2 kv heads, qk-norm,
    // 8 experts top-2 of width 256, untied head, seq 128.
    let embedding = 4096 * 128;
    let attention = 4 * (128 * 128 + 2 * 128 * 64 + 128 * 128 + (128 + 64));
    let norms = 4 * 2 * 128 + 128;
    let router = 4 * 128 * 8;
    let expert = 3 * 128 * 256;
    let lm_head = 4096 * 128;
    let total = embedding + attention + norms + router + 4 * 8 * expert + lm_head;
    let active = embedding + attention + norms + router + 4 * 2 * expert + lm_head;
    let flops = 6 * (active - embedding) + 6 * 4 * 128 * 128;
    assert_eq!(total, 4_396_928);
    assert_eq!(info["total_params"], total);
    assert_eq!(info["active_params"], active);
    assert_eq!(info["train_flops_per_token"], flops);
    let experts = info["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "routed_experts")
        .unwrap();
    assert_eq!(experts["params"], 4 * 8 * expert);
    assert_eq!(experts["active_params"], 4 * 2 * expert);

    // The memory a run needs: f32 weights, gradients and two AdamW moments, the rotary tables
    // (max_seq_len positions), plus activations that scale with the micro-batch.
    let memory = &info["memory"];
    assert_eq!(memory["micro_batch"], 8);
    assert_eq!(memory["seq_len"], 128);
    assert_eq!(memory["weights_bytes"], 4 * total);
    assert_eq!(memory["gradients_bytes"], 4 * total);
    assert_eq!(memory["optimizer_bytes"], 8 * total);
    let field = |m: &serde_json::Value, k: &str| m[k].as_u64().unwrap();
    let sum: u64 = [
        "weights_bytes",
        "gradients_bytes",
        "optimizer_bytes",
        "compute_weights_bytes",
        "tables_bytes",
        "activations_bytes",
    ]
    .iter()
    .map(|k| field(memory, k))
    .sum();
    // cos and sin for 128 positions x 16 frequencies (head_dim 32): f64 while built, f32 kept.
    assert_eq!(field(memory, "tables_bytes"), 2 * 128 * 16 * (8 + 4));
    assert_eq!(field(memory, "total_bytes"), sum);
    let doubled: serde_json::Value = serde_json::from_str(&ok(&moelab(&[
        "model-info",
        "configs/tiny.toml",
        "--json",
        "--set",
        "train.micro_batch=16",
    ])))
    .unwrap();
    assert_eq!(
        field(&doubled["memory"], "activations_bytes"),
        2 * field(memory, "activations_bytes")
    );
}

#[test]
fn model_info_prints_a_table_and_takes_overrides() {
    let text = ok(&moelab(&[
        "model-info",
        "configs/tiny.toml",
        "--set",
        "model.moe.n_experts=16",
    ]));
    assert!(
        text.contains("routed_experts") && text.contains("total"),
        "{text}"
    );
    // 4 layers x 16 experts x 3 x 128 x 256
    assert!(
        text.contains(&(4 * 16 * 3 * 128 * 256).to_string()),
        "{text}"
    );
}

#[test]
fn bad_configs_fail_naming_the_key() {
    let dir = Scratch::new("cli-bad-configs");
    let tiny = std::fs::read_to_string(repo_root().join("configs/tiny.toml")).unwrap();
    let cases = [
        (
            tiny.replace("expert_ff = 256", "expert_ff = 256\nexpert_width = 3"),
            "expert_width",
        ),
        (tiny.replace("n_heads = 4", "n_heads = 3"), "model.n_heads"),
        (tiny.replace("top_k = 2", "top_k = 9"), "model.moe.top_k"),
    ];
    for (i, (text, key)) in cases.iter().enumerate() {
        let path = dir.join(format!("bad{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let err = fails(&moelab(&["model-info", arg(&path)]));
        assert!(err.contains(key), "expected `{key}` in: {err}");
    }
    let err = fails(&moelab(&[
        "model-info",
        "configs/tiny.toml",
        "--set",
        "model.moe.topk=1",
    ]));
    assert!(err.contains("topk"), "{err}");
    let err = fails(&moelab(&["model-info", "configs/missing.toml"]));
    assert!(err.contains("missing.toml"), "{err}");
}
