"""Artifact size and quantization gap of a trained checkpoint, per compressor and per export policy.

  CHECKPOINT_EVERY=60 ITERATIONS=60 ... python train_gpt.py      # any run that leaves a checkpoint
  python -m bench.size checkpoints/<run_id>/latest.pt                          # every compressor
  python -m bench.size CKPT --policies int6,int5mlp,sdclip12.85,gptq --eval-tokens 16384

Loads the checkpoint's EMA weights (the ones a run exports; the live weights if it has no EMA) and
packs them exactly as the trainer does. Two tables:
1. compressors: the run's own export policy under every compressor (v2 artifact, one compressor for
   every section) and "auto" (the smallest per section): model bytes, bytes per parameter, artifact
   total with the code bytes a run counts (the counted stub of the lean bundle) and the margin under
   16,000,000;
2. policies (`--policies`): one row per export policy, packed with `--compressor`: model bytes,
   bytes per parameter, and, with `--eval-tokens`, the quantization gap = round-trip val_bpb minus
   pre-quantization val_bpb, both scored the same way (non-overlapping windows of the run's sequence
   length over the first N validation tokens of the run's data). Policies:
     int<b>        every block matrix at b bits (the run's embedding bits)
     int5mlp       MLP/expert matrices at int5, attention and mixers at the run's matrix bits
     sdclip<k>     row scale k·std(row) instead of the clip search (SDClip, rec:2026-04-05)
     gptq          full-Hessian GPTQ on self-generated calibration (`--gptq-seqs`, `--gptq-seq-len`)
   and combinations joined by "+", e.g. "int5mlp+sdclip12.85+gptq".
"""
from __future__ import annotations

import argparse
import os
import time

import torch

import train_gpt
from data.bpb import build_byte_luts, load_tokenizer
from data.shards import load_validation_tokens
from hybrid.config import as_saved
from hybrid.training.checkpoint import load_checkpoint
from hybrid.training.evaluate import evaluate
from hybrid.model import HybridGPT
from quant.artifact import artifact_sections, pack_model, unpack_model
from quant.budget import ARTIFACT_LIMIT
from quant.codec import available_compressors
from quant.policy import make_precision_fn


def parse_policy(spec: str, matrix_bits: int, embed_bits: int) -> tuple[dict, bool]:
    """'int5mlp+sdclip12.85+gptq' -> (make_precision_fn kwargs, use GPTQ)."""
    kw = dict(matrix_bits=matrix_bits, embed_bits=embed_bits)
    gptq = False
    for part in spec.split("+"):
        if part == "gptq":
            gptq = True
        elif part == "int5mlp":
            kw["mlp_bits"] = 5
        elif part.startswith("sdclip"):
            kw.update(clip="sdclip", sd_k_matrix=float(part[len("sdclip"):] or 12.85))
        elif part.startswith("int") and part[3:].isdigit():
            kw["matrix_bits"] = int(part[3:])
        else:
            raise SystemExit(f"unknown policy part {part!r} in {spec!r} (see python -m bench.size --help)")
    return kw, gptq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--bitpack", type=int, default=0)
    ap.add_argument("--skip-compressors", action="store_true", help="only the policies table")
    ap.add_argument("--policies", default="", help="comma list of export policies (module docstring)")
    ap.add_argument("--compressor", default="zlib", help="compressor of the policies table")
    ap.add_argument("--eval-tokens", type=int, default=0, help="validation tokens for the quant gap (0: no eval)")
    ap.add_argument("--gptq-seqs", type=int, default=8)
    ap.add_argument("--gptq-seq-len", type=int, default=128)
    args = ap.parse_args()
    state = load_checkpoint(args.checkpoint)
    h = train_gpt.Hyperparameters(**as_saved(state["hparams"]))
    cfg = h.model_config()
    model = HybridGPT(cfg)
    model.load_state_dict(state["model"])
    if state["ema"] is not None:
        sd = model.state_dict()
        for name, t in state["ema"].items():
            sd[name].copy_(t)
    model.eval()
    sd = model.state_dict()
    params = sum(p.numel() for p in model.parameters())
    code = train_gpt.counted_code_bytes(lambda *a, **k: None, h)  # the counted stub, as a run of h counts it
    print(f"checkpoint:{args.checkpoint} step:{state['step']} arch:{h.arch} params:{params} "
          f"matrix_bits:{h.matrix_bits} embed_bits:{h.embed_bits} code_bytes:{code}")
    if not args.skip_compressors:
        precision_fn = make_precision_fn(h.matrix_bits, h.embed_bits)
        for name in available_compressors() + ["auto"]:
            t = time.perf_counter()
            blob = pack_model(sd, precision_fn, compressor=name, bitpack=bool(args.bitpack))
            total = len(blob) + code
            print(f"compressor:{name} model_bytes:{len(blob)} bytes_per_param:{len(blob) / params:.4f} "
                  f"artifact_bytes:{total} margin:{ARTIFACT_LIMIT - total} pack_time:{time.perf_counter() - t:.1f}s")
            if name == "auto":
                for sec in artifact_sections(blob):
                    print(f"  section:{sec['name']} compressor:{sec['compressor']} transform:{sec['transform']} "
                          f"params:{sec['params']} bytes:{sec['compressed_bytes']}")
    if not args.policies:
        return
    score = None
    if args.eval_tokens:
        sp = load_tokenizer(h.tokenizer_path, h.vocab_size)
        luts = build_byte_luts(sp, h.vocab_size, torch.device("cpu"))
        val = load_validation_tokens(os.path.join(h.data_path, "fineweb_val_*.bin"), h.train_seq_len, args.eval_tokens)

        def score(m: HybridGPT) -> float:
            return evaluate(m.forward_logits, val, h.train_seq_len, h.train_seq_len, luts, 16,
                            torch.device("cpu")).val_bpb

        pre = score(model)
        print(f"prequant val_bpb:{pre:.5f} eval_tokens:{val.numel() - 1} windows:non_overlapping_{h.train_seq_len}")
    for spec in args.policies.split(","):
        kw, use_gptq = parse_policy(spec, h.matrix_bits, h.embed_bits)
        precision_fn = make_precision_fn(**kw)
        t = time.perf_counter()
        prequantized = None
        if use_gptq:
            from quant.gptq import generate_calibration, gptq_quantize

            calib = generate_calibration(model, args.gptq_seqs, args.gptq_seq_len, 0.8, seed=0, bos_id=1)
            prequantized, _ = gptq_quantize(model, calib, precision_fn)
        blob = pack_model(sd, precision_fn, compressor=args.compressor, bitpack=bool(args.bitpack),
                          prequantized=prequantized)
        line = (f"policy:{spec} compressor:{args.compressor} model_bytes:{len(blob)} "
                f"bytes_per_param:{len(blob) / params:.4f} artifact_bytes:{len(blob) + code} "
                f"margin:{ARTIFACT_LIMIT - len(blob) - code} time:{time.perf_counter() - t:.1f}s")
        if score is not None:
            fresh = HybridGPT(cfg)
            fresh.load_state_dict(unpack_model(blob), strict=True)
            fresh.eval()
            post = score(fresh)
            line += f" roundtrip_bpb:{post:.5f} quant_gap_bpb:{post - pre:+.5f}"
        print(line, flush=True)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
