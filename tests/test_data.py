"""Tests for data/: shard format, distributed loader, downloader (fake hub) and shard builder."""

import json
import os
import random

import numpy as np
import pytest
import sentencepiece as spm
import torch

import data.download
from data.build_shards import build_shards_main, iter_documents
from data.download import download, download_main
from data.loader import DistributedTokenLoader
from data.shards import (
    HEADER_BYTES,
    SHARD_MAGIC,
    ShardError,
    list_shards,
    load_validation_tokens,
    memmap_shard,
    read_shard,
    shard_token_count,
    write_shard,
)

# ----------------------------------------------------------------------------- shards


def test_shard_round_trip_is_challenge_format(tmp_path):
    path = tmp_path / "s.bin"
    tokens = np.array([0, 1, 65535, 1234, 7], dtype=np.int64)
    write_shard(path, tokens)
    assert path.stat().st_size == HEADER_BYTES + 2 * tokens.size
    header = np.fromfile(path, dtype="<i4", count=256)
    assert header[:3].tolist() == [SHARD_MAGIC, 1, 5] and not header[3:].any()
    assert np.fromfile(path, dtype="<u2", offset=HEADER_BYTES).tolist() == tokens.tolist()
    got = read_shard(path)
    assert got.dtype == np.uint16 and got.tolist() == tokens.tolist()
    assert shard_token_count(path) == 5 and memmap_shard(path).tolist() == tokens.tolist()
    write_shard(path, np.zeros(0, dtype=np.uint16))
    assert read_shard(path).size == 0 and memmap_shard(path).size == 0


def _valid_shard_bytes(n=10) -> bytes:
    header = np.zeros(256, dtype="<i4")
    header[:3] = [SHARD_MAGIC, 1, n]
    return header.tobytes() + np.arange(n, dtype="<u2").tobytes()


def _with_header(index, value) -> bytes:
    raw = bytearray(_valid_shard_bytes())
    raw[4 * index : 4 * index + 4] = np.array([value], dtype="<i4").tobytes()
    return bytes(raw)


CORRUPT_SHARDS = {
    "bad_magic": (_with_header(0, 20240521), "bad magic"),
    "bad_version": (_with_header(1, 2), "version 2"),
    "negative_count": (_with_header(2, -5), "negative token count"),
    "trailing_bytes": (_valid_shard_bytes() + b"\x00\x00", "trailing bytes"),
    "odd_trailing_byte": (_valid_shard_bytes() + b"\x00", "trailing bytes"),
    "truncated_payload": (_valid_shard_bytes()[:-2], "truncated"),
    "truncated_header": (_valid_shard_bytes()[:100], "shorter than the 1024-byte"),
    "empty": (b"", "shorter than the 1024-byte"),
    "random_bytes": (np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(), "bad magic"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT_SHARDS))
@pytest.mark.parametrize("reader", [read_shard, shard_token_count, memmap_shard])
def test_corrupt_shards_raise_shard_error_naming_the_file(tmp_path, case, reader):
    raw, reason = CORRUPT_SHARDS[case]
    path = tmp_path / f"fineweb_train_{case}.bin"
    path.write_bytes(raw)
    with pytest.raises(ShardError) as err:
        reader(path)
    assert str(path) in str(err.value) and reason in str(err.value)


def test_missing_shard_and_empty_pattern(tmp_path):
    with pytest.raises(ShardError, match="does not exist"):
        read_shard(tmp_path / "nope.bin")
    pattern = str(tmp_path / "fineweb_val_*.bin")
    with pytest.raises(ShardError) as err:
        list_shards(pattern)
    assert pattern in str(err.value) and "python -m data.sample" in str(err.value)


@pytest.mark.parametrize("bad", [[-1, 3], [65536], np.array([0.5, 1.0])])
def test_write_shard_rejects_values_outside_uint16(tmp_path, bad):
    with pytest.raises(ValueError, match="s.bin"):
        write_shard(tmp_path / "s.bin", bad)
    assert not (tmp_path / "s.bin").exists()


