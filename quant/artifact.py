"""The model artifact: a versioned, pickle-free container of quantized tensors (spec: docs/ARTIFACT.md).

How this works
--------------
    prefix (27 bytes, little-endian): magic b"GOLFQNT\\x00" | u16 version | u8 compressor id
                                       | u64 raw payload length | u32 CRC-32 of the raw payload
                                       | u32 CRC-32 of the whole file except these 4 bytes
    compressed raw payload          : u32 JSON length | UTF-8 JSON header | data section

The JSON header lists every tensor (name, shape, original dtype, precision kind, bits, storage and
the byte ranges of its data and, for int tensors, its fp16 row scales inside the data section).
Int tensors use the grid of quant/int6.py; their values are stored one int8 per value, or bit-packed
LSB-first (`pack_bits`) when the artifact says `"bitpack": true`. The data section is grouped by
storage type (int payloads, then fp16, fp32, raw bytes) because like bytes next to like bytes
compress better.

Reading is defensive: nothing is unpickled; the file CRC is checked before anything is decompressed;
decompression never produces more than the declared raw length (which itself must be <=
`max_raw_bytes`); the raw CRC, the JSON schema, every byte range (in bounds, tiling the data section
exactly) and every value range (grid bounds, finite floats) are checked; any failure raises
`ArtifactError("<source>: <reason>")`.
"""
from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from quant.codec import COMPRESSORS, available_compressors, compress_bytes, decompress_bytes, pack_bits, unpack_bits
from quant.int6 import FP16_MIN_NORMAL, dequantize_rows, qmax, quantize_rows
from quant.policy import is_embedding_name

MAGIC = b"GOLFQNT\x00"
FORMAT_VERSION = 1
# magic, version, compressor id, raw length, CRC-32 of the raw payload, CRC-32 of the file (all bytes
# but this field). The file CRC catches every change of up to 32 consecutive bits anywhere, including
# bits a decompressor ignores (deflate padding, brotli/zstd header slack) that the raw CRC cannot see.
PREFIX = struct.Struct("<8sHBQII")
_FILE_CRC_AT = PREFIX.size - 4
_COMPRESSOR_NAMES = {v: k for k, v in COMPRESSORS.items()}
MAX_HEADER_BYTES = 1 << 24
MAX_TENSORS = 1 << 16
MAX_NDIM = 8
HEADER_KEYS = {"format", "version", "bitpack", "tensors"}
ENTRY_KEYS = {"name", "shape", "dtype", "kind", "bits", "storage", "data", "scale"}

# Stored element types: name -> (numpy little-endian dtype, torch dtype). bfloat16 has no numpy type
# and travels as its int16 bit pattern.
_DTYPES: dict[str, tuple[str, torch.dtype]] = {
    "bool": ("|b1", torch.bool), "uint8": ("|u1", torch.uint8), "int8": ("|i1", torch.int8),
    "int16": ("<i2", torch.int16), "int32": ("<i4", torch.int32), "int64": ("<i8", torch.int64),
    "float16": ("<f2", torch.float16), "bfloat16": ("<i2", torch.bfloat16),
    "float32": ("<f4", torch.float32), "float64": ("<f8", torch.float64),
}
_TORCH_NAMES = {tdt: name for name, (_, tdt) in _DTYPES.items()}
_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")


class ArtifactError(ValueError):
    """A malformed, truncated, corrupted or hostile artifact; the message starts with its source."""


# ----------------------------------------------------------------------------- writing

