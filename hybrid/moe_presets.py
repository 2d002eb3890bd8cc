"""A standalone MoE decoder (`MoETransformer`) and the presets that reproduce the seed models.

    ids -> tok_emb -> L × [x += Attn(RMSNorm(x)); x += FFN(RMSNorm(x))] -> RMSNorm -> head -> CE

Attention: GQA (H query / G KV heads of size D), full RoPE with optional dynamic-NTK scaling, causal
SDPA. FFN per layer from `ffn_pattern`: "D" = dense expert-style MLP of `dense_hidden`, "M" = `MoEFFN`
(hybrid/moe.py). Builds on the meta device (`with torch.device("meta"): MoETransformer(cfg)`), so the
full-size seeds can be counted without memory; `to_empty()` + `init_weights()` materialises one.

Parameter accounting (`param_breakdown`): total = every stored parameter (a tied head counts once);
active per token = everything except the routed experts a token does not use, i.e. embedding table +
head + attention + norms + routers + dense FFNs + shared experts + top_k routed experts per MoE
layer. Counting the whole embedding table as active is the Mixtral convention (it reproduces
Mixtral-8x7B's 12.9 B active of 46.7 B); `count_active_params(cfg, include_embeddings=False)` drops
the table and the head.

Presets (`MOE_PRESETS`):
- "rize" (seed: 19 L, C 1536, 12 heads, 64 routed top-4 + 1 shared, V 163,840, ctx 8192, ~4 B total
  / ~1 B active). Unstated: expert widths, KV heads, tying. Derivation, with MHA (G = 12, D = 128),
  untied embeddings, SwiGLU experts (3·C·h params each), every layer MoE:
      fixed A = 2·V·C + 19·(4C² + 2C + 64·C) + C = 684,550,656
      total − active = 19·3C·60·h = 3.0e9  ->  h ≈ 571  ->  h = 576
      active = A + 19·3C·(4h + s) = 1.0e9  ->  s ≈ 1299 ->  s = 1280 (one shared expert, ≈2.2× a
      routed one, as Qwen-MoE's wider shared expert)
  giving 4,024,134,144 total (+0.6 %) and 998,337,024 active (−0.2 %). With s = h the active count
  would need a ~14k-wide dense layer; with tied embeddings active falls to ~0.75 B. Sigmoid router,
  norm_topk_prob, routed scale 2.5 and bias balancing follow the DeepSeek-V3/Kimi pattern (DeepSeek-V3,
  arXiv:2412.19437); rope_theta 50,000 is our choice (not in the seed).
- "rish" (RishAIConfig, Hugging Face Harishapc01/RishAI-Base-v2): V 100,352, C 4096, 32 L, 32 heads, max
  positions 4096, 7 experts top-5 of SwiGLU width 11008 (intermediate_size), softmax router without
  renormalisation, aux 0.01, dynamic RoPE θ = 5e5, untied, RMSNorm eps 1e-6. Unstated: KV heads -> 8
  (GQA, our choice) and the dynamic factor -> 2.0. Computed: 32,465,096,704 total, 23,808,053,248
  active.
- "golf": the golf MoE at sp1024 (docs/TECHNIQUES.md, "Mixture of Experts"; 11 L, C 512, 8/4 heads, tied
  V 1024; layer 0 dense leaky-relu² 1536; layers 1-10: one shared expert 256 + 4 routed × 192, top-1,
  sigmoid + bias balancing). ffn_pattern "DMMMMMMMMMM". 21,265,920 params (15.4 M active). Sized by a
  measured pack of the trainer's `--arch moe` (the same FFNs on the hybrid's mixers, 21,284,896 params):
  15,235,774 model bytes with int6 + zlib after 60 CPU training steps, 15,306,858 with the code
  (docs/PERF.md). The first design's shared 512 + routed 256 (25.2 M params) would be ≈ 17.9 MB at the
  measured ~0.71 byte/param.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybrid.layers import CastedLinear
from hybrid.moe import MoEConfig, MoEExpert, MoEFFN

FFN_KINDS = {"D": "dense MLP", "M": "mixture of experts"}


@dataclass
class MoELMConfig:
    vocab_size: int = 1024
    num_layers: int = 11
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 0  # 0 = model_dim // num_heads
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: str = "none"  # "dynamic" = HF dynamic NTK: grow the base once T > max positions
    rope_factor: float = 1.0
    rms_eps: float = 1e-6
    tie_embeddings: bool = True
    ffn_pattern: str = ""  # one letter per layer, D or M; "" = all M
    dense_hidden: int = 1536
    dense_activation: str = "leaky_relu2"
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_size(self) -> int:
        return self.head_dim or self.model_dim // self.num_heads

    @property
    def ffn_kinds(self) -> str:
        return self.ffn_pattern or "M" * self.num_layers

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"MoELMConfig: {msg}")

        for name in ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "max_position_embeddings"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(self.num_heads % self.num_kv_heads == 0, f"num_heads {self.num_heads} must be divisible by num_kv_heads {self.num_kv_heads}")
        need(self.head_dim > 0 or self.model_dim % self.num_heads == 0,
             f"model_dim {self.model_dim} must be divisible by num_heads {self.num_heads} (or set head_dim)")
        need(self.head_size % 2 == 0, f"head size must be even for RoPE, got {self.head_size}")
        need(self.rope_scaling in ("none", "dynamic"), f"rope_scaling must be 'none' or 'dynamic', got {self.rope_scaling!r}")
        need(self.rope_factor >= 1.0, f"rope_factor must be >= 1, got {self.rope_factor}")
        kinds = self.ffn_kinds
        need(len(kinds) == self.num_layers and set(kinds) <= set(FFN_KINDS),
             f"ffn_pattern {self.ffn_pattern!r} must have num_layers={self.num_layers} letters from {FFN_KINDS}")
        need("D" not in kinds or self.dense_hidden > 0, f"dense_hidden must be positive, got {self.dense_hidden}")
        self.moe.validate()


class MoERMSNorm(nn.Module):
    """RMSNorm with a learned gain (HF Llama/Mixtral form). [..., C] -> [..., C]."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0)

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.size(-1),), self.weight.to(x.dtype), self.eps)


