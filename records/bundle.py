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
`pack_source` into a 3-line stub that base85-decodes and decompresses it
(lzma or brotli, whichever is smaller) and execs it in its own module namespace with `__file__`
left as the stub's path, so `ROOT = Path(__file__).resolve().parent` still is the record folder.
The readable bundle is written beside it, unchanged, as `train_gpt_readable.py`. A run from the
repository logs the size of exactly this stub as code_bytes (train_gpt.counted_code_bytes), and
`records new` ships it. Output is deterministic: the lean source keeps the readable source's own
token text (no `ast.unparse`), so it does not depend on the Python version.
"""
from __future__ import annotations

import ast
import base64
import bisect
import io
import itertools
import keyword
import lzma
import re
import string
import sys
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("hybrid", "quant", "data")
ENTRY = "train_gpt.py"
READABLE_NAME = "train_gpt_readable.py"
LINE_LIMIT = 1500  # the challenge's readability limit for train_gpt.py
PACKERS = ("auto", "lzma", "brotli", "none")  # auto: the smaller of lzma and brotli
# Modules a default (hybrid) run never imports but another --arch does lazily; `--arch` adds them.
ARCH_MODULES: dict[str, tuple[str, ...]] = {
    "hybrid": (), "gpt": (),
    "rwkv7": ("hybrid.rwkv7", "hybrid.wkv7", "hybrid.wkv7_triton"),
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
    stored bit-packed ints, the stateful evaluation's when it evaluated that way, the checkpoint
    code's when it wrote checkpoints or resumed, the presets' when it named one."""
    extra = list(arch_modules(str(hparams.get("arch", "hybrid"))))
    if int(hparams.get("gptq", 0) or 0):
        extra.append("quant.gptq")
    if str(hparams.get("mlp_fused", "off")) in ("auto", "triton"):
        extra.append("hybrid.fused_mlp")
    if int(hparams.get("bitpack", 0) or 0):
        extra.append("quant.bitpack")
    if str(hparams.get("eval_mode", "sliding")) == "stateful":
        extra.append("hybrid.stateful")
    if hparams.get("preset"):
        extra.append("hybrid.presets")
    if int(hparams.get("checkpoint_every", 0) or 0) > 0 or hparams.get("resume"):
        extra.append("hybrid.checkpoint")
    if int(hparams.get("fit_budget", 0) or 0) and (REPO / "quant" / "fit.py").is_file():
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


# ---------------------------------------------------------------------------------------------
# The counted file: the lean source of the readable bundle, packed into a self-extracting stub
# ---------------------------------------------------------------------------------------------

# Calls a top-level assignment may make and still be dropped when nothing reads its name.
_PURE_CALLS = frozenset({"dict", "tuple", "list", "set", "frozenset", "range", "sorted", "int", "float", "str",
                         "bool", "len"})
# Decorators that only wrap the definition (anything else may register it somewhere: it stays).
_PURE_DECORATORS = frozenset({"dataclass", "dataclasses.dataclass", "contextmanager", "contextlib.contextmanager",
                              "torch.no_grad", "torch.inference_mode", "torch.compile", "staticmethod",
                              "classmethod", "property", "functools.cache", "functools.lru_cache", "lru_cache",
                              "cache", "functools.wraps"})
_STRING_TYPES = {tokenize.STRING}
_FSTRING_START = getattr(tokenize, "FSTRING_START", None)  # Python >= 3.12 splits f-strings into tokens
_FSTRING_END = getattr(tokenize, "FSTRING_END", None)


def _split_string(token: str) -> tuple[str, str, str] | None:
    """(lower-case prefix, quote, body) of a one-line, single-quoted string literal; None otherwise."""
    k = 0
    while token[k] not in "'\"":
        k += 1
    prefix, quote = token[:k].lower(), token[k]
    if token[k:k + 3] == quote * 3 or "\n" in token:
        return None
    return prefix, quote, token[k + 1:-1]


def _join_strings(a: str, b: str) -> str | None:
    """One literal for the implicitly concatenated literals `a b` when both have the same prefix and
    quote (the value is the same), else None."""
    sa, sb = _split_string(a), _split_string(b)
    if sa is None or sb is None or sa[:2] != sb[:2]:
        return None
    return a[:-1] + sb[2] + sa[1]


def _is_fstring(token: str) -> bool:
    k = 0
    while token[k] not in "'\"":
        k += 1
    return "f" in token[:k].lower()


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")


def _is_docstring(node: ast.AST) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def _names_used(nodes) -> set[str]:
    """Every name a node mentions (any context, `global`/`nonlocal` included) plus every string constant
    that is an identifier (a name looked up by string: getattr, registries)."""
    used: set[str] = set()
    for node in nodes:
        for n in ast.walk(node):
            if isinstance(n, ast.Name):
                used.add(n.id)
            elif isinstance(n, (ast.Global, ast.Nonlocal)):
                used.update(n.names)
            elif isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.isidentifier():
                used.add(n.value)
    return used


