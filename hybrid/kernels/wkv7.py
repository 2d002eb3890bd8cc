"""The WKV-7 recurrence of RWKV-7 ("Goose", x070): the step-by-step spec, a chunked PyTorch form, one
dispatching entry point.

Shapes: B batch, T time, H heads, N head size. Every sequence input is [B, T, H, N]; the state is
[B, H, N, N] with S[i, j] = (value index i, key index j), the layout of the reference CUDA kernel and
of the `rwkv` package's inference state. Per head and token (column vectors, RWKV-7 arXiv:2503.14456,
RWKV-LM `rwkv7_clampw.cu`):

    sa_t = S_{t-1} a_t                                    (a = α = −κ̂, "removal" direction)
    S_t  = S_{t-1} diag(exp(w_t)) + sa_t b_tᵀ + v_t k_tᵀ     (b = β = κ̂⊙a; k = k̃ the written key)
    y_t  = S_t r_t                                         (scale 1, no 1/sqrt(N))

`w` is the *log* decay (w ≤ 0, decay d = exp(w)); RWKV-7 keeps it in [−e^{−1/2}, 0), FLA's `w`
argument of `chunk_rwkv7` has the same meaning. The state and all recurrence math run in fp32
(float64 when the inputs are float64): decays sit close to 1, so bf16 state would drift (RWKV-LM
README). `y` comes back in r's dtype, the final state in the compute dtype.

Chunked form (the DPLR pipeline of FLA `fla/ops/generalized_delta_rule/dplr/naive.py`, re-derived
here). Work with h = Sᵀ [K, V]. In a chunk of c tokens with incoming h₀, G_t = Σ_{s≤t} w_s (inclusive)
and G⁻_t = G_t − w_t. With u_t = a_tᵀ h_{t−1} (= sa_tᵀ):

    A_qk[t,s] = Σ_j r_t k_s e^{G_t−G_s}  (s≤t)     A_qb[t,s] = Σ_j r_t b_s e^{G_t−G_s}  (s≤t)
    A_ak[t,s] = Σ_j a_t k_s e^{G⁻_t−G_s} (s<t)     A_ab[t,s] = Σ_j a_t b_s e^{G⁻_t−G_s} (s<t)
    (I − A_ab) U = A_ak V + (a⊙e^{G⁻}) h₀    ⇒   U = W_u + W_w h₀   (one unit-triangular solve)
    Y   = A_qk V + A_qb U + (r⊙e^{G}) h₀  =  P + Q h₀
    h_c = diag(e^{G_c}) h₀ + (k⊙e^{G_c−G})ᵀ V + (b⊙e^{G_c−G})ᵀ U  =  M h₀ + Z

Everything except h₀ is computed for all chunks at once; the only sequential work is
h ← M h + Z, one [K,K]@[K,V] matmul per chunk, after which Y = P + Q·h_prev is again parallel.
e^{G_t−G_s} is factored around the chunk midpoint m as e^{G_t−G_m}·e^{G_m−G_s} (FLA's trick) so the
c×c matrices are plain matmuls; each factor is bounded by e^{c/2·max|w|}, e^{4.9} at c=16 with the
RWKV-7 clamp, so fp32 never overflows (c·max|w| must stay below ~80). A ragged tail is padded with
w = 0 and zero r, k, v, a, b, which leaves the state untouched. Autograd gives the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hybrid.kernels.wkv7_triton import TRITON_AVAILABLE, wkv7_triton

WKV7_IMPLS = ("auto", "ref", "chunked", "triton")


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_shapes(r: Tensor, others: tuple[Tensor, ...], state: Tensor | None) -> None:
    if r.dim() != 4:
        raise ValueError(f"wkv7 inputs must be [B, T, H, N], got r of shape {tuple(r.shape)}")
    for x in others:
        if x.shape != r.shape:
            raise ValueError(f"wkv7 inputs must share r's shape {tuple(r.shape)}, got {tuple(x.shape)}")
    B, _, H, N = r.shape
    if state is not None and tuple(state.shape) != (B, H, N, N):
        raise ValueError(f"wkv7 state must be [B, H, N, N] = {(B, H, N, N)}, got {tuple(state.shape)}")


def wkv7_ref(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
             state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The spec: one token at a time, exactly the three lines of the module docstring.

    [B, T, H, N] ×6 (+ state [B, H, N, N]) -> (y [B, T, H, N] in r's dtype, final state [B, H, N, N])."""
    _check_shapes(r, (w, k, v, a, b), state)
    B, T, H, N = r.shape
    dt = _compute_dtype(r)
    with torch.autocast(r.device.type, enabled=False):  # keep the matmuls in the compute dtype
        S = r.new_zeros(B, H, N, N, dtype=dt) if state is None else state.to(dt)
        ys = []
        for t in range(T):
            rt, wt, kt, vt, at, bt = (x[:, t].to(dt) for x in (r, w, k, v, a, b))  # [B, H, N]
            sa = S @ at.unsqueeze(-1)  # [B, H, N, 1]: row i = Σ_j S_ij a_j
            S = S * wt.exp().unsqueeze(-2) + sa * bt.unsqueeze(-2) + vt.unsqueeze(-1) * kt.unsqueeze(-2)
            ys.append((S @ rt.unsqueeze(-1)).squeeze(-1))
        y = torch.stack(ys, dim=1) if ys else r.new_zeros(B, 0, H, N, dtype=dt)
    return y.to(r.dtype), S


