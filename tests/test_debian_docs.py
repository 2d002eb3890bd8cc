"""data/debian_docs.py on local fixtures: a fake mirror (file:// URLs) holding tiny .debs and a Packages index."""
import hashlib
import io
import json
import lzma
import random
import tarfile

import numpy as np
import pytest
import sentencepiece as spm
import zstandard

from data.debian_docs import (DebianDocsError, build_corpus, compare_versions, deb_data_tar, deb_documents,
                              cut_documents, html_to_text, split_documents, tokenizer_pieces)
from data.shards import read_shard, shard_token_count

PAGE = """<!DOCTYPE html><html><head><title>Page title</title><style>body {{ color: red }}</style>
<script>var tracking = "script text";</script></head><body>
<div class="related" role="navigation"><a href="prev.html">previous page</a></div>
<nav class="menu"><ul><li>menu entry</li></ul></nav>
<div class="body" role="main">
  <h1>{title}<a class="headerlink" href="#t">\u00b6</a></h1>
  <p>{body}
     spread   over lines</p>
  <pre>def f(x):
    return x &lt; 2</pre>
  <ul><li>first item<li>second item</ul>
</div>
<div class="footer">Copyright footer</div></body></html>"""

WORDS = ("the parser reads every page of the manual and keeps paragraphs code lists tables while "
         "navigation scripts and footers are dropped so the model learns from prose").split()


def _ar(members) -> bytes:
    """An `ar` archive, as dpkg-deb writes it: magic, then 60-byte headers with even-padded bodies."""
    out = bytearray(b"!<arch>\n")
    for name, body in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode("ascii")
        out += body + (b"\n" if len(body) % 2 else b"")
    return bytes(out)


