"""quant/artifact.py + quant/codec.py (container format, bit packing, hostile inputs) and quant/budget.py."""
from __future__ import annotations

import itertools
import json
import random
import struct
import zlib

import numpy as np
import pytest
import torch

from quant.artifact import (MAGIC, PREFIX, ArtifactError, artifact_breakdown, blob_compressor, pack_model,
                            read_artifact, seal, unpack_model, write_artifact)
from quant.budget import ARTIFACT_LIMIT, BudgetReport, code_bytes
from quant.codec import COMPRESSORS, available_compressors, compress_bytes, pack_bits, unpack_bits
from quant.container import COUNT, TABLE_ENTRY, encode_section, read_prefix, read_table, seal_sections
from quant.int6 import dequantize_rows, quantize_rows
from quant.policy import make_precision_fn

PRECISION = make_precision_fn(6, 8)
AVAILABLE = available_compressors()


def toy_state_dict(seed: int = 0, rows: int = 48) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "tok_emb.weight": torch.randn(rows, 96, generator=g) * 0.02,  # int8 embedding
        "blocks.0.mlp.fc.weight": torch.randn(rows * 2, 64, generator=g) * 0.05,  # int6 matrix
        "blocks.0.mixer.w_r.weight": (torch.randn(64, 80, generator=g) * 0.05).bfloat16(),  # int6 from bf16
        "blocks.0.mix_scale": torch.rand(64, generator=g),  # fp32 control
        "blocks.0.resid_mix": torch.randn(2, 64, generator=g),  # fp32 (thin 2-D)
        "big_vector": torch.randn(5000, generator=g).half(),  # fp16 passthrough
        "blocks.0.mixer.ve_scale": torch.tensor(0.5),  # 0-d
        "step_counter": torch.tensor([7, -3, 2**40], dtype=torch.int64),  # raw
        "mask": torch.tensor([[True, False], [False, True]]),  # raw bool
    }


def expected(name: str, t: torch.Tensor) -> torch.Tensor:
    p = PRECISION(name, t)
    if p.kind == "int":
        return dequantize_rows(*quantize_rows(t, p.bits), dtype=t.dtype)
    if p.kind == "fp16":
        return t.half().to(t.dtype)
    return t.clone()


def pack_v1(state_dict, precision_fn, compressor: str = "zlib", bitpack: bool = False) -> bytes:
    """An independent format-version-1 writer, from docs/ARTIFACT.md §10 (the library only reads v1)."""
    entries, groups = [], [[], [], [], []]  # int payloads, fp16 (scales too), fp32, raw
    for name, t in state_dict.items():
        kind, bits = precision_fn(name, t)[:2]
        dtype = str(t.dtype).removeprefix("torch.")
        e = {"name": name, "shape": list(t.shape), "dtype": dtype, "kind": kind, "bits": 0, "scale": None}
        entries.append(e)
        if kind == "int":
            q, s = quantize_rows(t, bits)
            e.update(bits=bits, storage="packed" if bitpack else "int8")
            groups[0].append((e, "data", pack_bits(q, bits) if bitpack else q.numpy().tobytes()))
            groups[1].append((e, "scale", s.numpy().tobytes()))
        elif kind in ("fp16", "fp32"):
            e["storage"] = {"fp16": "float16", "fp32": "float32"}[kind]
            t = t.to({"fp16": torch.float16, "fp32": torch.float32}[kind])
            groups[1 if kind == "fp16" else 2].append((e, "data", t.numpy().tobytes()))
        else:
            e["storage"] = dtype
            groups[3].append((e, "data", (t.view(torch.int16) if dtype == "bfloat16" else t).numpy().tobytes()))
    data = b""
    for e, part, b in (item for g in groups for item in g):
        e[part] = [len(data), len(b)]
        data += b
    header = json.dumps({"format": "golf-quant", "version": 1, "bitpack": bitpack, "tensors": entries}).encode()
    raw = struct.pack("<I", len(header)) + header + data
    return seal(MAGIC, 1, COMPRESSORS[compressor], len(raw), zlib.crc32(raw), compress_bytes(raw, compressor, None))


def small_sd() -> dict[str, torch.Tensor]:
    return {"tok_emb.weight": torch.randn(20, 24) * 0.02, "blocks.0.mlp.fc.weight": torch.randn(64, 72) * 0.05,
            "gain": torch.ones(4), "n": torch.tensor([1, 2], dtype=torch.int32)}


def small_artifact(compressor: str = "zlib", bitpack: bool = False, version: int = 2) -> bytes:
    if version == 1:
        return pack_v1(small_sd(), PRECISION, compressor, bitpack)
    return pack_model(small_sd(), PRECISION, compressor=compressor, bitpack=bitpack)


