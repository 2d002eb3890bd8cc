"""The byte count behind val_bpb is exact.

For each document, the LUT bytes summed over the targets of [BOS] + ids equal the
UTF-8 length of sp.decode(ids).

Uses the offline sample (built once per session into a temp folder: real stdlib
prose, the 1024-piece tokenizer with the challenge's settings) plus synthetic
non-ASCII documents that force byte-fallback pieces.
"""

import numpy as np
import pytest
import torch

import data.sample
from data.bpb import build_byte_luts, load_tokenizer, token_bytes
from data.sample import SAMPLE_VOCAB, ensure_sample, stdlib_documents
from data.shards import read_shard

SYNTHETIC_DOCS = [
    "naïve café — 東京 😀",
    "Ünïcödé everywhere: Straße, façade, jalapeño, smörgåsbord, Ελληνικά, русский, العربية, हिन्दी.",
    "emoji run 😀😀 🇫🇷 👩‍👩‍👧 and CJK 東京都 大阪 in one line",
    "ligatures and width forms: ﬁ ﬂ ① ＡＢＣ ｶﾀｶﾅ (NFKC changes these)",
    "combining a\u0301 e\u0308 and zero\u200bwidth and nbsp\u00a0here",
    "  leading and trailing whitespace, \t tabs,\r\nnewlines\n\n  and   runs   ",
    "digits 1234567890 3.14159 2026-05-02 0x7fff",
    "\x00NUL\x00 bytes and \x7f control \x01 chars",
    "",
    " ",
    "\ufeffBOM at the start",
]


@pytest.fixture(scope="session")
def sample(tmp_path_factory):
    """(dataset_dir, sp) of the offline sample, built once per test session."""
    root = tmp_path_factory.mktemp("sample_root")
    dataset_dir, tokenizer_path = ensure_sample(root)
    return dataset_dir, load_tokenizer(tokenizer_path, SAMPLE_VOCAB)


@pytest.fixture(scope="session")
def documents():
    return stdlib_documents(max_docs=300) + SYNTHETIC_DOCS


def doc_bytes_from_luts(ids, luts, bos_id=1) -> int:
    seq = torch.tensor([bos_id] + list(ids), dtype=torch.long)
    return int(token_bytes(seq[:-1], seq[1:], luts).sum())


def test_identity_on_each_document(sample, documents):
    _, sp = sample
    luts = build_byte_luts(sp, SAMPLE_VOCAB)
    mismatches = []
    for doc in documents:
        ids = sp.encode(doc)
        expected = len(sp.decode(ids).encode("utf-8"))
        got = doc_bytes_from_luts(ids, luts, sp.bos_id())
        if got != expected:
            mismatches.append((doc[:60], got, expected))
    assert not mismatches, mismatches
    assert len(documents) >= 300
    assert any(any(ord(c) > 127 for c in d) for d in documents)


def test_synthetic_docs_exercise_byte_fallback(sample):
    _, sp = sample
    byte_ids = [i for d in SYNTHETIC_DOCS for i in sp.encode(d) if sp.is_byte(i)]
    assert len(byte_ids) > 20  # CJK / emoji are not in a 1024-piece vocab, so they fall back to bytes


def test_identity_on_concatenated_stream_with_padded_vocab(sample, documents):
    """The stream form used by eval: docs joined by BOS, LUTs padded past the tokenizer (vocab 1088)."""
    _, sp = sample
    luts = build_byte_luts(sp, SAMPLE_VOCAB + 64)
    assert luts.base_bytes.numel() == SAMPLE_VOCAB + 64
    assert bool(luts.is_boundary[SAMPLE_VOCAB:].all()) and int(luts.base_bytes[SAMPLE_VOCAB:].abs().sum()) == 0
    stream = []
    for ids in sp.encode(documents):
        stream += [sp.bos_id()] + ids
    seq = torch.tensor(stream, dtype=torch.long)
    # Targets start at the first token after the leading BOS; a BOS target adds 0 bytes.
    got = int(token_bytes(seq[:-1], seq[1:], luts).sum())
    expected = sum(len(sp.decode(ids).encode("utf-8")) for ids in sp.encode(documents))
    assert got == expected


