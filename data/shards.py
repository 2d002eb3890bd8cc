"""Token shard files in the challenge's binary format (read, write, validate).

A shard is what `data/download.py` fetches and `data/build_shards.py` writes:
a 1024-byte header of 256 little-endian int32 (magic 20240520, version 1, token
count N, then zeros) followed by N little-endian uint16 token ids, so the file is
exactly 1024 + 2*N bytes. The format is byte-compatible with openai/parameter-golf.

Every problem with a file raises `ShardError` whose message names the file and
says what to do, so a truncated download never surfaces as a numpy reshape error
deep inside training.

Library module; no CLI. Typical use:

    from data.shards import list_shards, read_shard
    tokens = read_shard(list_shards("data/datasets/fineweb10B_sp1024/fineweb_val_*.bin")[0])
"""

import glob
import os
from pathlib import Path

import numpy as np
import torch

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
# The header stores the count as int32, and uint16 payloads cap the vocabulary.
MAX_SHARD_TOKENS = 2**31 - 1
MAX_TOKEN_ID = 2**16 - 1

_REFETCH_HINT = (
    "re-download it (python -m data.download) or rebuild it (python -m data.build_shards / python -m data.sample)"
)


class ShardError(ValueError):
    """A shard file is missing, truncated or not in the challenge format; the message names the file."""


def _validated_token_count(path: Path) -> int:
    """Read and check the header of `path`; return N after checking the file is 1024 + 2N bytes."""
    try:
        with open(path, "rb") as f:
            file_bytes = os.fstat(f.fileno()).st_size
            raw = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise ShardError(f"{path}: shard file does not exist; {_REFETCH_HINT}") from None
    except IsADirectoryError:
        raise ShardError(f"{path}: is a directory, not a shard file") from None
    except OSError as exc:
        raise ShardError(f"{path}: cannot read shard file ({exc.strerror})") from None
    if len(raw) < HEADER_BYTES:
        raise ShardError(
            f"{path}: file is {file_bytes} bytes, shorter than the {HEADER_BYTES}-byte shard header "
            f"(empty or truncated); {_REFETCH_HINT}"
        )
    header = np.frombuffer(raw, dtype="<i4")
    magic, version, count = int(header[0]), int(header[1]), int(header[2])
    if magic != SHARD_MAGIC:
        raise ShardError(
            f"{path}: bad magic {magic} (expected {SHARD_MAGIC}); not a token shard or corrupted; {_REFETCH_HINT}"
        )
    if version != SHARD_VERSION:
        raise ShardError(f"{path}: unsupported shard version {version} (expected {SHARD_VERSION}); {_REFETCH_HINT}")
    if count < 0:
        raise ShardError(f"{path}: header has a negative token count {count}; corrupted; {_REFETCH_HINT}")
    expected = HEADER_BYTES + 2 * count
    if file_bytes != expected:
        what = "truncated" if file_bytes < expected else "has trailing bytes"
        raise ShardError(
            f"{path}: header says {count} tokens, so the file should be {expected} bytes, "
            f"but it is {file_bytes} bytes ({what}); {_REFETCH_HINT}"
        )
    return count


def shard_token_count(path) -> int:
    """Number of tokens in a shard, from its header alone (header and file length validated)."""
    return _validated_token_count(Path(path))


def check_token_ids(path, tokens: np.ndarray, vocab_size: int | None) -> None:
    """ShardError naming the file and the first position whose id is >= vocab_size (None: no check).
    One vectorised max over the (mapped) tokens: a fraction of the cost of reading them once.
    Without it an out-of-vocabulary id fails deep inside the model: an IndexError on the CPU, a
    device-side assert on a GPU, after training when it sits in a validation shard."""
    if vocab_size is None or tokens.size == 0 or int(tokens.max()) < vocab_size:
        return
    pos = int(np.argmax(tokens >= vocab_size))
    raise ShardError(f"{path}: token id {int(tokens[pos])} at position {pos} is outside the vocabulary "
                     f"(VOCAB_SIZE={vocab_size}); the shard was built with another tokenizer: rebuild it "
                     f"with the run's tokenizer or set VOCAB_SIZE and TOKENIZER_PATH to match it")


