"""The model artifact: a versioned, pickle-free container of quantized tensors (spec: docs/ARTIFACT.md).

How this works
--------------
Version 2 (written here) is quant/container.py's prefix and section table, then the sections, each
compressed on its own with its own compressor and byte transform:

    section 0         UTF-8 JSON header: every tensor's name, shape, original dtype, precision kind,
                      bits, storage, and the byte ranges of its data (and, for int tensors, its fp16
                      row scales) in the data area
    sections 1..n-1   the data area, cut by storage and tensor group, in this order: one section
                      per (bits, group) of int values ("int6.mlp", "int6.attn", "int8.embed", ...),
                      then "scales" (all fp16 row scales), "fp16", "fp32", "raw"; empty ones are left out

Like bytes next to like bytes compress better, and separate sections let `compressor="auto"` keep,
for each section, the smallest of every available compressor x byte transform (a byte shuffle for
the fp16 and fp32 sections, kept when it shrinks them) x int storage (one int8 per value, or
bit-packed LSB-first when `bitpack="auto"`). Int tensors use the grid of quant/int6.py, or values a
caller quantized itself (`prequantized`, e.g. GPTQ), checked against that grid.

Version 1 (read only, by quant/artifact_v1.py, imported when such a file is met) is the prefix and
one compressed stream: u32 JSON length | JSON header | data area, with one artifact-wide int storage
(`"bitpack"`).

Reading is defensive: nothing is unpickled; the file CRC is checked before anything is decompressed;
no section decompresses past its declared raw length, and the declared total must be <=
`max_raw_bytes` (MAX_RAW_BYTES by default: 4 × the 16,000,000-byte budget); the header is
decompressed and checked first, and the data sections are inflated only once the header's tensor
table accounts for every byte they declare, into one preallocated buffer, so the reader's memory is
bounded by what the header declares (peak measured under a bomb fuzz: docs/ARTIFACT.md); every
section's raw CRC, the JSON schema, every byte range (in bounds, inside one
section, tiling the data area exactly) and every value (grid bounds, finite floats) are checked; any
failure raises `ArtifactError("<source>: <reason>")`.
"""
from __future__ import annotations

import bisect
import json
import os
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from quant.codec import available_compressors, pack_bits, unpack_bits
from quant.budget import ARTIFACT_LIMIT
from quant.container import (COMPRESSOR_NAMES, MAX_HEADER_BYTES, MIXED, PREFIX, ArtifactError, decode_section,
                             read_prefix, read_table, seal_sections, smallest_sections)
from quant.container import MAGIC, seal  # noqa: F401  re-exported: callers import them from here
from quant.int6 import FP16_MIN_NORMAL, dequantize_rows, qmax
from quant.policy import is_embedding_name, quantize_precision, tensor_group

FORMAT_VERSION = 2
# Reader bounds. A file within the budget holds at most 16,000,000 bytes; its int values and scales
# compress about 2x (0.44-0.71 byte per int6 parameter), fp16/fp32 tensors hardly at all, so no
# real artifact declares more than ~2.5x its size raw. 4x the budget leaves room for models over
# the budget (FIT_BUDGET=0 experiments) and refuses decompression bombs before any inflation.
MAX_RAW_BYTES = 4 * ARTIFACT_LIMIT
MAX_FILE_BYTES = 4 * ARTIFACT_LIMIT
MAX_TENSORS = 1 << 14
MAX_NDIM = 8
MAX_SECTION_NAME = 64
HEADER_KEYS = {1: {"format", "version", "bitpack", "tensors"}, 2: {"format", "version", "sections", "tensors"}}
ENTRY_KEYS = {"name", "shape", "dtype", "kind", "bits", "storage", "data", "scale"}
# Byte transforms tried per data section kind (measured in docs/ARTIFACT.md §9; int values gain nothing).
SECTION_TRANSFORMS = {"scales": ("none", "shuffle2"), "fp16": ("none", "shuffle2"), "fp32": ("none", "shuffle4")}
_SECTION_RANK = {"int": 0, "scales": 1, "fp16": 2, "fp32": 3, "raw": 4}

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


