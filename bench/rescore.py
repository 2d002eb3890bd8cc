"""Re-score a finished run's artifact with another evaluation stride (or token budget, or TTT).

  python -m bench.rescore runs/q11/hybrid_s1.txt --stride 256 [--artifact PATH] [--val-max-tokens N]
  python -m bench.rescore runs/q11/hybrid_s1.txt --stride 256 --ttt sgd [--set TTT_LR=0.004 ...]

The run's log gives the model config, the data, the tokenizer and the evaluation settings; the
artifact (default: the .ptz beside the log) is read without pickle and evaluated exactly as the
trainer's round trip evaluates it (records/verify.py `evaluate_model`), but with `--stride`. Used to
put runs scored with different strides on one footing (docs/PERF.md). Prints one key:value line.
With `--ttt sgd|lora` it scores the artifact with score-first test-time training instead (the
trainer's TTT evaluation, as `records verify` re-runs it, on a copy of the reloaded model), with the
trainer's TTT_* defaults unless `--set` changes one, and prints the time it took: how issue 15's
table measures TTT on runs trained without it.
"""
from __future__ import annotations

import argparse
import sys
import time
from types import SimpleNamespace
from pathlib import Path

from records.logs import parse_log
from records.verify import build_model, eval_config, evaluate_model, evaluate_model_ttt, load_artifact_state


def ttt_settings(mode: str, overrides: dict | None = None) -> dict:
    """The trainer's TTT_* defaults (train_gpt.Hyperparameters) with `mode` and `overrides`
    (lower-case field names), each parsed and range-checked as the trainer checks it."""
    from dataclasses import fields

    from hybrid.training.settings import TTT_MODES, SettingError, check_ranges, parse_setting
    from train_gpt import Hyperparameters, _field_type

    kinds = {f.name: f for f in fields(Hyperparameters) if f.name.startswith("ttt")}
    if mode not in TTT_MODES or mode == "off":
        raise SettingError(f"--ttt {mode!r} is not one of {[m for m in TTT_MODES if m != 'off']}")
    out = {name: f.default for name, f in kinds.items()}
    for name, raw in (overrides or {}).items():
        if name not in kinds:
            raise SettingError(f"--set {name.upper()}: not a TTT setting; choose from "
                               f"{', '.join(n.upper() for n in kinds)}")
        out[name] = parse_setting(_field_type(kinds[name]), name, raw)
    out["ttt"] = mode
    check_ranges(out)  # the trainer's ranges; how they agree with the run: `rescore`
    return out


def rescore(log_path, stride: int, artifact=None, val_max_tokens: int | None = None, ttt: dict | None = None):
    """The round-trip score of a run's artifact at `stride`; with `ttt` (`ttt_settings`), the
    score-first TTT score instead."""
    run = parse_log(log_path)
    ecfg = dict(eval_config(run.hparams, run.model_config), stride=min(stride, int(run.hparams["train_seq_len"])))
    if ttt:  # the trainer's agreement checks, against this run's windows (sliding: rescore's evaluation)
        from hybrid.training.settings import check_ttt

        check_ttt(SimpleNamespace(**ttt, eval_mode="sliding", train_seq_len=ecfg["seq_len"]))
    artifact = Path(artifact) if artifact else Path(log_path).with_suffix(".ptz")
    model = build_model(run.model_config, load_artifact_state(artifact, max_file_bytes=64_000_000), str(artifact))
    if val_max_tokens is not None:
        ecfg["val_max_tokens"] = int(val_max_tokens)
    if ttt:
        return evaluate_model_ttt(model, ecfg, dict(run.hparams, **ttt), run.hparams["data_path"],
                                  run.hparams["tokenizer_path"], run.world_size)
    return evaluate_model(model, ecfg, run.hparams["data_path"], run.hparams["tokenizer_path"], val_max_tokens)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log")
    ap.add_argument("--stride", type=int, required=True)
    ap.add_argument("--artifact", default=None)
    ap.add_argument("--val-max-tokens", type=int, default=None)
    ap.add_argument("--ttt", default=None, help="score with score-first TTT: sgd | lora")
    ap.add_argument("--set", action="append", default=[], metavar="TTT_X=V", help="a TTT setting (repeatable)")
    a = ap.parse_args(argv)
    overrides = {}
    for item in a.set:
        name, sep, raw = item.partition("=")
        if not sep:
            ap.error(f"--set {item!r}: write NAME=VALUE")
        overrides[name.strip().lower()] = raw
    from hybrid.training.settings import SettingError

    t0 = time.perf_counter()
    try:
        ttt = ttt_settings(a.ttt, overrides) if a.ttt else None
        res = rescore(a.log, a.stride, a.artifact, a.val_max_tokens, ttt)
    except SettingError as exc:  # one line naming the setting, as the trainer says it
        print(f"rescore: {exc}", file=sys.stderr)
        return 2
    extra = "".join(f" {k}:{v}" for k, v in sorted(ttt.items())) if ttt else ""
    print(f"rescore log:{a.log} stride:{a.stride}{extra} val_loss:{res.val_loss:.8f} val_bpb:{res.val_bpb:.8f} "
          f"tokens:{res.tokens} bytes:{res.bytes} time:{time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
