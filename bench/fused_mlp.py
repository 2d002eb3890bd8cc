"""Time the fused MLP up-projection (hybrid/kernels/fused_mlp.py) against its reference, forward +
backward, each compiled as training compiles it:

    python -m bench.fused_mlp --m 98304 --k 512 --n 1536     # the default model's MLP on one GPU's micro-batch

A ratio (ref/fused) above 1 means MLP_FUSED=auto pays; docs/PERF.md records the measurements. The
preflight's fused_mlp section calls `bench_fused_mlp` at the model's shape.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from hybrid.kernels.fused_mlp import mlp_up_act, mlp_up_act_ref


def bench_fused_mlp(M: int, K: int, N: int, device: str | torch.device = "cuda", slope: float = 0.5,
                    dtype: torch.dtype = torch.bfloat16, iters: int = 50, warmup: int = 10,
                    compile: bool = True) -> dict[str, float]:
    """ms per forward+backward of the MLP proj(act(x·W_fcᵀ)²), x [M, K], W_fc [N, K], W_proj [K, N],
    with the fused up-projection vs the reference, each torch.compile'd (fullgraph) unless compile=False.
    Returns {"fused_ms", "ref_ms", "ratio" (ref/fused, > 1 = fused faster), "max_abs_diff" (of the
    outputs)} and prints one line. On CPU the fused path needs TRITON_INTERPRET=1 (smoke test only)."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    x = rand(M, K).requires_grad_()
    w_fc = rand(N, K, scale=K ** -0.5).requires_grad_()
    w_proj = rand(K, N, scale=N ** -0.5).requires_grad_()
    gy = rand(M, K)

    def make(up):
        def forward(x, w_fc, w_proj):
            return F.linear(up(x, w_fc, slope), w_proj)

        fwd = torch.compile(forward, fullgraph=True, dynamic=False) if compile else forward

        def step(x, w_fc, w_proj):  # the backward runs AOTAutograd's compiled graph, as in training
            y = fwd(x, w_fc, w_proj)
            return (y, *torch.autograd.grad(y, (x, w_fc, w_proj), gy))
        return step

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def time_ms(fn):
        for _ in range(warmup):
            out = fn(x, w_fc, w_proj)
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn(x, w_fc, w_proj)
        sync()
        return (time.perf_counter() - t0) * 1e3 / iters, out[0]

    fused_ms, y_fused = time_ms(make(mlp_up_act))
    ref_ms, y_ref = time_ms(make(mlp_up_act_ref))
    res = {"fused_ms": fused_ms, "ref_ms": ref_ms, "ratio": ref_ms / fused_ms,
           "max_abs_diff": float((y_fused.detach().float() - y_ref.detach().float()).abs().max())}
    print(f"fused MLP M={M} K={K} N={N} {dtype}: fused {fused_ms:.3f} ms, ref {ref_ms:.3f} ms, "
          f"ratio {res['ratio']:.3f}, max|Δy| {res['max_abs_diff']:.3g}")
    return res



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=98304, help="rows (tokens of one micro-batch)")
    ap.add_argument("--k", type=int, default=512, help="model width")
    ap.add_argument("--n", type=int, default=1536, help="MLP hidden width")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--iters", type=int, default=50)
    a = ap.parse_args(argv)
    bench_fused_mlp(a.m, a.k, a.n, a.device, iters=a.iters)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
