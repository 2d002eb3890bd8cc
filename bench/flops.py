"""Model FLOPs of a training step, counted from a ModelConfig, and the device's peak: the two halves of MFU.

    MFU = training_flops_per_token(cfg, T) · tokens_per_second / device_peak_flops(device)

What is counted ("model FLOPs", the PaLM convention): the multiply-adds the architecture needs, one
multiply-add = 2 FLOPs, with nothing for element-wise work (norms, activations, RoPE, softcap,
softmax, gates, XSA), nothing for recomputation, and nothing for the work a kernel does and then
throws away (the masked half of a causal score matrix). Per token and per layer, forward:

  matmul    2·(in·out) for every linear layer a token passes through:
              T  token shift            w_r, w_k, w_v                      3·C²
              W/F attention             c_q, proj: 2·C²;  c_k, c_v: 2·C·kv_dim
              R  RWKV-7 time-mix        receptance, key, value, output: 4·C²; LoRAs 2·C·d for
                                        d = w, a, g ranks, + v rank in every R layer but the first
              FFN (upper case)          MLP fc + proj (or RWKV-7 channel-mix key + value): 2·C·hidden
              FFN (lower case, MoE)     router C·E + top_k routed experts + the fused shared expert
                                        (+ its gate C·1): only the experts a token runs (active)
            once per token: the LM head C·V (tied, still a matmul), BigramHash proj bigram_dim·C,
            value-embedding proj ve_dim·kv_dim; the embedding lookups themselves are free.
  attention 4·C·T_eff per W/F layer: the scores q·kᵀ and the weighted sum p·v are each 2·D FLOPs per
            (query, key) pair and head, H·D = C. T_eff is the mean number of keys a query sees:
            (T+1)/2 for full causal attention, mean_t min(t+1, w) for a window of w (the query and
            the w−1 before it, hybrid/attention.py). GQA does not reduce it.
  wkv       8·N·C per R layer (N = rwkv_head_size, H = C/N heads): per head and token the recurrence
            S_t = S_{t-1}·diag(d) + (S_{t-1}a)bᵀ + v kᵀ,  y = S_t r  (RWKV-7, arXiv:2503.14456) does two
            matrix-vector products (S·a, S·r) and two rank-1 updates, 2·N² each. The decay product
            is element-wise (not counted). The chunked PyTorch form does more work than this; the
            model count is the recurrence's.

Training = 3 × forward: the backward of each product costs two products of the same size (the
gradient of the input and of the weight, or of both operands). tests/test_flops.py checks the
matmul and attention terms against torch.utils.flop_counter on real forward+backward passes.

Peaks: dense bf16 tensor-core FLOP/s from NVIDIA's datasheets (the sparse figure halved), looked up
by torch.cuda.get_device_name; an unlisted GPU, and the CPU, are *measured* instead, by timing a
large matmul (bf16 on a GPU, fp32 on the CPU, the precision the bench trains in there). A measured
peak is what the device achieved on one GEMM, so the MFU against it is an upper bound of the
datasheet MFU.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

from hybrid.config import ModelConfig

# Dense bf16 peak FLOP/s, most specific name first (get_device_name gives e.g. "NVIDIA H100 80GB HBM3").
GPU_BF16_PEAKS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("GH200", 989.4e12),
    ("H200", 989.4e12),
    ("H100", 989.4e12),  # SXM
    ("A100", 312e12),
)


@dataclass(frozen=True)
class FlopBreakdown:
    """Forward FLOPs per token by term (see the module docstring); training is 3 × forward."""

    matmul: float
    attention: float
    wkv: float

    @property
    def forward(self) -> float:
        return self.matmul + self.attention + self.wkv

    @property
    def training(self) -> float:
        return 3.0 * self.forward


def mean_keys_per_query(seq_len: int, window: int | None) -> float:
    """T_eff: Σ_t min(t+1, w) / T over the T query positions (w = T for full causal attention)."""
    w = seq_len if window is None else min(window, seq_len)
    # positions 0..w-1 see t+1 keys, the remaining T-w see w
    pairs = w * (w + 1) // 2 + (seq_len - w) * w
    return pairs / seq_len


def _ffn_params(cfg: ModelConfig, letter: str) -> int:
    """Weights a token multiplies by in a layer's FFN (active experts only for MoE)."""
    C = cfg.model_dim
    if letter.isupper():  # the MLP and RWKV-7's channel-mix are both C -> hidden -> C
        return 2 * C * cfg.mlp_hidden
    up = 2 if cfg.moe_act == "swiglu" else 1  # swiglu's fc holds gate and up rows
    expert = C * up * cfg.moe_expert_hidden + cfg.moe_expert_hidden * C
    shared_hidden = cfg.moe_shared_experts * cfg.moe_shared_hidden
    shared = C * up * shared_hidden + shared_hidden * C
    gate = C if cfg.moe_shared_experts > 0 and cfg.moe_shared_gate else 0
    return C * cfg.moe_num_experts + cfg.moe_top_k * expert + shared + gate


