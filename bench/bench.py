"""Benchmark: our variants against our own controls, measured side by side in one process.

  python -m bench.bench                               # CPU: small configs, ~15 minutes on 2 cores
  python -m bench.bench --seconds 10 --quick          # end-to-end check, a few minutes
  python -m bench.bench --archs hybrid,rwkv7,moe      # more variants (the controls always run)
  python -m bench.bench --device cuda --skip-quality  # GPU timing only: full-size configs, compiled
  python -m bench.bench --threads 1 ...               # a shared CPU: two OpenMP threads thrash under load

Architectures. Controls, always run: "gpt" = the challenge's naive baseline exactly (rec:2026-03-17_NaiveBaseline:
9 layers, relu², MLP 2x, 17,059,912 params at full size) and "dense11" = the same with 11 full-
attention layers (the dense 11-layer 512-wide control of the issue's step-time target). Variants:
"hybrid" (default), "rwkv7", "moe" (`--archs`). Every arch gets the same batch of B×T tokens.
Shapes: on the CPU every arch is narrowed to width 128 with 4 heads / 2 KV heads and runs at seq
256 under the smoke preset's scale (`--preset smoke`); on a GPU (`--gpu-shape`, automatic on CUDA)
each arch runs at its full 512-wide default, seq 1024 (`--seq-len 2048` for the long setting).

Per arch, two measurements:
1. timing, on random tokens after warm-up steps (compile warm-up on CUDA): the step time split
   into forward / backward / optimizer (the optimizer part is everything train() does after the
   backward: grad clip, Muon + Adam, zero_grad, the MoE bias update, the EMA update), timed with
   CUDA events on a GPU and perf_counter on the CPU; tokens/s; MFU = training FLOPs per token
   (bench/flops.py, counted from the configuration) × tokens/s / the device's peak (datasheet
   bf16 on known GPUs, a measured fp32 matmul on the CPU); peak memory: torch.cuda
   .max_memory_allocated on a GPU; on the CPU the peak bytes of live tensor storages while the
   model is built and the first warm-up step runs, eagerly (TensorMemoryTracker below: allocator
   slack and library memory are not in it, as they are not in CUDA's figure);
2. quality at equal wallclock: train() for `--seconds` of training on the same data (the offline
   sample corpus unless `--data-path`), same batch and data order, warmdown over the same fraction
   of each arch's expected steps; then the export: pre-quant and round-trip val_bpb (sliding
   windows, stride 64), the quant gap (round-trip − pre-quant), model bytes and bytes per
   parameter. The controls export at int6 like the variants, so bytes/param compare like for like.

Output: one table, a ratio line per variant and control for every metric, the issue's targets
(hybrid vs dense11) as met/missed, and one `bench_json:` line holding all of it, for docs to cite.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import subprocess
import time
import traceback
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from bench.flops import device_peak_flops, mfu, training_flops_per_token
from hybrid.model import HybridGPT
from hybrid.training.optim import EMA, build_optimizers
from train_gpt import Hyperparameters, Runtime, resolve_hyperparameters, train

ROOT = Path(__file__).resolve().parents[1]
CONTROLS = ("gpt", "dense11")
VARIANTS = ("hybrid", "rwkv7", "moe")
# bench name -> (--arch, model fields at every shape)
ARCHS = {
    "gpt": ("gpt", {}),
    "dense11": ("gpt", dict(num_layers=11, layer_pattern="F" * 11)),
    "hybrid": ("hybrid", {}),
    "rwkv7": ("rwkv7", {}),
    "moe": ("moe", {}),
}
CPU_SHAPE = dict(model_dim=128, num_heads=4, num_kv_heads=2)
# The golf MoE's experts scaled to the CPU width (its defaults are sized for 512).
CPU_EXTRA = {"moe": dict(moe_expert_hidden=64, moe_shared_hidden=96)}
SAMPLE_DATA = ("./data/datasets/sample_sp1024", "./data/tokenizers/sample_1024_bpe.model")
# The targets, checked for the hybrid against dense11 (GPU shape; indicative on the CPU).
TARGETS = dict(step_ratio_max=0.77, mfu_min=0.40, bytes_per_param_max=0.60, quant_gap_max=0.005)


@dataclass
class BenchSetup:
    device: torch.device
    gpu_shape: bool
    compile: bool
    seq_len: int
    batch_tokens: int
    data_path: str
    tokenizer_path: str


def bench_hparams(name: str, setup: BenchSetup, **extra) -> Hyperparameters:
    """The resolved hyperparameters of bench arch `name` (train_gpt's own resolution), plus `extra` fields."""
    arch, fields = ARCHS[name]
    values = dict(fields)
    if not setup.gpu_shape:
        values.update(CPU_SHAPE, **CPU_EXTRA.get(name, {}))
    if arch == "gpt":
        values.update(matrix_bits=6, eval_stride=64)
    values.update(train_seq_len=setup.seq_len, train_batch_tokens=setup.batch_tokens, grad_accum_base=1,
                  data_path=setup.data_path, tokenizer_path=setup.tokenizer_path, compile=int(setup.compile))
    values.update(extra)
    argv = ["--arch", arch] + ([] if setup.gpu_shape else ["--preset", "smoke"])
    argv += [f"--{k.replace('_', '-')}={v}" for k, v in values.items()]
    return resolve_hyperparameters(argv, env={})


# ---- timing ---------------------------------------------------------------------------------------

class TensorMemoryTracker(TorchDispatchMode):
    """Peak bytes of live tensor storages made under this mode: the CPU stand-in for
    torch.cuda.max_memory_allocated. A storage counts from the op that returns it (when none of
    that op's inputs holds it: views and in-place results are not new memory) until it is freed."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live -= nbytes

    @staticmethod
    def _storages(tree) -> list:
        out = []
        for t in tree_flatten(tree)[0]:
            if isinstance(t, torch.Tensor) and t.layout == torch.strided and t.device.type != "meta":
                out.append(t.untyped_storage())
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        held = {s.data_ptr() for s in self._storages((args, kwargs))}
        for s in self._storages(out):
            key, nbytes = s.data_ptr(), s.nbytes()
            if nbytes == 0 or key in held or key in self._tracked:
                continue
            self._tracked.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(s, self._free, key, nbytes)
        return out


def _mark(device: torch.device):
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def _ms(start, end) -> float:
    return start.elapsed_time(end) if isinstance(start, torch.cuda.Event) else 1000.0 * (end - start)


class TrainStep:
    """One training step as train() runs it, with a time mark between its phases: forward (under bf16
    autocast on CUDA) | backward | grad clip, optimizers, zero_grad, MoE bias update, EMA update."""

    def __init__(self, h: Hyperparameters, model: HybridGPT, device: torch.device):
        self.h, self.model, self.device = h, model, device
        self.optimizers = build_optimizers(model, h)
        self.ema = EMA(model, h.ema_decay) if h.ema_decay > 0 else None
        cuda = device.type == "cuda"
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext

    def __call__(self, forward, x: torch.Tensor, y: torch.Tensor) -> tuple:
        """Runs one step with `forward` (the model or its compiled form); returns its four time marks."""
        m0 = _mark(self.device)
        with self.autocast():
            loss = forward(x, y)
        m1 = _mark(self.device)
        loss.backward()
        m2 = _mark(self.device)
        if self.h.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.h.grad_clip_norm)
        for opt in self.optimizers:
            opt.step()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self.model.after_optimizer_step()
        if self.ema is not None:
            self.ema.update(self.model)
        return m0, m1, m2, _mark(self.device)


def time_training_steps(h: Hyperparameters, device: torch.device, steps: int, warmup: int) -> dict:
    """Time `steps` full training steps of h's model on h's batch (random tokens) after `warmup`
    untimed ones. Returns per-step milliseconds (step, forward, backward, optimizer), tokens/s,
    training FLOPs per token, MFU against the device peak, and peak memory (module docstring)."""
    if warmup < 1 or steps < 1:
        raise ValueError(f"need warmup >= 1 (the CPU memory is measured there) and steps >= 1, got {warmup}, {steps}")
    use_cuda = device.type == "cuda"
    compile_model = bool(h.compile) if h.compile >= 0 else use_cuda
    cfg = h.model_config()
    B, T = h.train_batch_tokens // h.train_seq_len, h.train_seq_len
    ids = torch.randint(0, h.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0)).to(device)
    x, y = ids[:, :-1], ids[:, 1:]
    if use_cuda:
        torch._dynamo.reset()  # each arch compiles afresh, far from the recompile limit
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    tracker = None if use_cuda else TensorMemoryTracker()
    with tracker or contextlib.nullcontext():
        torch.manual_seed(h.seed)
        model = HybridGPT(cfg).to(device)
        train_step = TrainStep(h, model, device)
    run = torch.compile(model, dynamic=False, fullgraph=True) if compile_model else model
    for i in range(warmup):
        if i == 0 and tracker is not None:  # CPU memory: the first step allocates the optimizer state too
            with tracker:
                train_step(model, x, y)  # eager: a dispatch mode and a compiled graph do not mix
        else:
            train_step(run, x, y)
    if use_cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    marks = [train_step(run, x, y) for _ in range(steps)]
    if use_cuda:
        torch.cuda.synchronize(device)
    step_ms = 1000.0 * (time.perf_counter() - t0) / steps
    split = [sum(_ms(m[i], m[i + 1]) for m in marks) / steps for i in range(3)]
    tokens_per_s = B * T / (step_ms / 1000.0)
    flops = training_flops_per_token(cfg, T)
    peak, peak_source = device_peak_flops(device)
    total, active = model.param_counts()
    if use_cuda:
        mem, mem_method = torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    else:
        mem, mem_method = tracker.peak, "TensorMemoryTracker: live tensor bytes, build + first (eager) warm-up step"
    return dict(params=total, active_params=active, layer_pattern=cfg.layer_pattern, batch_seqs=B, seq_len=T,
                tokens_per_step=B * T, compiled=compile_model, timed_steps=steps, warmup_steps=warmup,
                step_ms=step_ms, forward_ms=split[0], backward_ms=split[1], optimizer_ms=split[2],
                tokens_per_s=tokens_per_s, train_flops_per_token=flops, peak_flops=peak, peak_source=peak_source,
                mfu=mfu(flops, tokens_per_s, peak), peak_mem_bytes=int(mem), peak_mem_method=mem_method)


# ---- quality at equal wallclock -------------------------------------------------------------------

def quality(h: Hyperparameters, device: torch.device) -> dict:
    """train() for h's wallclock, then what its export measured, plus bytes/param and the quant gap."""
    if device.type == "cuda":
        torch._dynamo.reset()
    res = train(h, Runtime(0, 1, 0, device, False))
    with torch.device("meta"):
        params = sum(p.numel() for p in HybridGPT(h.model_config()).parameters())
    pre, post = res["prequant"].val_bpb, res["roundtrip"].val_bpb
    report = res["report"]
    return dict(steps=res["steps"], train_ms=res["train_ms"], warmdown_iters=h.warmdown_iters,
                prequant_bpb=pre, roundtrip_bpb=post, quant_gap_bpb=post - pre, model_bytes=report.model_bytes,
                artifact_bytes=report.total, bytes_per_param=report.model_bytes / params,
                compressor=res["compressor"])


# ---- report ----------------------------------------------------------------------------------------

TABLE = (  # (header, key, format)
    ("arch", "arch", "{}"), ("params", "params", "{:,}"), ("step_ms", "step_ms", "{:.1f}"),
    ("fwd_ms", "forward_ms", "{:.1f}"), ("bwd_ms", "backward_ms", "{:.1f}"), ("opt_ms", "optimizer_ms", "{:.1f}"),
    ("tok/s", "tokens_per_s", "{:,.0f}"), ("GFLOP/tok", "train_flops_per_token", "{:.4f}"),
    ("MFU", "mfu", "{:.3f}"), ("peak_MiB", "peak_mem_mib", "{:.1f}"), ("steps", "steps", "{}"),
    ("pre_bpb", "prequant_bpb", "{:.4f}"), ("rt_bpb", "roundtrip_bpb", "{:.4f}"),
    ("gap", "quant_gap_bpb", "{:+.5f}"), ("model_B", "model_bytes", "{:,}"), ("B/param", "bytes_per_param", "{:.4f}"),
)
# metrics compared as variant/control ratios, and those compared as differences
RATIO_KEYS = ("step_ms", "forward_ms", "backward_ms", "optimizer_ms", "tokens_per_s", "mfu", "peak_mem_bytes",
              "params", "steps", "roundtrip_bpb", "bytes_per_param")
DELTA_KEYS = ("roundtrip_bpb", "quant_gap_bpb")
QUALITY_KEYS = ("steps", "train_ms", "warmdown_iters", "prequant_bpb", "roundtrip_bpb", "quant_gap_bpb",
                "model_bytes", "artifact_bytes", "bytes_per_param", "compressor")


def _cell(row: dict, key: str, fmt: str) -> str:
    if key == "train_flops_per_token" and key in row:
        return fmt.format(row[key] / 1e9)
    if key == "peak_mem_mib" and "peak_mem_bytes" in row:
        return fmt.format(row["peak_mem_bytes"] / 2 ** 20)
    return fmt.format(row[key]) if row.get(key) is not None else "-"


def ratios(results: dict[str, dict]) -> dict[str, dict]:
    """{"variant/control": {metric: ratio, metric_delta: difference}} for every pair that has both numbers."""
    out = {}
    for v in results:
        if v in CONTROLS:
            continue
        for c in CONTROLS:
            if c not in results:
                continue
            a, b = results[v], results[c]
            pair = {k: a[k] / b[k] for k in RATIO_KEYS if a.get(k) is not None and b.get(k)}
            pair.update({f"{k}_delta": a[k] - b[k] for k in DELTA_KEYS
                         if a.get(k) is not None and b.get(k) is not None})
            out[f"{v}/{c}"] = pair
    return out


def targets(results: dict[str, dict]) -> dict[str, dict]:
    """The issue's targets for the hybrid: {name: {value, limit, met}} for those it has numbers for."""
    hyb, ctl = results.get("hybrid", {}), results.get("dense11", {})
    checks = {}
    if hyb.get("step_ms") and ctl.get("step_ms"):
        checks["step_time_vs_dense11"] = (hyb["step_ms"] / ctl["step_ms"], TARGETS["step_ratio_max"], "<=")
    if hyb.get("mfu") is not None:
        checks["mfu"] = (hyb["mfu"], TARGETS["mfu_min"], ">=")
    if hyb.get("bytes_per_param") is not None:
        checks["bytes_per_param"] = (hyb["bytes_per_param"], TARGETS["bytes_per_param_max"], "<=")
    if hyb.get("quant_gap_bpb") is not None:
        checks["quant_gap_bpb"] = (hyb["quant_gap_bpb"], TARGETS["quant_gap_max"], "<=")
    return {k: dict(value=v, limit=lim, op=op, met=v <= lim if op == "<=" else v >= lim)
            for k, (v, lim, op) in checks.items()}


def report_lines(results: dict[str, dict], meta: dict) -> list[str]:
    """The table, ratio lines, target lines and the bench_json line."""
    rows = [[head for head, _, _ in TABLE]]
    rows += [[_cell(dict(r, arch=a), k, f) for _, k, f in TABLE] for a, r in results.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    rat = ratios(results)
    for pair, vals in rat.items():
        lines.append(f"ratio {pair} " + " ".join(
            f"{k}:{v:+.5f}" if k.endswith("_delta") else f"{k}:{v:.3f}" for k, v in vals.items()))
    tgt = targets(results)
    shape_note = "" if meta.get("gpu_shape") else " (CPU shape: indicative only)"
    for name, t in tgt.items():
        lines.append(f"target hybrid {name}:{t['value']:.4f} {t['op']} {t['limit']} "
                     f"{'met' if t['met'] else 'missed'}{shape_note}")
    lines.append("bench_json:" + json.dumps(dict(meta, results=results, ratios=rat, targets=tgt), sort_keys=True))
    return lines


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=False, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ---- main ------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=180.0, help="training wallclock per architecture")
    ap.add_argument("--quick", action="store_true", help="fewer warm-up and timed steps")
    ap.add_argument("--device", default="auto", help="auto (cuda when present) | cpu | cuda | cuda:N")
    ap.add_argument("--archs", default="hybrid", help=f"comma list of variants from {','.join(VARIANTS)} "
                    f"(the controls {','.join(CONTROLS)} always run)")
    ap.add_argument("--gpu-shape", action=argparse.BooleanOptionalAction, default=None,
                    help="full 512-wide configs (default: on for CUDA, off on the CPU)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the model (default: on for CUDA)")
    ap.add_argument("--seq-len", type=int, default=0, help="sequence length (default 1024 GPU shape, 256 CPU)")
    ap.add_argument("--batch-tokens", type=int, default=0,
                    help="tokens per step, every arch (default 65536 GPU shape = one GPU's share of the "
                         "challenge batch, 8192 CPU)")
    ap.add_argument("--steps", type=int, default=0, help="timed steps (default 20 GPU / 8 CPU, --quick 5 / 2)")
    ap.add_argument("--warmdown-frac", type=float, default=0.3,
                    help="quality runs: warmdown over this fraction of each arch's expected steps")
    ap.add_argument("--skip-quality", action="store_true", help="timing only")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--data-path", default=SAMPLE_DATA[0])
    ap.add_argument("--tokenizer-path", default=SAMPLE_DATA[1])
    return ap.parse_args(argv)


def run_arch(name: str, setup: BenchSetup, args: argparse.Namespace, steps: int, warmup: int) -> dict:
    """Timing, then (unless --skip-quality) the equal-wallclock run, of one bench arch; {"error": ...}
    in the row instead of an exception, so one failing arch (a kernel on a new GPU) loses only itself."""
    row: dict = {}
    try:
        row.update(time_training_steps(bench_hparams(name, setup), setup.device, steps, warmup))
        print(f"timing arch:{name} " + " ".join(f"{k}:{v}" for k, v in row.items()), flush=True)
        if not args.skip_quality:
            expected_steps = 1000.0 * args.seconds / row["step_ms"]
            hq = bench_hparams(name, setup, run_id=f"bench_{name}", max_wallclock_seconds=args.seconds,
                               iterations=100000, warmdown_iters=max(1, round(args.warmdown_frac * expected_steps)),
                               val_loss_every=0, log_dir="logs/bench")
            row.update(quality(hq, setup.device))
            print(f"quality arch:{name} {json.dumps({k: row[k] for k in QUALITY_KEYS})}", flush=True)
    except Exception as exc:  # noqa: BLE001 - reported in the row and the JSON
        traceback.print_exc()
        row["error"] = f"{type(exc).__name__}: {exc}"
    gc.collect()
    if setup.device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # as train_gpt.setup_runtime
        torch.backends.cudnn.allow_tf32 = True
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    gpu_shape = use_cuda if args.gpu_shape is None else args.gpu_shape
    setup = BenchSetup(device=device, gpu_shape=gpu_shape, compile=use_cuda if args.compile is None else args.compile,
                       seq_len=args.seq_len or (1024 if gpu_shape else 256),
                       batch_tokens=args.batch_tokens or (65536 if gpu_shape else 8192),
                       data_path=args.data_path, tokenizer_path=args.tokenizer_path)
    variants = tuple(a for a in dict.fromkeys(args.archs.split(",")) if a and a not in CONTROLS)
    unknown = [a for a in variants if a not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown --archs {unknown}; variants are {list(VARIANTS)}")
    warmup, steps = {(True, True): (3, 5), (True, False): (5, 20), (False, True): (1, 2),
                     (False, False): (2, 8)}[(use_cuda, args.quick)]
    steps = args.steps or steps
    if setup.compile:  # compilation happens in the warm-up (on the CPU the first warm-up step runs eagerly)
        warmup = max(warmup, 3)
    peak, peak_source = device_peak_flops(device)
    meta = dict(commit=git_commit(), torch=torch.__version__, device=str(device), peak_flops=peak,
                peak_source=peak_source, gpu_shape=gpu_shape, compile=setup.compile, seq_len=setup.seq_len,
                batch_tokens=setup.batch_tokens, seconds=args.seconds, threads=torch.get_num_threads(),
                warmup_steps=warmup, timed_steps=steps)
    print(f"bench device:{device} peak:{peak_source} shape:{'gpu' if gpu_shape else 'cpu'} "
          f"seq_len:{setup.seq_len} batch_tokens:{setup.batch_tokens} compile:{int(setup.compile)} "
          f"archs:{','.join(CONTROLS + variants)}", flush=True)
    # controls first: a quality run counts the code bytes of every module the process has imported
    results = {name: run_arch(name, setup, args, steps, warmup) for name in CONTROLS + variants}
    print("\n".join(report_lines(results, meta)), flush=True)


if __name__ == "__main__":
    main()
