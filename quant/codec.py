"""Byte-level codecs of the artifact: bit packing of small signed ints and the compressors.

Bit packing (`pack_bits`/`unpack_bits`, code in quant/bitpack.py): n values of `bits` bits (2..8)
become ceil(n*bits/8) bytes, an LSB-first bit stream (value i at stream bits [i*bits, (i+1)*bits),
each byte filled from its least significant bit), every value offset by +2**(bits-1) so it is
unsigned. Int6: 4 values in 3 bytes. Whether this beats one int8 per value depends on the
compressor, which is why it is a per-artifact switch (measured in the PR notes for quant/).

Compressors (`COMPRESSORS`, name -> id byte in the artifact prefix): zlib level 9, zstd level 22
(with content size and checksum), xz/lzma preset 9|extreme (dictionary capped at the input size),
brotli quality 11 (window 2**24).
`decompress_bytes` is bounded: it never produces more than the declared raw length (+1 byte to
detect overlong streams) and rejects truncated streams and trailing bytes.

Byte transforms (`apply_transform`/`invert_transform`), applied to one artifact section before it is
compressed, named in the section table as (id, parameter): "none" (0, 0) and "shuffle<s>" (1, s),
the byte shuffle of stride s in 2..16. The shuffle writes byte j of every s-byte element first for
j = 0, then j = 1, ... (an [n/s, s] -> [s, n/s] transpose), and then the n mod s trailing bytes as
they are. On fp16 data (s = 2) the sign/exponent bytes end up next to each other, which compressors
exploit (golf PR #1105: brotli -5.9%). Kept only where measured to help: fp16 and fp32
sections (the measurements are in docs/ARTIFACT.md §9); remapping int8 values (zigzag, offset to
unsigned) moved compressed sizes by at most 0.16%, in no consistent direction, and was dropped.
"""
from __future__ import annotations

import lzma
import zlib

import numpy as np

try:
    import zstandard
except ImportError:  # optional: zlib and lzma always work
    zstandard = None
try:
    import brotli
except ImportError:
    brotli = None

COMPRESSORS: dict[str, int] = {"zlib": 1, "zstd": 2, "lzma": 3, "brotli": 4}
_LZMA_DICT_LOG2 = (18, 20, 21, 22, 22, 23, 23, 24, 25, 26)  # xz presets 0..9: dictionary sizes
TRANSFORM_IDS: dict[str, int] = {"none": 0, "shuffle": 1}
MAX_STRIDE = 16


def pack_bits(q, bits: int) -> bytes:
    """Bit packing (module docstring; quant/bitpack.py, imported on use: only bit-packed artifacts
    need it, so a run that stores one int8 per value neither loads nor counts it)."""
    from quant.bitpack import bitpack

    return bitpack(q, bits)


def unpack_bits(buf, bits: int, n: int) -> np.ndarray:
    """Inverse of `pack_bits` (quant/bitpack.py)."""
    from quant.bitpack import bitunpack

    return bitunpack(buf, bits, n)


def compress_bytes(raw: bytes, name: str, level: int | None) -> bytes:
    if name == "zlib":
        return zlib.compress(raw, 9 if level is None else level)
    if name == "zstd":
        cctx = zstandard.ZstdCompressor(level=22 if level is None else level, write_checksum=True,
                                        write_content_size=True)
        return cctx.compress(raw)
    if name == "lzma":
        preset = 9 if level is None else level
        # The preset's dictionary, but no larger than the input (at least 4 KiB): the same compressed
        # size for a small section at a fraction of the time (preset 9 allocates 64 MiB per call).
        dict_size = min(1 << _LZMA_DICT_LOG2[preset], max(1 << 12, len(raw)))
        filters = [{"id": lzma.FILTER_LZMA2, "preset": preset | lzma.PRESET_EXTREME, "dict_size": dict_size}]
        return lzma.compress(raw, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, filters=filters)
    if name == "brotli":
        # lgwin 24 (16 MiB window, the format's standard maximum) instead of the default 22 (4 MiB):
        # repeated structure in a ~20 MB payload can be further apart than 4 MiB.
        return brotli.compress(raw, quality=11 if level is None else level, lgwin=24)
    raise ValueError(f"unknown compressor {name!r}")