# ----------------------------------------------------------------------------- writing

def _prequantized(name: str, t: Tensor, bits: int, given) -> tuple[Tensor, Tensor]:
    """(q int8, scale fp16) given for `name`, validated against the tensor and the int`bits` grid."""
    if not (isinstance(given, (tuple, list)) and len(given) == 2 and all(isinstance(x, Tensor) for x in given)):
        raise ValueError(f"{name}: prequantized value must be a (q, scale) pair of tensors")
    q, s = (x.detach().cpu() for x in given)
    if q.dtype.is_floating_point or q.dtype.is_complex or q.dtype == torch.bool or tuple(q.shape) != tuple(t.shape):
        raise ValueError(f"{name}: prequantized q must be an integer tensor of shape {tuple(t.shape)}, "
                         f"got {q.dtype} {tuple(q.shape)}")
    qm = qmax(bits)
    if q.numel() and (int(q.min()) < -qm or int(q.max()) > qm):
        raise ValueError(f"{name}: prequantized q has values outside the int{bits} grid [-{qm}, {qm}]")
    if s.dtype != torch.float16 or tuple(s.shape) != (t.shape[0],):
        raise ValueError(f"{name}: prequantized scale must be float16 of shape ({t.shape[0]},), "
                         f"got {s.dtype} {tuple(s.shape)}")
    if not bool((torch.isfinite(s) & (s >= FP16_MIN_NORMAL)).all()):
        raise ValueError(f"{name}: prequantized scales must be finite fp16 >= 2**-14 (normal, positive)")
    return q.to(torch.int8), s


def _encode(name: str, t: Tensor, precision, given) -> tuple[dict, str, np.ndarray | bytes, bytes | None]:
    """(entry without storage and offsets, section, data, fp16 scale bytes or None) for one tensor;
    data is an int8 array of grid values for int tensors, else the stored bytes."""
    kind, bits = precision[0], int(precision[1])
    dtype = _TORCH_NAMES.get(t.dtype)
    if dtype is None:
        raise ValueError(f"{name}: dtype {t.dtype} cannot be stored")
    entry = {"name": name, "shape": list(t.shape), "dtype": dtype, "kind": kind, "bits": 0, "scale": None}
    if given is not None and kind != "int":
        raise ValueError(f"{name}: prequantized values given, but its precision is {kind!r}, not 'int'")
    if kind == "raw":
        entry["storage"] = dtype
        view = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        return entry, "raw", view.numpy().astype(_DTYPES[dtype][0]).tobytes(), None
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
        return entry, "fp16", h.numpy().astype("<f2").tobytes(), None
    if kind == "fp32":
        entry["storage"] = "float32"
        return entry, "fp32", t.float().numpy().astype("<f4").tobytes(), None
    if t.ndim != 2:
        raise ValueError(f"{name}: int precision needs a 2-D tensor, got shape {tuple(t.shape)}")
    q, s = _prequantized(name, t, bits, given) if given is not None else quantize_precision(t, precision)
    entry["bits"] = bits
    return entry, f"int{bits}.{tensor_group(name, t)}", q.numpy(), s.numpy().astype("<f2").tobytes()


def _section_kind(section: str) -> str:
    return "int" if section.startswith("int") else section


def _candidates(kind: str, pieces: list, bits: int, storages: tuple[str, ...], compressors: list[str],
                transforms: bool) -> tuple[list[tuple[bytes, str, str]], list[tuple[str, list[int]]]]:
    """Candidate (raw, compressor, transform) encodings of one data section, and per candidate its
    int storage and the byte length of each piece."""
    variants = []
    for storage in (storages if kind == "int" else ("",)):
        blobs = ([pack_bits(p, bits) if storage == "packed" else p.tobytes() for p in pieces]
                 if kind == "int" else pieces)
        variants.append((storage, [len(b) for b in blobs], b"".join(blobs)))
    cands, meta = [], []
    for storage, lengths, raw in variants:
        for transform in (SECTION_TRANSFORMS.get(kind, ("none",)) if transforms else ("none",)):
            for comp in compressors:
                cands.append((raw, comp, transform))
                meta.append((storage, lengths))
    return cands, meta


