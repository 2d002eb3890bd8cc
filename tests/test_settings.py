"""hybrid/training/settings.py: every bad setting stops the trainer before anything trains, with one line
that names the variable, and no traceback."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

import train_gpt
from hybrid.training.settings import SettingError, parse_setting

ROOT = Path(__file__).resolve().parents[1]

# (environment, the variable the message must name)
BAD = [
    ({"COMPRESSOR": "foo"}, "COMPRESSOR"),
    ({"ITERATIONS": "-5"}, "ITERATIONS"),
    ({"ITERATIONS": "0"}, "ITERATIONS"),
    ({"MATRIX_LR": "-1"}, "MATRIX_LR"),
    ({"SCALAR_LR": "nan"}, "SCALAR_LR"),
    ({"EVAL_PREQUANT": "ture"}, "EVAL_PREQUANT"),
    ({"MATRIX_LR": "abc"}, "MATRIX_LR"),
    ({"TRAIN_SEQ_LEN": "0"}, "TRAIN_SEQ_LEN"),
    ({"GRAD_ACCUM_BASE": "0"}, "GRAD_ACCUM_BASE"),
    ({"LAYER_PATTERN": ""}, "LAYER_PATTERN"),
    ({"GPTQ": "1", "GPTQ_SEQS": "0"}, "GPTQ_SEQS"),
    ({"GPTQ": "maybe"}, "GPTQ"),
    ({"NUM_LAYERS": "-5"}, "NUM_LAYERS"),
    ({"MODEL_DIM": "0"}, "MODEL_DIM"),
    ({"EMA_DECAY": "1.5"}, "EMA_DECAY"),
    ({"MUON_MOMENTUM": "1"}, "MUON_MOMENTUM"),
    ({"MATRIX_BITS": "9"}, "MATRIX_BITS"),
    ({"MLP_BITS": "1"}, "MLP_BITS"),
    ({"EVAL_STRIDE": "100000"}, "EVAL_STRIDE"),
    ({"EVAL_MODE": "bogus"}, "EVAL_MODE"),
    ({"QUANT_CLIP": "p99"}, "QUANT_CLIP"),
    ({"ARCH": "lstm"}, "ARCH"),
    ({"PRESET": "huge"}, "PRESET"),
    ({"RUN_ID": "a/b"}, "RUN_ID"),
    ({"DATA_PATH": ""}, "DATA_PATH"),
    ({"COMPILE": "2"}, "COMPILE"),
    ({"TRAIN_BATCH_TOKENS": "1000"}, "TRAIN_BATCH_TOKENS"),
    ({"RESUME": "/nonexistent/ckpt.pt"}, "RESUME"),
    ({"LAYER_PATTERN": "TTXF"}, "layer_pattern"),  # the model config's own check, named by field
    ({"TTT": "lora"}, "TTT"),
    ({"TTT": "sgd", "TTT_MOMENTUM": "1.5"}, "TTT_MOMENTUM"),
    ({"TTT": "sgd", "TTT_CHUNK": "0"}, "TTT_CHUNK"),
    ({"TTT": "sgd", "ARCH": "rwkv7", "EVAL_MODE": "stateful"}, "TTT"),
    ({"TTT": "lora", "TTT_LORA_TARGETS": "attn,ffn"}, "TTT_LORA_TARGETS"),
    ({"TTT": "lora", "TTT_LORA_CHUNK": "100000"}, "TTT_LORA_CHUNK"),
    ({"TTT": "lora", "TTT_LORA_RANK": "0"}, "TTT_LORA_RANK"),
]


@pytest.mark.parametrize("env,name", BAD, ids=[" ".join(f"{k}={v}" for k, v in e.items()) for e, _ in BAD])
def test_bad_setting_stops_before_training_with_one_line(env, name, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("LOG_DIR", str(tmp_path / "logs"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    started = time.monotonic()
    rc = train_gpt.main([] if "PRESET" in env else ["--preset", "tiny"])  # a flag would win over PRESET
    err = capsys.readouterr().err
    assert rc == 2
    assert time.monotonic() - started < 10
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert name in lines[0]
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").glob("*.txt"))  # nothing ran


@pytest.mark.parametrize("field,where", [("log_dir", "LOG_DIR"), ("artifact_path", "ARTIFACT_PATH")])
def test_unwritable_output_is_refused_before_training(field, where, monkeypatch, capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    target = blocker / "sub" / ("x.ptz" if field == "artifact_path" else "")
    monkeypatch.setenv(where, str(target))
    monkeypatch.setenv("LOG_DIR" if field != "log_dir" else "RUN_ID", str(tmp_path / "logs") if field != "log_dir" else "r")
    assert train_gpt.main(["--preset", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {where}") and "cannot write" in err and "\n" not in err


def test_cli_exit_status_and_no_traceback(tmp_path):
    out = subprocess.run([sys.executable, "train_gpt.py", "--preset", "tiny", "--matrix-lr", "abc"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "LOG_DIR": str(tmp_path)})
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip() == "error: MATRIX_LR (--matrix-lr)='abc' is not a number"


def test_good_values_and_words_parse():
    assert parse_setting(bool, "eval_prequant", "Yes") is True
    assert parse_setting(bool, "eval_prequant", "off") is False
    assert parse_setting(int, "gptq", "true") == 1 and parse_setting(int, "gptq", "0") == 0
    assert parse_setting(int, "iterations", " 12 ") == 12
    assert parse_setting(float, "matrix_lr", "2e-2") == 0.02
    with pytest.raises(SettingError, match="ITERATIONS"):
        parse_setting(int, "iterations", "1.5")
    with pytest.raises(SettingError, match="finite"):
        parse_setting(float, "matrix_lr", "inf")


def test_valid_run_still_resolves(monkeypatch):
    monkeypatch.setenv("GPTQ", "off")
    monkeypatch.setenv("EMA_DECAY", "0")
    h = train_gpt.resolve_hyperparameters(["--preset", "tiny", "--smear", "no"])
    assert h.gptq == 0 and h.smear == 0 and h.ema_decay == 0.0


def test_lora_target_list_matches_the_module():
    from hybrid.training.settings import TTT_LORA_TARGETS
    from hybrid.training.ttt_lora import LORA_TARGETS

    assert TTT_LORA_TARGETS == LORA_TARGETS
