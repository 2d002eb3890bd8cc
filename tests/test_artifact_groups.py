"""Artifact format version 2 (quant/container.py, quant/artifact.py): sections per tensor group, per-section
compressors and byte transforms, prequantized tensors, the size report, version-1 compatibility, and
hostile version-2 files."""
from __future__ import annotations

import base64
import hashlib
import random
import re
import struct
import zlib

import numpy as np
import pytest
import torch

from quant.artifact import MAX_HEADER_BYTES, ArtifactError, artifact_sections, blob_compressor, pack_model, unpack_model
from quant.codec import (COMPRESSORS, MAX_STRIDE, apply_transform, available_compressors, invert_transform,
                         shuffle_bytes, transform_code, transform_name, unshuffle_bytes)
from quant.container import COUNT, MAGIC, MAX_SECTIONS, PREFIX, TABLE_ENTRY, Section, seal, seal_sections
from quant.int6 import dequantize_rows, quantize_rows
from quant.policy import Precision, tensor_group
from tests.test_artifact_format import PRECISION, assert_rejected, expected, pack_v1, seal_v2, toy_state_dict, v2_raws

AVAILABLE = available_compressors()
TABLE_AT = PREFIX.size + COUNT.size


def reseal(blob) -> bytes:
    """`blob` with its file CRC recomputed, so that only the checks behind it can catch an edit."""
    blob = bytes(blob)
    crc = zlib.crc32(blob[PREFIX.size:], zlib.crc32(blob[:PREFIX.size - 4]))
    return blob[:PREFIX.size - 4] + struct.pack("<I", crc) + blob[PREFIX.size:]


def table(blob) -> list[list[int]]:
    (n,) = COUNT.unpack_from(blob, PREFIX.size)
    return [list(TABLE_ENTRY.unpack_from(blob, TABLE_AT + i * TABLE_ENTRY.size)) for i in range(n)]


def with_table(blob, rows, prefix_raw_len: int | None = None) -> bytes:
    """`blob` with its table rows (and optionally the prefix raw length) replaced, resealed."""
    out = bytearray(blob)
    for i, row in enumerate(rows):
        out[TABLE_AT + i * TABLE_ENTRY.size:TABLE_AT + (i + 1) * TABLE_ENTRY.size] = TABLE_ENTRY.pack(*row)
    if prefix_raw_len is not None:
        out[11:19] = struct.pack("<Q", prefix_raw_len)
    return reseal(out)


# ----------------------------------------------------------------------------- version 1 still reads

def golden_sd() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {"w6": torch.randn(4, 10, generator=g) * 0.1, "e8": torch.randn(3, 5, generator=g),
            "w3": (torch.randn(2, 7, generator=g) * 0.01).bfloat16(), "h": torch.randn(5, generator=g),
            "f": torch.randn(3, generator=g), "i": torch.tensor([2**40, -7]),
            "b": torch.tensor([[True, False], [False, False]]), "bf": torch.randn(2, 3, generator=g).bfloat16(),
            "z": torch.zeros(0, 4)}


GOLDEN_PRECISION = {"w6": ("int", 6), "e8": ("int", 8), "w3": ("int", 3), "h": ("fp16", 16), "f": ("fp32", 32),
                    "i": ("raw", 0), "b": ("raw", 0), "bf": ("raw", 0), "z": ("fp16", 16)}
