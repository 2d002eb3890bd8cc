"""Fuzz the readers a record verification trusts: the artifact reader (the verify path) and the
shard readers. Random bytes, every truncation and byte flips of small valid files: every failure is
a clean ArtifactError/ShardError (ValueError subclasses) whose message names the file."""
from __future__ import annotations

import random
import struct
import zlib

import numpy as np
import pytest
import torch

from data.shards import HEADER_BYTES, ShardError, load_validation_tokens, read_shard, shard_token_count, write_shard
from quant.artifact import MAGIC, PREFIX, ArtifactError, pack_model, seal
from quant.policy import make_precision_fn
from records.verify import load_artifact_state


@pytest.fixture(scope="module")
def small_artifact() -> bytes:
    g = torch.Generator().manual_seed(0)
    sd = {"blocks.0.attn.q.weight": torch.randn(8, 16, generator=g), "tok_emb.weight": torch.randn(16, 8, generator=g),
          "blocks.0.scale": torch.ones(8), "step": torch.tensor([3], dtype=torch.int64)}
    return pack_model(sd, make_precision_fn(6, 8), compressor="zlib")


def _expect_clean(path, fn):
    try:
        fn(path)
    except (ArtifactError, ShardError, ValueError) as exc:
        assert str(path) in str(exc), f"message does not name the file: {exc}"
        return exc
    return None


def test_artifact_valid_roundtrip(tmp_path, small_artifact):
    p = tmp_path / "ok.ptz"
    p.write_bytes(small_artifact)
    assert set(load_artifact_state(p, max_file_bytes=1 << 20)) == {"blocks.0.attn.q.weight", "tok_emb.weight",
                                                                    "blocks.0.scale", "step"}


def test_artifact_every_truncation(tmp_path, small_artifact):
    p = tmp_path / "trunc.ptz"
    for n in range(len(small_artifact)):
        p.write_bytes(small_artifact[:n])
        assert _expect_clean(p, lambda q: load_artifact_state(q, max_file_bytes=1 << 20)) is not None, n


def test_artifact_random_bytes_and_flips(tmp_path, small_artifact):
    rng = random.Random(1234)
    p = tmp_path / "rand.ptz"
    for i in range(300):
        if i % 3 == 0:
            blob = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 400)))
        elif i % 3 == 1:  # right magic, garbage after it
            blob = MAGIC + bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 400)))
        else:  # one flipped byte of a valid file
            b = bytearray(small_artifact)
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            blob = bytes(b)
        p.write_bytes(blob)
        assert _expect_clean(p, lambda q: load_artifact_state(q, max_file_bytes=1 << 20)) is not None, i


def test_artifact_hostile_sizes(tmp_path, small_artifact):
    p = tmp_path / "big.ptz"
    p.write_bytes(small_artifact)
    with pytest.raises(ArtifactError, match="larger than"):  # the file itself is bounded
        load_artifact_state(p, max_file_bytes=len(small_artifact) - 1)
    # a decompression bomb: 64 MiB of zeros declared as a few bytes, and declared as 2 GiB
    bomb = zlib.compress(b"\0" * (64 << 20), 9)
    comp_id = PREFIX.unpack(small_artifact[:PREFIX.size])[2]  # zlib's id
    for raw_len in (100, 1 << 31):
        p.write_bytes(seal(MAGIC, 1, comp_id, raw_len, 0, bomb))
        exc = _expect_clean(p, lambda q: load_artifact_state(q, max_file_bytes=1 << 20, max_raw_bytes=1 << 24))
        assert exc is not None


def _valid_shard(path, n=40):
    write_shard(path, np.arange(n, dtype=np.uint16) * 7)
    return path.read_bytes()


def test_shard_every_truncation_and_random(tmp_path):
    good = _valid_shard(tmp_path / "fineweb_val_000000.bin")
    p = tmp_path / "cut" / "fineweb_val_000000.bin"
    p.parent.mkdir()
    readers = (read_shard, shard_token_count,
               lambda q: load_validation_tokens(str(q.parent / "fineweb_val_*.bin"), 8))
    for n in list(range(0, HEADER_BYTES + 8)) + list(range(HEADER_BYTES + 8, len(good), 7)):
        p.write_bytes(good[:n])
        for fn in readers:
            assert _expect_clean(p, fn) is not None, n
    rng = random.Random(7)
    for i in range(100):
        blob = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 1200)))
        if i % 2:  # a plausible header with a wrong count
            blob = struct.pack("<3i", 20240520, 1, rng.randrange(-5, 10**6)) + blob
        p.write_bytes(blob)
        for fn in readers[:2]:
            assert _expect_clean(p, fn) is not None, i
    p.write_bytes(good)
    assert read_shard(p).shape == (40,)
