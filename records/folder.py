"""`python -m records new`: a record folder (the challenge's layout and submission.json fields: docs/TECHNIQUES.md,
"Record folders and significance") from finished run logs and an artifact.

records/track_<track>/YYYY-MM-DD_<Name>/
  README.md          configuration, per-seed table, what changed
  submission.json    the challenge's fields (author, github_id, name, blurb, date, val_loss, val_bpb,
                     bytes_total, bytes_code) + track, seeds, seed_results, pre_quant_*, step_stop,
                     wallclock_seconds, bytes_model_int{bits}_{compressor}, val_loss_std/val_bpb_std
  train_gpt.py       the bundle (packed stub; train_gpt_readable.py beside it)
  train_seed<S>.log  the logs
  final_model.ptz    the artifact (of the first log's seed unless --artifact-seed says otherwise)
  config.json        hyperparameters, model config and evaluation setup that `verify` rebuilds from
  requirements.txt   packages the bundle imports
  curves.png         train and val curves of every seed (needs matplotlib)
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import re
import shutil
from pathlib import Path

from records.bundle import REPO, run_modules, write_bundle
from records.logs import RunLog, parse_log
from records.verify import ARTIFACT_NAME, CONFIG_NAME, SUBMISSION_NAME, eval_config

TRACKS = ("10min_16mb", "non_record_16mb")
REQUIREMENTS = ["torch>=2.5", "numpy", "sentencepiece", "zstandard", "brotli"]
# hyperparameters that differ between seeds of one record without changing it
PER_RUN_KEYS = {"seed", "run_id", "log_dir", "artifact_path", "checkpoint_dir", "resume", "data_path", "tokenizer_path"}


def _std(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def plot_curves(runs: list[RunLog], path: Path) -> bool:
    """Train loss and val_bpb against step, one colour per seed; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for r in runs:
        if r.train:
            ax1.plot([s for s, *_ in r.train], [x for _, x, _ in r.train], label=f"seed {r.seed}")
        if r.val:
            ax2.plot([s for s, *_ in r.val], [b for _, _, b, _ in r.val], marker="o", label=f"seed {r.seed}")
        ax2.axhline(r.val_bpb, linestyle=":", linewidth=0.8)
    ax1.set(xlabel="step", ylabel="train loss (nats)", title="train")
    ax2.set(xlabel="step", ylabel="val_bpb", title="validation (dotted: round-trip artifact)")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return True


