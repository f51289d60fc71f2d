#!/usr/bin/env python3
"""The PyTorch peer of `moelab bench`: the same MoE training step in Hugging Face transformers.

    python3 scripts/peer_torch.py configs/gpu-b.toml --mode both --json
    python3 scripts/peer_torch.py configs/gpu-b.toml --device cpu --steps 3 --warmup 1 \\
        --set model.d_model=64 --set model.n_layers=2 --set model.vocab_size=512 \\
        --set model.moe.n_experts=4 --set train.micro_batch=2 --set data.seq_len=32

Builds transformers' `OlmoeForCausalLM` with the shapes of a moelab run config ([model],
[model.moe]; a step = [train].global_batch_tokens / [data].seq_len sequences in micro-batches of
[train].micro_batch, gradients accumulated, as moelab trains and benches it): random init, bf16 weights on CUDA
(f32 on CPU), SDPA attention, `grouped_mm` experts (else transformers' default, and the output
says so), aux loss on, top-k gates not renormalised (OLMoE). A step is forward + backward +
clip_grad_norm_(1.0) + AdamW (fused on CUDA; [train].lr, weight decay 0.1, betas 0.9/0.95) on
seeded random tokens, labels = tokens; eager and/or `torch.compile(model)`.

Measured as moelab's bench: the median of --steps steps after --warmup steps, the device
synchronised around each step; forward / backward / optimizer split from CUDA events (medians);
tokens/s = tokens per step / median step (forward and backward summed over the micro-batches); peak torch.cuda.max_memory_allocated (and
max_memory_reserved; moelab bench reports the same two from the CUDA pool); MFU = tokens/s x FLOPs/token /
989 TFLOP/s (dense bf16, H100/H200 SXM). FLOPs/token is moelab's
definition (crates/moelab-model/src/info.rs, = the shared README's): 6 x the parameters a token
multiplies by (its k experts and the LM head, not the input-embedding lookup) + 6 x layers x
seq_len x d_model for attention scores, from the built model's parameter count; where that
differs from moelab's count of the config (a feature OLMoE cannot express) both are reported.

Not like moelab: the peer keeps weights and AdamW state in bf16 (moelab: f32 master weights and
state, bf16 compute), and transformers' OLMoE has no router z-loss (negligible cost).
"""

import argparse
import gc
import json
import statistics
import sys
import time
import tomllib

PEAK_FLOPS = 989e12  # dense bf16 peak of an H100/H200 SXM
KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false"}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="moelab run config (TOML)")
    p.add_argument("--mode", choices=["eager", "compile", "both"], default="eager")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--dtype", choices=["bf16", "f32"], help="weights and compute (default: bf16 on cuda, f32 on cpu)")
    p.add_argument("--experts", default="grouped_mm", help="transformers experts_implementation (default grouped_mm)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config key, as moelab's --set (repeatable)")
    p.add_argument("--json", action="store_true", help="one JSON object per mode on stdout")
    return p.parse_args()


def fail(message):
    sys.exit(f"peer_torch: {message}")


def load_config(path, overrides):
    try:
        with open(path, "rb") as f:
            cfg = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        fail(f"cannot read config {path}: {e}")
    for spec in overrides:
        key, sep, raw = spec.partition("=")
        if not sep or not key.strip():
            fail(f"--set {spec!r}: expected key.path=value")
        try:  # a TOML literal if it is one, else a bare string (as moelab's --set)
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        *parents, last = key.strip().split(".")
        table = cfg
        for part in parents:
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                fail(f"--set {spec!r}: `{part}` is not a table")
        table[last] = value
    return cfg


