"""Schedules as pure functions of (step, elapsed training time): LR scale, Muon momentum, QAT switch.

LR: no warmup; constant, then a linear warmdown to zero (golf baseline; docs/TECHNIQUES.md, "Schedules"). With a
wallclock cap the warmdown is tied to time: its length is WARMDOWN_ITERS × the mean step time so far,
so it ends exactly when the cap is reached whatever the hardware's speed. Without a cap it spans the
last WARMDOWN_ITERS of ITERATIONS.
"""
from __future__ import annotations


def lr_scale(step: int, elapsed_ms: float, iterations: int, warmdown_iters: int,
             max_wallclock_ms: float) -> float:
    if warmdown_iters <= 0:
        return 1.0
    if max_wallclock_ms > 0:
        step_ms = elapsed_ms / max(step, 1)
        warmdown_ms = warmdown_iters * step_ms
        remaining_ms = max(max_wallclock_ms - elapsed_ms, 0.0)
        return remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0
    warmdown_start = max(iterations - warmdown_iters, 0)
    if step < warmdown_start:
        return 1.0
    return max(iterations - step, 0) / warmdown_iters


def muon_momentum(step: int, start: float, end: float, warmup_steps: int) -> float:
    """Linear warm-up of Muon's momentum from `start` to `end` (golf record #52: 0.92→0.99 / 1500)."""
    if warmup_steps <= 0:
        return end
    frac = min(step / warmup_steps, 1.0)
    return (1.0 - frac) * start + frac * end


def qat_should_enable(scale: float, threshold: float) -> bool:
    """Late QAT: fake-quantize once the LR scale has fallen below the threshold (golf PR #286)."""
    return threshold > 0 and scale < threshold
