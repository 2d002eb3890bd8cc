"""records/: record folders (new, verify), the significance rule (compare) and linear merges."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from records.__main__ import main as records_main
from records.folder import new_record
from records.logs import parse_log
from records.merge import MergeError, merge_checkpoints, save_merged
from records.stats import betainc_reg, compare_losses, screen_one_run, t_cdf_own
from records.verify import verify_folder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, sample_corpus):
    """Two 3-step tiny runs (seeds 1, 2) with a checkpoint each: (dir, env)."""
    data_dir, tokenizer = sample_corpus
    d = tmp_path_factory.mktemp("runs")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", PRESET="tiny", ITERATIONS="3", DATA_PATH=str(data_dir),
               TOKENIZER_PATH=str(tokenizer), CHECKPOINT_EVERY="3", LOG_DIR=str(d))
    for seed in (1, 2):
        p = subprocess.run([sys.executable, "train_gpt.py"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env=dict(env, SEED=str(seed), RUN_ID=f"s{seed}", CHECKPOINT_DIR=str(d / f"ck{seed}")))
        assert p.returncode == 0, p.stderr[-3000:]
    return d, env


# --- statistics ---------------------------------------------------------------------------------

@pytest.mark.parametrize("t,df,expected", [
    (1.0, 1, 0.75),  # Cauchy: 1/2 + atan(1)/pi
    (2.0, 5, 0.9490302605850708),
    (-2.5, 10, 0.01572342211830441),
    (0.5, 3.3, 0.6757324618002207),
    (3.1, 2.5, 0.9661058108375399),
    (-1.2, 40, 0.11859931205730517),
    (0.0, 7, 0.5),
])
def test_student_t_cdf_known_values(t, df, expected):
    assert t_cdf_own(t, df) == pytest.approx(expected, rel=1e-10, abs=1e-13)


def test_incomplete_beta_identities():
    assert betainc_reg(1.0, 1.0, 0.3) == pytest.approx(0.3)          # uniform
    assert betainc_reg(2.0, 3.0, 0.4) == pytest.approx(1 - betainc_reg(3.0, 2.0, 0.6))
    with pytest.raises(ValueError):
        betainc_reg(1.0, 1.0, 1.5)


def test_significance_rule():
    base = [2.0700, 2.0710, 2.0705]
    good = [2.0600, 2.0605, 2.0598]      # ~0.0104 nats better, tight
    small = [2.0670, 2.0672, 2.0668]     # 0.0035 better: below the 0.005 margin
    c = compare_losses(good, base)
    assert c.significant and c.p < 0.01 and c.delta > 0.005
    assert c.df > 0 and math.isfinite(c.t)
    assert not compare_losses(small, base).significant
    assert any("Welch" in line and "p=" in line for line in c.lines())
    # Welch numbers by hand: t = (delta - 0.005) / sqrt(vn/n + vb/n)
    vn = sum((x - sum(good) / 3) ** 2 for x in good) / 2
    vb = sum((x - sum(base) / 3) ** 2 for x in base) / 2
    assert c.t == pytest.approx((c.delta - 0.005) / math.sqrt(vn / 3 + vb / 3))
    assert compare_losses(good, base, cdf=t_cdf_own).p == pytest.approx(c.p, rel=1e-8, abs=1e-14)
    # the lines state the margin that was tested, not always the challenge's
    assert "(required >= 0.005)" in c.lines()[2]
    plain = compare_losses(small, base, margin=0.0)
    assert plain.significant and "(required >= 0)" in plain.lines()[2] and "improvement > 0:" in plain.lines()[3]


def test_one_run_screen_is_the_prediction_t_against_the_bases_spread():
    # base [1, 2, 3]: mean 2, s = 1, n = 3; a run at 0 is 2 better: t = 2 / sqrt(1 + 1/3) = sqrt(3),
    # df 2, where Student's CDF is closed-form: F(t) = 1/2 + t / (2 sqrt(2 + t^2)).
    s = screen_one_run(0.0, [1.0, 2.0, 3.0], cdf=t_cdf_own)
    assert (s.delta, s.df, s.std_base) == (2.0, 2, 1.0)
    assert s.t == pytest.approx(math.sqrt(3.0))
    assert s.p_better == pytest.approx(0.5 - math.sqrt(3.0) / (2 * math.sqrt(5.0)))
    assert s.p_better + s.p_worse == pytest.approx(1.0)
    worse = screen_one_run(4.0, [1.0, 2.0, 3.0], cdf=t_cdf_own)   # mirror image: 2 worse
    assert worse.p_worse == pytest.approx(s.p_better) and worse.delta == -2.0
    # wider than compare_losses' one-seed case, which takes the single value as exact
    assert s.p_better > compare_losses([0.0], [1.0, 2.0, 3.0], margin=0.0, cdf=t_cdf_own).p
    assert "p(better)=" in s.line()
    for bad in ([1.0], [2.0, 2.0]):
        with pytest.raises(ValueError):
            screen_one_run(0.0, bad)


# --- record folders -----------------------------------------------------------------------------

def test_new_and_verify(tiny_runs, tmp_path, capsys):
    d, env = tiny_runs
    folder = new_record("Tiny_Test", [d / "s1.txt", d / "s2.txt"], d / "s1.ptz", author="A", github_id="g",
                        blurb="tiny CPU run", date="2026-01-02", records_dir=tmp_path)
    assert folder == tmp_path / "track_10min_16mb" / "2026-01-02_Tiny_Test"
    names = {p.name for p in folder.iterdir()}
    assert {"README.md", "submission.json", "train_gpt.py", "train_gpt_readable.py", "train_seed1.log",
            "train_seed2.log", "requirements.txt", "final_model.ptz", "config.json"} <= names
    sub = json.loads((folder / "submission.json").read_text())
    for key in ("author", "github_id", "name", "blurb", "date", "val_loss", "val_bpb", "bytes_total", "bytes_code",
                "track", "seeds", "pre_quant_val_bpb", "step_stop", "wallclock_seconds", "bytes_model_int6_zlib"):
        assert key in sub, key
    runs = [parse_log(d / "s1.txt"), parse_log(d / "s2.txt")]
    assert sub["val_bpb"] == pytest.approx((runs[0].val_bpb + runs[1].val_bpb) / 2, abs=1e-8)
    assert sub["bytes_total"] == sub["bytes_code"] + (folder / "final_model.ptz").stat().st_size
    assert sub["step_stop"] == 3 and sub["seeds"] == [1, 2]
    readme = (folder / "README.md").read_text()
    assert "| 1 |" in readme and "| 2 |" in readme
    try:
        import matplotlib  # noqa: F401
        assert (folder / "curves.png").read_bytes()[:4] == b"\x89PNG"
    except ImportError:
        pass

    assert verify_folder(folder, env["DATA_PATH"], env["TOKENIZER_PATH"], echo=lambda s: None) == []
    assert records_main(["verify", str(folder), "--data-path", env["DATA_PATH"],
                         "--tokenizer-path", env["TOKENIZER_PATH"]]) == 0
    # the wallclock cap
    assert records_main(["verify", str(folder), "--no-eval", "--max-train-seconds", "0.001"]) == 1

    # tampered claims: verify names the mismatch and exits non-zero
    sub["val_bpb"] = sub["val_bpb"] - 0.01
    (folder / "submission.json").write_text(json.dumps(sub))
    capsys.readouterr()
    assert records_main(["verify", str(folder), "--data-path", env["DATA_PATH"],
                         "--tokenizer-path", env["TOKENIZER_PATH"]]) == 1
    assert "val_bpb: submission.json" in capsys.readouterr().err

    # a corrupted artifact is a clean failure naming the file
    blob = (folder / "final_model.ptz").read_bytes()
    (folder / "final_model.ptz").write_bytes(blob[: len(blob) // 2])
    fails = verify_folder(folder, env["DATA_PATH"], env["TOKENIZER_PATH"], echo=lambda s: None)
    assert any("final_model.ptz" in f and "artifact" in f for f in fails)

    # compare: a folder against logs; identical runs are not a significant improvement (exit 1)
    assert records_main(["compare", str(folder), f"{d / 's1.txt'},{d / 's2.txt'}"]) == 1
    assert "one-sided Welch t-test" in capsys.readouterr().out


# --- merge --------------------------------------------------------------------------------------

def test_merge_identity_weights_and_mismatch(tiny_runs, tmp_path):
    d, _ = tiny_runs
    a = d / "ck1" / "latest.pt"
    merged = merge_checkpoints([a, a], [0.3, 0.7])
    src = torch.load(a, weights_only=True)
    for k, t in src["model"].items():
        assert torch.equal(merged["model"][k], t), k
    for k, t in src["ema"].items():
        assert torch.equal(merged["ema"][k], t), k
    out = save_merged(merged, tmp_path / "m.pt")
    # loadable by the trainer's RESUME path and strict into the model
    from hybrid.training.checkpoint import load_checkpoint
    from hybrid.model import HybridGPT
    from train_gpt import Hyperparameters

    state = load_checkpoint(out)
    HybridGPT(Hyperparameters(**state["hparams"]).model_config()).load_state_dict(state["model"], strict=True)

    with pytest.raises(MergeError, match="sum to"):
        merge_checkpoints([a, d / "ck2" / "latest.pt"], [0.7, 0.4])
    m = merge_checkpoints([a, d / "ck2" / "latest.pt"], [0.7, 0.4], normalize=False)
    b = torch.load(d / "ck2" / "latest.pt", weights_only=True)
    k = next(k for k, t in src["model"].items() if t.is_floating_point())
    assert torch.allclose(m["model"][k], 0.7 * src["model"][k] + 0.4 * b["model"][k], atol=1e-6)

    bad = dict(b, model=dict(b["model"]))
    bad["model"][k] = torch.zeros(3, 5)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(MergeError, match=k.replace(".", r"\.")):
        merge_checkpoints([a, tmp_path / "bad.pt"], [0.5, 0.5])
    other = dict(b, hparams=dict(b["hparams"], model_dim=96))
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(MergeError, match="model_dim"):
        merge_checkpoints([a, tmp_path / "other.pt"], [0.5, 0.5])
    # CLI: merge + pack
    assert records_main(["merge", str(a), str(a), "--weights", "0.5", "0.5", "--out", str(tmp_path / "c.pt"),
                         "--pack", str(tmp_path / "c.ptz")]) == 0
    assert (tmp_path / "c.ptz").stat().st_size > 0
    assert records_main(["merge", str(a), str(a), "--weights", "0.5", "0.6", "--out", str(tmp_path / "x.pt")]) == 2


def test_resumed_log_keeps_the_last_value_of_each_step(tmp_path):
    lines = [f"step:{s}/8 train_loss:{5 - s / 10:.4f} train_time:{100 * s}ms step_avg:100.00ms" for s in range(1, 7)]
    lines += ["step:6/8 val_loss:4.0 val_bpb:2.0 train_time:600ms step_avg:100.00ms",
              "resume:from ckpt/step_000004.pt step:4 train_time:400ms qat:0 finished:0"]
    lines += [f"step:{s}/8 train_loss:{4 - s / 10:.4f} train_time:{100 * s}ms step_avg:100.00ms" for s in range(5, 9)]
    lines += ["final_int6_zlib_roundtrip_exact val_loss:3.00000000 val_bpb:1.50000000"]
    path = tmp_path / "run.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    r = parse_log(path)
    assert [s for s, _, _ in r.train] == list(range(1, 9))  # no zigzag
    assert dict((s, v) for s, v, _ in r.train)[5] == 3.5  # the value logged after the resume
    assert r.val == [] and r.resumed_at == [4]


def _fails(folder, env) -> list[str]:
    return verify_folder(folder, env["DATA_PATH"], env["TOKENIZER_PATH"], evaluate_val=False, echo=lambda s: None)


def test_verify_ties_the_artifact_to_the_log_and_checks_every_field(tiny_runs, tmp_path):
    from tests.test_artifact_format import seal_v2, v2_raws

    d, env = tiny_runs
    folder = new_record("Airtight", [d / "s1.txt", d / "s2.txt"], d / "s1.ptz", date="2026-01-03", records_dir=tmp_path)
    sub_path, art = folder / "submission.json", folder / "final_model.ptz"
    good_sub, good_art = sub_path.read_text(), art.read_bytes()
    sub = json.loads(good_sub)
    assert sub["artifact_sha256"] == parse_log(d / "s1.txt").artifact_sha256
    assert _fails(folder, env) == []

    # One int6 weight moved by one step, every checksum recomputed: a well-formed artifact that is
    # not the run's. Its SHA-256 differs from the one the run logged and submission.json carries.
    raws = v2_raws(good_art)
    data = bytearray(raws[1])
    data[0] = (data[0] + 1) % 256 if data[0] < 31 or data[0] > 200 else data[0] - 1
    art.write_bytes(seal_v2([raws[0], bytes(data), *raws[2:]]))
    fails = _fails(folder, env)
    assert any(f.startswith("artifact_sha256: submission.json") for f in fails)
    assert any(f.startswith("artifact_sha256: train_seed1.log logged") for f in fails)
    art.write_bytes(good_art)

    # Malformed or wrong fields are FAIL lines, never a crash.
    for key, value in [("val_bpb", "1.23"), ("val_bpb", None), ("val_loss", True), ("bytes_code", "12"),
                       ("pre_quant_val_bpb", 9.0), ("step_stop", 99), ("n_seeds", 5), ("seed_results", "x")]:
        sub_path.write_text(json.dumps(dict(sub, **{key: value})))
        fails = _fails(folder, env)
        assert fails and any(key.split("_")[0] in f for f in fails), (key, value, fails)
    sub_path.write_text(good_sub)

    # A log whose curve was edited (a step repeated out of order) fails its curve check.
    log = folder / "train_seed2.log"
    text = log.read_text()
    log.write_text(text.replace("\nstep:3/3 train_loss", "\nstep:1/3 train_loss", 1))
    assert any(f.startswith("curve: train_seed2.log") for f in _fails(folder, env))
    log.write_text(text)
    assert _fails(folder, env) == []


def test_verify_refuses_tensors_whose_dtype_is_not_the_models(tiny_runs):
    from records.verify import VerifyError, build_model, load_artifact_state

    d, _ = tiny_runs
    cfg = parse_log(d / "s1.txt").model_config
    state = load_artifact_state(d / "s1.ptz", max_file_bytes=16_000_000)
    build_model(cfg, dict(state))  # as stored: loads strictly
    name = next(k for k, v in state.items() if v.dtype == torch.float32)
    with pytest.raises(VerifyError, match=f"{name}: torch.bfloat16"):
        build_model(cfg, dict(state, **{name: state[name].to(torch.bfloat16)}))


def test_rescore_at_the_runs_own_stride_reproduces_its_round_trip(tiny_runs):
    from bench.rescore import rescore

    d, _ = tiny_runs
    run = parse_log(d / "s1.txt")
    same = rescore(d / "s1.txt", int(run.hparams["eval_stride"]))
    assert same.val_bpb == pytest.approx(run.val_bpb, rel=1e-6)
    other = rescore(d / "s1.txt", int(run.hparams["train_seq_len"]))  # non-overlapping windows
    assert other.tokens == same.tokens and other.val_bpb != same.val_bpb


def test_rescore_with_ttt_at_lr_0_is_the_plain_round_trip_and_checks_its_settings(tiny_runs):
    from bench.rescore import main, rescore, ttt_settings

    d, _ = tiny_runs
    run = parse_log(d / "s1.txt")
    stride = int(run.hparams["eval_stride"])
    # lr 0: score-first SGD TTT scores exactly what the plain evaluation scores
    res = rescore(d / "s1.txt", stride, ttt=ttt_settings("sgd", {"ttt_lr": "0", "ttt_chunk": "512"}))
    assert res.val_bpb == pytest.approx(run.val_bpb, rel=1e-6)
    trained = rescore(d / "s1.txt", stride, ttt=ttt_settings("sgd", {"ttt_chunk": "512", "ttt_lr": "0.01"}))
    assert trained.tokens == res.tokens and trained.val_bpb != run.val_bpb
    lora = rescore(d / "s1.txt", stride, ttt=ttt_settings("lora", {"ttt_lora_chunk": "32"}))
    assert lora.tokens == res.tokens and lora.bytes == res.bytes and lora.val_bpb != run.val_bpb
    with pytest.raises(ValueError, match="TTT_LORA_CHUNK"):  # longer than the run's windows
        rescore(d / "s1.txt", stride, ttt=ttt_settings("lora", {"ttt_lora_chunk": "4096"}))
    assert main([str(d / "s1.txt"), "--stride", "64", "--ttt", "sgd", "--set", "TTT_LR=-1"]) == 2
    assert main([str(d / "s1.txt"), "--stride", "64", "--ttt", "sgd", "--set", "MATRIX_LR=1"]) == 2