def _encode(name: str, t: Tensor, precision, bitpack: bool) -> tuple[dict, dict[str, bytes]]:
    """(entry without offsets, {"data": bytes, "scale": bytes?}) for one tensor."""
    kind, bits = precision[0], int(precision[1])
    dtype = _TORCH_NAMES.get(t.dtype)
    if dtype is None:
        raise ValueError(f"{name}: dtype {t.dtype} cannot be stored")
    entry = {"name": name, "shape": list(t.shape), "dtype": dtype, "kind": kind, "bits": 0, "scale": None}
    if kind == "raw":
        np_dtype, _ = _DTYPES[dtype]
        view = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        entry["storage"] = dtype
        return entry, {"data": view.numpy().astype(np_dtype).tobytes()}
    if kind not in ("int", "fp16", "fp32"):
        raise ValueError(f"{name}: unknown precision kind {kind!r}")
    if not t.is_floating_point():
        raise ValueError(f"{name}: precision {kind} needs a float tensor, got {t.dtype}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: has NaN or inf values; refusing to export")
    if kind == "fp16":
        h = t.to(torch.float16)
        if not bool(torch.isfinite(h).all()):
            raise ValueError(f"{name}: values beyond the fp16 range (|x| > 65504)")
        entry["storage"] = "float16"
        return entry, {"data": h.numpy().astype("<f2").tobytes()}
    if kind == "fp32":
        entry["storage"] = "float32"
        return entry, {"data": t.float().numpy().astype("<f4").tobytes()}
    if t.ndim != 2:
        raise ValueError(f"{name}: int precision needs a 2-D tensor, got shape {tuple(t.shape)}")
    q, s = quantize_rows(t, bits)
    entry["bits"] = bits
    entry["storage"] = "packed" if bitpack else "int8"
    data = pack_bits(q, bits) if bitpack else q.numpy().tobytes()
    return entry, {"data": data, "scale": s.numpy().astype("<f2").tobytes()}


def _section(entry: dict, part: str) -> int:
    """Data-section group of one byte range: int payloads, then fp16 (scales too), fp32, raw."""
    if part == "scale" or entry["storage"] == "float16":
        return 1
    return {"int8": 0, "packed": 0, "float32": 2}.get(entry["storage"], 3)


def pack_model(state_dict: dict[str, Tensor], precision_fn: Callable, compressor: str = "zlib",
               bitpack: bool = False, level: int | None = None) -> bytes:
    """Quantize a state dict with `precision_fn(name, tensor) -> Precision` and return the artifact.

    compressor: "zlib" (level 9), "zstd" (22), "lzma" (preset 9 | extreme), "brotli" (quality 11) or
    "auto" (every available one, keep the smallest; ties go to the earlier in COMPRESSORS). `level`
    overrides the compressor's level (ignored by "auto").
    """
    entries, pieces = [], [[], [], [], []]
    for name, tensor in state_dict.items():
        if not isinstance(name, str) or not isinstance(tensor, Tensor):
            raise TypeError(f"state dict entries must be str -> Tensor, got {name!r}: {type(tensor).__name__}")
        t = tensor.detach().cpu().contiguous()
        entry, blobs = _encode(name, t, precision_fn(name, t), bitpack)
        entries.append(entry)
        for part, blob in blobs.items():
            pieces[_section(entry, part)].append((entry, part, blob))
    offset, chunks = 0, []
    for group in pieces:
        for entry, part, blob in group:
            entry[part] = [offset, len(blob)]
            chunks.append(blob)
            offset += len(blob)
    header = {"format": "golf-quant", "version": FORMAT_VERSION, "bitpack": bool(bitpack), "tensors": entries}
    header_bytes = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    raw = b"".join([struct.pack("<I", len(header_bytes)), header_bytes, *chunks])
    crc = zlib.crc32(raw)
    if compressor == "auto":
        candidates = [(len(c), i, name, c) for i, name in enumerate(available_compressors())
                      for c in [compress_bytes(raw, name, None)]]
        _, _, compressor, payload = min(candidates)
    else:
        if compressor not in available_compressors():
            raise ValueError(f"compressor {compressor!r} is unknown or not installed; "
                             f"available: {available_compressors()} or 'auto'")
        payload = compress_bytes(raw, compressor, level)
    return seal(MAGIC, FORMAT_VERSION, COMPRESSORS[compressor], len(raw), crc, payload)


def seal(magic: bytes, version: int, compressor_id: int, raw_len: int, raw_crc: int, payload: bytes) -> bytes:
    """Prefix + payload with the file CRC filled in (also used by tests to forge well-sealed files)."""
    head = PREFIX.pack(magic, version, compressor_id, raw_len, raw_crc, 0)[:_FILE_CRC_AT]
    return head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))) + payload