def _mutated(header: dict, data: bytes, mutate) -> tuple[dict, bytes]:
    out = mutate(header, bytearray(data)) if mutate.__code__.co_argcount == 2 else mutate(header)
    return header, bytes(out) if isinstance(out, (bytes, bytearray)) else data


def forge(blob: bytes, mutate) -> bytes:
    """Re-serialize a zlib artifact of either version after `mutate(header)` (or `mutate(header, data)
    -> data`, data being the whole data area), with correct CRCs and lengths, so that only the schema
    checks can catch it. Version 2 keeps the section boundaries; extra data goes to the last section."""
    if read_prefix(blob, "forge").version == 1:
        raw = zlib.decompress(blob[PREFIX.size:])
        (hlen,) = struct.unpack_from("<I", raw, 0)
        header, data = _mutated(json.loads(raw[4:4 + hlen]), raw[4 + hlen:], mutate)
        hb = json.dumps(header).encode()
        new_raw = struct.pack("<I", len(hb)) + hb + data
        return seal(MAGIC, 1, COMPRESSORS["zlib"], len(new_raw), zlib.crc32(new_raw), zlib.compress(new_raw))
    raws = v2_raws(blob)
    header, data = _mutated(json.loads(raws[0]), b"".join(raws[1:]), mutate)
    cuts = np.cumsum([0] + [len(r) for r in raws[1:-1]] + [len(data)]).tolist()
    return seal_v2([json.dumps(header).encode()] + [data[a:b] for a, b in itertools.pairwise(cuts)])


def v2_raws(blob: bytes) -> list[bytes]:
    """The raw bytes of every section of a valid version-2 artifact."""
    from quant.container import decode_section
    prefix = read_prefix(blob, "raws")
    return [decode_section(blob, e, i, "raws") for i, e in enumerate(read_table(blob, prefix, "raws", 1 << 31))]


def seal_v2(raws: list[bytes], compressor: str = "zlib") -> bytes:
    """A well-sealed version-2 file of these raw sections (section 0 is the header)."""
    crc = 0
    for r in raws:
        crc = zlib.crc32(r, crc)
    return seal_sections([encode_section(r, compressor) for r in raws], crc)


def assert_rejected(blob, source: str = "fuzz.ptz", match: str | None = None) -> None:
    with pytest.raises(ArtifactError) as info:
        unpack_model(blob, source=source)
    assert str(info.value).startswith(f"{source}: "), str(info.value)
    if match is not None:
        assert match in str(info.value), str(info.value)


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("bitpack", [False, True])
@pytest.mark.parametrize(("compressor", "version"), [(c, v) for c in COMPRESSORS for v in (1, 2)] + [("auto", 2)])
def test_round_trip_every_compressor(compressor, bitpack, version):
    if compressor not in [*AVAILABLE, "auto"]:
        pytest.skip(f"{compressor} not installed")
    sd = toy_state_dict()
    pack = (lambda: pack_v1(sd, PRECISION, compressor, bitpack)) if version == 1 else (
        lambda: pack_model(sd, PRECISION, compressor=compressor, bitpack=bitpack))
    blob = pack()
    assert blob[:8] == MAGIC and read_prefix(blob, "rt").version == version
    assert blob_compressor(blob) == (compressor if compressor != "auto" else "mixed")
    out = unpack_model(blob, source="rt")
    assert list(out) == list(sd)
    for name, t in sd.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape, name
        assert torch.equal(out[name], expected(name, t)), name
    assert pack() == blob  # deterministic


def test_auto_keeps_the_smallest():
    sd = toy_state_dict(rows=64)
    sizes = {c: len(pack_model(sd, PRECISION, compressor=c)) for c in AVAILABLE}
    blob = pack_model(sd, PRECISION, compressor="auto")
    assert len(blob) <= min(sizes.values())


def test_pack_model_refuses_bad_inputs():
    with pytest.raises(ValueError, match="NaN"):
        pack_model({"blocks.0.mlp.fc.weight": torch.full((64, 128), float("nan"))}, PRECISION)
    with pytest.raises(ValueError, match="fp16 range"):
        pack_model({"big_vector": torch.full((5000,), 1e6)}, PRECISION)
    with pytest.raises(ValueError, match="compressor"):
        pack_model({"x": torch.ones(3)}, PRECISION, compressor="gzip")
    with pytest.raises(ValueError, match="int precision"):
        pack_model({"x": torch.ones(3)}, lambda n, t: ("int", 6))
    with pytest.raises(ValueError, match="bitpack"):
        pack_model({"x": torch.ones(3)}, PRECISION, bitpack="yes")