def test_token_ids_outside_the_vocabulary_name_file_and_position(tmp_path):
    good = np.arange(50, dtype=np.uint16) % 16
    bad = good.copy()
    bad[37] = 16  # first id >= vocab_size=16
    bad[44] = 900
    write_shard(tmp_path / "fineweb_val_000000.bin", good)
    write_shard(tmp_path / "fineweb_val_000001.bin", bad)
    write_shard(tmp_path / "fineweb_train_000000.bin", bad)
    val = str(tmp_path / "fineweb_val_*.bin")
    assert load_validation_tokens(val, 8, vocab_size=1024).numel() > 0  # a larger vocabulary holds them
    with pytest.raises(ShardError, match=r"fineweb_val_000001\.bin: token id 16 at position 37 .*VOCAB_SIZE=16"):
        load_validation_tokens(val, 8, vocab_size=16)
    with pytest.raises(ShardError, match=r"fineweb_train_000000\.bin: token id 16 at position 37"):
        DistributedTokenLoader(str(tmp_path / "fineweb_train_*.bin"), 0, 1, vocab_size=16).next_batch(16, 8, 1)
    x, _ = DistributedTokenLoader(str(tmp_path / "fineweb_train_*.bin"), 0, 1).next_batch(16, 8, 1)  # unchecked
    assert int(x.max()) == 15