def test_identity_on_sample_validation_shard(sample):
    """Every document of the built validation shard, split at BOS, decodes to exactly its LUT byte count."""
    dataset_dir, sp = sample
    tokens = read_shard(sorted(dataset_dir.glob("fineweb_val_*.bin"))[0]).astype(np.int64)
    luts = build_byte_luts(sp, SAMPLE_VOCAB)
    got = int(token_bytes(torch.from_numpy(tokens[:-1]), torch.from_numpy(tokens[1:]), luts).sum())
    starts = np.flatnonzero(tokens == sp.bos_id())
    assert starts[0] == 0
    docs = np.split(tokens, starts[1:])
    expected = sum(len(sp.decode(d[1:].tolist()).encode("utf-8")) for d in docs)
    assert got == expected and expected > 500_000


class StubPieces:
    """A hand-made 10-piece vocabulary with the SentencePiece query methods build_byte_luts uses."""

    pieces = ("<pad>", "<s>", "</s>", "<unk>", "<0xC3>", "\u2581the", "é", "\u2581", "ab", "<unused>")

    def vocab_size(self):
        return len(self.pieces)

    def is_control(self, i):
        return i in (0, 1, 2)

    def is_unknown(self, i):
        return i == 3

    def is_unused(self, i):
        return i == 9

    def is_byte(self, i):
        return i == 4

    def id_to_piece(self, i):
        return self.pieces[i]


def test_hand_computed_case():
    luts = build_byte_luts(StubPieces(), 12)
    assert luts.base_bytes.tolist() == [0, 0, 0, 0, 1, 3, 2, 0, 2, 0, 0, 0]
    assert luts.has_leading_space.tolist() == [False] * 5 + [True, False, True] + [False] * 4
    assert luts.is_boundary.tolist() == [True] * 4 + [False] * 5 + [True] * 3
    assert luts.base_bytes.dtype == torch.int16
    seq = torch.tensor([1, 5, 8, 7, 6, 4, 1, 5, 5, 10])
    per_target = token_bytes(seq[:-1], seq[1:], luts)
    # "the" after BOS: 3 (no space); "ab": 2; "▁": 1; "é": 2; <0xC3>: 1; BOS: 0;
    # "the" after BOS: 3; " the": 4; id 10 (padding past the tokenizer): 0.
    assert per_target.tolist() == [3, 2, 1, 2, 1, 0, 3, 4, 0]
    assert per_target.shape == seq[1:].shape


def test_luts_reject_tokenizer_larger_than_model_vocab():
    with pytest.raises(ValueError, match="10 pieces.*vocab_size is 8"):
        build_byte_luts(StubPieces(), 8)


def test_load_tokenizer_errors(sample, tmp_path):
    dataset_dir, _ = sample
    model = dataset_dir.parent.parent / "tokenizers" / "sample_1024_bpe.model"
    with pytest.raises(ValueError) as err:
        load_tokenizer(model, 2048)
    assert "1024" in str(err.value) and "2048" in str(err.value) and str(model) in str(err.value)
    with pytest.raises(FileNotFoundError) as err:
        load_tokenizer(tmp_path / "missing.model", 1024)
    assert "python -m data.download" in str(err.value) and "python -m data.sample" in str(err.value)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="garbage.model"):
        load_tokenizer(garbage, 1024)


def test_ensure_sample_is_idempotent(sample, monkeypatch):
    dataset_dir, _ = sample

    def no_rebuild(*args, **kwargs):
        raise AssertionError("ensure_sample rebuilt a valid sample")

    monkeypatch.setattr(data.sample, "build_sample", no_rebuild)
    again_dir, tokenizer_path = ensure_sample(dataset_dir.parent.parent)
    assert again_dir == dataset_dir and tokenizer_path.is_file()
