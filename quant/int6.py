"""The integer grid: the one definition shared by late QAT and the exported artifact.

How this works
--------------
A 2-D weight `w` of shape [R, C] is quantized row by row (rows are output features):

    s_r = fp16(clip_r / qmax)             one fp16 scale per row, clip_r chosen per row (below)
    q   = clamp(round(w / s_r), -qmax, qmax)   int8 container, symmetric grid, qmax = 2**(bits-1) - 1
    w'  = q * s_r                         dequantized value (exact in fp32: 8-bit q times 11-bit s)

`clip_r` comes from one of two clip modes (both shared by export and QAT, `CLIP_MODES`):
- "mse" (default): the row's max |w| times one of CLIP_RATIOS, whichever gives the smallest squared
  reconstruction error for that row (a GPTQ-lite style search, rec:2026-03-22, but over fixed
  fractions of the row max instead of percentiles: no sort or quantile, so it is cheap enough to run
  inside every QAT forward; torch.quantile-based QAT cost +20% step time in golf PR #145).
- "sdclip": clip_r = k * std(row) (SDClip, rec:2026-04-05; docs/TECHNIQUES.md, "Integer grid and row
  scales"), so
  s_r = fp16(std_r * fp32(k / qmax)). std is torch's default unbiased one (N - 1), computed in
  float64. The records use k = 12.85 for int6 matrices and k = 20 for int8 embeddings; k is far
  above the row max of a Gaussian row, so this mostly sets the step size, not a clip: the compressed
  size tracks about bits - log2(k). Entries beyond k*std are clamped to the grid edge. A constant
  nonzero row has std 0 and so gets the floor scale: its values all clamp to ±qmax (no trained matrix
  has such rows; an all-zero row is exact).

`fake_quant` returns exactly the exported values in the forward pass and passes the gradient
straight through to `w` (STE). Training-time and export-time grids agree bit for bit because:
- everything is computed from `w` upcast to fp32, whatever the parameter dtype;
- scales are `fp16(x * f)` with `f = fp32(ratio_k / qmax)` (mse, x = the row's max |w|) or
  `f = fp32(k / qmax)` (sdclip, x = the row's std rounded to fp32): a single correctly rounded
  multiply (no division by a Python constant that a compiler could rewrite), and the fp16 rounding
  is done on the bits (`_fp16_round`), which no compiler can skip;
- `round(w / s)` is corrected with an exact residual test (`_round_div`), so the result is the
  round-half-even of the *real* quotient even where a backend divides approximately (Triton's
  fp32 division is not correctly rounded);
- sums are taken in float64 (the mse candidates' errors, from exact per-element differences; the
  sdclip variance), so different reduction orders (eager vs compiled, CPU vs GPU) can only disagree
  when two mse errors agree to ~1e-13 relative, or when a float64 std sits that close to an fp32
  rounding boundary; exact mse ties pick the larger clip (the earlier ratio);
- scales are clamped to [2**-14, 65504], the normal fp16 range: never zero (all-zero rows work),
  never inf, and never subnormal, so no flush-to-zero mode can move the grid.
"""
from __future__ import annotations

import torch
from torch import Tensor

# Candidate row clips as fractions of the row's max |w|, largest first (ties keep the earlier one).
# 1.0 is the plain row-max clip (PR #374); going down to 0.75 covers the clips GPTQ-lite's
# percentile search picks on trained int6 rows, at six fused elementwise passes per matrix.
CLIP_RATIOS: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)

# How the row clip is chosen (module docstring): "mse" = the CLIP_RATIOS search, "sdclip" = k * std.
CLIP_MODES: tuple[str, ...] = ("mse", "sdclip")

FP16_MIN_NORMAL = 2.0 ** -14  # smallest positive normal fp16; the scale floor
FP16_MAX = 65504.0


def qmax(bits: int) -> int:
    """Largest grid value for `bits` (2..8): the grid is the symmetric [-qmax, qmax]."""
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in [2, 8], got {bits!r}")
    return 2 ** (bits - 1) - 1


