"""`python -m records verify FOLDER`: recompute a record folder's two numbers from its files.

Checks, each a line of the report; any failure makes the exit status non-zero:
1. bytes: code = size of FOLDER/train_gpt.py, model = size of FOLDER/final_model.ptz; their sum is at
   most 16,000,000 and equals submission.json's bytes_code / bytes_total; the code bytes equal every
   log's code_bytes (the run budgeted with what its record ships);
2. the artifact is read with the pickle-free reader of quant/artifact.py (file and decompressed
   sizes bounded, every field validated; a malformed or hostile file is a clean ArtifactError) and
   loaded strictly into a fresh model built from config.json's model_config;
3. val_bpb re-evaluated on the validation shards (DATA_PATH or --data-path; the tokenizer from
   TOKENIZER_PATH or --tokenizer-path) with the evaluation recorded in config.json (seq_len, stride,
   val_max_tokens, batch); compared with the artifact's log line and submission.json's per-seed value
   at a relative tolerance (1e-6: the logs print 8 decimals);
4. submission.json's val_loss/val_bpb equal the mean of the logs' final lines;
5. every log's training time is at most --max-train-seconds (600 for the 10min track).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

ARTIFACT_NAME = "final_model.ptz"
CONFIG_NAME = "config.json"
SUBMISSION_NAME = "submission.json"


class VerifyError(RuntimeError):
    pass


def load_artifact_state(path, max_file_bytes: int, max_raw_bytes: int | None = None) -> dict:
    """{name: tensor} from an artifact file; ArtifactError naming the file on any problem. The raw
    bound defaults to the reader's (quant/artifact.py MAX_RAW_BYTES, 4 × the budget)."""
    from quant.artifact import MAX_RAW_BYTES, read_artifact, unpack_model

    blob = read_artifact(path, max_bytes=max_file_bytes)
    return unpack_model(blob, source=str(path), max_raw_bytes=MAX_RAW_BYTES if max_raw_bytes is None else max_raw_bytes)


def build_model(model_config: dict, state: dict | None = None, source: str = "artifact"):
    from hybrid.config import ModelConfig, as_saved
    from hybrid.model import HybridGPT

    model = HybridGPT(ModelConfig(**as_saved(model_config)))  # logged resolved: only missing fields differ
    if state is not None:
        expected = model.state_dict()
        wrong = [f"{k}: {v.dtype} (the model's is {expected[k].dtype})" for k, v in state.items()
                 if k in expected and v.dtype != expected[k].dtype]
        if wrong:  # load_state_dict would cast silently: a file that stores other values than it claims
            raise VerifyError(f"{source}: tensor dtypes differ from the model's: {'; '.join(wrong[:5])}")
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise VerifyError(f"{source}: does not fit the recorded model config: {exc}") from None
    return model.eval()


def evaluate_model(model, eval_cfg: dict, data_path: str, tokenizer_path: str, val_max_tokens: int | None = None):
    """EvalResult of `model` exactly as the trainer's final round-trip evaluation."""
    import torch

    from data.bpb import build_byte_luts, load_tokenizer
    from data.shards import load_validation_tokens
    from hybrid.training.evaluate import evaluate

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model = model.to(device)
    max_tokens = eval_cfg["val_max_tokens"] if val_max_tokens is None else val_max_tokens
    sp = load_tokenizer(tokenizer_path, eval_cfg["vocab_size"])
    luts = build_byte_luts(sp, eval_cfg["vocab_size"], device)
    tokens = load_validation_tokens(os.path.join(data_path, "fineweb_val_*.bin"), eval_cfg["seq_len"], max_tokens)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else None
    return evaluate(model.forward_logits, tokens, eval_cfg["seq_len"], eval_cfg["stride"], luts,
                    eval_cfg["batch_seqs"], device, 0, 1, autocast)


def eval_config(hparams: dict, model_config: dict) -> dict:
    seq_len = int(hparams["train_seq_len"])
    stride = min(int(hparams["eval_stride"]), seq_len)
    return {"seq_len": seq_len, "stride": stride, "val_max_tokens": int(hparams.get("val_max_tokens", 0)),
            "batch_seqs": int(hparams.get("eval_batch_seqs", 32)), "vocab_size": int(model_config["vocab_size"]),
            "mode": f"sliding_stride{stride}" if stride < seq_len else "non_overlapping"}


