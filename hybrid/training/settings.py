"""A run's settings, parsed and checked before anything trains.

`train_gpt.resolve_hyperparameters` parses every value with `parse_setting` and checks the resolved
run with `check_settings`, on every rank, before the data is opened or a weight is allocated. Each
failure is a `SettingError` whose one-line message names the environment variable and the flag, the
value given and what is allowed; `train_gpt.main` prints it without a traceback and exits with
status 2. A bad value found after training would cost the whole run (ten minutes of 8 GPUs), so
anything that can be known before the first step is checked here: numbers and their ranges,
booleans from a closed set of words, names from their lists, folders that must be writable, and
settings that only make sense together.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

TTT_MODES = ("off", "sgd", "lora")  # score-first test-time training (hybrid/training/ttt.py, hybrid/training/ttt_lora.py)
TTT_LORA_TARGETS = ("attn", "mixer", "head")  # = hybrid.training.ttt_lora.LORA_TARGETS (tested), checked before training
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


class SettingError(ValueError):
    """A setting that cannot run; the message is one line and names the variable."""


def setting_name(field: str) -> str:
    return f"{field.upper()} (--{field.replace('_', '-')})"


def parse_setting(kind: type, field: str, text: str):
    """`text` (an environment value or a flag) as `kind`: bool from TRUE_WORDS/FALSE_WORDS, int,
    finite float, or str as given. Integer fields that hold 0/1 switches also take the boolean words."""
    word = text.strip().lower()
    if kind is bool or (kind is int and field in SWITCHES):
        if word in TRUE_WORDS or word in FALSE_WORDS:
            value = word in TRUE_WORDS
            return value if kind is bool else int(value)
        if kind is bool or not word.lstrip("-").isdigit():
            raise SettingError(f"{setting_name(field)}={text!r} is not a boolean; use one of "
                               f"{'/'.join(TRUE_WORDS)} or {'/'.join(FALSE_WORDS)}")
    if kind is int:
        try:
            return int(word)
        except ValueError:
            raise SettingError(f"{setting_name(field)}={text!r} is not an integer") from None
    if kind is float:
        try:
            value = float(word)
        except ValueError:
            raise SettingError(f"{setting_name(field)}={text!r} is not a number") from None
        if not math.isfinite(value):
            raise SettingError(f"{setting_name(field)}={text!r} must be a finite number")
        return value
    return text


def _at_least(lo):
    return lambda v: v >= lo, f">= {lo}"


def _above(lo):
    return lambda v: v > lo, f"> {lo}"


def _fraction(v):  # a decay, momentum or beta: [0, 1)
    return 0 <= v < 1


FRACTION = (_fraction, "in [0, 1)")
BITS = (lambda v: 2 <= v <= 8, "an integer width in 2..8")
OPTIONAL_BITS = (lambda v: v == 0 or 2 <= v <= 8, "0 (same as MATRIX_BITS) or a width in 2..8")

# 0/1 switches stored as ints (parse_setting also takes true/false, yes/no, on/off for them).
SWITCHES = frozenset({"bitpack", "gptq", "fit_budget"})

# Range of each numeric run, optimizer and export field. Model fields (None until resolved: the
# arch's default) get the same check when given explicitly; the model config checks how they combine.
RULES: dict[str, tuple] = {
    "data_seed": _at_least(0), "val_loss_every": _at_least(0), "val_max_tokens": _at_least(0),
    "eval_stride": _at_least(1), "eval_batch_seqs": _at_least(1), "eval_warmup": _at_least(0),
    "train_log_every": _at_least(0), "iterations": _at_least(1), "warmdown_iters": _at_least(0),
    "warmup_steps": _at_least(-1), "train_batch_tokens": _at_least(1), "train_seq_len": _at_least(1),
    "grad_accum_base": _at_least(1), "max_wallclock_seconds": _at_least(0), "vocab_size": _at_least(2),
    "tied_embed_lr": _at_least(0), "embed_lr": _at_least(0), "matrix_lr": _at_least(0),
    "scalar_lr": _at_least(0), "rwkv_lora_lr": _at_least(0), "muon_momentum": FRACTION,
    "muon_momentum_warmup_start": FRACTION, "muon_momentum_warmup_steps": _at_least(0),
    "muon_backend_steps": _at_least(1), "muon_wd": _at_least(0), "adam_wd": _at_least(0),
    "beta1": FRACTION, "beta2": FRACTION, "adam_eps": _above(0), "grad_clip_norm": _at_least(0),
    "ema_decay": FRACTION, "late_qat_threshold": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "matrix_bits": BITS, "embed_bits": BITS, "mlp_bits": OPTIONAL_BITS, "attn_bits": OPTIONAL_BITS,
    "sd_k_matrix": _above(0), "sd_k_embed": _above(0), "gptq_seqs": _at_least(1),
    "gptq_seq_len": _at_least(2), "gptq_temp": _above(0), "gptq_batch": _at_least(1),
    "checkpoint_every": _at_least(0), "checkpoint_keep": _at_least(1),
    "ttt_chunk": _at_least(1), "ttt_epochs": _at_least(0), "ttt_lr": _at_least(0), "ttt_momentum": FRACTION,
    "ttt_clip": _at_least(0), "ttt_lora_rank": _at_least(1), "ttt_lora_alpha": _above(0),
    "ttt_lora_lr": _at_least(0), "ttt_lora_chunk": _at_least(1), "ttt_lora_docs": _at_least(1),
    "ttt_lora_phases": _at_least(0), "ttt_lora_phase_docs": _at_least(1), "ttt_lora_phase_lr": _at_least(0),
    "ttt_lora_phase_epochs": _at_least(0),
    "compile": (lambda v: v in (-1, 0, 1), "-1 (on CUDA only), 0 or 1"),
    # model fields (explicit values only; unset means the arch's default)
    "num_layers": _at_least(1), "model_dim": _at_least(1), "num_heads": _at_least(1),
    "num_kv_heads": _at_least(1), "mlp_mult": _above(0), "attn_window": _at_least(1),
    "rope_dims": _at_least(0), "rope_base": _above(0), "qk_gain_init": _above(0), "xsa_last": _at_least(0),
    "ve_dim": _at_least(1), "bigram_buckets": _at_least(0), "bigram_dim": _at_least(1),
    "logit_softcap": _at_least(0), "tied_embed_init_std": _above(0),
}
for _name in SWITCHES:
    RULES[_name] = (lambda v: v in (0, 1), "0 or 1 (or true/false, yes/no, on/off)")

# String fields whose empty value means "off", "automatic" or "the default": an explicit empty
# value is fine. Any other string field given as "" is refused: an empty LAYER_PATTERN= would
# otherwise silently become the default pattern the user never typed.
EMPTY_OK = frozenset({"run_id", "preset", "artifact_path", "checkpoint_dir", "resume"})


def check_explicit(field: str, value, sentinel) -> None:
    """A value the user gave (environment or flag), before defaults are merged: its range, and no
    empty or negative value where those only stand for "unset"."""
    where = setting_name(field)
    if isinstance(value, str):
        if value.strip() == "" and field not in EMPTY_OK:
            hint = " (leave it unset for the default)" if sentinel in ("", None) else ""
            raise SettingError(f"{where} is set but empty{hint}")
        return
    rule = RULES.get(field)
    if rule is not None and not rule[0](value):
        raise SettingError(f"{where}={value!r} is out of range: must be {rule[1]}")
    if rule is None and sentinel is not None and not isinstance(sentinel, bool) \
            and isinstance(value, (int, float)) and value < 0 and sentinel < 0:
        raise SettingError(f"{where}={value!r}: negative values only stand for 'unset' here")


def writable_folder(path: Path, field: str) -> None:
    """Create `path` (and parents) if needed and prove it writable with a probe file."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_probe_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise SettingError(f"{setting_name(field)}: cannot write to {str(path)!r} ({exc.strerror or exc}); "
                           f"choose a writable folder") from None


