"""Tokenize your own text into challenge-format shards (the exporter, for local corpora).

Mirrors the challenge exporter (openai/parameter-golf `data/download_hf_docs_and_tokenize.py`;
docs/TECHNIQUES.md, "Shard format and tokenizer"): a SentencePiece BPE with the
challenge's trainer settings (or an existing model), each document encoded as
[BOS] + tokens with no EOS, the first --val-docs documents written to
`fineweb_val_*.bin` and the rest to `fineweb_train_*.bin`, shards flushed every
--shard-size tokens and at the val->train switch. A `manifest.json` with the
per-split stats is written beside the shards.

Inputs, in the order given:
- a `.jsonl` file: one document per line, text under --text-field (default "text");
- a `.txt` / `.md` file: one document per file (--doc-split file, the default) or one
  per block of text separated by blank lines (--doc-split blank);
- a folder: every `.txt`, `.md` and `.jsonl` file below it, recursively, sorted by path.

Run:
    python -m data.build_shards --input corpus.jsonl notes/ --output-dir data/datasets/mine_sp1024 \\
        --vocab-size 1024 --val-docs 1000
"""

import argparse
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from data.bpb import load_tokenizer
from data.shards import write_shard

DOC_SUFFIXES = (".txt", ".md", ".jsonl")
SHARD_SIZE = 10**8  # the challenge's tokens per shard
NUM_VAL_DOCS = 50_000  # the challenge's validation documents
BOS_ID = 1
ENCODE_BATCH_DOCS = 1024
TOKENIZER_SEED = 1337  # fixes SentencePiece's sentence sampling, so rebuilds are identical

# The challenge's SentencePiece trainer settings (download_hf_docs_and_tokenize.py).
SP_TRAINER_SETTINGS = {
    "model_type": "bpe",
    "character_coverage": 0.999,
    "byte_fallback": True,
    "split_digits": True,
    "normalization_rule_name": "nmt_nfkc",
    "add_dummy_prefix": False,
    "pad_id": 0,
    "bos_id": BOS_ID,
    "eos_id": 2,
    "unk_id": 3,
    "hard_vocab_limit": False,
}


def expand_inputs(inputs) -> list:
    """Files to read, in order: given files as is, folders walked recursively and sorted."""
    files = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DOC_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"input folder {path} has no {'/'.join(DOC_SUFFIXES)} files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"input {path} does not exist")
    return files


def _read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); convert it or leave it out"
        ) from None


def iter_documents(inputs, text_field: str = "text", doc_split: str = "file"):
    """Yield document strings from files/folders (see the module docstring for the formats)."""
    if doc_split not in ("file", "blank"):
        raise ValueError(f"doc_split must be 'file' or 'blank', got {doc_split!r}")
    for path in expand_inputs(inputs):
        if path.suffix.lower() == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
                    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                        raise ValueError(
                            f"{path}:{lineno}: no string field {text_field!r} (found {keys}); pass --text-field"
                        )
                    yield record[text_field]
        else:
            text = _read_text_file(path)
            if doc_split == "file":
                if text.strip():
                    yield text
            else:
                for block in re.split(r"\n[ \t]*\n", text):
                    if block.strip():
                        yield block.strip()


def sp_training_texts(docs, max_docs: int = 0):
    """The challenge's tokenizer-training view of documents: NUL -> space, stripped, empties dropped."""
    for i, doc in enumerate(docs):
        if max_docs and i >= max_docs:
            return
        text = doc.replace("\x00", " ").strip()
        if text:
            yield text


def train_tokenizer(docs, model_prefix, vocab_size: int, max_docs: int = 0, **trainer_overrides) -> Path:
    """Train a SentencePiece BPE with the challenge's settings; return the `.model` path.

    `max_docs` caps how many leading documents are used (the challenge's
    `tokenizer_train_docs`); `trainer_overrides` go straight to SentencePiece
    (e.g. input_sentence_size, num_threads).
    """
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    model_path = prefix.with_name(prefix.name + ".model")
    for stale in (model_path, prefix.with_name(prefix.name + ".vocab")):
        stale.unlink(missing_ok=True)
    settings = {**SP_TRAINER_SETTINGS, "vocab_size": vocab_size, "minloglevel": 2}
    settings.update(trainer_overrides)
    spm.set_random_generator_seed(TOKENIZER_SEED)
    spm.SentencePieceTrainer.train(
        sentence_iterator=sp_training_texts(docs, max_docs), model_prefix=str(prefix), **settings
    )
    return model_path