def _num(x) -> float | None:
    """x as a float if it is a finite JSON number (not a bool, string or null), else None."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(x)


def _close(a, b, rel: float) -> bool:
    a, b = _num(a), _num(b)
    return a is not None and b is not None and math.isclose(a, b, rel_tol=rel, abs_tol=0.0)


def check_curve(r) -> str | None:
    """Why a log's training curve is not one run's (None when it is): train steps strictly
    increasing from >= 1, wallclock never decreasing, the last step within ITERATIONS."""
    steps = [s for s, _, _ in r.train]
    times = [t for _, _, t in r.train]
    if not steps:
        return "no train_loss lines"
    if steps[0] < 1 or any(b <= a for a, b in zip(steps, steps[1:])):
        return f"train steps are not strictly increasing from 1 ({steps[:3]}...{steps[-3:]})"
    if any(b < a for a, b in zip(times, times[1:])):
        return "train_time goes backwards"
    iterations = r.hparams.get("iterations")
    if isinstance(iterations, int) and r.steps > iterations:
        return f"stopped at step {r.steps}, past ITERATIONS={iterations}"
    return None


def verify_folder(folder, data_path: str | None = None, tokenizer_path: str | None = None,
                  val_max_tokens: int | None = None, max_train_seconds: float | None = None,
                  rel_tol: float = 1e-6, evaluate_val: bool = True, echo=print) -> list[str]:
    """Run every check, echo one line each; returns the failures (empty = verified)."""
    from quant.artifact import ArtifactError
    from quant.budget import ARTIFACT_LIMIT
    from records.logs import LogError, parse_log

    folder = Path(folder)
    failures: list[str] = []

    def check(ok: bool, msg: str) -> bool:
        echo(("ok    " if ok else "FAIL  ") + msg)
        if not ok:
            failures.append(msg)
        return ok

    try:
        sub = json.loads((folder / SUBMISSION_NAME).read_text(encoding="utf-8"))
        cfg = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        check(False, f"{folder}: cannot read {SUBMISSION_NAME}/{CONFIG_NAME}: {exc}")
        return failures
    script, artifact = folder / "train_gpt.py", folder / cfg.get("artifact", ARTIFACT_NAME)
    for p in (script, artifact):
        if not p.is_file():
            check(False, f"{p}: missing")
            return failures
    code, model_bytes = script.stat().st_size, artifact.stat().st_size
    total = code + model_bytes
    sha256 = hashlib.sha256(artifact.read_bytes()).hexdigest() if model_bytes <= 4 * ARTIFACT_LIMIT else "-"
    check(total <= ARTIFACT_LIMIT, f"bytes: code {code} + model {model_bytes} = {total} <= {ARTIFACT_LIMIT}")
    check(sub.get("bytes_code") == code and _num(sub.get("bytes_code")) is not None,
          f"bytes_code: submission.json {sub.get('bytes_code')!r} vs file {code}")
    check(sub.get("bytes_total") == total and _num(sub.get("bytes_total")) is not None,
          f"bytes_total: submission.json {sub.get('bytes_total')!r} vs files {total}")
    check(sub.get("artifact_sha256") == sha256,
          f"artifact_sha256: submission.json {sub.get('artifact_sha256')!r} vs {artifact.name} {sha256}")

    logs = []
    for name in cfg.get("logs", []):
        try:
            logs.append(parse_log(folder / name))
        except LogError as exc:
            check(False, str(exc))
    if not check(bool(logs), f"logs: {len(logs)} parsed ({', '.join(cfg.get('logs', [])) or 'none listed'})"):
        return failures
    for r in logs:  # the run budgeted with the code bytes it logged: the shipped file must be those bytes
        check(r.code_bytes == code, f"code_bytes: {r.path.name} logged {r.code_bytes} vs train_gpt.py {code}")
        why = check_curve(r)
        check(why is None, f"curve: {r.path.name} " + (why or f"steps 1..{r.steps}, wallclock increasing"))
    seed = str(cfg.get("artifact_seed"))
    art_log = next((r for r in logs if str(r.seed) == seed), logs[0])
    # The file is the run's: its size and SHA-256 are the ones the run logged when it wrote it.
    check(art_log.model_bytes == model_bytes and art_log.artifact_bytes == art_log.code_bytes + model_bytes,
          f"artifact_bytes: {art_log.path.name} logged model {art_log.model_bytes} / total {art_log.artifact_bytes} "
          f"vs files {model_bytes} / {code + model_bytes}")
    check(art_log.artifact_sha256 == sha256,
          f"artifact_sha256: {art_log.path.name} logged {art_log.artifact_sha256} vs {artifact.name} {sha256}")
    mean_loss = sum(r.score_loss for r in logs) / len(logs)  # the final scores: after TTT when it ran
    mean_bpb = sum(r.score_bpb for r in logs) / len(logs)
    check(_close(sub.get("val_bpb"), mean_bpb, rel_tol),
          f"val_bpb: submission.json {sub.get('val_bpb')!r} vs mean of logs {mean_bpb:.8f}")
    check(_close(sub.get("val_loss"), mean_loss, rel_tol),
          f"val_loss: submission.json {sub.get('val_loss')!r} vs mean of logs {mean_loss:.8f}")
    check(sub.get("n_seeds") == len(logs), f"n_seeds: submission.json {sub.get('n_seeds')!r} vs {len(logs)} logs")
    check(art_log.pre_val_bpb is None or _close(sub.get("pre_quant_val_bpb"), art_log.pre_val_bpb, rel_tol),
          f"pre_quant_val_bpb: submission.json {sub.get('pre_quant_val_bpb')!r} vs {art_log.path.name} "
          f"{art_log.pre_val_bpb}")
    check(sub.get("step_stop") == art_log.steps and _close(sub.get("wallclock_seconds"),
                                                              round(art_log.train_seconds, 3), rel_tol),
          f"step_stop/wallclock_seconds: submission.json {sub.get('step_stop')!r}/{sub.get('wallclock_seconds')!r} "
          f"vs {art_log.path.name} {art_log.steps}/{art_log.train_seconds:.3f}")
    results = sub.get("seed_results") if isinstance(sub.get("seed_results"), dict) else {}
    for r in logs:
        got = results.get(str(r.seed)) if isinstance(results.get(str(r.seed)), dict) else {}
        check(_close(got.get("val_bpb"), r.score_bpb, rel_tol) and _close(got.get("val_loss"), r.score_loss, rel_tol)
              and (r.pre_val_bpb is None or _close(got.get("pre_quant_val_bpb"), r.pre_val_bpb, rel_tol)),
              f"seed_results[{r.seed}]: submission.json {got.get('val_loss')!r}/{got.get('val_bpb')!r}/"
              f"{got.get('pre_quant_val_bpb')!r} vs {r.path.name} {r.score_loss}/{r.score_bpb}/{r.pre_val_bpb}")
    if max_train_seconds is None:
        max_train_seconds = 600.0 if sub.get("track", "10min_16mb") == "10min_16mb" else 0.0
    if max_train_seconds > 0:
        for r in logs:
            check(r.train_seconds <= max_train_seconds,
                  f"train_time: {r.path.name} {r.train_seconds:.1f}s <= {max_train_seconds:.0f}s")

    try:
        state = load_artifact_state(artifact, max_file_bytes=ARTIFACT_LIMIT)
        model = build_model(cfg["model_config"], state, source=str(artifact))
    except (ArtifactError, VerifyError) as exc:
        check(False, f"artifact: {exc}")
        return failures
    check(True, f"artifact: {artifact.name} read without pickle, {len(state)} tensors load strictly")
    if not evaluate_val:
        return failures
    data_path = data_path or os.environ.get("DATA_PATH") or cfg["hparams"]["data_path"]
    tokenizer_path = tokenizer_path or os.environ.get("TOKENIZER_PATH") or cfg["hparams"]["tokenizer_path"]
    ecfg = cfg["eval"]
    partial = val_max_tokens is not None and val_max_tokens != ecfg["val_max_tokens"]
    try:
        res = evaluate_model(model, ecfg, data_path, tokenizer_path, val_max_tokens)
    except (OSError, ValueError) as exc:
        check(False, f"evaluation: {exc}")
        return failures
    echo(f"re-evaluated eval:{ecfg['mode']} val_loss:{res.val_loss:.8f} val_bpb:{res.val_bpb:.8f} "
         f"tokens:{res.tokens} bytes:{res.bytes}")
    if partial:
        echo(f"note  --val-max-tokens {val_max_tokens} differs from the run's {ecfg['val_max_tokens']}: "
             f"partial evaluation, not compared with the logs")
        return failures
    check(_close(res.val_bpb, art_log.val_bpb, rel_tol),
          f"val_bpb: re-evaluated {res.val_bpb:.8f} vs {art_log.path.name} {art_log.val_bpb:.8f} (rel tol {rel_tol:g})")
    check(_close(res.val_loss, art_log.val_loss, rel_tol),
          f"val_loss: re-evaluated {res.val_loss:.8f} vs {art_log.path.name} {art_log.val_loss:.8f}")
    per_seed = results.get(seed) if isinstance(results.get(seed), dict) else {}
    if art_log.ttt_val_bpb is None:
        check(_close(res.val_bpb, per_seed.get("val_bpb"), rel_tol),
              f"val_bpb: re-evaluated {res.val_bpb:.8f} vs submission.json seed_results[{seed}] {per_seed.get('val_bpb')}")
        return failures
    # The run's score came after score-first TTT: run the same TTT again on a copy of the artifact's
    # model and compare (exact on the run's device and world size; other world sizes differ by rounding).
    compliance = sub.get("compliance") if isinstance(sub.get("compliance"), dict) else {}
    check(compliance.get("score_first_ttt") is True, f"compliance.score_first_ttt: submission.json "
          f"{compliance.get('score_first_ttt')!r} vs the log's TTT evaluation")
    try:
        tres = evaluate_model_ttt(model, ecfg, cfg["hparams"], data_path, tokenizer_path, art_log.world_size)
    except (OSError, ValueError) as exc:
        check(False, f"ttt evaluation: {exc}")
        return failures
    echo(f"re-evaluated ttt val_loss:{tres.val_loss:.8f} val_bpb:{tres.val_bpb:.8f}")
    check(_close(tres.val_bpb, art_log.ttt_val_bpb, rel_tol),
          f"ttt val_bpb: re-evaluated {tres.val_bpb:.8f} vs {art_log.path.name} {art_log.ttt_val_bpb:.8f}")
    check(_close(tres.val_bpb, per_seed.get("val_bpb"), rel_tol),
          f"ttt val_bpb: re-evaluated {tres.val_bpb:.8f} vs submission.json seed_results[{seed}] "
          f"{per_seed.get('val_bpb')}")
    return failures


def evaluate_model_ttt(model, eval_cfg: dict, hparams: dict, data_path: str, tokenizer_path: str,
                       world_size: int = 1):
    """The run's score-first TTT evaluation (hybrid/training/ttt.py) of a copy of `model`, with its settings."""
    import copy

    import torch

    from data.bpb import build_byte_luts, load_tokenizer
    from data.shards import load_validation_tokens
    from hybrid.training.ttt import evaluate_ttt, sgd_settings

    device = next(model.parameters()).device
    sp = load_tokenizer(tokenizer_path, eval_cfg["vocab_size"])
    luts = build_byte_luts(sp, eval_cfg["vocab_size"], device)
    tokens = load_validation_tokens(os.path.join(data_path, "fineweb_val_*.bin"), eval_cfg["seq_len"],
                                    eval_cfg["val_max_tokens"])
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else None
    if hparams.get("ttt") == "lora":  # one process batches the documents as the run's ranks did
        from hybrid.training.ttt_lora import evaluate_ttt_lora, lora_settings

        res, _ = evaluate_ttt_lora(model, tokens, eval_cfg["seq_len"], luts, device, 0, 1, autocast,
                                   layout_world_size=int(world_size), **lora_settings(hparams))
        return res
    res, _ = evaluate_ttt(copy.deepcopy(model), tokens, eval_cfg["seq_len"], eval_cfg["stride"], luts,
                          eval_cfg["batch_seqs"], device, 0, 1, autocast, **sgd_settings(hparams))
    return res
