"""bench/h100_time.py: the analytic H100 step time counts what the code computes (hand-computed tiny
config, attention tiling, the count_params cross-check), ranks T below F, and drives bench/ab.py's
est. H100 column and --equal-time iterations."""
from __future__ import annotations

import pytest

import bench.ab as ab
import bench.h100_time as ht
from bench.flops import matmul_params_per_token, mean_keys_per_query
from hybrid.config import ARCH_DEFAULTS, ModelConfig

TINY = dict(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2.0,
            layer_pattern="TF", bigram_buckets=0, ve_layers="none", smear=False, xsa_last=0, rope_dims=0)


def test_tiny_config_flops_and_bytes_by_hand():
    cfg = ModelConfig(**TINY)
    est = ht.estimate_step(cfg, seq_len=64, tokens_per_step=512, world_size=1)
    # MACs per token: T = w_r, w_k, w_v 3·32·32 = 3072; F = c_q 32·32 + c_k, c_v 32·16 each + proj 32·32
    # = 3072; each MLP 32·64 + 64·32 = 4096; tied head 64·32 = 2048. FLOPs fwd+bwd = 2 · 3 · MACs.
    assert est["kinds"]["T"]["matmul_flops"] == 6 * (3072 + 4096) == 43008
    assert est["kinds"]["F"]["matmul_flops"] == 43008
    assert est["embed_head"]["matmul_flops"] == 6 * 2048
    assert est["matmul_macs_per_token"] == 3072 + 4096 + 3072 + 4096 + 2048 == matmul_params_per_token(cfg)
    # F attention at T = 64 < one 128 tile: the whole 64 × 64 tile is computed, 64 keys per query;
    # 4·C FLOPs per pair forward, × 3.5 with the flash backward.
    assert est["kinds"]["F"]["attn_flops"] == pytest.approx(4 * 32 * 64 * 3.5) == 28672
    assert est["kinds"]["T"]["attn_flops"] == 0
    # T-layer bytes, forward: residual+norm kernels (3·4 + 2·2)·32 + (2·4 + 2·2)·32 = 896; GEMM in+out
    # (w_r, w_k, w_v 3·64, fc 32+64, proj 64+32) = 384 values · 2 B = 768; MLP activation 2 passes of
    # 64 · 2 B = 256; TokenShiftMix's 8 passes of 32 · 2 B = 512. Backward 2× forward.
    assert est["kinds"]["T"]["bytes"] == 3 * (896 + 768 + 256 + 512) == 7296
    # ms: 512 tokens on one rank at the assumed rates
    assert est["kinds"]["T"]["matmul_ms"] == pytest.approx(1e3 * 512 * 43008 / (ht.H100_BF16_FLOPS * ht.MATMUL_MFU))
    assert est["kinds"]["T"]["mem_ms"] == pytest.approx(1e3 * 512 * 7296 / (ht.H100_HBM_BYTES_PER_S * ht.HBM_FRACTION))
    assert est["comm"]["ms"] == 0 and est["comm"]["allreduce_bytes"] == 0  # one GPU: no communication
    parts = [p["ms"] for p in est["kinds"].values()] + [est["embed_head"]["ms"], est["optimizer"]["ms"]]
    assert est["ms_per_step"] == pytest.approx(sum(parts))
    assert est["params"]["ok"]


@pytest.mark.parametrize("T,w", [(1, None), (7, 3), (64, None), (200, 16), (300, 300), (257, 1)])
def test_attention_pairs_with_unit_tiles_are_exact(T, w):
    exact = sum(min(t + 1, w or T) for t in range(T))
    assert ht.attention_pairs(T, w, block=1) == exact
    assert exact == pytest.approx(mean_keys_per_query(T, w) * T)