def test_load_validation_tokens_truncates_to_whole_windows(tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(100))
    write_shard(tmp_path / "fineweb_val_000001.bin", np.arange(1000, 1057))
    pattern = str(tmp_path / "fineweb_val_*.bin")
    everything = np.concatenate([np.arange(100), np.arange(1000, 1057)])
    got = load_validation_tokens(pattern, seq_len=16)
    assert got.dtype == torch.int64 and got.numel() == (156 // 16) * 16 + 1
    assert got.tolist() == everything[: got.numel()].tolist()
    assert load_validation_tokens(pattern, 16, max_tokens=50).numel() == 49
    with pytest.raises(ShardError, match="seq_len=200"):
        load_validation_tokens(pattern, 200)


# ----------------------------------------------------------------------------- loader

SHARD_SIZES = [300, 0, 170, 450, 233]


@pytest.fixture
def train_shards(tmp_path):
    """Shards whose tokens encode (shard, position), so every token of the stream is identifiable."""
    for s, n in enumerate(SHARD_SIZES):
        write_shard(tmp_path / f"fineweb_train_{s:06d}.bin", s * 1000 + np.arange(n))
    return str(tmp_path / "fineweb_train_*.bin")


def _stream(order=None):
    order = range(len(SHARD_SIZES)) if order is None else order
    return np.concatenate([s * 1000 + np.arange(SHARD_SIZES[s]) for s in order])


def test_loader_reads_the_exact_stream_and_wraps_around(train_shards):
    stream = _stream()
    loader = DistributedTokenLoader(train_shards, rank=0, world_size=1)
    span = 128 + 1
    for step in range(12):  # 12 * 129 tokens > 1153 in the stream: wraps once
        x, y = loader.next_batch(global_tokens=128, seq_len=16, grad_accum_steps=1)
        assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
        want = stream[np.arange(step * span, (step + 1) * span) % stream.size]
        assert x.flatten().tolist() == want[:-1].tolist() and y.flatten().tolist() == want[1:].tolist()
    assert loader.state_dict()["epoch"] == 1


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_see_what_grad_accum_sees(train_shards, world_size):
    ranks = [DistributedTokenLoader(train_shards, r, world_size) for r in range(world_size)]
    single = DistributedTokenLoader(train_shards, 0, 1)
    for _ in range(6):
        for r, loader in enumerate(ranks):
            x, y = loader.next_batch(global_tokens=64 * world_size, seq_len=32, grad_accum_steps=1)
            x1, y1 = single.next_batch(global_tokens=64 * world_size, seq_len=32, grad_accum_steps=world_size)
            assert x.shape == (2, 32) and torch.equal(x, x1) and torch.equal(y, y1), f"rank {r}"
    assert all(loader.state_dict() == single.state_dict() for loader in ranks)


def test_seeded_shard_order_is_deterministic(train_shards):
    assert [p.name for p in DistributedTokenLoader(train_shards, 0, 1).paths] == sorted(
        f"fineweb_train_{s:06d}.bin" for s in range(len(SHARD_SIZES)))
    a, b = DistributedTokenLoader(train_shards, 0, 1, seed=7), DistributedTokenLoader(train_shards, 0, 1, seed=7)
    assert a.paths == b.paths and sorted(a.paths) == sorted(DistributedTokenLoader(train_shards, 0, 1).paths)
    orders = {tuple(DistributedTokenLoader(train_shards, 0, 1, seed=s).paths) for s in range(1, 6)}
    assert len(orders) > 1  # the seed does permute
    order = [int(p.name[14:20]) for p in a.paths]
    for step in range(5):
        xa, _ = a.next_batch(96, 32, 1)
        xb, _ = b.next_batch(96, 32, 1)
        assert torch.equal(xa, xb)
        assert xa.flatten().tolist() == _stream(order)[step * 97 : step * 97 + 96].tolist()


def test_resume_from_state_dict_equals_uninterrupted(train_shards):
    reference = DistributedTokenLoader(train_shards, 1, 2, seed=3)
    interrupted = DistributedTokenLoader(train_shards, 1, 2, seed=3)
    for _ in range(5):
        reference.next_batch(128, 16, 2)
        interrupted.next_batch(128, 16, 2)
    state = json.loads(json.dumps(interrupted.state_dict()))  # survives a JSON checkpoint
    assert all(type(v) is int for v in state.values())
    resumed = DistributedTokenLoader(train_shards, 1, 2, seed=3)
    resumed.load_state_dict(state)
    for _ in range(9):
        x0, y0 = reference.next_batch(128, 16, 2)
        x1, y1 = resumed.next_batch(128, 16, 2)
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    with pytest.raises(ValueError, match="seed=3"):
        DistributedTokenLoader(train_shards, 0, 1, seed=4).load_state_dict(state)


def test_loader_rejects_bad_batch_geometry(train_shards):
    loader = DistributedTokenLoader(train_shards, 0, 2)
    with pytest.raises(ValueError, match="multiple of 64"):
        loader.next_batch(global_tokens=100, seq_len=16, grad_accum_steps=2)
    with pytest.raises(ValueError, match="rank"):
        DistributedTokenLoader(train_shards, 2, 2)


# ----------------------------------------------------------------------------- download (fake hub)

FAKE_MANIFEST = {
    "version": "10B",
    "datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024",
                  "stats": {"files_val": 1, "files_train": 3}}],
    "tokenizers": [{"name": "sp_bpe_1024", "kind": "sentencepiece_bpe", "vocab_size": 1024,
                    "model_path": "tokenizers/fineweb_1024_bpe.model",
                    "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}],
}


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A local stand-in for the HF dataset repo; returns (remote prefix folder, list of calls)."""
    prefix = tmp_path / "remote" / "datasets"
    (prefix / "manifest.json").parent.mkdir(parents=True)
    (prefix / "manifest.json").write_text(json.dumps(FAKE_MANIFEST))
    shard_dir = prefix / "datasets" / "fineweb10B_sp1024"
    write_shard(shard_dir / "fineweb_val_000000.bin", np.arange(50))
    for i in range(3):
        write_shard(shard_dir / f"fineweb_train_{i:06d}.bin", np.arange(100 + i))
    (prefix / "tokenizers").mkdir()
    (prefix / "tokenizers" / "fineweb_1024_bpe.model").write_bytes(b"model-bytes")
    (prefix / "tokenizers" / "fineweb_1024_bpe.vocab").write_text("vocab")
    (prefix / "docs_selected.jsonl").write_text('{"text": "hi"}\n')
    (prefix / "docs_selected.source_manifest.json").write_text("{}")
    calls = []

    def fake_hf_hub_download(repo_id, filename, *, subfolder=None, repo_type=None, **kwargs):
        calls.append({"repo_id": repo_id, "filename": filename, "subfolder": subfolder, "repo_type": repo_type})
        blob = tmp_path / "remote" / (subfolder or "") / filename
        if not blob.is_file():
            raise FileNotFoundError(f"404: {subfolder}/{filename}")
        # Like the real cache: a snapshot symlink pointing at the blob.
        snapshot = tmp_path / "hf_cache" / "snapshots" / (subfolder or "") / filename
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        if not snapshot.is_symlink():
            snapshot.symlink_to(blob)
        return str(snapshot)

    monkeypatch.setattr(data.download, "hf_hub_download", fake_hf_hub_download)
    monkeypatch.delenv("MATCHED_FINEWEB_REPO_ID", raising=False)
    monkeypatch.delenv("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", raising=False)
    return prefix, calls


def test_download_fetches_val_train_prefix_and_tokenizer(tmp_path, fake_hub):
    prefix, calls = fake_hub
    root = tmp_path / "data"
    result = download("sp1024", 2, data_root=root)
    ds = root / "datasets" / "fineweb10B_sp1024"
    assert sorted(p.name for p in ds.iterdir()) == [
        "fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin"]
    for p in ds.iterdir():
        remote = prefix / "datasets" / "fineweb10B_sp1024" / p.name
        assert p.stat().st_size == remote.stat().st_size and not p.is_symlink()
        assert os.path.samefile(p, remote)  # hard link from the cache blob
    assert (root / "tokenizers" / "fineweb_1024_bpe.model").read_bytes() == b"model-bytes"
    assert (root / "manifest.json").is_file() and result["fetched"] == 5  # 1 val + 2 train + 2 tokenizer files
    assert {c["repo_id"] for c in calls} == {"willdepueoai/parameter-golf"}
    assert {c["repo_type"] for c in calls} == {"dataset"}
    assert {"subfolder": "datasets", "filename": "manifest.json"}.items() <= calls[0].items()
    assert any(c["subfolder"] == "datasets/datasets/fineweb10B_sp1024" for c in calls)
    # Second run: manifest cached, everything present with the right size -> nothing fetched.
    before = len(calls)
    assert download("sp1024", 2, data_root=root)["fetched"] == 0 and len(calls) == before
    # A truncated local shard is noticed and fetched again.
    shard = ds / "fineweb_train_000001.bin"
    shard.unlink()
    shard.write_bytes(_valid_shard_bytes(101)[:-10])
    assert download("sp1024", 2, data_root=root)["fetched"] == 1 and shard_token_count(shard) == 101


def test_download_rejects_more_train_shards_than_published(tmp_path, fake_hub):
    with pytest.raises(ValueError, match="only 3 training shards.*5 were requested"):
        download("sp1024", 5, data_root=tmp_path / "data")
    with pytest.raises(ValueError, match="fineweb10B_sp4096 is not in"):
        download("sp4096", 1, data_root=tmp_path / "data")
    with pytest.raises(ValueError, match="unknown variant"):
        download("gpt2", 1, data_root=tmp_path / "data")
    with pytest.raises(FileNotFoundError, match="skip-manifest"):
        download("sp1024", 1, data_root=tmp_path / "other", skip_manifest=True)


def test_download_validates_fetched_shards(tmp_path, fake_hub):
    prefix, _ = fake_hub
    (prefix / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000000.bin").write_bytes(b"<html>oops</html>")
    root = tmp_path / "data"
    with pytest.raises(ShardError, match="fineweb_train_000000.bin"):
        download("sp1024", 1, data_root=root)
    assert not (root / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000000.bin").exists()


def test_download_cli_env_overrides_and_docs(tmp_path, fake_hub, monkeypatch):
    prefix, calls = fake_hub
    prefix.rename(prefix.with_name("alt_root"))
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", "someone/golf-data")
    monkeypatch.setenv("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", "alt_root")
    root = tmp_path / "data"
    download_main(["--variant", "sp1024", "--train-shards", "3", "--with-docs", "--data-root", str(root)])
    assert len(list((root / "datasets" / "fineweb10B_sp1024").glob("fineweb_train_*.bin"))) == 3
    assert (root / "docs_selected.jsonl").read_text() == '{"text": "hi"}\n'
    assert (root / "docs_selected.source_manifest.json").is_file()
    assert {c["repo_id"] for c in calls} == {"someone/golf-data"}
    assert all(c["subfolder"].startswith("alt_root") for c in calls)


# ----------------------------------------------------------------------------- build_shards

WORDS = ("the model reads tokens from shards and learns to predict the next one while the optimizer "
         "updates weights quickly under a strict budget of time and bytes naïve café 東京 2026").split()


def _write_corpus(root):
    rng = random.Random(0)

    def doc(n):
        return " ".join(rng.choice(WORDS) for _ in range(n)) + "."

    jsonl = root / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": doc(60), "id": i}) + "\n" for i in range(12)), encoding="utf-8")
    folder = root / "notes"
    (folder / "a" / "b").mkdir(parents=True)
    (folder / "z.txt").write_text(doc(80), encoding="utf-8")
    (folder / "a" / "one.md").write_text(doc(70), encoding="utf-8")
    (folder / "a" / "b" / "two.txt").write_text(doc(90), encoding="utf-8")
    (folder / "a" / "skip.py").write_text("print('not a document')")
    return jsonl, folder


def _split_docs(paths, bos=1):
    tokens = np.concatenate([read_shard(p) for p in paths]).astype(np.int64)
    starts = np.flatnonzero(tokens == bos)
    assert starts[0] == 0
    return [d[1:].tolist() for d in np.split(tokens, starts[1:])]


def test_build_shards_from_jsonl_and_folder(tmp_path):
    jsonl, folder = _write_corpus(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    write_shard(out / "fineweb_train_000099.bin", [1, 2, 3])  # stale: must disappear

    def args(output_dir, *extra, vocab="400"):
        return ["--input", str(jsonl), str(folder), "--output-dir", str(output_dir), "--vocab-size", vocab,
                "--val-docs", "5", "--shard-size", "300", *extra]

    build_shards_main(args(out))
    docs = list(iter_documents([jsonl, folder]))
    assert len(docs) == 15 and "not a document" not in "".join(docs)
    assert docs[12].startswith(folder.joinpath("a", "b", "two.txt").read_text()[:20])  # sorted recursive walk
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer_400_bpe.model"))
    val, train = sorted(out.glob("fineweb_val_*.bin")), sorted(out.glob("fineweb_train_*.bin"))
    assert "fineweb_train_000099.bin" not in [p.name for p in train]
    assert _split_docs(val) == [sp.encode(d) for d in docs[:5]]
    assert _split_docs(train) == [sp.encode(d) for d in docs[5:]]
    assert len(train) > 1 and all(shard_token_count(p) == 300 for p in train[:-1])
    manifest = json.loads((out / "manifest.json").read_text())
    stats = manifest["stats"]
    assert (stats["docs_val"], stats["docs_train"]) == (5, 10)
    assert (stats["files_val"], stats["files_train"]) == (len(val), len(train))
    assert stats["tokens_val"] == sum(map(shard_token_count, val))
    assert stats["tokens_train"] == sum(map(shard_token_count, train))
    assert (out / manifest["tokenizer_model"]).resolve() == (out / "tokenizer_400_bpe.model").resolve()
    # Deterministic: a second build gives identical pieces and scores (the .model also records
    # its own path, so compare the .vocab listing) and byte-identical shards.
    out2 = tmp_path / "out2"
    build_shards_main(args(out2))
    for p in [*val, *train, out / "tokenizer_400_bpe.vocab"]:
        assert (out2 / p.name).read_bytes() == p.read_bytes()
    # Reusing the trained tokenizer reproduces the same shards; a wrong vocab size is refused.
    out3 = tmp_path / "out3"
    build_shards_main(args(out3, "--tokenizer", str(out / "tokenizer_400_bpe.model")))
    assert all((out3 / p.name).read_bytes() == p.read_bytes() for p in [*val, *train])
    with pytest.raises(ValueError, match="400 pieces but vocab_size=512"):
        build_shards_main(args(out3, "--tokenizer", str(out / "tokenizer_400_bpe.model"), vocab="512"))


def test_build_shards_input_errors(tmp_path):
    text = tmp_path / "para.txt"
    text.write_text("first block\nstill first\n\n  \nsecond block\n\n\nthird")
    assert list(iter_documents([text], doc_split="blank")) == ["first block\nstill first", "second block", "third"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2.*'text'.*--text-field"):
        list(iter_documents([bad]))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(ValueError, match="broken.jsonl:2: invalid JSON"):
        list(iter_documents([broken]))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        list(iter_documents([tmp_path / "missing.txt"]))
    jsonl, folder = _write_corpus(tmp_path)
    with pytest.raises(ValueError, match="choose --val-docs between 1 and 14"):
        build_shards_main(["--input", str(jsonl), str(folder), "--output-dir", str(tmp_path / "o"),
                           "--vocab-size", "400", "--val-docs", "15"])


def test_trainer_stops_on_an_out_of_vocabulary_val_shard_before_training(tmp_path, monkeypatch, capsys, sample_corpus):
    import train_gpt

    tokens = np.arange(4000, dtype=np.uint16) % 1000
    tokens[1234] = 2000  # VOCAB_SIZE is 1024
    write_shard(tmp_path / "fineweb_val_000000.bin", tokens)
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(4000, dtype=np.uint16) % 1000)
    monkeypatch.setenv("DATA_PATH", str(tmp_path))
    monkeypatch.setenv("LOG_DIR", str(tmp_path / "logs"))
    assert train_gpt.main(["--preset", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "fineweb_val_000000.bin: token id 2000 at position 1234" in err