def pack_model(state_dict: dict[str, Tensor], precision_fn: Callable, compressor: str = "zlib",
               bitpack: bool | str = False, level: int | None = None,
               prequantized: dict[str, tuple[Tensor, Tensor]] | None = None, transforms: bool = True) -> bytes:
    """Quantize a state dict with `precision_fn(name, tensor) -> Precision` and return the artifact
    (format version 2).

    compressor: "zlib" (level 9), "zstd" (22), "lzma" (preset 9 | extreme) or "brotli" (quality 11)
    for every section, or "auto": per section, every available compressor, keeping the smallest
    (ties go to the earlier in COMPRESSORS). `level` overrides a named compressor's level (ignored
    by "auto"). bitpack: False (one int8 per value), True (bit-packed) or "auto" (per int section,
    the smaller). transforms: try the byte shuffle on fp16/fp32 sections (kept only if smaller).
    prequantized: {name: (q [R, C] ints on the grid, scale fp16 [R])} used for those int tensors
    instead of quant/int6.py's rounding; ValueError if malformed or not an int tensor.
    """
    if compressor == "auto":
        compressors, level = available_compressors(), None
    elif compressor in available_compressors():
        compressors = [compressor]
    else:
        raise ValueError(f"compressor {compressor!r} is unknown or not installed; "
                         f"available: {available_compressors()} or 'auto'")
    if bitpack not in (False, True, "auto"):
        raise ValueError(f"bitpack must be False, True or 'auto', got {bitpack!r}")
    storages = {False: ("int8",), True: ("packed",), "auto": ("int8", "packed")}[bitpack]
    prequantized = dict(prequantized or {})
    unknown = sorted(set(prequantized) - set(state_dict))
    if unknown:
        raise ValueError(f"prequantized names not in the state dict: {unknown[:5]}")
    entries, sections = [], {}  # section name -> [(entry, "data" or "scale", piece)]
    for name, tensor in state_dict.items():
        if not isinstance(name, str) or not isinstance(tensor, Tensor):
            raise TypeError(f"state dict entries must be str -> Tensor, got {name!r}: {type(tensor).__name__}")
        t = tensor.detach().cpu().contiguous()
        entry, section, data, scale = _encode(name, t, precision_fn(name, t), prequantized.get(name))
        entries.append(entry)
        sections.setdefault(section, []).append((entry, "data", data))
        if scale is not None:
            sections.setdefault("scales", []).append((entry, "scale", scale))
    names = list(sections)
    order = sorted((s for s in names if any(np.asarray(p).nbytes for _, _, p in sections[s])),  # no empty ones
                   key=lambda s: (_SECTION_RANK[_section_kind(s)], names.index(s)))
    jobs, metas = [], []
    for s in order:
        kind = _section_kind(s)
        bits = int(s[3:s.index(".")]) if kind == "int" else 0
        cands, meta = _candidates(kind, [p for _, _, p in sections[s]], bits, storages, compressors, transforms)
        jobs.append(cands)
        metas.append(meta)
    offset, raws, encoded = 0, [], []
    for s, job, meta, (i, sec) in zip(order, jobs, metas, smallest_sections(jobs, level)):
        storage, lengths = meta[i]
        for (entry, part, _), length in zip(sections[s], lengths):
            entry[part] = [offset, length]
            offset += length
            if part == "data" and entry["kind"] == "int":
                entry["storage"] = storage
        raws.append(job[i][0])
        encoded.append(sec)
    for entry in entries:  # tensors with no bytes (a zero dim) sit in no section
        entry["storage"] = entry.get("storage", storages[0])
        for part in ("data",) + (("scale",) if entry["kind"] == "int" else ()):
            entry[part] = entry.get(part, [0, 0])
    header = {"format": "golf-quant", "version": FORMAT_VERSION, "sections": order, "tensors": entries}
    header_bytes = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    [(_, head)] = smallest_sections([[(header_bytes, c, "none") for c in compressors]], level)
    crc = 0
    for raw in [header_bytes, *raws]:
        crc = zlib.crc32(raw, crc)
    return seal_sections([head, *encoded], crc)