def test_file_io(tmp_path):
    blob = small_artifact()
    path = tmp_path / "sub" / "model.ptz"
    assert write_artifact(path, blob) == len(blob) == path.stat().st_size
    assert read_artifact(path) == blob
    with pytest.raises(ArtifactError, match="missing.ptz"):
        read_artifact(tmp_path / "missing.ptz")
    with pytest.raises(ArtifactError, match="larger than"):
        read_artifact(path, max_bytes=10)


def test_breakdown_counts_every_parameter():
    sd = toy_state_dict()
    groups = artifact_breakdown(sd, PRECISION)
    assert sum(g["params"] for g in groups.values()) == sum(t.numel() for t in sd.values())
    assert groups["embeddings"]["tensors"] == 1 and groups["matrices"]["tensors"] == 2
    fc, emb = 96 * 64, 48 * 96
    assert groups["embeddings"]["raw_bytes"] == emb + 2 * 48
    assert groups["matrices"]["packed_bytes"] == (fc * 6 + 7) // 8 + 2 * 96 + (64 * 80 * 6 + 7) // 8 + 2 * 64


# ----------------------------------------------------------------------------- bit packing

@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_bits_round_trip(bits):
    rng = np.random.default_rng(bits)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    for n in (0, 1, 2, 3, 5, 7, 8, 9, 13, 1001, 8 * 65536 + 3):
        q = rng.integers(lo, hi + 1, size=n).astype(np.int8)
        buf = pack_bits(torch.from_numpy(q), bits)
        assert len(buf) == (n * bits + 7) // 8
        np.testing.assert_array_equal(unpack_bits(buf, bits, n), q)


def test_pack_bits_layout_and_errors():
    # 6 bits: offset values 1, 2, 3, 4 -> 1 | 2<<6 | 3<<12 | 4<<18 = 0x103081, little-endian
    assert pack_bits(np.array([1, 2, 3, 4]) - 32, 6) == b"\x81\x30\x10"
    with pytest.raises(ValueError):
        pack_bits(np.array([32]), 6)
    with pytest.raises(ValueError):
        unpack_bits(b"\x81\x30", 6, 4)  # too short
    with pytest.raises(ValueError):
        unpack_bits(b"\xff", 6, 1)  # nonzero padding bits
    with pytest.raises(ValueError):
        pack_bits(np.array([0]), 9)


# ----------------------------------------------------------------------------- hostile inputs

def test_random_bytes_rejected():
    rng = random.Random(0)
    for n in (0, 1, 7, 22, 23, 24, 100, 5000):
        assert_rejected(bytes(rng.getrandbits(8) for _ in range(n)))
    for i in range(200):  # a well-sealed prefix followed by garbage, so the decoders see it, every compressor
        comp = rng.choice(list(COMPRESSORS.values()))
        body = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 300)))
        if i % 2:  # version 2: a plausible table, so the section decoders see garbage too
            n = rng.randrange(1, 4)
            rows = [TABLE_ENTRY.pack(comp, 0, 0, 0, rng.getrandbits(32), rng.randrange(1, 10**4),
                                     rng.randrange(1, 100)) for _ in range(n)]
            body = COUNT.pack(n) + b"".join(rows) + body
        sealed = seal(MAGIC, 1 + i % 2, comp, rng.randrange(4, 10**6), rng.getrandbits(32), body)
        assert_rejected(sealed)
        assert_rejected(sealed[:PREFIX.size - 1] + bytes([sealed[PREFIX.size - 1] ^ 1]) + body, match="file CRC")
    assert_rejected("not bytes", match="expected bytes")


