"""Validation: loss and bits per byte exactly as the challenge defines them (docs/TECHNIQUES.md, "Metric: val_bpb").

val_loss = mean token cross-entropy in nats over every scored target; the byte count of a target y
with predecessor x is base_bytes[y] + (has_leading_space[y] and not is_boundary[x]) (data/bpb.py);
val_bpb = Σ CE / (ln 2 · Σ bytes). Sums are float64 and all-reduced across ranks. Every mode scores
every target of the stream exactly once; they differ only in the context each target sees.

Eval modes (the trainer's EVAL_MODE):
- "sliding", stride S < seq_len (`evaluate`): windows of seq_len tokens; window k ends S tokens after
  window k−1 and scores only the targets the previous window did not; the first window scores all its
  targets, a final window ends exactly at the last target. Every target is scored exactly once with
  at least seq_len − S tokens of context (golf record 2026-03-19_SlidingWindowEval, with the
  2026-04-01 tail fix built in).
- "sliding" with stride >= seq_len = non-overlapping (the baseline's eval): windows of seq_len
  tokens, each starting with no context (a final window ends at the last target and scores only the
  targets no earlier window did).
  In both, windows are split contiguously across ranks; the score does not depend on world_size.
- "stateful" (hybrid/training/stateful.py `stateful_evaluate`, imported by the runs that use it; models whose every
  sequence mixer is recurrent: R and T layers, e.g. `--arch rwkv7`): the targets are cut into
  world_size × lanes contiguous spans of equal length (±1); each span is read in consecutive chunks
  with the recurrent state carried from chunk to chunk, so a target is scored with everything of its
  span before it as context, exactly as by one forward over the span. Each span starts from a fresh
  state `warmup` tokens before its first target (0, the default: at it); warm-up tokens are context
  only, never scored. The state is never reset at BOS: documents are packed in the stream as in
  training, and one span is one sequence. With a single span the whole stream is one sequence;
  otherwise the score depends (slightly) on world_size × lanes, so keep that product fixed when
  comparing runs.

`evaluate` is the fast form of `evaluate_ref` (the original loop, kept as the reference; tests check
they agree): the stream goes to the device once, windows are grouped into batches of one static
shape (the partial last batch is padded with unscored windows), with tail_logits=True (what the
trainer passes) the head + softcap + cross-entropy run only on each window's scored tail, and the
sums stay on the device until one transfer at the end.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from data.bpb import ByteLuts, token_bytes

EVAL_MODES = ("sliding", "stateful")


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


def eval_mode_tag(mode: str, seq_len: int, stride: int) -> str:
    """The log name of an eval mode: sliding_stride64, non_overlapping or stateful_chunk2048."""
    if mode not in EVAL_MODES:
        raise ValueError(f"eval mode must be one of {EVAL_MODES}, got {mode!r}")
    if mode == "stateful":
        return f"stateful_chunk{seq_len}"
    return f"sliding_stride{stride}" if stride < seq_len else "non_overlapping"


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


def _finish(sums: Tensor, world_size: int, t0: float) -> EvalResult:
    """sums = float64 [Σ nll, Σ tokens, Σ bytes] of this rank -> the all-reduced result (one host sync)."""
    if world_size > 1:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    loss, toks, nbytes = sums.tolist()
    return EvalResult(loss / max(toks, 1.0), loss / (math.log(2.0) * max(nbytes, 1.0)), int(toks), int(nbytes),
                      1000.0 * (time.perf_counter() - t0))


def _masked_sums(logits: Tensor, x: Tensor, y: Tensor, mask: Tensor, luts: ByteLuts) -> Tensor:
    """float64 [Σ nll, Σ tokens, Σ bytes] over the positions where mask [B, T] is True."""
    nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none").view_as(y)
    zero = torch.zeros((), dtype=torch.float64, device=y.device)
    return torch.stack((torch.where(mask, nll.double(), zero).sum(), mask.sum().double(),
                        torch.where(mask, token_bytes(x, y, luts).double(), zero).sum()))


@torch.no_grad()
def evaluate_ref(logits_fn, tokens: Tensor, seq_len: int, stride: int, luts: ByteLuts, batch_seqs: int,
                 device: torch.device, rank: int = 0, world_size: int = 1, autocast=None) -> EvalResult:
    """The reference sliding / non-overlapping evaluation: `window_plan` batched in plan order, full
    logits for every window position. logits_fn(x: [B, T] int64) -> [B, T, V] logits."""
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


def window_batches(windows: list[tuple[int, int, int]], stride: int,
                   batch_seqs: int) -> list[tuple[int, int, list[list[tuple[int, int]]]]]:
    """Group windows into batches of one static shape per group: [(length, last, batches)], each batch a
    list of (start, scored_from). `last` = the positions a batch needs logits for: min(stride, length)
    for windows that score no more than that (every sliding window but the first), else the whole
    window. A group's batches all hold min(batch_seqs, group size) windows; the last one is padded
    with copies of the group's first start scored from `length` (nothing scored)."""
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for start, length, scored_from in windows:
        tail = min(stride, length)
        last = tail if length - scored_from <= tail else length
        groups.setdefault((length, last), []).append((start, scored_from))
    out = []
    for (length, last), wins in groups.items():
        size = min(batch_seqs, len(wins))
        wins = wins + [(wins[0][0], length)] * (-len(wins) % size)
        out.append((length, last, [wins[i:i + size] for i in range(0, len(wins), size)]))
    return out


