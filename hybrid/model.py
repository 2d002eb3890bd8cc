"""HybridGPT: the decoder that both architectures share.

    ids -> tok_emb (+ BigramHash) -> RMSNorm -> (SmearGate) = x0
        -> blocks, each: x = m0⊙x + m1⊙x0;  x += mix_scale⊙mixer(norm(x)·s);  x += mlp_scale⊙mlp(norm(x)·s)
           (mixer: TokenShiftMix for T, CausalAttention for W/F; s = LN scale; optional U-Net skips)
        -> RMSNorm -> tied head -> softcap·tanh(z/softcap) -> fp32 cross-entropy

`ModelConfig()` gives the hybrid; `ModelConfig(**ARCH_DEFAULTS["gpt"])` gives the challenge's naive
baseline, parameter for parameter (17,059,912; tests/test_model.py). The model holds no distributed
code and compiles with torch.compile(fullgraph=True, dynamic=False). For a fast build without
memory, construct under `torch.device("meta")`, then `to_empty(device=...)` and `init_weights()`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybrid.config import ModelConfig
from hybrid.layers import (
    MLP,
    BigramHash,
    CastedLinear,
    CausalAttention,
    SmearGate,
    TokenShiftMix,
    ValueEmbedding,
    rms_norm,
)


class Block(nn.Module):
    """Pre-norm residual block with a sequence mixer and an MLP. [B, T, C] -> [B, T, C].

    kind "T" -> TokenShiftMix; "W" -> CausalAttention with window cfg.attn_window; "F" -> full.
    resid_mix (2 × C, init [1, 0]) blends the stream with x0 first (baseline). With cfg.ln_scale the
    normed inputs of both sublayers are scaled by 1/sqrt(layer_idx+1) (golf PR #315); unlike the
    published hybrid, which skipped it in token-shift blocks, we apply it to every block so the
    depth schedule does not depend on the layer kind."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, kind: str):
        super().__init__()
        C = cfg.model_dim
        self.kind = kind
        self.ln_scale = 1.0 / math.sqrt(layer_idx + 1) if cfg.ln_scale else 1.0
        if kind == "T":
            self.mixer: nn.Module = TokenShiftMix(C)
        else:
            self.mixer = CausalAttention(
                C, cfg.num_heads, cfg.num_kv_heads, cfg.rotary_dims, cfg.rope_base, cfg.qk_gain_init,
                window=cfg.attn_window if kind == "W" else None,
                xsa=layer_idx in cfg.xsa_layer_ids,
                use_ve=layer_idx in cfg.ve_layer_ids,
                qk_norm_gain=cfg.qk_norm_gain,
            )
        self.mlp = MLP(C, cfg.mlp_hidden, cfg.mlp_act)
        self.mix_scale = nn.Parameter(torch.empty(C))
        self.mlp_scale = nn.Parameter(torch.empty(C))
        self.resid_mix = nn.Parameter(torch.empty(2, C))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.mix_scale.fill_(1.0)
            self.mlp_scale.fill_(1.0)
            self.resid_mix[0].fill_(1.0)
            self.resid_mix[1].zero_()

    def _norm(self, x: Tensor) -> Tensor:
        h = rms_norm(x)
        return h * self.ln_scale if self.ln_scale != 1.0 else h

    def forward(self, x: Tensor, x0: Tensor, ve: Tensor | None = None) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        if self.kind == "T":
            out = self.mixer(self._norm(x))
        else:
            out = self.mixer(self._norm(x), ve)
        x = x + self.mix_scale.to(x.dtype) * out
        return x + self.mlp_scale.to(x.dtype) * self.mlp(self._norm(x))


class HybridGPT(nn.Module):
    """forward(input_ids, target_ids) -> mean loss; forward_logits(input_ids) -> (B, T, V) fp32."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        C = cfg.model_dim
        self.tok_emb = nn.Embedding(cfg.vocab_size, C)
        self.bigram = BigramHash(cfg.bigram_buckets, cfg.bigram_dim, C) if cfg.bigram_buckets > 0 else None
        self.smear = SmearGate(C) if cfg.smear else None
        self.ve_layer_ids = cfg.ve_layer_ids
        self.ve = ValueEmbedding(cfg.vocab_size, cfg.ve_dim, cfg.kv_dim) if self.ve_layer_ids else None
        self.blocks = nn.ModuleList(Block(cfg, i, kind) for i, kind in enumerate(cfg.layer_kinds))
        # Baseline U-Net: the first L//2 blocks push their outputs, the later ones pop in reverse.
        self.num_encoder_layers = cfg.num_layers // 2 if cfg.unet_skips else 0
        self.skip_weights = nn.Parameter(torch.empty(self.num_encoder_layers, C)) if cfg.unet_skips else None
        if self.tok_emb.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter. The whole init policy, in one table:

        | parameter                                     | init                                     |
        |-----------------------------------------------|------------------------------------------|
        | tok_emb.weight (tied head)                    | N(0, tied_embed_init_std = 0.005)        |
        | CastedLinear with _zero_init (attention proj, | 0 (baseline)                             |
        |   mlp.proj, token-shift w_v)                  |                                          |
        | other CastedLinear, ortho_init, both dims>=64 | orthogonal, gain 1 (golf PR #164)        |
        |   bigram.proj, ve.proj (outputs into stream)  |   then × 1/sqrt(2·num_layers) (records'  |
        |                                               |   muP-style scaling, TECHNIQUES.md §2.17)|
        | other CastedLinear                            | PyTorch default (kaiming-uniform, a=√5)  |
        | bigram.table / bigram.bigram_scale            | 0 / 0.05                                 |
        | ve.table / ve.shared_scale / mixer.ve_scale   | N(0, 0.01) / 0.1 / 1                     |
        | smear.gate                                    | 0 (σ = 0.5)                              |
        | mixer.mix_r, mixer.mix_k (token shift)        | 0.5 (σ ≈ 0.62 on the current token)      |
        | mixer.q_gain / q_norm_gain, k_norm_gain       | qk_gain_init = 1.5 / 1                   |
        | mix_scale, mlp_scale / resid_mix              | 1 / [1, 0]                               |
        | skip_weights                                  | 1                                        |

        Leaf control values live in each module's reset_parameters(); this method calls them, so a
        meta-built model after to_empty() is fully initialised by this call alone."""
        cfg = self.cfg
        self.tok_emb.weight.normal_(0.0, cfg.tied_embed_init_std)
        if self.skip_weights is not None:
            self.skip_weights.fill_(1.0)
        out_proj = {m for m in (self.bigram, self.ve) if m is not None}
        for module in self.modules():
            if isinstance(module, CastedLinear):
                if module._zero_init:
                    module.weight.zero_()
                elif cfg.ortho_init and min(module.weight.shape) >= 64:
                    nn.init.orthogonal_(module.weight, gain=1.0)
                else:
                    module.reset_parameters()
                if module.bias is not None:
                    module.bias.zero_()
            elif module is not self and hasattr(module, "reset_parameters") and not isinstance(module, nn.Embedding):
                module.reset_parameters()  # leaf control params (and the bigram/VE tables)
        for module in out_proj:
            if cfg.ortho_init and min(module.proj.weight.shape) >= 64:
                module.proj.weight.mul_(1.0 / math.sqrt(2 * cfg.num_layers))

    def forward_logits(self, input_ids: Tensor) -> Tensor:
        """[B, T] int ids -> [B, T, V] float32 logits after the softcap."""
        x = self.tok_emb(input_ids)  # (B, T, C)
        if self.bigram is not None:
            x = x + self.bigram(input_ids)
        x = rms_norm(x)
        if self.smear is not None:
            x = self.smear(x, input_ids)
        x0 = x
        ve = self.ve(input_ids) if self.ve is not None else None  # (B, T, G*D)
        skips: list[Tensor] = []
        for i, block in enumerate(self.blocks):
            if self.skip_weights is not None and i >= self.num_encoder_layers and skips:
                x = x + self.skip_weights[i - self.num_encoder_layers].to(x.dtype) * skips.pop()
            x = block(x, x0, ve if i in self.ve_layer_ids else None)
            if i < self.num_encoder_layers:
                skips.append(x)
        x = rms_norm(x)
        # Softcap in fp32 (the baseline applies it in the autocast dtype, then upcasts for the CE).
        z = F.linear(x, self.tok_emb.weight.to(x.dtype)).float()  # (B, T, V)
        c = self.cfg.logit_softcap
        return c * torch.tanh(z / c)

    def forward(self, input_ids: Tensor, target_ids: Tensor) -> Tensor:
        """Mean next-token cross-entropy (nats) over all B·T positions, in fp32."""
        logits = self.forward_logits(input_ids)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target_ids.reshape(-1), reduction="mean")


def count_params(model: nn.Module) -> int:
    """Number of distinct parameters (the tied embedding counts once), as the baseline logs it."""
    return sum(p.numel() for p in model.parameters())