# ----------------------------------------------------------------------------- reading

def _read_prefix(blob: bytes, source: str, check_file_crc: bool = True) -> tuple[str, int, int]:
    """(compressor name, raw length, raw crc) from the fixed prefix, validated (and the file CRC)."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise ArtifactError(f"{source}: expected bytes, got {type(blob).__name__}")
    if len(blob) < PREFIX.size:
        raise ArtifactError(f"{source}: truncated: {len(blob)} bytes, the fixed prefix alone is {PREFIX.size}")
    magic, version, comp_id, raw_len, crc, file_crc = PREFIX.unpack_from(blob, 0)
    if magic != MAGIC:
        raise ArtifactError(f"{source}: bad magic {magic!r}: not a golf quant artifact")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{source}: unsupported format version {version} (this reader knows {FORMAT_VERSION})")
    if check_file_crc:
        view = memoryview(blob)
        if zlib.crc32(view[PREFIX.size:], zlib.crc32(view[:_FILE_CRC_AT])) != file_crc:
            raise ArtifactError(f"{source}: file CRC-32 mismatch: the file is truncated or corrupted")
    name = _COMPRESSOR_NAMES.get(comp_id)
    if name is None:
        raise ArtifactError(f"{source}: unknown compressor id {comp_id}")
    if name not in available_compressors():
        raise ArtifactError(f"{source}: compressor {name} is not installed here")
    return name, raw_len, crc


def blob_compressor(blob: bytes, source: str = "<artifact>") -> str:
    """Name of the compressor an artifact was written with (reads the prefix only)."""
    return _read_prefix(blob, source, check_file_crc=False)[0]


def _is_int(x) -> bool:
    return type(x) is int  # bool is an int subclass, and JSON floats are not ints


def _range(entry: dict, key: str, data_len: int, expect: int, where: str) -> tuple[int, int]:
    r = entry[key]
    if not (isinstance(r, list) and len(r) == 2 and all(_is_int(v) and v >= 0 for v in r)):
        raise ValueError(f"{where}: {key} must be [offset, length] of non-negative ints, got {r!r}")
    off, length = r
    if off + length > data_len:
        raise ValueError(f"{where}: {key} bytes [{off}, {off + length}) run past the data section ({data_len} bytes)")
    if length != expect:
        raise ValueError(f"{where}: {key} has {length} bytes but its shape and storage need {expect}")
    return off, length


def _check_entry(e, i: int, data_len: int, bitpack: bool) -> list[tuple[int, int]]:
    """Validate one header entry in place; returns its byte ranges."""
    if not isinstance(e, dict) or set(e) != ENTRY_KEYS:
        raise ValueError(f"tensor #{i}: entry must be an object with keys {sorted(ENTRY_KEYS)}")
    name, shape, dtype, kind, bits, storage = (e[k] for k in ("name", "shape", "dtype", "kind", "bits", "storage"))
    if not isinstance(name, str) or not name:
        raise ValueError(f"tensor #{i}: name must be a non-empty string")
    where = f"tensor {name!r}"
    if not (isinstance(shape, list) and len(shape) <= MAX_NDIM and all(_is_int(d) and d >= 0 for d in shape)):
        raise ValueError(f"{where}: shape must be a list of at most {MAX_NDIM} non-negative ints, got {shape!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"{where}: unknown dtype {dtype!r}")
    numel = 1
    for d in shape:
        numel *= d
    if not _is_int(bits):
        raise ValueError(f"{where}: bits must be an int")
    if kind == "int":
        if dtype not in _FLOAT_NAMES or len(shape) != 2 or shape[1] == 0 or not 2 <= bits <= 8:
            raise ValueError(f"{where}: an int tensor needs a float dtype, shape [R, C>0] and bits 2..8")
        if storage != ("packed" if bitpack else "int8"):
            raise ValueError(f"{where}: storage {storage!r} disagrees with bitpack={bitpack}")
        expect = (numel * bits + 7) // 8 if bitpack else numel
        ranges = [_range(e, "data", data_len, expect, where), _range(e, "scale", data_len, 2 * shape[0], where)]
        return ranges
    expected_storage = {"fp16": "float16", "fp32": "float32", "raw": dtype}.get(kind)
    if expected_storage is None:
        raise ValueError(f"{where}: unknown kind {kind!r}")
    if storage != expected_storage or bits != 0 or e["scale"] is not None:
        raise ValueError(f"{where}: kind {kind} must have storage {expected_storage}, bits 0 and no scale")
    if kind != "raw" and dtype not in _FLOAT_NAMES:
        raise ValueError(f"{where}: kind {kind} needs a float original dtype, got {dtype}")
    itemsize = np.dtype(_DTYPES[storage][0]).itemsize
    return [_range(e, "data", data_len, numel * itemsize, where)]


def _parse_header(raw: bytes) -> tuple[dict, int]:
    """(validated header, offset of the data section) from the raw payload; ValueError otherwise."""
    if len(raw) < 4:
        raise ValueError("raw payload too short for the header length")
    (hlen,) = struct.unpack_from("<I", raw, 0)
    if hlen > MAX_HEADER_BYTES or 4 + hlen > len(raw):
        raise ValueError(f"header length {hlen} exceeds the payload or the {MAX_HEADER_BYTES}-byte limit")
    header = json.loads(raw[4:4 + hlen].decode("utf-8"))
    if not isinstance(header, dict) or set(header) != HEADER_KEYS:
        raise ValueError(f"header must be an object with keys {sorted(HEADER_KEYS)}")
    if header["format"] != "golf-quant" or header["version"] != FORMAT_VERSION:
        raise ValueError(f"header format/version {header['format']!r}/{header['version']!r} not supported")
    if not isinstance(header["bitpack"], bool) or not isinstance(header["tensors"], list):
        raise ValueError("header bitpack must be a bool and tensors a list")  # noqa: TRY004
    if len(header["tensors"]) > MAX_TENSORS:
        raise ValueError(f"more than {MAX_TENSORS} tensors")
    data_start = 4 + hlen
    data_len = len(raw) - data_start
    ranges, names = [], set()
    for i, e in enumerate(header["tensors"]):
        ranges += _check_entry(e, i, data_len, header["bitpack"])
        if e["name"] in names:
            raise ValueError(f"tensor {e['name']!r} appears twice")
        names.add(e["name"])
    # The byte ranges must tile the data section exactly: no overlaps, no gaps, nothing trailing.
    pos = 0
    for off, length in sorted(ranges):
        if off != pos:
            raise ValueError(f"data section byte ranges overlap or leave a gap at offset {min(off, pos)}")
        pos += length
    if pos != data_len:
        raise ValueError(f"data section has {data_len - pos} bytes not covered by any tensor")
    return header, data_start


def _array(raw: bytes, start: int, r: list, np_dtype: str) -> np.ndarray:
    return np.frombuffer(raw, dtype=np_dtype, count=r[1] // np.dtype(np_dtype).itemsize, offset=start + r[0]).copy()


def _decode(e: dict, raw: bytes, start: int, bitpack: bool) -> Tensor:
    shape, kind, dtype = e["shape"], e["kind"], e["dtype"]
    out_dtype = _DTYPES[dtype][1]
    if kind == "int":
        bits, qm = e["bits"], qmax(e["bits"])
        if bitpack:
            q = unpack_bits(memoryview(raw)[start + e["data"][0]:start + sum(e["data"])], bits, shape[0] * shape[1])
        else:
            q = _array(raw, start, e["data"], "|i1")
        if q.size and (q.min() < -qm or q.max() > qm):
            raise ValueError(f"tensor {e['name']!r}: values outside the int{bits} grid [-{qm}, {qm}]")
        s = _array(raw, start, e["scale"], "<f2")
        if not (np.isfinite(s).all() and (s >= FP16_MIN_NORMAL).all()):
            raise ValueError(f"tensor {e['name']!r}: row scales must be finite and >= {FP16_MIN_NORMAL}")
        q_t = torch.from_numpy(q).reshape(shape)
        return dequantize_rows(q_t, torch.from_numpy(s), dtype=out_dtype)
    a = _array(raw, start, e["data"], _DTYPES[e["storage"]][0])
    if kind in ("fp16", "fp32"):
        if not np.isfinite(a).all():
            raise ValueError(f"tensor {e['name']!r}: non-finite values")
        return torch.from_numpy(a).to(out_dtype).reshape(shape)
    if dtype == "bool" and a.size and a.view(np.uint8).max() > 1:
        raise ValueError(f"tensor {e['name']!r}: bool bytes other than 0/1")
    t = torch.from_numpy(a)
    return (t.view(torch.bfloat16) if dtype == "bfloat16" else t).reshape(shape)


def unpack_model(blob: bytes, source: str = "<artifact>", max_raw_bytes: int = 1 << 31) -> dict[str, Tensor]:
    """Artifact bytes -> {name: tensor}: dequantized floats in their original dtype, raw tensors exact.
    Any malformed input raises ArtifactError naming `source`."""
    name, raw_len, crc = _read_prefix(blob, source)
    if raw_len > max_raw_bytes:
        raise ArtifactError(f"{source}: declares {raw_len} raw bytes, above the {max_raw_bytes}-byte limit")
    if raw_len < 4:
        raise ArtifactError(f"{source}: declares {raw_len} raw bytes, too few for a header")
    try:
        raw = decompress_bytes(bytes(blob[PREFIX.size:]), name, raw_len)
    except Exception as exc:  # noqa: BLE001  every decoder has its own exception types; all mean a bad stream
        raise ArtifactError(f"{source}: {name} payload does not decompress: {type(exc).__name__}: {exc}") from None
    if len(raw) != raw_len:
        raise ArtifactError(f"{source}: payload decompresses to {len(raw)} bytes, the prefix says {raw_len}")
    if zlib.crc32(raw) != crc:
        raise ArtifactError(f"{source}: raw payload CRC-32 mismatch: the decompressor output is corrupted")
    try:
        header, start = _parse_header(raw)
        return {e["name"]: _decode(e, raw, start, header["bitpack"]) for e in header["tensors"]}
    except Exception as exc:  # noqa: BLE001  schema and value checks raise ValueError; the net also catches the rest
        raise ArtifactError(f"{source}: bad header or data: {type(exc).__name__}: {exc}") from None


def read_artifact(path, max_bytes: int = 1 << 31) -> bytes:
    """The artifact file's bytes; ArtifactError if unreadable or larger than `max_bytes`."""
    try:
        with open(path, "rb") as f:
            blob = f.read(max_bytes + 1)
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read: {exc}") from None
    if len(blob) > max_bytes:
        raise ArtifactError(f"{path}: larger than {max_bytes} bytes")
    return blob


