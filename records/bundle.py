"""Bundle the trainer into one self-contained `train_gpt.py` (the file the challenge counts).

The challenge counts the bytes of the single `train_gpt.py` that runs from inside a record folder,
so a record cannot import `hybrid/`, `quant/` or `data/`. `bundle_source()` concatenates the modules
a default hybrid run imports, in dependency order, into one script:

- the project modules are found from `train_gpt.py`'s top-level project imports, transitively;
- every `from hybrid.x import …` / `from quant.x import …` / `from data.x import …` line is removed
  (top-level ones, and lazy ones inside functions, which become `pass`: the names are global in the
  bundle); a lazy import of a module that is NOT in the bundle (RWKV-7, MoE, the sample builder)
  becomes `raise ImportError(...)` naming the module, so a bundled default run never needs them and
  a bundled run that does fails with a clear message instead of a NameError;
- stdlib/third-party imports are merged at the top after one `from __future__ import annotations`;
  try/except imports (optional compressors) stay where they are;
- package module docstrings are replaced by a one-line banner naming the source file;
- two modules defining the same top-level name is an error (BundleError), as is an import alias that
  means two different things;
- the trainer comes last, so its `if __name__ == "__main__":` ends the file.

The counted file (`counted_stub`): the lean source (`lean_source`: the readable bundle without
docstrings, comments, annotations outside class bodies, unused imports, the top-level definitions
nothing in the run reaches, dead statements and dataclass help text, with short local and top-level
names, re-indented by one space; checked against the same edits made on the syntax tree) packed by
`pack_source` into a short stub that decodes it from base-123 ASCII text and decompresses it
(lzma or brotli, whichever is smaller) and execs it in its own module namespace with `__file__`
left as the stub's path, so `ROOT = Path(__file__).resolve().parent` still is the record folder.
The readable bundle is written beside it, unchanged, as `train_gpt_readable.py`. A run from the
repository logs the size of exactly this stub as code_bytes (train_gpt.counted_code_bytes), and
`records new` ships it. Output is deterministic: the lean source keeps the readable source's own
token text (no `ast.unparse`), so it does not depend on the Python version.
"""
from __future__ import annotations

import ast
import lzma
import sys
from pathlib import Path

from records.lean import lean_source

REPO = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("hybrid", "quant", "data")
ENTRY = "train_gpt.py"
READABLE_NAME = "train_gpt_readable.py"
LINE_LIMIT = 1500  # the challenge's readability limit for train_gpt.py
PACKERS = ("auto", "lzma", "brotli", "none")  # auto: the smaller of lzma and brotli
# Modules a default (hybrid) run never imports but another --arch does lazily; `--arch` adds them.
ARCH_MODULES: dict[str, tuple[str, ...]] = {
    "hybrid": (), "gpt": (),
    "rwkv7": ("hybrid.rwkv7", "hybrid.kernels.wkv7", "hybrid.kernels.wkv7_triton"),
    "moe": ("hybrid.moe",),
}


class BundleError(RuntimeError):
    pass


def _is_project(module: str | None) -> bool:
    return bool(module) and module.split(".")[0] in PROJECT_PACKAGES


def _module_path(root: Path, module: str) -> Path:
    path = root.joinpath(*module.split(".")).with_suffix(".py")
    if not path.is_file():
        raise BundleError(f"project module {module} has no file {path}")
    return path


def _parse(path: Path) -> tuple[str, ast.Module]:
    text = path.read_text(encoding="utf-8")
    return text, ast.parse(text, filename=str(path))


def _project_imports(tree: ast.Module, where: str) -> tuple[list[str], list[ast.ImportFrom]]:
    """(top-level project modules imported, lazy project ImportFrom nodes inside functions/blocks)."""
    top, lazy = [], []
    top_nodes = set(id(n) for n in tree.body)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(_is_project(a.name) for a in node.names):
            raise BundleError(f"{where}:{node.lineno}: `import {node.names[0].name}` form is not bundleable; "
                              f"use `from package.module import name` (docs/DESIGN.md)")
        if isinstance(node, ast.ImportFrom) and (node.level or _is_project(node.module)):
            if node.level:
                raise BundleError(f"{where}:{node.lineno}: relative imports are not bundleable")
            if id(node) in top_nodes:
                top.append(node.module)
            else:
                lazy.append(node)
    return top, lazy


