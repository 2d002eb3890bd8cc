"""Legal score-first test-time training (TTT): the validation stream is scored chunk by chunk, and the
model is trained on each chunk only after every target of that chunk has been scored.

    for chunk c = targets [a, b) of the stream, in order (chunk_tokens targets each, the last shorter):
        (a) score: every target of the chunk, with exactly the sliding windows `evaluate` would use
            for it (hybrid/training/evaluate.py `window_plan`, restricted to the chunk's targets);
        (b) train (not after the last chunk): `epochs` passes of SGD(momentum) over non-overlapping
            seq_len windows of the chunk's own tokens (inputs tokens[a:b], labels tokens[a+1:b+1]),
            next-token loss model(x, y) as in training, LR lr_c = lr·½(1 + cos(π·c/(chunks − 1))),
            gradient-norm clipping at grad_clip.

The challenge's legality conditions, and why each holds:
1. causal: a target's score is the model's causal forward over a window ending at or after it; the
   model reads no position after the scored one (tests/test_ttt.py perturbs a token and checks every
   earlier target bit for bit, with TTT on);
2. full softmax: the score is F.cross_entropy over the whole vocabulary (`_masked_sums`);
3. score before update: chunk c is scored with the weights trained on chunks < c only; training on
   chunk c reads tokens[a..b], i.e. targets < b, all of which were scored in (a) of chunk c or earlier;
   chunk c + 1's targets are tokens[b+1..], never seen by any update before they are scored;
4. one left-to-right pass: the chunks partition the targets and each chunk scores exactly its own,
   so the union is evaluate's single pass, each target once, with identical token and byte counts.
   A sliding window whose scored tail straddles a chunk boundary is run in both chunks, each time
   scoring only that chunk's targets (the second run sees the weights trained on the first chunk);
   windows reach back into earlier chunks for context, which is legal as those tokens are scored.
With epochs = 0 (or lr = 0 on a model without MoE layers) the result equals `evaluate(...,
tail_logits=True)`: same windows, same batch shapes (every batch is padded to evaluate's static
shape for its (length, last) group, which also bounds torch.compile to evaluate's shapes).

Distributed (world_size > 1, torch.distributed initialised, every rank holding the same weights):
each chunk's windows are split contiguously over the ranks as `evaluate` splits its plan, and the
float64 sums are all-reduced once at the end. Training: a step takes up to `train_seqs` windows of
the chunk (all ranks together; default batch_seqs), each rank runs its contiguous share, every rank's
loss is scaled by its share of the step's tokens and the gradients are summed (all_reduce), i.e. the
token-weighted mean gradient of the whole step; clipping and the SGD step then run identically on
every rank, so the replicas stay bit-identical. The result is deterministic for a given world size
(on the CPU bit for bit; on a GPU as far as its kernels are); other world sizes give the same
result up to float rounding. Ranks with nothing to do in a step still join its all_reduce.

The model given is MODIFIED in place (trained; its training flag is restored at the end): pass a
copy (train_gpt.py passes a deepcopy of the model reloaded from the artifact, which stays untouched).
Any model with forward(x, y) -> mean loss and forward_logits(x, last) -> tail logits works
(HybridGPT: hybrid, gpt, moe and, with sliding windows, rwkv7). MoE models also get their
aux-loss-free bias update after each step, as in training (`after_optimizer_step`), so lr = 0 is not
a no-op for them. The "stateful" evaluation (recurrent state carried across chunks, `--arch rwkv7`)
is not supported: eval_mode="stateful" raises ValueError.

Cost: scoring = evaluate's forwards plus one per chunk boundary (the straddling window); training =
epochs × (chunks − 1) × ceil(chunk_tokens / seq_len) windows of forward + backward. Choose
chunk_tokens >= world_size · batch_seqs · stride so scoring batches are not mostly padding.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from itertools import groupby

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from data.bpb import ByteLuts
from hybrid.training.evaluate import EvalResult, _finish, _masked_sums, window_batches, window_plan
from hybrid.training.settings import TTT_MODES  # noqa: F401  re-exported: the settings check the name first


def chunk_bounds(num_targets: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """Consecutive [a, b) target ranges of chunk_tokens targets each (the last one shorter)."""
    return [(a, min(a + chunk_tokens, num_targets)) for a in range(0, num_targets, chunk_tokens)]


def chunk_lr(c: int, chunks: int, lr: float) -> float:
    """Cosine over the chunk index: lr at chunk 0, reaching 0 at the last chunk (which is never trained,
    so the last trained chunk, chunks − 2, still gets a small positive LR; the golf records' schedule)."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * c / max(chunks - 1, 1)))


def chunk_windows(plan: list[tuple[int, int, int]], bounds: list[tuple[int, int]]):
    """For each chunk [a, b): the windows of `plan` (window_plan's order: scored ranges consecutive and
    increasing) whose scored targets [start + scored_from, start + length) meet [a, b), as
    (start, length, max(scored_from, a − start)); the caller masks targets >= b. Yields lists."""
    i = 0
    for a, b in bounds:
        while i < len(plan) and plan[i][0] + plan[i][1] <= a:
            i += 1
        wins, j = [], i
        while j < len(plan) and plan[j][0] + plan[j][2] < b:
            s, n, f = plan[j]
            wins.append((s, n, max(f, a - s)))
            j += 1
        yield wins


def train_windows(a: int, b: int, seq_len: int) -> list[tuple[int, int]]:
    """Non-overlapping (start, length) windows covering targets [a, b); the last may be shorter."""
    return [(s, min(seq_len, b - s)) for s in range(a, b, seq_len)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ctx(autocast):
    return autocast() if autocast is not None else nullcontext()


def evaluate_ttt(model: nn.Module, tokens: Tensor, seq_len: int, stride: int, luts: ByteLuts, batch_seqs: int,
                 device: torch.device, rank: int = 0, world_size: int = 1, autocast=None,
                 chunk_tokens: int = 32768, epochs: int = 3, lr: float = 0.002, momentum: float = 0.9,
                 grad_clip: float = 1.0, progress=None, *, train_seqs: int | None = None,
                 logits_fn=None, loss_fn=None, eval_mode: str = "sliding",
                 per_token: bool = False) -> tuple[EvalResult, dict]:
    """Score-first TTT evaluation of `tokens` (1-D LongTensor, the validation stream as `evaluate` takes
    it) with `model`, which it TRAINS IN PLACE (module docstring): pass a copy.

    seq_len, stride, luts, batch_seqs, device, rank, world_size, autocast: as hybrid/evaluate.evaluate
    (scoring always uses tail logits). chunk_tokens: targets per chunk; epochs, lr, momentum,
    grad_clip (<= 0: no clipping): the SGD on each chunk but the last. progress(tokens_done,
    tokens_total): called after each chunk. train_seqs: windows per SGD step over all ranks (default
    batch_seqs). logits_fn(x, last) / loss_fn(x, y): e.g. torch.compile'd model.forward_logits / model
    (default: the model's own; they must run `model`). eval_mode must be "sliding" (ValueError for
    "stateful"). per_token=True adds stats["per_token"]: float64 [num_targets] CPU tensor, each
    target's nll as scored (all ranks' filled in), for tests.

    Returns (EvalResult, stats) with stats = {chunks, trained_chunks, steps, seconds, score_seconds,
    train_seconds}."""
    if eval_mode != "sliding":
        raise ValueError(f"test-time training supports only the sliding-window evaluation, not eval mode "
                         f"{eval_mode!r}: the stateful (recurrent, --arch rwkv7) evaluation carries a state "
                         f"across chunks that TTT would invalidate; use EVAL_MODE=sliding or TTT=off")
    if not hasattr(model, "forward_logits"):
        raise ValueError(f"{type(model).__name__} has no forward_logits(x, last); TTT needs it to score")
    if chunk_tokens < 1 or epochs < 0 or batch_seqs < 1 or seq_len < 1 or stride < 1:
        raise ValueError(f"need chunk_tokens, batch_seqs, seq_len, stride >= 1 and epochs >= 0; got "
                         f"chunk_tokens={chunk_tokens} batch_seqs={batch_seqs} seq_len={seq_len} "
                         f"stride={stride} epochs={epochs}")
    if train_seqs is not None and train_seqs < 1:
        raise ValueError(f"train_seqs must be >= 1, got {train_seqs}")
    logits_fn = logits_fn or model.forward_logits
    loss_fn = loss_fn or model
    step_seqs = train_seqs or batch_seqs
    t0 = time.perf_counter()
    num_targets = tokens.numel() - 1
    plan = window_plan(num_targets, seq_len, stride)
    bounds = chunk_bounds(num_targets, chunk_tokens)
    # evaluate's static batch size per (length, last) group (world_size 1: exactly its shapes)
    sizes = {(length, last): len(batches[0]) for length, last, batches in window_batches(plan, stride, batch_seqs)}
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    per_tok = torch.zeros(max(num_targets, 0), dtype=torch.float64, device=device) if per_token else None
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum) if epochs > 0 and len(bounds) > 1 else None
    was_training = model.training
    score_s = train_s = 0.0
    trained = steps = 0

    for c, ((a, b), wins) in enumerate(zip(bounds, chunk_windows(plan, bounds))):
        last_chunk = c == len(bounds) - 1
        do_train = opt is not None and not last_chunk
        lo = min([a] + [s for s, _, _ in wins])
        hi = max([b] + [s + n for s, n, _ in wins])
        stream = tokens[lo:hi + 1].to(device=device, dtype=torch.int64)  # this chunk's span, moved once

        # (a) score every target of [a, b) with the weights trained on chunks < c
        _sync(device)
        ts = time.perf_counter()
        model.eval()
        per_rank = math.ceil(len(wins) / world_size)
        mine = wins[rank * per_rank:(rank + 1) * per_rank]
        with torch.no_grad():
            for length, last, batches in window_batches(mine, stride, batch_seqs):
                want = sizes.get((length, last), 0)
                if want > len(batches[0]):  # a lone short batch: pad to evaluate's static shape
                    batches = [batches[0] + [(batches[0][0][0], length)] * (want - len(batches[0]))]
                starts = torch.tensor([[s for s, _ in bt] for bt in batches], dtype=torch.int64, device=device)
                scored_from = torch.tensor([[f for _, f in bt] for bt in batches], dtype=torch.int64, device=device)
                span = torch.arange(length + 1, device=device)
                offsets = torch.arange(length - last, length, device=device)  # window offsets of the kept tail
                for i in range(len(batches)):
                    seqs = stream[starts[i][:, None] - lo + span]  # (B, T+1)
                    x = seqs[:, :-1]
                    with _ctx(autocast):
                        logits = logits_fn(x, last)
                    target = starts[i][:, None] + offsets  # target index of each kept position
                    mask = (offsets[None, :] >= scored_from[i][:, None]) & (target < b)
                    y = seqs[:, length - last + 1:]
                    sums += _masked_sums(logits, x[:, length - last:], y, mask, luts)
                    if per_tok is not None:
                        nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                                              reduction="none").view_as(y)
                        per_tok.index_put_((target[mask],), nll[mask].double(), accumulate=True)
        _sync(device)
        score_s += time.perf_counter() - ts

        # (b) train on the chunk's own tokens (all scored now); never after the last chunk
        if do_train:
            ts = time.perf_counter()
            model.train()
            steps += train_span(model, opt, params, loss_fn, stream, lo, a, b, seq_len, epochs, step_seqs,
                                chunk_lr(c, len(bounds), lr), rank, world_size, autocast, grad_clip, device)
            trained += 1
            _sync(device)
            train_s += time.perf_counter() - ts
        if progress is not None:
            progress(b, num_targets)

    model.train(was_training)
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    result = _finish(sums, world_size, t0)
    stats = {"chunks": len(bounds), "trained_chunks": trained, "steps": steps,
             "seconds": time.perf_counter() - t0, "score_seconds": score_s, "train_seconds": train_s}
    if per_tok is not None:
        if world_size > 1:
            dist.all_reduce(per_tok, op=dist.ReduceOp.SUM)
        stats["per_token"] = per_tok.cpu()
    return result, stats