def _dotted(node: ast.expr) -> str:
    """`a.b.c` for a Name or an Attribute chain on a Name, else ""."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else ""


def _pure_decorator(node: ast.expr) -> bool:
    """A decorator that only wraps what it decorates (a registering one, such as a custom op's
    `register_fake`, is a side effect: its definition always stays)."""
    return _dotted(node.func if isinstance(node, ast.Call) else node) in _PURE_DECORATORS


def _droppable_names(node: ast.stmt) -> set[str] | None:
    """The names a top-level statement defines if dropping it (when nothing uses them) has no other
    effect: a def or a class whose decorators only wrap it, or an assignment to plain names of a value
    that calls nothing but `_PURE_CALLS`. None: the statement always stays (it runs code, or binds
    in another way)."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        if not all(_pure_decorator(d) for d in node.decorator_list):
            return None
        if isinstance(node, ast.ClassDef) and node.keywords:  # metaclass=...: may register the class
            return None
        return {node.name}
    if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        if not all(isinstance(t, ast.Name) for t in targets):
            return None
        calls = [c for c in ast.walk(node.value) if isinstance(c, ast.Call)]
        if all(isinstance(c.func, ast.Name) and c.func.id in _PURE_CALLS for c in calls):
            return {t.id for t in targets}
    return None


def _reachable(body: list[ast.stmt]) -> set[int]:
    """Indices of the top-level statements the script reaches: every statement that runs code (the
    `if __name__` block, module-level calls, imports) and, transitively, the definitions of every
    name a reached statement mentions."""
    defines: dict[str, list[int]] = {}
    keep: set[int] = set()
    todo: list[str] = []
    for i, node in enumerate(body):
        names = _droppable_names(node)
        if names is None:
            keep.add(i)
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                todo += _names_used([node])
        else:
            for name in names:
                defines.setdefault(name, []).append(i)
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for i in defines.get(name, ()):
            if i not in keep:
                keep.add(i)
                todo += _names_used([body[i]])
    return keep


_JUMPS = (ast.Raise, ast.Return, ast.Break, ast.Continue)
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)
_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


def _blocks(func: ast.AST):
    """Every statement list of a function's own body (not those of the functions inside it)."""
    todo = [func]
    while todo:
        node = todo.pop()
        for attr in ("body", "orelse", "finalbody", "handlers", "cases"):
            stmts = getattr(node, attr, None)
            if isinstance(stmts, list) and stmts and isinstance(stmts[0], ast.stmt):
                yield stmts
            if isinstance(stmts, list):
                todo += [s for s in stmts if not isinstance(s, _SCOPES) or s is func]


def _bound(nodes) -> set[str]:
    """Names the nodes (not what is under them) bind: any binding but a function's parameters."""
    out: set[str] = set()
    for n in nodes:
        if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load):
            out.add(n.id)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(n.name)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            out.update((a.asname or a.name).split(".")[0] for a in n.names)
        elif isinstance(n, ast.ExceptHandler) and n.name:
            out.add(n.name)
        elif isinstance(n, (ast.MatchAs, ast.MatchStar)) and n.name:
            out.add(n.name)
    return out


def _dead_droppable(func: ast.AST, dead: list[ast.stmt]) -> bool:
    gone = [n for st in dead for n in ast.walk(st)]
    if any(isinstance(n, (ast.Yield, ast.YieldFrom, ast.Await, ast.Global, ast.Nonlocal)) for n in gone):
        return False
    gone_ids = {id(n) for n in gone}
    live = [n for n in ast.walk(func) if id(n) not in gone_ids and n is not func]
    a = func.args
    params = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg] if x is not None}
    mentioned = {n.id for n in live if isinstance(n, ast.Name)}
    return not ((_bound(gone) & mentioned) - params - _bound(live))


