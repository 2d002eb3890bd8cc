"""Estimated 8×H100 step time of a model config, from first principles (no GPU has timed this project yet).

    python -m bench.h100_time                                     # default hybrid, seq 2048, 786,432 tokens, 8 GPUs
    python -m bench.h100_time --vs "LAYER_PATTERN=FFFFFFFFFFFF" --vs "ARCH=gpt"
    python -m bench.h100_time --arch gpt --seq-len 1024 --tokens 524288      # the baseline's own batch

AN ESTIMATE, to be replaced by measured GPU step times (docs/PERF.md). Its use is to compare
architectures at equal estimated H100 time (bench/ab.py --equal-time), so what matters most is that
every kind of work is counted the same way for every config; the absolute ms carry the error of the
assumed efficiencies below.

Config: built as train_gpt.py builds it (`resolve_hyperparameters`, then `Hyperparameters.model_config`),
so every flag and setting is honoured. The model is then built on the meta device and its modules are
walked, so the matmul shapes are the code's own; per kind of layer the attention term comes from the
attention module's heads and window.

Counted per trained token, forward + backward, on one rank (tokens per rank = tokens/step ÷ world):
  matmul     2·in·out per nn.Linear/CastedLinear a token passes through (MoE routed experts weighted
             top_k/E), the tied LM head (vocab × C) and RWKV-7's LoRA factors; ×3 for fwd+bwd (the
             backward computes the input gradient and the weight gradient, one product each).
  attention  4·H·D FLOPs per computed (query, key) pair (scores and the weighted sum of values);
             ×(1 + 2.5) for fwd+bwd (the flash backward recomputes the scores: 5 products vs 2).
             Computed pairs follow the kernels' tiling (`attention_pairs`, tiles of ATTN_BLOCK = 128):
             a tile holding any allowed pair is computed in full and tiles with none are skipped. F
             layers (and W layers whose window covers the sequence) take SDPA's causal flash kernel,
             ~T/2 keys per query; W layers take flex_attention with a sliding-window BlockMask
             (hybrid/attention.py), whose default block size is 128: a window of 128 costs 2 tiles of
             128 keys per query tile, i.e. ~256 keys per query, not 128.
  wkv        R layers: bench.flops' 8·N·C recurrence FLOPs, ×3.
  memory     bytes moved through HBM by the memory-bound kernels (the matmul and attention kernels'
             own traffic is inside their efficiencies; their inputs and outputs are counted here):
             every linear reads its input and writes its output (bf16); per block two fused
             residual + RMS-norm kernels on the fp32 residual stream (read x, x0 and the previous
             branch output, write x and the bf16 normed input: 3·4 + 2·2 bytes per channel; read x
             and the mixer output, write x and the normed input: 2·4 + 2·2); elementwise passes per
             mixer and FFN from ELEMENTWISE_PASSES (one pass = read or write of one bf16 value per
             channel); attention: q/k norm + RoPE, the attention kernel's q, k, v in and y out, XSA and
             value embeddings from the layer's shapes. Backward moves BYTES_BWD_FACTOR = 2 × the
             forward bytes (it reads each saved input and the output gradient, and writes the input
             gradient). Embedding and head: the fp32 table lookups, BigramHash, value embeddings, the
             final norm, and the bf16 logits written by the head and read by the softcap + CE kernel.
Counted per step, on each rank:
  optimizer  Muon's Newton–Schulz on the rank's share of each same-shape bank (ceil(n / world)
             matrices; per iteration X·Xᵀ, A·A and B·X: 4·m²·M + 2·m³ FLOPs for an m × M matrix,
             m ≤ M), plus the fp32 bytes of the momentum, the update of every matrix on every rank,
             fused AdamW on the rest, gradient clipping and the EMA (OPT_BYTES_PER_PARAM).
  comm       DDP's ring all-reduce of the fp32 gradients, 2·(W−1)/W × 4·params bytes per rank, and
             Muon's all-gather of the bf16 updates, (W−1)/W × 2·bank bytes; added in full although
             DDP overlaps it with the backward (an upper bound; it is well under 1 ms here).

Time = Σ work / (rate × achieved fraction), every term added: kernels of one CUDA stream run one after
the other. Not modelled: kernel-launch and Python overhead, data loading, the compile warm-up,
validation. Assumptions are the named constants below; each says where its figure comes from.
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from hybrid.config import ModelConfig

# ---- hardware: NVIDIA H100 SXM5 datasheet ------------------------------------------------------
# Dense bf16 tensor-core peak: the datasheet's 1,979 TFLOP/s is "with sparsity", dense is half (the
# figure bench/flops.py's GPU_BF16_PEAKS uses for MFU).
H100_BF16_FLOPS = 989.4e12
# HBM3 bandwidth of the SXM part: 3.35 TB/s.
H100_HBM_BYTES_PER_S = 3.35e12
# NVLink 4: 900 GB/s per GPU counted over both directions, so 450 GB/s each way (what a ring uses).
H100_NVLINK_BYTES_PER_S = 450e9

# ---- achieved fractions: assumptions, not measurements -----------------------------------------
# Large bf16 GEMMs (98,304 tokens per rank × 512..1536): an assumed 45% of peak, a usual figure for
# GEMMs with a 512-wide inner dimension, below cuBLAS's best on large square products.
MATMUL_MFU = 0.45
# Newton–Schulz runs on 512 × 512 .. 512 × 1536 matrices, batched per bank: small GEMMs, assumed 30%.
NS_MATMUL_MFU = 0.30
# FlashAttention-3 paper (arXiv:2407.08608), abstract: FlashAttention-2 reaches only about 35% of the
# H100's peak; FlashAttention-3 reaches up to 75% in FP16, at large head dims and long sequences.
FA2_H100_UTILIZATION = 0.35
# F layers: torch SDPA's flash backend (FlashAttention-2 class; this repo does not ship FA3). Head dim
# 64 and T = 2048 sit below the papers' best cases (FlashAttention-2 paper, arXiv:2307.08691, shows
# throughput rising with head dim and sequence length), so assumed a little under that 35%: 30%.
SDPA_ATTN_MFU = 0.30
# W layers: flex_attention's generated Triton kernel. The FlexAttention announcement (PyTorch, 2024;
# arXiv:2412.05496) reports about 90% of FlashAttention-2's speed forward and 85% backward; weighted by
# the backward's 2.5× share of the FLOPs that is (0.90 + 2.5·0.85) / 3.5 of the SDPA rate.
FLEX_VS_FA2 = (0.90 + 2.5 * 0.85) / 3.5
FLEX_ATTN_MFU = SDPA_ATTN_MFU * FLEX_VS_FA2
# R layers' WKV-7 recurrence (Triton kernel or the chunked form): unmeasured, assumed 5% of peak
# (mostly rank-1 updates and matrix-vector products, little tensor-core work).
WKV_MFU = 0.05
# Memory-bound elementwise kernels (fused by torch.compile): assumed 70% of the HBM bandwidth.
HBM_FRACTION = 0.70
# NCCL ring all-reduce / all-gather over NVLink: assumed 70% of the one-way NVLink bandwidth.
NVLINK_FRACTION = 0.70

# ---- kernel conventions --------------------------------------------------------------------------
# Tile size of the attention kernels: flex_attention's default BlockMask block (128 × 128,
# torch.nn.attention.flex_attention._DEFAULT_SPARSE_BLOCK_SIZE); the flash kernels' causal tile
# skipping is modelled with the same 128.
ATTN_BLOCK = 128
# FlashAttention papers' FLOP convention: the backward does 2.5× the forward's FLOPs (it recomputes
# the scores), so fwd+bwd is 3.5× forward.
ATTN_BWD_FACTOR = 2.5
MATMUL_BWD_FACTOR = 2.0  # input gradient + weight gradient: two products of the forward's size
BYTES_BWD_FACTOR = 2.0  # see the module docstring
ACT_BYTES = 2  # bf16 activations under autocast
RESID_BYTES = 4  # the residual stream x, x0 and the embedding tables stay fp32
PARAM_BYTES = 4  # fp32 master weights, gradients and optimizer state
UPDATE_BYTES = 2  # Muon's orthogonalised updates travel in bf16 (hybrid/training/optim.py)
# Elementwise passes per token and channel in the forward, outside the GEMMs' own inputs/outputs
# (one pass = one bf16 read or write of C values; hidden-wide passes are scaled by hidden / C):
ELEMENTWISE_PASSES = {
    # TokenShiftMix: shift + the two lerps (read h, write xr, xk: 3), relu² of k (2), σ(r)⊙v (3).
    "TokenShiftMix": 8,
    # Other T mixers (hybrid/token_mix.py): counted as TokenShiftMix. For "conv" (the default) that is
    # its fused kernel's traffic too: it reads h once (the K shifted taps come from cache) and writes
    # xr and xk; the taps' gradients reduce over the same reads in the backward. ddlerp's LoRA
    # matmuls are counted as linears; its few extra passes are not.
    "T": 8,
    # RWKV-7 time-mix: six token-shift lerps, decay, LoRA gates, the kernel's r, w, k, v, a, b in and
    # y out, group norm, gating: a rough 30 (unmeasured, like every R-layer figure here).
    "R": 30,
    "mlp_act": 2,  # read and write the hidden activation (× hidden / C)
    "cmix_shift": 2,  # RWKV-7 channel-mix's token shift: read and write C
    "moe_dispatch": 4,  # gather to experts and scatter back, C-wide, read + write each
}
# Optimizer bytes per parameter per step (fp32 values of 4 bytes):
OPT_BYTES_PER_PARAM = {
    "grad_write": 4,  # the weight gradients written by the backward
    "ddp_bucket": 16,  # DDP copies gradients into its buckets and back (read + write, twice), world > 1
    "grad_clip": 12,  # clip_grad_norm_: read for the norm, then read + write to scale
    "muon_own": 40,  # the rank's share: momentum (r, r, w), Nesterov (r, r, w), stack + bf16 cast (≈ 4)
    "muon_apply": 26,  # every matrix on every rank: decay (r, w) and the update (bf16 read, cast, r, w)
    "adam": 28,  # fused AdamW: read p, g, m, v; write p, m, v
    "ema": 12,  # fp32 lerp of the whole state: read shadow and weight, write shadow
}


def attention_pairs(seq_len: int, window: int | None, block: int = ATTN_BLOCK) -> int:
    """(query, key) pairs one head's kernel computes over a sequence of `seq_len` tokens: every tile of
    block queries × block keys holding at least one allowed pair (key j ≤ query t, and t − j < window)
    is computed in full; the others are skipped. window None = full causal. With block = 1 this is the
    exact Σ_t min(t + 1, window)."""
    T = seq_len
    w = T if window is None else min(window, T)
    pairs = 0
    for q_lo in range(0, T, block):
        q_hi = min(q_lo + block, T) - 1
        first_key = max(0, q_lo - w + 1)  # the earliest key any query of the tile may read
        keys = min((q_hi // block + 1) * block, T) - (first_key // block) * block
        pairs += (q_hi - q_lo + 1) * keys
    return pairs


def build_meta_model(cfg: ModelConfig) -> nn.Module:
    from hybrid.model import HybridGPT

    with torch.device("meta"):
        return HybridGPT(cfg)


def _is_routed_expert(name: str) -> bool:
    return ".experts." in f".{name}."


def _linears(module: nn.Module, cfg: ModelConfig) -> tuple[float, float, int]:
    """(Σ in·out, Σ in + out, Σ weight params) over the linears a token passes through inside `module`,
    routed MoE experts weighted by top_k / E; RWKV-7 LoRA factors count as linears too."""
    macs = io = 0.0
    params = 0
    for name, m in module.named_modules():
        share = cfg.moe_top_k / cfg.moe_num_experts if _is_routed_expert(name) and cfg.moe_num_experts else 1.0
        if isinstance(m, nn.Linear):
            macs += share * m.in_features * m.out_features
            io += share * (m.in_features + m.out_features)
            params += m.weight.numel()
        if getattr(m, "optim_recipe", None) == "rwkv7":
            from hybrid.training.optim import RWKV7_LORA_PARAMS

            for pname, p in m.named_parameters(recurse=False):
                if pname in RWKV7_LORA_PARAMS and p.ndim == 2:
                    macs += p.numel()
                    io += sum(p.shape)
                    params += p.numel()
    return macs, io, params


def _ffn_passes(block: nn.Module, cfg: ModelConfig) -> float:
    """Elementwise passes (C-wide) of a block's FFN beyond its GEMMs."""
    C = cfg.model_dim
    kind = getattr(block, "ffn_kind", "mlp")
    if kind == "moe":
        hidden = cfg.moe_top_k * cfg.moe_expert_hidden + cfg.moe_shared_experts * cfg.moe_shared_hidden
        return ELEMENTWISE_PASSES["mlp_act"] * hidden / C + ELEMENTWISE_PASSES["moe_dispatch"]
    passes = ELEMENTWISE_PASSES["mlp_act"] * cfg.mlp_hidden / C
    return passes + (ELEMENTWISE_PASSES["cmix_shift"] if kind == "cmix" else 0)


