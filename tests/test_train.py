"""End-to-end runs of train_gpt.py on the CPU with the `tiny` preset on the offline sample corpus:
the loss falls and the round trip stays close; a resumed run reproduces the uninterrupted one; a
2-process gloo run equals a 1-process run with gradient accumulation; a diverging run stops."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

STEP_LOSS = re.compile(r"^step:(\d+)/\d+ train_loss:([0-9.naninf]+)", re.M)
ROUNDTRIP = re.compile(r"^final_int\d+_\w+_roundtrip_exact val_loss:([0-9.]+) val_bpb:([0-9.]+)", re.M)
PREQUANT = re.compile(r"^final_prequant .*?val_bpb:([0-9.]+)", re.M)


def run_trainer(tmp_path: Path, run_id: str, extra_env: dict, nproc: int = 1, check: bool = True,
                script: str = "train_gpt.py", log_dir: Path | None = None):
    env = dict(os.environ)
    env.update({"PRESET": "tiny", "RUN_ID": run_id, "LOG_DIR": str(tmp_path / "logs"),
                "CHECKPOINT_DIR": str(tmp_path / "ckpt" / run_id), "OMP_NUM_THREADS": "1" if nproc > 1 else "2",
                "TRAIN_LOG_EVERY": "1"})
    env.update({k: str(v) for k, v in extra_env.items()})
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
    else:
        cmd = [sys.executable, script]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"trainer failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    log_path = (log_dir or tmp_path / "logs") / f"{run_id}.txt"
    return proc, (log_path.read_text() if log_path.exists() else "")


def losses(log: str) -> dict[int, float]:
    return {int(s): float(v) for s, v in STEP_LOSS.findall(log)}


def test_tiny_run_learns_and_round_trips(tmp_path, sample_corpus):
    _, log = run_trainer(tmp_path, "e2e", {"ITERATIONS": 40, "WARMDOWN_ITERS": 15})
    curve = losses(log)
    assert len(curve) == 40
    first = sum(curve[s] for s in range(1, 4)) / 3
    last = sum(curve[s] for s in range(38, 41)) / 3
    assert last < first - 0.5, f"loss did not fall: {first:.3f} -> {last:.3f}"
    pre = float(PREQUANT.search(log).group(1))
    post = float(ROUNDTRIP.search(log).group(2))
    assert abs(post - pre) < 0.05, (pre, post)
    assert "late_qat:enabled" in log and "ema:applied" in log
    # the reported model bytes are the artifact's size on disk
    model_bytes = int(re.search(r"model_bytes:(\d+)", log).group(1))
    assert model_bytes == (tmp_path / "logs" / "e2e.ptz").stat().st_size
    # the default export: GPTQ (tables are not linear layers: rounded to nearest), then the budget
    # fit, which finds nothing to prune
    gptq = re.search(r"^gptq: tensors:(\d+)/(\d+) ", log, re.M)
    assert gptq and 0 < int(gptq.group(1)) < int(gptq.group(2)), re.findall(r"^gptq.*", log, re.M)
    fit = re.search(r"^budget_fit: fits_before:1 bytes_before:(\d+) bytes_after:(\d+) .*pruned:0 packs:1", log, re.M)
    assert fit and int(fit.group(1)) == int(fit.group(2)) == model_bytes


def test_resume_reproduces_uninterrupted_run(tmp_path, sample_corpus):
    env = {"ITERATIONS": 12, "WARMDOWN_ITERS": 6, "CHECKPOINT_EVERY": 5, "CHECKPOINT_KEEP": 5}
    _, full = run_trainer(tmp_path, "full", env)
    ckpt = tmp_path / "ckpt" / "full" / "step_000005.pt"
    assert ckpt.is_file()
    _, resumed = run_trainer(tmp_path, "resumed", dict(env, RESUME=ckpt))
    a, b = losses(full), losses(resumed)
    assert sorted(b) == list(range(6, 13))
    for s in range(6, 13):
        assert a[s] == b[s], (s, a[s], b[s])
    assert ROUNDTRIP.search(full).groups() == ROUNDTRIP.search(resumed).groups()


def test_two_processes_equal_one_process_with_accumulation(tmp_path, sample_corpus):
    env = {"ITERATIONS": 6, "WARMDOWN_ITERS": 3, "GRAD_ACCUM_BASE": 2, "EVAL_PREQUANT": 0}
    _, single = run_trainer(tmp_path, "single", env)
    _, double = run_trainer(tmp_path, "double", env, nproc=2)
    assert "world_size:2 grad_accum_steps:1" in double
    assert "world_size:1 grad_accum_steps:2" in single
    a, b = losses(single), losses(double)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for s in a:
        assert b[s] == pytest.approx(a[s], abs=2e-4), (s, a[s], b[s])
    bpb_a = float(ROUNDTRIP.search(single).group(2))
    bpb_b = float(ROUNDTRIP.search(double).group(2))
    assert bpb_b == pytest.approx(bpb_a, abs=2e-3)


def test_diverging_run_stops_and_names_the_step(tmp_path, sample_corpus):
    proc, log = run_trainer(tmp_path, "nan", {"ITERATIONS": 20, "TIED_EMBED_LR": 1e30, "SCALAR_LR": 1e30,
                                              "CHECKPOINT_EVERY": 1}, check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    m = re.search(r"non-finite train loss \(nan/inf\) at step (\d+)", proc.stderr)
    assert m, proc.stderr[-2000:]
    bad = int(m.group(1))
    # the checkpoint kept is from before the bad step and loads
    kept = sorted((tmp_path / "ckpt" / "nan").glob("step_*.pt"))
    assert all(int(p.stem.split("_")[1]) < bad for p in kept)


def test_two_processes_agree_on_the_wallclock_cap(tmp_path, sample_corpus):
    """The cap flag is all-reduced and read one step late: both ranks must stop at the same step
    (a rank that stopped alone would hang the other in its next collective)."""
    env = {"ITERATIONS": 100000, "MAX_WALLCLOCK_SECONDS": 4, "EVAL_PREQUANT": 0, "VAL_MAX_TOKENS": 4096}
    proc, log = run_trainer(tmp_path, "cap", env, nproc=2)
    m = re.search(r"stopping_early: wallclock_cap train_time:(\d+)ms step:(\d+)/", log)
    assert m, log[-2000:]
    assert int(m.group(2)) >= 1 and ROUNDTRIP.search(log)


def test_replicas_stay_identical_under_a_clock_skew(tmp_path, sample_corpus):
    """Rank 1's clock runs 3x fast: with one shared clock (the slowest rank's time, all-reduced) the
    time-driven warmdown, QAT switch and stop are the same on both ranks, and their weights are bit
    for bit equal at the end (checked by the trainer: `replicas:identical`)."""
    env = {"ITERATIONS": 100000, "MAX_WALLCLOCK_SECONDS": 3, "WARMDOWN_ITERS": 6, "LATE_QAT_THRESHOLD": 0.5,
           "EVAL_PREQUANT": 0, "VAL_MAX_TOKENS": 4096, "FAULT": "skew", "FAULT_SKEW": 3}
    proc, log = run_trainer(tmp_path, "skew", env, nproc=2, script="tests/fault_run.py")
    assert re.search(r"^replicas:identical world_size:2$", log, re.M), log[-2000:]
    assert re.search(r"^stopping_early: wallclock_cap", log, re.M) and re.search(r"^late_qat:enabled", log, re.M)
    assert ROUNDTRIP.search(log)


def test_a_nan_on_one_rank_stops_both_at_the_same_step(tmp_path, sample_corpus):
    env = {"ITERATIONS": 8, "WARMDOWN_ITERS": 2, "TRAIN_LOG_EVERY": 0, "FAULT": "nan", "FAULT_STEP": 3}
    proc, _ = run_trainer(tmp_path, "nan1", env, nproc=2, check=False, script="tests/fault_run.py")
    assert proc.returncode != 0
    messages = re.findall(r"error: non-finite train loss \(nan/inf\) at step (\d+)", proc.stderr)
    assert messages == ["3", "3"], proc.stderr[-3000:]  # both ranks, the same step, no NCCL-style hang


def test_ranks_without_a_shared_filesystem_finish_the_round_trip(tmp_path, sample_corpus):
    env = {"ITERATIONS": 4, "WARMDOWN_ITERS": 2, "EVAL_PREQUANT": 0, "VAL_MAX_TOKENS": 4096, "FAULT": "own_logs"}
    proc, log = run_trainer(tmp_path, "apart", env, nproc=2, script="tests/fault_run.py",
                            log_dir=tmp_path / "logs" / "rank0")
    assert ROUNDTRIP.search(log), log[-2000:]
    assert (tmp_path / "logs" / "rank0" / "apart.ptz").is_file()
    assert not (tmp_path / "logs" / "rank1" / "apart.ptz").exists()  # rank 1 never saw the file


def test_rwkv7_run_with_stateful_evaluation(tmp_path, sample_corpus):
    """`--arch rwkv7` end to end with EVAL_MODE=stateful (state carried across chunks); the hybrid,
    which has attention layers, is refused before training."""
    env = {"ARCH": "rwkv7", "ITERATIONS": 3, "WARMDOWN_ITERS": 1, "EVAL_MODE": "stateful", "EVAL_WARMUP": 16}
    _, log = run_trainer(tmp_path, "rwkv_state", env)
    assert re.search(r"^final_prequant eval:stateful\S* .*tokens_scored:\d+", log, re.M), log[-2000:]
    assert ROUNDTRIP.search(log)
    proc, _ = run_trainer(tmp_path, "hybrid_state", {"ITERATIONS": 3, "EVAL_MODE": "stateful"}, check=False)
    assert proc.returncode != 0 and "stateful" in proc.stderr


def test_ttt_run_scores_after_the_round_trip_and_verify_reruns_it(tmp_path, sample_corpus):
    """TTT=sgd: the plain round trip is logged, then the score-first TTT score on a copy of the
    reloaded model; the artifact is the one the run logged; a record of it verifies, TTT re-run."""
    import hashlib
    import json

    from records.folder import new_record
    from records.logs import parse_log
    from records.verify import verify_folder

    data_dir, tokenizer = sample_corpus
    env = {"ITERATIONS": 6, "WARMDOWN_ITERS": 2, "TTT": "sgd", "TTT_CHUNK": 2048, "TTT_EPOCHS": 1, "TTT_LR": 0.01,
           "EVAL_PREQUANT": 0, "DATA_PATH": data_dir, "TOKENIZER_PATH": tokenizer}
    _, log = run_trainer(tmp_path, "ttt", env)
    run = parse_log(tmp_path / "logs" / "ttt.txt")
    assert run.ttt_mode == "sgd" and run.ttt_val_bpb is not None and run.score_bpb == run.ttt_val_bpb
    assert re.search(r"^ttt mode:sgd chunk:2048 epochs:1 .* chunks:(\d+) trained_chunks:(\d+) ", log, re.M)
    artifact = tmp_path / "logs" / "ttt.ptz"
    assert hashlib.sha256(artifact.read_bytes()).hexdigest() == run.artifact_sha256  # TTT never touches it
    folder = new_record("TTT", [tmp_path / "logs" / "ttt.txt"], artifact, date="2026-01-04", records_dir=tmp_path)
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["compliance"]["score_first_ttt"] is True and sub["ttt"]["chunk"] == 2048
    assert sub["val_bpb"] == pytest.approx(run.ttt_val_bpb, abs=1e-8)
    lines = []
    assert verify_folder(folder, str(data_dir), str(tokenizer), echo=lines.append) == [], "\n".join(lines)
    assert any(line.startswith("ok    ttt val_bpb: re-evaluated") for line in lines)


def test_lora_ttt_run_leaves_the_artifact_and_verify_reruns_it(tmp_path, sample_corpus):
    """TTT=lora with 2 phases of global SGD: per-document adapters after the plain round trip, the base
    trained on each scored phase; a record of the run verifies (verify re-runs the phases)."""
    from records.folder import new_record
    from records.logs import parse_log
    from records.verify import verify_folder

    data_dir, tokenizer = sample_corpus
    env = {"ITERATIONS": 4, "WARMDOWN_ITERS": 2, "TTT": "lora", "TTT_LORA_CHUNK": 32, "TTT_LORA_LR": 0.01,
           "TTT_LORA_PHASES": 2, "TTT_LORA_PHASE_DOCS": 8, "TTT_CHUNK": 512, "TTT_LORA_PHASE_LR": 0.01,
           "EVAL_PREQUANT": 0, "VAL_MAX_TOKENS": 4096, "DATA_PATH": data_dir, "TOKENIZER_PATH": tokenizer}
    _, log = run_trainer(tmp_path, "lora", env)
    run = parse_log(tmp_path / "logs" / "lora.txt")
    assert run.ttt_mode == "lora" and run.ttt_val_bpb is not None and run.world_size == 1
    assert re.search(r"^ttt mode:lora rank:8 .* docs:(\d+) chunks:(\d+) steps:(\d+) phases:2 phase_steps:[1-9]",
                     log, re.M)
    folder = new_record("LoRA", [tmp_path / "logs" / "lora.txt"], tmp_path / "logs" / "lora.ptz", date="2026-01-05",
                        records_dir=tmp_path)
    lines = []
    assert verify_folder(folder, str(data_dir), str(tokenizer), echo=lines.append) == [], "\n".join(lines)
    assert any(line.startswith("ok    ttt val_bpb: re-evaluated") for line in lines)
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["ttt"]["mode"] == "lora" and sub["ttt"]["lora_phases"] == 2 and sub["ttt"]["lora_phase_docs"] == 8