# golden_sd() written by the version-1 writer (quant/artifact.py at commit 019f3d9): zlib with one int8
# per value, and lzma bit-packed. Both decode to the tensors with this digest.
GOLDEN_V1 = {
    "zlib": "R09MRlFOVAABAAHTBAAAAAAAAAe/a+F2OxoTeNqV0k1L40AYAOCRqiiC4s2DtmXwOEq+m/bQihdBL967HqaaaGhMapJaVET8AYIfB"
            "/+AF1H0sJcF0f0V6rkeCrsHQaVYvxqnqbaJbbrrkMPMhPd9Zt55x9sBWIMpxcrg2TSMyVg1JQRl3VjEFozBeV2VR5ayWLMggpakmb"
            "phwljSiSATAcE5bGGyQyGOmiErayUjkThZ1bHFMiQorWhzZENxMmh4sfI3J5C5OYtVskgKUSSSSHMBVyKTHKIriUxLN/C8VI0U4Tr"
            "6JMUayVGI5v/blESXGYkgwWWyiG9FsjWS5xHNuciUY9KC3z1ZlymyiHOZDIq0MqmaKUaqFfG9ppxxDvBhLtRJLauqddB7xc+DNxOj"
            "RGRai87qQ5T9RLZRJHHNRJqKIlpwkaQaAlcHDZyre4qfx3wtKEnRVGN45HlFXVd9rJSvhbyak6M5FvVWs7FnvKLsT3oLmvrHG36ja"
            "Vb9TKras41tQ3aXJcNUdA3G6PXBrkIh9Fr+2wnuSj0vT4+h3tdiuRh463vouMmDwPN9d7mzP5i/3c0PbBazw6W9jauNowP7rQwAsM"
            "ln2yAQOA7uh9NDP0Lbw4fhQrgnOD04ER89mzwtCT/jOydTceZy7+JPsjsBKqMNgCe7OsgU9I79+s0nthLXF9nzd1NvjJI=",
    "lzma": "R09MRlFOVAABAAPEBAAAAAAAAEAUufCTm4SH/Td6WFoAAATm1rRGAgAhARwAAAAQz1jM4ATDAbZdACKA/Bh1Gb/HEGn+lMlbZY+"
            "+iH/03l+6YQil2MJfdXkGyJEa5TBrtEBXfTrZJHRX5C7OxFw/NUO04jZodET8tcw7hv0nkH5OfCB9zKMhF3D8F8LEnDbHnX60d+k5"
            "nm/EjakVM+BKz3T7caA2ezNLbdh4oSTz8npdIuW6ESK7hN3I9KqkW4izieQkBn0ZYGSJy8hBxzOmwxG9dvzrIA6BA/38ZENqKB0dE"
            "z/V45r8KDsNJ1CyJT8+oF+ezliXbaSkokP8hitLjUa0yJ1ik6pFgaE7mwV+uSCOdw9swUAdDrh/5XctH0DikVAxTXVUSeXlBFfBoB"
            "m0nSyMFkTDPR/PLd3XMXCeu4XinYEoOHFNDhSqvrQtAb7VCN6ueq8Y3d6eBGOcuLCNUtbTuzcLfii73hDfiI/cf1VnPw9xW6MYK9q"
            "hpbLw+GGHZssDPO3CIu8hNFOojZa8OqpIGaVaQbtUIZYkdxc0zK3KcFKFdW+gm46UATvd2Cl8bs4/GXR4NwpxqHtP+d4EnhmXCqhJ"
            "7d3lZqh6YKeho6lWqNLyVP1x6F+8IWLbePAnnwnARQO00ctT+FVemXBYAAAAAOBSaz0wJk3iAAHSA8QJAAD3Uf0tscRn+wIAAAAABFla",
}
GOLDEN_DIGEST = "fdd8d1539c6ab2a7d0d8214b247ba5bfed56a1ae3e4a76e24aecceff2dcb8ede"


