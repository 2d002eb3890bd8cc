"""bench/preflight.py on the CPU at the `tiny` size: every section runs (or says why not), the JSON line
holds every number, one failing section loses only itself, the wall-clock guard stops a run, and
--nproc re-runs the module under torch.distributed.run. No timing threshold is asserted."""
from __future__ import annotations

import json

import pytest

from bench import preflight

TOP_KEYS = ("torch", "triton", "cuda", "device", "device_name", "world_size", "commit", "dirty", "date_utc", "size",
            "layer_pattern", "params", "seq_len", "micro_batch_seqs", "micro_batch_tokens", "compile", "backend",
            "steps", "budget_s", "sections", "notes", "wall_s", "errors")
TRAIN_KEYS = ("first_step_s", "compile_s", "graphs_first_step", "graphs_steady", "step_ms", "forward_ms",
              "backward_ms", "optimizer_ms", "tokens_per_s_per_rank", "tokens_per_s_global", "train_flops_per_token",
              "peak_flops", "peak_source", "mfu", "peak_mem_bytes", "qat_modules", "qat_first_step_s", "qat_step_ms",
              "graphs_qat_on", "graphs_qat_steady", "graphs_qat_off", "h100_estimate_ms_no_comm")
EVAL_KEYS = ("eval_tokens", "stride", "first_call_s", "graphs_first_call", "eval_s", "graphs_second_call",
             "scored_tokens_per_s", "forward_tokens_per_s_per_rank", "est_full_val_s_8gpu")
GPTQ_KEYS = ("gptq_s", "calib_seqs", "calib_seq_len", "tensors_gptq", "tensors_int", "graphs_compiled")
ARTIFACT_KEYS = ("model_bytes", "bytes_per_param", "compressor", "gptq", "pack_s", "unpack_s")
ATTN_KEYS = ("flex_window_ms", "dense_window_ms", "full_causal_ms", "dense_over_flex", "max_abs_diff_flex_dense")
TINY = ["--device", "cpu", "--size", "tiny"]


def _json_line(out: str) -> dict:
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, out
    return json.loads(lines[0])


def _rows(report: dict) -> dict:
    rows = {r["section"]: r for r in report["sections"]}
    assert [r["section"] for r in report["sections"]] == [s for s in preflight.SECTIONS if s in rows]
    return rows


def _positive(row: dict, keys) -> None:
    for k in keys:
        assert row[k] is not None and row[k] > 0, (k, row[k])


@pytest.mark.slow
def test_preflight_tiny_cpu_compiled(tmp_path, capsys):
    """The whole preflight, compiled (aot_eager: the graph counts are dynamo's, without Inductor's
    CPU code generation, minutes on 2 cores)."""
    out_file = tmp_path / "preflight.json"
    report = preflight.main(TINY + ["--steps", "3", "--backend", "aot_eager", "--eval-tokens", "1024",
                                    "--json-out", str(out_file)])
    printed = capsys.readouterr().out
    line = _json_line(printed)
    assert line == json.loads(out_file.read_text()) == json.loads(json.dumps(report, sort_keys=True, default=str))
    for k in TOP_KEYS:
        assert k in line, k
    assert line["errors"] == [] and line["world_size"] == 1 and line["device"] == "cpu"
    assert line["layer_pattern"] == "TWTF" and line["model_dim"] == 64 and line["params"] > 0
    assert len(line["commit"]) == 40 and line["date_utc"].endswith("Z")
    rows = _rows(line)
    assert set(rows) == set(preflight.SECTIONS)

    train = rows["train"]
    _positive(train, [k for k in TRAIN_KEYS if not k.startswith("graphs") and k != "peak_source"])
    assert train["graphs_first_step"] == 1 and train["graphs_steady"] == 0  # the CPU has no compiled Muon
    assert train["graphs_qat_on"] == 1 and train["graphs_qat_steady"] == 0 and train["graphs_qat_off"] == 0
    assert train["tokens_per_step_per_rank"] == line["micro_batch_tokens"] == 8 * 64

    ev = rows["eval"]
    _positive(ev, [k for k in EVAL_KEYS if not k.startswith("graphs")])
    assert ev["eval_tokens"] == 1024 and ev["graphs_first_call"] == 2 and ev["graphs_second_call"] == 0
    assert ev["same_result"]

    gq = rows["gptq"]
    _positive(gq, [k for k in GPTQ_KEYS if k != "graphs_compiled"])
    assert gq["tensors_gptq"] <= gq["tensors_int"]

    art = rows["artifact"]
    _positive(art, [k for k in ARTIFACT_KEYS if k not in ("compressor", "gptq")])
    assert art["gptq"] is True and art["compressor"] == "zlib"

    att = rows["attention"]
    _positive(att, ATTN_KEYS[:4])
    assert att["backward"] is False and att["max_abs_diff_flex_dense"] < 1e-4

    assert "skipped" in rows["fused_mlp"]  # CUDA + triton only
    table = printed[printed.index("| preflight | value |"):]
    for label in ("compile (first step)", "late QAT recompile", "step ms", "sliding eval", "GPTQ export",
                  "artifact (model bytes)", "TTT (sgd / lora)", "W attention", "fused_mlp"):
        assert label in table, label


