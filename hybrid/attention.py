"""Causal attention, optionally over a sliding window: a dense reference and the fast path.

Layout: q is [B, T, H, D]; k and v are [B, T, G, D] with H % G == 0 (GQA). Query head h reads KV
head h // (H // G), the grouping of SDPA's `enable_gqa` and of `repeat_interleave(H // G, dim=2)`.
The softmax scale is 1/sqrt(D).

Window convention: with window w the query at position t attends to keys j with t - w < j <= t,
i.e. exactly the last w positions including itself (w = 1: only itself). `window=None`, or any
w >= T, is plain causal attention. Note the off-by-one against the published hybrid (golf PR #1007 /
#1112; docs/TECHNIQUES.md, "Windowed attention"): FA3's window_size=(128, 128) lets a query see itself
plus 128 earlier tokens (129 keys); our attn_window=128 sees 128.

`attention_ref` is the spec (dense masked softmax, float32 or wider); `attention` is what the model
calls: SDPA for full causal, flex_attention with a block-sparse sliding-window mask on CUDA (blocks
entirely outside the band are skipped), and SDPA with a dense boolean band mask on CPU.
tests/test_layers.py checks both against a float64 loop.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import create_block_mask, flex_attention


def causal_band_mask(T: int, window: int | None, device: torch.device | str) -> Tensor:
    """[T, T] bool, True where query i may attend to key j: j <= i, and i - j < window if windowed."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    mask = j <= i
    if window is not None:
        mask = mask & (i - j < window)
    return mask


def attention_ref(q: Tensor, k: Tensor, v: Tensor, window: int | None = None) -> Tensor:
    """Dense masked softmax attention. q [B, T, H, D], k/v [B, T, G, D] -> y [B, T, H, D] (q's dtype).

    Computed in float32, or float64 when the inputs are float64, so it can be checked against a
    float64 loop."""
    _check_window(window)
    _, T, H, D = q.shape
    group = H // k.size(2)
    dtype = torch.promote_types(q.dtype, torch.float32)
    qh = q.to(dtype).transpose(1, 2)  # (B, H, T, D)
    kh = k.to(dtype).transpose(1, 2).repeat_interleave(group, dim=1)  # (B, H, T, D)
    vh = v.to(dtype).transpose(1, 2).repeat_interleave(group, dim=1)  # (B, H, T, D)
    scores = (qh @ kh.transpose(-1, -2)) / math.sqrt(D)  # (B, H, T, T)
    scores = scores.masked_fill(~causal_band_mask(T, window, q.device), float("-inf"))
    y = torch.softmax(scores, dim=-1) @ vh  # (B, H, T, D)
    return y.transpose(1, 2).to(q.dtype)  # (B, T, H, D)


def attention(q: Tensor, k: Tensor, v: Tensor, window: int | None = None) -> Tensor:
    """Fast path with `attention_ref`'s semantics. q [B, T, H, D], k/v [B, T, G, D] -> [B, T, H, D].

    Branches only on shapes, the window and the device, so it traces under
    torch.compile(fullgraph=True, dynamic=False); each (T, window) gets its own graph."""
    _check_window(window)
    T = q.size(1)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|G, T, D)
    if window is None or window >= T:
        y = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True)
    elif q.is_cuda:
        y = flex_window_attention(qh, kh, vh, window)
    else:
        # CPU: dense band mask; T x T booleans are nothing at test sizes.
        mask = causal_band_mask(T, window, q.device)
        y = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, enable_gqa=True)
    return y.transpose(1, 2)  # (B, T, H, D)


def flex_window_attention(qh: Tensor, kh: Tensor, vh: Tensor, window: int) -> Tensor:
    """Sliding-window causal attention with flex_attention, heads-first layout.

    qh [B, H, T, D], kh/vh [B, G, T, D] -> [B, H, T, D]. Device-agnostic (on CPU outside
    torch.compile flex runs its unfused reference, which is how the tests exercise the mask)."""
    T = qh.size(2)
    block_mask = _window_block_mask(T, window, qh.device)
    if torch.compiler.is_compiling():
        # Inside the model's compiled graph: the outer compile lowers flex into its fused kernel.
        return flex_attention(qh, kh, vh, block_mask=block_mask, enable_gqa=True)
    return _compiled_flex_attention()(qh, kh, vh, block_mask=block_mask, enable_gqa=True)


# ---- caches (eager mode only; under torch.compile everything is traced fresh) -------------------

_FLEX_WINDOW_MASKS: dict = {}
_FLEX_COMPILED: list = []


def _window_block_mask(T: int, window: int, device: torch.device):
    """flex BlockMask for the (t - window, t] band, shared by every batch element and head.

    Cached per (T, window, device) in eager mode. Inside a compiled graph we build it in-graph
    instead: a Python dict written during tracing would hold traced tensors, and the block-mask
    computation is O(T^2 / 128^2) blocks after fusion."""

    def window_mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    if torch.compiler.is_compiling():
        return create_block_mask(window_mask_mod, None, None, T, T, device=device)
    key = (T, window, str(device))
    if key not in _FLEX_WINDOW_MASKS:
        _FLEX_WINDOW_MASKS[key] = create_block_mask(window_mask_mod, None, None, T, T, device=device)
    return _FLEX_WINDOW_MASKS[key]


def _compiled_flex_attention():
    """flex_attention compiled once (eager model on CUDA); uncompiled flex is a slow reference."""
    if not _FLEX_COMPILED:
        _FLEX_COMPILED.append(torch.compile(flex_attention, dynamic=False))
    return _FLEX_COMPILED[0]


def _check_window(window: int | None) -> None:
    if window is not None and window < 1:
        raise ValueError(f"attention window must be >= 1 or None, got {window}")
