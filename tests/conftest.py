"""Shared fixtures: the repo root on sys.path, and the offline sample corpus built once."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def sample_corpus():
    """(dataset_dir, tokenizer_path) of data/datasets/sample_sp1024, built on first use (~30 s)."""
    from data.sample import ensure_sample

    return ensure_sample(ROOT / "data")