# ----------------------------------------------------------------------------- reading

def blob_compressor(blob: bytes, source: str = "<artifact>") -> str:
    """The compressor an artifact was written with, from its prefix: a name, or "mixed" for a
    version-2 file whose sections use different compressors."""
    prefix = read_prefix(blob, source, check_file_crc=False)
    return "mixed" if prefix.compressor_id == MIXED else COMPRESSOR_NAMES[prefix.compressor_id]


def _is_int(x) -> bool:
    return type(x) is int  # bool is an int subclass, and JSON floats are not ints


def _range(entry: dict, key: str, data_len: int, expect: int, where: str) -> tuple[int, int]:
    r = entry[key]
    if not (isinstance(r, list) and len(r) == 2 and all(_is_int(v) and v >= 0 for v in r)):
        raise ValueError(f"{where}: {key} must be [offset, length] of non-negative ints, got {r!r}")
    off, length = r
    if off + length > data_len:
        raise ValueError(f"{where}: {key} bytes [{off}, {off + length}) run past the data area ({data_len} bytes)")
    if length != expect:
        raise ValueError(f"{where}: {key} has {length} bytes but its shape and storage need {expect}")
    return off, length


def _check_entry(e, i: int, data_len: int, int_storages: tuple[str, ...]) -> list[tuple[int, int]]:
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
        if storage not in int_storages:
            raise ValueError(f"{where}: storage {storage!r} is not one of {int_storages}")
        expect = (numel * bits + 7) // 8 if storage == "packed" else numel
        return [_range(e, "data", data_len, expect, where), _range(e, "scale", data_len, 2 * shape[0], where)]
    expected_storage = {"fp16": "float16", "fp32": "float32", "raw": dtype}.get(kind)
    if expected_storage is None:
        raise ValueError(f"{where}: unknown kind {kind!r}")
    if storage != expected_storage or bits != 0 or e["scale"] is not None:
        raise ValueError(f"{where}: kind {kind} must have storage {expected_storage}, bits 0 and no scale")
    if kind != "raw" and dtype not in _FLOAT_NAMES:
        raise ValueError(f"{where}: kind {kind} needs a float original dtype, got {dtype}")
    itemsize = np.dtype(_DTYPES[storage][0]).itemsize
    return [_range(e, "data", data_len, numel * itemsize, where)]


def _check_header(header_bytes, version: int, bounds: list[int]) -> dict:
    """The validated header. `bounds` are the data sections' end offsets in the data area (version 1:
    one section); every byte range must lie inside one section, and together they tile the area."""
    header = json.loads(bytes(header_bytes).decode("utf-8"))
    if not isinstance(header, dict) or set(header) != HEADER_KEYS[version]:
        raise ValueError(f"header must be an object with keys {sorted(HEADER_KEYS[version])}")
    if header["format"] != "golf-quant" or type(header["version"]) is not int or header["version"] != version:
        raise ValueError(f"header format/version {header['format']!r}/{header['version']!r} not supported")
    if not isinstance(header["tensors"], list) or len(header["tensors"]) > MAX_TENSORS:
        raise ValueError(f"header tensors must be a list of at most {MAX_TENSORS} entries")
    if version == 1:
        if not isinstance(header["bitpack"], bool):
            raise ValueError("header bitpack must be a bool")
        storages = ("packed",) if header["bitpack"] else ("int8",)
    else:
        names = header["sections"]
        if not (isinstance(names, list) and len(names) == len(bounds) and len(set(names)) == len(names)
                and all(isinstance(n, str) and 0 < len(n) <= MAX_SECTION_NAME for n in names)):
            raise ValueError(f"header sections must be {len(bounds)} unique names of 1..{MAX_SECTION_NAME} chars")
        storages = ("int8", "packed")
    data_len = bounds[-1] if bounds else 0
    ranges, seen = [], set()
    for i, e in enumerate(header["tensors"]):
        ranges += _check_entry(e, i, data_len, storages)
        if e["name"] in seen:
            raise ValueError(f"tensor {e['name']!r} appears twice")
        seen.add(e["name"])
    pos = 0
    for off, length in sorted(ranges):
        if off != pos:
            raise ValueError(f"data area byte ranges overlap or leave a gap at offset {min(off, pos)}")
        if length and off + length > bounds[bisect.bisect_right(bounds, off)]:
            raise ValueError(f"byte range [{off}, {off + length}) crosses a section boundary")
        pos += length
    if pos != data_len:
        raise ValueError(f"data area has {data_len - pos} bytes not covered by any tensor")
    return header