def wkv7_chunked(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
                 state: Tensor | None = None, chunk_size: int = 16) -> tuple[Tensor, Tensor]:
    """Chunk-parallel form of `wkv7_ref` (same math, see the module docstring). Any T ≥ 0.

    [B, T, H, N] ×6 (+ state [B, H, N, N]) -> (y [B, T, H, N] in r's dtype, final state [B, H, N, N])."""
    _check_shapes(r, (w, k, v, a, b), state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    B, T, H, N = r.shape
    dt = _compute_dtype(r)
    h = r.new_zeros(B, H, N, N, dtype=dt) if state is None else state.to(dt).transpose(-1, -2)  # [K, V]
    if T == 0:
        return r.new_zeros(B, 0, H, N), h.transpose(-1, -2).contiguous()
    c = min(chunk_size, T)
    n = -(-T // c)
    pad = n * c - T

    def chunks(x: Tensor) -> Tensor:  # [B, T, H, N] -> [B, H, n, c, N] in the compute dtype
        x = x.to(dt)
        if pad:
            x = F.pad(x, (0, 0, 0, 0, 0, pad))  # w = 0 (decay 1) and zero inputs: state unchanged
        return x.view(B, n, c, H, N).permute(0, 3, 1, 2, 4)

    with torch.autocast(r.device.type, enabled=False):  # autocast would run these matmuls in bf16
        r_, w_, k_, v_, a_, b_ = (chunks(x) for x in (r, w, k, v, a, b))
        G = w_.cumsum(dim=3)  # inclusive cumulative log decay inside each chunk
        Gx = G - w_  # exclusive
        Gm = G[:, :, :, c // 2: c // 2 + 1]  # midpoint reference, keeps every factor ≤ e^{c/2·max|w|}
        r_hat = r_ * (G - Gm).exp()
        a_hat = a_ * (Gx - Gm).exp()
        k_hat = k_ * (Gm - G).exp()
        b_hat = b_ * (Gm - G).exp()
        kT, bT = k_hat.transpose(-1, -2), b_hat.transpose(-1, -2)
        A_qk = (r_hat @ kT).tril()
        A_qb = (r_hat @ bT).tril()
        A_ak = (a_hat @ kT).tril(-1)
        A_ab = (a_hat @ bT).tril(-1)
        eye = torch.eye(c, dtype=dt, device=r.device)
        L = eye - A_ab  # unit lower triangular
        W_u = torch.linalg.solve_triangular(L, A_ak @ v_, upper=False, unitriangular=True)  # [.., c, V]
        W_w = torch.linalg.solve_triangular(L, a_ * Gx.exp(), upper=False, unitriangular=True)  # [.., c, K]
        P = A_qk @ v_ + A_qb @ W_u  # [.., c, V]
        Q = A_qb @ W_w + r_ * G.exp()  # [.., c, K]
        Gc = G[:, :, :, -1:]  # [.., 1, K]: total log decay of the chunk
        k_end = (k_ * (Gc - G).exp()).transpose(-1, -2)  # [.., K, c]
        b_end = (b_ * (Gc - G).exp()).transpose(-1, -2)
        M = torch.diag_embed(Gc.squeeze(-2).exp()) + b_end @ W_w  # [.., K, K]
        Z = k_end @ v_ + b_end @ W_u  # [.., K, V]
        h_prev = []
        for i in range(n):  # the only sequential part: one small matmul per chunk
            h_prev.append(h)
            h = M[:, :, i] @ h + Z[:, :, i]
        Y = P + Q @ torch.stack(h_prev, dim=2)  # [B, H, n, c, V]
        y = Y.permute(0, 2, 3, 1, 4).reshape(B, n * c, H, N)[:, :T]
    return y.to(r.dtype), h.transpose(-1, -2).contiguous()


def wkv7(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor | None = None,
         chunk_size: int = 16, impl: str = "auto") -> tuple[Tensor, Tensor]:
    """WKV-7 over a sequence. [B, T, H, N] ×6 (+ state [B, H, N, N]) -> (y [B, T, H, N], state [B, H, N, N]).

    impl: "ref" (step-by-step spec), "chunked" (PyTorch, any device), "triton" (CUDA, or the CPU
    under TRITON_INTERPRET=1), "auto" = triton on CUDA when triton imports, else chunked.
    chunk_size is the chunk of the PyTorch form and the checkpoint interval of the Triton kernel."""
    if impl == "auto":
        impl = "triton" if (r.is_cuda and TRITON_AVAILABLE) else "chunked"
    if impl == "ref":
        return wkv7_ref(r, w, k, v, a, b, state)
    if impl == "chunked":
        return wkv7_chunked(r, w, k, v, a, b, state, chunk_size)
    if impl == "triton":
        _check_shapes(r, (w, k, v, a, b), state)
        return wkv7_triton(r, w, k, v, a, b, state, chunk_size)
    raise ValueError(f"wkv7 impl must be one of {WKV7_IMPLS}, got {impl!r}")
