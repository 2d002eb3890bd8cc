"""The artifact's container: prefix, section table and compressed sections (spec: docs/ARTIFACT.md).

How this works
--------------
    prefix (27 bytes, both versions): magic b"GOLFQNT\\x00" | u16 version | u8 compressor id
                                      | u64 raw length | u32 raw CRC-32 | u32 file CRC-32
    version 1: prefix | one compressed stream, the raw payload
    version 2: prefix | u16 section count n | n table entries (24 bytes each) | n compressed streams

A version-2 table entry is: u8 compressor id | u8 transform id | u8 transform parameter | u8 0
| u32 CRC-32 of the section's raw bytes | u64 raw length | u64 compressed length. Each section is
transformed (quant/codec.py: "none" or a byte shuffle), then compressed on its own. The raw payload
of a version-2 file is its sections' raw bytes back to back; the prefix's raw length and raw CRC
describe it in both versions, and the prefix's compressor id is the one every section uses, or
MIXED (0) when they differ. The file CRC covers every byte but its own four, table included, and is
checked before anything is decompressed.

This module knows nothing of tensors: quant/artifact.py decides what goes in which section.
"""
from __future__ import annotations

import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

from quant.codec import (COMPRESSORS, apply_transform, available_compressors, compress_bytes, decompress_bytes,
                         invert_transform, transform_code, transform_name)

MAGIC = b"GOLFQNT\x00"
VERSIONS = (1, 2)
PREFIX = struct.Struct("<8sHBQII")
_FILE_CRC_AT = PREFIX.size - 4
COUNT = struct.Struct("<H")
TABLE_ENTRY = struct.Struct("<BBBBIQQ")
MIXED = 0  # prefix compressor id of a version-2 file whose sections use different compressors
MAX_SECTIONS = 1024
MAX_HEADER_BYTES = 1 << 22  # a real header is ~30 kB of JSON for ~150 tensors
COMPRESSOR_NAMES = {v: k for k, v in COMPRESSORS.items()}


class ArtifactError(ValueError):
    """A malformed, truncated, corrupted or hostile artifact; the message starts with its source."""


class Prefix(NamedTuple):
    version: int
    compressor_id: int
    raw_len: int
    raw_crc: int


class Section(NamedTuple):
    """One encoded section: how it was encoded, and the compressed stream."""

    compressor: str
    transform: str
    raw_len: int
    raw_crc: int
    payload: bytes


class TableEntry(NamedTuple):
    """One validated row of a version-2 section table, with where its stream lies in the file."""

    compressor: str
    transform: str
    raw_len: int
    raw_crc: int
    offset: int
    comp_len: int


# ----------------------------------------------------------------------------- writing

def encode_section(raw: bytes, compressor: str, transform: str = "none", level: int | None = None) -> Section:
    data = apply_transform(raw, transform)
    return Section(compressor, transform, len(raw), zlib.crc32(raw), compress_bytes(data, compressor, level))


def smallest_sections(jobs: list[list[tuple[bytes, str, str]]], level: int | None = None,
                      workers: int | None = None) -> list[tuple[int, Section]]:
    """For each job, a list of candidate (raw bytes, compressor, transform): the index and encoding of
    the candidate with the shortest stream; ties go to the earlier candidate. All candidates are
    compressed on a thread pool (zlib, lzma, zstandard and brotli release the GIL), largest first."""
    tasks = [(j, i, cand) for j, job in enumerate(jobs) for i, cand in enumerate(job)]
    if workers is None:
        workers = min(len(tasks), os.cpu_count() or 1)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        futures = {k: pool.submit(encode_section, *tasks[k][2], level)
                   for k in sorted(range(len(tasks)), key=lambda k: -len(tasks[k][2][0]))}
        done = [futures[k].result() for k in range(len(tasks))]
    best: list[tuple[int, Section] | None] = [None] * len(jobs)
    for (j, i, _), sec in zip(tasks, done):
        if best[j] is None or len(sec.payload) < len(best[j][1].payload):
            best[j] = (i, sec)
    if any(b is None for b in best):
        raise ValueError("every job needs at least one candidate")
    return best


def seal(magic: bytes, version: int, compressor_id: int, raw_len: int, raw_crc: int, payload: bytes) -> bytes:
    """Prefix + body with the file CRC filled in: a version-1 file, or (tests) any forged file."""
    head = PREFIX.pack(magic, version, compressor_id, raw_len, raw_crc, 0)[:_FILE_CRC_AT]
    return head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))) + payload


def seal_sections(sections: list[Section], raw_crc: int) -> bytes:
    """A version-2 file. `raw_crc` is the CRC-32 of all sections' raw bytes back to back."""
    if not 1 <= len(sections) <= MAX_SECTIONS:
        raise ValueError(f"an artifact has 1..{MAX_SECTIONS} sections, got {len(sections)}")
    names = {s.compressor for s in sections}
    comp_id = COMPRESSORS[names.pop()] if len(names) == 1 else MIXED
    table = [COUNT.pack(len(sections))]
    for s in sections:
        tid, param = transform_code(s.transform)
        table.append(TABLE_ENTRY.pack(COMPRESSORS[s.compressor], tid, param, 0, s.raw_crc, s.raw_len, len(s.payload)))
    body = b"".join(table + [s.payload for s in sections])
    return seal(MAGIC, 2, comp_id, sum(s.raw_len for s in sections), raw_crc, body)