def _array(data, r: list, np_dtype: str) -> np.ndarray:
    return np.frombuffer(data, dtype=np_dtype, count=r[1] // np.dtype(np_dtype).itemsize, offset=r[0]).copy()


def _decode(e: dict, data) -> Tensor:
    shape, kind, dtype = e["shape"], e["kind"], e["dtype"]
    out_dtype = _DTYPES[dtype][1]
    if kind == "int":
        bits, qm = e["bits"], qmax(e["bits"])
        if e["storage"] == "packed":
            q = unpack_bits(data[e["data"][0]:sum(e["data"])], bits, shape[0] * shape[1])
        else:
            q = _array(data, e["data"], "|i1")
        if q.size and (q.min() < -qm or q.max() > qm):
            raise ValueError(f"tensor {e['name']!r}: values outside the int{bits} grid [-{qm}, {qm}]")
        s = _array(data, e["scale"], "<f2")
        if not (np.isfinite(s).all() and (s >= FP16_MIN_NORMAL).all()):
            raise ValueError(f"tensor {e['name']!r}: row scales must be finite and >= {FP16_MIN_NORMAL}")
        return dequantize_rows(torch.from_numpy(q).reshape(shape), torch.from_numpy(s), dtype=out_dtype)
    a = _array(data, e["data"], _DTYPES[e["storage"]][0])
    if kind in ("fp16", "fp32"):
        if not np.isfinite(a).all():
            raise ValueError(f"tensor {e['name']!r}: non-finite values")
        return torch.from_numpy(a).to(out_dtype).reshape(shape)
    if dtype == "bool" and a.size and a.view(np.uint8).max() > 1:
        raise ValueError(f"tensor {e['name']!r}: bool bytes other than 0/1")
    t = torch.from_numpy(a)
    return (t.view(torch.bfloat16) if dtype == "bfloat16" else t).reshape(shape)


def _v2_table(blob, prefix, source: str, max_raw_bytes: int) -> list:
    table = read_table(blob, prefix, source, max_raw_bytes)
    if table[0].raw_len > MAX_HEADER_BYTES:
        raise ArtifactError(f"{source}: header section of {table[0].raw_len} bytes, above {MAX_HEADER_BYTES}")
    return table


def _ends(lengths) -> list[int]:
    ends, pos = [], 0
    for n in lengths:
        pos += n
        ends.append(pos)
    return ends


def _checked_header(header_bytes, version: int, bounds: list[int], source: str, what: str = "bad header") -> dict:
    try:
        return _check_header(header_bytes, version, bounds)
    except Exception as exc:  # noqa: BLE001  schema checks raise ValueError; the net also catches the rest
        raise ArtifactError(f"{source}: {what}: {type(exc).__name__}: {exc}") from None


def _v2_data(blob, prefix, table: list, header_raw: bytes, source: str) -> bytearray:
    """The data sections inflated one at a time into one buffer of the size the (checked) table and
    header declare, each bounded by its raw length; then the prefix's CRC over header + data."""
    data = bytearray(sum(e.raw_len for e in table[1:]))
    crc, pos = zlib.crc32(header_raw), 0
    for i, entry in enumerate(table[1:], start=1):
        raw = decode_section(blob, entry, i, source)
        data[pos:pos + len(raw)] = raw
        crc = zlib.crc32(raw, crc)
        pos += len(raw)
        del raw
    if crc != prefix.raw_crc:
        raise ArtifactError(f"{source}: raw payload CRC-32 mismatch: the sections decode to other bytes")
    return data


def unpack_model(blob: bytes, source: str = "<artifact>", max_raw_bytes: int = MAX_RAW_BYTES) -> dict[str, Tensor]:
    """Artifact bytes (version 1 or 2) -> {name: tensor}: dequantized floats in their original dtype,
    raw tensors exact. Any malformed input raises ArtifactError naming `source`. Version 2: the
    header is read and checked against the section table before any data section is inflated."""
    prefix = read_prefix(blob, source)
    if prefix.version == 1:
        from quant.artifact_v1 import open_v1, v1_parts  # only old files: a run reads back version 2

        raw = open_v1(blob, prefix, source, max_raw_bytes)
        try:
            header_bytes, data = v1_parts(raw)
        except Exception as exc:  # noqa: BLE001
            raise ArtifactError(f"{source}: bad header or data: {type(exc).__name__}: {exc}") from None
        header = _checked_header(header_bytes, 1, [len(data)], source, "bad header or data")
    else:
        table = _v2_table(blob, prefix, source, max_raw_bytes)
        header_raw = decode_section(blob, table[0], 0, source)
        header = _checked_header(header_raw, 2, _ends(e.raw_len for e in table[1:]), source, "bad header or data")
        data = _v2_data(blob, prefix, table, header_raw, source)
    try:
        return {e["name"]: _decode(e, data) for e in header["tensors"]}
    except Exception as exc:  # noqa: BLE001  value checks raise ValueError; the net also catches the rest
        raise ArtifactError(f"{source}: bad header or data: {type(exc).__name__}: {exc}") from None


def artifact_sections(blob: bytes, source: str = "<artifact>", max_raw_bytes: int = MAX_RAW_BYTES) -> list[dict]:
    """One row per section, for size logs: name, compressor, transform, raw_bytes, compressed_bytes,
    tensors (those with bytes in it) and params (elements of the tensors whose values are in it).
    Version 2 decompresses only the header; version 1 is one section, "payload". The file is
    len(blob) = 29 + 24 * len(rows) + the compressed bytes (version 1: 27 + compressed bytes)."""
    prefix = read_prefix(blob, source)
    if prefix.version == 1:
        from quant.artifact_v1 import open_v1, v1_parts

        raw = open_v1(blob, prefix, source, max_raw_bytes)
        rows = [{"name": "payload", "compressor": COMPRESSOR_NAMES[prefix.compressor_id], "transform": "none",
                 "raw_bytes": prefix.raw_len, "compressed_bytes": len(blob) - PREFIX.size}]
    else:
        table = _v2_table(blob, prefix, source, max_raw_bytes)
        raw = decode_section(blob, table[0], 0, source)
        rows = [{"name": "header", "compressor": e.compressor, "transform": e.transform, "raw_bytes": e.raw_len,
                 "compressed_bytes": e.comp_len} for e in table]
    try:
        if prefix.version == 1:
            header_bytes, data = v1_parts(raw)
            bounds, first = [len(data)], 0
        else:
            header_bytes, bounds, first = raw, _ends(e.raw_len for e in table[1:]), 1
        header = _check_header(header_bytes, prefix.version, bounds)
    except Exception as exc:  # noqa: BLE001
        raise ArtifactError(f"{source}: bad header: {type(exc).__name__}: {exc}") from None
    for i, row in enumerate(rows):
        row.update(tensors=0, params=0)
        if prefix.version == 2 and i > 0:
            row["name"] = header["sections"][i - 1]
    for e in header["tensors"]:
        where = {first + bisect.bisect_right(bounds, e[k][0]) for k in ("data", "scale") if e[k] and e[k][1]}
        for i in where:
            rows[i]["tensors"] += 1
        if e["data"][1]:
            rows[first + bisect.bisect_right(bounds, e["data"][0])]["params"] += int(np.prod(e["shape"]))
    return rows


def read_artifact(path, max_bytes: int = MAX_FILE_BYTES) -> bytes:
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
    as stored one int8 per value (`raw_bytes`) and bit-packed (`packed_bytes`), scales included.
    (Compressed bytes per section of a written artifact: `artifact_sections`.)"""
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
