"""Triton kernels for the WKV-7 recurrence (forward and backward), one program per (batch, head).

Same math and layouts as hybrid/kernels/wkv7.py: inputs [B, T, H, N] (N a power of two, ≤ 128), w the log
decay, state [B, H, N, N] with S[i, j] = (value i, key j), fp32 state and arithmetic whatever the
input dtype. The design follows BlinkDL's training kernel (RWKV-LM `RWKV-v7/train_temp/cuda/rwkv7_clampw.cu`):
a program keeps its head's N×N state in registers and walks the sequence, which gives B·H programs
(≈ 384 for a golf batch on one GPU, enough to fill an H100).

Forward, per step:  sa = S a;  S = S·diag(e^w) + sa bᵀ + v kᵀ;  y = S r.  The program stores the
state entering every CH-step chunk ("checkpoints", [B·H, ⌈T/CH⌉, N, N] fp32) for the backward.

Backward, chunk by chunk from the end, with dS = ∂L/∂S_t carried backwards:
  1. recompute the chunk's CH states from its checkpoint into a per-program scratch buffer
     ([CH+1, N, N]; slot 0 = state entering the chunk) — exact, unlike the reference's
     "backstepping" S_{t−1} = (S_t − sa bᵀ − v kᵀ)/d, whose error grows by up to 1/d ≤ 1.83 per step;
  2. walk the chunk backwards. With D = dS + dy rᵀ (gradient on S_t, including y_t = S_t r_t):
        dr = S_tᵀ dy      dv = D k      dk = Dᵀ v      db = Dᵀ sa     dsa = D b
        dw = e^w ⊙ colsum(D ⊙ S_{t−1})     da = S_{t−1}ᵀ dsa     dS ← D·diag(e^w) + dsa aᵀ
A ragged tail (T not a multiple of CH) is masked: padded steps load w = 0 and zero vectors, which
leaves the state unchanged and produces zero gradients. Gradients are accumulated in fp32 and cast
to the input dtypes.

Importable without triton: TRITON_AVAILABLE is False and `wkv7_triton` raises. On a CPU machine the
kernels run under the Triton interpreter when TRITON_INTERPRET=1 is set before triton is imported
(tests/test_rwkv7.py does that in a subprocess).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:  # Triton is optional: CPU machines use the chunked PyTorch form.
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the machine
    triton = None
    tl = None
    TRITON_AVAILABLE = False


if TRITON_AVAILABLE:

    @triton.jit
    def _wkv7_state_step(S, wt, kt, vt, at, bt):
        """One WKV-7 update of the [N values, N keys] state: S·diag(e^w) + (S·a) bᵀ + v kᵀ. Shared by the
        forward pass and the backward pass's recomputation, so both follow the same arithmetic."""
        sa = tl.sum(S * at[None, :], axis=1)  # [N] over values
        return S * tl.exp(wt)[None, :] + sa[:, None] * bt[None, :] + vt[:, None] * kt[None, :]

    @triton.jit
    def _wkv7_fwd_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, s0_ptr, y_ptr, sT_ptr, ck_ptr, T,
                         H: tl.constexpr, N: tl.constexpr, CH: tl.constexpr, HAS_S0: tl.constexpr):
        bh = tl.program_id(0).to(tl.int64)
        bi = bh // H
        hi = bh % H
        n_chunks = tl.cdiv(T, CH)
        idx = tl.arange(0, N)
        mat = idx[:, None] * N + idx[None, :]  # [N, N] offsets, row = value i, column = key j
        if HAS_S0:
            S = tl.load(s0_ptr + bh * N * N + mat).to(tl.float32)
        else:
            S = tl.zeros([N, N], dtype=tl.float32)
        for c in range(n_chunks):
            tl.store(ck_ptr + (bh * n_chunks + c) * N * N + mat, S)
            for tt in range(CH):
                t = c * CH + tt
                m = t * N + idx < T * N  # all lanes of step t, or none past the end
                off = ((bi * T + t) * H + hi) * N + idx
                rt = tl.load(r_ptr + off, mask=m, other=0.0).to(tl.float32)
                wt = tl.load(w_ptr + off, mask=m, other=0.0).to(tl.float32)
                kt = tl.load(k_ptr + off, mask=m, other=0.0).to(tl.float32)
                vt = tl.load(v_ptr + off, mask=m, other=0.0).to(tl.float32)
                at = tl.load(a_ptr + off, mask=m, other=0.0).to(tl.float32)
                bt = tl.load(b_ptr + off, mask=m, other=0.0).to(tl.float32)
                S = _wkv7_state_step(S, wt, kt, vt, at, bt)
                yt = tl.sum(S * rt[None, :], axis=1)
                tl.store(y_ptr + off, yt, mask=m)
        tl.store(sT_ptr + bh * N * N + mat, S)

    @triton.jit
    def _wkv7_bwd_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, dy_ptr, dsT_ptr, ck_ptr, sc_ptr,
                         dr_ptr, dw_ptr, dk_ptr, dv_ptr, da_ptr, db_ptr, ds0_ptr, T,
                         H: tl.constexpr, N: tl.constexpr, CH: tl.constexpr):
        bh = tl.program_id(0).to(tl.int64)
        bi = bh // H
        hi = bh % H
        n_chunks = tl.cdiv(T, CH)
        idx = tl.arange(0, N)
        mat = idx[:, None] * N + idx[None, :]
        sc = sc_ptr + bh * (CH + 1) * N * N  # this program's scratch: CH + 1 states
        dS = tl.load(dsT_ptr + bh * N * N + mat).to(tl.float32)
        for cc in range(n_chunks):
            c = n_chunks - 1 - cc
            # 1. recompute the chunk's states from its checkpoint (slot tt + 1 = state after step tt)
            S = tl.load(ck_ptr + (bh * n_chunks + c) * N * N + mat)
            tl.store(sc + mat, S)
            for tt in range(CH):
                t = c * CH + tt
                m = t * N + idx < T * N  # all lanes of step t, or none past the end
                off = ((bi * T + t) * H + hi) * N + idx
                wt = tl.load(w_ptr + off, mask=m, other=0.0).to(tl.float32)
                kt = tl.load(k_ptr + off, mask=m, other=0.0).to(tl.float32)
                vt = tl.load(v_ptr + off, mask=m, other=0.0).to(tl.float32)
                at = tl.load(a_ptr + off, mask=m, other=0.0).to(tl.float32)
                bt = tl.load(b_ptr + off, mask=m, other=0.0).to(tl.float32)
                S = _wkv7_state_step(S, wt, kt, vt, at, bt)
                tl.store(sc + (tt + 1) * N * N + mat, S)
            tl.debug_barrier()  # the walk below reads states other threads may have written
            # 2. walk the chunk backwards
            for tb in range(CH):
                tt = CH - 1 - tb
                t = c * CH + tt
                m = t * N + idx < T * N  # all lanes of step t, or none past the end
                off = ((bi * T + t) * H + hi) * N + idx
                rt = tl.load(r_ptr + off, mask=m, other=0.0).to(tl.float32)
                wt = tl.load(w_ptr + off, mask=m, other=0.0).to(tl.float32)
                kt = tl.load(k_ptr + off, mask=m, other=0.0).to(tl.float32)
                vt = tl.load(v_ptr + off, mask=m, other=0.0).to(tl.float32)
                at = tl.load(a_ptr + off, mask=m, other=0.0).to(tl.float32)
                bt = tl.load(b_ptr + off, mask=m, other=0.0).to(tl.float32)
                dyt = tl.load(dy_ptr + off, mask=m, other=0.0).to(tl.float32)
                S_prev = tl.load(sc + tt * N * N + mat)
                S_t = tl.load(sc + (tt + 1) * N * N + mat)
                dt = tl.exp(wt)
                D = dS + dyt[:, None] * rt[None, :]
                sa = tl.sum(S_prev * at[None, :], axis=1)
                dsa = tl.sum(D * bt[None, :], axis=1)
                tl.store(dr_ptr + off, tl.sum(S_t * dyt[:, None], axis=0), mask=m)
                tl.store(dv_ptr + off, tl.sum(D * kt[None, :], axis=1), mask=m)
                tl.store(dk_ptr + off, tl.sum(D * vt[:, None], axis=0), mask=m)
                tl.store(db_ptr + off, tl.sum(D * sa[:, None], axis=0), mask=m)
                tl.store(dw_ptr + off, tl.sum(D * S_prev, axis=0) * dt, mask=m)
                tl.store(da_ptr + off, tl.sum(S_prev * dsa[:, None], axis=0), mask=m)
                dS = D * dt[None, :] + dsa[:, None] * at[None, :]
            tl.debug_barrier()  # the next chunk overwrites the scratch
        tl.store(ds0_ptr + bh * N * N + mat, dS)


