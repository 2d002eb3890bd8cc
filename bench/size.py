"""Artifact size of a trained checkpoint under every compressor: how the default was sized.

  CHECKPOINT_EVERY=60 ITERATIONS=60 ... python train_gpt.py      # any run that leaves a checkpoint
  python -m bench.size checkpoints/<run_id>/latest.pt

Loads the checkpoint's EMA weights (the ones a run exports; the live weights if it has no EMA),
packs them exactly as the trainer does for each compressor, and prints model bytes, bytes per
parameter, and the artifact total with the code bytes a run counts (the lzma bundle).
"""
from __future__ import annotations

import argparse
import time

import torch

import train_gpt
from hybrid.checkpoint import load_checkpoint
from hybrid.model import HybridGPT
from quant.artifact import artifact_breakdown, pack_model
from quant.budget import ARTIFACT_LIMIT
from quant.codec import available_compressors
from quant.policy import make_precision_fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--bitpack", type=int, default=0)
    args = ap.parse_args()
    state = load_checkpoint(args.checkpoint)
    h = train_gpt.Hyperparameters(**state["hparams"])
    model = HybridGPT(h.model_config())
    model.load_state_dict(state["model"])
    if state["ema"] is not None:
        sd = model.state_dict()
        for name, t in state["ema"].items():
            sd[name].copy_(t)
    precision_fn = make_precision_fn(h.matrix_bits, h.embed_bits)
    sd = model.state_dict()
    params = sum(p.numel() for p in model.parameters())
    code = train_gpt.counted_code_bytes(lambda *a, **k: None)  # the lzma bundle, as a run counts it
    print(f"checkpoint:{args.checkpoint} step:{state['step']} arch:{h.arch} params:{params} "
          f"matrix_bits:{h.matrix_bits} embed_bits:{h.embed_bits} code_bytes:{code}")
    for group, stats in artifact_breakdown(sd, precision_fn).items():
        print(f"group:{group} " + " ".join(f"{k}:{v}" for k, v in stats.items()))
    for name in available_compressors():
        t = time.perf_counter()
        blob = pack_model(sd, precision_fn, compressor=name, bitpack=bool(args.bitpack))
        total = len(blob) + code
        print(f"compressor:{name} model_bytes:{len(blob)} bytes_per_param:{len(blob) / params:.4f} "
              f"artifact_bytes:{total} margin:{ARTIFACT_LIMIT - total} pack_time:{time.perf_counter() - t:.1f}s")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