def _block_work(block: nn.Module, index: int, cfg: ModelConfig, seq_len: int, n_skip_in: int) -> dict:
    """Per-token fwd+bwd work of one block: FLOPs by engine and HBM bytes."""
    from hybrid.layers import CausalAttention, TokenShiftMix

    C = cfg.model_dim
    macs, io, _ = _linears(block, cfg)
    flops = {"matmul": 2.0 * macs * (1 + MATMUL_BWD_FACTOR), "attn_sdpa": 0.0, "attn_flex": 0.0, "wkv": 0.0}
    # two residual + norm kernels (fp32 stream), the GEMMs' inputs and outputs, the FFN's passes
    fwd = (3 * RESID_BYTES + 2 * ACT_BYTES) * C + (2 * RESID_BYTES + 2 * ACT_BYTES) * C
    fwd += ACT_BYTES * io + ACT_BYTES * C * _ffn_passes(block, cfg)
    fwd += 3 * RESID_BYTES * C * n_skip_in  # U-Net skip added to the stream: read x, skip; write x
    mixer = getattr(block, "mixer", None) or getattr(block, "att")
    kind = cfg.mixer_kinds[index]
    if isinstance(mixer, CausalAttention):
        Cq, KV = mixer.num_heads * mixer.head_dim, mixer.num_kv_heads * mixer.head_dim
        full = mixer.window is None or mixer.window >= seq_len  # hybrid.attention.attention's branch
        pairs = attention_pairs(seq_len, None if full else mixer.window)
        flops["attn_sdpa" if full else "attn_flex"] = 2.0 * 2 * Cq * pairs / seq_len * (1 + ATTN_BWD_FACTOR)
        fwd += ACT_BYTES * (2 * Cq + 2 * KV)  # q/k RMS norm + RoPE + gain: read q, k; write q, k
        fwd += ACT_BYTES * (2 * Cq + 2 * KV)  # the attention kernel: read q, k, v; write y
        fwd += ACT_BYTES * (2 * Cq + KV) * mixer.xsa  # XSA: read y, v; write y
        fwd += ACT_BYTES * 3 * KV * mixer.use_ve  # v + ve_scale·ve: read v, ve; write v
    elif kind == "R":
        flops["wkv"] = 8.0 * cfg.rwkv_head_size * C * (1 + MATMUL_BWD_FACTOR)
        fwd += ACT_BYTES * C * ELEMENTWISE_PASSES["R"]
    else:
        key = "TokenShiftMix" if isinstance(mixer, TokenShiftMix) else "T"
        fwd += ACT_BYTES * C * ELEMENTWISE_PASSES[key]
    return dict(flops=flops, bytes=fwd * (1 + BYTES_BWD_FACTOR))