def write_artifact(path, blob: bytes) -> int:
    """Write atomically (temporary file, then rename); returns the byte count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(blob)
    os.replace(tmp, path)
    return len(blob)


def artifact_breakdown(state_dict: dict[str, Tensor], precision_fn: Callable) -> dict[str, dict[str, int]]:
    """Per group ("embeddings", "matrices", "passthrough"): tensors, params, and uncompressed bytes
    as stored one int8 per value (`raw_bytes`) and bit-packed (`packed_bytes`), scales included."""
    groups = {g: {"tensors": 0, "params": 0, "raw_bytes": 0, "packed_bytes": 0}
              for g in ("embeddings", "matrices", "passthrough")}
    for name, t in state_dict.items():
        p = precision_fn(name, t)
        n = t.numel()
        if p[0] == "int":
            g = groups["embeddings" if is_embedding_name(name) else "matrices"]
            scale_bytes = 2 * t.shape[0]
            raw, packed = n + scale_bytes, (n * int(p[1]) + 7) // 8 + scale_bytes
        else:
            g = groups["passthrough"]
            raw = packed = n * {"fp16": 2, "fp32": 4}.get(p[0], t.element_size())
        g["tensors"] += 1
        g["params"] += n
        g["raw_bytes"] += raw
        g["packed_bytes"] += packed
    return groups