# ----------------------------------------------------------------------------- reading

def read_prefix(blob, source: str, check_file_crc: bool = True) -> Prefix:
    """The validated prefix; with `check_file_crc`, also the CRC of the whole file."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise ArtifactError(f"{source}: expected bytes, got {type(blob).__name__}")
    if len(blob) < PREFIX.size:
        raise ArtifactError(f"{source}: truncated: {len(blob)} bytes, the fixed prefix alone is {PREFIX.size}")
    magic, version, comp_id, raw_len, crc, file_crc = PREFIX.unpack_from(blob, 0)
    if magic != MAGIC:
        raise ArtifactError(f"{source}: bad magic {magic!r}: not a golf quant artifact")
    if version not in VERSIONS:
        raise ArtifactError(f"{source}: unsupported format version {version} (this reader knows {VERSIONS})")
    if check_file_crc:
        view = memoryview(blob)
        if zlib.crc32(view[PREFIX.size:], zlib.crc32(view[:_FILE_CRC_AT])) != file_crc:
            raise ArtifactError(f"{source}: file CRC-32 mismatch: the file is truncated or corrupted")
    if comp_id not in COMPRESSOR_NAMES and not (version == 2 and comp_id == MIXED):
        raise ArtifactError(f"{source}: unknown compressor id {comp_id}")
    return Prefix(version, comp_id, raw_len, crc)


def _compressor(comp_id: int, source: str, where: str) -> str:
    name = COMPRESSOR_NAMES.get(comp_id)
    if name is None:
        raise ArtifactError(f"{source}: {where}unknown compressor id {comp_id}")
    if name not in available_compressors():
        raise ArtifactError(f"{source}: {where}compressor {name} is not installed here")
    return name


def _check_raw_len(raw_len: int, source: str, max_raw_bytes: int) -> None:
    if raw_len > max_raw_bytes:
        raise ArtifactError(f"{source}: declares {raw_len} raw bytes, above the {max_raw_bytes}-byte limit")


def _decompress(data, name: str, raw_len: int, source: str, what: str) -> bytes:
    try:
        raw = decompress_bytes(bytes(data), name, raw_len)
    except Exception as exc:  # noqa: BLE001  every decoder has its own exception types; all mean a bad stream
        raise ArtifactError(f"{source}: {what}{name} payload does not decompress: {type(exc).__name__}: {exc}") from None
    if len(raw) != raw_len:
        raise ArtifactError(f"{source}: {what}payload decompresses to {len(raw)} bytes, the file says {raw_len}")
    return raw


def read_table(blob, prefix: Prefix, source: str, max_raw_bytes: int) -> list[TableEntry]:
    """The validated section table of a version-2 file whose prefix (file CRC included) was read.
    Lengths are checked against each other, the prefix and the file before any decompression."""
    _check_raw_len(prefix.raw_len, source, max_raw_bytes)
    if len(blob) < PREFIX.size + COUNT.size:
        raise ArtifactError(f"{source}: truncated: no section count")
    (n,) = COUNT.unpack_from(blob, PREFIX.size)
    table_end = PREFIX.size + COUNT.size + n * TABLE_ENTRY.size
    if not 1 <= n <= MAX_SECTIONS or table_end > len(blob):
        raise ArtifactError(f"{source}: section count {n} is not in 1..{MAX_SECTIONS} or the table runs past the file")
    entries, offset, names = [], table_end, set()
    for i in range(n):
        comp_id, tid, param, zero, crc, raw_len, comp_len = TABLE_ENTRY.unpack_from(
            blob, PREFIX.size + COUNT.size + i * TABLE_ENTRY.size)
        name = _compressor(comp_id, source, f"section {i}: ")
        transform = transform_name(tid, param)
        if transform is None or zero != 0:
            raise ArtifactError(f"{source}: section {i}: unknown transform {tid}/{param} or nonzero reserved byte")
        if raw_len < 1 or comp_len < 1 or raw_len > prefix.raw_len or comp_len > len(blob):
            raise ArtifactError(f"{source}: section {i}: lengths raw {raw_len} / compressed {comp_len} out of range")
        entries.append(TableEntry(name, transform, raw_len, crc, offset, comp_len))
        names.add(name)
        offset += comp_len
    if offset != len(blob):
        raise ArtifactError(f"{source}: the sections' compressed lengths end at byte {offset}, the file at {len(blob)}")
    if sum(e.raw_len for e in entries) != prefix.raw_len:
        raise ArtifactError(f"{source}: the sections' raw lengths do not add up to the prefix's {prefix.raw_len}")
    expect_id = COMPRESSORS[next(iter(names))] if len(names) == 1 else MIXED
    if prefix.compressor_id != expect_id:
        raise ArtifactError(f"{source}: prefix compressor id {prefix.compressor_id} disagrees with the table's "
                            f"{sorted(names)}")
    return entries


def decode_section(blob, entry: TableEntry, index: int, source: str) -> bytes:
    """One section's raw bytes: decompressed (bounded by its raw length), untransformed, CRC-checked."""
    what = f"section {index}: "
    data = _decompress(memoryview(blob)[entry.offset:entry.offset + entry.comp_len], entry.compressor,
                       entry.raw_len, source, what)
    raw = invert_transform(data, entry.transform)
    if zlib.crc32(raw) != entry.raw_crc:
        raise ArtifactError(f"{source}: {what}raw CRC-32 mismatch: the decompressor output is corrupted")
    return raw