def check_ranges(values: dict) -> None:
    """Every setting of `values` (name -> value) that has a RULES range within it; None is unset (a
    model field whose arch default applies: the model config checks it)."""
    for name, (ok, what) in RULES.items():
        value = values.get(name)
        if value is not None and not ok(value):
            raise SettingError(f"{setting_name(name)}={value!r} is out of range: must be {what}")


def check_ttt(h) -> None:
    """The TTT settings that must agree with each other and with the evaluation: h.ttt, h.eval_mode,
    h.ttt_lora_targets, h.ttt_lora_chunk and the windows' h.train_seq_len (`h`: a run's
    Hyperparameters, or any object with those attributes, e.g. a re-scoring's)."""
    if h.ttt != "off" and h.eval_mode != "sliding":
        raise SettingError(f"{setting_name('ttt')}={h.ttt!r} needs EVAL_MODE=sliding (the stateful evaluation carries "
                           f"a recurrent state across chunks that test-time training would invalidate)")
    if h.ttt == "lora":
        bad = [t for t in h.ttt_lora_targets.split(",") if t not in TTT_LORA_TARGETS]
        if bad or not h.ttt_lora_targets:
            raise SettingError(f"{setting_name('ttt_lora_targets')}={h.ttt_lora_targets!r}: a comma list of "
                               f"{', '.join(TTT_LORA_TARGETS)}")
        if h.ttt_lora_chunk > h.train_seq_len:
            raise SettingError(f"{setting_name('ttt_lora_chunk')}={h.ttt_lora_chunk} is longer than TRAIN_SEQ_LEN="
                               f"{h.train_seq_len}, the context a scored chunk is read with")