class _LocalNames:
    """Short names for the local variables of the module's functions: a name that only plain
    assignments (`x = ...`, loop and `with` targets, comprehension variables) bind, in a function
    or a scope inside it, and that every mention of within the function means such a binding, gets
    a name that nothing in the function mentions. Parameters (callers may pass them by keyword),
    imports, nested definitions, `except ... as` names, `global`/`nonlocal` names and names inside
    f-strings keep theirs; a function that calls locals(), vars(), eval() or exec(), or holds a class
    or a `match`, keeps all of its names."""

    def __init__(self, tree: ast.Module, fstrings: list[tuple[tuple[int, int], str]],
                 global_names: dict[str, str] | None = None):
        self.tree = tree
        self.fstrings = fstrings  # (start, text) of every f-string literal, in source order
        self.global_names = global_names or {}  # the module's renamed top-level names (no scope rebinds them)
        self.ranges: list[tuple[tuple[int, int], tuple[int, int], dict[str, str]]] = []  # per function

    def renames(self, lean: _Lean) -> dict[tuple[int, int], str]:
        """{NAME token start: new name}; renames the Name nodes of the tree too, and keeps each
        function's {old: new} for the f-strings inside it (`fstring`)."""
        out: dict[tuple[int, int], str] = {}
        starts = [f[0] for f in self.fstrings]
        for func in self._units(self.tree):
            start, end = lean.start(func), lean.end(func)
            texts = [t for _, t in self.fstrings[bisect.bisect_left(starts, start):bisect.bisect_left(starts, end)]]
            mapping: dict[str, str] = {}
            for node, new in self._unit(func, texts):
                out[lean.pos(node.lineno, node.col_offset)] = new
                mapping[node.id] = new
                node.id = new
            if mapping:
                self.ranges.append((start, end, mapping))
        self.ranges.sort(key=lambda r: r[0])
        return out

    def fstring(self, start: tuple[int, int], text: str) -> str:
        """The f-string literal at `start` with the renamed names of its function and module."""
        i = bisect.bisect_right(self.ranges, (start, (sys.maxsize, 0))) - 1
        local = self.ranges[i][2] if i >= 0 and self.ranges[i][0] <= start < self.ranges[i][1] else {}
        mapping = {**self.global_names, **local}
        return _rename_fstring(text, mapping) if mapping else text

    def _units(self, node: ast.AST):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield child
            else:
                yield from self._units(child)

    def _unit(self, func: ast.AST, fstrings: list[str]) -> list[tuple[ast.Name, str]]:
        nodes = list(ast.walk(func))
        if any(isinstance(n, (ast.ClassDef, ast.Match)) for n in nodes) or any(
                isinstance(n, ast.Name) and n.id in ("locals", "vars", "eval", "exec") for n in nodes):
            return []
        keep: set[str] = set()  # names that are not renamed
        mentioned: set[str] = set()
        for n in nodes:
            if isinstance(n, ast.arg):
                keep.add(n.arg)
            elif isinstance(n, (ast.Global, ast.Nonlocal)):
                keep.update(n.names)
            elif isinstance(n, ast.NamedExpr):
                keep.add(n.target.id)
            elif isinstance(n, ast.Name):
                mentioned.add(n.id)
        keep |= _bound(n for n in nodes if not isinstance(n, ast.Name))  # imports, defs, `except ... as`
        for text in fstrings:  # `f"{x=}"` prints the name itself; a field this cannot parse: keep its names
            keep |= _fstring_names(text)[1]
        # every mention must resolve to a binding inside the function, not to a global
        uses: dict[str, list[ast.Name]] = {}
        self._resolve(func, [], uses, keep)
        counts = sorted(((len(v), k) for k, v in uses.items() if k not in keep), key=lambda c: (-c[0], c[1]))
        taken = mentioned | keep
        fresh = _fresh_names(taken)
        out = []
        for _, name in counts:
            new = next(fresh)
            if len(new) >= len(name):
                continue
            out += [(n, new) for n in uses[name]]
        return out

    def _resolve(self, node: ast.AST, scopes: list[set[str]], uses: dict, keep: set[str]) -> None:
        """Walk `node` with the stack of the name sets its enclosing scopes bind; a Name that no
        enclosing scope (within the function) binds is a global: its name is kept."""
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inner = [node.body] if isinstance(node, ast.Lambda) else node.body
            for d in getattr(node, "decorator_list", ()):
                self._resolve(d, scopes, uses, keep)
            binds = {n.id for s in inner for n in _walk_scope(s) if isinstance(n, ast.Name)
                     and not isinstance(n.ctx, ast.Load)}
            a = node.args
            binds |= {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg] if x is not None}
            for d in a.defaults + [d for d in a.kw_defaults if d is not None]:
                self._resolve(d, scopes, uses, keep)
            for s in inner:
                self._resolve(s, scopes + [binds], uses, keep)
            return
        if isinstance(node, _COMPREHENSIONS):
            gens = node.generators
            binds = {n.id for g in gens for n in ast.walk(g.target) if isinstance(n, ast.Name)}
            self._resolve(gens[0].iter, scopes, uses, keep)  # evaluated in the enclosing scope
            inner = scopes + [binds]
            for g in gens:
                self._resolve(g.target, inner, uses, keep)
                if g is not gens[0]:
                    self._resolve(g.iter, inner, uses, keep)
                for cond in g.ifs:
                    self._resolve(cond, inner, uses, keep)
            for part in ((node.key, node.value) if isinstance(node, ast.DictComp) else (node.elt,)):
                self._resolve(part, inner, uses, keep)
            return
        if isinstance(node, ast.Name):
            if any(node.id in b for b in scopes):
                uses.setdefault(node.id, []).append(node)
            else:
                keep.add(node.id)
            return
        for child in ast.iter_child_nodes(node):
            self._resolve(child, scopes, uses, keep)