def collect_modules(root: Path = REPO, extra: tuple[str, ...] = ()) -> list[str]:
    """Project modules the trainer imports at top level, transitively, in dependency order
    (a module comes after every module it imports at top level), then the `extra` modules (and
    whatever they import) that a non-default run imports lazily."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(module: str) -> None:
        if module in order:
            return
        if module in visiting:
            raise BundleError(f"import cycle through {module}")
        visiting.add(module)
        _, tree = _parse(_module_path(root, module))
        for dep in _project_imports(tree, module)[0]:
            visit(dep)
        visiting.discard(module)
        order.append(module)

    _, tree = _parse(root / ENTRY)
    for dep in _project_imports(tree, ENTRY)[0]:
        visit(dep)
    for dep in extra:
        visit(dep)
    return order


def canonical_extra(extra) -> tuple[str, ...]:
    """`extra` sorted, without repeats: a bundle depends on which modules it holds, not on the order a
    caller named them, so a run's in-memory count and its record's file are the same bytes."""
    return tuple(sorted(set(extra)))


def counted_modules(files, hparams: dict | None = None, root: Path = REPO) -> tuple[str, ...]:
    """The lazily imported modules a run's counted file holds: the project modules among `files` (the
    source files the run imported, under `root`) that the default bundle lacks, plus `run_modules`
    of its hyperparameters (what it imports after counting, e.g. GPTQ at export); sorted. The data
    helpers (the sample builder) are never bundled."""
    root = Path(root).resolve()
    default = set(collect_modules(root))
    found = set(run_modules(hparams) if hparams is not None else ())
    for f in files:
        rel = Path(f).resolve().relative_to(root).with_suffix("")
        module = ".".join(rel.parts)
        if rel.parts[0] in ("hybrid", "quant") and module not in default:
            found.add(module)
    return canonical_extra(found)


def arch_modules(arch: str) -> tuple[str, ...]:
    if arch not in ARCH_MODULES:
        raise BundleError(f"unknown --arch {arch!r}; choose one of {sorted(ARCH_MODULES)}")
    return ARCH_MODULES[arch]


def run_modules(hparams: dict) -> tuple[str, ...]:
    """The lazily imported modules a run with these hyperparameters needs: its architecture's, GPTQ's
    when it exported with GPTQ, the fused MLP kernel's when it asked for it, the bit packer's when it
    stored bit-packed ints, the stateful evaluation's when it evaluated that way, the presets' when it named one,
    the T-layer mixers' when it has T layers that are not the plain "shift" (read with the defaults of
    the log's day, hybrid.config.as_saved) (every run imports the checkpoint code: it saves its final
    weights before packing)."""
    from hybrid.config import as_saved  # a plain-Python module: no torch, no trainer

    extra = list(arch_modules(str(hparams.get("arch", "hybrid"))))
    if as_saved(hparams)["token_mix"] != "shift" and "T" in str(hparams.get("layer_pattern", "")).upper():
        extra.append("hybrid.token_mix")
    if int(hparams.get("gptq", 0) or 0):
        extra.append("quant.gptq")
    if str(hparams.get("mlp_fused", "off")) in ("auto", "triton"):
        extra.append("hybrid.kernels.fused_mlp")
    if int(hparams.get("bitpack", 0) or 0):
        extra.append("quant.bitpack")
    if str(hparams.get("eval_mode", "sliding")) == "stateful":
        extra.append("hybrid.training.stateful")
    if hparams.get("preset"):
        extra.append("hybrid.presets")
    if str(hparams.get("ttt", "off")) in ("sgd", "lora"):  # score-first TTT at the final evaluation
        extra.append("hybrid.training.ttt" if hparams["ttt"] == "sgd" else "hybrid.training.ttt_lora")
    if int(hparams.get("fit_budget", 0) or 0):
        extra.append("quant.fit")  # the budget fit (train_gpt.finish imports it when FIT_BUDGET=1)
    return tuple(extra)


def _defined_names(tree: ast.Module) -> list[tuple[str, bool]]:
    """[(top-level name, optional)]: optional = bound inside a top-level try block that imports an
    optional package (`try: import triton except ImportError: triton = None`). Two modules may both
    bind the same optional import (it means the same package in both); any other repeat is an error."""
    names = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append((node.name, False))
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                names += [(n.id, False) for n in ast.walk(t) if isinstance(n, ast.Name)]
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and isinstance(node.target, ast.Name):
            names.append((node.target.id, False))
        elif isinstance(node, ast.Try):  # optional imports: `try: import zstandard except ImportError: ...`
            imported = {(a.asname or a.name).split(".")[0] for sub in ast.walk(node)
                        if isinstance(sub, (ast.Import, ast.ImportFrom)) for a in sub.names}
            names += [(n, True) for n in sorted(imported)]
            for sub in ast.walk(node):
                if isinstance(sub, ast.Assign):
                    names += [(n.id, n.id in imported) for t in sub.targets for n in ast.walk(t)
                              if isinstance(n, ast.Name)]
    return names


class _Imports:
    """Merged stdlib/third-party imports: `import a.b as c` and `from m import x as y`."""

    def __init__(self):
        self.plain: dict[str, str] = {}        # bound name -> statement
        self.froms: dict[str, dict[str, str]] = {}  # module -> {bound name: imported name}
        self.bound: dict[str, str] = {}        # bound name -> what it means

    def _bind(self, name: str, meaning: str, where: str) -> None:
        old = self.bound.setdefault(name, meaning)
        if old != meaning:
            raise BundleError(f"{where}: import name {name!r} means {meaning}, elsewhere {old}")

    def add(self, node, where: str) -> None:
        if isinstance(node, ast.Import):
            for a in node.names:
                bound = a.asname or a.name.split(".")[0]
                stmt = f"import {a.name}" + (f" as {a.asname}" if a.asname else "")
                self._bind(bound, f"module {a.name}" if a.asname else f"module {bound}", where)
                self.plain.setdefault(stmt, stmt)
        else:
            for a in node.names:
                bound = a.asname or a.name
                self._bind(bound, f"{node.module}.{a.name}", where)
                self.froms.setdefault(node.module, {})[bound] = a.name

    def lines(self) -> list[str]:
        def group(mod: str) -> int:
            return 0 if mod.split(".")[0] in sys.stdlib_module_names else 1

        out = []
        for g in (0, 1):
            plain = sorted(s for s in self.plain if group(s.split()[1]) == g)
            froms = []
            for mod in sorted(m for m in self.froms if group(m) == g):
                items = sorted(f"{orig} as {b}" if b != orig else b for b, orig in self.froms[mod].items())
                froms.append(f"from {mod} import {', '.join(items)}")
            if plain or froms:
                out += plain + froms + [""]
        return out


def _lazy_replacement(node: ast.ImportFrom, included: set[str], indent: str) -> list[str]:
    if node.module in included:
        aliases = [f"{a.asname} = {a.name}" for a in node.names if a.asname and a.asname != a.name]
        return [indent + s for s in aliases] or [indent + "pass  # bundled: " + node.module + " is above"]
    why = (f"{node.module} is not part of this bundled train_gpt.py; bundle it with "
           f"`python -m records bundle --arch <arch>` for that architecture, or run the package checkout")
    return [indent + f"raise ImportError({why!r})"]


def _module_body(module: str, text: str, tree: ast.Module, included: set[str], imports: _Imports,
                 keep_docstring: bool) -> list[str]:
    lines = text.splitlines()
    drop: set[int] = set()           # 0-based line numbers removed
    replace: dict[int, list[str]] = {}  # 0-based first line -> replacement lines
    body = tree.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str) and not keep_docstring:
        drop.update(range(body[0].lineno - 1, body[0].end_lineno))
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                pass
            elif not (isinstance(node, ast.ImportFrom) and _is_project(node.module)):
                imports.add(node, module)
            drop.update(range(node.lineno - 1, node.end_lineno))
        if isinstance(node, ast.If) and module != ENTRY and "__name__" in ast.unparse(node.test):
            raise BundleError(f"{module}: library module has an `if __name__` block; it cannot be bundled")
    for node in _project_imports(tree, module)[1]:
        first = lines[node.lineno - 1]
        indent = first[:len(first) - len(first.lstrip())]
        drop.update(range(node.lineno - 1, node.end_lineno))
        replace[node.lineno - 1] = _lazy_replacement(node, included, indent)
    out = []
    for i, line in enumerate(lines):
        if i in replace:
            out += replace[i]
        if i not in drop:
            out.append(line.rstrip())
    while out and not out[0].strip():
        out.pop(0)
    while out and not out[-1].strip():
        out.pop()
    return out


def bundle_source(root: Path = REPO, extra: tuple[str, ...] = ()) -> str:
    """The readable single-file trainer (str, ends with a newline); `extra` adds modules that only
    some runs import lazily (`arch_modules(arch)`)."""
    root = Path(root)
    modules = collect_modules(root, canonical_extra(extra))
    included = set(modules)
    imports = _Imports()
    owners: dict[str, str] = {}
    optional: set[str] = set()  # names only ever bound as optional imports
    parts: list[tuple[str, list[str]]] = []
    entry_doc = ""
    for module in modules + [ENTRY]:
        path = root / ENTRY if module == ENTRY else _module_path(root, module)
        text, tree = _parse(path)
        for name, is_optional in _defined_names(tree):
            if name in owners and owners[name] != module and not (is_optional and name in optional):
                raise BundleError(f"top-level name {name!r} is defined in both {owners[name]} and {module}; "
                                  f"rename one (docs/DESIGN.md: top-level names are unique)")
            if name not in owners:
                owners[name] = module
                if is_optional:
                    optional.add(name)
            elif not is_optional:
                optional.discard(name)
        if module == ENTRY:
            entry_doc = ast.get_docstring(tree, clean=False) or ""
        parts.append((module, _module_body(module, text, tree, included, imports, keep_docstring=False)))
    for name, what in imports.bound.items():
        if name in owners:
            raise BundleError(f"top-level name {name!r} of {owners[name]} shadows the import of {what}")
    out = ['"""' + entry_doc + '"""' if entry_doc else '"""Parameter golf trainer (bundled)."""']
    out += [f"# Bundled by `python -m records bundle` from train_gpt.py and {len(modules)} modules: "
            + ", ".join(modules) + ".",
            "# Edit the package checkout, not this file.",
            "from __future__ import annotations", ""]
    out += imports.lines()
    for module, body in parts:
        label = ENTRY if module == ENTRY else module.replace(".", "/") + ".py"
        out += ["", f"# {'=' * 30} {label} {'=' * max(3, 60 - len(label))}", ""] + body + [""]
    while out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n"


# The compressed bytes travel as text in one string literal. Base85 spends 8/log2(85) = 1.248
# characters per byte; a digit string over every ASCII character a one-line string literal can hold
# raw (1..127 without LF, CR, the quote and the backslash: 123 of them) spends 8/log2(123) = 1.152,
# which saves about 3 kB on a default run's 30 kB blob. Pure ASCII, so the file is still UTF-8 and
# its UTF-8 length (what the challenge counts) is its byte length; no line breaks in the digits.
# Digits are the big-endian base-123 expansion of the integer 0x01 || blob (the 0x01 keeps leading
# zero bytes); the stub rebuilds the integer one digit at a time (a few hundred ms, once per run).
_TEXT_EXCLUDED = (10, 13, 34, 92)
TEXT_RADIX = 127 - len(_TEXT_EXCLUDED)
_TEXT_ALPHABET = bytes(c for c in range(1, 128) if c not in _TEXT_EXCLUDED)


def text_encode(blob: bytes) -> str:
    """`blob` as base-123 ASCII digits (see above); `text_decode` inverts it."""
    n = int.from_bytes(b"\x01" + blob, "big")
    digits = bytearray()
    chunk, width = TEXT_RADIX ** 64, 64  # peel 64 digits per big division: linear in practice
    while n:
        n, low = divmod(n, chunk)
        part = bytearray()
        for _ in range(width):
            low, d = divmod(low, TEXT_RADIX)
            part.append(_TEXT_ALPHABET[d])
        digits += part
    while digits and digits[-1] == _TEXT_ALPHABET[0]:  # drop the leading zero digits of the top chunk
        digits.pop()
    return bytes(reversed(digits)).decode("ascii")


def text_decode(text: str) -> bytes:
    """The reference decoder (the stub inlines the same loop)."""
    n = 0
    for c in text.encode("ascii"):
        n = n * TEXT_RADIX + c - 1 - sum(c > x for x in _TEXT_EXCLUDED)
    return n.to_bytes((n.bit_length() + 7) // 8, "big")[1:]


def pack_source(source: str, method: str = "auto") -> str:
    """A self-extracting stub that execs `source` (lzma: raw LZMA2 stream; brotli: quality 11; auto:
    whichever stub is smaller, lzma on a tie or where brotli is not installed; brotli is in the
    requirements, so the two sides of a record, the run and `records new`, both have it), carried as
    base-123 ASCII text (`text_encode`). A source with Triton kernels (`triton.jit` compiles a kernel
    from its source text, read with `inspect`) also puts its text in `linecache` under the stub's
    name; a default run's source has none."""
    if method == "auto":
        try:
            import brotli  # noqa: F401
        except ImportError:
            return pack_source(source, "lzma")
        stubs = [pack_source(source, m) for m in ("lzma", "brotli")]
        return min(stubs, key=lambda stub: len(stub.encode("utf-8")))
    data = source.encode("utf-8")
    if method == "lzma":
        blob = lzma.compress(data, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}])
        head = "import lzma as _z\n"
        call = '_z.decompress(_d,format=_z.FORMAT_RAW,filters=[{"id":_z.FILTER_LZMA2}])'
    elif method == "brotli":
        import brotli

        blob = brotli.compress(data, quality=11)
        head = "import brotli as _z\n"
        call = "_z.decompress(_d)"
    else:
        raise BundleError(f"unknown pack method {method!r}; choose auto, lzma or brotli")
    skips = "".join(f"-(_c>{x})" for x in _TEXT_EXCLUDED)
    decode = (f"_n=0\nfor _c in _s.encode():_n=_n*{TEXT_RADIX}+_c-1{skips}\n"
              "_d=_n.to_bytes(_n.bit_length()+7>>3,'big')[1:]\n")
    text = f'{head}_s="{text_encode(blob)}"\n{decode}'
    if "triton.jit" in source:  # @triton.jit reads its kernel's source (inspect): serve the lean text
        return (f"{text}import linecache as _l\n_c={call}.decode();_l.cache[__file__]=(0,None,_c.splitlines(1),__file__);"
                f'exec(compile(_c,__file__,"exec"))\n')
    return f'{text}exec(compile({call},__file__,"exec"))\n'


