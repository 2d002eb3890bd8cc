"""The trainer's named presets (`python train_gpt.py --preset NAME`).

Run presets (`RUN_PRESETS`, `run_preset`): "smoke" and "tiny" change the scale of a run, not its recipe.

Model presets (`model_preset_report`): named full-size models, described and counted on the meta
device without allocating them: the seeds "rize" / "rish" (hybrid/moe_presets.py) and "rwkv7-191m"
(hybrid/rwkv7.py), and every `--arch` at its default config. train_gpt.py
imports this module on use.

train_gpt.py imports this module only when a run names a preset, so a default run does not count it.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from hybrid.config import ARCH_DEFAULTS, ModelConfig
from hybrid.model import HybridGPT, count_params


# A feature the arch switches off (value 0, such as the gpt control's EMA or BigramHash) stays off
# under any preset. `smoke`: the offline sample corpus, a narrow hybrid with the full 12-layer
# pattern, a few minutes on 2 CPU cores. `tiny`: seconds, for tests.
RUN_PRESETS = {
    "smoke": dict(data_path="./data/datasets/sample_sp1024", tokenizer_path="./data/tokenizers/sample_1024_bpe.model",
                  model_dim=128, num_heads=4, num_kv_heads=2, attn_window=64, train_seq_len=256,
                  train_batch_tokens=8192, grad_accum_base=1, iterations=200, warmdown_iters=60,
                  max_wallclock_seconds=0.0, muon_momentum_warmup_steps=50, val_loss_every=100,
                  val_max_tokens=65536, train_log_every=20, eval_stride=64, eval_batch_seqs=64,
                  matrix_lr=0.02, bigram_buckets=512, ve_dim=32, bigram_dim=32, ema_decay=0.95,
                  gptq_seqs=16, gptq_seq_len=256),
    "tiny": dict(data_path="./data/datasets/sample_sp1024", tokenizer_path="./data/tokenizers/sample_1024_bpe.model",
                 num_layers=4, layer_pattern="TWTF", model_dim=64, num_heads=4, num_kv_heads=2, attn_window=16,
                 train_seq_len=64, train_batch_tokens=1024, grad_accum_base=2, iterations=30, warmdown_iters=10,
                 max_wallclock_seconds=0.0, muon_momentum_warmup_steps=10, val_loss_every=0,
                 val_max_tokens=8192, train_log_every=5, eval_stride=32, eval_batch_seqs=64,
                 bigram_buckets=128, bigram_dim=16, ve_dim=16, ema_decay=0.9,
                 gptq_seqs=8, gptq_seq_len=32, gptq_batch=8),
}
# `tiny`'s four layers per family (the hybrid's letters would not be valid RWKV or MoE patterns).
TINY_PATTERNS = {"hybrid": "TWTF", "gpt": "FFFF", "rwkv7": "RRRR", "moe": "TtWf"}


def run_preset(name: str, arch: str, arch_values: dict) -> dict:
    """The settings `--preset name` gives an `--arch arch` run whose defaults are `arch_values`: the
    preset's, less those the arch switches off (value 0 there), with `tiny`'s pattern for the arch."""
    if name not in RUN_PRESETS:
        raise ValueError(f"unknown --preset {name!r}; choose one of {sorted(RUN_PRESETS)}")
    values = {k: v for k, v in RUN_PRESETS[name].items() if arch_values.get(k) not in (0, 0.0, False)}
    if name == "tiny":
        values["layer_pattern"] = TINY_PATTERNS[arch]
    return values


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