def new_record(name: str, logs: list, artifact, track: str = "10min_16mb", author: str = "", github_id: str = "",
               blurb: str = "", changes: str = "", date: str | None = None, records_dir=None,
               artifact_seed: int | None = None, pack: str = "auto", force: bool = False) -> Path:
    if track not in TRACKS:
        raise ValueError(f"unknown track {track!r}; choose one of {TRACKS}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name):
        raise ValueError(f"record name {name!r}: use letters, digits, '_', '-', '.' (no spaces)")
    runs = [parse_log(p) for p in logs]
    seeds = [r.seed for r in runs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"logs share a seed: {seeds}")
    base = {k: v for k, v in runs[0].hparams.items() if k not in PER_RUN_KEYS}
    for r in runs[1:]:
        diff = sorted(k for k in base if r.hparams.get(k) != base[k])
        if diff:
            raise ValueError(f"{r.path} differs from {runs[0].path} in {diff}: one record is one configuration")
    artifact = Path(artifact)
    art_run = runs[0] if artifact_seed is None else next((r for r in runs if r.seed == artifact_seed), None)
    if art_run is None:
        raise ValueError(f"--artifact-seed {artifact_seed} is not among the logs' seeds {seeds}")
    if art_run.model_bytes is not None and artifact.stat().st_size != art_run.model_bytes:
        raise ValueError(f"{artifact} has {artifact.stat().st_size} bytes but {art_run.path} logged "
                         f"model_bytes:{art_run.model_bytes}: not this run's artifact")
    sha256 = hashlib.sha256(artifact.read_bytes()).hexdigest()
    if art_run.artifact_sha256 is not None and sha256 != art_run.artifact_sha256:
        raise ValueError(f"{artifact} has SHA-256 {sha256} but {art_run.path} logged "
                         f"{art_run.artifact_sha256}: not this run's artifact")
    date = date or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    folder = Path(records_dir or REPO / "records") / f"track_{track}" / f"{date}_{name}"
    if folder.exists():
        if not force:
            raise FileExistsError(f"{folder} exists (use --force to replace it)")
        shutil.rmtree(folder)
    folder.mkdir(parents=True)

    # What the run counted: a run from the repository logs the modules it bundled in its count
    # (code_modules); a bundled run imported them from its own file, built with run_modules.
    extra = art_run.code_modules if art_run.code_modules is not None else run_modules(art_run.hparams)
    info = write_bundle(folder, pack=pack, extra=extra)
    shutil.copyfile(artifact, folder / ARTIFACT_NAME)
    log_names = []
    for r in runs:
        dst = f"train_seed{r.seed}.log"
        shutil.copyfile(r.path, folder / dst)
        log_names.append(dst)
    (folder / "requirements.txt").write_text("\n".join(REQUIREMENTS) + "\n", encoding="utf-8")
    model_cfg = art_run.model_config
    config = {"artifact": ARTIFACT_NAME, "artifact_seed": art_run.seed, "logs": log_names,
              "hparams": art_run.hparams, "model_config": model_cfg, "eval": eval_config(art_run.hparams, model_cfg)}
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    bytes_code = (folder / "train_gpt.py").stat().st_size
    bytes_model = (folder / ARTIFACT_NAME).stat().st_size
    losses, bpbs = [r.score_loss for r in runs], [r.score_bpb for r in runs]  # after TTT when it ran
    ttt_ran = art_run.ttt_val_bpb is not None
    sub = {
        "author": author, "github_id": github_id, "name": name, "blurb": blurb,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if date is None else f"{date}T00:00:00Z",
        "track": track,
        "val_loss": round(sum(losses) / len(losses), 8), "val_bpb": round(sum(bpbs) / len(bpbs), 8),
        "val_loss_std": round(_std(losses), 8), "val_bpb_std": round(_std(bpbs), 8), "n_seeds": len(runs),
        "bytes_total": bytes_code + bytes_model, "bytes_code": bytes_code,
        f"bytes_model_int{art_run.bits}_{art_run.compressor}": bytes_model,
        "seed": art_run.seed, "seeds": seeds,
        "pre_quant_val_loss": art_run.pre_val_loss, "pre_quant_val_bpb": art_run.pre_val_bpb,
        "step_stop": art_run.steps, "wallclock_seconds": round(art_run.train_seconds, 3),
        "eval_method": config["eval"]["mode"], "eval_stride": config["eval"]["stride"],
        "seed_results": {str(r.seed): {"val_loss": r.score_loss, "val_bpb": r.score_bpb,
                                       "roundtrip_val_loss": r.val_loss, "roundtrip_val_bpb": r.val_bpb,
                                       "pre_quant_val_bpb": r.pre_val_bpb, "steps": r.steps,
                                       "train_time_s": round(r.train_seconds, 3),
                                       "artifact_bytes": (r.model_bytes or 0) + bytes_code,
                                       "log": f"train_seed{r.seed}.log"} for r in runs},
        "artifact_seed": art_run.seed,
        "artifact_sha256": sha256,
        # The records' compliance flags, set from what ran (docs/TECHNIQUES.md, "Challenge facts").
        "compliance": {"artifact_under_16mb": bytes_code + bytes_model <= 16_000_000,
                       "score_first_ttt": ttt_ran, "no_pre_quant_ttt": True, "three_seeds": len(runs) >= 3},
        "ttt": ({"mode": art_run.hparams.get("ttt"), **{k: art_run.hparams.get(f"ttt_{k}") for k in (
                    ("lora_rank", "lora_alpha", "lora_lr", "lora_chunk", "lora_docs", "lora_targets", "lora_phases",
                     "lora_phase_docs", "lora_phase_lr", "lora_phase_epochs")
                    if art_run.hparams.get("ttt") == "lora" else ("chunk", "epochs", "lr", "momentum", "clip"))}}
                if ttt_ran else None),
    }
    (folder / SUBMISSION_NAME).write_text(json.dumps(sub, indent=2) + "\n", encoding="utf-8")
    plotted = plot_curves(runs, folder / "curves.png")

    keys = ["arch", "num_layers", "layer_pattern", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "vocab_size",
            "train_seq_len", "train_batch_tokens", "iterations", "max_wallclock_seconds", "matrix_lr", "ema_decay",
            "late_qat_threshold", "matrix_bits", "embed_bits", "compressor", "eval_stride"]
    cfg_rows = [f"| {k} | {model_cfg.get(k, art_run.hparams.get(k))!r} |" for k in keys
                if k in model_cfg or k in art_run.hparams]
    seed_rows = [f"| {r.seed} | {r.score_loss:.8f} | {r.score_bpb:.8f} | {r.pre_val_bpb} | "
                 f"{(r.model_bytes or 0) + bytes_code} | {r.steps} | {r.train_seconds:.1f} |" for r in runs]
    readme = [f"# {name}", "", blurb or "(no blurb)", "",
              f"Track `{track}`. val_bpb **{sub['val_bpb']:.8f}** (mean of {len(runs)} seed(s), std "
              f"{sub['val_bpb_std']:.8f}); val_loss {sub['val_loss']:.8f} nats. Total bytes {sub['bytes_total']:,} "
              f"= code {bytes_code:,} (`train_gpt.py`, {info.get('packer', pack)} self-extracting bundle) "
              f"+ model {bytes_model:,} (`{ARTIFACT_NAME}`, int{art_run.bits} + {art_run.compressor}, "
              f"seed {art_run.seed}).", "",
              "## What changed", "", changes or "(not stated)", "",
              "## Configuration", "", "| setting | value |", "|---|---|", *cfg_rows, "",
              "Every hyperparameter is in `config.json` (and at the top of each log).", "",
              "## Seeds", "", "| seed | val_loss | val_bpb | pre-quant val_bpb | bytes total | steps | train s |",
              "|---|---|---|---|---|---|---|", *seed_rows, "",
              *(["![train and val curves](curves.png)", ""] if plotted else []),
              "## Reproduce and verify", "", "```bash",
              "pip install -r requirements.txt",
              "torchrun --standalone --nproc_per_node=8 train_gpt.py   # from inside this folder; DATA_PATH/TOKENIZER_PATH as needed",
              f"python -m records verify records/track_{track}/{folder.name}   # from the repo root", "```", "",
              f"`train_gpt.py` is generated by `python -m records bundle`: the lean source of the readable bundle "
              f"`train_gpt_readable.py` ({info['readable_lines']} lines; no comments, docstrings or code the run "
              f"never reaches) in a self-extracting stub.", ""]
    (folder / "README.md").write_text("\n".join(readme), encoding="utf-8")
    return folder