def _num_warps(N: int) -> int:
    return 8 if N >= 64 else 4


class WKV7TritonFunction(torch.autograd.Function):
    """autograd wrapper: forward(r, w, k, v, a, b, state_or_None, chunk) -> (y, final_state)."""

    @staticmethod
    def forward(ctx, r, w, k, v, a, b, state, chunk):
        B, T, H, N = r.shape
        ins = [x.contiguous() for x in (r, w, k, v, a, b)]
        f32 = {"device": r.device, "dtype": torch.float32}
        y = torch.empty(B, T, H, N, **f32)
        s_final = torch.empty(B, H, N, N, **f32)
        n_chunks = -(-T // chunk)
        ck = torch.empty(B * H, max(n_chunks, 1), N, N, **f32)
        s0 = state.contiguous().float() if state is not None else s_final  # dummy when absent
        _wkv7_fwd_kernel[(B * H,)](*ins, s0, y, s_final, ck, T, H=H, N=N, CH=chunk,
                                   HAS_S0=state is not None, num_warps=_num_warps(N))
        ctx.save_for_backward(*ins, ck)
        ctx.chunk = chunk
        ctx.state_dtype = state.dtype if state is not None else None
        return y.to(r.dtype), s_final

    @staticmethod
    def backward(ctx, dy, ds_final):
        *ins, ck = ctx.saved_tensors
        r = ins[0]
        B, T, H, N = r.shape
        chunk = ctx.chunk
        f32 = {"device": r.device, "dtype": torch.float32}
        dy = torch.zeros(B, T, H, N, **f32) if dy is None else dy.float().contiguous()
        ds_final = torch.zeros(B, H, N, N, **f32) if ds_final is None else ds_final.float().contiguous()
        grads = [torch.empty(B, T, H, N, **f32) for _ in range(6)]
        ds0 = torch.empty(B, H, N, N, **f32)
        scratch = torch.empty(B * H, chunk + 1, N, N, **f32)
        _wkv7_bwd_kernel[(B * H,)](*ins, dy, ds_final, ck, scratch, *grads, ds0, T, H=H, N=N, CH=chunk,
                                   num_warps=_num_warps(N))
        grads = [g.to(x.dtype) for g, x in zip(grads, ins)]
        ds0 = ds0.to(ctx.state_dtype) if ctx.state_dtype is not None else None
        return (*grads, ds0, None)


def wkv7_triton(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
                state: Tensor | None = None, chunk_size: int = 16) -> tuple[Tensor, Tensor]:
    """[B, T, H, N] ×6 (+ state [B, H, N, N]) -> (y [B, T, H, N] in r's dtype, final state fp32)."""
    if not TRITON_AVAILABLE:
        raise RuntimeError("wkv7 impl='triton' needs the triton package (pip install triton)")
    N = r.size(-1)
    if N & (N - 1) or not 4 <= N <= 128:
        raise ValueError(f"the Triton WKV-7 kernel needs a power-of-two head size in [4, 128], got {N}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return WKV7TritonFunction.apply(r, w, k, v, a, b, state, chunk_size)
