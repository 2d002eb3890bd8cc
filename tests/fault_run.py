"""train_gpt.main() under an injected fault, for the distributed tests in tests/test_train.py.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/fault_run.py

FAULT (environment), applied on rank FAULT_RANK (default 1) only:
- skew:     that rank's clock runs FAULT_SKEW times as fast (its perf_counter is scaled);
- nan:      that rank's training loss is NaN from its FAULT_STEP-th training forward on;
- own_logs: every rank gets its own LOG_DIR and CHECKPOINT_DIR (<dir>/rank<r>), as ranks on
            separate nodes without a shared filesystem would.
"""
from __future__ import annotations

import os
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_gpt  # noqa: E402

rank = int(os.environ.get("RANK", 0))
fault = os.environ.get("FAULT", "")
target = rank == int(os.environ.get("FAULT_RANK", 1))

if fault == "skew" and target:
    skew = float(os.environ.get("FAULT_SKEW", "3"))
    start = time.perf_counter()
    shim = types.ModuleType("time")
    shim.__dict__.update(time.__dict__)
    shim.perf_counter = lambda: start + (time.perf_counter() - start) * skew
    train_gpt.time = shim
elif fault == "nan" and target:
    nan_from = int(os.environ.get("FAULT_STEP", "3"))
    forward = train_gpt.HybridGPT.forward
    calls = {"n": 0}

    def poisoned(self, input_ids, target_ids):
        loss = forward(self, input_ids, target_ids)
        if self.training:
            calls["n"] += 1
            if calls["n"] >= nan_from:
                loss = loss * float("nan")
        return loss

    train_gpt.HybridGPT.forward = poisoned
elif fault == "own_logs":
    for var in ("LOG_DIR", "CHECKPOINT_DIR"):
        os.environ[var] = str(Path(os.environ[var]) / f"rank{rank}")

sys.exit(train_gpt.main())