def shape_of(cfg, path):
    """The shapes the peer needs; a missing or mistyped key is named."""
    def get(key, default=None, kind=int):
        node = cfg
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                if default is None:
                    fail(f"{path}: missing config key `{key}`")
                return default
            node = node[part]
        if kind is float and isinstance(node, int) and not isinstance(node, bool):
            node = float(node)
        if not isinstance(node, kind) or (kind is int and isinstance(node, bool)):
            fail(f"{path}: config key `{key}` should be {KIND_NAMES[kind]}, got {node!r}")
        if kind in (int, float) and node <= 0 and key not in ("run.seed", "model.moe.aux_loss_coef"):
            fail(f"{path}: config key `{key}` must be positive, got {node!r}"
                 + (" (the OLMoE peer needs an MoE model)" if key.startswith("model.moe.") else ""))
        return node

    s = dict(
        vocab=get("model.vocab_size"), d=get("model.d_model"), layers=get("model.n_layers"),
        heads=get("model.n_heads"), max_seq=get("model.max_seq_len"),
        rope_theta=get("model.rope_theta", 10000.0, float), norm_eps=get("model.norm_eps", 1e-5, float),
        init_std=get("model.init_std", 0.02, float), qk_norm=get("model.qk_norm", False, bool),
        tied=get("model.tie_embeddings", False, bool), experts=get("model.moe.n_experts"),
        top_k=get("model.moe.top_k", 2), expert_ff=get("model.moe.expert_ff"),
        renormalize=get("model.moe.renormalize", False, bool), aux=get("model.moe.aux_loss_coef", 0.01, float),
        micro_batch=get("train.micro_batch"), seq=get("data.seq_len"), lr=get("train.lr", kind=float),
        seed=get("run.seed", 0),
    )
    tokens = get("train.global_batch_tokens", s["micro_batch"] * s["seq"])
    if tokens % (s["micro_batch"] * s["seq"]):
        fail(f"{path}: train.global_batch_tokens = {tokens} is not a multiple of micro_batch x seq_len")
    s["micro_batches"] = tokens // (s["micro_batch"] * s["seq"])
    s["kv_heads"] = get("model.n_kv_heads", s["heads"])
    if s["d"] % s["heads"] or s["heads"] % s["kv_heads"]:
        fail(f"{path}: d_model, n_heads and n_kv_heads do not divide evenly")
    if s["top_k"] > s["experts"]:
        fail(f"{path}: model.moe.top_k = {s['top_k']} exceeds model.moe.n_experts = {s['experts']}")
    if s["seq"] > s["max_seq"]:
        fail(f"{path}: data.seq_len = {s['seq']} exceeds model.max_seq_len = {s['max_seq']}")
    notes = []
    moe = cfg.get("model", {}).get("moe", {})
    if not s["qk_norm"]:
        notes.append("model.qk_norm = false, but OLMoE always normalises q and k")
    for key, off in [("router", "softmax"), ("n_shared_experts", 0), ("dense_layers", 0),
                     ("capacity_factor", None), ("expert_bias", False)]:
        if moe.get(key, off) != off:
            notes.append(f"model.moe.{key} = {moe[key]!r} is not expressible in OLMoE; ignored")
    return s, notes


def moelab_counts(s):
    """(total params, FLOPs per token) as `moelab model-info` counts them (info.rs)."""
    d, head_dim = s["d"], s["d"] // s["heads"]
    q, kv = s["heads"] * head_dim, s["kv_heads"] * head_dim
    attn = d * q + 2 * d * kv + q * d + (q + kv if s["qk_norm"] else 0)
    expert = 3 * d * s["expert_ff"]
    per_layer = attn + 2 * d + d * s["experts"]
    embed = s["vocab"] * d
    total = embed + s["layers"] * (per_layer + s["experts"] * expert) + d + (0 if s["tied"] else embed)
    flops = 6 * (s["layers"] * (per_layer + s["top_k"] * expert) + d + embed) + 6 * s["layers"] * s["seq"] * q
    return total, flops


