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


def test_each_model_setting_is_declared_once_in_model_config():
    """Hyperparameters takes its model settings from ModelConfig (name, type, help); train_gpt.py
    declares none of them, and none keeps a -1/"" "unset" mark: unset is None, resolved is real."""
    import ast
    import dataclasses

    import train_gpt
    from hybrid.config import ModelConfig

    hp = train_gpt.Hyperparameters.__dataclass_fields__
    for f in dataclasses.fields(ModelConfig):
        assert hp[f.name].type == f.type and hp[f.name].default is None, f.name
        assert hp[f.name].metadata["help"] == f.metadata["help"], f.name
    tree = ast.parse((ROOT / "train_gpt.py").read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Hyperparameters")
    declared = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}
    assert not declared & {f.name for f in dataclasses.fields(ModelConfig)}
    h = train_gpt.resolve_hyperparameters(["--preset", "tiny"], env={"SMEAR": "off", "LOG_DIR": "/tmp"})
    assert h.smear is False and h.ln_scale is True and h.num_layers == 4  # resolved, real booleans
    with pytest.raises(ValueError, match="SMEAR"):
        train_gpt.resolve_hyperparameters([], env={"SMEAR": "2"})


def test_moe_settings_map_onto_moe_config_and_its_rules_name_the_setting():
    import dataclasses

    from hybrid.config import MOE_FIELDS, ModelConfig
    from hybrid.moe import MoEConfig

    moe_settings = {f.name for f in dataclasses.fields(ModelConfig) if f.name.startswith("moe_")}
    assert set(MOE_FIELDS) == moe_settings
    assert set(MOE_FIELDS.values()) <= {f.name for f in dataclasses.fields(MoEConfig)}
    cfg = ModelConfig(num_layers=2, layer_pattern="tF", moe_num_experts=4, moe_top_k=2, moe_expert_hidden=7)
    assert cfg.moe_config.top_k == 2 and cfg.moe_config.expert_hidden == 7
    with pytest.raises(ValueError, match=r"ModelConfig: moe_top_k must be in \[1, moe_num_experts=4\]"):
        ModelConfig(num_layers=2, layer_pattern="tF", moe_num_experts=4, moe_top_k=5)
    with pytest.raises(ValueError, match="moe_router"):
        ModelConfig(num_layers=2, layer_pattern="tF", moe_num_experts=4, moe_router="nope")