@pytest.mark.parametrize("compressor", list(COMPRESSORS))
def test_every_truncation_rejected_v1(compressor):
    if compressor not in AVAILABLE:
        pytest.skip(f"{compressor} not installed")
    blob = small_artifact(compressor, bitpack=compressor == "zstd", version=1)
    fields, body = PREFIX.unpack_from(blob)[:5], blob[PREFIX.size:]
    step = max(1, len(blob) // 400)
    for n in [*range(0, len(blob), step), len(blob) - 1]:
        assert_rejected(blob[:n])  # caught by the length or the file CRC
    for n in [*range(0, len(body), step), len(body) - 1]:
        # re-sealed, so the decompressor itself must notice the stream ends early
        assert_rejected(seal(*fields, body[:n]), match="decompress")
    assert_rejected(blob + b"\x00", match="file CRC")
    assert_rejected(seal(*fields, body + b"\x00"), match="decompress")  # trailing bytes after the stream


@pytest.mark.parametrize("compressor", list(COMPRESSORS))
def test_every_truncation_rejected_v2(compressor):
    if compressor not in AVAILABLE:
        pytest.skip(f"{compressor} not installed")
    blob = small_artifact(compressor, bitpack=compressor == "zstd")
    step = max(1, len(blob) // 400)
    for n in [*range(0, len(blob), step), len(blob) - 1]:
        assert_rejected(blob[:n])  # caught by the length or the file CRC
    assert_rejected(blob + b"\x00", match="file CRC")
    raws = v2_raws(blob)
    sections = [encode_section(r, compressor) for r in raws]
    crc = zlib.crc32(b"".join(raws))
    for i, sec in enumerate(sections):
        cut = sec.payload
        for n in [*range(0, len(cut), max(1, len(cut) // 40)), len(cut) - 1]:
            # every length in the table agrees with the cut stream, so the decompressor must notice
            bad = [*sections[:i], sec._replace(payload=cut[:n]), *sections[i + 1:]]
            assert_rejected(seal_sections(bad, crc), match=f"section {i}")
        longer = [*sections[:i], sec._replace(payload=cut + b"\x00"), *sections[i + 1:]]
        assert_rejected(seal_sections(longer, crc), match="decompress")  # trailing bytes after the stream


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("compressor", list(COMPRESSORS))
def test_byte_flips_rejected(compressor, version):
    if compressor not in AVAILABLE:
        pytest.skip(f"{compressor} not installed")
    blob = small_artifact(compressor, bitpack=True, version=version)
    step = max(1, len(blob) // 300)
    for i in range(0, len(blob), step):
        for mask in (0x01, 0x80):
            bad = bytearray(blob)
            bad[i] ^= mask
            assert_rejected(bytes(bad))


def test_prefix_errors_are_specific():
    blob = small_artifact(version=1)
    magic, version, comp, raw_len, crc, _ = PREFIX.unpack_from(blob)
    body = blob[PREFIX.size:]
    assert seal(magic, version, comp, raw_len, crc, body) == blob
    assert_rejected(b"NOTGOLF\x00" + blob[8:], match="bad magic")
    assert_rejected(seal(magic, 3, comp, raw_len, crc, body), match="version 3")
    assert_rejected(seal(magic, 0, comp, raw_len, crc, body), match="version 0")
    assert_rejected(seal(magic, 2, comp, raw_len, crc, body))  # a v1 body read as v2
    assert_rejected(blob[:-1] + bytes([blob[-1] ^ 0x40]), match="file CRC")
    assert_rejected(seal(magic, version, 99, raw_len, crc, body), match="compressor id 99")
    assert_rejected(seal(magic, version, comp, 10**15, crc, body), match="above")
    assert_rejected(seal(magic, version, comp, raw_len + 1, crc, body))
    assert_rejected(seal(magic, version, comp, raw_len - 1, crc, body))
    assert_rejected(seal(magic, version, comp, raw_len, crc ^ 1, body), match="raw payload CRC")
    with pytest.raises(ArtifactError, match="limit"):
        unpack_model(blob, source="x", max_raw_bytes=raw_len - 1)


def _set(entry_name: str, key: str, value):
    def mutate(header):
        for e in header["tensors"]:
            if e["name"] == entry_name:
                e[key] = value
    return mutate


FC = "blocks.0.mlp.fc.weight"
FORGERIES = {
    "offset past the end": _set(FC, "data", [10**9, 64 * 72]),
    "length mismatch": _set(FC, "data", [0, 100]),
    "shape too big": _set(FC, "shape", [10**8, 10**8]),
    "negative dim": _set(FC, "shape", [-64, -72]),
    "float dim": _set(FC, "shape", [64.0, 72]),
    "bool offset": _set(FC, "data", [False, 64 * 72]),
    "3-D int tensor": _set(FC, "shape", [8, 8, 72]),
    "bits 9": _set(FC, "bits", 9),
    "unknown kind": _set(FC, "kind", "int4"),
    "unknown dtype": _set(FC, "dtype", "complex64"),
    "wrong storage": _set(FC, "storage", "float16"),
    "missing scale": _set(FC, "scale", None),
    "extra key": _set(FC, "comment", "hi"),
    "overlap": _set("gain", "data", [0, 16]),
    "duplicate name": _set("gain", "name", FC),
    "empty name": _set("gain", "name", ""),
    "fp32 with scale": _set("gain", "scale", [0, 2]),
    "other version": lambda h: h.update(version=3 - h["version"]),
    "float version": lambda h: h.update(version=float(h["version"])),  # 2.0 is not the integer 2
    "bool version": lambda h: h.update(version=True),
    "not a list": lambda h: h.update(tensors={}),
    "extra top key": lambda h: h.update(extra=1),
    "gap": lambda h, d: d + b"\x00\x00",
    "int8 below grid": lambda h, d: bytes([0x80]) + d[1:],  # -128 is not on the int6 grid
    "nan scale": lambda h, d: _poke_scale(h, d, b"\x00\x7e"),
    "zero scale": lambda h, d: _poke_scale(h, d, b"\x00\x00"),
}
V1_FORGERIES = {
    "storage disagrees with bitpack": _set(FC, "storage", "packed"),
    "sections key in v1": lambda h: h.update(sections=[]),
}
V2_FORGERIES = {
    "bitpack key in v2": lambda h: h.update(bitpack=False),
    "one section name short": lambda h: h["sections"].pop(),
    "one section name extra": lambda h: h["sections"].append("more"),
    "duplicate section name": lambda h: h["sections"].__setitem__(1, h["sections"][0]),
    "empty section name": lambda h: h["sections"].__setitem__(0, ""),
    "long section name": lambda h: h["sections"].__setitem__(0, "x" * 65),
    "sections not a list": lambda h: h.update(sections="int6.mlp"),
}


def _poke_scale(header, data, value: bytes):
    off = next(e for e in header["tensors"] if e["name"] == FC)["scale"][0]
    return data[:off] + value + data[off + 2:]


@pytest.mark.parametrize(("version", "case"), [(v, c) for v in (1, 2) for c in FORGERIES]
                         + [(1, c) for c in V1_FORGERIES] + [(2, c) for c in V2_FORGERIES])
def test_forged_headers_rejected(version, case):
    blob = small_artifact("zlib", version=version)
    unpack_model(forge(blob, lambda h: None), source="ok")  # the forging itself keeps files valid
    assert_rejected(forge(blob, {**FORGERIES, **V1_FORGERIES, **V2_FORGERIES}[case]), match="bad header or data")


def test_forged_v2_header_json():
    blob = small_artifact("zlib")
    data = v2_raws(blob)[1:]
    for header in (b"{}", b"{nope", b"[]", b"\xff\xfe\xfd", b"[[[[", b"[" * 200000, b"null"):
        assert_rejected(seal_v2([header, *data]), match="bad header or data")
    assert_rejected(seal_v2([b"{}"]), match="bad header or data")
    unpack_model(blob)


def test_forged_header_length_and_json():
    blob = small_artifact("zlib")
    for raw in (struct.pack("<I", 10**6) + b"{}", struct.pack("<I", 5) + b"{nope", struct.pack("<I", 2) + b"[]",
                struct.pack("<I", 3) + b"\xff\xfe\xfd", b"\x00\x00\x00\x00", struct.pack("<I", 4) + b"[[[["):
        assert_rejected(seal(MAGIC, 1, COMPRESSORS["zlib"], len(raw), zlib.crc32(raw), zlib.compress(raw)))
    deep = struct.pack("<I", 200000) + b"[" * 200000  # JSON nesting past the recursion limit
    assert_rejected(seal(MAGIC, 1, 1, len(deep), zlib.crc32(deep), zlib.compress(deep)))
    assert blob  # the valid one still loads
    unpack_model(blob)


# ----------------------------------------------------------------------------- budget

def test_code_bytes_are_file_sizes(tmp_path):
    files = {"train_gpt.py": "print('hi')\n", "hybrid/layers.py": "x = 1\n" * 10, "quant/int6.py": "é\n"}
    paths = []
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text, encoding="utf-8")
        paths.append(tmp_path / rel)
    assert code_bytes(paths) == sum(len(t.encode("utf-8")) for t in files.values())


def test_budget_report():
    r = BudgetReport(code_bytes=50_000, model_bytes=15_000_000)
    assert (r.total, r.margin, r.fits, r.limit) == (15_050_000, 950_000, True, ARTIFACT_LIMIT)
    assert r.lines() == ["artifact_bytes:15050000 code_bytes:50000 model_bytes:15000000 limit:16000000 margin:950000"]
    assert BudgetReport(code_bytes=0, model_bytes=ARTIFACT_LIMIT).fits
    over = BudgetReport(code_bytes=60_000, model_bytes=15_990_000)
    assert not over.fits and over.margin == -50_000
    assert over.lines()[-1] == "artifact_over_budget:by_bytes:50000"
