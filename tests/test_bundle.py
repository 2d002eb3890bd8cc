"""The bundled single-file train_gpt.py: self-contained, deterministic, and the same run as the packages."""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from records.bundle import (ARCH_MODULES, LINE_LIMIT, PROJECT_PACKAGES, READABLE_NAME, BundleError,
                            arch_modules, bundle_source, collect_modules, write_bundle)

ROOT = Path(__file__).resolve().parents[1]
STEP = re.compile(r"^step:(\d+)/\d+ train_loss:(\S+)", re.M)
FINAL = re.compile(r"^final_int\d+_\w+?_roundtrip_exact val_loss:(\S+) val_bpb:(\S+)", re.M)
BYTES = re.compile(r"^artifact_bytes:\d+ code_bytes:(\d+) model_bytes:(\d+)", re.M)


def test_bundle_has_no_project_imports_and_is_deterministic():
    src = bundle_source()
    assert src == bundle_source()
    tree = ast.parse(src)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] not in PROJECT_PACKAGES, ast.unparse(node)
        if isinstance(node, ast.Import):
            assert all(a.name.split(".")[0] not in PROJECT_PACKAGES for a in node.names), ast.unparse(node)
    assert src.rstrip().endswith("sys.exit(main())")
    assert src.count("from __future__ import annotations") == 1
    mods = collect_modules()
    assert "hybrid.model" in mods and "quant.artifact" in mods and "data.shards" in mods
    assert mods.index("hybrid.layers") < mods.index("hybrid.model")  # dependency order
    # lazy imports of modules left out of the bundle fail with a message naming them
    assert "hybrid.rwkv7 is not part of this bundled train_gpt.py" in src


@pytest.mark.parametrize("arch", ["rwkv7", "moe"])
def test_arch_bundle_includes_the_lazily_imported_modules(arch):
    src = bundle_source(extra=arch_modules(arch))
    compile(src, "train_gpt.py", "exec")
    for module in ARCH_MODULES[arch]:
        assert f"# {'=' * 30} {module.replace('.', '/')}.py" in src
        assert f"{module} is not part of this bundled" not in src
    assert "hybrid.rwkv7 is not part of this bundled" in bundle_source()  # the default bundle leaves it out
    with pytest.raises(BundleError, match="unknown --arch"):
        arch_modules("transformer")


def test_bundle_allows_one_optional_import_in_two_modules(tmp_path):
    (tmp_path / "hybrid").mkdir()
    opt = "try:\n    import zlib\nexcept ImportError:\n    zlib = None\n"
    (tmp_path / "hybrid" / "a.py").write_text(opt + "\ndef fa():\n    return zlib\n")
    (tmp_path / "hybrid" / "b.py").write_text(opt + "\ndef fb():\n    return zlib\n")
    (tmp_path / "train_gpt.py").write_text("from hybrid.a import fa\nfrom hybrid.b import fb\n")
    compile(bundle_source(tmp_path), "train_gpt.py", "exec")
    (tmp_path / "hybrid" / "b.py").write_text("def zlib():\n    return 1\n\ndef fb():\n    return zlib\n")
    with pytest.raises(BundleError, match="'zlib' is defined in both hybrid.a and hybrid.b"):
        bundle_source(tmp_path)


def test_bundle_line_limit_or_packed(tmp_path):
    info = write_bundle(tmp_path, pack="lzma")
    if info["readable_lines"] <= LINE_LIMIT:
        return
    # The readable bundle is over the challenge's 1500-line limit: the counted file is the packed stub,
    # and the README says so.
    assert info["packed_lines"] <= 3
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "1500" in readme and "train_gpt_readable.py" in readme


def test_bundle_refuses_name_collisions(tmp_path):
    (tmp_path / "hybrid").mkdir()
    (tmp_path / "hybrid" / "a.py").write_text("def helper():\n    return 1\n")
    (tmp_path / "hybrid" / "b.py").write_text("from hybrid.a import helper\n\ndef helper2():\n    return helper()\n")
    (tmp_path / "train_gpt.py").write_text("from hybrid.b import helper2\n\ndef helper():\n    return 2\n")
    with pytest.raises(BundleError, match="'helper' is defined in both hybrid.a and train_gpt.py"):
        bundle_source(tmp_path)


def _run(script_dir: Path, script: str, env_extra: dict, tmp: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(env_extra, OMP_NUM_THREADS="1", LOG_DIR=str(tmp / "logs"), ARTIFACT_PATH=str(tmp / f"{script_dir.name}.ptz"))
    p = subprocess.run([sys.executable, script], cwd=script_dir, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p.stdout


def test_bundle_runs_like_the_packages(tmp_path, sample_corpus):
    data_dir, tokenizer = sample_corpus
    env = dict(PRESET="tiny", ITERATIONS="3", TRAIN_LOG_EVERY="1", DATA_PATH=str(data_dir),
               TOKENIZER_PATH=str(tokenizer), RUN_ID="t")
    readable_dir, packed_dir = tmp_path / "readable", tmp_path / "packed"
    write_bundle(readable_dir, pack="none")
    write_bundle(packed_dir, pack="lzma")
    ref = _run(ROOT, "train_gpt.py", env, tmp_path)
    outs = {"readable": _run(readable_dir, "train_gpt.py", env, tmp_path),
            "packed": _run(packed_dir, "train_gpt.py", env, tmp_path)}
    ref_steps, ref_final = STEP.findall(ref), FINAL.findall(ref)
    assert [s for s, _ in ref_steps] == ["1", "2", "3"] and len(ref_final) == 1
    for kind, out in outs.items():
        assert STEP.findall(out) == ref_steps, kind
        assert FINAL.findall(out) == ref_final, kind
        # the bundle counts its own train_gpt.py (the stub when packed) and nothing else
        code = int(BYTES.search(out).group(1))
        assert code == (tmp_path / kind / "train_gpt.py").stat().st_size, kind
    assert (packed_dir / READABLE_NAME).is_file()
    # the bundled script cannot reach the packages: a run from an empty folder without the repo works
    assert not (packed_dir / "hybrid").exists()
    shutil.rmtree(tmp_path / "logs", ignore_errors=True)


def test_run_modules_follow_the_hyperparameters():
    from records.bundle import run_modules

    assert run_modules({"arch": "hybrid", "gptq": 0, "mlp_fused": "off"}) == ()
    assert run_modules({"arch": "rwkv7", "gptq": 1, "mlp_fused": "auto"}) == (
        "hybrid.rwkv7", "hybrid.wkv7", "hybrid.wkv7_triton", "quant.gptq", "hybrid.fused_mlp")
    src = bundle_source(extra=run_modules({"arch": "moe", "gptq": 1, "mlp_fused": "triton"}))
    compile(src, "train_gpt.py", "exec")
    assert "quant.gptq is not part of this bundled" not in src and "hybrid/fused_mlp.py" in src
