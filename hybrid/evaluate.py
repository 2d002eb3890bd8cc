"""Validation: loss and bits per byte exactly as the challenge defines them (GOLF.md §2).

val_loss = mean token cross-entropy in nats over every scored target; the byte count of a target y
with predecessor x is base_bytes[y] + (has_leading_space[y] and not is_boundary[x]) (data/bpb.py);
val_bpb = Σ CE / (ln 2 · Σ bytes). Sums are float64 and all-reduced across ranks.

Two ways to cut the validation stream into model inputs:
- non-overlapping: windows of seq_len tokens, each starting with no context (the baseline's eval);
- sliding (stride S < seq_len): window k ends S tokens after window k−1 and scores only the targets
  the previous window did not; the first window scores all its targets, a final window ends exactly
  at the last target. Every target is scored exactly once with at least seq_len − S tokens of
  context (golf record 2026-03-19_SlidingWindowEval, with the 2026-04-01 tail fix built in).
Windows are split contiguously across ranks and batched `batch_seqs` at a time.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from data.bpb import ByteLuts, token_bytes


@dataclass
class EvalResult:
    val_loss: float
    val_bpb: float
    tokens: int
    bytes: int
    eval_ms: float

    def log_fields(self) -> str:
        return (f"val_loss:{self.val_loss:.4f} val_bpb:{self.val_bpb:.4f} tokens_scored:{self.tokens} "
                f"bytes_counted:{self.bytes} eval_time:{self.eval_ms:.0f}ms")


def window_plan(num_targets: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """[(start, length, scored_from)]: the window covers targets [start, start+length) and scores
    the ones at offsets >= scored_from. stride >= seq_len means non-overlapping windows."""
    if num_targets <= 0:
        return []
    if num_targets <= seq_len:
        return [(0, num_targets, 0)]
    if stride >= seq_len:
        plan = [(s, seq_len, 0) for s in range(0, num_targets - seq_len + 1, seq_len)]
        tail = num_targets % seq_len
        if tail:  # targets past the last full window get a final window ending at the last target
            plan.append((num_targets - seq_len, seq_len, seq_len - tail))
        return plan
    plan, end = [(0, seq_len, 0)], seq_len
    while end < num_targets:
        new_end = min(end + stride, num_targets)
        plan.append((new_end - seq_len, seq_len, seq_len - (new_end - end)))
        end = new_end
    return plan


@torch.no_grad()
def evaluate(logits_fn, tokens: Tensor, seq_len: int, stride: int, luts: ByteLuts, batch_seqs: int,
             device: torch.device, rank: int = 0, world_size: int = 1, autocast=None) -> EvalResult:
    """Score every target of `tokens` (a 1-D LongTensor of the validation stream) once.

    logits_fn(x: [B, T] int64) -> [B, T, V] logits. autocast: a context-manager factory or None.
    """
    t0 = time.perf_counter()
    plan = window_plan(tokens.numel() - 1, seq_len, stride)
    per_rank = math.ceil(len(plan) / world_size)
    mine = plan[rank * per_rank:(rank + 1) * per_rank]
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    tok_sum = torch.zeros((), dtype=torch.float64, device=device)
    byte_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i in range(0, len(mine), batch_seqs):
        batch = mine[i:i + batch_seqs]
        length = batch[0][1]
        if any(b[1] != length for b in batch):  # only the single short window can differ
            raise AssertionError("window plan mixes lengths within a batch")
        idx = torch.stack([torch.arange(s, s + length + 1) for s, _, _ in batch])
        chunk = tokens[idx].to(device, non_blocking=True)
        x, y = chunk[:, :-1], chunk[:, 1:]
        if autocast is not None:
            with autocast():
                logits = logits_fn(x)
        else:
            logits = logits_fn(x)
        nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                              reduction="none").view_as(y)
        offsets = torch.arange(length, device=device)
        scored_from = torch.tensor([b[2] for b in batch], device=device)
        mask = offsets[None, :] >= scored_from[:, None]
        loss_sum += nll.double()[mask].sum()
        tok_sum += mask.sum()
        byte_sum += token_bytes(x, y, luts).double()[mask].sum()
    if world_size > 1:
        for t in (loss_sum, tok_sum, byte_sum):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    val_loss = (loss_sum / tok_sum.clamp_min(1)).item()
    val_bpb = (loss_sum / (math.log(2.0) * byte_sum.clamp_min(1))).item()
    return EvalResult(val_loss, val_bpb, int(tok_sum.item()), int(byte_sum.item()),
                      1000.0 * (time.perf_counter() - t0))
