"""The bundled single-file train_gpt.py: self-contained, deterministic, and the same run as the packages."""
from __future__ import annotations

import ast
import base64
import io
import json
import math
import os
import random
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

from records.bundle import (ARCH_MODULES, LINE_LIMIT, PROJECT_PACKAGES, READABLE_NAME, BundleError,
                            arch_modules, bundle_source, collect_modules, counted_modules, counted_stub, lean_source,
                            pack_source, run_modules, text_decode, text_encode, write_bundle)
from records.logs import parse_log

ROOT = Path(__file__).resolve().parents[1]
STEP = re.compile(r"^step:(\d+)/\d+ train_loss:(\S+)", re.M)
FINAL = re.compile(r"^final_int\d+_\w+?_roundtrip_exact val_loss:(\S+) val_bpb:(\S+)", re.M)
BYTES = re.compile(r"^artifact_bytes:\d+ code_bytes:(\d+) model_bytes:(\d+)", re.M)


def test_bundle_has_no_project_imports_and_is_deterministic():
    src = bundle_source()
    assert src == bundle_source()
    tree = ast.parse(src)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] not in PROJECT_PACKAGES, ast.unparse(node)
        if isinstance(node, ast.Import):
            assert all(a.name.split(".")[0] not in PROJECT_PACKAGES for a in node.names), ast.unparse(node)
    assert src.rstrip().endswith("sys.exit(main())")
    assert src.count("from __future__ import annotations") == 1
    mods = collect_modules()
    assert "hybrid.model" in mods and "quant.artifact" in mods and "data.shards" in mods
    assert mods.index("hybrid.layers") < mods.index("hybrid.model")  # dependency order
    # lazy imports of modules left out of the bundle fail with a message naming them
    assert "hybrid.rwkv7 is not part of this bundled train_gpt.py" in src


@pytest.mark.parametrize("arch", ["rwkv7", "moe"])
def test_arch_bundle_includes_the_lazily_imported_modules(arch):
    src = bundle_source(extra=arch_modules(arch))
    compile(src, "train_gpt.py", "exec")
    for module in ARCH_MODULES[arch]:
        assert f"# {'=' * 30} {module.replace('.', '/')}.py" in src
        assert f"{module} is not part of this bundled" not in src
    assert "hybrid.rwkv7 is not part of this bundled" in bundle_source()  # the default bundle leaves it out
    with pytest.raises(BundleError, match="unknown --arch"):
        arch_modules("transformer")


def test_bundle_allows_one_optional_import_in_two_modules(tmp_path):
    (tmp_path / "hybrid").mkdir()
    opt = "try:\n    import zlib\nexcept ImportError:\n    zlib = None\n"
    (tmp_path / "hybrid" / "a.py").write_text(opt + "\ndef fa():\n    return zlib\n")
    (tmp_path / "hybrid" / "b.py").write_text(opt + "\ndef fb():\n    return zlib\n")
    (tmp_path / "train_gpt.py").write_text("from hybrid.a import fa\nfrom hybrid.b import fb\n")
    compile(bundle_source(tmp_path), "train_gpt.py", "exec")
    (tmp_path / "hybrid" / "b.py").write_text("def zlib():\n    return 1\n\ndef fb():\n    return zlib\n")
    with pytest.raises(BundleError, match="'zlib' is defined in both hybrid.a and hybrid.b"):
        bundle_source(tmp_path)


def test_bundle_line_limit_or_packed(tmp_path):
    info = write_bundle(tmp_path, pack="lzma")
    if info["readable_lines"] <= LINE_LIMIT:
        return
    # The readable bundle is over the challenge's 1500-line limit: the counted file is the packed stub,
    # and the README says so.
    assert info["packed_lines"] <= 6
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "1500" in readme and "train_gpt_readable.py" in readme


def test_bundle_refuses_name_collisions(tmp_path):
    (tmp_path / "hybrid").mkdir()
    (tmp_path / "hybrid" / "a.py").write_text("def helper():\n    return 1\n")
    (tmp_path / "hybrid" / "b.py").write_text("from hybrid.a import helper\n\ndef helper2():\n    return helper()\n")
    (tmp_path / "train_gpt.py").write_text("from hybrid.b import helper2\n\ndef helper():\n    return 2\n")
    with pytest.raises(BundleError, match="'helper' is defined in both hybrid.a and train_gpt.py"):
        bundle_source(tmp_path)


