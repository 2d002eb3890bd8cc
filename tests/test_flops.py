"""bench/flops.py against torch.utils.flop_counter on real forward+backward passes of HybridGPT.

The flop counter is the independent reference: it sees every aten matmul the model runs and knows
nothing of our formulas. On the CPU it does not count the fused SDPA kernel, so a default-backend
pass measures the matmul terms alone; with SDPA forced to its math backend the score and value
products show up as bmm over the whole T×T matrix, which the causal/window mask then scales down.
"""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bench.flops import (
    device_peak_flops,
    flop_breakdown,
    gpu_table_peak,
    matmul_params_per_token,
    mean_keys_per_query,
    mfu,
    training_flops_per_token,
)
from hybrid.attention import causal_band_mask
from hybrid.config import ARCH_DEFAULTS, ModelConfig
from hybrid.layers import CastedLinear
from hybrid.model import HybridGPT

B, T = 2, 16


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared, oversubscribed CPU two OpenMP threads run ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY = dict(vocab_size=96, model_dim=64, num_heads=4, num_kv_heads=2)
CONFIGS = {
    # hybrid letters with BigramHash and value embeddings on
    "hybrid": dict(ARCH_DEFAULTS["hybrid"], **TINY, num_layers=4, layer_pattern="TWTF", attn_window=5,
                   bigram_buckets=32, bigram_dim=16, ve_dim=16),
    "gpt": dict(ARCH_DEFAULTS["gpt"], **TINY, num_layers=4, layer_pattern="FFFF"),
    # RWKV-7 blocks with channel-mix; the step-by-step WKV so that its products are visible matmuls
    "rwkv7": dict(ARCH_DEFAULTS["rwkv7"], **TINY, num_layers=3, layer_pattern="RRR", rwkv_head_size=32,
                  rwkv_impl="ref"),
    # every MoE branch: top-2 of 3 swiglu experts, shared expert with its gate, R and MoE-R layers
    "mixed_moe": dict(ARCH_DEFAULTS["moe"], **TINY, num_layers=4, layer_pattern="tRFr", rwkv_head_size=32,
                      rwkv_impl="ref", moe_num_experts=3, moe_top_k=2, moe_expert_hidden=24,
                      moe_shared_hidden=40, moe_shared_gate=True, moe_act="swiglu", moe_dispatch="loop"),
}


def _model(name: str) -> tuple[ModelConfig, HybridGPT]:
    cfg = ModelConfig(**CONFIGS[name])
    torch.manual_seed(0)
    return cfg, HybridGPT(cfg)


def _count(model: HybridGPT, vocab: int, backward: bool, math_sdpa: bool = False) -> dict:
    ids = torch.randint(0, vocab, (B, T + 1), generator=torch.Generator().manual_seed(1))
    counter = FlopCounterMode(display=False)
    ctx = sdpa_kernel(SDPBackend.MATH) if math_sdpa else torch.enable_grad()
    with ctx, counter:
        loss = model(ids[:, :-1], ids[:, 1:])
        if backward:
            loss.backward()
    return {mod: {str(op): n for op, n in ops.items()} for mod, ops in counter.get_flop_counts().items()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_training_matmul_flops_match_flop_counter(name):
    """Every linear (heads, projections, LoRAs, router, active experts) forward+backward = 3 × 2·Σ in·out
    per token, exactly (aten.mm). The step-by-step WKV shows its two matrix-vector products S·a and S·r
    (half the wkv term) as aten.bmm, less one backward product per R layer: at t = 0 S is the zero
    initial state, which needs no gradient, so S·a's backward computes only the gradient of a."""
    cfg, model = _model(name)
    counted = _count(model, cfg.vocab_size, backward=True)["Global"]
    assert set(counted) <= {"aten.mm", "aten.bmm"}, counted  # no SDPA or other op: the matmul-only premise
    b = flop_breakdown(cfg, T)
    assert counted["aten.mm"] == 3 * b.matmul * B * T
    first_step = 2 * cfg.rwkv_head_size * cfg.model_dim * B * len(cfg.rwkv_layer_ids)
    assert counted.get("aten.bmm", 0) == 3 * (b.wkv / 2) * B * T - first_step


@pytest.mark.parametrize("name", ["hybrid", "gpt"])
def test_attention_flops_match_flop_counter_with_the_mask(name):
    """Per attention layer the math-backend SDPA runs 4·B·C·T² forward FLOPs on the full matrix; the
    layer's share of the model count is that times the fraction of (query, key) pairs its mask keeps."""
    cfg, model = _model(name)
    counts = _count(model, cfg.vocab_size, backward=False, math_sdpa=True)
    total = 0.0
    for i, kind in enumerate(cfg.mixer_kinds):
        bmm = counts.get(f"HybridGPT.blocks.{i}.mixer", {}).get("aten.bmm", 0)
        if kind not in "WF":
            assert bmm == 0
            continue
        assert bmm == 4 * B * cfg.model_dim * T * T
        mask = causal_band_mask(T, cfg.attn_window if kind == "W" else None, "cpu")
        total += bmm * mask.sum().item() / (T * T)
    assert flop_breakdown(cfg, T).attention * B * T == pytest.approx(total, rel=1e-12)


@pytest.mark.parametrize("seq_len,window", [(16, None), (16, 1), (16, 5), (16, 16), (16, 40), (1, None)])
def test_mean_keys_per_query_counts_the_band_mask(seq_len, window):
    mask = causal_band_mask(seq_len, window, "cpu")
    assert mean_keys_per_query(seq_len, window) == mask.sum().item() / seq_len


def test_gpt_baseline_is_6n_plus_attention():
    """The naive baseline: training matmul FLOPs = 6 × its matrix parameters (tied head included), which
    is 6N to within the 20,552 control parameters; attention adds 3 × 4·C·(T+1)/2 per layer."""
    cfg = ModelConfig(**ARCH_DEFAULTS["gpt"])
    with torch.device("meta"):
        model = HybridGPT(cfg)
    n_total = sum(p.numel() for p in model.parameters())
    n_linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, CastedLinear))
    n_linear += model.tok_emb.weight.numel()  # the tied head
    assert n_total == 17_059_912
    assert matmul_params_per_token(cfg) == n_linear
    b = flop_breakdown(cfg, 1024)
    assert 3 * b.matmul == 6 * n_linear
    assert 3 * b.matmul == pytest.approx(6 * n_total, rel=2e-3)
    assert b.attention == 9 * 4 * 512 * 1025 / 2
    assert training_flops_per_token(cfg, 1024) == 6 * n_linear + 3 * b.attention


def test_moe_counts_active_experts_only():
    """Adding routed experts at fixed top_k leaves the per-token count unchanged except for the router."""
    base = dict(CONFIGS["mixed_moe"])
    few = flop_breakdown(ModelConfig(**dict(base, moe_num_experts=3)), T).matmul
    many = flop_breakdown(ModelConfig(**dict(base, moe_num_experts=9)), T).matmul
    moe_layers = sum(c.islower() for c in base["layer_pattern"])
    assert many - few == 2 * moe_layers * base["model_dim"] * 6


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.4e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989.4e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA GeForce RTX 4090", None),
])
def test_gpu_peak_table(name, peak):
    assert gpu_table_peak(name) == peak


def test_cpu_peak_is_measured_and_mfu_is_its_ratio():
    peak, how = device_peak_flops("cpu")
    assert peak > 1e8 and "measured" in how
    assert mfu(1e6, 2e3, peak) == pytest.approx(2e9 / peak)
