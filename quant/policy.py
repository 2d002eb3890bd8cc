"""Which precision each state-dict tensor gets in the artifact (and, for matrices, during late QAT).

Rules, first match wins (`tensor_precision`):
1. non-float tensors (int buffers, bool masks)            -> Precision("raw"): stored exactly;
2. 2-D tensors named like an embedding table (EMBED_PATTERN) -> int `embed_bits` per row;
3. 2-D tensors that are not control tensors (CONTROL_PATTERN), with min(shape) >= MIN_MATRIX_DIM
   and more than SMALL_NUMEL elements                     -> int per row: `mlp_bits` for the "mlp"
   group, `attn_bits` for "attn" and "mixer", `matrix_bits` otherwise (and when those are None);
4. everything else (0/1-D tensors, control tensors, small or thin matrices, >2-D tensors)
                                                          -> fp32 if numel <= SMALL_NUMEL, else fp16.

Groups (`tensor_group`, also for per-group size reports), first match wins: "raw" (non-float),
"embed" (rule 2), "control" (0/1-D or control-named), "mlp" (under an MLP_PARTS component: dense
FFN, MoE experts, RWKV channel-mix), "attn" / "mixer" (under a MIXER_PARTS component; "attn" when an
attention projection, ATTN_LEAVES, follows), "other" (bigram.proj, ve.proj, ...).

Small tensors stay in float because a per-row fp16 scale would cost as much as the data saved, and
control tensors (gains, mixes, skip weights) are few numbers that every token passes through: the
baseline kept them in fp32 too (its quantize_state_dict_int8). Names are matched on dotted-path components, not as raw
substrings: `mix` must catch `resid_mix` and `mixer.mix_r` but not the `mixer.` module prefix that
every token-shift matrix carries.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

from torch import Tensor

from quant.int6 import check_clip, qmax, quantize_rows

# Embedding-like tables (rows are looked up, not multiplied): int8 per row keeps the quant gap of
# the tied embedding small (rec:2026-03-19 MixedQuant; docs/TECHNIQUES.md, "Precision policy"). A whole
# component path must match.
EMBED_NAMES: tuple[str, ...] = ("tok_emb", "bigram.table", "ve.table", "lm_head")
EMBED_PATTERN = re.compile(r"(?:^|\.)(?:" + "|".join(re.escape(n) for n in EMBED_NAMES) + r")(?:\.|$)")

# Control-tensor words (golf's CONTROL_TENSOR_NAME_PATTERNS generalised): a word matches at the start
# of a dotted component or after "_", and must end the component or be followed by "_", "." or a
# digit, with an optional plural "s"/"es" ("attn_scales", "resid_mixes").
CONTROL_WORDS: tuple[str, ...] = ("scale", "gain", "mix", "skip", "lambda", "smear", "q_gain")
CONTROL_PATTERN = re.compile(r"(?:^|[._])(?:" + "|".join(CONTROL_WORDS) + r")(?:e?s)?(?=$|[._0-9])")

SMALL_NUMEL = 4096  # at or below: fp32 passthrough (a few KB in total for the whole model)
MIN_MATRIX_DIM = 16  # thinner 2-D tensors (e.g. resid_mix [2, C]) are not worth a scale per row

# Groups by dotted path component (`tensor_group`). MLP: the dense FFN ("mlp"), RWKV-7's channel-mix
# ("ffn"); MoE experts, shared experts and router live under "mlp". Sequence mixers: the hybrid's
# "mixer" (token-shift, attention, RWKV time-mix), RWKV7LM's "att", and "attn"/"attention" elsewhere;
# a mixer weight is "attn" when a later component is an attention projection.
MLP_PARTS = frozenset({"mlp", "ffn"})
MIXER_PARTS = frozenset({"mixer", "att", "attn", "attention"})
ATTN_LEAVES = frozenset({"c_q", "c_k", "c_v", "proj", "q", "k", "v", "o"})
WRAPPER_PARTS = frozenset({"_orig_mod", "module"})  # torch.compile / DDP prefixes


class Precision(NamedTuple):
    """How one tensor is stored: kind "int" (per-row grid, `bits` 2..8), "fp16", "fp32" or "raw".

    For "int", `clip` and `sd_k` pick the row scales (quant/int6.py: "mse" search, or "sdclip" with
    k = sd_k). They default to the mse search, so Precision("int", 6) means what it always did; code
    that reads a precision as a (kind, bits) pair via p[0], p[1] is unaffected.
    """

    kind: str
    bits: int = 0
    clip: str = "mse"
    sd_k: float = 0.0


FP16 = Precision("fp16", 16)
FP32 = Precision("fp32", 32)
RAW = Precision("raw", 0)

# Records' SDClip k (rec:2026-04-05, golf PR #1394): int6 matrices and int8 embeddings.
SD_K_MATRIX = 12.85
SD_K_EMBED = 20.0


def is_embedding_name(name: str) -> bool:
    return EMBED_PATTERN.search(name) is not None


def is_control_name(name: str) -> bool:
    return CONTROL_PATTERN.search(name) is not None


def tensor_group(name: str, tensor: Tensor) -> str:
    """The tensor's group, for per-group bit widths and size reports (rules in the module docstring):
    "raw", "embed", "control", "mlp", "attn", "mixer" or "other"."""
    if not tensor.is_floating_point():
        return "raw"
    if tensor.ndim == 2 and is_embedding_name(name):
        return "embed"
    if tensor.ndim < 2 or is_control_name(name):
        return "control"
    parts = _plain_parts(name)
    if any(p in MLP_PARTS for p in parts):
        return "mlp"
    for i, p in enumerate(parts):
        if p in MIXER_PARTS:
            return "attn" if any(q in ATTN_LEAVES for q in parts[i + 1:]) else "mixer"
    return "other"


def _plain_parts(name: str) -> list[str]:
    parts = name.split(".")
    while parts and parts[0] in WRAPPER_PARTS:
        parts = parts[1:]
    return parts


def tensor_precision(name: str, tensor: Tensor, matrix_bits: int = 6, embed_bits: int = 8,
                     mlp_bits: int | None = None, attn_bits: int | None = None, clip: str = "mse",
                     sd_k_matrix: float = SD_K_MATRIX, sd_k_embed: float = SD_K_EMBED) -> Precision:
    """The storage precision of state-dict entry `name` (rules in the module docstring).

    mlp_bits / attn_bits (None = matrix_bits) are the widths of the "mlp" and of the "attn" + "mixer"
    groups (int5 MLP, int6 attention: golf PR #180). With clip="sdclip" int tensors carry
    k = sd_k_embed (embeddings) or sd_k_matrix (every other matrix); with "mse" sd_k stays 0.
    """
    if not tensor.is_floating_point():
        return RAW
    numel = tensor.numel()
    if tensor.ndim == 2 and numel > 0:
        if is_embedding_name(name):
            return _int(embed_bits, clip, sd_k_embed)
        if not is_control_name(name) and min(tensor.shape) >= MIN_MATRIX_DIM and numel > SMALL_NUMEL:
            group = tensor_group(name, tensor)
            bits = {"mlp": mlp_bits, "attn": attn_bits, "mixer": attn_bits}.get(group)
            return _int(matrix_bits if bits is None else bits, clip, sd_k_matrix)
    return FP32 if numel <= SMALL_NUMEL else FP16


def _int(bits: int, clip: str, sd_k: float) -> Precision:
    return Precision("int", bits, clip, float(sd_k)) if clip == "sdclip" else Precision("int", bits)


def precision_clip(precision) -> tuple[str, float | None]:
    """(clip, sd_k) of an int precision, as quant/int6.py's row_scales takes them: sd_k only for
    "sdclip". A plain (kind, bits) pair means the clip search."""
    clip = precision[2] if len(precision) > 2 else "mse"
    return clip, (float(precision[3]) if clip == "sdclip" else None)


def quantize_precision(t: Tensor, precision) -> tuple[Tensor, Tensor]:
    """(q int8, scale fp16) of a 2-D tensor rounded to nearest on the grid of an int `precision`: what
    the artifact stores for it unless GPTQ (or the budget fit) supplies the values."""
    return quantize_rows(t, int(precision[1]), *precision_clip(precision))


def make_precision_fn(matrix_bits: int = 6, embed_bits: int = 8, mlp_bits: int | None = None,
                      attn_bits: int | None = None, clip: str = "mse", sd_k_matrix: float = SD_K_MATRIX,
                      sd_k_embed: float = SD_K_EMBED) -> Callable[[str, Tensor], Precision]:
    """(name, tensor) -> Precision with the widths and clip fixed; validates them once, up front."""
    for bits in (matrix_bits, embed_bits, mlp_bits, attn_bits):
        if bits is not None:
            qmax(bits)
    check_clip(clip, sd_k_matrix)
    check_clip(clip, sd_k_embed)

    def precision_fn(name: str, tensor: Tensor) -> Precision:
        return tensor_precision(name, tensor, matrix_bits, embed_bits, mlp_bits, attn_bits, clip,
                                sd_k_matrix, sd_k_embed)

    return precision_fn
