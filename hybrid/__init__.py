"""The models (here), their kernels (kernels/) and the training pieces (training/) that the trainer
(train_gpt.py) puts together.

Import modules directly (`from hybrid.model import HybridGPT`); this file re-exports nothing, so
importing one module never loads the others (a run's counted code is what it imports).

Models and layers
- config.py      ModelConfig (every model field, validated), parse_layer_pattern, ARCH_DEFAULTS per --arch
- layers.py      CastedLinear, Rotary, MLP, TokenShiftMix (T, "shift"), CausalAttention (W/F, XSA), SmearGate,
                 BigramHash, ValueEmbedding
- token_mix.py   the T-layer mixers beyond the lerp (TOKEN_MIX: conv, the default; ddlerp, shiftk,
                 shift_silu_gate); not loaded by TOKEN_MIX=shift
- attention.py   attention_ref (dense reference) and attention / flex_window_attention (fast paths)
- model.py       Block, RWKVBlock, HybridGPT, count_params
- moe.py         MoEFFN and its routing and load balancing (lower-case pattern letters), loaded on use
- rwkv7.py       RWKV-7 time-mix and channel-mix (R letters) and the stand-alone RWKV7LM, loaded on use
- moe_presets.py the seed MoE transformers ("rize", "rish") counted on the meta device
- presets.py     run presets (smoke, tiny) and named model presets

kernels/ (hybrid/kernels/__init__.py lists them): WKV-7 (reference, chunked, Triton) and the fused MLP,
each beside its pure-PyTorch reference.

training/ (hybrid/training/__init__.py lists them): settings checks, Muon and Adam groups, schedules,
evaluation (sliding, stateful), score-first TTT (sgd, lora), checkpoints.

Tests mirror the modules: tests/test_layers.py, tests/test_model.py, tests/test_settings.py, ...
"""
