"""hybrid/training/schedule.py: the learning-rate warmdown by iteration and by wallclock, the Muon momentum
warmup, and when QAT switches on."""
from __future__ import annotations

import pytest

from hybrid.training.schedule import lr_scale, muon_momentum, qat_should_enable


def test_lr_schedule_iteration_and_wallclock():
    assert lr_scale(0, 0, 100, 20, 0) == 1.0
    assert lr_scale(79, 0, 100, 20, 0) == 1.0
    assert lr_scale(80, 0, 100, 20, 0) == 1.0
    assert lr_scale(90, 0, 100, 20, 0) == pytest.approx(0.5)
    assert lr_scale(100, 0, 100, 20, 0) == 0.0
    # 10 ms per step, 20-step warmdown = 200 ms before a 1000 ms cap
    assert lr_scale(50, 500.0, 10**6, 20, 1000.0) == 1.0
    assert lr_scale(90, 900.0, 10**6, 20, 1000.0) == pytest.approx(0.5)
    assert lr_scale(100, 1000.0, 10**6, 20, 1000.0) == 0.0
    assert muon_momentum(0, 0.85, 0.95, 500) == pytest.approx(0.85)
    assert muon_momentum(250, 0.85, 0.95, 500) == pytest.approx(0.90)
    assert muon_momentum(10**4, 0.85, 0.95, 500) == pytest.approx(0.95)
    assert not qat_should_enable(0.1, 0.0) and qat_should_enable(0.1, 0.15) and not qat_should_enable(0.2, 0.15)