@torch.no_grad()
def evaluate(logits_fn, tokens: Tensor, seq_len: int, stride: int, luts: ByteLuts, batch_seqs: int,
             device: torch.device, rank: int = 0, world_size: int = 1, autocast=None,
             tail_logits: bool = False, progress=None) -> EvalResult:
    """Score every target of `tokens` (a 1-D LongTensor of the validation stream) once: sliding windows
    every `stride` tokens, or non-overlapping ones when stride >= seq_len (module docstring).

    logits_fn(x: [B, T] int64) -> [B, T, V] logits; with tail_logits=True, logits_fn(x, last) ->
    [B, last, V], the logits of the last `last` positions only (HybridGPT.forward_logits). Batches
    have at most two shapes per call ([1, seq_len] for the first sliding window, [batch_seqs, seq_len]
    for the rest), so a torch.compile(dynamic=False) logits_fn compiles at most twice.
    autocast: a context-manager factory or None. Equal to `evaluate_ref` up to float rounding.
    progress(windows_done, windows_total) of this rank, if given, is called after each batch."""
    t0 = time.perf_counter()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    plan = window_plan(tokens.numel() - 1, seq_len, stride)
    per_rank = math.ceil(len(plan) / world_size)
    mine = plan[rank * per_rank:(rank + 1) * per_rank]
    if not mine:
        return _finish(sums, world_size, t0)
    lo = min(s for s, _, _ in mine)
    hi = max(s + n for s, n, _ in mine) + 1
    stream = tokens[lo:hi].to(device=device, dtype=torch.int64)  # this rank's span, moved once
    done = 0
    for length, last, batches in window_batches(mine, stride, batch_seqs):
        starts = torch.tensor([[s - lo for s, _ in b] for b in batches], dtype=torch.int64, device=device)
        scored_from = torch.tensor([[f for _, f in b] for b in batches], dtype=torch.int64, device=device)
        span = torch.arange(length + 1, device=device)
        offsets = torch.arange(length - last, length, device=device)  # window offsets of the kept tail
        for i in range(len(batches)):
            chunk = stream[starts[i][:, None] + span]  # (B, T+1)
            x = chunk[:, :-1]
            if autocast is not None:
                with autocast():
                    logits = logits_fn(x, last) if tail_logits else logits_fn(x)
            else:
                logits = logits_fn(x, last) if tail_logits else logits_fn(x)
            if not tail_logits:
                logits = logits[:, length - last:]
            mask = offsets[None, :] >= scored_from[i][:, None]  # (B, last)
            sums += _masked_sums(logits, x[:, length - last:], chunk[:, length - last + 1:], mask, luts)
            if progress is not None:
                done = min(done + len(batches[i]), len(mine))
                progress(done, len(mine))
    return _finish(sums, world_size, t0)


def lane_plan(num_targets: int, num_lanes: int, warmup: int = 0) -> list[tuple[int, int, int]]:
    """Cut targets [0, num_targets) into num_lanes contiguous spans, sizes differing by at most one:
    [(row_start, score_start, end)]: the lane reads inputs from row_start = max(0, score_start −
    warmup) and scores targets [score_start, end)."""
    bounds = [num_targets * i // num_lanes for i in range(num_lanes + 1)]
    return [(max(0, a - warmup), a, b) for a, b in pairwise(bounds)]