def _fstring_fields(text: str) -> list[tuple[int, int, bool]]:
    """(start, end, self-documenting) of the expression of every replacement field of the f-string
    literal `text` (fields nested in format specs included), in order; [] if it is no f-string."""
    k = 0
    while text[k] not in "'\"":
        k += 1
    prefix = text[:k].lower()
    if "f" not in prefix:
        return []
    quote = text[k] * 3 if text[k:k + 3] == text[k] * 3 and len(text) >= k + 6 else text[k]
    raw = "r" in prefix
    out: list[tuple[int, int, bool]] = []

    def skip_string(j: int) -> int:  # j at a quote inside an expression: the index after the string
        q = text[j] * 3 if text[j:j + 3] == text[j] * 3 else text[j]
        j += len(q)
        while text[j:j + len(q)] != q:
            j += 2 if text[j] == "\\" else 1
        return j + len(q)

    def literal(j: int, stop: str) -> int:  # text up to `stop` (the closing quote or "}"), fields parsed
        while not text.startswith(stop, j):
            if text[j:j + 2] in ("{{", "}}"):
                j += 2
            elif text[j] == "\\" and not raw:
                j = text.index("}", j) + 1 if text[j + 1:j + 3] == "N{" else j + 2
            elif text[j] == "{":
                j = field(j + 1)
            else:
                j += 1
        return j

    def field(j: int) -> int:  # j after "{": the index after the field's "}"
        start, depth = j, 0
        while True:
            c = text[j]
            if c in "'\"":
                j = skip_string(j)
                continue
            if c in "([{":
                depth += 1
            elif c in ")]}":
                if depth == 0:
                    break
                depth -= 1
            elif depth == 0 and c in "!:" and text[j + 1] != "=":
                break
            elif c in "=!<>" and text[j + 1] == "=":
                j += 1
            j += 1
        expr = text[start:j].rstrip()
        debug = expr.endswith("=") and not expr.endswith(("==", "!=", "<=", ">="))
        out.append((start, start + len(expr) - (1 if debug else 0), debug))
        if text[j] == "!":
            j += 2
        if text[j] == ":":
            j = literal(j + 1, "}")
        return j + 1

    literal(k + len(quote), quote)
    return out


def _expr_names(expr: str) -> list[tuple[int, int, str]] | None:
    """(start, end, name) of every Name in the expression text; None if it does not parse alone or
    holds an f-string (whose positions older Pythons report unreliably)."""
    try:
        tree = ast.parse("(" + expr + ")", mode="eval")
    except SyntaxError:
        return None
    if any(isinstance(n, ast.JoinedStr) for n in ast.walk(tree)):
        return None
    lines = ("(" + expr + ")").split("\n")
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line) + 1)
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Name):
            col = len(lines[n.lineno - 1].encode("utf-8")[:n.col_offset].decode("utf-8"))
            at = starts[n.lineno - 1] + col - 1
            out.append((at, at + len(n.id), n.id))
    return sorted(out)


def _fstring_names(text: str) -> tuple[set[str], set[str]]:
    """(names the f-string's fields mention, those of them that must keep their name: the fields
    that print their own text, `f"{x=}"`, and fields `_expr_names` cannot read)."""
    names: set[str] = set()
    fixed: set[str] = set()
    try:
        fields = _fstring_fields(text)
    except (IndexError, ValueError):  # a spelling this reader does not know: every word in it stays
        return set(), set(_IDENTIFIER.findall(text))
    for start, end, debug in fields:
        found = _expr_names(text[start:end])
        if found is None:  # unreadable: every identifier-like word in it stays
            fixed.update(w for w in _IDENTIFIER.findall(text[start:end]))
            continue
        names.update(n for _, _, n in found)
        if debug:
            fixed.update(n for _, _, n in found)
    return names, fixed


def _rename_fstring(text: str, mapping: dict[str, str]) -> str:
    parts, last = [], 0
    try:
        fields = _fstring_fields(text)
    except (IndexError, ValueError):  # `_fstring_names` kept every name in it
        return text
    for start, end, _ in fields:
        for a, b, name in _expr_names(text[start:end]) or ():
            if name in mapping:
                parts += [text[last:start + a], mapping[name]]
                last = start + b
    return "".join(parts) + text[last:]


def _walk_scope(node: ast.AST):
    """ast.walk that does not enter nested scopes (functions, lambdas, classes, comprehensions)."""
    todo = [node]
    while todo:
        n = todo.pop()
        yield n
        for child in ast.iter_child_nodes(n):
            if isinstance(child, _SCOPES + _COMPREHENSIONS):
                if isinstance(child, _COMPREHENSIONS):
                    todo.append(child.generators[0].iter)
                elif not isinstance(child, ast.Lambda):
                    todo += child.decorator_list
                continue
            todo.append(child)