def read_shard(path, vocab_size: int | None = None) -> np.ndarray:
    """Load a whole shard as a uint16 array after validating magic, version, exact length and (with
    `vocab_size`) every token id."""
    path = Path(path)
    count = _validated_token_count(path)
    tokens = np.fromfile(path, dtype="<u2", count=count, offset=HEADER_BYTES)
    if tokens.size != count:  # the file changed between the size check and the read
        raise ShardError(f"{path}: read {tokens.size} of {count} tokens; the file changed while reading")
    check_token_ids(path, tokens, vocab_size)
    return tokens.astype(np.uint16, copy=False)


def memmap_shard(path, vocab_size: int | None = None) -> np.ndarray:
    """Validated read-only view of a shard's tokens that pages data in on demand (for the train
    loader); with `vocab_size`, every id is checked when the shard is opened."""
    path = Path(path)
    count = _validated_token_count(path)
    if count == 0:
        # np.memmap refuses zero-length mappings; an empty array behaves the same for callers.
        return np.zeros(0, dtype=np.uint16)
    tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))
    check_token_ids(path, tokens, vocab_size)
    return tokens


def write_shard(path, tokens) -> None:
    """Write `tokens` (integers in [0, 65535]) as a challenge shard, atomically (temp file + rename)."""
    path = Path(path)
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{path}: tokens must be integers, got dtype {arr.dtype}")
    if arr.size > MAX_SHARD_TOKENS:
        raise ValueError(f"{path}: {arr.size} tokens do not fit one shard (max {MAX_SHARD_TOKENS}); split them")
    if arr.size and arr.dtype != np.uint16:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > MAX_TOKEN_ID:
            raise ValueError(
                f"{path}: token ids must lie in [0, {MAX_TOKEN_ID}] to fit uint16, got range [{lo}, {hi}]"
            )
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, arr.size
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so an interrupted write never leaves a
    # file that looks like a finished shard under the real name.
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(arr.astype("<u2", copy=False).tobytes())
    os.replace(tmp, path)


def list_shards(pattern) -> list:
    """Sorted paths matching a glob pattern; `ShardError` naming the pattern if nothing matches."""
    pattern = str(pattern)
    paths = sorted(Path(p) for p in glob.glob(pattern))
    if not paths:
        raise ShardError(
            f"no shard files match {pattern!r}; fetch the challenge data with "
            f"`python -m data.download --variant sp1024 --train-shards 1` or build the offline "
            f"sample with `python -m data.sample`, or fix the data path"
        )
    return paths


def load_validation_tokens(pattern, seq_len: int, max_tokens: int = 0, vocab_size: int | None = None) -> torch.Tensor:
    """All shards matching `pattern`, concatenated in sorted order, as one int64 tensor.

    Optionally cut to the first `max_tokens` tokens, then truncated to
    ((N - 1) // seq_len) * seq_len + 1 so the stream splits into whole windows of
    `seq_len` inputs, each with its next-token target (the baseline's load_validation_tokens). With
    `vocab_size`, every token id is checked (`check_token_ids`).
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    paths = list_shards(pattern)
    tokens = np.concatenate([read_shard(p, vocab_size) for p in paths])
    if max_tokens > 0:
        tokens = tokens[:max_tokens]
    usable = ((tokens.size - 1) // seq_len) * seq_len
    if usable <= 0:
        raise ShardError(
            f"validation shards {pattern!r} hold {tokens.size} tokens"
            + (f" (after max_tokens={max_tokens})" if max_tokens > 0 else "")
            + f", fewer than one window of seq_len={seq_len} plus a target; "
            "use more validation data or a shorter seq_len"
        )
    return torch.from_numpy(tokens[: usable + 1].astype(np.int64))
