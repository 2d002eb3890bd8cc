"""Recompile guard: how many graphs torch.compile builds for the training step, late QAT, the sliding
evaluation and GPTQ calibration, at the `tiny` preset's size on the CPU.

Compiled as train_gpt.py compiles (fullgraph=True for the model, dynamic=False everywhere), with the
training step under bf16 autocast (`torch.autocast("cpu", dtype=torch.bfloat16)`, the CPU stand-in
for the CUDA autocast of a GPU run). Graphs are counted by a counting backend
(torch._dynamo.testing.CompileCounterWithBackend: one call per graph dynamo hands to the backend,
i.e. per compilation or recompilation) and cross-checked with torch._dynamo.utils.counters
["stats"]["unique_graphs"].

Backend: "aot_eager" by default. Recompiles are decided by dynamo's guards, before any backend runs,
so the counts are the same under inductor; aot_eager still runs AOTAutograd (the joint forward +
backward trace), but not Inductor's code generation, which on this 2-core CPU took 110 s for the
tiny training step's first compile and 39 s for the QAT recompile (measured 2026-12-01, torch 2.13).
COMPILE_GUARD_BACKEND=inductor runs the same tests with Inductor (e.g. on a GPU machine's CPU).
"""
from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from bench.preflight import dummy_luts
from hybrid.training.evaluate import evaluate, window_batches, window_plan
from hybrid.model import HybridGPT
from hybrid.training.optim import EMA, Muon, build_optimizers
from hybrid.training.schedule import muon_momentum
from quant.policy import make_precision_fn
from quant.qat import set_qat
from train_gpt import resolve_hyperparameters

BACKEND = os.environ.get("COMPILE_GUARD_BACKEND", "aot_eager")
# dynamo's per-function recompile limit (renamed from cache_size_limit in newer torch); past it dynamo
# silently runs the function eagerly, which would hide extra graphs from a count
RECOMPILE_LIMIT = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"


def unique_graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_setup():
    h = resolve_hyperparameters(["--preset", "tiny"], env={"LOG_DIR": tempfile.gettempdir()})
    torch.manual_seed(h.seed)
    model = HybridGPT(h.model_config())
    precision_fn = make_precision_fn(h.matrix_bits, h.embed_bits, mlp_bits=h.mlp_bits or None,
                                     attn_bits=h.attn_bits or None, clip=h.quant_clip,
                                     sd_k_matrix=h.sd_k_matrix, sd_k_embed=h.sd_k_embed)
    return h, model, precision_fn


@pytest.mark.slow
def test_training_step_compiles_once_and_late_qat_once():
    h, model, precision_fn = tiny_setup()
    cnt = CompileCounterWithBackend(BACKEND)
    run = torch.compile(model, backend=cnt, fullgraph=True, dynamic=False)
    optimizers = build_optimizers(model, h)
    ema = EMA(model, h.ema_decay)
    grad_accum = h.grad_accum_base
    B, T = h.train_batch_tokens // grad_accum // h.train_seq_len, h.train_seq_len
    gen = torch.Generator().manual_seed(0)

    def train_step(step: int) -> None:
        """train_gpt.train's step: schedule, grad_accum micro-batches of fresh tokens, clip, optimizers, EMA."""
        scale = 1.0 - step / 20
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * scale
                if isinstance(opt, Muon):
                    group["momentum"] = muon_momentum(step, h.muon_momentum_warmup_start, h.muon_momentum,
                                                      h.muon_momentum_warmup_steps)
        for _ in range(grad_accum):
            ids = torch.randint(0, h.vocab_size, (B, T + 1), generator=gen)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = run(ids[:, :-1], ids[:, 1:])
            (loss / grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), h.grad_clip_norm)
        for opt in optimizers:
            opt.step()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        model.after_optimizer_step()
        ema.update(model)
        assert torch.isfinite(loss)

    g0 = unique_graphs()
    train_step(0)  # warm-up: the one compilation (both micro-batches share it)
    assert cnt.frame_count == 1
    for step in range(1, 5):  # steady: new tokens, new lr and momentum, no recompilation
        train_step(step)
    assert cnt.frame_count == 1

    assert set_qat(model, True, precision_fn) > 0  # late QAT, as train_gpt.py switches it
    train_step(5)
    assert cnt.frame_count == 2  # exactly one recompile: dynamo guards on the modules' qat_bits
    for step in range(6, 9):
        train_step(step)
    assert cnt.frame_count == 2

    set_qat(model, False, precision_fn)  # train_gpt.finish switches it back off: the first graph again
    train_step(9)
    assert cnt.frame_count == 2
    assert unique_graphs() - g0 == cnt.frame_count


