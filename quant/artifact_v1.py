"""Reading version-1 artifacts (quant/artifact.py's docstring): the prefix and one compressed stream,
u32 JSON length | JSON header | data area. Nothing writes version 1 any more: quant.artifact imports
this module only when it meets such a file, so a run, which reads back the version 2 it wrote,
neither loads nor counts it.
"""
from __future__ import annotations

import struct
import zlib

from quant.container import MAX_HEADER_BYTES, PREFIX, ArtifactError, Prefix, _check_raw_len, _compressor, _decompress


def open_v1(blob, prefix: Prefix, source: str, max_raw_bytes: int) -> bytes:
    """The raw payload of a version-1 file whose prefix (file CRC included) was read."""
    name = _compressor(prefix.compressor_id, source, "")
    _check_raw_len(prefix.raw_len, source, max_raw_bytes)
    if prefix.raw_len < 4:
        raise ArtifactError(f"{source}: declares {prefix.raw_len} raw bytes, too few for a header")
    raw = _decompress(memoryview(blob)[PREFIX.size:], name, prefix.raw_len, source, "")
    if zlib.crc32(raw) != prefix.raw_crc:
        raise ArtifactError(f"{source}: raw payload CRC-32 mismatch: the decompressor output is corrupted")
    return raw


def v1_parts(raw: bytes) -> tuple[memoryview, memoryview]:
    """(JSON header bytes, data area) of a version-1 raw payload."""
    (hlen,) = struct.unpack_from("<I", raw, 0)
    if hlen > MAX_HEADER_BYTES or 4 + hlen > len(raw):
        raise ValueError(f"header length {hlen} exceeds the payload or the {MAX_HEADER_BYTES}-byte limit")
    view = memoryview(raw)
    return view[4:4 + hlen], view[4 + hlen:]
