"""Byte-level codecs of the artifact: bit packing of small signed ints and the compressors.

Bit packing (`pack_bits`/`unpack_bits`): n values of `bits` bits (2..8) become ceil(n*bits/8) bytes,
an LSB-first bit stream (value i at stream bits [i*bits, (i+1)*bits), each byte filled from its least
significant bit), every value offset by +2**(bits-1) so it is unsigned. Int6: 4 values in 3 bytes.
Whether this beats one int8 per value depends on the compressor, which is why it is a per-artifact
switch (measured in the PR notes for quant/).

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
exploit (TECHNIQUES.md §2.14: brotli -5.9%). Kept only where measured to help: fp16 and fp32
sections (the measurements are in docs/ARTIFACT.md §9); remapping int8 values (zigzag, offset to
unsigned) moved compressed sizes by at most 0.16%, in no consistent direction, and was dropped.
"""
from __future__ import annotations

import lzma
import zlib

import numpy as np
from torch import Tensor

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


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in [2, 8], got {bits!r}")


_CHUNK = 8 * 65536  # values per chunk: a multiple of 8, so every chunk ends on a byte boundary


def pack_bits(q, bits: int) -> bytes:
    """Pack signed ints in [-2**(bits-1), 2**(bits-1)-1] (Tensor or array, any shape, C order) into
    ceil(n*bits/8) bytes: value i, offset by +2**(bits-1), fills stream bits [i*bits, (i+1)*bits),
    least significant bit first, bytes filled from their LSB; padding bits are 0. For 6 bits, 4 values
    take 3 bytes."""
    _check_bits(bits)
    a = (q.detach().cpu().numpy() if isinstance(q, Tensor) else np.asarray(q)).reshape(-1).astype(np.int16)
    lo = -(1 << (bits - 1))
    if a.size and (a.min() < lo or a.max() > -lo - 1):
        raise ValueError(f"values outside the signed {bits}-bit range [{lo}, {-lo - 1}]")
    u = (a - lo).astype(np.uint8)
    shifts = np.arange(bits, dtype=np.uint8)
    out = []
    for i in range(0, u.size, _CHUNK):
        stream = ((u[i:i + _CHUNK, None] >> shifts) & 1).astype(np.uint8).reshape(-1)  # (n*bits,) bits
        out.append(np.packbits(stream, bitorder="little").tobytes())
    return b"".join(out)


def unpack_bits(buf, bits: int, n: int) -> np.ndarray:
    """Inverse of `pack_bits`: n values as an int8 array. ValueError unless `buf` has exactly
    ceil(n*bits/8) bytes and zero padding bits."""
    _check_bits(bits)
    b = np.frombuffer(buf, dtype=np.uint8)
    if n < 0 or b.size != (n * bits + 7) // 8:
        raise ValueError(f"{b.size} bytes cannot hold exactly {n} {bits}-bit values")
    if (n * bits) % 8 and b[-1] >> ((n * bits) % 8):
        raise ValueError("nonzero padding bits after the last packed value")
    weights = (1 << np.arange(bits, dtype=np.int16)).astype(np.int16)
    out = np.empty(n, dtype=np.int8)
    step = _CHUNK * bits // 8
    for j, i in enumerate(range(0, n, _CHUNK)):
        count = min(_CHUNK, n - i)
        stream = np.unpackbits(b[j * step:(j + 1) * step], bitorder="little", count=count * bits)
        vals = stream.reshape(count, bits).astype(np.int16) @ weights
        out[i:i + count] = vals - (1 << (bits - 1))
    return out


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