def _tar(files, compression="xz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:" if compression == "zst" else f"w:{compression}") as tar:
        for path, text in files.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo("./" + path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    return zstandard.ZstdCompressor().compress(raw) if compression == "zst" else raw


def make_deb(files, compression="xz") -> bytes:
    return _ar([("debian-binary", b"2.0\n"), ("control.tar.xz", _tar({"control": "Package: x\n"})),
                (f"data.tar.{compression}", _tar(files, compression))])


def _doc(rng, n=120):
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


@pytest.fixture
def mirror(tmp_path):
    """A file:// mirror with pkg-a (two versions; the newer wins) and pkg-b; returns (url, index stanzas)."""
    rng = random.Random(0)
    root = tmp_path / "mirror"
    shared = _doc(rng)  # shipped by both packages: kept once
    debs = {
        "pkg-a_2.0-1": {f"usr/share/doc/pkg-a/html/page{i}.html": PAGE.format(title=f"Page {i}", body=_doc(rng))
                        for i in range(8)}
        | {"usr/share/doc/pkg-a/html/_sources/page0.rst.txt": _doc(rng),
           "usr/share/doc/pkg-a/html/genindex.html": PAGE.format(title="Index", body=_doc(rng)),
           "usr/share/doc/pkg-a/html/translations/zh_CN/page0.html": PAGE.format(title="译", body=_doc(rng)),
           "usr/share/doc/pkg-a/shared.txt": shared},
        "pkg-a_1.9-3": {"usr/share/doc/pkg-a/old.txt": _doc(rng)},
        "pkg-b_0.1-1": {f"usr/share/doc/pkg-b/notes{i}.txt": _doc(rng) for i in range(6)}
        | {"usr/share/doc/pkg-b/shared.txt": shared, "usr/share/doc/pkg-b/short.txt": "too short"},
    }
    stanzas = []
    for stem, files in debs.items():
        name, version = stem.split("_")
        rel = f"pool/main/p/{name}/{stem}_all.deb"
        data = make_deb(files)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        stanzas.append({"Package": name, "Version": version, "Filename": rel, "Size": str(len(data)),
                        "SHA256": hashlib.sha256(data).hexdigest()})
    write_index(root, stanzas)
    return root.as_uri(), stanzas


def write_index(root, stanzas):
    text = "\n".join("".join(f"{k}: {v}\n" for k, v in s.items()) + "Description: docs\n more lines\n"
                     for s in stanzas)
    path = root / "dists" / "test" / "main" / "binary-all" / "Packages.xz"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(lzma.compress(text.encode("utf-8")))


def test_html_to_text_keeps_content_and_drops_boilerplate():
    text = html_to_text(PAGE.format(title="Control flow", body="Use <code>if</code> &amp; <em>for</em>."))
    assert text.startswith("Control flow\n\nUse if & for. spread over lines")
    assert "def f(x):\n    return x < 2" in text  # code keeps its layout and entities decode
    assert "first item\nsecond item" in text  # unclosed <li> still ends its line
    for boilerplate in ("tracking", "color", "Page title", "previous page", "menu entry", "footer", "\u00b6"):
        assert boilerplate not in text
    # Without a main region the whole body is used, still without scripts and navigation.
    plain = html_to_text("<html><head><title>t</title><body><p>one</p><script>x()</script><p>two<br>three")
    assert plain == "one\n\ntwo\nthree"


def test_debian_version_order():  # dpkg: "~" first, letters before other symbols
    ordered = ["1.0~rc1", "1.0", "1.0a", "1.0+b1", "1.0.1", "6.1.170-3", "6.1.176-1", "6.1.176-1+deb12u1",
               "6.1.176-1.1", "1:0.5"]
    for a, b in zip(ordered, ordered[1:]):
        assert compare_versions(a, b) == -1 and compare_versions(b, a) == 1, (a, b)
    assert compare_versions("2.0-1", "2.0-1") == 0


def test_deb_reader_handles_xz_and_zstd(tmp_path):
    for compression in ("xz", "zst"):
        deb = tmp_path / f"x_{compression}.deb"
        deb.write_bytes(make_deb({"usr/share/doc/x/a.txt": "hello " * 50, "usr/share/doc/x/skip.png": "png"},
                                 compression))
        assert deb_documents(deb, "x") == [("x:usr/share/doc/x/a.txt", ("hello " * 50).strip())]
    with pytest.raises(DebianDocsError, match="not a .deb"):
        deb_data_tar(b"PK\x03\x04zip", "bad")


def test_sha256_mismatch_is_refused(tmp_path, mirror):
    url, stanzas = mirror
    stanzas[2]["SHA256"] = "0" * 64  # pkg-b's entry no longer matches its file
    write_index(tmp_path / "mirror", stanzas)
    cache = tmp_path / "cache"
    with pytest.raises(DebianDocsError, match=r"pkg-b 0.1-1: SHA256 mismatch .*index says 0{64}.*refused"):
        build_corpus(tmp_path / "out", ["pkg-a", "pkg-b"], 320, tmp_path / "tok", mirror=url, suite="test",
                     cache_dir=cache)
    assert not (cache / stanzas[2]["Filename"]).exists()  # nothing a rerun could take for the package
    with pytest.raises(DebianDocsError, match="not in test/main/binary-all: no-such-doc"):
        build_corpus(tmp_path / "out", ["no-such-doc"], 320, mirror=url, suite="test", cache_dir=cache)


def test_end_to_end_build_writes_readable_shards_and_reruns_offline(tmp_path, mirror):
    url, _ = mirror
    cache, out = tmp_path / "cache", tmp_path / "out"

    def build(mirror_url):
        return build_corpus(out, ["pkg-a", "pkg-b"], 320, tmp_path / "tok" / "debdocs_320_bpe", val_fraction=0.3,
                            shard_size=500, threads=1, mirror=mirror_url, suite="test", cache_dir=cache)

    stats, model_path, info = build(url)
    assert [(p["package"], p["version"], p["docs"]) for p in info] == [("pkg-a", "2.0-1", 9), ("pkg-b", "0.1-1", 6)]
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    tokens = {split: np.concatenate([read_shard(p) for p in sorted(out.glob(f"fineweb_{split}_*.bin"))])
              for split in ("val", "train")}
    docs = {split: [sp.decode(d.tolist()) for d in np.split(t, np.flatnonzero(t == 1))[1:]]
            for split, t in tokens.items()}
    assert len(docs["val"]) == stats["docs_val"] > 0 and len(docs["train"]) == stats["docs_train"] > 0
    assert stats["docs_total"] == 15 and stats["tokens_train"] == tokens["train"].size
    every = "\n".join(docs["val"] + docs["train"])
    assert "Page 3 " in every and "def f(x):" in every and "tracking" not in every and "译" not in every
    assert max(map(shard_token_count, out.glob("fineweb_train_*.bin"))) == 500
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["packages"][0]["sha256"] == info[0]["sha256"] and manifest["stats"] == stats
    # The rerun needs no mirror: index and .debs come from the cache, and the shards are identical.
    before = {p.name: p.read_bytes() for p in out.glob("*.bin")}
    build(url + "/missing")
    assert {p.name: p.read_bytes() for p in out.glob("*.bin")} == before


def test_split_is_by_key_hash_and_tokenizer_pieces_stay_short():
    keyed = [(f"pkg:doc{i}.html", f"text {i}") for i in range(200)]
    val, train = split_documents(keyed, 0.1)
    assert 5 < len(val) < 40 and len(val) + len(train) == 200
    assert split_documents(list(reversed(keyed)), 0.1) == (val, train)  # input order does not matter
    doc = "\n".join(f"line {i} " + "x" * 50 for i in range(300)) + "\n" + "y" * 5000
    pieces = list(tokenizer_pieces([doc], limit=1000))
    assert "\n".join(pieces) == doc and all(len(p) <= 1000 for p in pieces[:-1]) and pieces[-1] == "y" * 5000


def test_cut_training_documents_keep_val_and_tokenizer_and_scatter_the_pieces(tmp_path, mirror):
    url, _ = mirror

    def build(name, **cut):
        out = tmp_path / name
        _, model_path, _ = build_corpus(out, ["pkg-a", "pkg-b"], 320, tmp_path / "tok" / name, val_fraction=0.3,
                                        threads=1, mirror=url, suite="test", cache_dir=tmp_path / "cache", **cut)
        return out, model_path

    (whole, whole_tok), (cut, cut_tok) = build("whole"), build("cut", max_train_doc_bytes=300)
    # The tokenizer sees the uncut documents (the .model files differ only in the prefix they record).
    assert whole_tok.with_suffix(".vocab").read_bytes() == cut_tok.with_suffix(".vocab").read_bytes()
    assert (whole / "fineweb_val_000000.bin").read_bytes() == (cut / "fineweb_val_000000.bin").read_bytes()
    sp = spm.SentencePieceProcessor(model_file=str(cut_tok))

    def train_docs(out):
        t = np.concatenate([read_shard(p) for p in sorted(out.glob("fineweb_train_*.bin"))])
        return [sp.decode(d.tolist()) for d in np.split(t, np.flatnonzero(t == 1))[1:]]

    docs, pieces = train_docs(whole), train_docs(cut)
    assert len(pieces) > 2 * len(docs) and json.loads((cut / "manifest.json").read_text())["max_train_doc_bytes"] == 300
    words = lambda texts: sorted(w for t in texts for w in t.split())
    assert words(pieces) == words(docs)  # the same text, cut only at line breaks
    with pytest.raises(DebianDocsError, match="--max-train-doc-bytes must be >= 0"):
        build("bad", max_train_doc_bytes=-1)


def test_cut_pieces_are_bounded_and_placed_by_their_own_hash():
    doc = lambda n: "\n".join(f"doc {n} line {i} " + "x" * 40 for i in range(100))
    keyed = [("pkg:a.html", doc(0)), ("pkg:b.html", doc(1))]
    pieces = list(cut_documents(keyed, 500))
    assert all(len(p.encode("utf-8")) <= 500 for _, p in pieces)
    assert [k for k, _ in pieces][:2] == ["pkg:a.html#0", "pkg:a.html#1"] and len({k for k, _ in pieces}) == len(pieces)
    for key, text in keyed:
        assert "\n".join(p for k, p in pieces if k.startswith(key + "#")) == text
    _, ordered = split_documents(pieces, 0.0)
    source = [p.split(" ")[1] for p in ordered]  # which document each piece came from, in stream order
    runs = 1 + sum(a != b for a, b in zip(source, source[1:]))
    assert len(ordered) == len(pieces) and runs > len(pieces) // 4  # interleaved, not two long runs