def check_settings(h, compressors: list[str], choices: dict[str, tuple]) -> None:
    """The resolved run `h` (train_gpt.Hyperparameters): every numeric field in range, names from
    their lists (`choices`: field -> allowed values; `compressors`: those installed), settings that
    must agree, and the folders the run will write, all before the first step."""
    check_ranges(vars(h))
    for name, allowed in choices.items():
        if getattr(h, name) not in allowed:
            raise SettingError(f"{setting_name(name)}={getattr(h, name)!r} is not one of {', '.join(map(str, allowed))}")
    if h.compressor != "auto" and h.compressor not in compressors:
        raise SettingError(f"{setting_name('compressor')}={h.compressor!r}: choose one of "
                           f"{', '.join(compressors + ['auto'])} (installed here)")
    check_ttt(h)
    if h.eval_stride > h.train_seq_len:
        raise SettingError(f"{setting_name('eval_stride')}={h.eval_stride} is longer than TRAIN_SEQ_LEN="
                           f"{h.train_seq_len}: windows would skip tokens; use a stride <= the window")
    if h.train_batch_tokens % h.train_seq_len:
        raise SettingError(f"{setting_name('train_batch_tokens')}={h.train_batch_tokens} is not a multiple of "
                           f"TRAIN_SEQ_LEN={h.train_seq_len}")
    if "/" in h.run_id or "\\" in h.run_id or h.run_id in (".", ".."):
        raise SettingError(f"{setting_name('run_id')}={h.run_id!r} must be a plain file name (no folders)")
    writable_folder(Path(h.log_dir), "log_dir")
    if h.artifact_path:
        artifact = Path(h.artifact_path)
        if artifact.is_dir():
            raise SettingError(f"{setting_name('artifact_path')}={h.artifact_path!r} is a folder; give a file path")
        writable_folder(artifact.parent, "artifact_path")
    if h.checkpoint_every > 0 and h.checkpoint_dir:
        writable_folder(Path(h.checkpoint_dir), "checkpoint_dir")
    if h.resume and h.resume != "auto" and not Path(h.resume).exists():
        raise SettingError(f"{setting_name('resume')}={h.resume!r}: no such checkpoint file or folder")
    for name in ("data_path", "tokenizer_path"):
        if not getattr(h, name):
            raise SettingError(f"{setting_name(name)} is empty")