def _mixer_params(cfg: ModelConfig, kind: str, first_rwkv: bool) -> int:
    """Weights a token multiplies by in a layer's sequence mixer."""
    C = cfg.model_dim
    if kind == "T":
        return 3 * C * C
    if kind in "WF":
        return 2 * C * C + 2 * C * cfg.kv_dim
    from hybrid.rwkv7 import rwkv7_lora_dims  # only R configs load the RWKV-7 module

    d = rwkv7_lora_dims(C)
    lora = d["w"] + d["a"] + d["g"] + (0 if first_rwkv else d["v"])
    return 4 * C * C + 2 * C * lora


def matmul_params_per_token(cfg: ModelConfig) -> int:
    """Σ in·out over every linear a token passes through (active experts only): forward matmul FLOPs / 2."""
    C = cfg.model_dim
    first_r = cfg.rwkv_layer_ids[0] if cfg.rwkv_layer_ids else -1
    n = C * cfg.vocab_size  # the tied LM head
    if cfg.bigram_buckets > 0:
        n += cfg.bigram_dim * C
    if cfg.ve_layer_ids:
        n += cfg.ve_dim * cfg.kv_dim
    for i, letter in enumerate(cfg.layer_kinds):
        n += _mixer_params(cfg, letter.upper(), i == first_r) + _ffn_params(cfg, letter)
    return n


def flop_breakdown(cfg: ModelConfig, seq_len: int) -> FlopBreakdown:
    """Forward FLOPs per token of `cfg` on sequences of `seq_len` tokens, by term."""
    C = cfg.model_dim
    attention = 0.0
    wkv = 0.0
    for kind in cfg.mixer_kinds:
        if kind in "WF":
            window = cfg.attn_window if kind == "W" else None
            attention += 4.0 * C * mean_keys_per_query(seq_len, window)
        elif kind == "R":
            wkv += 8.0 * cfg.rwkv_head_size * C
    return FlopBreakdown(matmul=2.0 * matmul_params_per_token(cfg), attention=attention, wkv=wkv)


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward model FLOPs per trained token (3 × forward)."""
    return flop_breakdown(cfg, seq_len).training


# ---- device peak ----------------------------------------------------------------------------------

def gpu_table_peak(name: str) -> float | None:
    """Datasheet dense bf16 FLOP/s for a CUDA device name, or None when the table has no entry."""
    for key, peak in GPU_BF16_PEAKS:
        if key.lower() in name.lower():
            return peak
    return None


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 1024, reps: int = 5) -> float:
    """Best FLOP/s of `reps` timed n×n @ n×n matmuls (after one warm-up), 2·n³ FLOPs each."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for i in range(reps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i > 0:  # the first call pays for allocation and kernel selection
            best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


@functools.cache
def _device_peak(device_type: str, index: int | None) -> tuple[float, str]:
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_table_peak(name)
        if peak is not None:
            return peak, f"{name}: datasheet dense bf16 {peak / 1e12:.1f} TFLOP/s"
        peak = measure_matmul_flops(device, torch.bfloat16, n=8192, reps=10)
        return peak, f"{name}: not in the table, measured bf16 8192^3 matmul {peak / 1e12:.1f} TFLOP/s"
    peak = measure_matmul_flops(device, torch.float32)
    return peak, (f"cpu ({torch.get_num_threads()} threads): measured fp32 1024^3 matmul "
                  f"{peak / 1e9:.1f} GFLOP/s")


def device_peak_flops(device: torch.device | str) -> tuple[float, str]:
    """(peak FLOP/s, how it was obtained) for `device`; measured once per device per process."""
    device = torch.device(device)
    index = device.index if device.type == "cuda" and device.index is not None else (
        torch.cuda.current_device() if device.type == "cuda" else None)
    return _device_peak(device.type, index)


def mfu(flops_per_token: float, tokens_per_second: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak."""
    return flops_per_token * tokens_per_second / peak_flops
