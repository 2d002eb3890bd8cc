"""Training checkpoints: everything a killed run needs to continue bit for bit.

A checkpoint holds the model, every optimizer's state (Muon's momentum gathered from all ranks
first), the EMA, the data loader's position, the step, the training time already spent, the QAT
switch and the RNG states. It is written atomically (temporary file, then rename), so a kill during
the write leaves the previous checkpoint intact, and it is read back with
`torch.load(weights_only=True)`, which refuses arbitrary pickled objects.

These files are the run's own working state, not a submission: the artifact that is scored uses the
pickle-free format of quant/artifact.py.

Every run also writes `final.pt` when training ends, before anything that could fail afterwards
(evaluation, GPTQ, packing, the round trip): the model, the EMA, the step and `finished: True`, no
optimizer state. Resuming from it (`RESUME=checkpoints/<run_id>/final.pt python train_gpt.py` with
the run's settings) skips training and repacks and re-scores exactly those weights, so a failure
after training never costs the run.

A resume compares the checkpoint's hyperparameters with the run's: any difference in a setting that
changes the training math (`resume_mismatches`) stops the run with the list, unless
RESUME_MISMATCH=allow, which logs the list and goes on. Export, evaluation, logging and checkpoint
settings may differ (that is what a repack changes).
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from hybrid.config import as_saved
from hybrid.training.settings import SettingError

CHECKPOINT_VERSION = 1


# Settings a resume may change: they do not enter the training math (what is exported, evaluated,
# logged or checkpointed, and how the step is compiled). Every other hyperparameter must match.
RESUME_FREE = frozenset({
    "run_id", "val_loss_every", "val_max_tokens", "eval_stride", "eval_batch_seqs", "eval_mode", "eval_warmup",
    "eval_prequant", "train_log_every", "matrix_bits", "embed_bits", "compressor", "bitpack", "mlp_bits",
    "attn_bits", "quant_clip", "sd_k_matrix", "sd_k_embed", "gptq", "gptq_seqs", "gptq_seq_len", "gptq_temp",
    "gptq_batch", "fit_budget", "artifact_path", "checkpoint_every", "checkpoint_dir", "checkpoint_keep",
    "resume", "resume_mismatch", "compile", "log_dir", "mlp_fused", "rwkv_impl", "moe_dispatch",
    "ttt", "ttt_chunk", "ttt_epochs", "ttt_lr", "ttt_momentum", "ttt_clip", "ttt_lora_rank", "ttt_lora_alpha",
    "ttt_lora_lr", "ttt_lora_chunk", "ttt_lora_docs", "ttt_lora_targets",
})


def resume_mismatches(saved: dict, current: dict) -> list[str]:
    """'NAME: checkpoint X, now Y' for each training-math setting that differs (RESUME_FREE aside).
    A setting only one side knows (a checkpoint from before the field existed) is not compared."""
    out = []
    for name in sorted(set(saved) & set(current)):
        if name in RESUME_FREE:
            continue
        if saved.get(name) != current.get(name):
            out.append(f"{name.upper()}: checkpoint {saved.get(name)!r}, now {current.get(name)!r}")
    return out


def save_checkpoint(path: Path, *, model, optimizers, ema, loader_state: dict, step: int, train_ms: float,
                    qat_on: bool, hparams: dict, finished: bool = False) -> None:
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
        "finished": finished,
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


def write_checkpoint(h, rt, checkpoint_dir: Path, model, optimizers, ema, loader, step: int, train_ms: float,
                     qat_on: bool, log) -> Path:
    """The trainer's checkpoint every CHECKPOINT_EVERY steps: step_<step>.pt and latest.pt, keeping the
    CHECKPOINT_KEEP newest step files. Every rank must call it (Muon gathers its momentum)."""
    for opt in optimizers:
        if hasattr(opt, "gather_state"):
            opt.gather_state()  # Muon: collective, every rank takes part
    path = checkpoint_dir / f"step_{step:06d}.pt"
    if rt.is_main:
        t = time.perf_counter()
        kwargs = dict(model=model, optimizers=optimizers, ema=ema, loader_state=loader.state_dict(), step=step,
                      train_ms=train_ms, qat_on=qat_on, hparams=asdict(h))
        save_checkpoint(path, **kwargs)
        save_checkpoint(checkpoint_dir / "latest.pt", **kwargs)
        old = sorted(checkpoint_dir.glob("step_*.pt"))[:-h.checkpoint_keep] if h.checkpoint_keep > 0 else []
        for p in old:
            p.unlink()
        log(f"checkpoint:saved step:{step} path:{path} time:{1000 * (time.perf_counter() - t):.0f}ms")
    rt.barrier()
    return path


def save_final_weights(h, rt, checkpoint_dir: Path, model, ema, loader, step: int, train_ms: float,
                       qat_on: bool, log) -> Path:
    """checkpoint_dir/final.pt at the end of training (module docstring), written by rank 0 before
    any evaluation or packing; logs where it is and how to repack from it."""
    path = Path(checkpoint_dir) / "final.pt"
    if rt.is_main:
        t = time.perf_counter()
        save_checkpoint(path, model=model, optimizers=[], ema=ema, loader_state=loader.state_dict(), step=step,
                        train_ms=train_ms, qat_on=qat_on, hparams=asdict(h), finished=True)
        log(f"final_weights:saved step:{step} path:{path} time:{1000 * (time.perf_counter() - t):.0f}ms "
            f"(repack without training: RESUME={path} with this run's settings)")
    return path


def restore_training(path: Path, model, optimizers, ema, loader, device, hparams: dict, allow_mismatch: bool,
                     log) -> tuple[int, float, bool, bool]:
    """Load the checkpoint at `path` into a run's model, optimizers, EMA and loader after comparing
    its hyperparameters with `hparams` (module docstring); returns the (step, train_ms, qat_on,
    finished) it continues from. A finished checkpoint (final.pt) has no optimizer state."""
    state = load_checkpoint(path, map_location=device)
    saved = state.get("hparams") or {}
    if saved:  # read with the defaults of its day: an old checkpoint's T mixer is "shift", not today's "conv"
        saved = as_saved(saved)
    diffs = resume_mismatches(saved, hparams)
    if diffs and not allow_mismatch:
        raise ResumeMismatch(f"RESUME={path}: the checkpoint was trained with other settings ({'; '.join(diffs)}); "
                             f"run with the checkpoint's values, or set RESUME_MISMATCH=allow to continue anyway")
    for line in diffs:
        log(f"resume:mismatch_allowed {line}")
    finished = bool(state.get("finished", False))
    model.load_state_dict(state["model"])
    for opt, opt_state in zip(optimizers, state["optimizers"]):
        opt.load_state_dict(opt_state)
    if ema is not None and state["ema"] is not None:
        ema.load_state_dict(state["ema"])
    loader.load_state_dict(state["loader"])
    return state["step"], state["train_ms"], state["qat_on"], finished


class ResumeMismatch(SettingError):
    """A resume whose training-math settings differ from its checkpoint's."""
