"""Offline sample corpus: English prose from the Python standard library, as challenge shards.

For runs without network access (smoke tests, CPU debugging) this builds a small
dataset in the challenge's format from text every Python install already has:
the docstrings of the standard library (modules, classes, functions; at least
200 characters, deduplicated) plus the language-reference topics stored in
`pydoc_data/topics.py`. Sources are parsed with `ast`, never imported; `test`,
`tests`, `idlelib`, `lib2to3` and `site-packages` are skipped.

Documents are collected in sorted path order, then shuffled with a fixed seed so
validation and training look alike. A 1024-piece SentencePiece BPE is trained on
them with the challenge's settings (data/build_shards.py) and the leading
documents holding about 250k tokens become the validation split:

    data/datasets/sample_sp1024/fineweb_{val,train}_000000.bin, manifest.json
    data/tokenizers/sample_1024_bpe.model (.vocab)

The content follows the running Python version, so two machines may build
slightly different samples; each build is deterministic.

Run (idempotent; --force rebuilds):
    python -m data.sample
From code (call on one rank, then barrier, under torchrun):
    dataset_dir, tokenizer_path = ensure_sample()
"""

import argparse
import ast
import json
import os
import platform
import random
import sysconfig
import time
from pathlib import Path

import numpy as np

from data.bpb import load_tokenizer
from data.build_shards import SHARD_SIZE, export_shards, train_tokenizer, write_dataset_manifest
from data.shards import shard_token_count

SAMPLE_DATASET = "sample_sp1024"
SAMPLE_TOKENIZER = "sample_1024_bpe"
SAMPLE_VOCAB = 1024
SAMPLE_FORMAT = 1  # bump when the recipe changes, so old samples are rebuilt
SAMPLE_SEED = 1337
MIN_DOC_CHARS = 200
VAL_TOKENS_TARGET = 250_000
MAX_VAL_FRACTION = 0.4  # on a small stdlib keep most tokens for training
SKIP_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__"})
TOPICS_FILE = ("pydoc_data", "topics.py")
# Bounded tokenizer training keeps the build well under a minute on 2 cores.
SAMPLE_TRAINER_OVERRIDES = {"input_sentence_size": 200_000, "num_threads": 2}


def stdlib_source_files(stdlib_dir=None) -> list:
    """Standard-library `.py` files, sorted by relative path, skipping test/tool/vendored folders."""
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        files.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def extract_texts(path) -> list:
    """Docstrings of a source file in `ast.walk` order (plus topic texts for pydoc_data/topics.py)."""
    path = Path(path)
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return []  # stray Python-2 or template files: nothing to learn from
    texts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                texts.append(doc)
    if path.parts[-2:] == TOPICS_FILE:
        # The language reference as plain text: {topic: text} dict literals.
        for node in ast.walk(tree):
            if isinstance(node, ast.Dict):
                texts.extend(v.value.strip() for v in node.values
                             if isinstance(v, ast.Constant) and isinstance(v.value, str))
    return texts


def stdlib_documents(stdlib_dir=None, min_chars: int = MIN_DOC_CHARS, max_docs: int = 0) -> list:
    """Deduplicated stdlib texts of >= `min_chars` characters in deterministic source order."""
    docs, seen = [], set()
    for path in stdlib_source_files(stdlib_dir):
        for text in extract_texts(path):
            if len(text) >= min_chars and text not in seen:
                seen.add(text)
                docs.append(text)
                if max_docs and len(docs) >= max_docs:
                    return docs
    return docs


def sample_documents(stdlib_dir=None) -> list:
    """All sample documents after the fixed-seed shuffle that mixes modules across the two splits."""
    docs = stdlib_documents(stdlib_dir)
    random.Random(SAMPLE_SEED).shuffle(docs)
    return docs


def sample_paths(data_root=None):
    """(dataset_dir, tokenizer_model_path) of the sample under `data_root` (default: this data/ folder)."""
    root = Path(data_root) if data_root is not None else Path(__file__).resolve().parent
    return root / "datasets" / SAMPLE_DATASET, root / "tokenizers" / f"{SAMPLE_TOKENIZER}.model"


