"""Which precision each state-dict tensor gets in the artifact (and, for matrices, during late QAT).

Rules, first match wins (`tensor_precision`):
1. non-float tensors (int buffers, bool masks)            -> Precision("raw"): stored exactly;
2. 2-D tensors named like an embedding table (EMBED_PATTERN) -> int `embed_bits` per row;
3. 2-D tensors that are not control tensors (CONTROL_PATTERN), with min(shape) >= MIN_MATRIX_DIM
   and more than SMALL_NUMEL elements                     -> int `matrix_bits` per row;
4. everything else (0/1-D tensors, control tensors, small or thin matrices, >2-D tensors)
                                                          -> fp32 if numel <= SMALL_NUMEL, else fp16.

Small tensors stay in float because a per-row fp16 scale would cost as much as the data saved, and
control tensors (gains, mixes, skip weights) are few numbers that every token passes through: the
baseline kept them in fp32 too (GOLF.md §3.6). Names are matched on dotted-path components, not as raw
substrings: `mix` must catch `resid_mix` and `mixer.mix_r` but not the `mixer.` module prefix that
every token-shift matrix carries.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

from torch import Tensor

from quant.int6 import qmax

# Embedding-like tables (rows are looked up, not multiplied): int8 per row keeps the quant gap of
# the tied embedding small (TECHNIQUES.md §2.13). A whole component path must match.
EMBED_NAMES: tuple[str, ...] = ("tok_emb", "bigram.table", "ve.table", "lm_head")
EMBED_PATTERN = re.compile(r"(?:^|\.)(?:" + "|".join(re.escape(n) for n in EMBED_NAMES) + r")(?:\.|$)")

# Control-tensor words (golf's CONTROL_TENSOR_NAME_PATTERNS generalised): a word matches at the start
# of a dotted component or after "_", and must end the component or be followed by "_", "." or a
# digit, with an optional plural "s"/"es" ("attn_scales", "resid_mixes").
CONTROL_WORDS: tuple[str, ...] = ("scale", "gain", "mix", "skip", "lambda", "smear", "q_gain")
CONTROL_PATTERN = re.compile(r"(?:^|[._])(?:" + "|".join(CONTROL_WORDS) + r")(?:e?s)?(?=$|[._0-9])")

SMALL_NUMEL = 4096  # at or below: fp32 passthrough (a few KB in total for the whole model)
MIN_MATRIX_DIM = 16  # thinner 2-D tensors (e.g. resid_mix [2, C]) are not worth a scale per row


class Precision(NamedTuple):
    """How one tensor is stored: kind "int" (per-row grid, `bits` 2..8), "fp16", "fp32" or "raw"."""

    kind: str
    bits: int = 0


FP16 = Precision("fp16", 16)
FP32 = Precision("fp32", 32)
RAW = Precision("raw", 0)


def is_embedding_name(name: str) -> bool:
    return EMBED_PATTERN.search(name) is not None


def is_control_name(name: str) -> bool:
    return CONTROL_PATTERN.search(name) is not None


def tensor_precision(name: str, tensor: Tensor, matrix_bits: int = 6, embed_bits: int = 8) -> Precision:
    """The storage precision of state-dict entry `name` (rules in the module docstring)."""
    if not tensor.is_floating_point():
        return RAW
    numel = tensor.numel()
    if tensor.ndim == 2 and numel > 0:
        if is_embedding_name(name):
            return Precision("int", embed_bits)
        if not is_control_name(name) and min(tensor.shape) >= MIN_MATRIX_DIM and numel > SMALL_NUMEL:
            return Precision("int", matrix_bits)
    return FP32 if numel <= SMALL_NUMEL else FP16


def make_precision_fn(matrix_bits: int = 6, embed_bits: int = 8) -> Callable[[str, Tensor], Precision]:
    """(name, tensor) -> Precision with the bit widths fixed; validates them once, up front."""
    qmax(matrix_bits)
    qmax(embed_bits)

    def precision_fn(name: str, tensor: Tensor) -> Precision:
        return tensor_precision(name, tensor, matrix_bits, embed_bits)

    return precision_fn
