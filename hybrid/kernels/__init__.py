"""Kernels, each beside its pure-PyTorch reference (parity tests under TRITON_INTERPRET=1).

- wkv7.py        WKV-7 recurrence: wkv7_ref (float reference), wkv7_chunked, the dispatcher
- wkv7_triton.py WKV-7 Triton kernel
- fused_mlp.py   MLP up-projection + LeakyReLU² as one Triton kernel (MLP_FUSED)

Import modules directly; this file re-exports nothing (a run's counted code is what it imports).
"""
