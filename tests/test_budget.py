"""quant/budget.py: a run's code bytes, train_gpt.py plus the project modules it imported, summed from
disk."""
from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_code_bytes_count_the_modules_a_run_imports():
    """Code bytes = train_gpt.py + the project modules the run imported, summed from disk."""
    script = ("import train_gpt, sys; from quant.budget import loaded_source_files, code_bytes; "
              "fs = loaded_source_files(train_gpt.ROOT); print(code_bytes(fs)); "
              "print('\\n'.join(str(f.relative_to(train_gpt.ROOT)) for f in fs))")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    total, *names = out.stdout.split()
    assert "train_gpt.py" in names and "hybrid/model.py" in names and "quant/artifact.py" in names
    assert "hybrid/rwkv7.py" not in names and "data/download.py" not in names  # not imported by a hybrid run
    assert int(total) == sum((ROOT / n).stat().st_size for n in names)