def ntk_rope_base(base: float, head_dim: int, T: int, max_positions: int, factor: float) -> float:
    """HF "dynamic" RoPE: for T > max_positions, base·((factor·T/max) − (factor − 1))^(D/(D−2))."""
    if T <= max_positions:
        return base
    return base * ((factor * T / max_positions) - (factor - 1.0)) ** (head_dim / (head_dim - 2))


class DynamicNTKRotary(nn.Module):
    """Full-head RoPE, split-half pairing (HF rotate_half), [B, T, H, D] -> same. No buffers."""

    def __init__(self, head_dim: int, base: float, max_positions: int, scaling: str, factor: float):
        super().__init__()
        self.head_dim, self.base, self.max_positions = head_dim, base, max_positions
        self.dynamic, self.factor = scaling == "dynamic", factor

    def forward(self, x: Tensor) -> Tensor:
        T, D = x.size(1), self.head_dim
        base = ntk_rope_base(self.base, D, T, self.max_positions, self.factor) if self.dynamic else self.base
        inv_freq = base ** (-torch.arange(0, D, 2, dtype=torch.float32, device=x.device) / D)
        freqs = torch.outer(torch.arange(T, dtype=torch.float32, device=x.device), inv_freq)  # [T, D/2]
        cos, sin = freqs.cos().to(x.dtype)[None, :, None], freqs.sin().to(x.dtype)[None, :, None]
        x1, x2 = x[..., : D // 2], x[..., D // 2:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class MoEAttention(nn.Module):
    """GQA causal self-attention. [B, T, C] -> [B, T, C]."""

    def __init__(self, cfg: MoELMConfig):
        super().__init__()
        C, H, G, D = cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_size
        self.H, self.G, self.D = H, G, D
        self.q = CastedLinear(C, H * D)
        self.k = CastedLinear(C, G * D)
        self.v = CastedLinear(C, G * D)
        self.o = CastedLinear(H * D, C)
        self.o._zero_init = True
        self.rotary = DynamicNTKRotary(D, cfg.rope_theta, cfg.max_position_embeddings, cfg.rope_scaling, cfg.rope_factor)

    def forward(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        q = self.rotary(self.q(x).view(B, T, self.H, self.D)).transpose(1, 2)
        k = self.rotary(self.k(x).view(B, T, self.G, self.D)).transpose(1, 2)
        v = self.v(x).view(B, T, self.G, self.D).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.G != self.H)
        return self.o(y.transpose(1, 2).reshape(B, T, self.H * self.D))


class MoEBlock(nn.Module):
    def __init__(self, cfg: MoELMConfig, kind: str):
        super().__init__()
        self.attn_norm = MoERMSNorm(cfg.model_dim, cfg.rms_eps)
        self.attn = MoEAttention(cfg)
        self.ffn_norm = MoERMSNorm(cfg.model_dim, cfg.rms_eps)
        self.is_moe = kind == "M"
        self.ffn = MoEFFN(cfg.model_dim, cfg.moe) if self.is_moe else MoEExpert(cfg.model_dim, cfg.dense_hidden, cfg.dense_activation)

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor] | None]:
        x = x + self.attn(self.attn_norm(x))
        if self.is_moe:
            y, aux = self.ffn(self.ffn_norm(x))
            return x + y, aux
        return x + self.ffn(self.ffn_norm(x)), None