def test_full_attention_grows_quadratically_windowed_linearly():
    B = ht.ATTN_BLOCK
    for n in (16, 32, 64):  # T = n tiles: full causal computes the n(n+1)/2 lower tiles, diagonal included
        assert ht.attention_pairs(n * B, None) == B * B * n * (n + 1) // 2
        # a window of 128 touches the diagonal tile and the one before: 2 tiles per query tile but the first
        assert ht.attention_pairs(n * B, 128) == B * B * (2 * n - 1)
    # a window of 64 still touches 2 tiles of 128 (tile granularity), and so does 129 (a tile's first
    # query reaches back exactly to the previous tile's start); 130 reaches a third tile
    assert ht.attention_pairs(2048, 64) == ht.attention_pairs(2048, 128) == ht.attention_pairs(2048, 129)
    assert ht.attention_pairs(2048, 130) == B * B * (3 * 16 - 3)
    cfg = ModelConfig(num_layers=2, layer_pattern="WF")
    per_seq = {T: {k: ht.estimate_step(cfg, T, 8 * T)["kinds"][k]["attn_flops"] * T for k in "WF"}
               for T in (2048, 4096, 8192)}
    full = [per_seq[T]["F"] for T in (2048, 4096, 8192)]
    assert full[1] / full[0] == pytest.approx(32 * 33 / (16 * 17))  # → 4 as T grows: quadratic
    assert full[2] / full[1] == pytest.approx(64 * 65 / (32 * 33))
    win = [per_seq[T]["W"] for T in (2048, 4096, 8192)]
    assert win[2] - win[1] == pytest.approx(2 * (win[1] - win[0]))  # linear in T past the window
    # a W layer whose window covers the sequence takes the full-attention path
    cfg = ModelConfig(num_layers=2, layer_pattern="WF", attn_window=4096)
    est = ht.estimate_step(cfg, 2048, 16384)
    assert est["kinds"]["W"]["attn_flops"] == est["kinds"]["F"]["attn_flops"]
    assert est["kinds"]["W"]["attn_ms"] == pytest.approx(est["kinds"]["F"]["attn_ms"])


def test_token_shift_layers_are_cheaper_than_full_attention():
    ms = {}
    for pattern in ("TTTT", "TTTF", "FFFF"):
        est = ht.estimate_step(ModelConfig(num_layers=4, layer_pattern=pattern), 2048, 786432)
        ms[pattern] = est["ms_per_step"]
        assert est["params"]["ok"]
    assert ms["TTTT"] < ms["TTTF"] < ms["FFFF"]
    tf = ht.estimate_step(ModelConfig(num_layers=4, layer_pattern="TTTF"), 2048, 786432)
    ff = ht.estimate_step(ModelConfig(num_layers=4, layer_pattern="FFFF"), 2048, 786432)
    # same matmuls (a token-shift mixer and a GQA attention layer are both 3·C² at 4 of 8 KV heads, and
    # both patterns have one value-embedding module); F layers add the attention kernel
    assert tf["matmul_macs_per_token"] == ff["matmul_macs_per_token"]
    assert ff["kinds"]["F"]["attn_flops"] == pytest.approx(4 * tf["kinds"]["F"]["attn_flops"])


@pytest.mark.parametrize("arch", ["hybrid", "gpt", "moe", "rwkv7"])
def test_walk_matches_count_params_and_bench_flops(arch):
    cfg = ModelConfig(**ARCH_DEFAULTS[arch])
    est = ht.estimate_step(cfg, 2048, 786432)
    p = est["params"]
    assert p["ok"] and p["unclassified"] == 0
    assert p["matmul_weights"] + p["biases"] + p["embeddings"] + p["control"] == p["count_params"]
    assert est["matmul_macs_per_token"] == matmul_params_per_token(cfg)  # active experts only for moe
    if arch == "gpt":
        assert p["count_params"] == 17_059_912


def test_settings_resolve_like_train_gpt_and_ab_estimates_at_full_size():
    est = ht.estimate_settings([], {"LAYER_PATTERN": "FFFFFFFFFFFF"})
    assert est["cfg"].layer_pattern == "FFFFFFFFFFFF" and est["seq_len"] == 2048 and est["world_size"] == 8
    gpt = ht.estimate_settings(["--arch", "gpt"])
    assert gpt["arch"] == "gpt" and gpt["cfg"].num_layers == 9 and gpt["params"]["count_params"] == 17_059_912
    base = ab.h100_estimate({})
    assert base == pytest.approx(ht.estimate_settings()["ms_per_step"])
    # the arm's scale settings are replaced by the full size; its model settings are kept
    assert ab.h100_estimate({"TRAIN_SEQ_LEN": "256", "TRAIN_BATCH_TOKENS": "8192"}) == pytest.approx(base)
    assert ab.h100_estimate({"MLP_MULT": "2"}) < base < ab.h100_estimate({"LAYER_PATTERN": "FFFFFFFFFFFF"})


def test_equal_time_plan_scales_iterations_and_warmdown():
    from hybrid.presets import RUN_PRESETS

    assert (RUN_PRESETS["smoke"]["iterations"], RUN_PRESETS["smoke"]["warmdown_iters"]) == (200, 60)  # used below
    arms = {"a": {"MLP_MULT": "3"}, "b": {"MLP_MULT": "2"}, "c": {"ITERATIONS": "100", "WARMDOWN_ITERS": "30"}}
    plan = ab.equal_time_plan(arms, {}, "smoke", {"a": 100.0, "b": 50.0, "c": 300.0})
    # smoke preset: ITERATIONS 200, WARMDOWN_ITERS 60; budget 200 × 100 ms
    assert plan["a"] == dict(ms=100.0, iterations=200, warmdown_iters=60)
    assert plan["b"] == dict(ms=50.0, iterations=400, warmdown_iters=120)
    assert plan["c"] == dict(ms=300.0, iterations=67, warmdown_iters=20)  # round(200/3); round(30 · 67/100)


