#!/usr/bin/env python3
"""Logit parity of a `moelab export-hf` folder against moelab's own forward pass.

    moelab eval CHECKPOINT --dump-logits dump.safetensors [--tokens N]
    moelab export-hf CHECKPOINT --out export/
    python3 scripts/hf_parity.py export/ dump.safetensors [--tol 1e-4] [--venv .venv-hf]

Loads the export with transformers' AutoModelForCausalLM (CPU, float32, eager attention), runs
the dumped `input_ids`, and compares the logits with the dumped ones. Prints the max abs diff;
exits 0 when it is below --tol, 1 when it is not, 2 on a usage or setup problem.

With --venv DIR the script, when torch or transformers cannot be imported, creates DIR (a venv),
installs torch, transformers and safetensors from PyPI into it, and re-runs itself there.
"""

import argparse
import os
import subprocess
import sys


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export_dir", help="folder written by `moelab export-hf`")
    p.add_argument("dump_file", help="file written by `moelab eval --dump-logits`")
    p.add_argument("--tol", type=float, default=1e-4, help="max abs logit difference allowed (default 1e-4)")
    p.add_argument("--venv", help="create/use this venv when torch+transformers are not importable")
    return p.parse_args()


def ensure_deps(args):
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        import safetensors  # noqa: F401
        return
    except ImportError as e:
        missing = str(e)
    if not args.venv or os.environ.get("MOELAB_HF_PARITY_REEXEC"):
        sys.exit(f"hf_parity: {missing}; install torch, transformers and safetensors, or pass --venv DIR")
    venv = os.path.abspath(args.venv)
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        print(f"hf_parity: creating {venv}", file=sys.stderr)
        subprocess.check_call([sys.executable, "-m", "venv", venv])
        subprocess.check_call([python, "-m", "pip", "install", "-q", "torch", "transformers", "safetensors"])
    env = dict(os.environ, MOELAB_HF_PARITY_REEXEC="1")
    os.execve(python, [python, os.path.abspath(__file__)] + sys.argv[1:], env)


def main():
    args = parse_args()
    ensure_deps(args)
    import torch
    import transformers
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    dump = load_file(args.dump_file)
    input_ids = dump["input_ids"].to(torch.long)
    expected = dump["logits"].to(torch.float32)
    kwargs = dict(dtype=torch.float32, attn_implementation="eager")
    try:
        model = AutoModelForCausalLM.from_pretrained(args.export_dir, **kwargs)
    except TypeError:
        kwargs["torch_dtype"] = kwargs.pop("dtype")
        model = AutoModelForCausalLM.from_pretrained(args.export_dir, **kwargs)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids, use_cache=False).logits.to(torch.float32)
    if logits.shape != expected.shape:
        print(f"FAIL: logits shape {tuple(logits.shape)} != dumped {tuple(expected.shape)}")
        return 1
    diff = (logits - expected).abs()
    max_diff = diff.max().item()
    argmax_agree = (logits.argmax(-1) == expected.argmax(-1)).float().mean().item()
    arch = model.config.architectures[0] if model.config.architectures else type(model).__name__
    print(
        f"{arch}: transformers {transformers.__version__}, torch {torch.__version__}; "
        f"input {tuple(input_ids.shape)}, logits {tuple(logits.shape)}"
    )
    print(f"max abs diff {max_diff:.3e} (mean {diff.mean().item():.3e}); argmax agreement {argmax_agree:.4f}")
    if not max_diff < args.tol:
        print(f"FAIL: max abs diff {max_diff:.3e} >= tolerance {args.tol:.1e}")
        return 1
    print(f"OK: below tolerance {args.tol:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
