"""Named full-size models, described and counted on the meta device without allocating them: the
seeds "rize" / "rish" (hybrid/moe_presets.py) and "rwkv7-191m" (hybrid/rwkv7.py), and every `--arch`
at its default config. `hybrid.model.named_model_preset` imports this module on use.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from hybrid.config import ARCH_DEFAULTS, ModelConfig
from hybrid.model import HybridGPT, count_params


class ModelPresetReport(NamedTuple):
    name: str
    description: str
    total_params: int
    active_params: int  # per token; equal to total for dense models


NAMED_MODEL_PRESETS = ("rize", "rish", "rwkv7-191m", *ARCH_DEFAULTS)


def model_preset_report(name: str) -> ModelPresetReport:
    """Describe and count a named model without allocating it (built on the meta device):
    "rize" / "rish" (the seed MoE models, hybrid/moe_presets.py), "rwkv7-191m" (the seed RWKV-7,
    hybrid/rwkv7.py), or an `--arch` name (hybrid, gpt, rwkv7, moe) at its default config."""
    if name in ("rize", "rish"):
        from hybrid.moe_presets import MoETransformer, count_active_params, count_total_params, moe_preset

        cfg = moe_preset(name)
        with torch.device("meta"):
            model = MoETransformer(cfg)
        m = cfg.moe
        desc = (f"{name}: MoE transformer, {cfg.num_layers} layers x {cfg.model_dim}, {cfg.num_heads} heads "
                f"({cfg.num_kv_heads} KV), {m.num_experts} routed experts top-{m.top_k} of {m.activation} "
                f"width {m.expert_hidden} + {m.num_shared_experts} shared, {m.router} router, vocab "
                f"{cfg.vocab_size}, {'tied' if cfg.tie_embeddings else 'untied'} head")
        return ModelPresetReport(name, desc, count_total_params(model), count_active_params(cfg))
    if name == "rwkv7-191m":
        from hybrid.rwkv7 import RWKV7_PRESETS, RWKV7LM

        kw = dict(RWKV7_PRESETS[name])
        with torch.device("meta"):
            model = RWKV7LM(**kw)
        total = count_params(model)
        desc = (f"{name}: RWKV-7 (x070), {kw['num_layers']} layers x {kw['dim']}, head {kw['head_size']}, "
                f"channel-mix {kw['ffn_hidden']}, vocab {kw['vocab_size']}, "
                f"{'tied' if kw.get('tie') else 'untied'} head")
        return ModelPresetReport(name, desc, total, total)
    if name in ARCH_DEFAULTS:
        cfg = ModelConfig(**ARCH_DEFAULTS[name])
        with torch.device("meta"):
            model = HybridGPT(cfg)
        total, active = model.param_counts()
        desc = (f"--arch {name}: HybridGPT, {cfg.num_layers} layers x {cfg.model_dim}, pattern "
                f"{cfg.layer_pattern!r}, block style {cfg.block_style}, vocab {cfg.vocab_size} tied")
        if cfg.moe_layer_ids:
            desc += (f", {len(cfg.moe_layer_ids)} MoE layers of {cfg.moe_num_experts} experts top-"
                     f"{cfg.moe_top_k} + {cfg.moe_shared_experts} shared")
        return ModelPresetReport(name, desc, total, active)
    raise ValueError(f"unknown model preset {name!r}; choose one of {list(NAMED_MODEL_PRESETS)}")
