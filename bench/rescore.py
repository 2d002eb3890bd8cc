"""Re-score a finished run's artifact with another evaluation stride (or token budget).

  python -m bench.rescore runs/q11/hybrid_s1.txt --stride 256 [--artifact PATH] [--val-max-tokens N]

The run's log gives the model config, the data, the tokenizer and the evaluation settings; the
artifact (default: the .ptz beside the log) is read without pickle and evaluated exactly as the
trainer's round trip evaluates it (records/verify.py `evaluate_model`), but with `--stride`. Used to
put runs scored with different strides on one footing (docs/PERF.md). Prints one key:value line.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from records.logs import parse_log
from records.verify import build_model, eval_config, evaluate_model, load_artifact_state


def rescore(log_path, stride: int, artifact=None, val_max_tokens: int | None = None):
    run = parse_log(log_path)
    artifact = Path(artifact) if artifact else Path(log_path).with_suffix(".ptz")
    model = build_model(run.model_config, load_artifact_state(artifact, max_file_bytes=64_000_000), str(artifact))
    ecfg = dict(eval_config(run.hparams, run.model_config), stride=min(stride, int(run.hparams["train_seq_len"])))
    return evaluate_model(model, ecfg, run.hparams["data_path"], run.hparams["tokenizer_path"], val_max_tokens)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log")
    ap.add_argument("--stride", type=int, required=True)
    ap.add_argument("--artifact", default=None)
    ap.add_argument("--val-max-tokens", type=int, default=None)
    a = ap.parse_args(argv)
    res = rescore(a.log, a.stride, a.artifact, a.val_max_tokens)
    print(f"rescore log:{a.log} stride:{a.stride} val_loss:{res.val_loss:.8f} val_bpb:{res.val_bpb:.8f} "
          f"tokens:{res.tokens} bytes:{res.bytes}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