def test_sliding_eval_compiles_two_shapes_and_pads_the_last_batch():
    """evaluate(tail_logits=True) with a compiled forward_logits (train_gpt: torch.compile(
    model.forward_logits, dynamic=False)) builds exactly two graphs: the first window, scored in full
    ([1, seq_len] ids, last=seq_len), and every other window ([batch_seqs, seq_len], last=stride).
    The final partial batch does not make a third: window_batches pads it with copies of a window
    scored from `length` (nothing scored), and the last window, which scores fewer than `stride`
    targets, still asks for the same `last` (its unscored positions are masked). `last` is a Python
    int, so dynamic=False specialises on it: a new `last` is a new graph."""
    h, model, _ = tiny_setup()
    model.eval()
    seq_len, stride, batch_seqs, n = h.train_seq_len, 32, 8, 700  # 64, 32
    plan = window_plan(n, seq_len, stride)
    groups = window_batches(plan, stride, batch_seqs)
    assert [(length, last, len(b), {len(x) for x in b}) for length, last, b in groups] == [
        (64, 64, 1, {1}), (64, 32, 3, {8})]  # 20 windows -> 3 batches of 8, the last padded with 4
    assert plan[-1][1] - plan[-1][2] < stride  # the final window scores fewer than stride targets

    cnt = CompileCounterWithBackend(BACKEND)
    logits_fn = torch.compile(model.forward_logits, dynamic=False, backend=cnt)
    tokens = torch.randint(0, h.vocab_size, (n + 1,), generator=torch.Generator().manual_seed(1))
    luts = dummy_luts(h.vocab_size, torch.device("cpu"))
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    g0 = unique_graphs()

    def run(s):
        return evaluate(logits_fn, tokens, seq_len, s, luts, batch_seqs, torch.device("cpu"),
                        autocast=autocast, tail_logits=True)

    res = run(stride)
    assert res.tokens == n
    assert cnt.frame_count == 2
    again = run(stride)  # a second evaluation (the round trip's shapes) compiles nothing more
    assert cnt.frame_count == 2 and math.isclose(again.val_loss, res.val_loss, rel_tol=1e-5)
    # train-time validation (stride = seq_len, non-overlapping) adds its one shape: [8, 64], last=64
    run(seq_len)
    assert cnt.frame_count == 3
    assert unique_graphs() - g0 == cnt.frame_count


def _gptq_calibration_is_bucketed() -> bool:
    import quant.gptq

    return hasattr(quant.gptq, "calibration_bucket")


@pytest.mark.slow  # 19 s with 6 graphs; the per-length calibration compiled 62 (31 lengths x 2 batch sizes)
@pytest.mark.xfail(not _gptq_calibration_is_bucketed(), strict=False,
                   reason="quant/gptq.py generate_calibration runs one prefix length per call: one graph per "
                          "length under a compiled forward (the bounded-shape change is not in this tree)")
def test_gptq_calibration_compiles_a_bounded_number_of_shapes():
    """generate_calibration through its public signature, with a compiled forward_logits as the model
    callable: a bounded set of shapes, however long the sequences (here 31 prefix lengths) and even
    with a short last batch (10 sequences in batches of 4)."""
    from quant.gptq import generate_calibration

    h, model, _ = tiny_setup()
    model.eval()
    cnt = CompileCounterWithBackend(BACKEND)
    logits_fn = torch.compile(model.forward_logits, dynamic=False, backend=cnt)
    seq_len = h.gptq_seq_len  # 32
    with torch._dynamo.config.patch(**{RECOMPILE_LIMIT: 1000}):  # count every graph, do not fall back
        calib = generate_calibration(logits_fn, num_seqs=10, seq_len=seq_len, temperature=h.gptq_temp, seed=0,
                                     bos_id=1, batch_size=4)
    assert calib.shape == (10, seq_len) and int(calib.min()) >= 0 and int(calib.max()) < h.vocab_size
    assert cnt.frame_count <= 12, f"{cnt.frame_count} graphs for {seq_len - 1} prefix lengths"


def test_gptq_export_calibration_call_compiles_little():
    """As train_gpt.gptq_export calls it (the eager module; anything it compiles inside counts)."""
    from quant.gptq import generate_calibration

    h, model, _ = tiny_setup()
    g0 = unique_graphs()
    with torch._dynamo.config.patch(**{RECOMPILE_LIMIT: 1000}):
        calib = generate_calibration(model, h.gptq_seqs, h.gptq_seq_len, h.gptq_temp, seed=h.seed, bos_id=1)
    assert calib.shape == (h.gptq_seqs, h.gptq_seq_len)
    assert unique_graphs() - g0 <= 12