def _run(script_dir: Path, script: str, env_extra: dict, tmp: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(env_extra, OMP_NUM_THREADS="1", LOG_DIR=str(tmp / "logs"), ARTIFACT_PATH=str(tmp / f"{script_dir.name}.ptz"))
    p = subprocess.run([sys.executable, script], cwd=script_dir, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p.stdout


@pytest.fixture(scope="module")
def bundle_runs(tmp_path_factory, sample_corpus):
    """A 3-step tiny run of the repository's train_gpt.py ("ref"), then the same run from the readable
    bundle ("readable", pack none) and from the counted stub ("packed") of the modules it logged.
    (tmp, env, {kind: stdout})."""
    data_dir, tokenizer = sample_corpus
    tmp = tmp_path_factory.mktemp("bundle_runs")
    env = dict(PRESET="tiny", ITERATIONS="3", TRAIN_LOG_EVERY="1", DATA_PATH=str(data_dir),
               TOKENIZER_PATH=str(tokenizer))
    (tmp / "ref").mkdir()
    outs = {"ref": _run(ROOT, "train_gpt.py", dict(env, RUN_ID="ref"), tmp)}
    run = parse_log(tmp / "logs" / "ref.txt")
    assert run.code_modules is not None  # a repository run logs what its count bundled
    write_bundle(tmp / "readable", pack="none", extra=run.code_modules)
    write_bundle(tmp / "packed", extra=run.code_modules)
    for kind in ("readable", "packed"):
        outs[kind] = _run(tmp / kind, "train_gpt.py", dict(env, RUN_ID=kind), tmp)
    return tmp, env, outs


def test_bundle_runs_like_the_packages(bundle_runs):
    tmp, _, outs = bundle_runs
    ref = outs["ref"]
    ref_steps, ref_final = STEP.findall(ref), FINAL.findall(ref)
    assert [s for s, _ in ref_steps] == ["1", "2", "3"] and len(ref_final) == 1
    for kind in ("readable", "packed"):
        out = outs[kind]
        assert STEP.findall(out) == ref_steps, kind
        assert FINAL.findall(out) == ref_final, kind
        # the bundle counts its own train_gpt.py (the stub when packed) and nothing else
        code = int(BYTES.search(out).group(1))
        assert code == (tmp / kind / "train_gpt.py").stat().st_size, kind
    # the repository run counted exactly the stub a record of it ships (write_bundle = records new)
    assert int(BYTES.search(ref).group(1)) == (tmp / "packed" / "train_gpt.py").stat().st_size
    assert (tmp / "packed" / READABLE_NAME).read_text(encoding="utf-8") == \
        (tmp / "readable" / "train_gpt.py").read_text(encoding="utf-8")  # the readable bundle ships unchanged
    # the bundled script cannot reach the packages: a run from an empty folder without the repo works
    assert not (tmp / "packed" / "hybrid").exists()


def test_record_from_a_stub_run_verifies(bundle_runs, tmp_path):
    from records.folder import new_record
    from records.verify import verify_folder

    tmp, env, _ = bundle_runs
    run = parse_log(tmp / "logs" / "packed.txt")
    assert run.code_modules is None  # a bundled run counts its own file: `new` rebuilds it from run_modules
    folder = new_record("Stub_Run", [run.path], tmp / "packed.ptz", date="2026-01-02", records_dir=tmp_path)
    sub = json.loads((folder / "submission.json").read_text(encoding="utf-8"))
    assert sub["bytes_code"] == run.code_bytes == (tmp / "packed" / "train_gpt.py").stat().st_size
    assert (folder / "train_gpt.py").read_bytes() == (tmp / "packed" / "train_gpt.py").read_bytes()
    assert verify_folder(folder, env["DATA_PATH"], env["TOKENIZER_PATH"], echo=lambda s: None) == []
    # a shipped file other than the one the run counted is a failure
    (folder / "train_gpt.py").write_text((folder / "train_gpt.py").read_text(encoding="utf-8") + "\n", encoding="utf-8")
    sub["bytes_code"] += 1
    sub["bytes_total"] += 1
    (folder / "submission.json").write_text(json.dumps(sub), encoding="utf-8")
    fails = verify_folder(folder, env["DATA_PATH"], env["TOKENIZER_PATH"], echo=lambda s: None, evaluate_val=False)
    assert any(f.startswith("code_bytes: train_seed") for f in fails), fails


# --- the counted file: the lean source in a stub -------------------------------------------------

# What a default run counts: the default modules, GPTQ (the export) and the budget fit when present.
DEFAULT_RUN_EXTRA = ("quant.gptq", "quant.fit", "hybrid.token_mix")
# The brief's target is 30,000; this is the regression bound of what the counted stub reaches today
# (lean_source with dead-code, help-text and name shortening; the run presets and the MoE bookkeeping
# imported only by the runs that use them; base-123 text instead of base85: 34,429 bytes, then the
# settings checks, the final-weights checkpoint and the shared clock every run now executes: 39,803;
# one config tree, the MoE rules stated once: 39,974; the settings checks shared with bench/rescore: 39,995;
# the conv T mixer, default since issue 11, brings hybrid/token_mix.py into every default run, and the
# former defaults that old checkpoints are read with: 41,032). records/README.md says where the bytes go.
COUNTED_BYTES_BOUND = 41_050


def test_default_run_counted_bytes():
    stub = counted_stub(extra=DEFAULT_RUN_EXTRA)
    assert stub == counted_stub(extra=tuple(reversed(DEFAULT_RUN_EXTRA)))  # deterministic, order-free
    assert stub.count("\n") <= 6
    n = len(stub.encode("utf-8"))
    assert n <= COUNTED_BYTES_BOUND, n
    assert n < len(pack_source(bundle_source(extra=DEFAULT_RUN_EXTRA), "lzma").encode("utf-8")) * 2 // 3


def test_lean_source_has_no_docstrings_comments_or_unreached_code():
    readable = bundle_source(extra=DEFAULT_RUN_EXTRA)
    lean = lean_source(readable)
    assert lean == lean_source(readable)
    plain = lean_source(readable, rename=False)  # the same code under the readable source's names
    for text in (lean, plain):
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                first = node.body[0]
                assert not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                            and isinstance(first.value.value, str)), getattr(node, "name", "module")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.returns is None and all(a.annotation is None for a in node.args.args), node.name
        comments = [t for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type == tokenize.COMMENT]
        assert comments == []
    # renaming changes names only: the same statements, definitions and calls in the same order
    shape = [type(n).__name__ for n in ast.walk(ast.parse(plain))]
    assert [type(n).__name__ for n in ast.walk(ast.parse(lean))] == shape
    assert "class ShardError(" in lean and "class HybridGPT(" in lean  # class names stay (reprs, messages)
    assert 'metadata={"help"' in readable and 'metadata={"help"' not in plain  # --help text: readable bundle only
    lean, tree = plain, ast.parse(plain)
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    # reference implementations and readers of other formats are not in the run's code
    for name in ("evaluate_ref", "attention_ref", "artifact_breakdown", "write_shard", "open_v1", "bitpack",
                 "stateful_evaluate", "model_preset_report", "MoELoadStats"):
        assert name not in defined and f"def {name}(" not in lean, name
    assert {"main", "train", "finish", "HybridGPT", "pack_model", "unpack_model", "gptq_quantize"} <= defined
    # the readable bundle keeps everything
    assert "def evaluate_ref(" in readable and '"""' in readable


def test_lean_source_runs_like_the_source(tmp_path):
    """Tricky spellings survive the token-level rewrite (and its check against the syntax tree)."""
    src = '''"""Module doc."""
from __future__ import annotations

import os, sys  # sys is unused
from dataclasses import dataclass, field
from typing import NamedTuple

ALIAS = "helper_b"  # a name looked up by string keeps its definition
UNUSED = {"a": 1}


def helper_a(x: int) -> int:
    """Only a docstring and a return."""
    return x + 1


def helper_b(x):
    return x * 2


def unused(y: "float" = 1.0) -> None:
    """Never reached: dropped."""
    raise AssertionError


class Point(NamedTuple):
    """Fields are annotations: they stay."""
    x: int
    y: int = 2


@dataclass
class Conf:
    name: str = field(default="n", metadata={"help": "a " "b"})
    n: int = 3

    def twice(self) -> int:
        """doc"""
        k: int = self.n * 2
        return k


class Empty:
    """Only a docstring."""


def tricky(a, *args, b: int = 1, **kw) -> str:
    v = 1 if a else 2
    w = 1.5.is_integer(), (1).bit_length(), 0x1f, 1e3
    s = "x" "y" f"{v}" f"{w!r:>4}" r"\\d" "" "z" + str(b"a" rb"\\b" b'c')
    t = [i for i in range(3) if i not in (1,)] + [-1] * 2
    u = lambda *q: len(q)  # noqa: E731
    return f"{s}|{t}|{u(1, 2)}|{a**-1}|{'é'}|{not a}|{len(kw)}|{args}|{b}"


@staticmethod
def deco() -> int:
    return 0


REGISTRY = []


def register(fn):
    REGISTRY.append(fn.__name__)
    return fn


@register
def registered_only():  # never named again: registering it is the point, so it stays
    return 1


@dataclass
class UnusedFields:  # a decorator that only wraps: dropped with the class
    a: int = 1


print(helper_a(1), globals()[ALIAS](2), Point(1), Conf().twice(), type(Empty()).__name__, tricky(4.0, 5, k=1),
      deco.__func__(), os.sep, REGISTRY)
'''
    lean = lean_source(src, rename=False)
    assert "def unused(" not in lean and "UNUSED" not in lean and "Module doc" not in lean and "#" not in lean
    assert "import os\n" in lean and "sys" not in lean  # unused names leave the import
    assert "def helper_b(" in lean and "def twice(self):" in lean and "x:int" in lean
    assert "def registered_only(" in lean and "UnusedFields" not in lean
    renamed = lean_source(src)
    # looked up by string, registered by a decorator, classes and their members: their names stay
    assert "def helper_b(" in renamed and "def registered_only(" in renamed and "def twice(self):" in renamed
    assert "class Point(" in renamed and "class Empty:" in renamed
    assert "def helper_a(" not in renamed and "import os as " in renamed
    # the fused MLP's fake kernel is only ever named by its registering decorator: it stays
    assert "def _mlp_up_act_fake(" in lean_source(bundle_source(extra=("hybrid.kernels.fused_mlp",)))
    outs = []
    for text in (src, lean, renamed):
        p = subprocess.run([sys.executable, "-c", text], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        outs.append(p.stdout)
    assert outs[0] == outs[1]
    assert outs[0] == outs[1] == outs[2]
    for method in ("lzma", "brotli"):  # and so does either stub of it
        (tmp_path / "stub.py").write_text(pack_source(renamed, method), encoding="utf-8")
        p = subprocess.run([sys.executable, str(tmp_path / "stub.py")], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and p.stdout == outs[0], p.stderr


def test_lean_renaming_keeps_every_scope_apart():
    """Short names never capture another binding: shadowing parameters, closures, comprehensions,
    class bodies, `global`, f-strings (self-documenting ones print the old name), dead code."""
    src = '''from __future__ import annotations
import math
import os as operating_system

LIMIT = 7
TABLE = {"alpha": 1}
counter = 0


class ConfigError(ValueError):
    pass


class Holder:
    LIMIT = 3
    doubled = LIMIT * 2

    def get(self):
        return LIMIT + self.LIMIT + self.doubled


def closure_maker(scale):
    offset = scale * 2
    values = [offset + i for i in range(3)]

    def inner(value):
        total = value + offset
        return total

    square = lambda value: value * value  # noqa: E731
    return inner(1), square(3), values, [value for value in values if value > LIMIT]


def shadowing(total):
    result = [total for total in range(total)]
    other = {k: v for k, v in TABLE.items()}
    return result, other, total


def counting():
    global counter
    counter += 1
    return counter


def fstrings(width):
    height = width + 1
    area = width * height
    label = f"{area=} {width * height:>{height}} {{literal}} {TABLE['alpha']} {LIMIT!r} {math.pi:.2f}"
    return label + f"{operating_system.sep}{f'{height}'}"


def dead(flag):
    if flag:
        raise ConfigError("bad flag")
        unreachable = 1
        print(unreachable)
    return "ok"


def unbound_later(n):
    try:
        return late
    except NameError as exc:
        note = type(exc).__name__
    late = n
    return note, late


try:
    dead(True)
except ConfigError as exc:
    print(type(exc).__name__, exc)
print(Holder().get(), closure_maker(2), shadowing(3), counting(), counting(), fstrings(4), dead(False),
      unbound_later(5))
'''
    outs = []
    renamed = lean_source(src)
    assert "class ConfigError(" in renamed and "closure_maker" not in renamed and "unreachable" not in renamed
    for text in (src, lean_source(src, rename=False), renamed):
        p = subprocess.run([sys.executable, "-c", text], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        outs.append(p.stdout)
    assert outs[0] == outs[1] == outs[2], outs


def test_counted_modules_are_what_the_run_imports_plus_what_it_will():
    files = [ROOT / "train_gpt.py", ROOT / "hybrid" / "model.py", ROOT / "hybrid" / "moe.py",
             ROOT / "data" / "sample.py"]
    assert counted_modules(files) == ("hybrid.moe",)  # default modules and the sample builder are not extra
    assert counted_modules(files, {"arch": "hybrid", "gptq": 1, "bitpack": 1}) == (
        "hybrid.moe", "quant.bitpack", "quant.gptq")


def test_run_modules_follow_the_hyperparameters():
    assert run_modules({"arch": "hybrid", "gptq": 0, "mlp_fused": "off"}) == ()  # a log from before TOKEN_MIX
    t_mix = {"arch": "hybrid", "layer_pattern": "TTTWTTWTTWTF"}
    assert run_modules({**t_mix, "token_mix": "conv"}) == ("hybrid.token_mix",)  # the default's T mixer
    assert run_modules({**t_mix, "token_mix": "shift"}) == ()
    assert run_modules({**t_mix, "token_mix": "conv", "layer_pattern": "FFFF"}) == ()  # no T layer: not built
    assert run_modules({"arch": "hybrid", "bitpack": 1, "eval_mode": "stateful"}) == (
        "quant.bitpack", "hybrid.training.stateful")
    assert run_modules({"arch": "rwkv7", "gptq": 1, "mlp_fused": "auto"}) == (
        "hybrid.rwkv7", "hybrid.kernels.wkv7", "hybrid.kernels.wkv7_triton", "quant.gptq", "hybrid.kernels.fused_mlp")
    src = bundle_source(extra=run_modules({"arch": "moe", "gptq": 1, "mlp_fused": "triton"}))
    compile(src, "train_gpt.py", "exec")
    assert "quant.gptq is not part of this bundled" not in src and "hybrid/kernels/fused_mlp.py" in src


@pytest.mark.parametrize("blob", [b"", b"\x00", b"\x00\x00\x07", b"\xff" * 77, bytes(range(256)) * 3])
def test_text_encoding_round_trip_edges(blob):
    text = text_encode(blob)
    assert text_decode(text) == blob
    raw = text.encode("ascii")  # pure ASCII: the file's UTF-8 length is its byte length
    assert not set(raw) & {0, 10, 13, 34, 92}  # nothing a one-line "..." literal cannot hold raw


def test_text_encoding_random_round_trip_and_density():
    rng = random.Random(0)
    for n in (1, 2, 63, 64, 65, 500, 4096):
        blob = bytes(rng.randrange(256) for _ in range(n))
        assert text_decode(text_encode(blob)) == blob
    blob = bytes(rng.randrange(256) for _ in range(20000))
    # log2(123) = 6.94 bits per character: 20,000 random bytes need 23,037 digits (+1 for the 0x01 lead)
    assert len(text_encode(blob)) <= math.ceil(8 * 20001 / math.log2(123))
    assert len(text_encode(blob)) < len(base64.b85encode(blob)) * 0.93


@pytest.mark.parametrize("method", ["lzma", "brotli"])
def test_stub_decodes_to_the_source_when_run_as_a_file(tmp_path, method):
    source = "import sys\nprint('ok', len(sys.argv), __file__.endswith('stub.py'))\n" + "#" + "x\x7f" * 40 + "\n"
    stub = tmp_path / "stub.py"
    stub.write_text(pack_source(source, method), encoding="utf-8")
    out = subprocess.run([sys.executable, str(stub), "a"], capture_output=True, text=True, check=True)
    assert out.stdout == "ok 2 True\n"


def test_every_model_and_quant_module_bundles_together():
    """A run counts the modules loaded in its process (in a test session: all of them), so any two
    project modules must be bundleable side by side: no top-level name defined twice."""
    import pkgutil

    mods = tuple(m.name for pkg in ("hybrid", "quant")
                 for m in pkgutil.walk_packages([str(ROOT / pkg)], prefix=pkg + ".") if not m.ispkg)
    assert "hybrid.training.ttt" in mods and "hybrid.kernels.wkv7" in mods
    compile(bundle_source(extra=mods), "train_gpt.py", "exec")
