"""Parse the trainer's logs (logs/<run_id>.txt): hyperparameters, curves and final numbers.

Only lines that start with a known key are read (`hparam:`, `step:N/M train_loss:`, `step:N/M
val_loss:`, `final_prequant`, `artifact_bytes:`, `code_modules:`,
`final_int{bits}_{compressor}_roundtrip_exact`), so the source code the log starts with (indented
f-strings) never matches.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

_HPARAM = re.compile(r"^hparam:(\w+)=(.*)$")
_MODEL_CONFIG = re.compile(r"^model_config:(\{.*\})$")
_TRAIN = re.compile(r"^step:(\d+)/(\d+) train_loss:(\S+) train_time:(\d+)ms")
_VAL = re.compile(r"^step:(\d+)/(\d+) val_loss:(\S+) val_bpb:(\S+) .*train_time:(\d+)ms")
_PRE = re.compile(r"^final_prequant eval:(\S+) val_loss:(\S+) val_bpb:(\S+)")
_BYTES = re.compile(r"^artifact_bytes:(\d+) code_bytes:(\d+) model_bytes:(\d+)")
_FINAL = re.compile(r"^final_int(\d+)_(\w+?)_roundtrip_exact val_loss:(\S+) val_bpb:(\S+)")
_FINAL_MODE = re.compile(r"^final_int\d+_\w+?_roundtrip eval:(\S+) ")
_STOP = re.compile(r"^stopping_early: wallclock_cap train_time:(\d+)ms step:(\d+)/(\d+)")
# A resumed run repeats the steps after its checkpoint in the same log: the curve keeps the last
# value of each step (the entries logged past the checkpoint before the kill are dropped).
_RESUME = re.compile(r"^resume:from \S+ step:(\d+)")
_SHA256 = re.compile(r"^artifact_sha256:([0-9a-f]{64})\b")
# Score-first TTT (hybrid/training/ttt.py) after the plain round trip: its score is the run's final score.
_TTT_FINAL = re.compile(r"^final_int\d+_\w+?_roundtrip_ttt_exact val_loss:(\S+) val_bpb:(\S+)")
_TTT = re.compile(r"^ttt mode:(\S+) ")
_RUN = re.compile(r"^run_id:\S+ arch:\S+ preset:\S+ world_size:(\d+) ")
_CODE_MODULES = re.compile(r"^code_modules:(\S*)$")


class LogError(ValueError):
    pass


@dataclass
class RunLog:
    path: Path
    hparams: dict = field(default_factory=dict)
    model_config: dict = field(default_factory=dict)
    train: list = field(default_factory=list)   # (step, loss, train_ms)
    val: list = field(default_factory=list)     # (step, val_loss, val_bpb, train_ms)
    pre_val_loss: float | None = None
    pre_val_bpb: float | None = None
    eval_mode: str = ""
    bits: int | None = None
    compressor: str = ""
    val_loss: float | None = None
    val_bpb: float | None = None
    artifact_bytes: int | None = None
    code_bytes: int | None = None
    model_bytes: int | None = None
    code_modules: tuple | None = None  # the lazily imported modules its counted code bundled (repo runs)
    stopped_early: bool = False
    resumed_at: list = field(default_factory=list)  # the step of each resume:from line
    artifact_sha256: str | None = None
    ttt_mode: str = "off"
    world_size: int = 1
    ttt_val_loss: float | None = None
    ttt_val_bpb: float | None = None

    @property
    def seed(self) -> int:
        return int(self.hparams.get("seed", 0))

    @property
    def steps(self) -> int:
        return self.val[-1][0] if self.val else (self.train[-1][0] if self.train else 0)

    @property
    def train_seconds(self) -> float:
        times = [t for *_, t in self.train] + [t for *_, t in self.val]
        return max(times) / 1000.0 if times else 0.0

    @property
    def score_loss(self) -> float:
        """The run's final score: after test-time training when it ran, else the plain round trip."""
        return self.ttt_val_loss if self.ttt_val_loss is not None else self.val_loss

    @property
    def score_bpb(self) -> float:
        return self.ttt_val_bpb if self.ttt_val_bpb is not None else self.val_bpb

    @property
    def final_line(self) -> str:
        return (f"final_int{self.bits}_{self.compressor}_roundtrip_exact val_loss:{self.val_loss:.8f} "
                f"val_bpb:{self.val_bpb:.8f}")


def parse_log(path) -> RunLog:
    """A finished run's log; LogError (naming the file) if the final round-trip line is missing."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise LogError(f"{path}: cannot read: {exc}") from None
    r = RunLog(path)
    for line in text.splitlines():
        if m := _HPARAM.match(line):
            try:
                r.hparams[m.group(1)] = ast.literal_eval(m.group(2))
            except (ValueError, SyntaxError):
                r.hparams[m.group(1)] = m.group(2)
        elif m := _MODEL_CONFIG.match(line):
            r.model_config = ast.literal_eval(m.group(1))
        elif m := _TRAIN.match(line):
            r.train.append((int(m.group(1)), float(m.group(3)), float(m.group(4))))
        elif m := _VAL.match(line):
            r.val.append((int(m.group(1)), float(m.group(3)), float(m.group(4)), float(m.group(5))))
        elif m := _PRE.match(line):
            r.eval_mode, r.pre_val_loss, r.pre_val_bpb = m.group(1), float(m.group(2)), float(m.group(3))
        elif m := _BYTES.match(line):
            r.artifact_bytes, r.code_bytes, r.model_bytes = map(int, m.groups())
        elif m := _FINAL.match(line):
            r.bits, r.compressor = int(m.group(1)), m.group(2)
            r.val_loss, r.val_bpb = float(m.group(3)), float(m.group(4))
        elif m := _FINAL_MODE.match(line):
            r.eval_mode = m.group(1)
        elif _STOP.match(line):
            r.stopped_early = True
        elif m := _TTT_FINAL.match(line):
            r.ttt_val_loss, r.ttt_val_bpb = float(m.group(1)), float(m.group(2))
        elif m := _RUN.match(line):
            r.world_size = int(m.group(1))
        elif m := _TTT.match(line):
            r.ttt_mode = m.group(1)
        elif m := _SHA256.match(line):
            r.artifact_sha256 = m.group(1)
        elif m := _RESUME.match(line):
            n = int(m.group(1))
            r.train = [t for t in r.train if t[0] <= n]
            r.val = [v for v in r.val if v[0] < n]  # a resume re-validates at its own step
            r.resumed_at.append(n)
        elif m := _CODE_MODULES.match(line):
            r.code_modules = tuple(x for x in m.group(1).split(",") if x)
    if r.val_bpb is None:
        raise LogError(f"{path}: no `final_int*_roundtrip_exact` line: not a finished train_gpt.py run log")
    return r