def _fresh_names(taken: set[str]):
    """a, b, ..., Z, aa, ab, ...: identifiers that are not in `taken` and not keywords (a builtin the
    function does not mention may be shadowed: nothing in it looks that name up)."""
    letters = string.ascii_lowercase + string.ascii_uppercase
    for size in itertools.count(1):
        for combo in itertools.product(letters, repeat=size):
            name = "".join(combo)
            if name not in taken and not keyword.iskeyword(name):
                yield name


class _Lean:
    """Edits of the readable source, each made twice: as a text edit (range of the source -> text or
    nothing) and on the syntax tree, so the result can be checked against the tree."""

    def __init__(self, source: str, rename: bool = True):
        self.source = source
        self.rename = rename
        self.lines = source.split("\n")
        self.tree = ast.parse(source)
        self.edits: list[tuple[tuple[int, int], tuple[int, int], str | None]] = []
        self.tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
        self.token_starts = [t.start for t in self.tokens]
        self.renames: dict[tuple[int, int], str] = {}  # NAME token start -> its new name
        self.import_ranges: dict[int, tuple[tuple[int, int], tuple[int, int]]] = {}  # id(import node) -> range

    # positions: (row, column in characters); the syntax tree counts columns in UTF-8 bytes
    def pos(self, row: int, byte_col: int) -> tuple[int, int]:
        return row, len(self.lines[row - 1].encode("utf-8")[:byte_col].decode("utf-8"))

    def start(self, node: ast.AST) -> tuple[int, int]:
        first = node.decorator_list[0] if getattr(node, "decorator_list", None) else node
        return self.pos(first.lineno, first.col_offset - (1 if first is not node else 0))

    def end(self, node: ast.AST) -> tuple[int, int]:
        return self.pos(node.end_lineno, node.end_col_offset)

    def drop(self, start, end, text: str | None = None) -> None:
        self.edits.append((start, end, text))

    def drop_annotation(self, after: tuple[int, int], annotation: ast.AST) -> None:
        """Drop `: ann` / `-> ann`: from the first token at or after `after` to the annotation's end."""
        self.drop(after, self.end(annotation))

    def body(self, owner: ast.AST, attr: str, docstring: bool) -> None:
        """Drop a body's docstring (docstring=True) and its `pass` statements that have company; an
        emptied body becomes `pass`."""
        stmts = getattr(owner, attr)
        gone = [s for i, s in enumerate(stmts) if (docstring and i == 0 and _is_docstring(s))]
        rest = [s for s in stmts if s not in gone]
        if len(rest) > 1:
            gone += [s for s in rest if isinstance(s, ast.Pass)]
        rest = [s for s in stmts if s not in gone]
        for j, s in enumerate(gone):
            self.drop(self.start(s), self.end(s), "pass" if not rest and j == 0 else None)
        setattr(owner, attr, rest or [ast.Pass()])

    def run(self) -> str:
        tree = self.tree
        self.drop_help(tree)
        self.drop_dead(tree)  # first: a definition that only dead code names is unreached
        keep = _reachable(tree.body)
        for i, node in enumerate(tree.body):
            if i not in keep:
                start, end = self.start(node), self.end(node)
                self.edits = [e for e in self.edits if not (start <= e[0] and e[1] <= end)]
                self.drop(start, end)
        tree.body = [n for i, n in enumerate(tree.body) if i in keep]
        used = _names_used(n for n in tree.body if not isinstance(n, (ast.Import, ast.ImportFrom)))
        new_body = []
        for node in tree.body:
            new_body.append(self.prune_import(node, used) if isinstance(node, (ast.Import, ast.ImportFrom)) else node)
        tree.body = [n for n in new_body if n is not None]
        self.strip(tree, in_class=False)
        if "__doc__" not in used:
            self.body(tree, "body", docstring=True)
        fstrings = self.fstring_literals() if self.rename else []
        global_names = self.rename_globals(tree, fstrings) if self.rename else {}
        self.local_names = _LocalNames(tree, fstrings, global_names)
        if self.rename:
            self.renames.update(self.local_names.renames(self))
        return self.emit()

    def rename_globals(self, tree: ast.Module, fstrings: list[tuple[tuple[int, int], str]]) -> dict[str, str]:
        """Short names for the module's own top-level functions, constants and imports that nothing
        rebinds in an inner scope and nothing looks up by string; classes (their names are in reprs and
        error messages), dunders, optional imports (bound in a `try`), `__future__` imports and
        functions with a registering decorator keep theirs. Returns {old: new}; renames the tree and
        records the token renames (imports are respelled `import x as new`)."""
        module_level = []  # the nodes that run in the module's own scope (a definition: its name only)
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                module_level.append(node)
            elif not isinstance(node, ast.Try):
                module_level += _walk_scope(node)
        top = _bound(module_level)
        top_ids = {id(n) for n in module_level}
        inner: set[str] = set()
        strings: set[str] = set()
        everything: set[str] = set()
        fixed: set[str] = set()
        for n in ast.walk(tree):
            if isinstance(n, ast.arg):
                inner.add(n.arg)
                everything.add(n.arg)
            elif isinstance(n, (ast.Global, ast.Nonlocal)):
                fixed.update(n.names)
            elif isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.isidentifier():
                strings.add(n.value)
            elif isinstance(n, ast.Name):
                everything.add(n.id)
            names = _bound([n])
            everything |= names
            if names and id(n) not in top_ids:
                inner |= names
        for node in tree.body:
            if isinstance(node, ast.Try) or (isinstance(node, ast.ImportFrom) and node.module == "__future__"):
                fixed |= _bound(ast.walk(node))
            elif isinstance(node, ast.ClassDef) or (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                                                    and not all(_pure_decorator(d) for d in node.decorator_list)):
                fixed.add(node.name)  # a class's name is in its repr and in messages
        for _, text in fstrings:
            fixed |= _fstring_names(text)[1]
        counts: dict[str, int] = {}
        for n in ast.walk(tree):
            if isinstance(n, ast.Name):
                counts[n.id] = counts.get(n.id, 0) + 1
        names = sorted((n for n in top - inner - strings - fixed if not n.startswith("__")),
                       key=lambda n: (-counts.get(n, 0), n))
        fresh = _fresh_names(everything)
        mapping = {}
        for name in names:
            new = next(fresh)
            if len(new) < len(name):
                mapping[name] = new
        if not mapping:
            return mapping
        for n in ast.walk(tree):
            if isinstance(n, ast.Name) and n.id in mapping:
                self.renames[self.pos(n.lineno, n.col_offset)] = mapping[n.id]
                n.id = mapping[n.id]
            elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name in mapping:
                at = self.pos(n.lineno, n.col_offset)
                i = bisect.bisect_left(self.token_starts, at)
                while self.tokens[i].string not in ("def", "class"):
                    i += 1
                self.renames[self.tokens[i + 1].start] = mapping[n.name]
                n.name = mapping[n.name]
        for k, node in enumerate(tree.body):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and any(
                    (a.asname or a.name.split(".")[0]) in mapping for a in node.names):
                for a in node.names:
                    bound = a.asname or a.name.split(".")[0]
                    if bound in mapping:
                        a.asname = mapping[bound]
                spelled = ",".join(a.name + (f" as {a.asname}" if a.asname else "") for a in node.names)
                text = f"from {node.module} import {spelled}" if isinstance(node, ast.ImportFrom) \
                    else f"import {spelled}"
                start, end = self.import_ranges[id(node)]
                self.edits = [e for e in self.edits if (e[0], e[1]) != (start, end)]
                self.drop(start, end, text)
        return mapping

    def fstring_literals(self) -> list[tuple[tuple[int, int], str]]:
        """(start, source text) of every f-string literal (one token before Python 3.12, a run of
        FSTRING_* tokens since)."""
        out, toks, i = [], self.tokens, 0
        while i < len(toks):
            tok = toks[i]
            i += 1
            if tok.type == _FSTRING_START:
                i = self.fstring_end(i)
                out.append((tok.start, self.text(tok.start, toks[i - 1].end)))
            elif tok.type == tokenize.STRING and _is_fstring(tok.string):
                out.append((tok.start, tok.string))
        return out

    def fstring_end(self, i: int) -> int:
        """The index after the FSTRING_END that closes the FSTRING_START before token `i`."""
        level = 1
        while level:
            level += {_FSTRING_START: 1, _FSTRING_END: -1}.get(self.tokens[i].type, 0)
            i += 1
        return i

    def text(self, start: tuple[int, int], end: tuple[int, int]) -> str:
        lines = self.lines[start[0] - 1:end[0]]
        if len(lines) == 1:
            return lines[0][start[1]:end[1]]
        return "\n".join([lines[0][start[1]:], *lines[1:-1], lines[-1][:end[1]]])

    def drop_help(self, tree: ast.Module) -> None:
        """`x: int = field(default=1, metadata={"help": "..."})` in a dataclass -> `x: int = 1` (the
        same field: the help text only feeds `--help`)."""
        for cls in ast.walk(tree):
            if not (isinstance(cls, ast.ClassDef) and any(
                    _dotted(d.func if isinstance(d, ast.Call) else d) in ("dataclass", "dataclasses.dataclass")
                    for d in cls.decorator_list)):
                continue
            for node in cls.body:
                call = node.value if isinstance(node, ast.AnnAssign) else None
                if not (isinstance(call, ast.Call) and _dotted(call.func) in ("field", "dataclasses.field")
                        and not call.args and sorted(k.arg or "" for k in call.keywords) == ["default", "metadata"]):
                    continue
                meta = next(k.value for k in call.keywords if k.arg == "metadata")
                if not (isinstance(meta, ast.Dict) and all(isinstance(k, ast.Constant) and k.value == "help"
                                                           for k in meta.keys)):
                    continue
                default = next(k.value for k in call.keywords if k.arg == "default")
                self.drop(self.start(call), self.start_of(default))
                self.drop(self.end(default), self.end(call))
                node.value = default

    def drop_dead(self, tree: ast.Module) -> None:
        """Statements after a `raise`, `return`, `break` or `continue` in the same block of a function
        (the bundle's `raise ImportError` for a module it leaves out makes the rest of its block
        dead), unless dropping them could change what the function means (a generator, a scope
        declaration, or the only binding of a name the function uses elsewhere)."""
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for block in _blocks(func):
                k = next((i for i, st in enumerate(block) if isinstance(st, _JUMPS)), None)
                if k is None or k == len(block) - 1:
                    continue
                dead = block[k + 1:]
                if not _dead_droppable(func, dead):
                    continue
                self.drop(self.start(dead[0]), self.end(dead[-1]))
                del block[k + 1:]

    def prune_import(self, node, used: set[str]):
        self.import_ranges[id(node)] = (self.start(node), self.end(node))
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            return node
        names = [a for a in node.names if (a.asname or a.name.split(".")[0]) in used]
        if len(names) == len(node.names):
            return node
        if not names:
            self.drop(self.start(node), self.end(node))
            return None
        spelled = ",".join(a.name + (f" as {a.asname}" if a.asname else "") for a in names)
        text = f"from {node.module} import {spelled}" if isinstance(node, ast.ImportFrom) else f"import {spelled}"
        self.drop(self.start(node), self.end(node), text)
        pruned = ast.parse(text).body[0]
        self.import_ranges[id(pruned)] = self.import_ranges[id(node)]
        return pruned

    def strip(self, node: ast.AST, in_class: bool) -> None:
        """Docstrings and annotations of everything under `node` (class-level annotated fields stay:
        dataclasses and NamedTuples are made of them, and so do the parameter annotations of functions
        with a registering decorator: a Triton kernel's `N: tl.constexpr` is part of its code)."""
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = child.args
                compiled = not all(_pure_decorator(d) for d in child.decorator_list)  # @triton.jit: reads them
                for arg in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg]:
                    if arg is not None and arg.annotation is not None and not compiled:
                        self.drop_annotation(self.pos(arg.lineno, arg.col_offset + len(arg.arg.encode("utf-8"))),
                                             arg.annotation)
                        arg.annotation = None
                if child.returns is not None:
                    arrow = self.token_before(self.start_of(child.returns), "->")
                    self.drop_annotation(arrow, child.returns)
                    child.returns = None
                self.strip(child, in_class=False)
                self.body(child, "body", docstring=True)
            elif isinstance(child, ast.ClassDef):
                self.strip(child, in_class=True)
                self.body(child, "body", docstring=True)
            else:
                self.strip(child, in_class=in_class)
                for attr in ("body", "orelse", "finalbody"):
                    if isinstance(getattr(child, attr, None), list) and getattr(child, attr) \
                            and isinstance(getattr(child, attr)[0], ast.stmt):
                        self.body(child, attr, docstring=False)
        for attr in ("body", "orelse", "finalbody"):
            stmts = getattr(node, attr, None)
            if not isinstance(stmts, list):
                continue
            for k, s in enumerate(stmts):
                if isinstance(s, ast.AnnAssign) and s.value is not None and not in_class:
                    self.drop_annotation(self.end(s.target), s.annotation)
                    stmts[k] = ast.Assign(targets=[s.target], value=s.value)

    def start_of(self, node: ast.AST) -> tuple[int, int]:
        return self.pos(node.lineno, node.col_offset)

    def token_before(self, at: tuple[int, int], text: str) -> tuple[int, int]:
        i = bisect.bisect_left(self.token_starts, at) - 1
        while i >= 0 and self.tokens[i].string != text:
            i -= 1
        if i < 0:
            raise BundleError(f"lean: no {text!r} before line {at[0]}")
        return self.tokens[i].start

    def emit(self) -> str:
        """The source without the edited ranges, comments and blank lines; one space per indent level,
        a space between tokens only where two tokens would otherwise fuse."""
        edits = sorted(self.edits)
        for (s0, e0, _), (s1, _, _) in zip(edits, edits[1:]):
            if s1 < e0:
                raise BundleError(f"lean: overlapping edits at lines {s0[0]} and {s1[0]}")
        out: list[str] = []
        line: list[str] = []
        prev: tuple[str, int] | None = None  # (text, kind): kind 1 string, 2 number, 0 other
        depth, e, i, toks = 0, 0, 0, self.tokens
        replaced: set[int] = set()
        while i < len(toks):
            tok = toks[i]
            i += 1
            if tok.type == tokenize.INDENT:
                depth += 1
                continue
            if tok.type == tokenize.DEDENT:
                depth -= 1
                continue
            if tok.type == tokenize.NEWLINE:
                if line:
                    out.append(" " * depth + "".join(line))
                line, prev = [], None
                continue
            if tok.type in (tokenize.NL, tokenize.COMMENT, tokenize.ENDMARKER, tokenize.ENCODING):
                continue
            while e < len(edits) and edits[e][1] <= tok.start:
                e += 1
            if e < len(edits) and edits[e][0] <= tok.start:
                if edits[e][2] is None or e in replaced:
                    continue
                replaced.add(e)  # a replacement's text goes where its range's first token was
                piece, kind = edits[e][2], 0
            elif tok.type == _FSTRING_START:
                i = self.fstring_end(i)
                piece, kind = self.local_names.fstring(tok.start, self.text(tok.start, toks[i - 1].end)), 1
            elif tok.type == tokenize.STRING and _is_fstring(tok.string):
                piece, kind = self.local_names.fstring(tok.start, tok.string), 1
            else:
                piece = self.renames.get(tok.start, tok.string) if tok.type == tokenize.NAME else tok.string
                kind = 1 if tok.type in _STRING_TYPES else 2 if tok.type == tokenize.NUMBER else 0
            if prev is not None and prev[1] == 1 and kind == 1:
                merged = _join_strings(prev[0], piece)
                if merged is not None:  # "a" "b" -> "ab": one literal, the same value
                    line[-1] = merged
                    prev = (merged, 1)
                    continue
            if prev is not None:
                a, b = prev[0][-1], piece[0]
                if (prev[1] == 1 and kind == 1) or (prev[1] == 2 and (b.isalnum() or b in "._")) \
                        or ((a.isalnum() or a == "_") and (b.isalnum() or b == "_")):
                    line.append(" ")
            line.append(piece)
            prev = (piece, kind)
        text = "\n".join(out) + "\n"
        got, want = ast.dump(ast.parse(text)), ast.dump(self.tree)
        if got != want:
            raise BundleError("lean: the edited source does not parse to the edited syntax tree "
                              "(a bundler bug; the readable bundle is unaffected)")
        return text


