"""One-shot GPU preflight: the numbers a first GPU session should bring back, in one run of minutes.

    python -m bench.preflight                                   # one GPU, the full-size default, <= 6 minutes
    python -m bench.preflight --json-out $OUT/preflight.json    # also write the JSON line to a file
    python -m bench.preflight --nproc 8                         # re-runs itself under torch.distributed.run
    python -m bench.preflight --device cpu --size tiny --steps 3 --backend aot_eager   # CPU check (tests)

What it runs, on synthetic random tokens (no dataset or tokenizer is read), each section guarded so
that one failure (a missing Triton, a kernel that does not compile) is reported as
{"section": ..., "error": ...} and the rest still runs, in this order (most wanted first, as the
wall-clock guard skips what is left):

train      the model train_gpt.py builds (`resolve_hyperparameters([], env=...)`, `HybridGPT`,
           `build_optimizers` with Muon and Adam, EMA, grad clip; bench.bench.TrainStep's step, under
           bf16 autocast on CUDA) compiled as train_gpt.py compiles it (fullgraph, dynamic=False), on one
           micro-batch of TRAIN_BATCH_TOKENS / GRAD_ACCUM_BASE tokens (98,304 = 48 × 2048 at full size:
           what one of 8 GPUs trains per step; one GPU runs 8 of them per step). Reports the first
           (compiling) step's wall time, dynamo graphs compiled by it, by the steady steps (should be 0),
           by switching late QAT on (`set_qat`, should be 1) and back off (0); steady step time with its
           forward / backward / optimizer split (CUDA events; the optimizer part is clip + Muon + Adam +
           zero_grad + EMA), tokens/s per GPU, MFU and peak memory; QAT steps' time.
           Graph counts: torch._dynamo.utils.counters["stats"]["unique_graphs"] (torch 2.11 and 2.13),
           every dynamo graph of the process (Muon's compiled Newton–Schulz on CUDA included).
           MFU = bench.flops.training_flops_per_token × tokens/s ÷ peak; peak = bench.flops'
           datasheet dense bf16 table (H100 SXM and H200: 989.4 TFLOP/s, half the "with sparsity"
           figure), or a measured matmul where the device is not in it (the CPU).
eval       sliding-window evaluation throughput (hybrid/training/evaluate.py `evaluate`, tail logits, stride
           EVAL_STRIDE, EVAL_BATCH_SEQS windows per batch, compiled forward_logits as train_gpt.py) on
           random tokens with a dummy byte table (1 byte per token): it measures speed only, its
           val_bpb means nothing. First call (compiles) and a second, timed call; scored tokens/s and
           the implied time for the ~62M-token FineWeb validation set on 8 GPUs.
gptq       train_gpt.gptq_export on the (barely trained) model: calibration generation + Hessians +
           GPTQ, wall time, and the dynamo graphs the calibration compiled.
artifact   quant.artifact.pack_model with the default precision function and the GPTQ output (as
           train_gpt.finish packs it, without the budget fit), model bytes, and the unpack time.
ttt        TTT=sgd and TTT=lora (hybrid/training/ttt.py, hybrid/training/ttt_lora.py) as train_gpt.final_ttt runs them
           (sgd compiled on CUDA, lora eager), each on a copy of the model, over random tokens with
           the dummy byte table (speed only): TTT_CHUNK-sized chunks (sgd) and BOS every 2,048
           tokens (lora); seconds, scored tokens/s, and the implied time for the full validation set
           on 8 GPUs, to check against the 10-minute evaluation limit (issue 15's estimate).
attention  the W layers' attention at the model's shapes: flex_attention with the block-sparse window
           mask (what the model runs on CUDA) vs SDPA with a dense band mask, and full causal SDPA (an
           F layer) for scale; each compiled, forward + backward (forward only on the CPU: flex has no
           CPU backward).
fused_mlp  MLP_FUSED: bench/fused_mlp.py `bench_fused_mlp` at the model's MLP shape (the Triton
           up-projection + activation vs the compiled reference; CUDA and Triton only). End to end:
           `--set MLP_FUSED=auto --sections train` (any train_gpt setting goes in as --set KEY=VALUE).

Output: one JSON line (every number, torch/triton versions, device name, `git rev-parse HEAD`, UTC
date), then a markdown table for docs/PERF.md. Exit status 1 when a section failed.

--budget-s (default 360, counted from main()'s start; importing torch comes before) is a wall-clock
guard: no section starts after it, and a running section is interrupted by SIGALRM when it runs out
(reported as an error), so a run never goes past it by more than the Python-free work in flight (one
CUDA kernel, one C++ compile step). With --nproc > 1 the ranks agree on starting each collective
section (train, eval); gptq, artifact, attention and fused_mlp run on rank 0 only, and only rank 0
prints. Keep the budget generous there: a rank stopped inside a collective leaves the others waiting.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bench.bench import TrainStep, _mark, _ms
from bench.flops import device_peak_flops, mfu, training_flops_per_token
from data.bpb import ByteLuts
from hybrid.model import HybridGPT
from hybrid.training.optim import build_optimizers
from quant.policy import make_precision_fn
from quant.qat import set_qat

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("train", "eval", "gptq", "artifact", "ttt", "attention", "fused_mlp")
COLLECTIVE = ("train", "eval", "ttt")  # every rank runs these together; the rest run on rank 0 only
FULL_VAL_TOKENS = 62_000_000  # the FineWeb sp1024 validation set, ~62M tokens (docs/PERF.md)
DEFAULT_BUDGET_S = 360.0


class BudgetExceeded(BaseException):
    """The wall-clock guard (a BaseException, so no `except Exception` inside torch swallows it)."""


# ---- graph counting ------------------------------------------------------------------------------

def dynamo_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (every torch.compile'd function, recompiles
    included). The counter exists under this name in torch 2.11 and 2.13."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# ---- setup ---------------------------------------------------------------------------------------

@dataclass
class Ctx:
    args: argparse.Namespace
    h: object  # train_gpt.Hyperparameters
    rt: object  # train_gpt.Runtime
    t0: float
    budget_s: float
    model: HybridGPT | None = None
    precision_fn: Callable | None = None
    quantized: dict | None = None
    notes: list = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return self.rt.device

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def cfg(self):
        return self.h.model_config()

    @property
    def seq_len(self) -> int:
        return self.h.train_seq_len

    @property
    def micro_seqs(self) -> int:
        if self.args.batch_seqs > 0:
            return self.args.batch_seqs
        return max(1, self.h.train_batch_tokens // self.h.grad_accum_base // self.h.train_seq_len)

    def remaining(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def compile(self, fn, **kw):
        if not self.args.compile:
            return fn
        return torch.compile(fn, dynamic=False, backend=self.args.backend, **kw)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def get_model(self) -> HybridGPT:
        """The train section's model, or (when that section failed or was not run) a fresh one."""
        if self.model is None:
            torch.manual_seed(self.h.seed)
            self.model = HybridGPT(self.cfg).to(self.device)
            self.notes.append("a freshly initialised model (the train section did not leave one)")
        return self.model

    def get_precision_fn(self) -> Callable:
        if self.precision_fn is None:  # as train_gpt.train builds it: one policy for QAT and the export
            h = self.h
            self.precision_fn = make_precision_fn(h.matrix_bits, h.embed_bits, mlp_bits=h.mlp_bits or None,
                                                  attn_bits=h.attn_bits or None, clip=h.quant_clip,
                                                  sd_k_matrix=h.sd_k_matrix, sd_k_embed=h.sd_k_embed)
        return self.precision_fn


