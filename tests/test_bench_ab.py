"""bench/ab.py: the A/B driver runs every (arm, seed), skips finished runs, and its table and
significance test come from the runs' own logs."""
from __future__ import annotations

import json

import pytest

from bench.ab import main, parse_arm, parse_assignments
from records.logs import parse_log
from records.stats import screen_one_run


def test_arm_and_env_parsing():
    assert parse_arm("base: MLP_MULT=1.75 GPTQ=0") == ("base", {"MLP_MULT": "1.75", "GPTQ": "0"})
    assert parse_assignments("A=1 B=x=y", "t") == {"A": "1", "B": "x=y"}
    for bad in ("no colon MLP_MULT=1", "bad name!: A=1", ": A=1"):
        with pytest.raises(SystemExit):
            parse_arm(bad)
    with pytest.raises(SystemExit, match="lower"):
        parse_assignments("lower=1", "t")


def test_tiny_ab_runs_every_arm_and_seed_and_resumes(tmp_path, sample_corpus):
    out = tmp_path / "ab"
    argv = ["--out", str(out), "--preset", "tiny", "--seeds", "1,2",
            "--arm", "a: MLP_MULT=2", "--arm", "b: MLP_MULT=3",
            "--env", "ITERATIONS=4 VAL_MAX_TOKENS=2048 GPTQ=0 TRAIN_LOG_EVERY=1"]
    assert main(argv) == 0
    summary = json.loads((out / "ab.json").read_text())
    assert sorted(summary["runs"]) == ["a_s1", "a_s2", "b_s1", "b_s2"]
    for rid, run in summary["runs"].items():
        log = parse_log(out / f"{rid}.txt")
        assert log.hparams["seed"] == run["seed"] and run["val_bpb"] == log.val_bpb
        assert run["steps"] == 4 and len(run["curve"]) == 4
    b = summary["arms"]["b"]
    vals = [summary["runs"][f"b_s{s}"]["val_bpb"] for s in (1, 2)]
    assert b["n"] == 2 and b["val_bpb"][0] == pytest.approx(sum(vals) / 2)
    assert summary["runs"]["a_s1"]["model_bytes"] < summary["runs"]["b_s1"]["model_bytes"]  # MLP 2x vs 3x
    assert [(t["new"], t["base"], t["margin"]) for t in summary["tests"]] == [("b", "a", 0.0), ("b", "a", 0.005),
                                                                             ("a", "b", 0.0)]
    md = (out / "ab.md").read_text()
    assert "| a_s1 | 4 |" in md
    # The curve table: arm a's loss at step 4 is the mean over seeds of each run's logged step-4 loss.
    lines = md.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| train loss"))
    assert lines[head].endswith("| p = 4 | end |")
    cells = lines[head + 2].strip("| ").split(" | ")
    step4 = [dict(summary["runs"][f"a_s{s}"]["curve"])[4] for s in (1, 2)]
    assert cells[0] == "a" and cells[-2] == cells[-1] == f"{sum(step4) / 2:.4f}"  # a window of one step
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.txt")}
    assert main(argv) == 0  # finished runs are not repeated
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.txt")} == before
    # A screen: the base keeps both seeds, the new arm c runs seed 1 only and is placed in a's spread.
    screen = ["--out", str(out), "--preset", "tiny", "--seeds", "1,2", "--screen",
              "--arm", "a: MLP_MULT=2", "--arm", "c: MLP_MULT=1", "--env", argv[-1]]
    assert main(screen) == 0
    assert not (out / "c_s2.txt").exists() and {p.name: p.stat().st_mtime_ns for p in out.glob("a_*.txt")} == {
        k: v for k, v in before.items() if k.startswith("a_")}
    summary = json.loads((out / "ab.json").read_text())
    (sc,) = summary["screens"]
    a_loss = [summary["runs"][f"a_s{s}"]["val_loss"] for s in (1, 2)]
    expect = screen_one_run(summary["runs"]["c_s1"]["val_loss"], a_loss)
    assert (sc["new"], sc["base"], sc["line"]) == ("c", "a", expect.line()) and summary["tests"] == []
    assert f"c (one seed) vs a: {expect.line()}" in (out / "ab.md").read_text()


def test_sweep_tunes_each_arm_on_the_first_seed_and_reuses_the_winner(tmp_path, sample_corpus):
    out = tmp_path / "ab"
    argv = ["--out", str(out), "--preset", "tiny", "--seeds", "1", "--arm", "a: MLP_MULT=2",
            "--sweep", "MATRIX_LR=0.0,0.05", "--env", "ITERATIONS=4 VAL_MAX_TOKENS=2048 GPTQ=0 TRAIN_LOG_EVERY=1"]
    assert main(argv) == 0
    summary = json.loads((out / "ab.json").read_text())
    sweep = summary["sweep"]["a"]
    losses = {v: parse_log(out / f"a__matrix_lr{v}_s1.txt").val_loss for v in ("0.0", "0.05")}
    assert sweep["values"] == losses and sweep["best"] == min(losses, key=losses.get)
    assert sweep["best"] == "0.05"  # four steps with a frozen Muon group cannot beat a real rate
    assert summary["runs"]["a_s1"]["val_loss"] == losses[sweep["best"]]  # the winner's run, not a rerun
    assert sorted(p.name for p in out.glob("*.txt")) == ["a__matrix_lr0.05_s1.txt", "a__matrix_lr0.0_s1.txt",
                                                        "a_s1.txt"]
    with pytest.raises(SystemExit, match="two values"):
        main(argv[:-4] + ["--sweep", "MATRIX_LR=0.1"])