def _embed_head_work(model: nn.Module, cfg: ModelConfig) -> dict:
    """Per-token fwd+bwd work outside the blocks: lookups, BigramHash, value embeddings, the final
    norm, the tied head and the softcap + cross-entropy."""
    C, V = cfg.model_dim, model.tok_emb.num_embeddings
    macs, io = float(V * C), float(C + V)  # the tied head: reads the normed x, writes bf16 logits
    for name, child in model.named_children():
        if name != "blocks":
            m, i, _ = _linears(child, cfg)
            macs, io = macs + m, io + i
    fwd = 2 * RESID_BYTES * C  # tok_emb lookup: read an fp32 row, write x
    fwd += 2 * RESID_BYTES * C  # first RMS norm (+ SmearGate): read x, write x0
    if getattr(model, "bigram", None) is not None:
        fwd += 2 * RESID_BYTES * cfg.bigram_dim + (2 * RESID_BYTES + ACT_BYTES) * C  # lookup; add into x
    if getattr(model, "ve", None) is not None:
        fwd += 2 * RESID_BYTES * cfg.ve_dim  # the value-embedding lookup (its proj is in `io`)
    fwd += (RESID_BYTES + 2 * ACT_BYTES) * C  # last residual add + final norm
    fwd += ACT_BYTES * io + ACT_BYTES * V  # GEMM inputs/outputs; softcap + CE read the logits
    flops = {"matmul": 2.0 * macs * (1 + MATMUL_BWD_FACTOR), "attn_sdpa": 0.0, "attn_flex": 0.0, "wkv": 0.0}
    return dict(flops=flops, bytes=fwd * (1 + BYTES_BWD_FACTOR))


