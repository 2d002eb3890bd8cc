"""The MLP up-projection with its activation fused into the matmul epilogue (golf PR #1105).

    pre = x·W_fcᵀ      h = act(pre)²      act = leaky_relu(·, slope): slope 0.5 (leaky_relu2) or 0 (relu2)

Forward: one Triton kernel tiles pre over (BLOCK_M × BLOCK_N) with an fp32 accumulator and, instead of
storing pre, stores h and the derivative factor dact = ∂h/∂pre = 2·pre (pre > 0), 2·slope²·pre (else),
both in the input dtype. Saving dact rather than pre costs the same bytes and turns the backward's
elementwise step into a single multiply.
Backward (plain torch ops in the op's registered autograd formula, so AOTAutograd traces them and
Inductor fuses the multiply; the matmuls go to cuBLAS):
    dpre = dh ⊙ dact      dx = dpre·W_fc      dW_fc = dpreᵀ·x
The proj linear stays outside, a torch matmul like every other layer.

Compared with the unfused MLP this saves one full pass over the [M, N] hidden tensor in the forward
(the matmul no longer writes pre for a separate activation kernel to read back).

The kernel is a `torch.library.custom_op` ("hybrid::mlp_up_act", with a fake kernel and an autograd
formula), so torch.compile(fullgraph=True) keeps it as one opaque node without a graph break and still
compiles everything around it; wrapping the whole MLP in an autograd.Function instead hides the rest
from Inductor (2.7× slower in golf PR #1105; docs/TECHNIQUES.md, "Fused MLP kernel"). The op takes
already-cast tensors: `mlp_up_act_linear` does what `CastedLinear` would (QAT fake-quant of the fp32
master weight, cast to the autocast dtype) first.

Dispatch (`MLP(fused=...)`): "auto" = the kernel on CUDA with triton and a bf16/fp16 compute dtype,
else the reference (today's MLP code, bit for bit); "triton" forces the kernel (CUDA, or CPU tensors
under TRITON_INTERPRET=1, which the tests use); "off" / "ref" force the reference.

Untimed: no GPU has run this file yet. Run bench/fused_mlp.py `bench_fused_mlp` (and tests/test_fused_mlp.py's CUDA tests)
on an H100 before leaving "auto" on; the kernel uses plain pointer loads (no TMA) and the autotune list
below is a guess.

Importable without triton: FUSED_MLP_TRITON is False and the op raises.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # Triton is optional: CPU machines use the reference.
    import triton
    import triton.language as tl

    FUSED_MLP_TRITON = True
except ImportError:  # pragma: no cover - depends on the machine
    triton = None
    tl = None
    FUSED_MLP_TRITON = False

FUSED_MLP_MODES = ("auto", "triton", "off", "ref")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # triton reads it at import, so do we


if FUSED_MLP_TRITON:

    @triton.jit
    def _up_act_kernel(x_ptr, w_ptr, h_ptr, d_ptr, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
                       SLOPE: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr):
        """One (BLOCK_M, BLOCK_N) tile of h = act(x·Wᵀ)² and dact, x [M, K], W [N, K], outputs [M, N]
        contiguous. Tiles run in groups of GROUP_M row blocks per column block, so a group reuses the
        same W columns from L2."""
        pid = tl.program_id(0)
        n_m = tl.cdiv(M, BLOCK_M)
        n_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * n_n
        first_m = (pid // per_group) * GROUP_M
        rows = min(n_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % rows
        pid_n = (pid % per_group) // rows

        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        # Out-of-range rows/columns wrap around: the loads stay in bounds unmasked, the stores are masked.
        x_ptrs = x_ptr + (rm % M).to(tl.int64)[:, None] * stride_xm + rk[None, :] * stride_xk
        w_ptrs = w_ptr + (rn % N).to(tl.int64)[None, :] * stride_wn + rk[:, None] * stride_wk  # Wᵀ tile [BK, BN]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(x_ptrs)
                b = tl.load(w_ptrs)
            else:
                a = tl.load(x_ptrs, mask=rk[None, :] < K - k0, other=0.0)
                b = tl.load(w_ptrs, mask=rk[:, None] < K - k0, other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk

        pos = acc > 0
        act = tl.where(pos, acc, SLOPE * acc)
        dact = tl.where(pos, 2.0 * acc, (2.0 * SLOPE * SLOPE) * acc)
        out = rm.to(tl.int64)[:, None] * N + rn[None, :]
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(h_ptr + out, (act * act).to(h_ptr.dtype.element_ty), mask=mask)
        tl.store(d_ptr + out, dact.to(d_ptr.dtype.element_ty), mask=mask)

    def _config(bm: int, bn: int, bk: int, stages: int, warps: int) -> triton.Config:
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                             num_stages=stages, num_warps=warps)

    # Hopper bf16 tiles for K = model_dim (512) and N = hidden (896..2048); untimed until run on a GPU.
    _GPU_CONFIGS = [
        _config(128, 128, 64, 4, 4),
        _config(128, 128, 64, 3, 8),
        _config(128, 256, 64, 3, 8),
        _config(256, 128, 64, 3, 8),
        _config(128, 64, 64, 4, 4),
        _config(64, 128, 64, 4, 4),
        _config(128, 128, 128, 3, 8),
    ]
    _INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}  # tl.dot's minimum

    _even_k = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
    if INTERPRET:  # one fixed tiny config: autotuning under the interpreter would run every config
        _up_act_launch = _even_k(_up_act_kernel)
    else:
        _up_act_launch = triton.autotune(_GPU_CONFIGS, key=["M", "N", "K"])(_even_k(_up_act_kernel))


@torch.library.custom_op("hybrid::mlp_up_act", mutates_args=())
def mlp_up_act_op(x: Tensor, w: Tensor, slope: float) -> tuple[Tensor, Tensor]:
    """x [M, K], w [N, K], same float dtype -> (h, dact), both [M, N] contiguous in x's dtype."""
    if not FUSED_MLP_TRITON:
        raise RuntimeError("the fused MLP kernel needs the triton package (pip install triton)")
    M, K = x.shape
    N = w.size(0)
    h = torch.empty(M, N, device=x.device, dtype=x.dtype)
    dact = torch.empty(M, N, device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return h, dact
    meta = {"SLOPE": slope, "PRECISION": "ieee" if x.dtype == torch.float32 else "tf32"}
    if INTERPRET:
        meta.update(_INTERPRET_CONFIG)

    def grid(cfg):
        return (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)

    _up_act_launch[grid](x, w, h, dact, M, N, K, x.stride(0), x.stride(1), w.stride(0), w.stride(1), **meta)
    return h, dact


@mlp_up_act_op.register_fake
def _mlp_up_act_fake(x: Tensor, w: Tensor, slope: float) -> tuple[Tensor, Tensor]:
    torch._check(x.dim() == 2 and w.dim() == 2, lambda: "mlp_up_act wants x [M, K] and w [N, K]")
    torch._check(x.size(1) == w.size(1), lambda: f"K mismatch: x {tuple(x.shape)}, w {tuple(w.shape)}")
    torch._check(x.dtype == w.dtype, lambda: f"dtype mismatch: x {x.dtype}, w {w.dtype}")
    return x.new_empty(x.size(0), w.size(0)), x.new_empty(x.size(0), w.size(0))


def _setup_context(ctx, inputs, output) -> None:
    x, w, _ = inputs
    _, dact = output
    ctx.mark_non_differentiable(dact)
    ctx.save_for_backward(x, w, dact)


def _backward(ctx, dh: Tensor, _ddact: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
    x, w, dact = ctx.saved_tensors
    dpre = dh * dact
    dx = dpre @ w if ctx.needs_input_grad[0] else None
    dw = dpre.t() @ x if ctx.needs_input_grad[1] else None
    return dx, dw, None


mlp_up_act_op.register_autograd(_backward, setup_context=_setup_context)


def mlp_up_act(x: Tensor, w: Tensor, slope: float) -> Tensor:
    """Fused act(x·wᵀ)², x [..., K], w [N, K] (same dtype) -> [..., N]."""
    h, _ = mlp_up_act_op(x.reshape(-1, x.size(-1)), w, slope)
    return h.reshape(*x.shape[:-1], w.size(0))


def mlp_up_act_ref(x: Tensor, w: Tensor, slope: float) -> Tensor:
    """Reference act(x·wᵀ)², same contract; the ops of the unfused MLP forward."""
    pre = F.linear(x, w)
    return (F.leaky_relu(pre, slope) if slope else torch.relu(pre)).square()


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype F.linear would compute in: the autocast dtype for a float32/16 input when autocast is on."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def use_fused_mlp(mode: str, x: Tensor) -> bool:
    """Whether `MLP(fused=mode)` takes the Triton path for input x (decided at trace time)."""
    if mode in ("off", "ref"):
        return False
    if mode == "auto":
        return x.is_cuda and FUSED_MLP_TRITON and compute_dtype(x) in (torch.bfloat16, torch.float16)
    if mode != "triton":
        raise ValueError(f"fused must be one of {FUSED_MLP_MODES}, got {mode!r}")
    if not FUSED_MLP_TRITON:
        raise RuntimeError("MLP fused='triton' needs the triton package (pip install triton)")
    if not (x.is_cuda or INTERPRET):
        raise RuntimeError("MLP fused='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests)")
    return True


def mlp_up_act_linear(fc, x: Tensor, slope: float) -> Tensor:
    """act(fc(x))² through the fused op, fc a CastedLinear without bias: its weight goes through QAT
    fake-quant (if fc.qat_bits > 0) and is cast to the compute dtype, as CastedLinear.forward does."""
    dtype = compute_dtype(x)
    return mlp_up_act(x.to(dtype), fc.casted_weight(dtype), slope)
