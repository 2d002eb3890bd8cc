"""Benchmark: the hybrid against the dense gpt control, measured side by side in one process.

  python -m bench.bench                       # CPU: small configs, ~10 minutes on 2 cores
  python -m bench.bench --seconds 60 --quick  # shorter

Two measurements, both printed as hybrid/gpt ratios:
1. throughput: tokens per second of a full training step (forward, backward, Muon + Adam) at a
   matched parameter count (the gpt's depth is chosen so its parameter count is closest to the
   hybrid's), on random tokens, after warm-up steps;
2. quality at equal wallclock: each architecture trains for the same number of seconds on the
   offline sample corpus with the same batch, sequence length and data order, then the final
   weights are packed, reloaded and scored (round-trip val_bpb, sliding windows).
On a GPU the same script runs the GPU-sized configs (`--device cuda`).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from hybrid.config import ARCH_DEFAULTS, ModelConfig
from hybrid.model import HybridGPT
from hybrid.optim import build_optimizers
from train_gpt import Runtime, resolve_hyperparameters, train

# Small enough for 2 CPU cores; same width and heads for both architectures.
CPU_SHAPE = dict(model_dim=128, num_heads=4, num_kv_heads=2)
# The golf MoE's experts scaled to the CPU width (its defaults are sized for 512).
EXTRA_SHAPE = {"moe": dict(moe_expert_hidden=64, moe_shared_hidden=96)}
CPU_TRAIN = dict(preset="smoke", train_seq_len=256, train_batch_tokens=8192, grad_accum_base=1)


def param_count(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in HybridGPT(cfg).parameters())


def matched_gpt_layers(hybrid_cfg: ModelConfig, shape: dict) -> tuple[int, int]:
    target = param_count(hybrid_cfg)
    best = None
    for n in range(2, 40):
        cfg = ModelConfig(**dict(ARCH_DEFAULTS["gpt"], **shape, num_layers=n, layer_pattern="F" * n))
        diff = abs(param_count(cfg) - target)
        if best is None or diff < best[1]:
            best = (n, diff)
    return best[0], target


def throughput(arch: str, overrides: dict, device: torch.device, steps: int, warmup: int,
               batch: int, seq_len: int) -> float:
    argv = ["--arch", arch] + [f"--{k.replace('_', '-')}={v}" for k, v in overrides.items()]
    h = resolve_hyperparameters(argv, env={})
    torch.manual_seed(0)
    model = HybridGPT(h.model_config()).to(device)
    optimizers = build_optimizers(model, h)
    run = torch.compile(model, dynamic=False, fullgraph=True) if device.type == "cuda" else model
    x = torch.randint(0, h.vocab_size, (batch, seq_len + 1), device=device)
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else None
    t0 = None
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        if ctx:
            with ctx():
                loss = run(x[:, :-1], x[:, 1:])
        else:
            loss = run(x[:, :-1], x[:, 1:])
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch * seq_len / (time.perf_counter() - t0)


def quality(arch: str, overrides: dict, seconds: float, run_id: str) -> dict:
    argv = ["--arch", arch, "--run-id", run_id, "--max-wallclock-seconds", str(seconds), "--iterations", "100000",
            "--warmdown-iters", "60", "--val-loss-every", "0", "--log-dir", "logs/bench"]
    argv += [f"--{k.replace('_', '-')}={v}" for k, v in overrides.items()]
    h = resolve_hyperparameters(argv, env={})
    res = train(h, Runtime(0, 1, 0, torch.device("cpu"), False))
    return dict(steps=res["steps"], train_ms=res["train_ms"], prequant_bpb=res["prequant"].val_bpb,
                roundtrip_bpb=res["roundtrip"].val_bpb, model_bytes=res["report"].model_bytes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=180.0, help="training wallclock per architecture")
    ap.add_argument("--quick", action="store_true", help="fewer throughput steps")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--archs", default="hybrid,gpt", help="comma list from hybrid,gpt,rwkv7,moe "
                    "(hybrid and gpt always run: they are the controls)")
    args = ap.parse_args()
    extra = [a for a in args.archs.split(",") if a and a not in ("hybrid", "gpt")]
    device = torch.device(args.device)
    hybrid_cfg = ModelConfig(**dict(ARCH_DEFAULTS["hybrid"], **CPU_SHAPE, attn_window=64))
    gpt_layers, hybrid_params = matched_gpt_layers(hybrid_cfg, CPU_SHAPE)
    gpt_shape = dict(CPU_SHAPE, num_layers=gpt_layers, layer_pattern="F" * gpt_layers)
    gpt_params = param_count(ModelConfig(**dict(ARCH_DEFAULTS["gpt"], **gpt_shape)))
    print(f"params hybrid:{hybrid_params} gpt:{gpt_params} (gpt layers:{gpt_layers})")
    steps = 3 if args.quick else 8
    runs = [("hybrid", dict(CPU_SHAPE, attn_window=64)), ("gpt", gpt_shape)]
    runs += [(arch, dict(CPU_SHAPE, **EXTRA_SHAPE.get(arch, {}))) for arch in extra]
    for arch, shape in runs[2:]:
        cfg = resolve_hyperparameters(["--arch", arch] + [f"--{k.replace('_', '-')}={v}" for k, v in shape.items()],
                                      env={}).model_config()
        print(f"params {arch}:{param_count(cfg)} pattern:{cfg.layer_pattern}")
    tps = {}
    for arch, shape in runs:
        tps[arch] = throughput(arch, shape, device, steps, 2, 16, 256)
        print(f"throughput arch:{arch} tokens_per_s:{tps[arch]:.0f}")
    q = {}
    for arch, shape in [("hybrid", {}), ("gpt", gpt_shape)] + [(a, sh) for a, sh in runs[2:]]:
        overrides = dict(CPU_TRAIN, **shape)
        if arch == "gpt":  # same export precision as the hybrid, so bytes/param compare like for like
            overrides.update(matrix_bits=6, eval_stride=64)
        q[arch] = quality(arch, overrides, args.seconds, f"bench_{arch}")
        print(f"quality arch:{arch} {json.dumps(q[arch])}")
    print(f"ratio tokens_per_s hybrid/gpt: {tps['hybrid'] / tps['gpt']:.3f}")
    print(f"ratio steps hybrid/gpt at {args.seconds:.0f}s: {q['hybrid']['steps'] / q['gpt']['steps']:.3f}")
    print(f"ratio roundtrip_bpb hybrid/gpt at {args.seconds:.0f}s: "
          f"{q['hybrid']['roundtrip_bpb'] / q['gpt']['roundtrip_bpb']:.4f} "
          f"(delta {q['hybrid']['roundtrip_bpb'] - q['gpt']['roundtrip_bpb']:+.4f})")
    for arch in extra:
        print(f"ratio {arch}/hybrid tokens_per_s:{tps[arch] / tps['hybrid']:.3f} "
              f"roundtrip_bpb:{q[arch]['roundtrip_bpb'] / q['hybrid']['roundtrip_bpb']:.4f}; "
              f"{arch}/gpt tokens_per_s:{tps[arch] / tps['gpt']:.3f} "
              f"roundtrip_bpb:{q[arch]['roundtrip_bpb'] / q['gpt']['roundtrip_bpb']:.4f}")


if __name__ == "__main__":
    main()