def _optimizer_work(model: nn.Module, world_size: int, ns_steps: int, ema: bool, grad_clip: bool) -> dict:
    """Per-step work on one rank: Newton–Schulz FLOPs, optimizer bytes, bytes on the wire."""
    from hybrid.model import count_params
    from hybrid.training.optim import split_params

    _, mat, _ = split_params(model)  # Muon's share, by the optimizer's own rule
    banks: dict[tuple, int] = {}
    for _, p in mat:
        banks[tuple(p.shape)] = banks.get(tuple(p.shape), 0) + 1
    ns_flops = gather_bytes = 0.0
    own = 0
    for (rows, cols), n in banks.items():
        per_rank = -(-n // world_size)
        m, M = min(rows, cols), max(rows, cols)
        ns_flops += per_rank * ns_steps * (4.0 * m * m * M + 2.0 * m ** 3)
        own += per_rank * rows * cols
        gather_bytes += per_rank * world_size * rows * cols * UPDATE_BYTES
    total = count_params(model)
    n_mat = sum(p.numel() for _, p in mat)
    b = OPT_BYTES_PER_PARAM
    opt_bytes = (b["grad_write"] * total + b["muon_own"] * own + b["muon_apply"] * n_mat
                 + b["adam"] * (total - n_mat) + b["grad_clip"] * total * grad_clip + b["ema"] * total * ema)
    allreduce_bytes = PARAM_BYTES * total if world_size > 1 else 0.0
    if world_size > 1:
        opt_bytes += b["ddp_bucket"] * total
    else:
        gather_bytes = 0.0
    frac = (world_size - 1) / world_size
    wire = 2 * frac * allreduce_bytes + frac * gather_bytes  # bytes each rank sends (ring algorithms)
    return dict(ns_flops=ns_flops, bytes=opt_bytes, allreduce_bytes=allreduce_bytes, allgather_bytes=gather_bytes,
                wire_bytes=wire, muon_params=n_mat, muon_banks=len(banks))


def _param_check(model: nn.Module, cfg: ModelConfig) -> dict:
    """count_params split into what the walk sees: linear weights (and RWKV-7 LoRA factors, every MoE
    expert counted), linear biases, embedding tables and control tensors. A 2-D parameter with both
    sides >= 16 outside those (other than the U-Net skip_weights) would be a matmul the walk misses:
    `unclassified` must be 0, and the four parts must add up to count_params."""
    from hybrid.model import count_params

    _, _, linear = _linears(model, cfg)
    seen = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    seen |= {id(p) for m in model.modules() if getattr(m, "optim_recipe", None) == "rwkv7"
             for n, p in m.named_parameters(recurse=False) if p.ndim == 2 and _is_lora(n)}
    embeddings = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    biases = sum(m.bias.numel() for m in model.modules() if isinstance(m, nn.Linear) and m.bias is not None)
    control = unclassified = 0
    for name, p in model.named_parameters():
        if id(p) in seen or name.endswith(".bias") and p.ndim == 1 and _owner_is_linear(model, name):
            continue
        if p.ndim == 2 and min(p.shape) >= 16 and not name.endswith("skip_weights"):
            unclassified += p.numel()
        else:
            control += p.numel()
    total = count_params(model)
    return dict(count_params=total, matmul_weights=linear, biases=biases, embeddings=embeddings, control=control,
                unclassified=unclassified,
                ok=unclassified == 0 and linear + biases + embeddings + control == total)


def _is_lora(name: str) -> bool:
    from hybrid.training.optim import RWKV7_LORA_PARAMS

    return name in RWKV7_LORA_PARAMS


def _owner_is_linear(model: nn.Module, name: str) -> bool:
    return isinstance(model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model, nn.Linear)


def _rates() -> dict[str, float]:
    """FLOP/s or byte/s actually achieved per engine (peak × the assumed fraction)."""
    return {"matmul": H100_BF16_FLOPS * MATMUL_MFU, "attn_sdpa": H100_BF16_FLOPS * SDPA_ATTN_MFU,
            "attn_flex": H100_BF16_FLOPS * FLEX_ATTN_MFU, "wkv": H100_BF16_FLOPS * WKV_MFU,
            "ns": H100_BF16_FLOPS * NS_MATMUL_MFU, "hbm": H100_HBM_BYTES_PER_S * HBM_FRACTION,
            "nvlink": H100_NVLINK_BYTES_PER_S * NVLINK_FRACTION}


def _timed(work: dict, tokens: float, rates: dict) -> dict:
    """Per-token work -> per-step ms on one rank, by engine."""
    f = work["flops"]
    out = dict(matmul_flops=f["matmul"], attn_flops=f["attn_sdpa"] + f["attn_flex"], wkv_flops=f["wkv"],
               bytes=work["bytes"])
    out["matmul_ms"] = 1e3 * tokens * f["matmul"] / rates["matmul"]
    out["attn_ms"] = 1e3 * tokens * (f["attn_sdpa"] / rates["attn_sdpa"] + f["attn_flex"] / rates["attn_flex"])
    out["wkv_ms"] = 1e3 * tokens * f["wkv"] / rates["wkv"]
    out["mem_ms"] = 1e3 * tokens * work["bytes"] / rates["hbm"]
    out["ms"] = out["matmul_ms"] + out["attn_ms"] + out["wkv_ms"] + out["mem_ms"]
    return out


def _add(parts: list[dict]) -> dict:
    flops0 = {"matmul": 0.0, "attn_sdpa": 0.0, "attn_flex": 0.0, "wkv": 0.0}
    out = dict(flops=dict(flops0), bytes=0.0)
    for p in parts:
        for k in flops0:
            out["flops"][k] += p["flops"][k]
        out["bytes"] += p["bytes"]
    return out


def estimate_step(cfg: ModelConfig, seq_len: int, tokens_per_step: int, world_size: int = 8, *,
                  ns_steps: int = 5, ema: bool = True, grad_clip: bool = True) -> dict:
    """Estimated H100 time of one training step of `cfg` on `world_size` GPUs (module docstring).

    Returns ms_per_step and the breakdown: `kinds` {letter: per-token fwd+bwd FLOPs (matmul_flops,
    attn_flops, wkv_flops) and bytes of all layers of that mixer kind, their ms by engine (matmul_ms,
    attn_ms, wkv_ms, mem_ms) and ms}; `embed_head` likewise; `optimizer` (Newton–Schulz FLOPs and
    bytes per rank, ms) and `comm` (all-reduce and all-gather bytes, ms); `tokens_per_rank`,
    `flops_per_token`, `bytes_per_token`; `params` (the count_params cross-check) and `assumptions`."""
    if seq_len < 1 or tokens_per_step < seq_len or world_size < 1:
        raise ValueError(f"need seq_len >= 1, tokens_per_step >= seq_len, world_size >= 1; got "
                         f"{seq_len}, {tokens_per_step}, {world_size}")
    model = build_meta_model(cfg)
    rates = _rates()
    tokens = tokens_per_step / world_size
    enc = getattr(model, "num_encoder_layers", 0)
    by_kind: dict[str, list[dict]] = {}
    for i, block in enumerate(model.blocks):
        n_skip_in = 1 if getattr(model, "skip_weights", None) is not None and enc <= i < 2 * enc else 0
        by_kind.setdefault(cfg.mixer_kinds[i], []).append(_block_work(block, i, cfg, seq_len, n_skip_in))
    kinds = {}
    for kind in sorted(by_kind, key="TWFR".index):
        kinds[kind] = dict(layers=len(by_kind[kind]), **_timed(_add(by_kind[kind]), tokens, rates))
    embed_head = _timed(_embed_head_work(model, cfg), tokens, rates)
    opt = _optimizer_work(model, world_size, ns_steps, ema, grad_clip)
    optimizer = dict(ns_flops=opt["ns_flops"], bytes=opt["bytes"], muon_params=opt["muon_params"],
                     muon_banks=opt["muon_banks"], ns_ms=1e3 * opt["ns_flops"] / rates["ns"],
                     mem_ms=1e3 * opt["bytes"] / rates["hbm"])
    optimizer["ms"] = optimizer["ns_ms"] + optimizer["mem_ms"]
    comm = dict(allreduce_bytes=opt["allreduce_bytes"], allgather_bytes=opt["allgather_bytes"],
                wire_bytes=opt["wire_bytes"], ms=1e3 * opt["wire_bytes"] / rates["nvlink"])
    per_token = list(kinds.values()) + [embed_head]
    from bench.flops import matmul_params_per_token

    macs, _, _ = _linears(model, cfg)
    return dict(
        ms_per_step=sum(p["ms"] for p in per_token) + optimizer["ms"] + comm["ms"],
        kinds=kinds, embed_head=embed_head, optimizer=optimizer, comm=comm,
        seq_len=seq_len, tokens_per_step=tokens_per_step, world_size=world_size, tokens_per_rank=tokens,
        flops_per_token=sum(p["matmul_flops"] + p["attn_flops"] + p["wkv_flops"] for p in per_token),
        bytes_per_token=sum(p["bytes"] for p in per_token),
        # Σ in·out per token: from the walk (+ the tied head) and from bench.flops' formulas (equal for
        # the mixers bench.flops knows; a token_mix variant with extra linears differs)
        matmul_macs_per_token=macs + cfg.vocab_size * cfg.model_dim,
        flops_py_macs_per_token=matmul_params_per_token(cfg),
        params=_param_check(model, cfg),
        assumptions=assumptions(),
    )


def assumptions() -> dict:
    """Every constant the estimate rests on, by name."""
    names = ("H100_BF16_FLOPS", "H100_HBM_BYTES_PER_S", "H100_NVLINK_BYTES_PER_S", "MATMUL_MFU", "NS_MATMUL_MFU",
             "SDPA_ATTN_MFU", "FLEX_ATTN_MFU", "WKV_MFU", "HBM_FRACTION", "NVLINK_FRACTION", "ATTN_BLOCK",
             "ATTN_BWD_FACTOR", "MATMUL_BWD_FACTOR", "BYTES_BWD_FACTOR", "ACT_BYTES", "RESID_BYTES")
    g = globals()
    return {n: g[n] for n in names} | {"ELEMENTWISE_PASSES": dict(ELEMENTWISE_PASSES),
                                       "OPT_BYTES_PER_PARAM": dict(OPT_BYTES_PER_PARAM)}


# ---- configs as train_gpt.py builds them -----------------------------------------------------------

def resolve_config(argv: list[str] | None = None, env: dict[str, str] | None = None):
    """(Hyperparameters, ModelConfig) exactly as train_gpt.py resolves them: `resolve_hyperparameters(argv,
    env)` (defaults → arch → preset → env → flags, every value checked), then `h.model_config()`.
    env defaults to {} rather than os.environ: the estimate describes the settings it is given. LOG_DIR
    defaults to the temp folder, so resolving (which probes that folder) writes nothing in the repo."""
    import tempfile

    from train_gpt import resolve_hyperparameters

    env = {"LOG_DIR": tempfile.gettempdir(), **(env or {})}
    h = resolve_hyperparameters(list(argv or []), env=env)
    return h, h.model_config()


def estimate_settings(argv: list[str] | None = None, env: dict[str, str] | None = None, seq_len: int = 2048,
                      tokens: int = 786432, world: int = 8) -> dict:
    """`estimate_step` of the run train_gpt.py would make with these flags and env settings (its Muon
    Newton–Schulz steps, EMA and gradient clipping included), at the given sequence length, tokens per
    step and world size. Adds `arch` and `cfg` (the ModelConfig) to the result."""
    h, cfg = resolve_config(argv, env)
    est = estimate_step(cfg, seq_len, tokens, world, ns_steps=h.muon_backend_steps, ema=h.ema_decay > 0,
                        grad_clip=h.grad_clip_norm > 0)
    return dict(est, arch=h.arch, cfg=cfg)


def parse_assignments(text: str) -> dict[str, str]:
    """"A=1 B=x" -> {"A": "1", "B": "x"} (upper-case names, as bench/ab.py)."""
    out = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if not sep or not key.isupper():
            raise SystemExit(f"{item!r} is not VAR=value (upper-case variable names)")
        out[key] = value
    return out


def flags_as_env(argv: list[str]) -> dict[str, str]:
    """train_gpt flags -> the equivalent env settings (["--model-dim", "768"] -> {"MODEL_DIM": "768"}),
    so that a --vs config can be the main config with its assignments on top."""
    from train_gpt import build_arg_parser

    args = build_arg_parser().parse_args(argv)
    return {k.upper(): v for k, v in vars(args).items() if v is not None}


# ---- the table --------------------------------------------------------------------------------------

def describe(est: dict) -> str:
    cfg = est["cfg"]
    return (f"--arch {est['arch']}: {cfg.num_layers} x {cfg.model_dim}, pattern {cfg.layer_pattern}"
            + (f" (window {cfg.attn_window})" if "W" in cfg.mixer_kinds else "")
            + f", MLP {cfg.mlp_mult:g}x")


def format_table(est: dict) -> str:
    """Markdown table: per layer kind (all its layers) and per-step part, FLOPs per token, bytes, ms."""
    rows = ["| part | layers | matmul MFLOP/tok | attn MFLOP/tok | memory KB/tok | matmul ms | attn ms | "
            "memory ms | ms/step |", "|---|---|---|---|---|---|---|---|---|"]

    def row(name, layers, p):
        attn = p["attn_flops"] + p["wkv_flops"]
        rows.append(f"| {name} | {layers} | {p['matmul_flops'] / 1e6:.2f} | {attn / 1e6:.2f} | "
                    f"{p['bytes'] / 1e3:.1f} | {p['matmul_ms']:.2f} | {p['attn_ms'] + p['wkv_ms']:.2f} | "
                    f"{p['mem_ms']:.2f} | {p['ms']:.2f} |")

    for kind, p in est["kinds"].items():
        row(kind, p["layers"], p)
    row("embed + head", "-", est["embed_head"])
    o, c = est["optimizer"], est["comm"]
    rows.append(f"| optimizer (per step) | - | NS {o['ns_flops'] / 1e9:.1f} GFLOP/rank | - | "
                f"{o['bytes'] / 1e6:.0f} MB/rank | {o['ns_ms']:.2f} | - | {o['mem_ms']:.2f} | {o['ms']:.2f} |")
    rows.append(f"| all-reduce + all-gather | - | - | - | {c['wire_bytes'] / 1e6:.0f} MB sent/rank | - | - | "
                f"- | {c['ms']:.2f} |")
    rows.append(f"| **total** | {sum(p['layers'] for p in est['kinds'].values())} | "
                f"{est['flops_per_token'] / 1e6:.1f} (all) | | {est['bytes_per_token'] / 1e3:.1f} | | | | "
                f"**{est['ms_per_step']:.2f}** |")
    return "\n".join(rows)


def format_report(ests: list[tuple[str, dict]]) -> str:
    first = ests[0][1]
    out = ["Estimated H100 step time (analytic, not measured; bench/h100_time.py lists every assumption)", ""]
    for label, est in ests:
        p = est["params"]
        out += [f"{label}: {describe(est)}; seq {est['seq_len']}, {est['tokens_per_step']:,} tokens/step on "
                f"{est['world_size']} GPUs ({est['tokens_per_rank']:,.0f} per GPU)", "", format_table(est), "",
                f"params: matmul weights {p['matmul_weights']:,} + biases {p['biases']:,} + embeddings "
                f"{p['embeddings']:,} + control {p['control']:,} = {p['count_params']:,} (count_params)"
                + ("" if p["ok"] else f"  MISMATCH (unclassified 2-D {p['unclassified']:,})")
                + f"; matmul MACs/token: walk {est['matmul_macs_per_token']:,.0f}, bench.flops "
                  f"{est['flops_py_macs_per_token']:,}", ""]
    if len(ests) > 1:
        out += ["| config | ms/step | ratio to the first |", "|---|---|---|"]
        for label, est in ests:
            out.append(f"| {label} | {est['ms_per_step']:.2f} | {est['ms_per_step'] / first['ms_per_step']:.3f} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                 epilog="Other arguments are train_gpt.py flags (--arch, --layer-pattern, "
                                        "--model-dim, --mlp-mult, ...). A config that sets TRAIN_SEQ_LEN or "
                                        "TRAIN_BATCH_TOKENS itself is estimated at those.")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=786432, help="tokens per optimizer step, all GPUs")
    ap.add_argument("--world", type=int, default=8, help="GPUs")
    ap.add_argument("--env", action="append", default=[], help="'VAR=value ...' settings of the main config")
    ap.add_argument("--vs", action="append", default=[],
                    help="'VAR=value ...': another config, the main one with these settings on top")
    a, rest = ap.parse_known_args(argv)
    main_env = {**flags_as_env(rest), **parse_assignments(" ".join(a.env))}
    configs = [("base", main_env)] + [(f"vs {s}", {**main_env, **parse_assignments(s)}) for s in a.vs]
    ests = []
    for label, env in configs:  # a config that sets TRAIN_SEQ_LEN / TRAIN_BATCH_TOKENS itself keeps them
        seq_len, tokens = int(env.get("TRAIN_SEQ_LEN", a.seq_len)), int(env.get("TRAIN_BATCH_TOKENS", a.tokens))
        ests.append((label, estimate_settings([], env, seq_len, tokens, a.world)))
    print(format_report(ests), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