def sgd_settings(hp: dict) -> dict:
    """evaluate_ttt's keyword arguments from a run's settings (train_gpt.Hyperparameters as a dict, or
    the hparams its log saved): the one place the TTT_* settings of `TTT=sgd` become arguments."""
    return dict(chunk_tokens=int(hp["ttt_chunk"]), epochs=int(hp["ttt_epochs"]), lr=float(hp["ttt_lr"]),
                momentum=float(hp["ttt_momentum"]), grad_clip=float(hp["ttt_clip"]))


def train_span(model: nn.Module, opt: torch.optim.Optimizer, params: list[Tensor], loss_fn, stream: Tensor,
               lo: int, a: int, b: int, seq_len: int, epochs: int, step_seqs: int, lr: float, rank: int,
               world_size: int, autocast, grad_clip: float, device: torch.device) -> int:
    """`epochs` passes over targets [a, b) of `stream` (which starts at target lo) in non-overlapping
    seq_len windows, one SGD step per `step_seqs` windows at `lr` (all ranks together); the training
    half of a TTT chunk, and of a phase of TTT=lora (hybrid/training/ttt_lora.py). Returns the steps."""
    for group in opt.param_groups:
        group["lr"] = lr
    windows = train_windows(a, b, seq_len)
    steps = 0
    with torch.enable_grad():
        for _ in range(epochs):
            for k in range(0, len(windows), step_seqs):
                _train_step(model, opt, params, loss_fn, stream, lo, windows[k:k + step_seqs], rank, world_size,
                            autocast, grad_clip, device)
                steps += 1
    return steps


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, params: list[Tensor], loss_fn, stream: Tensor,
                lo: int, step: list[tuple[int, int]], rank: int, world_size: int, autocast,
                grad_clip: float, device: torch.device) -> None:
    """One SGD step on `step`'s windows [(start, length)] (all ranks together): this rank's contiguous
    share, loss scaled by its share of the step's tokens, gradients summed over ranks, clip, step."""
    total = sum(n for _, n in step)
    per_rank = math.ceil(len(step) / world_size)
    mine = step[rank * per_rank:(rank + 1) * per_rank]
    opt.zero_grad(set_to_none=False)
    for length, group in groupby(mine, key=lambda w: w[1]):  # full windows, then at most one shorter
        starts = torch.tensor([s - lo for s, _ in group], dtype=torch.int64, device=device)
        seqs = stream[starts[:, None] + torch.arange(length + 1, device=device)]
        with _ctx(autocast):
            loss = loss_fn(seqs[:, :-1], seqs[:, 1:])
        (loss * (seqs.size(0) * length / total)).backward()
    grads = []
    for p in params:  # every rank must hand the all_reduce the same layout
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    if world_size > 1:  # one all_reduce per gradient dtype (fp32 for HybridGPT: one in all)
        for dtype in sorted({g.dtype for g in grads}, key=str):
            same = [g for g in grads if g.dtype == dtype]
            flat = torch.cat([g.reshape(-1) for g in same])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            for g, part in zip(same, flat.split([g.numel() for g in same])):
                g.copy_(part.view_as(g))
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    if hasattr(model, "after_optimizer_step"):
        model.after_optimizer_step()  # MoE: aux-loss-free bias balancing, all-reduced (a no-op otherwise)