def available_compressors() -> list[str]:
    """Compressor names usable here, in COMPRESSORS (and tie-break) order."""
    missing = {"zstd": zstandard is None, "brotli": brotli is None}
    return [name for name in COMPRESSORS if not missing.get(name, False)]


def decompress_bytes(data: bytes, name: str, raw_len: int) -> bytes:
    """Decompress, producing at most about raw_len (+1 to detect excess) bytes; raises on anything off."""
    if name == "zlib":
        d = zlib.decompressobj()
        out = d.decompress(data, raw_len)
        extra = d.decompress(d.unconsumed_tail, 1) if not d.eof else b""  # finish the trailer
        if extra or not d.eof or d.unused_data or d.unconsumed_tail:
            raise ValueError("zlib stream is truncated, longer than declared, or followed by extra bytes")
        return out
    if name == "zstd":
        # The one-shot API allocates the frame's declared content size, so check that first.
        if zstandard.frame_content_size(data) != raw_len:
            raise ValueError("zstd frame content size is missing or differs from the declared raw length")
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=raw_len, allow_extra_data=False)
    if name == "lzma":
        d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=1 << 28)
        out = d.decompress(data, raw_len)
        extra = d.decompress(b"", 1) if not d.eof else b""
        if extra or not d.eof or d.unused_data:
            raise ValueError("xz stream is truncated, longer than declared, or followed by extra bytes")
        return out
    if name == "brotli":
        d = brotli.Decompressor()
        parts = [d.process(data, output_buffer_limit=raw_len + 1)]
        total = len(parts[0])
        while not d.is_finished() and total <= raw_len and not d.can_accept_more_data():
            parts.append(d.process(b"", output_buffer_limit=raw_len + 1 - total))
            total += len(parts[-1])
        if not d.is_finished() or total > raw_len:
            raise ValueError("brotli stream is truncated or longer than declared")
        return b"".join(parts)
    raise ValueError(f"unknown compressor {name!r}")


# ----------------------------------------------------------------------------- byte transforms

def shuffle_bytes(data, stride: int) -> bytes:
    """Byte j of every `stride`-byte element, for j = 0..stride-1, then the trailing len % stride bytes."""
    a = np.frombuffer(data, dtype=np.uint8)
    n = a.size - a.size % stride
    return a[:n].reshape(-1, stride).T.tobytes() + a[n:].tobytes()


def unshuffle_bytes(data, stride: int) -> bytes:
    """Inverse of `shuffle_bytes`."""
    a = np.frombuffer(data, dtype=np.uint8)
    n = a.size - a.size % stride
    return a[:n].reshape(stride, -1).T.tobytes() + a[n:].tobytes()


def transform_code(name: str) -> tuple[int, int]:
    """(id, parameter) of a transform name, as stored in the section table; ValueError if unknown."""
    if name == "none":
        return 0, 0
    stride = name[len("shuffle"):]
    if name.startswith("shuffle") and stride.isdigit() and 2 <= int(stride) <= MAX_STRIDE and stride[0] != "0":
        return TRANSFORM_IDS["shuffle"], int(stride)
    raise ValueError(f"unknown transform {name!r}: 'none' or 'shuffle2'..'shuffle{MAX_STRIDE}'")


def transform_name(tid: int, param: int) -> str | None:
    """Inverse of `transform_code`; None for an id/parameter pair that names no transform."""
    if tid == 0 and param == 0:
        return "none"
    if tid == TRANSFORM_IDS["shuffle"] and 2 <= param <= MAX_STRIDE:
        return f"shuffle{param}"
    return None


def apply_transform(data, name: str) -> bytes:
    tid, param = transform_code(name)
    return shuffle_bytes(data, param) if tid else bytes(data)


def invert_transform(data, name: str) -> bytes:
    tid, param = transform_code(name)
    return unshuffle_bytes(data, param) if tid else bytes(data)
