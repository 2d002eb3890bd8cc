"""Artifact accounting: code bytes + compressed model bytes against the decimal 16,000,000-byte cap.

The challenge counts the bytes of the code that produces the model plus the bytes of the compressed
model (the challenge README; docs/TECHNIQUES.md, "Artifact size"). Code bytes here are file sizes on
disk (for UTF-8 text, the same number as the baseline's `len(code.encode("utf-8"))`). The trainer
sums them over `loaded_source_files`: `train_gpt.py` plus every project module the run actually
imported (so an architecture that is not used, say RWKV-7 in a hybrid run, costs nothing).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

ARTIFACT_LIMIT = 16_000_000  # decimal bytes, code + compressed model

# Packages whose imported modules count as the trainer's code.
TRAINER_PACKAGES: tuple[str, ...] = ("hybrid", "quant", "data")


def code_bytes(paths) -> int:
    """Sum of the sizes in bytes of the given files (FileNotFoundError if one is missing)."""
    return sum(Path(p).stat().st_size for p in paths)


def loaded_source_files(root, entry="train_gpt.py") -> list[Path]:
    """`root/entry` plus the file of every module in `sys.modules` that lives under `root/<package>`
    for the trainer's packages, sorted. Call it after the run has imported everything it uses."""
    root = Path(root).resolve()
    files = {root / entry} if (root / entry).is_file() else set()
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if not path:
            continue
        path = Path(path).resolve()
        if path.suffix == ".py" and path.is_relative_to(root) and path.relative_to(root).parts[0] in TRAINER_PACKAGES:
            files.add(path)
    return sorted(files)


@dataclass
class BudgetReport:
    """Bytes used against the limit; `margin` < 0 means over budget."""

    code_bytes: int
    model_bytes: int
    limit: int = ARTIFACT_LIMIT
    total: int = field(init=False)
    margin: int = field(init=False)
    fits: bool = field(init=False)

    def __post_init__(self) -> None:
        self.total = self.code_bytes + self.model_bytes
        self.margin = self.limit - self.total
        self.fits = self.margin >= 0

    def lines(self) -> list[str]:
        """`key:value` log lines; an extra `artifact_over_budget:by_bytes:N` line when over."""
        summary = (f"artifact_bytes:{self.total} code_bytes:{self.code_bytes} model_bytes:{self.model_bytes} "
                   f"limit:{self.limit} margin:{self.margin}")
        out = [summary]
        if not self.fits:
            out.append(f"artifact_over_budget:by_bytes:{-self.margin}")
        return out