def counted_stub(root: Path = REPO, extra: tuple[str, ...] = (), pack: str = "auto") -> str:
    """The counted train_gpt.py of a run that imported the `extra` modules lazily: the lean source of
    `bundle_source(root, extra)` in a self-extracting stub, what `write_bundle` writes (and
    train_gpt.counted_code_bytes builds the same way)."""
    return pack_source(lean_source(bundle_source(root, extra)), pack)


def write_bundle(out_dir: Path, pack: str = "auto", root: Path = REPO, arch: str = "hybrid",
                 extra: tuple[str, ...] = ()) -> dict:
    """Write out_dir/train_gpt.py and, when packed, the readable bundle beside it as
    out_dir/train_gpt_readable.py, holding what an `arch` run imports plus the `extra` modules
    (`run_modules`). Packed (auto | lzma | brotli), train_gpt.py is the stub of the lean source
    (`counted_stub`, the file a record counts); pack='none' writes the readable bundle itself as
    train_gpt.py. Returns sizes and line counts."""
    extra = canonical_extra(arch_modules(arch) + tuple(extra))
    if pack not in PACKERS:
        raise BundleError(f"unknown --pack {pack!r}; choose one of {PACKERS}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = bundle_source(root, extra)
    compile(source, ENTRY, "exec")  # a syntax error here is a bundler bug: fail before writing
    readable = out_dir / (ENTRY if pack == "none" else READABLE_NAME)
    readable.write_text(source, encoding="utf-8")
    info = {"readable": str(readable), "readable_lines": source.count("\n"),
            "readable_bytes": len(source.encode("utf-8")), "modules": collect_modules(root, extra)}
    if pack != "none":
        lean = lean_source(source)
        packed = pack_source(lean, pack)
        (out_dir / ENTRY).write_text(packed, encoding="utf-8")
        info.update(packed=str(out_dir / ENTRY), packed_bytes=len(packed.encode("utf-8")),
                    packed_lines=packed.count("\n"), lean_bytes=len(lean.encode("utf-8")),
                    lean_lines=lean.count("\n"), packer=packed.split()[1])
    return info