class MoETransformer(nn.Module):
    """forward(ids, targets) -> CE + Σ MoE aux losses; forward_with_aux(ids) -> (fp32 logits,
    aux loss, per-MoE-layer aux dicts with the expert-load statistics)."""

    def __init__(self, cfg: MoELMConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.blocks = nn.ModuleList(MoEBlock(cfg, kind) for kind in cfg.ffn_kinds)
        self.norm = MoERMSNorm(cfg.model_dim, cfg.rms_eps)
        # "lm_head": the quant policy stores it like an embedding table (int8 per row).
        self.lm_head = None if cfg.tie_embeddings else CastedLinear(cfg.model_dim, cfg.vocab_size)
        if self.tok_emb.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """N(0, std) for embeddings and matrices (HF initializer_range); residual output projections
        (attention o, expert/dense proj) N(0, std/√(2L)) (GPT-2); routers PyTorch default; gains 1,
        expert biases 0."""
        out_std = std / math.sqrt(2 * self.cfg.num_layers)
        self.tok_emb.weight.normal_(0.0, std)
        for m in self.modules():
            if isinstance(m, CastedLinear):
                m.weight.normal_(0.0, out_std if m._zero_init else std)
            elif m is not self and hasattr(m, "reset_parameters") and not isinstance(m, nn.Embedding):
                m.reset_parameters()

    def forward_with_aux(self, input_ids: Tensor) -> tuple[Tensor, Tensor, list[dict[str, Tensor]]]:
        x = self.tok_emb(input_ids)
        aux_loss = torch.zeros((), dtype=torch.float32, device=x.device)
        stats: list[dict[str, Tensor]] = []
        for block in self.blocks:
            x, aux = block(x)
            if aux is not None:
                aux_loss = aux_loss + aux["loss"]
                stats.append(aux)
        x = self.norm(x)
        w = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, w.to(x.dtype)).float(), aux_loss, stats

    def forward(self, input_ids: Tensor, target_ids: Tensor) -> Tensor:
        logits, aux_loss, _ = self.forward_with_aux(input_ids)
        ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target_ids.reshape(-1))
        return ce + aux_loss


# ---- parameter accounting ----------------------------------------------------------------------

def count_total_params(model: nn.Module) -> int:
    """Distinct stored parameters (works on the meta device; a tied head counts once)."""
    return sum(p.numel() for p in model.parameters())


def _mlp_params(C: int, hidden: int, activation: str) -> int:
    return (3 if activation == "swiglu" else 2) * C * hidden


def param_breakdown(cfg: MoELMConfig) -> dict[str, int]:
    """Closed-form counts; "total" equals count_total_params(MoETransformer(cfg)) exactly."""
    C, V, L, m = cfg.model_dim, cfg.vocab_size, cfg.num_layers, cfg.moe
    H, G, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_size
    n_moe = cfg.ffn_kinds.count("M")
    n_dense = L - n_moe
    per_expert = _mlp_params(C, m.expert_hidden, m.activation)
    b = {
        "embedding": V * C,
        "head": 0 if cfg.tie_embeddings else V * C,
        "attention": L * (2 * C * H * D + 2 * C * G * D),
        "norms": (2 * L + 1) * C,
        "dense_ffn": n_dense * _mlp_params(C, cfg.dense_hidden, cfg.dense_activation),
        "routers": n_moe * (m.num_experts * C + (C if (m.shared_gate and m.num_shared_experts) else 0)),
        "shared_experts": n_moe * _mlp_params(C, m.num_shared_experts * m.shared_hidden, m.activation),
        "routed_experts": n_moe * m.num_experts * per_expert,
        "routed_active": n_moe * m.top_k * per_expert,
    }
    always = sum(b[k] for k in ("embedding", "head", "attention", "norms", "dense_ffn", "routers", "shared_experts"))
    b["total"] = always + b["routed_experts"]
    b["active"] = always + b["routed_active"]
    return b