def build(s, device, dtype, experts_impl, notes):
    import torch
    from transformers import OlmoeConfig, OlmoeForCausalLM

    kwargs = dict(
        vocab_size=s["vocab"], hidden_size=s["d"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], intermediate_size=s["expert_ff"],
        num_experts=s["experts"], num_experts_per_tok=s["top_k"], max_position_embeddings=s["max_seq"],
        rope_theta=s["rope_theta"], rms_norm_eps=s["norm_eps"], initializer_range=s["init_std"],
        norm_topk_prob=s["renormalize"], router_aux_loss_coef=s["aux"], output_router_logits=True,
        tie_word_embeddings=s["tied"], use_cache=False, pad_token_id=None, eos_token_id=None,
    )
    torch.manual_seed(s["seed"])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build and initialise directly in the target dtype and device
    try:
        for impl in ([experts_impl, None] if experts_impl else [None]):
            config = OlmoeConfig(**kwargs, **({"experts_implementation": impl} if impl else {}))
            config._attn_implementation = "sdpa"
            try:
                with torch.device(device):
                    model = OlmoeForCausalLM(config)
                break
            except (ValueError, ImportError) as e:
                if impl is None:
                    raise
                notes.append(f"experts_implementation={impl!r} unavailable ({e}); using the default")
    finally:
        torch.set_default_dtype(previous)
    used = getattr(model.config, "_experts_implementation", None)
    if used is None:
        used = "eager (per-expert loop: this transformers has no experts_implementation)"
        if experts_impl:
            notes.append(f"experts_implementation={experts_impl!r} unavailable in this transformers")
    elif used == "grouped_mm" and device.type == "cpu":
        notes.append("grouped_mm on CPU may run transformers' fallback loop, not a grouped kernel")
    model.train()
    return model, used


def run_mode(mode, s, args, device, dtype, notes):
    import torch

    cuda = device.type == "cuda"
    gc.collect()  # free the previous mode's model (or what a failed mode left) before measuring
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, experts_used = build(s, device, dtype, args.experts, notes)
    step_model = torch.compile(model) if mode == "compile" else model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s["lr"], betas=(0.9, 0.95), weight_decay=0.1, fused=cuda or None)
    gen = torch.Generator(device=device).manual_seed(s["seed"] + 1)
    batches = [torch.randint(0, s["vocab"], (s["micro_batch"], s["seq"]), generator=gen, device=device)
               for _ in range(min((args.warmup + args.steps) * s["micro_batches"], 8))]

    def mark():
        if cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(a, b):
        return a.elapsed_time(b) if cuda else (b - a) * 1e3

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    steps, losses = [], []
    for i in range(args.warmup + args.steps):
        sync()
        start = time.perf_counter()
        marks = []
        for j in range(s["micro_batches"]):
            tokens = batches[(i * s["micro_batches"] + j) % len(batches)]
            m0 = mark()
            loss = step_model(input_ids=tokens, labels=tokens, use_cache=False).loss
            m1 = mark()
            (loss / s["micro_batches"]).backward()
            marks.append((m0, m1, mark()))
        m2 = mark()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        m3 = mark()
        sync()
        wall = (time.perf_counter() - start) * 1e3
        losses.append(loss.item())
        if i >= args.warmup:
            fwd = sum(ms(a, b) for a, b, _ in marks)
            bwd = sum(ms(b, c) for _, b, c in marks)
            steps.append((wall, fwd, bwd, ms(m2, m3)))
    median = [statistics.median(column) for column in zip(*steps)]
    total = sum(p.numel() for p in model.parameters())
    inactive = s["layers"] * (s["experts"] - s["top_k"]) * 3 * s["d"] * s["expert_ff"]
    active = total - inactive
    head = s["vocab"] * s["d"]  # the input embedding is a lookup; a tied head still costs its matmul
    flops = 6 * (active - head + (head if s["tied"] else 0)) + 6 * s["layers"] * s["seq"] * s["d"]
    tokens_per_s = s["micro_batches"] * s["micro_batch"] * s["seq"] / (median[0] / 1e3)
    import transformers

    result = dict(
        peer="transformers-olmoe", mode=mode, config=args.config, tokens_per_s=round(tokens_per_s, 1),
        step_ms_median=round(median[0], 3), fwd_ms=round(median[1], 3), bwd_ms=round(median[2], 3),
        opt_ms=round(median[3], 3), mfu=float(f"{tokens_per_s * flops / PEAK_FLOPS:.4g}"),
        peak_mem_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None,
        # moelab's bench reads the driver's memory in use, which is closer to what torch reserves
        peak_reserved_gb=round(torch.cuda.max_memory_reserved() / 1e9, 2) if cuda else None,
        params_total=total, params_active=active, flops_per_token=flops,
        device=torch.cuda.get_device_name(device) if cuda else "cpu", torch=torch.__version__,
        transformers=transformers.__version__, dtype=str(dtype).removeprefix("torch."),
        experts_implementation=experts_used, micro_batch=s["micro_batch"], seq_len=s["seq"],
        micro_batches=s["micro_batches"],
        first_loss=round(losses[0], 4), last_loss=round(losses[-1], 4),
    )
    moelab_total, moelab_flops = moelab_counts(s)
    if (moelab_total, moelab_flops) != (total, flops):
        result.update(params_total_moelab=moelab_total, flops_per_token_moelab=moelab_flops)
    result["notes"] = list(dict.fromkeys(notes))
    if mode == "compile":
        torch._dynamo.reset()
    return result


