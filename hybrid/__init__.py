"""The models, their kernels and the training pieces the trainer (train_gpt.py) puts together.

Import modules directly (`from hybrid.model import HybridGPT`); this file re-exports nothing, so
importing one module never loads the others (a run's counted code is what it imports).

Models and layers
- config.py      ModelConfig (every model field, validated), parse_layer_pattern, ARCH_DEFAULTS per --arch
- layers.py      CastedLinear, Rotary, MLP, TokenShiftMix (T), CausalAttention (W/F, XSA), SmearGate,
                 BigramHash, ValueEmbedding
- token_mix.py   the other T-layer mixers (TOKEN_MIX: ddlerp, conv, shiftk, shift_silu_gate), loaded on use
- attention.py   attention_ref (dense reference) and attention / flex_window_attention (fast paths)
- model.py       Block, RWKVBlock, HybridGPT, count_params
- moe.py         MoEFFN and its routing and load balancing (lower-case pattern letters), loaded on use
- rwkv7.py       RWKV-7 time-mix and channel-mix (R letters) and the stand-alone RWKV7LM, loaded on use
- moe_presets.py the seed MoE transformers ("rize", "rish") counted on the meta device
- presets.py     run presets (smoke, tiny) and named model presets

Kernels, each beside its pure-PyTorch reference
- wkv7.py        WKV-7 recurrence: wkv7_ref (float reference), wkv7_chunked, dispatcher
- wkv7_triton.py WKV-7 Triton kernel
- fused_mlp.py   MLP up-projection + LeakyReLU² as one Triton kernel (MLP_FUSED)

Training pieces
- settings.py    parsing and checking every setting before the first step (SettingError)
- optim.py       Newton–Schulz, Muon, parameter groups, EMA
- schedule.py    LR warmdown, Muon momentum warm-up, the late-QAT switch
- evaluate.py    sliding-window and stateful evaluation (val_loss, val_bpb)
- ttt.py         legal score-first test-time training at the final evaluation (TTT=sgd), loaded on use
- ttt_lora.py    score-first per-document LoRA test-time training (TTT=lora), loaded on use
- stateful.py    stateful evaluation driver for recurrent models
- checkpoint.py  resumable checkpoints, the final weights saved before packing, resume checks

Tests mirror the modules: tests/test_layers.py, tests/test_model.py, tests/test_settings.py, ...
"""