def lean_source(source: str, rename: bool = True) -> str:
    """The code of a readable bundle that a run executes, small: no docstrings, comments, blank
    lines, annotations outside class bodies (the bundle has `from __future__ import annotations`, so
    they are never evaluated), `pass` next to other statements, unused imports, top-level
    definitions nothing reaches (reference implementations, readers of other formats: see
    `_reachable`), statements after a `raise`/`return` in the same block (`_Lean.drop_dead`: the
    bundle's `raise ImportError` for a module it leaves out makes the rest of its block dead), or the
    help text of dataclass fields (`_Lean.drop_help`: a stub's `--help` lists each flag with its env
    variable and default, without the sentence; the readable bundle keeps it); one space per indent
    level. With `rename`, local variables (`_LocalNames`) and the module's own top-level names
    (`_Lean.rename_globals`) get short names; parameters, attributes, dataclass fields, exception
    classes and names looked up by string keep theirs. Every other token is the readable source's
    own text. The edits are made on the syntax tree too and the result must parse to it (BundleError
    if not)."""
    return _Lean(source, rename).run()


def pack_source(source: str, method: str = "auto") -> str:
    """A self-extracting stub that execs `source` (lzma: raw LZMA2 stream; brotli: quality 11; auto:
    whichever stub is smaller, lzma on a tie or where brotli is not installed; brotli is in the
    requirements, so the two sides of a record, the run and `records new`, both have it). A source
    with Triton kernels (`triton.jit` compiles a kernel from its source text, read with `inspect`)
    also puts its text in `linecache` under the stub's name; a default run's source has none."""
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
        head = "import lzma as _z,base64 as _b\n"
        call = '_z.decompress(_b.b85decode(_s),format=_z.FORMAT_RAW,filters=[{"id":_z.FILTER_LZMA2}])'
    elif method == "brotli":
        import brotli

        blob = brotli.compress(data, quality=11)
        head = "import brotli as _z,base64 as _b\n"
        call = "_z.decompress(_b.b85decode(_s))"
    else:
        raise BundleError(f"unknown pack method {method!r}; choose auto, lzma or brotli")
    enc = base64.b85encode(blob).decode("ascii")
    if "triton.jit" in source:  # @triton.jit reads its kernel's source (inspect): serve the lean text
        head += "import linecache as _l\n"
        return (f'{head}_s="{enc}"\n_c={call}.decode();_l.cache[__file__]=(0,None,_c.splitlines(1),__file__);'
                f'exec(compile(_c,__file__,"exec"))\n')
    return f'{head}_s="{enc}"\nexec(compile({call},__file__,"exec"))\n'


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
