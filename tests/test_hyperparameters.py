"""train_gpt.py's Hyperparameters: their resolution (flag over environment over preset over default;
an unknown arch or a bad layer pattern refused) and the --help listing of every flag with its
environment name."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT


def test_hyperparameter_precedence():
    from train_gpt import resolve_hyperparameters

    h = resolve_hyperparameters([], env={})
    assert h.arch == "hybrid" and h.model_config().layer_pattern == "TTTWTTWTTWTF"
    h = resolve_hyperparameters(["--arch", "gpt"], env={"MATRIX_LR": "0.03"})
    assert h.matrix_lr == 0.03 and h.matrix_bits == 8 and h.model_config().num_layers == 9
    h = resolve_hyperparameters(["--matrix-lr", "0.01"], env={"MATRIX_LR": "0.03", "PRESET": "smoke"})
    assert h.matrix_lr == 0.01 and h.model_config().model_dim == 128
    with pytest.raises(ValueError, match="arch"):
        resolve_hyperparameters(["--arch", "nope"], env={})
    with pytest.raises(ValueError, match="[Pp]attern|layer"):
        resolve_hyperparameters(["--layer-pattern", "TTX"], env={})


def test_help_lists_env_names():
    out = subprocess.run([sys.executable, "train_gpt.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ), timeout=120)
    assert out.returncode == 0
    assert "--matrix-lr" in out.stdout and "MATRIX_LR" in out.stdout and "LAYER_PATTERN" in out.stdout


def test_every_model_field_is_settable_from_the_environment():
    import dataclasses

    import train_gpt
    from hybrid.config import ModelConfig

    missing = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in train_gpt.Hyperparameters.__dataclass_fields__]
    assert not missing, f"model fields without an env variable/flag: {missing}"
    h = train_gpt.resolve_hyperparameters(["--preset", "tiny"], env={"QK_NORM_GAIN": "0", "LOG_DIR": "/tmp"})
    assert h.model_config().qk_norm_gain is False
    assert train_gpt.resolve_hyperparameters(["--preset", "tiny"], env={"LOG_DIR": "/tmp"}).model_config().qk_norm_gain
