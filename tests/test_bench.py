"""bench/bench.py on the CPU: the timing part on a tiny config for two steps, the memory tracker, and the
report's ratios. No timing threshold is asserted anywhere: only that the numbers are consistent."""
from __future__ import annotations

import json

import pytest
import torch

from bench.bench import (
    CONTROLS,
    BenchSetup,
    TensorMemoryTracker,
    bench_hparams,
    ratios,
    report_lines,
    targets,
    time_training_steps,
)
from bench.flops import training_flops_per_token
from hybrid.model import HybridGPT
from train_gpt import resolve_hyperparameters


def test_tracker_counts_new_storages_until_freed():
    tracker = TensorMemoryTracker()
    with tracker:
        a = torch.empty(1000)  # 4,000 bytes
        b = torch.empty(500)  # 2,000
        view = a[10:]  # a view: no new memory
        a.add_(1.0)  # in place: no new memory
        del a, view
        c = torch.empty(100)  # 400, after a's 4,000 were freed
    assert tracker.peak == 6000
    assert tracker.live == 2400
    del b, c
    assert tracker.live == 0


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared, oversubscribed CPU two OpenMP threads run ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("arch", ["hybrid", "gpt"])
def test_timing_split_sums_to_the_step_and_mfu_is_consistent(arch, one_thread):
    h = resolve_hyperparameters(["--arch", arch, "--preset", "tiny", "--grad-accum-base", "1"], env={})
    res = time_training_steps(h, torch.device("cpu"), steps=2, warmup=1)
    split = res["forward_ms"] + res["backward_ms"] + res["optimizer_ms"]
    assert min(res["forward_ms"], res["backward_ms"], res["optimizer_ms"]) > 0
    assert split == pytest.approx(res["step_ms"], rel=0.05)  # the loop between steps is all that is left out
    tokens = h.train_batch_tokens
    assert res["tokens_per_step"] == tokens and res["seq_len"] == h.train_seq_len
    assert res["tokens_per_s"] == pytest.approx(tokens / (res["step_ms"] / 1000))
    assert res["train_flops_per_token"] == training_flops_per_token(h.model_config(), h.train_seq_len)
    assert res["mfu"] == pytest.approx(res["train_flops_per_token"] * res["tokens_per_s"] / res["peak_flops"])
    # weights, gradients and at least one optimizer-state copy are live at the optimizer step (fp32)
    assert res["peak_mem_bytes"] >= 3 * 4 * res["params"]


def test_controls_are_the_baseline_and_its_11_layer_twin():
    setup = BenchSetup(torch.device("cpu"), gpu_shape=True, compile=False, seq_len=1024, batch_tokens=65536,
                       data_path="unused", tokenizer_path="unused")
    gpt = bench_hparams("gpt", setup).model_config()
    dense = bench_hparams("dense11", setup).model_config()
    with torch.device("meta"):
        assert sum(p.numel() for p in HybridGPT(gpt).parameters()) == 17_059_912
    assert (gpt.num_layers, gpt.mlp_mult, gpt.mlp_act, gpt.model_dim) == (9, 2.0, "relu2", 512)
    assert (dense.num_layers, dense.layer_pattern, dense.model_dim) == (11, "F" * 11, 512)
    cpu = bench_hparams("dense11", BenchSetup(torch.device("cpu"), False, False, 256, 8192, "d", "t"))
    assert (cpu.model_dim, cpu.num_layers, cpu.train_batch_tokens, cpu.train_seq_len) == (128, 11, 8192, 256)


def test_report_ratios_targets_and_json():
    row = dict(step_ms=100.0, forward_ms=30.0, backward_ms=60.0, optimizer_ms=10.0, tokens_per_s=1000.0,
               mfu=0.5, peak_mem_bytes=2 ** 20, params=10, steps=50, roundtrip_bpb=2.0, prequant_bpb=1.99,
               quant_gap_bpb=0.01, model_bytes=6, bytes_per_param=0.6, train_flops_per_token=1e9)
    results = {c: dict(row) for c in CONTROLS}
    results["hybrid"] = dict(row, step_ms=70.0, tokens_per_s=1500.0, roundtrip_bpb=1.9, quant_gap_bpb=0.004,
                             bytes_per_param=0.55, mfu=0.3)
    r = ratios(results)
    assert set(r) == {"hybrid/gpt", "hybrid/dense11"}
    assert r["hybrid/dense11"]["step_ms"] == pytest.approx(0.7)
    assert r["hybrid/dense11"]["roundtrip_bpb_delta"] == pytest.approx(-0.1)
    t = targets(results)
    assert t["step_time_vs_dense11"]["met"] and t["quant_gap_bpb"]["met"] and t["bytes_per_param"]["met"]
    assert not t["mfu"]["met"]
    lines = report_lines(results, dict(gpu_shape=False))
    assert any(line.startswith("ratio hybrid/dense11 step_ms:0.700") for line in lines)
    blob = json.loads(lines[-1].removeprefix("bench_json:"))
    assert blob["results"]["hybrid"]["step_ms"] == 70.0 and blob["targets"]["mfu"]["met"] is False


# --- bench/size.py -------------------------------------------------------------------------------

def test_size_policy_specs():
    from bench.size import parse_policy

    assert parse_policy("int6", 6, 8) == (dict(matrix_bits=6, embed_bits=8), False)
    kw, gptq = parse_policy("int5mlp+sdclip9.5+gptq", 6, 8)
    assert gptq and kw == dict(matrix_bits=6, embed_bits=8, mlp_bits=5, clip="sdclip", sd_k_matrix=9.5)
    assert parse_policy("int8", 6, 8)[0]["matrix_bits"] == 8
    with pytest.raises(SystemExit, match="unknown policy part"):
        parse_policy("int6+fp4", 6, 8)


def test_size_report_on_a_tiny_checkpoint(tmp_path, sample_corpus):
    """The policies table of a real (tiny) checkpoint: int5 MLPs must store fewer bytes than int6,
    and every row carries a round-trip score and a quant gap."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    data_dir, tokenizer = sample_corpus
    env = dict(os.environ, PRESET="tiny", RUN_ID="size", ITERATIONS="4", CHECKPOINT_EVERY="4",
               CHECKPOINT_DIR=str(tmp_path / "ck"), LOG_DIR=str(tmp_path / "logs"), DATA_PATH=str(data_dir),
               TOKENIZER_PATH=str(tokenizer), EVAL_PREQUANT="0")
    subprocess.run([sys.executable, "train_gpt.py"], cwd=root, env=env, check=True, capture_output=True, timeout=300)
    out = subprocess.run([sys.executable, "-m", "bench.size", str(tmp_path / "ck" / "latest.pt"), "--skip-compressors",
                          "--policies", "int6,int5mlp", "--eval-tokens", "2048"], cwd=root, env=env, check=True,
                         capture_output=True, text=True, timeout=300).stdout
    rows = {m[0]: (int(m[1]), float(m[2])) for m in
            re.findall(r"^policy:(\S+) .*?model_bytes:(\d+) .*?quant_gap_bpb:([-+0-9.]+)", out, re.M)}
    assert set(rows) == {"int6", "int5mlp"}, out
    assert rows["int5mlp"][0] < rows["int6"][0]
    assert all(abs(gap) < 0.1 for _, gap in rows.values())
