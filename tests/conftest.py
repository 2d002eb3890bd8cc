"""Shared fixtures: the repo root on sys.path, and the offline sample corpus built once."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def sample_corpus():
    """(dataset_dir, tokenizer_path) of data/datasets/sample_sp1024, built on first use (~30 s)."""
    from data.sample import ensure_sample

    return ensure_sample(ROOT / "data")


def randomize_(module: torch.nn.Module, std: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (zero-init projections included) random values, so no path is trivially off."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module