def print_table(results):
    cols = [("mode", "{}"), ("tokens_per_s", "{:.0f}"), ("step_ms_median", "{:.1f}"), ("fwd_ms", "{:.1f}"),
            ("bwd_ms", "{:.1f}"), ("opt_ms", "{:.1f}"), ("mfu", "{:.2%}"), ("peak_mem_gb", "{}"),
            ("peak_reserved_gb", "{}")]
    r0 = results[0]
    print(f"{r0['config']}: {r0['device']}, torch {r0['torch']}, transformers {r0['transformers']}, "
          f"{r0['dtype']}, experts {r0['experts_implementation']}")
    print(f"params {r0['params_total']:,} total, {r0['params_active']:,} active; "
          f"{r0['flops_per_token']:,} FLOPs/token; "
          f"step {r0['micro_batches']} x {r0['micro_batch']} x {r0['seq_len']} tokens")
    if "flops_per_token_moelab" in r0:
        print(f"moelab counts this config as {r0['params_total_moelab']:,} params, "
              f"{r0['flops_per_token_moelab']:,} FLOPs/token (MFU above uses the peer's own count)")
    print("  ".join(f"{name:>14}" for name, _ in cols))
    for r in results:
        print("  ".join(f"{fmt.format(r[name]) if r[name] is not None else '-':>14}" for name, fmt in cols))
    for r in results:
        for note in r["notes"]:
            print(f"note ({r['mode']}): {note}")


def main():
    args = parse_args()
    if args.steps < 1 or args.warmup < 0:
        fail("--steps must be >= 1 and --warmup >= 0")
    cfg = load_config(args.config, args.overrides)
    s, notes = shape_of(cfg, args.config)
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as e:
        fail(f"{e}; this script needs torch and transformers")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("CUDA is not available here; pass --device cpu for a small CPU check")
    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "f32")]
    modes = ["eager", "compile"] if args.mode == "both" else [args.mode]
    results, failed = [], False
    for mode in modes:
        try:
            results.append(run_mode(mode, s, args, device, dtype, list(notes)))
        except Exception as e:  # an OOM in one mode should not lose the other's figures
            failed = True
            print(f"peer_torch: mode {mode} failed: {type(e).__name__}: {e}", file=sys.stderr)
            results.append(dict(peer="transformers-olmoe", mode=mode, config=args.config, error=str(e)))
        if args.json:
            print(json.dumps(results[-1]), flush=True)
    if not args.json and any("error" not in r for r in results):
        print_table([r for r in results if "error" not in r])
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