class _Stop(Exception):
    pass


def test_ab_equal_time_sets_each_arms_iterations(monkeypatch, tmp_path, capsys):
    fake_ms = {"FFFFFFFFFFFF": 150.0, "TTTTTTTTTTTF": 60.0}
    monkeypatch.setattr(ab, "h100_estimate", lambda env: fake_ms.get(env.get("LAYER_PATTERN"), 100.0))
    seen = {}

    def fake_run_one(out, name, seed, env, preset, threads, iterations=None):
        seen[(name, seed)] = (env, iterations)
        raise _Stop

    monkeypatch.setattr(ab, "run_one", fake_run_one)
    argv = ["--out", str(tmp_path), "--seeds", "1", "--equal-time", "--arm", "base: ITERATIONS=300",
            "--arm", "dense: LAYER_PATTERN=FFFFFFFFFFFF", "--arm", "shift: LAYER_PATTERN=TTTTTTTTTTTF"]
    with pytest.raises(_Stop):
        ab.main(argv)
    got = {name: (env["ITERATIONS"], env["WARMDOWN_ITERS"], it) for (name, _), (env, it) in seen.items()}
    # budget 300 × 100 ms; smoke's own schedule for the others is 200 steps with a 60-step warmdown
    assert got == {"base": ("300", "60", 300), "dense": ("200", "60", 200), "shift": ("500", "150", 500)}
    out = capsys.readouterr().out
    assert "equal-time: shift: est. 60.00 H100 ms/step -> ITERATIONS=500 WARMDOWN_ITERS=150" in out
    seen.clear()
    with pytest.raises(_Stop):  # without the option the arms keep their own settings
        ab.main([a for a in argv if a != "--equal-time"])
    assert seen[("dense", 1)] == ({"LAYER_PATTERN": "FFFFFFFFFFFF"}, None)


def test_ab_markdown_has_the_estimate_column():
    arm = dict(n=1, val_bpb=(1.5, 0.0), pre_bpb=(1.49, 0.0), gap=(0.01, 0.0), model_bytes=(1000.0, 0.0))
    summary = dict(runs={}, tests=[], arms={"a": dict(arm, est_h100_ms=114.364), "b": dict(arm, est_h100_ms=None)})
    text = ab.markdown(summary)
    assert "| est. H100 ms/step |" in text
    assert "| 1,000 | 114.36 |" in text and "| 1,000 | - |" in text


def test_cli_prints_table_and_ratio(capsys):
    argv = ["--num-layers", "4", "--layer-pattern", "TWTF", "--model-dim", "64", "--num-heads", "4",
            "--num-kv-heads", "2", "--attn-window", "32", "--seq-len", "256", "--tokens", "2048", "--world", "2",
            "--vs", "LAYER_PATTERN=FFFF"]
    assert ht.main(argv) == 0
    out = capsys.readouterr().out
    assert "4 x 64, pattern TWTF" in out and "4 x 64, pattern FFFF" in out  # --vs keeps the main flags
    assert "| T | 2 |" in out and "| W | 1 |" in out and "| F | 4 |" in out
    assert "seq 256, 2,048 tokens/step on 2 GPUs (1,024 per GPU)" in out
    ratio = float(out.strip().splitlines()[-1].split("|")[3])
    assert ratio > 1.0


def test_a_finished_log_is_reused_only_if_it_ran_the_planned_iterations(monkeypatch, tmp_path):
    log = tmp_path / "a_s1.txt"
    log.write_text("hparam:iterations=200\nfinal_int6_zlib_roundtrip_exact val_loss:3.00000000 val_bpb:1.80000000\n")
    runs = []

    class Done:
        returncode = 0

    monkeypatch.setattr(ab.subprocess, "run", lambda *a, **k: runs.append(a) or Done())
    assert ab.run_one(tmp_path, "a", 1, {}, "smoke", 0) == log and not runs  # no plan: reused as before
    assert ab.run_one(tmp_path, "a", 1, {}, "smoke", 0, iterations=200) == log and not runs
    ab.run_one(tmp_path, "a", 1, {"ITERATIONS": "400"}, "smoke", 0, iterations=400)
    assert len(runs) == 1  # another step count: run again
