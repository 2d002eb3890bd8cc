"""Bit packing of small signed ints (quant/codec.py's docstring: `pack_bits` / `unpack_bits`, which
import this module on use, so only a run that writes or reads bit-packed int sections carries it).
"""
from __future__ import annotations

import numpy as np
from torch import Tensor


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in [2, 8], got {bits!r}")


_CHUNK = 8 * 65536  # values per chunk: a multiple of 8, so every chunk ends on a byte boundary


def bitpack(q, bits: int) -> bytes:
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


def bitunpack(buf, bits: int, n: int) -> np.ndarray:
    """Inverse of `bitpack`: n values as an int8 array. ValueError unless `buf` has exactly
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