def count_active_params(cfg: MoELMConfig, include_embeddings: bool = True) -> int:
    """Parameters one token uses: see the module docstring for the convention."""
    b = param_breakdown(cfg)
    return b["active"] - (0 if include_embeddings else b["embedding"] + b["head"])


MATRIX_BYTES_PER_PARAM = 0.71  # int6 + zlib, measured (estimate_artifact_bytes)


def estimate_artifact_bytes(cfg: MoELMConfig) -> int:
    """Estimate (not a measurement) of the int6 + zlib artifact: 0.71 B per int6 matrix parameter
    (measured on the default hybrid and the golf MoE after 60 CPU training steps, docs/PERF.md; trained
    and weight-decayed GPU weights compress further: 0.58 with zstd in rec:2026-03-22), 1 B per int8
    embedding/head value, 2 B per fp16 norm gain / router value, 4 B per fp32 expert-bias entry. Code
    bytes are not included."""
    b = param_breakdown(cfg)
    matrices = b["attention"] + b["dense_ffn"] + b["shared_experts"] + b["routed_experts"]
    n_moe = cfg.ffn_kinds.count("M")
    return round(MATRIX_BYTES_PER_PARAM * matrices + b["embedding"] + b["head"] + 2 * (b["norms"] + b["routers"])
                 + 4 * n_moe * cfg.moe.num_experts)


# ---- presets -------------------------------------------------------------------------------------

MOE_PRESETS: dict[str, MoELMConfig] = {
    "rize": MoELMConfig(
        vocab_size=163_840, num_layers=19, model_dim=1536, num_heads=12, num_kv_heads=12,
        max_position_embeddings=8192, rope_theta=50_000.0, tie_embeddings=False,
        moe=MoEConfig(num_experts=64, top_k=4, expert_hidden=576, num_shared_experts=1, shared_hidden=1280,
                      router="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5, aux_loss_coef=1e-4,
                      balance_loss="sequence", z_loss_coef=0.0, bias_balancing=True, activation="swiglu"),
    ),
    "rish": MoELMConfig(
        vocab_size=100_352, num_layers=32, model_dim=4096, num_heads=32, num_kv_heads=8,
        max_position_embeddings=4096, rope_theta=500_000.0, rope_scaling="dynamic", rope_factor=2.0,
        tie_embeddings=False,
        moe=MoEConfig(num_experts=7, top_k=5, expert_hidden=11008, num_shared_experts=0, router="softmax",
                      norm_topk_prob=False, aux_loss_coef=0.01, balance_loss="batch", z_loss_coef=0.0,
                      bias_balancing=False, activation="swiglu"),
    ),
    "golf": MoELMConfig(
        vocab_size=1024, num_layers=11, model_dim=512, num_heads=8, num_kv_heads=4,
        max_position_embeddings=2048, tie_embeddings=True, ffn_pattern="D" + "M" * 10,
        dense_hidden=1536, dense_activation="leaky_relu2",
        moe=MoEConfig(num_experts=4, top_k=1, expert_hidden=192, num_shared_experts=1, shared_hidden=256,
                      router="sigmoid", norm_topk_prob=False, aux_loss_coef=1e-4, balance_loss="sequence",
                      z_loss_coef=1e-3, bias_balancing=True, bias_update_rate=1e-3, activation="leaky_relu2"),
    ),
}


def moe_preset(name: str, **overrides) -> MoELMConfig:
    """A fresh copy of a preset (presets are never mutated), with optional field overrides."""
    if name not in MOE_PRESETS:
        raise ValueError(f"unknown MoE preset {name!r}; choose one of {sorted(MOE_PRESETS)}")
    cfg = MOE_PRESETS[name]
    overrides.setdefault("moe", replace(cfg.moe))
    return replace(cfg, **overrides)