def test_preflight_tiny_cpu_eager_sections(capsys):
    """Uncompiled, a few sections: the same keys, no graphs, no compile time."""
    report = preflight.main(TINY + ["--steps", "2", "--no-compile", "--eval-tokens", "512",
                                    "--sections", "train,eval,artifact,ttt,fused_mlp"])
    line = _json_line(capsys.readouterr().out)
    assert line["errors"] == [] and line["compile"] is False and line["backend"] is None
    rows = _rows(report)
    assert list(rows) == ["train", "eval", "artifact", "ttt", "fused_mlp"]
    _positive(rows["train"], ("first_step_s", "step_ms", "tokens_per_s_per_rank", "mfu", "peak_mem_bytes"))
    assert rows["train"]["compile_s"] is None and rows["train"]["graphs_first_step"] == 0
    assert rows["eval"]["graphs_first_call"] == 0 and rows["eval"]["eval_tokens"] == 512
    assert rows["artifact"]["model_bytes"] > 0 and rows["artifact"]["gptq"] is False  # no GPTQ section ran
    ttt = rows["ttt"]
    _positive(ttt, ("sgd_s", "lora_s", "sgd_est_full_val_s_8gpu", "lora_est_full_val_s_8gpu", "sgd_steps"))
    assert ttt["ttt_tokens"] == 512 and ttt["sgd_chunks"] == 4 and ttt["lora_docs"] == 1


def test_a_failing_section_loses_only_itself(monkeypatch, capsys):
    def broken(ctx):
        raise RuntimeError("triton is missing\nsecond line")

    monkeypatch.setitem(preflight.SECTION_FNS, "attention", broken)
    report = preflight.main(TINY + ["--no-compile", "--sections", "attention,artifact"])
    capsys.readouterr()
    rows = _rows(report)
    assert rows["attention"]["error"] == "RuntimeError: triton is missing"
    assert rows["artifact"]["model_bytes"] > 0
    # no train section: the artifact packs a fresh model, and says so
    assert report["errors"] == ["attention"] and report["notes"]
    assert "| attention | error: RuntimeError: triton is missing |" in preflight.markdown_table(report)


def test_budget_guard_stops_a_running_section_and_skips_the_rest(monkeypatch, capsys):
    def slow(ctx):
        import time

        time.sleep(30)
        return {}

    monkeypatch.setitem(preflight.SECTION_FNS, "train", slow)
    report = preflight.main(TINY + ["--budget-s", "1.5", "--sections", "train,eval,gptq"])
    capsys.readouterr()
    rows = _rows(report)
    assert "wall-clock guard" in rows["train"]["error"]
    assert "used up" in rows["eval"]["skipped"] and "used up" in rows["gptq"]["skipped"]
    assert report["wall_s"] < 5.0


def test_nproc_relaunches_under_torch_distributed_run(monkeypatch, capsys):
    calls = []
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(preflight.subprocess, "call", lambda cmd, cwd=None: calls.append(cmd) or 0)
    report = preflight.main(["--nproc", "8", "--steps", "5", "--nproc=8", "--json-out", "x.json"])
    assert report == {"launched": 8, "returncode": 0}
    cmd = calls[0]
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8", "-m"]
    assert cmd[6:] == ["bench.preflight", "--steps", "5", "--json-out", "x.json"]
    assert "preflight launch:" in capsys.readouterr().out