def digest(sd: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k, v in sd.items():
        h.update(f"{k}|{v.dtype}|{list(v.shape)}|".encode())
        h.update((v.view(torch.int16) if v.dtype == torch.bfloat16 else v).contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("compressor", list(GOLDEN_V1))
def test_golden_v1_files_decode_as_before(compressor):
    blob = base64.b64decode(GOLDEN_V1[compressor])
    assert blob_compressor(blob) == compressor
    out = unpack_model(blob, source="golden")
    assert digest(out) == GOLDEN_DIGEST
    # and version 2 of the same state dict decodes to the same tensors
    assert digest(unpack_model(pack_model(golden_sd(), lambda n, t: GOLDEN_PRECISION[n], compressor="auto",
                                          bitpack="auto"))) == GOLDEN_DIGEST
    rows = artifact_sections(blob)
    assert len(rows) == 1 and rows[0]["compressed_bytes"] == len(blob) - PREFIX.size
    assert rows[0]["params"] == sum(t.numel() for t in golden_sd().values())


@pytest.mark.parametrize("compressor", AVAILABLE)
def test_v1_and_v2_decode_identically(compressor):
    sd = toy_state_dict(seed=3)
    v1 = unpack_model(pack_v1(sd, PRECISION, compressor, bitpack=True))
    v2 = unpack_model(pack_model(sd, PRECISION, compressor=compressor))
    assert digest(v1) == digest(v2) == digest({k: expected(k, t) for k, t in sd.items()})


# ----------------------------------------------------------------------------- sections and choices

def random_model(seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    """A small random state dict of every kind, and its precisions (int bits 2..8 included)."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    sd, prec = {}, {}
    for i in range(rng.randrange(3, 9)):
        kind = rng.choice(["int", "int", "fp16", "fp32", "raw"])
        name = f"{rng.choice(['blocks.0.mlp', 'blocks.1.mixer', 'tok_emb', 'misc'])}.t{i}"
        if kind == "int":
            t = torch.randn(rng.randrange(1, 40), rng.randrange(1, 50), generator=g) * rng.choice([0.01, 1.0])
            prec[name] = ("int", rng.randrange(2, 9))
        elif kind == "raw":
            t = torch.randint(-5, 5, (rng.randrange(0, 30),), generator=g)
            prec[name] = ("raw", 0)
        else:
            t = torch.linspace(-1, 1, rng.randrange(0, 3000)) + 0.01 * torch.randn(1, generator=g)
            prec[name] = (kind, 16 if kind == "fp16" else 32)
        sd[name] = t
    return sd, prec


@pytest.mark.parametrize("seed", range(4))
def test_auto_is_never_larger_than_one_compressor(seed):
    sd, prec = random_model(seed)
    fn = lambda n, t: prec[n]
    sizes = {c: len(pack_model(sd, fn, compressor=c)) for c in AVAILABLE}
    blob = pack_model(sd, fn, compressor="auto")
    assert len(blob) <= min(sizes.values()), (len(blob), sizes)
    out = unpack_model(blob)
    for name, t in sd.items():
        kind, bits = prec[name]
        want = dequantize_rows(*quantize_rows(t, bits), dtype=t.dtype) if kind == "int" else (
            t.half().to(t.dtype) if kind == "fp16" else t)
        assert torch.equal(out[name], want), name
    packed = pack_model(sd, fn, compressor="zlib", bitpack="auto")
    assert digest(unpack_model(packed)) == digest(out)


def test_sections_follow_storage_and_group():
    sd = toy_state_dict()
    blob = pack_model(sd, PRECISION, compressor="zlib")
    rows = artifact_sections(blob)
    int_names = [f"int{p.bits}.{tensor_group(n, t)}" for n, t in sd.items() if (p := PRECISION(n, t)).kind == "int"]
    assert int_names[:2] == ["int8.embed", "int6.mlp"] and len(int_names) == 3
    assert [r["name"] for r in rows] == ["header", *int_names, "scales", "fp16", "fp32", "raw"]
    assert {r["compressor"] for r in rows} == {"zlib"} and blob_compressor(blob) == "zlib"
    assert len(blob) == PREFIX.size + COUNT.size + TABLE_ENTRY.size * len(rows) + sum(r["compressed_bytes"] for r in rows)
    assert sum(r["params"] for r in rows) == sum(t.numel() for t in sd.values())
    by_name = {r["name"]: r for r in rows}
    assert by_name["scales"]["tensors"] == 3 and by_name["scales"]["params"] == 0
    assert by_name["scales"]["raw_bytes"] == 2 * (48 + 96 + 64)
    assert by_name["raw"]["tensors"] == 2 and by_name["fp32"]["tensors"] == 3  # mix_scale, resid_mix, ve_scale
    assert by_name["int8.embed"]["params"] == 48 * 96 and by_name["int8.embed"]["raw_bytes"] == 48 * 96
    slow = pack_model(sd, PRECISION, compressor="zlib", level=1)
    assert slow != blob and digest(unpack_model(slow)) == digest(unpack_model(blob))


def test_shuffle_kept_only_where_it_shrinks():
    fp16 = lambda n, x: ("fp16", 16)
    smooth = torch.linspace(0.5, 2.0, 20000).half().float()  # high bytes repeat: the shuffle helps a lot
    noise = torch.randn(20000, generator=torch.Generator().manual_seed(0)).half().float()
    for t in (smooth, noise):
        blob = pack_model({"v": t}, fp16, compressor="zlib")
        plain = pack_model({"v": t}, fp16, compressor="zlib", transforms=False)
        assert len(blob) <= len(plain) and torch.equal(unpack_model(blob)["v"], t)
        assert [r["transform"] for r in artifact_sections(plain)] == ["none", "none"]
        if t is smooth:
            assert artifact_sections(blob)[1]["transform"] == "shuffle2" and len(blob) < 0.9 * len(plain)


@pytest.mark.parametrize("seed", range(3))
def test_transforms_invert_exactly(seed):
    rng = np.random.default_rng(seed)
    for n in [*range(70), 1000, 4097, 65537]:
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        for stride in range(2, MAX_STRIDE + 1):
            mixed = shuffle_bytes(data, stride)
            assert len(mixed) == n and unshuffle_bytes(mixed, stride) == data
            name = transform_name(*transform_code(f"shuffle{stride}"))
            assert invert_transform(apply_transform(data, name), name) == data
        assert apply_transform(data, "none") == data == invert_transform(data, "none")
    assert shuffle_bytes(b"abcdefg", 2) == b"acebdfg" and shuffle_bytes(b"abcdefghi", 4) == b"aebfcgdhi"
    for bad in ("shuffle1", "shuffle17", "shuffle02", "shuffle", "zigzag", ""):
        with pytest.raises(ValueError):
            transform_code(bad)
    assert transform_name(1, 1) is None and transform_name(0, 2) is None and transform_name(2, 2) is None


def test_precision_clip_mode_is_the_export_grid():
    w = torch.randn(64, 80, generator=torch.Generator().manual_seed(2))
    sdclip = Precision("int", 5, "sdclip", 12.85)
    out = unpack_model(pack_model({"w": w}, lambda n, t: sdclip))["w"]
    assert torch.equal(out, dequantize_rows(*quantize_rows(w, 5, "sdclip", 12.85)))  # the grid QAT trains on
    assert not torch.equal(out, dequantize_rows(*quantize_rows(w, 5)))


# ----------------------------------------------------------------------------- prequantized tensors

def test_prequantized_values_are_stored_exactly():
    sd = toy_state_dict()
    name = "blocks.0.mlp.fc.weight"
    rows, cols = sd[name].shape
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-31, 32, (rows, cols), generator=g, dtype=torch.int8)
    s = (torch.rand(rows, generator=g) * 0.01 + 1e-3).half()
    for bitpack in (False, True):
        out = unpack_model(pack_model(sd, PRECISION, prequantized={name: (q, s)}, bitpack=bitpack))
        assert torch.equal(out[name], dequantize_rows(q, s))
        assert torch.equal(out["tok_emb.weight"], expected("tok_emb.weight", sd["tok_emb.weight"]))
    emb = "tok_emb.weight"  # int8 tensor: the whole int8 grid, and another integer dtype for q
    q8 = torch.arange(-127, 128).repeat(48 * 96 // 255 + 1)[:48 * 96].reshape(48, 96).to(torch.int16)
    out = unpack_model(pack_model(sd, PRECISION, prequantized={emb: (q8, torch.full((48,), 2.0 ** -14).half())}))
    assert torch.equal(out[emb], dequantize_rows(q8, torch.full((48,), 2.0 ** -14).half()))


def test_prequantized_rejected_when_malformed():
    sd = toy_state_dict()
    name = "blocks.0.mlp.fc.weight"  # int6, [96, 64]
    q, s = quantize_rows(sd[name], 6)
    cases = {
        "pair of tensors": (q,),
        "integer tensor of shape": (q[:, :-1], s),
        "integer tensor": (q.float(), s),
        "outside the int6 grid": (torch.where(q == q.max(), torch.tensor(32, dtype=torch.int8), q), s),
        "below": (torch.full_like(q, -32), s),
        "float16 of shape": (q, s.float()),
        "shape (96,)": (q, s[:-1]),
        "finite": (q, torch.where(torch.arange(96) == 3, torch.tensor(float("nan")), s.float()).half()),
        "normal": (q, torch.full_like(s, 2.0 ** -15)),
        "positive": (q, -s),
        "zero": (q, torch.zeros_like(s)),
    }
    for case, given in cases.items():
        msg = {"below": "grid", "zero": "finite", "positive": "finite", "normal": "2**-14"}.get(case, case)
        with pytest.raises(ValueError, match=re.escape(msg)):
            pack_model(sd, PRECISION, prequantized={name: given})
    with pytest.raises(ValueError, match="not in the state dict"):
        pack_model(sd, PRECISION, prequantized={"nope": (q, s)})
    with pytest.raises(ValueError, match="precision is 'fp32'"):
        pack_model(sd, PRECISION, prequantized={"blocks.0.mix_scale": (q, s)})


# ----------------------------------------------------------------------------- hostile version-2 files

@pytest.fixture(scope="module")
def mixed_blob() -> bytes:
    blob = pack_model(toy_state_dict(seed=1), PRECISION, compressor="auto", bitpack="auto")
    assert blob_compressor(blob) == "mixed" and len(table(blob)) >= 6
    return blob


def test_flip_inside_every_section_rejected(mixed_blob):
    rows = table(mixed_blob)
    offset = TABLE_AT + TABLE_ENTRY.size * len(rows)
    for i, row in enumerate(rows):
        for at in {offset, offset + row[6] // 2, offset + row[6] - 1}:
            for mask in (0x01, 0x10, 0x80):
                bad = bytearray(mixed_blob)
                bad[at] ^= mask
                assert_rejected(bytes(bad), match="file CRC")
                assert_rejected(reseal(bad))  # past the file CRC: the stream or its raw CRC must catch it
        offset += row[6]


def test_table_fields_checked(mixed_blob):
    rows, raw_len = table(mixed_blob), PREFIX.unpack_from(mixed_blob)[3]

    def edited(i, field, value, prefix_raw_len=None):
        new = [list(r) for r in rows]
        new[i][field] = value
        return with_table(mixed_blob, new, prefix_raw_len)

    assert with_table(mixed_blob, rows) == mixed_blob
    for i, row in enumerate(rows):
        assert_rejected(edited(i, 0, 9), match=f"section {i}: unknown compressor id 9")
        assert_rejected(edited(i, 1, 2), match="unknown transform")
        assert_rejected(edited(i, 2, 17 if row[1] else 1), match="unknown transform")
        assert_rejected(edited(i, 3, 1), match="reserved")
        assert_rejected(edited(i, 4, row[4] ^ 1), match=f"section {i}: raw CRC")
        assert_rejected(edited(i, 5, row[5] + 1), match="do not add up")
        # a data section's raw length the header's tensor table does not account for is refused by the
        # header check, before any data section is inflated; the header's own, by its decompression
        bad_len = f"section {i}" if i == 0 else "bad header or data: ValueError"
        assert_rejected(edited(i, 5, row[5] + 1, raw_len + 1), match=bad_len)
        if row[5] > 1:
            assert_rejected(edited(i, 5, row[5] - 1, raw_len - 1), match=bad_len)
        assert_rejected(edited(i, 5, 0, raw_len - row[5]), match="out of range")
        assert_rejected(edited(i, 6, row[6] + 1), match="compressed lengths end")
        assert_rejected(edited(i, 6, 2**63), match="out of range")
        if row[1] == 0:  # a transform the writer did not apply: the untransformed bytes fail the raw CRC
            new = [list(r) for r in rows]
            new[i][1:3] = [1, 2]
            assert_rejected(with_table(mixed_blob, new), match=f"section {i}: raw CRC")
    for i in range(len(rows) - 1):  # one byte moved from a section's stream to the next one's
        new = [list(r) for r in rows]
        new[i][6] -= 1
        new[i + 1][6] += 1
        assert_rejected(with_table(mixed_blob, new), match=f"section {i}")


def test_prefix_and_count_checked(mixed_blob):
    magic, version, comp, raw_len, crc, _ = PREFIX.unpack_from(mixed_blob)
    body = mixed_blob[PREFIX.size:]
    assert seal(magic, version, comp, raw_len, crc, body) == mixed_blob
    assert_rejected(seal(magic, version, comp, raw_len, crc ^ 1, body), match="raw payload CRC")
    assert_rejected(seal(magic, version, COMPRESSORS["zlib"], raw_len, crc, body), match="disagrees")
    assert_rejected(seal(magic, version, 77, raw_len, crc, body), match="compressor id 77")
    assert_rejected(seal(magic, version, comp, 10**15, crc, body), match="above")
    with pytest.raises(ArtifactError, match="limit"):
        unpack_model(mixed_blob, source="x", max_raw_bytes=raw_len - 1)
    one = pack_model(toy_state_dict(), PRECISION)  # every section zlib: the prefix may not say "mixed"
    assert_rejected(seal(MAGIC, 2, 0, *PREFIX.unpack_from(one)[3:5], one[PREFIX.size:]), match="disagrees")
    for n in (0, MAX_SECTIONS + 1, 65535):  # section counts out of range, or whose table outruns the file
        assert_rejected(seal(magic, version, comp, raw_len, crc, COUNT.pack(n) + body[COUNT.size:]),
                        match="section count")
    n = len(table(mixed_blob))
    for wrong in (n - 1, n + 1):  # the table's end moves into (or back from) the streams
        assert_rejected(seal(magic, version, comp, raw_len, crc, COUNT.pack(wrong) + body[COUNT.size:]))
    for cut in (0, 1, COUNT.size + 5, COUNT.size + TABLE_ENTRY.size * 2):  # the table itself cut short
        assert_rejected(seal(magic, version, comp, raw_len, crc, body[:cut]))


def test_decompression_bomb_bounded():
    bomb = zlib.compress(b"\0" * (64 << 20), 9)
    header = b'{"format":"golf-quant","version":2,"sections":["raw"],"tensors":[]}'
    empty = header.replace(b'["raw"]', b"[]")
    assert unpack_model(seal_v2([empty])) == {}
    head = Section("zlib", "none", len(header), zlib.crc32(header), zlib.compress(header))
    # the header declares no tensor bytes: the 100 declared raw bytes are refused before inflation
    assert_rejected(seal_sections([head, Section("zlib", "none", 100, 0, bomb)], 0), match="not covered by any tensor")
    assert_rejected(seal_sections([head, Section("zlib", "none", 1 << 40, 0, bomb)], 0), match="above")
    with pytest.raises(ArtifactError, match="above"):
        unpack_model(seal_sections([head, Section("zlib", "none", 1 << 25, 0, bomb)], 0), max_raw_bytes=1 << 24)
    big_header = [Section("zlib", "none", MAX_HEADER_BYTES + 1, 0, zlib.compress(b"{" * 10))]
    assert_rejected(seal_sections(big_header, 0), match="header section")
    with pytest.raises(ArtifactError, match="header section"):
        artifact_sections(seal_sections(big_header, 0), source="x")


def test_range_crossing_a_section_boundary_rejected():
    blob = pack_model(toy_state_dict(), PRECISION)
    raws = v2_raws(blob)
    assert digest(unpack_model(seal_v2(raws))) == digest(unpack_model(blob))
    moved = [raws[0], raws[1][:-1], raws[1][-1:] + raws[2], *raws[3:]]  # same bytes, boundary moved by one
    assert_rejected(seal_v2(moved), match="crosses a section boundary")
    assert_rejected(seal_v2([raws[0], *raws[1:], b"\x00"]), match="bad header or data")  # names one short