def sample_problem(data_root=None):
    """None if a complete, valid sample exists under `data_root`, else what is wrong with it."""
    dataset_dir, tokenizer_path = sample_paths(data_root)
    manifest_path = dataset_dir / "manifest.json"
    if not manifest_path.is_file():
        return f"no sample at {dataset_dir} yet"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        stats = manifest["stats"]
        if manifest.get("sample_format") != SAMPLE_FORMAT:
            return f"{manifest_path} is from another sample recipe"
        for split in ("val", "train"):
            names = sorted(p.name for p in dataset_dir.glob(f"fineweb_{split}_*.bin"))
            if names != [f"fineweb_{split}_{i:06d}.bin" for i in range(stats[f"files_{split}"])]:
                return f"{dataset_dir} does not hold the {stats[f'files_{split}']} {split} shards its manifest lists"
            tokens = sum(shard_token_count(dataset_dir / n) for n in names)
            if tokens != stats[f"tokens_{split}"]:
                return f"{dataset_dir} {split} shards hold {tokens} tokens, its manifest {stats[f'tokens_{split}']}"
        load_tokenizer(tokenizer_path, SAMPLE_VOCAB)
    except (OSError, KeyError, TypeError, ValueError) as exc:  # ShardError is a ValueError
        return f"{type(exc).__name__}: {exc}"
    return None


def build_sample(data_root=None) -> dict:
    """Build the sample from scratch and return its manifest stats."""
    dataset_dir, tokenizer_path = sample_paths(data_root)
    t0 = time.perf_counter()
    docs = sample_documents()
    if len(docs) < 100:
        raise RuntimeError(f"found only {len(docs)} stdlib docstrings under {sysconfig.get_paths()['stdlib']}; "
                           f"this Python install lacks its library sources, so use python -m data.download instead")
    t1 = time.perf_counter()
    model_path = train_tokenizer(docs, tokenizer_path.with_suffix(""), SAMPLE_VOCAB, **SAMPLE_TRAINER_OVERRIDES)
    sp = load_tokenizer(model_path, SAMPLE_VOCAB)
    t2 = time.perf_counter()
    # Split after the doc where the running token count (BOS included) reaches the target.
    doc_tokens = np.array([len(ids) + 1 for ids in sp.encode(docs, out_type=int, num_threads=2)])
    target = min(VAL_TOKENS_TARGET, MAX_VAL_FRACTION * doc_tokens.sum())
    num_val_docs = int(np.searchsorted(np.cumsum(doc_tokens), target)) + 1
    (dataset_dir / "manifest.json").unlink(missing_ok=True)  # invalid until the new export is complete
    stats = export_shards(docs, sp, dataset_dir, num_val_docs, num_threads=2)
    write_dataset_manifest(
        dataset_dir, stats, model_path, SAMPLE_VOCAB, num_val_docs, shard_size=SHARD_SIZE,
        sample_format=SAMPLE_FORMAT, source="python stdlib docstrings + pydoc_data topics",
        python_version=platform.python_version(), utf8_bytes=sum(len(d.encode("utf-8")) for d in docs),
    )
    t3 = time.perf_counter()
    print(f"sample: {len(docs)} docs read in {t1 - t0:.1f}s, tokenizer trained in {t2 - t1:.1f}s, "
          f"shards written in {t3 - t2:.1f}s")
    return stats


def ensure_sample(data_root=None, force: bool = False):
    """Build the offline sample unless a valid one exists (or `force`); return (dataset_dir, tokenizer_path)."""
    problem = "--force given" if force else sample_problem(data_root)
    if problem is not None:
        print(f"building the offline sample ({problem})")
        build_sample(data_root)
        problem = sample_problem(data_root)
        if problem is not None:
            raise RuntimeError(f"the freshly built sample is invalid ({problem}); delete it and run "
                               f"`python -m data.sample --force` to see where it fails")
    return sample_paths(data_root)


def sample_main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.sample", description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", default=None,
                        help="where datasets/ and tokenizers/ go (default: this data/ folder)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a valid sample exists")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    if not args.force and sample_problem(args.data_root) is None:
        print("sample already built and valid; --force rebuilds it")
    dataset_dir, tokenizer_path = ensure_sample(args.data_root, force=args.force)
    stats = json.loads((dataset_dir / "manifest.json").read_text(encoding="utf-8"))["stats"]
    print(f"{dataset_dir}: {stats['docs_total']} docs; val {stats['docs_val']} docs / {stats['tokens_val']:,} "
          f"tokens; train {stats['docs_train']} docs / {stats['tokens_train']:,} tokens; "
          f"tokenizer {tokenizer_path}; {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    sample_main()
