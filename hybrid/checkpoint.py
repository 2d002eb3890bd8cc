"""Training checkpoints: everything a killed run needs to continue bit for bit.

A checkpoint holds the model, every optimizer's state (Muon's momentum gathered from all ranks
first), the EMA, the data loader's position, the step, the training time already spent, the QAT
switch and the RNG states. It is written atomically (temporary file, then rename), so a kill during
the write leaves the previous checkpoint intact, and it is read back with
`torch.load(weights_only=True)`, which refuses arbitrary pickled objects.

These files are the run's own working state, not a submission: the artifact that is scored uses the
pickle-free format of quant/artifact.py.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

CHECKPOINT_VERSION = 1


def save_checkpoint(path: Path, *, model, optimizers, ema, loader_state: dict, step: int, train_ms: float,
                    qat_on: bool, hparams: dict) -> None:
    state = {
        "version": CHECKPOINT_VERSION,
        "model": model.state_dict(),
        "optimizers": [opt.state_dict() for opt in optimizers],
        "ema": ema.state_dict() if ema is not None else None,
        "loader": loader_state,
        "step": step,
        "train_ms": train_ms,
        "qat_on": qat_on,
        "hparams": hparams,
        "rng_cpu": torch.get_rng_state(),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (RESUME takes a checkpoint file, "
                                f"a directory holding latest.pt, or 'auto')")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated or foreign files: say which file and why
        raise ValueError(f"checkpoint {path} could not be read: {exc}") from exc
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint {path} is not a version-{CHECKPOINT_VERSION} training checkpoint")
    return state


def resolve_resume(resume: str, checkpoint_dir: Path) -> Path | None:
    """RESUME='' → None; 'auto' → checkpoint_dir/latest.pt if present; a directory → its latest.pt."""
    if not resume:
        return None
    if resume == "auto":
        p = Path(checkpoint_dir) / "latest.pt"
        return p if p.is_file() else None
    p = Path(resume)
    return p / "latest.pt" if p.is_dir() else p
