"""hybrid/training/checkpoint.py in the trainer: the final weights reach the disk before packing, a failed
pack is repacked from them without training, and a resume with other training settings stops."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import train_gpt
from hybrid.training.checkpoint import RESUME_FREE, resume_mismatches
from records.logs import parse_log

ROUNDTRIP = re.compile(r"^final_int\d+_\w+_roundtrip_exact val_loss:([0-9.]+) val_bpb:([0-9.]+)", re.M)
BASE = {"PRESET": "tiny", "ITERATIONS": "8", "WARMDOWN_ITERS": "4", "TRAIN_LOG_EVERY": "1"}


def run(monkeypatch, tmp_path: Path, run_id: str, **extra) -> tuple[int, str]:
    """train_gpt.main in this process (so a test can make a later phase fail); returns (rc, log)."""
    with monkeypatch.context() as m:
        for key, value in {**BASE, "RUN_ID": run_id, "LOG_DIR": str(tmp_path / "logs"),
                           "CHECKPOINT_DIR": str(tmp_path / "ckpt" / run_id), **extra}.items():
            m.setenv(key, str(value))
        rc = train_gpt.main([])
    log = tmp_path / "logs" / f"{run_id}.txt"
    return rc, (log.read_text(encoding="utf-8") if log.exists() else "")


def test_failed_pack_keeps_the_weights_and_a_repack_reproduces_the_run(monkeypatch, tmp_path, sample_corpus):
    rc, whole = run(monkeypatch, tmp_path, "whole")
    assert rc == 0
    assert "final_weights:saved step:8" in whole
    assert whole.index("\nfinal_weights:saved") < whole.index("\nfinal_prequant")  # before any evaluation

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(train_gpt, "write_artifact", disk_full)
        with pytest.raises(OSError):
            run(monkeypatch, tmp_path, "broken")
    log = (tmp_path / "logs" / "broken.txt").read_text(encoding="utf-8")
    final = tmp_path / "ckpt" / "broken" / "final.pt"
    assert final.is_file()
    assert "\nerror: OSError after training" in log and f"RESUME={final} python train_gpt.py" in log
    assert not ROUNDTRIP.search(log)

    rc, log = run(monkeypatch, tmp_path, "broken", RESUME=final)  # the repack: no training step
    assert rc == 0
    after_resume = log[re.search(r"^resume:from .* finished:1$", log, re.M).start():]
    assert not re.search(r"^step:\d+/\d+ train_loss", after_resume, re.M)
    assert ROUNDTRIP.search(log).groups() == ROUNDTRIP.search(whole).groups()
    assert (tmp_path / "logs" / "broken.ptz").read_bytes() == (tmp_path / "logs" / "whole.ptz").read_bytes()
    curve = [(step, loss) for step, loss, _ in parse_log(tmp_path / "logs" / "broken.txt").train]
    assert curve == [(step, loss) for step, loss, _ in parse_log(tmp_path / "logs" / "whole.txt").train]


def test_resume_with_other_training_settings_stops_unless_allowed(monkeypatch, tmp_path, sample_corpus, capsys):
    rc, _ = run(monkeypatch, tmp_path, "a", CHECKPOINT_EVERY=4)
    assert rc == 0
    ckpt = tmp_path / "ckpt" / "a" / "step_000004.pt"
    capsys.readouterr()
    rc, log = run(monkeypatch, tmp_path, "b", RESUME=ckpt, MATRIX_LR=0.05, SEED=7)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert "MATRIX_LR: checkpoint" in err and "SEED: checkpoint 1337, now 7" in err and "RESUME_MISMATCH=allow" in err
    assert not re.search(r"^step:\d+/\d+ train_loss", log, re.M)
    # export and evaluation settings may change on a resume (that is what a repack does)
    rc, _ = run(monkeypatch, tmp_path, "c", RESUME=ckpt, COMPRESSOR="lzma", EVAL_STRIDE=16)
    assert rc == 0
    rc, log = run(monkeypatch, tmp_path, "d", RESUME=ckpt, MATRIX_LR=0.05, RESUME_MISMATCH="allow")
    assert rc == 0 and "resume:mismatch_allowed MATRIX_LR: checkpoint" in log
    # a checkpoint from before TOKEN_MIX existed ran the one-token lerp: resuming it under today's default
    # (conv) is a settings mismatch, named before any step, not a state-dict error after the model is built
    state = torch.load(ckpt, weights_only=False)
    del state["hparams"]["token_mix"]
    torch.save(state, tmp_path / "old.pt")
    capsys.readouterr()
    rc, log = run(monkeypatch, tmp_path, "e", RESUME=tmp_path / "old.pt")
    err = capsys.readouterr().err
    assert rc == 2 and "TOKEN_MIX: checkpoint 'shift', now 'conv'" in err, err


def test_mismatch_list_ignores_only_the_free_settings():
    saved = {"matrix_lr": 0.02, "seed": 1, "compressor": "zlib", "iterations": 10}
    assert resume_mismatches(saved, dict(saved, compressor="lzma")) == []
    diffs = resume_mismatches(saved, dict(saved, iterations=20, matrix_lr=0.03))
    assert diffs == ["ITERATIONS: checkpoint 10, now 20", "MATRIX_LR: checkpoint 0.02, now 0.03"]
    math_fields = {f.name for f in train_gpt.fields(train_gpt.Hyperparameters)} - RESUME_FREE
    assert {"matrix_lr", "seed", "iterations", "train_batch_tokens", "model_dim", "ema_decay"} <= math_fields
    assert RESUME_FREE <= {f.name for f in train_gpt.fields(train_gpt.Hyperparameters)}  # no stale names
