"""The "stateful" evaluation (hybrid/training/evaluate.py's module docstring), for models whose every sequence
mixer is recurrent (R and T layers). train_gpt.py imports this module (`stateful_evaluate`) when a
run evaluates this way, so a sliding-window run neither loads nor counts it.
"""
from __future__ import annotations

import time

import torch
from torch import Tensor

from data.bpb import ByteLuts
from hybrid.training.evaluate import EvalResult, _finish, _masked_sums, lane_plan


@torch.no_grad()
def stateful_evaluate(step_fn, tokens: Tensor, chunk_len: int, luts: ByteLuts, lanes: int,
                      device: torch.device, rank: int = 0, world_size: int = 1, autocast=None,
                      warmup: int = 0) -> EvalResult:
    """The "stateful" mode (module docstring): world_size × lanes spans, each read in chunks of
    chunk_len tokens with the recurrent state carried; this rank runs its `lanes` spans as the rows of
    one batch. step_fn(x: [lanes, chunk_len] int64, state | None) -> (logits [lanes, chunk_len, V],
    state) (HybridGPT.forward_logits_stateful; None = a fresh sequence). Rows are padded at their end
    up to a whole number of chunks; padding comes after every scored target of its row, so causality
    keeps it out of their logits, and it is masked out of the sums. Every call has the same shape
    (two compiled graphs: the first chunk, state None, and the rest)."""
    t0 = time.perf_counter()
    n = tokens.numel() - 1
    plan = lane_plan(n, world_size * lanes, warmup)
    mine = plan[rank * lanes:(rank + 1) * lanes]
    row_len = max(end - row_start for row_start, _, end in plan)
    num_chunks = max(1, -(-row_len // chunk_len))
    width = num_chunks * chunk_len
    # (lanes, width + 1) token rows; positions past the stream's end repeat its last token (unscored)
    idx = torch.tensor([r for r, _, _ in mine])[:, None] + torch.arange(width + 1)
    rows = tokens[idx.clamp_max(n)].to(device=device, dtype=torch.int64)
    first = torch.tensor([a - r for r, a, _ in mine], device=device)[:, None]  # first scored offset
    stop = torch.tensor([b - r for r, _, b in mine], device=device)[:, None]
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    offsets = torch.arange(chunk_len, device=device)[None, :]
    state = None
    for c in range(num_chunks):
        lo = c * chunk_len
        x, y = rows[:, lo:lo + chunk_len].contiguous(), rows[:, lo + 1:lo + chunk_len + 1]
        if autocast is not None:
            with autocast():
                logits, state = step_fn(x, state)
        else:
            logits, state = step_fn(x, state)
        pos = lo + offsets
        sums += _masked_sums(logits, x, y, (pos >= first) & (pos < stop), luts)
    return _finish(sums, world_size, t0)