def resolve(args: argparse.Namespace):
    """train_gpt's own resolution: defaults (full) or the tiny run preset, plus --set overrides."""
    from train_gpt import resolve_hyperparameters

    env = {"LOG_DIR": tempfile.gettempdir(), "RUN_ID": "preflight"}  # resolving probes LOG_DIR: not the repo
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        env[key.strip().upper()] = value
    argv = ["--preset", "tiny"] if args.size == "tiny" else []
    return resolve_hyperparameters(argv, env=env)


def make_runtime(device_arg: str):
    """train_gpt.setup_runtime on CUDA (device, TF32, NCCL under torchrun); the CPU (gloo) otherwise."""
    from train_gpt import Runtime, setup_runtime

    want_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    if want_cuda:
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device here")
        return setup_runtime()
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group(backend="gloo")
    return Runtime(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)), torch.device("cpu"), distributed)


def git_head() -> tuple[str, bool]:
    """(full commit, whether the work tree has changes)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
        return head, dirty
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


def environment(ctx: Ctx) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit, dirty = git_head()
    dev = ctx.device
    name = torch.cuda.get_device_name(dev) if ctx.cuda else (platform.processor() or platform.machine() or "cpu")
    with torch.device("meta"):
        total, active = HybridGPT(ctx.cfg).param_counts()
    return dict(torch=torch.__version__, triton=triton_version, cuda=torch.version.cuda, python=platform.python_version(),
                device=str(dev), device_name=name, world_size=ctx.rt.world_size, commit=commit, dirty=dirty,
                date_utc=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                size=ctx.args.size, layer_pattern=ctx.cfg.layer_pattern, model_dim=ctx.cfg.model_dim,
                params=total, seq_len=ctx.seq_len, micro_batch_seqs=ctx.micro_seqs,
                micro_batch_tokens=ctx.micro_seqs * ctx.seq_len, compile=bool(ctx.args.compile),
                backend=ctx.args.backend if ctx.args.compile else None, steps=ctx.args.steps,
                budget_s=ctx.budget_s, overrides=list(ctx.args.set), threads=torch.get_num_threads())


# ---- sections ------------------------------------------------------------------------------------

class PreflightStep(TrainStep):
    """bench.bench.TrainStep (train_gpt's step, with time marks) with the distributed Muon under torchrun."""

    def __init__(self, h, model, device, rank: int, world_size: int):
        super().__init__(h, model, device)
        if world_size > 1:
            self.optimizers = build_optimizers(model, h, rank, world_size)


def _peak_memory(ctx: Ctx) -> dict:
    if ctx.cuda:
        return dict(peak_mem_bytes=int(torch.cuda.max_memory_allocated(ctx.device)),
                    peak_mem_reserved_bytes=int(torch.cuda.max_memory_reserved(ctx.device)),
                    peak_mem_method="torch.cuda.max_memory_allocated")
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return dict(peak_mem_bytes=int(rss), peak_mem_method="process peak RSS (everything in the process)")


def section_train(ctx: Ctx) -> dict:
    h, cfg, device, rt = ctx.h, ctx.cfg, ctx.device, ctx.rt
    B, T = ctx.micro_seqs, ctx.seq_len
    if ctx.cuda:
        torch._dynamo.reset()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(h.seed)
    model = HybridGPT(cfg).to(device)
    ctx.model = model
    precision_fn = ctx.get_precision_fn()
    run = ctx.compile(model, fullgraph=True)
    if rt.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        run = DDP(run, device_ids=[rt.local_rank] if ctx.cuda else None, broadcast_buffers=False)
    step = PreflightStep(h, model, device, rt.rank, rt.world_size)
    g = torch.Generator().manual_seed(1234 + rt.rank)
    ids = torch.randint(0, h.vocab_size, (B, T + 1), generator=g).to(device)
    x, y = ids[:, :-1], ids[:, 1:]

    def wall(fn) -> float:
        ctx.sync()
        t = time.perf_counter()
        fn()
        ctx.sync()
        return time.perf_counter() - t

    out: dict = {}
    g0 = dynamo_graphs()
    out["first_step_s"] = wall(lambda: step(run, x, y))
    g1 = dynamo_graphs()
    out["graphs_first_step"] = g1 - g0
    out["second_step_s"] = wall(lambda: step(run, x, y))
    ctx.sync()
    t = time.perf_counter()
    marks = [step(run, x, y) for _ in range(ctx.args.steps)]
    ctx.sync()
    steady_s = (time.perf_counter() - t) / ctx.args.steps
    out["graphs_steady"] = dynamo_graphs() - g1  # second step + the timed ones: must be 0
    fwd, bwd, opt = (sum(_ms(m[i], m[i + 1]) for m in marks) / len(marks) for i in range(3))
    step_ms = 1000.0 * steady_s
    tokens = B * T
    flops = training_flops_per_token(cfg, T)
    peak, peak_source = device_peak_flops(device)
    out.update(step_ms=step_ms, forward_ms=fwd, backward_ms=bwd, optimizer_ms=opt,
               tokens_per_step_per_rank=tokens, tokens_per_s_per_rank=tokens / steady_s,
               tokens_per_s_global=tokens * rt.world_size / steady_s,
               # one GPU alone trains the full batch as GRAD_ACCUM_BASE micro-batches per optimizer step
               step_ms_one_gpu_full_batch=(fwd + bwd) * h.grad_accum_base + opt,
               train_flops_per_token=flops, peak_flops=peak, peak_source=peak_source,
               mfu=mfu(flops, tokens / steady_s, peak))
    out["compile_s"] = max(0.0, out["first_step_s"] - steady_s) if ctx.args.compile else None
    out.update(_peak_memory(ctx))
    # late QAT, as the trainer switches it: one recompile on, none back off
    if h.late_qat_threshold > 0:
        out["qat_modules"] = set_qat(model, True, precision_fn)
        gq = dynamo_graphs()
        out["qat_first_step_s"] = wall(lambda: step(run, x, y))
        out["graphs_qat_on"] = dynamo_graphs() - gq
        n_qat = max(1, min(ctx.args.steps, 5))
        gq2 = dynamo_graphs()
        out["qat_step_ms"] = 1000.0 * wall(lambda: [step(run, x, y) for _ in range(n_qat)]) / n_qat
        out["graphs_qat_steady"] = dynamo_graphs() - gq2
        out["qat_compile_s"] = max(0.0, out["qat_first_step_s"] - out["qat_step_ms"] / 1000) if ctx.args.compile else None
        set_qat(model, False, precision_fn)
        go = dynamo_graphs()
        out["qat_off_step_s"] = wall(lambda: step(run, x, y))
        out["graphs_qat_off"] = dynamo_graphs() - go
    # graphs compiled after the warm-up (the first step, and the first step with QAT on): should be 0
    out["recompiles_after_warmup"] = (out["graphs_steady"] + out.get("graphs_qat_steady", 0)
                                      + out.get("graphs_qat_off", 0))
    try:  # the analytic estimate of the same work (bench/h100_time.py), without communication
        from bench.h100_time import estimate_step

        est = estimate_step(cfg, T, tokens * 8, 8, ns_steps=h.muon_backend_steps, ema=h.ema_decay > 0,
                            grad_clip=h.grad_clip_norm > 0)
        out["h100_estimate_ms_no_comm"] = est["ms_per_step"] - est["comm"]["ms"]
    except Exception as exc:  # noqa: BLE001 - an estimate is optional
        out["h100_estimate_error"] = f"{type(exc).__name__}: {exc}"
    return out


def dummy_luts(vocab_size: int, device: torch.device) -> ByteLuts:
    """Every token 1 byte, no boundaries: evaluation speed only (val_bpb is meaningless)."""
    return ByteLuts(base_bytes=torch.ones(vocab_size, dtype=torch.int16, device=device),
                    has_leading_space=torch.zeros(vocab_size, dtype=torch.bool, device=device),
                    is_boundary=torch.zeros(vocab_size, dtype=torch.bool, device=device))


def section_eval(ctx: Ctx) -> dict:
    from hybrid.training.evaluate import evaluate

    h, device, rt = ctx.h, ctx.device, ctx.rt
    model = ctx.get_model()
    set_qat(model, False, ctx.get_precision_fn())
    model.eval()
    n = ctx.args.eval_tokens or (262144 if ctx.args.size == "full" else 4096)
    tokens = torch.randint(0, h.vocab_size, (n + 1,), generator=torch.Generator().manual_seed(7))
    stride = min(h.eval_stride, h.train_seq_len)
    logits_fn = ctx.compile(model.forward_logits)  # train_gpt: torch.compile(model.forward_logits, dynamic=False)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if ctx.cuda else None
    luts = dummy_luts(h.vocab_size, device)

    def run():
        return evaluate(logits_fn, tokens, h.train_seq_len, stride, luts, h.eval_batch_seqs, device, rt.rank,
                        rt.world_size, autocast, tail_logits=True)

    try:
        g0 = dynamo_graphs()
        ctx.sync()
        t = time.perf_counter()
        first = run()
        first_s = time.perf_counter() - t
        g1 = dynamo_graphs()
        t = time.perf_counter()
        res = run()
        ctx.sync()
        timed_s = time.perf_counter() - t
        g2 = dynamo_graphs()
    finally:
        model.train()
    per_rank = res.tokens / rt.world_size / timed_s
    return dict(eval_tokens=res.tokens, stride=stride, batch_seqs=h.eval_batch_seqs, seq_len=h.train_seq_len,
                first_call_s=first_s, graphs_first_call=g1 - g0, eval_s=timed_s, graphs_second_call=g2 - g1,
                scored_tokens_per_s=res.tokens / timed_s, scored_tokens_per_s_per_rank=per_rank,
                forward_tokens_per_s_per_rank=per_rank * h.train_seq_len / stride,
                est_full_val_s_8gpu=FULL_VAL_TOKENS / (8 * per_rank), full_val_tokens_assumed=FULL_VAL_TOKENS,
                bytes_note="random tokens, dummy 1-byte-per-token table: speed only, val_bpb meaningless",
                same_result=abs(first.val_loss - res.val_loss) < 1e-3)


def section_ttt(ctx: Ctx) -> dict:
    import copy

    from hybrid.training.ttt import evaluate_ttt, sgd_settings
    from hybrid.training.ttt_lora import evaluate_ttt_lora, lora_settings

    h, device, rt = ctx.h, ctx.device, ctx.rt
    model = ctx.get_model()
    set_qat(model, False, ctx.get_precision_fn())
    n = ctx.args.eval_tokens or (4 * h.ttt_chunk if ctx.args.size == "full" else 4096)
    tokens = torch.randint(2, h.vocab_size, (n + 1,), generator=torch.Generator().manual_seed(8))
    tokens[::2048] = 1  # documents for lora (BOS = 1, as the shards write it)
    stride = min(h.eval_stride, h.train_seq_len)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if ctx.cuda else None
    luts = dummy_luts(h.vocab_size, device)
    out = {}
    net = copy.deepcopy(model)
    logits_fn = ctx.compile(net.forward_logits) if ctx.cuda else None
    loss_fn = ctx.compile(net) if ctx.cuda else None
    ctx.sync()
    t = time.perf_counter()
    sgd = dict(sgd_settings(asdict(h)), chunk_tokens=min(h.ttt_chunk, max(n // 4, 1)))  # >= 4 chunks
    res, st = evaluate_ttt(net, tokens, h.train_seq_len, stride, luts, h.eval_batch_seqs, device, rt.rank,
                           rt.world_size, autocast, logits_fn=logits_fn, loss_fn=loss_fn, **sgd)
    ctx.sync()
    sgd_s = time.perf_counter() - t
    out.update(sgd_s=sgd_s, sgd_chunks=st["chunks"], sgd_steps=st["steps"], sgd_score_s=st["score_seconds"],
               sgd_train_s=st["train_seconds"], sgd_scored_tokens_per_s=res.tokens / sgd_s,
               sgd_est_full_val_s_8gpu=FULL_VAL_TOKENS / (8 * res.tokens / rt.world_size / sgd_s))
    del net
    net = copy.deepcopy(model)
    chunk = min(h.ttt_lora_chunk, h.train_seq_len)
    ctx.sync()
    t = time.perf_counter()
    res, st = evaluate_ttt_lora(net, tokens, h.train_seq_len, luts, device, rt.rank, rt.world_size, autocast,
                                **dict(lora_settings(asdict(h)), chunk=chunk))
    ctx.sync()
    lora_s = time.perf_counter() - t
    out.update(ttt_tokens=res.tokens, lora_s=lora_s, lora_docs=st["docs"], lora_steps=st["steps"],
               lora_scored_tokens_per_s=res.tokens / lora_s,
               lora_est_full_val_s_8gpu=FULL_VAL_TOKENS / (8 * res.tokens / rt.world_size / lora_s),
               bytes_note="random tokens, dummy byte table: speed only")
    return out


def section_gptq(ctx: Ctx) -> dict:
    from train_gpt import gptq_export

    h = ctx.h
    model = ctx.get_model()
    set_qat(model, False, ctx.get_precision_fn())
    lines: list[str] = []
    hessian_diag: dict = {}
    g0 = dynamo_graphs()
    ctx.sync()
    t = time.perf_counter()
    quantized = gptq_export(h, model, ctx.get_precision_fn(), lambda msg, console=True: lines.append(msg),
                            hessian_diag)
    ctx.sync()
    seconds = time.perf_counter() - t
    ctx.quantized = quantized
    summary = next((ln for ln in lines if ln.startswith("gptq:")), "")
    fields_ = dict(kv.split(":", 1) for kv in summary.split()[1:] if ":" in kv)
    done, _, total = fields_.get("tensors", "0/0").partition("/")
    return dict(gptq_s=seconds, calib_seqs=h.gptq_seqs, calib_seq_len=h.gptq_seq_len,
                tensors_gptq=int(done or 0), tensors_int=int(total or 0), graphs_compiled=dynamo_graphs() - g0,
                fallbacks=len([ln for ln in lines if ln.startswith("gptq_fallback")]))


def section_artifact(ctx: Ctx) -> dict:
    from quant.artifact import blob_compressor, pack_model, unpack_model

    h = ctx.h
    model = ctx.get_model()
    state = model.state_dict()
    t = time.perf_counter()
    blob = pack_model(state, ctx.get_precision_fn(), compressor=h.compressor, bitpack=bool(h.bitpack),
                      prequantized=ctx.quantized)
    pack_s = time.perf_counter() - t
    t = time.perf_counter()
    restored = unpack_model(blob)
    unpack_s = time.perf_counter() - t
    fresh = HybridGPT(ctx.cfg)
    fresh.load_state_dict(restored, strict=True)
    n_params = sum(v.numel() for v in state.values())
    from quant.budget import ARTIFACT_LIMIT

    return dict(model_bytes=len(blob), bytes_per_param=len(blob) / n_params, params_stored=n_params,
                compressor=blob_compressor(blob), gptq=ctx.quantized is not None, pack_s=pack_s, unpack_s=unpack_s,
                limit_bytes=ARTIFACT_LIMIT, margin_before_code_bytes=ARTIFACT_LIMIT - len(blob))


def _time_calls(ctx: Ctx, fn, inputs, backward: bool, iters: int) -> tuple[float, float, torch.Tensor]:
    """(first call s, ms per later call, output) of fn(*inputs) [+ backward of its sum]."""
    def once():
        y = fn(*inputs)
        if backward:
            y.float().sum().backward()
        return y

    ctx.sync()
    t = time.perf_counter()
    y = once()
    ctx.sync()
    first = time.perf_counter() - t
    once()
    start = _mark(ctx.device)
    for _ in range(iters):
        once()
    end = _mark(ctx.device)
    ctx.sync()
    return first, _ms(start, end) / iters, y.detach()


def section_attention(ctx: Ctx) -> dict:
    from hybrid.attention import causal_band_mask, flex_window_attention

    cfg, device = ctx.cfg, ctx.device
    B, T = ctx.micro_seqs, ctx.seq_len
    H, G, w = cfg.num_heads, cfg.num_kv_heads, cfg.attn_window
    D = cfg.model_dim // H
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    backward = ctx.cuda  # flex_attention has no backward on the CPU
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, n, T, D, generator=g).to(device, dtype).requires_grad_(backward) for n in (H, G, G))
    mask = causal_band_mask(T, w, device)

    def flex(q, k, v):  # what a W layer runs on CUDA (inside the compiled model: the in-graph block mask)
        return flex_window_attention(q, k, v, w)

    def dense(q, k, v):  # the dense band mask (the CPU path of hybrid.attention.attention)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def full(q, k, v):  # an F layer
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    iters = 20 if ctx.cuda else 3
    out = dict(batch=B, seq_len=T, heads=H, kv_heads=G, head_dim=D, window=w, dtype=str(dtype).replace("torch.", ""),
               backward=backward)
    ys = {}
    for name, fn in (("flex_window", flex), ("dense_window", dense), ("full_causal", full)):
        compiled = torch.compile(fn, fullgraph=True, dynamic=False, backend=ctx.args.backend)
        first, ms, ys[name] = _time_calls(ctx, compiled, (q, k, v), backward, iters)
        out[f"{name}_first_s"], out[f"{name}_ms"] = first, ms
        q.grad = k.grad = v.grad = None
    out["dense_over_flex"] = out["dense_window_ms"] / out["flex_window_ms"]
    out["max_abs_diff_flex_dense"] = float((ys["flex_window"].float() - ys["dense_window"].float()).abs().max())
    return out


def section_fused_mlp(ctx: Ctx) -> dict:
    from bench.fused_mlp import bench_fused_mlp
    from hybrid.kernels.fused_mlp import FUSED_MLP_TRITON

    cfg = ctx.cfg
    if not ctx.cuda or not FUSED_MLP_TRITON:
        return dict(skipped="needs CUDA and triton (on the CPU only triton's interpreter runs it: "
                            "a correctness check, not a timing)")
    M = ctx.micro_seqs * ctx.seq_len
    slope = 0.5 if cfg.mlp_act == "leaky_relu2" else 0.0
    res = bench_fused_mlp(M, cfg.model_dim, cfg.mlp_hidden, device=ctx.device, slope=slope, dtype=torch.bfloat16,
                          iters=20, warmup=5)
    return dict(M=M, K=cfg.model_dim, N=cfg.mlp_hidden, **res,
                note="ratio = ref/fused: > 1 means MLP_FUSED=auto pays (bench_fused_mlp, fwd+bwd, both compiled)")


SECTION_FNS = {"train": section_train, "eval": section_eval, "gptq": section_gptq, "artifact": section_artifact,
               "ttt": section_ttt,
               "attention": section_attention, "fused_mlp": section_fused_mlp}


# ---- the guard -----------------------------------------------------------------------------------

@contextlib.contextmanager
def alarm(seconds: float, fired: list):
    """Raise BudgetExceeded in this (main) thread after `seconds` (and append to `fired`: torch.compile
    re-raises what interrupts it wrapped in its own error); a no-op where SIGALRM is unavailable."""
    usable = hasattr(signal, "setitimer") and _main_thread()
    if not usable:
        yield
        return

    def handler(signum, frame):
        fired.append(time.perf_counter())
        raise BudgetExceeded()

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _agree(ctx: Ctx, go: bool) -> bool:
    """Rank 0's decision, for every rank (collective sections must start together or not at all)."""
    if not ctx.rt.distributed:
        return go
    flag = torch.tensor([int(go)], device=ctx.device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def run_section(ctx: Ctx, name: str) -> dict:
    collective = name in COLLECTIVE
    go = ctx.remaining() > 0
    if collective:
        go = _agree(ctx, go)
    elif ctx.rt.rank != 0:
        return {"section": name, "skipped": "rank 0 only"}
    if not go:
        return {"section": name, "skipped": f"--budget-s {ctx.budget_s:g} used up before this section"}
    t = time.perf_counter()
    fired: list = []
    try:
        with alarm(ctx.remaining(), fired):
            row = {"section": name, **SECTION_FNS[name](ctx)}
    except (Exception, BudgetExceeded) as exc:  # noqa: BLE001 - one failure must not lose the others
        if fired or isinstance(exc, BudgetExceeded):
            row = {"section": name, "error": f"stopped by the --budget-s {ctx.budget_s:g} wall-clock guard"}
        else:
            if ctx.rt.rank == 0:
                traceback.print_exc()
            row = {"section": name, "error": f"{type(exc).__name__}: {_first_line(exc)}"[:500]}
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()
    row["wall_s"] = time.perf_counter() - t
    if ctx.rt.rank == 0:
        print(f"preflight section:{name} wall:{row['wall_s']:.1f}s "
              f"{'error: ' + row['error'] if 'error' in row else row.get('skipped', 'ok')}", flush=True)
    return row


# ---- report --------------------------------------------------------------------------------------

def _f(v, fmt="{:.2f}", scale=1.0) -> str:
    return "-" if v is None else fmt.format(v * scale)


def markdown_table(report: dict) -> str:
    """The report as a table for docs/PERF.md."""
    s = {r["section"]: r for r in report["sections"]}
    e = report
    rows = [("device", f"{e['device_name']} × {e['world_size']}, torch {e['torch']}, triton {e['triton'] or '-'}"),
            ("commit / date", f"`{e['commit'][:12]}`{' (dirty)' if e['dirty'] else ''}, {e['date_utc']}"),
            ("model", f"{e['size']}: {e['layer_pattern']} × {e['model_dim']}, {e['params']:,} params, "
                      f"micro-batch {e['micro_batch_seqs']} × {e['seq_len']} = {e['micro_batch_tokens']:,} tokens")]

    told: set = set()

    def add(name, label, fn):
        r = s.get(name)
        if r is None or name in told:
            return
        if "error" in r or "skipped" in r:  # one row for a section that did not run
            told.add(name)
            rows.append((name, f"error: {r['error']}" if "error" in r else f"skipped: {r['skipped']}"))
        else:
            rows.append((label, fn(r)))

    add("train", "compile (first step) / graphs",
        lambda r: f"{_f(r['compile_s'], '{:.1f}')} s / {r['graphs_first_step']} graph(s); steady steps: "
                  f"{r['graphs_steady']} new")
    add("train", "late QAT recompile",
        lambda r: (f"{_f(r.get('qat_compile_s'), '{:.1f}')} s, +{r.get('graphs_qat_on')} graph(s) on, "
                   f"+{r.get('graphs_qat_off')} back off; QAT step {_f(r.get('qat_step_ms'), '{:.1f}')} ms")
        if "qat_step_ms" in r else "QAT off in this config")
    add("train", "step ms (fwd / bwd / opt)",
        lambda r: f"**{r['step_ms']:.1f}** ({r['forward_ms']:.1f} / {r['backward_ms']:.1f} / {r['optimizer_ms']:.1f})"
                  + (f"; analytic H100 estimate {r['h100_estimate_ms_no_comm']:.4g}"
                     if "h100_estimate_ms_no_comm" in r else ""))
    add("train", "tokens/s per rank (GPU), MFU",
        lambda r: f"{r['tokens_per_s_per_rank']:,.0f}, MFU {r['mfu']:.3f} ({r['peak_source']})")
    add("train", "peak memory", lambda r: f"{r['peak_mem_bytes'] / 2**30:.2f} GiB ({r['peak_mem_method']})")
    add("eval", "sliding eval",
        lambda r: f"{r['scored_tokens_per_s']:,.0f} scored tok/s (stride {r['stride']}, {r['eval_tokens']:,} "
                  f"random tokens; first call {r['first_call_s']:.1f} s, {r['graphs_first_call']} graphs); "
                  f"full val on 8 GPUs ≈ {r['est_full_val_s_8gpu']:.0f} s")
    add("gptq", "GPTQ export",
        lambda r: f"{r['gptq_s']:.1f} s ({r['calib_seqs']}×{r['calib_seq_len']} calibration, "
                  f"{r['tensors_gptq']}/{r['tensors_int']} tensors, {r['graphs_compiled']} graphs)")
    add("artifact", "artifact (model bytes)",
        lambda r: f"{r['model_bytes']:,} B ({r['bytes_per_param']:.4f} B/param, {r['compressor']}, "
                  f"{'GPTQ' if r['gptq'] else 'round to nearest'}); pack {r['pack_s']:.1f} s")
    add("ttt", "TTT (sgd / lora)",
        lambda r: f"sgd {r['sgd_s']:.1f} s ({r['sgd_chunks']} chunks, {r['sgd_steps']} steps; full val on 8 GPUs "
                  f"≈ {r['sgd_est_full_val_s_8gpu']:.0f} s); lora {r['lora_s']:.1f} s ({r['lora_docs']} docs; "
                  f"full val on 8 GPUs ≈ {r['lora_est_full_val_s_8gpu']:.0f} s); {r['ttt_tokens']:,} random tokens")
    add("attention", "W attention: flex vs dense band",
        lambda r: f"flex {r['flex_window_ms']:.3f} ms, dense {r['dense_window_ms']:.3f} ms "
                  f"(dense/flex {r['dense_over_flex']:.2f}), full causal {r['full_causal_ms']:.3f} ms; "
                  f"{r['batch']}×{r['heads']}×{r['seq_len']}×{r['head_dim']}, window {r['window']}, "
                  f"{'fwd+bwd' if r['backward'] else 'fwd only'}")
    add("fused_mlp", "fused MLP (MLP_FUSED)",
        lambda r: f"fused {r['fused_ms']:.3f} ms, ref {r['ref_ms']:.3f} ms, ref/fused {r['ratio']:.3f} "
                  f"(M={r['M']}, K={r['K']}, N={r['N']})")
    lines = ["| preflight | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


# ---- main ----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--size", default="full", choices=("full", "tiny"),
                    help="full: the train_gpt.py default model; tiny: the `tiny` run preset's model")
    ap.add_argument("--steps", type=int, default=10, help="timed steady training steps")
    ap.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                    help="wall-clock guard: no section starts, and a running one is stopped, past it")
    ap.add_argument("--nproc", type=int, default=1, help="> 1: re-run under torch.distributed.run on N GPUs")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {','.join(SECTIONS)}")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="torch.compile as train_gpt.py does (default on, also on the CPU)")
    ap.add_argument("--backend", default="inductor",
                    help="torch.compile backend (aot_eager: fast CPU checks that still count dynamo graphs)")
    ap.add_argument("--batch-seqs", type=int, default=0,
                    help="sequences per micro-batch (default TRAIN_BATCH_TOKENS / GRAD_ACCUM_BASE / TRAIN_SEQ_LEN)")
    ap.add_argument("--eval-tokens", type=int, default=0, help="tokens scored by the eval section "
                    "(default 262,144 full, 4,096 tiny)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a train_gpt setting as its env variable, e.g. --set MLP_FUSED=auto (repeatable)")
    ap.add_argument("--json-out", default="", help="also write the JSON line to this file")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    unknown = [s for s in args.sections.split(",") if s and s not in SECTIONS]
    if unknown:
        ap.error(f"unknown --sections {unknown}; choose from {list(SECTIONS)}")
    return args


def launch(argv: list[str], nproc: int) -> int:
    """Re-run this preflight under torch.distributed.run on `nproc` processes. --nproc itself is dropped
    from the ranks' arguments (torch.distributed.run's parser would take it for its --nproc-per-node);
    the ranks know they are ranks by RANK in their environment."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "bench.preflight", *rest]
    print("preflight launch: " + shlex.join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT)


def main(argv: list[str] | None = None) -> dict:
    """Run the preflight; returns the report (rank 0; {} on other ranks, {"launched": ...} for --nproc)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.nproc > 1 and "RANK" not in os.environ:
        return {"launched": args.nproc, "returncode": launch(argv, args.nproc)}
    t0 = time.perf_counter()
    rt = make_runtime(args.device)
    try:
        h = resolve(args)
        ctx = Ctx(args=args, h=h, rt=rt, t0=t0, budget_s=args.budget_s)
        report = environment(ctx)
        wanted = [s for s in SECTIONS if s in args.sections.split(",")]
        report["sections"] = [run_section(ctx, name) for name in wanted]
        report["notes"] = ctx.notes
        report["wall_s"] = time.perf_counter() - t0
        report["errors"] = [r["section"] for r in report["sections"] if "error" in r]
        if rt.distributed:
            dist.barrier()
        if rt.rank != 0:
            return {}
        line = json.dumps(report, sort_keys=True, default=str)
        print(line, flush=True)
        print(markdown_table(report), flush=True)
        if args.json_out:
            Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json_out).write_text(line + "\n", encoding="utf-8")
        return report
    finally:
        if rt.distributed:
            gc.collect()
            dist.destroy_process_group()


def cli() -> int:
    report = main()
    if "launched" in report:
        return report["returncode"]
    return 1 if report.get("errors") else 0


if __name__ == "__main__":
    sys.exit(cli())
