"""The hybrid token-shift/attention language model and its training pieces.

Modules (import them directly, e.g. `from hybrid.model import HybridGPT`; this file re-exports
nothing so importing one module never drags in the others):
- config.py     ModelConfig, parse_layer_pattern, ARCH_DEFAULTS ("hybrid", "gpt")
- attention.py  attention_ref (dense spec) and attention (SDPA / flex fast path)
- layers.py     CastedLinear, Rotary, MLP, TokenShiftMix, CausalAttention, SmearGate, BigramHash, ValueEmbedding
- model.py      Block, HybridGPT, count_params
- optim.py      Newton-Schulz, Muon, build_optimizers, EMA
- evaluate.py   eval_val, eval_sliding

Tests: python -m pytest -q tests/test_layers.py tests/test_model.py
"""
