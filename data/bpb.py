"""Bits-per-byte bookkeeping: how many UTF-8 bytes each predicted token stands for.

The challenge scores val_bpb = (sum of CE nats) / (ln 2 * sum of bytes), where the
bytes are counted from SentencePiece pieces, not from the raw text (the baseline's
build_sentencepiece_luts; docs/TECHNIQUES.md, "Metric: val_bpb"):

- control / unknown / unused ids (pad, BOS, EOS, UNK) are 0 bytes and act as
  document boundaries;
- byte-fallback pieces (`<0xAB>`) are 1 byte each;
- other pieces are the UTF-8 length of the piece without its leading "▁",
  plus 1 byte for that "▁" (a space) unless the previous token is a boundary.

For a document encoded as [BOS] + ids this sums exactly to the UTF-8 length of
sp.decode(ids); tests/test_bpb.py proves that on real text.

Library module; no CLI. Typical use:

    sp = load_tokenizer("data/tokenizers/fineweb_1024_bpe.model", 1024)
    luts = build_byte_luts(sp, 1024, device)
    n_bytes = token_bytes(x, y, luts).sum()
"""

from pathlib import Path
from typing import NamedTuple

import numpy as np
import sentencepiece as spm
import torch

SPACE_MARK = "\u2581"  # "▁", SentencePiece's visible space


class ByteLuts(NamedTuple):
    """Per-token-id lookup tables, length max(sp.vocab_size(), vocab_size)."""

    base_bytes: torch.Tensor  # int16: bytes of the piece without its leading "▁"
    has_leading_space: torch.Tensor  # bool: piece starts with "▁"
    is_boundary: torch.Tensor  # bool: control/unknown/unused id, or an id past the tokenizer


def build_byte_luts(sp, vocab_size: int, device=None) -> ByteLuts:
    """Byte-count tables for a SentencePiece processor, padded to the model's `vocab_size`."""
    sp_vocab = int(sp.vocab_size())
    if sp_vocab > vocab_size:
        raise ValueError(
            f"tokenizer has {sp_vocab} pieces but the model vocab_size is {vocab_size}; "
            f"set vocab_size >= {sp_vocab} or use a smaller tokenizer"
        )
    size = max(sp_vocab, vocab_size)
    base_bytes = np.zeros(size, dtype=np.int16)
    has_leading_space = np.zeros(size, dtype=np.bool_)
    # Ids past the tokenizer's vocabulary (embedding padding) can never be real text.
    is_boundary = np.ones(size, dtype=np.bool_)
    for i in range(sp_vocab):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        is_boundary[i] = False
        if sp.is_byte(i):
            base_bytes[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith(SPACE_MARK):
            has_leading_space[i] = True
            piece = piece[len(SPACE_MARK) :]
        base_bytes[i] = len(piece.encode("utf-8"))
    return ByteLuts(
        base_bytes=torch.tensor(base_bytes, dtype=torch.int16, device=device),
        has_leading_space=torch.tensor(has_leading_space, dtype=torch.bool, device=device),
        is_boundary=torch.tensor(is_boundary, dtype=torch.bool, device=device),
    )


def token_bytes(prev_ids: torch.Tensor, target_ids: torch.Tensor, luts: ByteLuts) -> torch.Tensor:
    """UTF-8 bytes represented by each target given its predecessor (same shape, int32).

    The "▁" of a target counts as a space only when the previous token is not a
    boundary: after BOS the decoder drops it, so it is not text.
    """
    base = luts.base_bytes[target_ids].to(torch.int32)
    space = luts.has_leading_space[target_ids] & ~luts.is_boundary[prev_ids]
    return base + space.to(torch.int32)


def load_tokenizer(path, vocab_size: int) -> spm.SentencePieceProcessor:
    """Load a SentencePiece model and check it has exactly `vocab_size` pieces."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer model {path} not found; fetch the challenge tokenizer and shards with "
            f"`python -m data.download --variant sp{vocab_size}` or build the offline sample "
            f"(tokenizer data/tokenizers/sample_1024_bpe.model) with `python -m data.sample`"
        )
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as exc:
        raise ValueError(f"{path}: not a valid SentencePiece model ({exc}); re-download or rebuild it") from None
    if int(sp.vocab_size()) != vocab_size:
        raise ValueError(
            f"tokenizer {path} has {sp.vocab_size()} pieces but vocab_size={vocab_size}; "
            f"set VOCAB_SIZE={sp.vocab_size()} or point to a {vocab_size}-piece tokenizer"
        )
    return sp