class ShardWriter:
    """Packs documents into fixed-size shards of one split at a time, counting the stats."""

    def __init__(self, output_dir: Path, shard_size: int):
        self.output_dir = output_dir
        self.shard_size = shard_size
        self.split = "val"
        self.pending, self.pending_len = [], 0
        self.stats = {f"{k}_{s}": 0 for k in ("docs", "files", "tokens") for s in ("total", "val", "train")}

    def flush(self) -> None:
        if self.pending_len:
            index = self.stats["files_" + self.split]
            write_shard(self.output_dir / f"fineweb_{self.split}_{index:06d}.bin", np.concatenate(self.pending))
            self.stats["files_" + self.split] += 1
            self.stats["files_total"] += 1
        self.pending, self.pending_len = [], 0

    def add_document(self, toks: np.ndarray, split: str) -> None:
        if split != self.split:
            self.flush()  # never mix splits in one shard
            self.split = split
        for key in ("docs_", "tokens_"):
            n = 1 if key == "docs_" else toks.size
            self.stats[key + split] += n
            self.stats[key + "total"] += n
        # A document may straddle two shards, as in the challenge export.
        while toks.size:
            room = self.shard_size - self.pending_len
            self.pending.append(toks[:room])
            self.pending_len += min(room, toks.size)
            toks = toks[room:]
            if self.pending_len == self.shard_size:
                self.flush()