def _check_matrix(w: Tensor) -> None:
    if w.ndim != 2 or w.shape[1] == 0:
        raise ValueError(f"expected a 2-D tensor with at least one column, got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"expected a floating-point tensor, got {w.dtype}")


def _fp16_round(x: Tensor) -> Tensor:
    """fp32 x in [2**-14, 65504] rounded to the nearest fp16 value (ties to even), still as fp32.

    Done on the bits (keep 10 of the 23 mantissa bits) rather than with `.to(torch.float16)`, because
    inductor elides an fp32 -> fp16 -> fp32 round trip inside a fused kernel (unless
    `emulate_precision_casts` is set), which made compiled QAT use unrounded scales. In the normal fp16
    range this is exactly the fp16 rounding, so the later `.to(torch.float16)` is lossless either way.
    """
    bits = x.view(torch.int32)
    bits = (bits + (0xFFF + ((bits >> 13) & 1))) & ~0x1FFF  # round half to even at mantissa bit 13
    return bits.view(torch.float32)


def _round_div(w: Tensor, s: Tensor) -> Tensor:
    """Round-half-even of the real quotient w / s, as fp32 (w fp32 [R, C], s fp32 [R, 1] from fp16).

    The division only proposes q; the residual r = w - q*s decides. q*s is exact (|q| is a small
    integer, s has an 11-bit mantissa), and near the decision threshold |r| ~ s/2 the difference is
    exactly representable, so comparing r with s/2 (a power-of-two multiple of s, exact) is exact.
    """
    q = torch.round(w / s)
    r = w - q * s
    half = s * 0.5
    odd = torch.remainder(q, 2.0) != 0
    up = (r > half) | ((r == half) & odd)  # tie at q + 1/2: go to q + 1 if that is even
    down = (r < -half) | ((r == -half) & odd)  # tie at q - 1/2: go to q - 1 if that is even
    return q + up.to(q.dtype) - down.to(q.dtype)


def _grid(w32: Tensor, s16: Tensor, qm: int) -> Tensor:
    """q as fp32 integers in [-qm, qm] for fp32 weights w32 [R, C] and fp16 scales s16 [R]."""
    return torch.clamp(_round_div(w32, s16.float().unsqueeze(1)), -qm, qm)


def check_clip(clip: str, sd_k: float | None) -> None:
    """ValueError unless `clip` is a CLIP_MODES name and sdclip has a finite k > 0."""
    if clip not in CLIP_MODES:
        raise ValueError(f"clip must be one of {CLIP_MODES}, got {clip!r}")
    if clip == "sdclip" and not (isinstance(sd_k, (int, float)) and 0 < sd_k < float("inf")):
        raise ValueError(f"clip='sdclip' needs a finite sd_k > 0, got {sd_k!r}")


def _scale_from(x: Tensor, factor: Tensor) -> Tensor:
    """fp16 scales fp16(clamp(x * factor)) from fp32 row statistics x [R] and an fp32 factor."""
    return _fp16_round((x * factor).clamp(FP16_MIN_NORMAL, FP16_MAX)).to(torch.float16)


def _mse_scales(w32: Tensor, qm: int) -> Tensor:
    w64 = w32.double()
    amax = w32.abs().amax(dim=1)  # [R]
    factors = torch.tensor([r / qm for r in CLIP_RATIOS], dtype=torch.float32, device=w32.device)
    best_s: Tensor | None = None
    best_err: Tensor | None = None
    # A loop over the (constant) candidates, vectorised over rows: dynamo unrolls it, and only one
    # [R, C] temporary is alive at a time instead of a [K, R, C] stack.
    for k in range(len(CLIP_RATIOS)):
        s = _scale_from(amax, factors[k])
        deq = _grid(w32, s, qm) * s.float().unsqueeze(1)  # exact products
        err = (w64 - deq.double()).square().sum(dim=1)  # [R] float64; differences are exact
        if best_s is None:
            best_s, best_err = s, err
        else:
            better = err < best_err  # strict: ties keep the larger clip
            best_s = torch.where(better, s, best_s)
            best_err = torch.where(better, err, best_err)
    return best_s


def _sdclip_scales(w32: Tensor, qm: int, sd_k: float) -> Tensor:
    # A one-column row has no N - 1 spread; its population std (0) then gives the floor scale.
    std = w32.double().std(dim=1, correction=1 if w32.shape[1] > 1 else 0).float()
    factor = torch.tensor(sd_k / qm, dtype=torch.float32, device=w32.device)
    return _scale_from(std, factor)


@torch.no_grad()
def row_scales(w: Tensor, bits: int, clip: str = "mse", sd_k: float | None = None) -> Tensor:
    """fp16 scale per row [R] for a 2-D float weight [R, C], by clip mode "mse" or "sdclip" (k = sd_k)."""
    _check_matrix(w)
    check_clip(clip, sd_k)
    qm = qmax(bits)
    w32 = w.detach().float()
    if clip == "sdclip":
        return _sdclip_scales(w32, qm, float(sd_k))
    return _mse_scales(w32, qm)


def quantize_rows(w: Tensor, bits: int, clip: str = "mse", sd_k: float | None = None) -> tuple[Tensor, Tensor]:
    """(q int8 [R, C] in [-qmax, qmax], scale fp16 [R]) for a 2-D float weight [R, C]."""
    with torch.no_grad():
        s = row_scales(w, bits, clip, sd_k)
        q = _grid(w.detach().float(), s, qmax(bits)).to(torch.int8)
    return q, s


def dequantize_rows(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """q [R, C] (any int dtype) times the fp16 row scales [R], computed in fp32, cast to `dtype`.
    Multiplied in place into one fresh fp32 copy of q: the artifact reader's peak memory is that
    copy, not two of them."""
    return q.to(torch.float32, copy=True).mul_(scale.float().unsqueeze(1)).to(dtype)


def fake_quant(w: Tensor, bits: int, clip: str = "mse", sd_k: float | None = None) -> Tensor:
    """Straight-through fake quantization: value dequantize_rows(*quantize_rows(w, bits, clip, sd_k)),
    gradient identity.

    `deq + (w - w.detach())` rather than the textbook `w + (deq - w).detach()`: `w - w` is exactly
    0, so the forward value is `deq` bit for bit, while `w + (deq - w)` can be off by one ulp.
    No `.item()` and no branch on tensor values, so it traces under torch.compile(fullgraph=True);
    `clip` and `sd_k` are Python constants that dynamo specialises on.
    """
    with torch.no_grad():
        q, s = quantize_rows(w, bits, clip, sd_k)
        deq = dequantize_rows(q, s, dtype=w.dtype)
    return deq + (w - w.detach())