def _batches(items, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def export_shards(docs, sp, output_dir, num_val_docs: int, shard_size: int = SHARD_SIZE,
                  num_threads: int = 0) -> dict:
    """Encode documents as [BOS] + ids into val then train shards in `output_dir`; return the stats.

    Stale `fineweb_{train,val}_*.bin` in `output_dir` are deleted first, so the
    directory always holds exactly one export.
    """
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for pattern in ("fineweb_train_*.bin", "fineweb_val_*.bin"):
        for stale in output_dir.glob(pattern):
            stale.unlink()
    vocab_size, bos_id = int(sp.vocab_size()), int(sp.bos_id())
    if bos_id < 0:
        raise ValueError("tokenizer has no BOS piece; documents are separated by BOS, so train it with bos_id=1")
    threads = num_threads or min(8, os.cpu_count() or 1)
    writer = ShardWriter(output_dir, shard_size)
    total = len(docs) if hasattr(docs, "__len__") else None
    with tqdm(total=total, desc=f"tokenize -> {output_dir.name}", unit="doc", mininterval=1.0) as bar:
        for batch in _batches(docs, ENCODE_BATCH_DOCS):
            for ids in sp.encode(batch, out_type=int, num_threads=threads):
                if ids and max(ids) >= vocab_size:
                    raise ValueError(f"token id {max(ids)} outside the tokenizer's vocab of {vocab_size}")
                toks = np.empty(len(ids) + 1, dtype=np.uint16)
                toks[0] = bos_id
                toks[1:] = ids
                writer.add_document(toks, "val" if writer.stats["docs_total"] < num_val_docs else "train")
            bar.update(len(batch))
    writer.flush()
    return writer.stats


def write_dataset_manifest(output_dir, stats: dict, tokenizer_path, vocab_size: int, num_val_docs: int,
                           shard_size: int, bos_id: int = BOS_ID, **extra) -> Path:
    """Write `manifest.json` (stats, tokenizer path relative to the dataset folder) and return its path."""
    output_dir = Path(output_dir)
    manifest = {
        "name": output_dir.name,
        "vocab_size": vocab_size,
        "bos_id": bos_id,
        "append_eos": False,
        "num_val_docs": num_val_docs,
        "shard_size": shard_size,
        "tokenizer_model": os.path.relpath(Path(tokenizer_path).resolve(), output_dir.resolve()),
        "train_glob": "fineweb_train_*.bin",
        "val_glob": "fineweb_val_*.bin",
        "stats": stats,
        **extra,
    }
    path = output_dir / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return path


def build_dataset(make_docs, output_dir, vocab_size: int, num_val_docs: int, tokenizer=None,
                  tokenizer_prefix=None, shard_size: int = SHARD_SIZE, tokenizer_train_docs: int = 0,
                  trainer_overrides=None, num_threads: int = 0, manifest_extra=None):
    """Train (or reuse) a tokenizer, export shards and the manifest; return (stats, tokenizer_path).

    `make_docs()` must return a fresh iterable of documents each call: the
    tokenizer and the exporter each read the corpus once.
    """
    output_dir = Path(output_dir)
    if tokenizer is not None:
        tokenizer_path = Path(tokenizer)
        sp = load_tokenizer(tokenizer_path, vocab_size)
    else:
        prefix = Path(tokenizer_prefix) if tokenizer_prefix else output_dir / f"tokenizer_{vocab_size}_bpe"
        t0 = time.perf_counter()
        tokenizer_path = train_tokenizer(make_docs(), prefix, vocab_size, max_docs=tokenizer_train_docs,
                                         **(trainer_overrides or {}))
        sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
        print(f"tokenizer: {tokenizer_path} ({sp.vocab_size()} pieces, {time.perf_counter() - t0:.1f}s)")
        if sp.vocab_size() != vocab_size:
            print(f"warning: asked for {vocab_size} pieces but the corpus only supports {sp.vocab_size()}; "
                  f"train with VOCAB_SIZE={sp.vocab_size()} or use a larger corpus")
    stats = export_shards(make_docs(), sp, output_dir, num_val_docs, shard_size, num_threads)
    if stats["docs_val"] == 0 or stats["docs_train"] == 0:
        raise ValueError(
            f"{output_dir}: {stats['docs_total']} documents gave {stats['docs_val']} validation and "
            f"{stats['docs_train']} training documents; both splits need at least one, so choose "
            f"--val-docs between 1 and {max(stats['docs_total'] - 1, 0)}"
        )
    write_dataset_manifest(output_dir, stats, tokenizer_path, int(sp.vocab_size()), num_val_docs, shard_size,
                           bos_id=int(sp.bos_id()), **(manifest_extra or {}))
    return stats, tokenizer_path


def build_shards_main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.build_shards", description=__doc__.split("\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="JSONL / .txt / .md files or folders")
    parser.add_argument("--output-dir", required=True, help="dataset folder, e.g. data/datasets/mine_sp1024")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--tokenizer", help="reuse this existing SentencePiece .model instead of training one")
    parser.add_argument("--tokenizer-out",
                        help="prefix for the trained tokenizer (default <output-dir>/tokenizer_<V>_bpe)")
    parser.add_argument("--tokenizer-train-docs", type=int, default=0,
                        help="train the tokenizer on the first N docs (0 = all, the default)")
    parser.add_argument("--val-docs", type=int, default=NUM_VAL_DOCS,
                        help=f"leading documents that form the validation split (default {NUM_VAL_DOCS})")
    parser.add_argument("--shard-size", type=int, default=SHARD_SIZE, help="tokens per shard")
    parser.add_argument("--text-field", default="text", help="JSONL field holding the document text")
    parser.add_argument("--doc-split", choices=("file", "blank"), default="file",
                        help="text files: one document per file, or per blank-line-separated block")
    args = parser.parse_args(argv)
    if args.tokenizer and args.tokenizer_out:
        parser.error("--tokenizer reuses a model, --tokenizer-out names a new one; pass only one")

    def make_docs():
        return iter_documents(args.input, args.text_field, args.doc_split)

    t0 = time.perf_counter()
    stats, tokenizer_path = build_dataset(make_docs, args.output_dir, args.vocab_size, args.val_docs,
                                          tokenizer=args.tokenizer, tokenizer_prefix=args.tokenizer_out,
                                          shard_size=args.shard_size, tokenizer_train_docs=args.tokenizer_train_docs)
    print(f"wrote {args.output_dir}: val {stats['docs_val']} docs / {stats['tokens_val']} tokens in "
          f"{stats['files_val']} shards, train {stats['docs_train']} docs / {stats['tokens_train']} tokens in "
          f"{stats['files_train']} shards; tokenizer {tokenizer_path}; {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    build_shards_main()
