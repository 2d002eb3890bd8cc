"""The floor of a run's counted code: what the stub would weigh if it held only the statements the run
executed (issue 10's 30,000-byte target, docs/PERF.md "How small can the counted code get?").

  pip install coverage
  PRESET=smoke ITERATIONS=6 WARMDOWN_ITERS=2 VAL_LOSS_EVERY=0 VAL_MAX_TOKENS=8192 \\
      python -m coverage run --data-file=/tmp/cov.data train_gpt.py
  python -m bench.code_floor /tmp/cov.data --modules hybrid.presets,quant.fit,quant.gptq

The trace gives, per project file, the statements that never ran. `strip_unexecuted` rewrites each
file without them (a body left empty becomes `pass`), into a copy of the repository; the copy is
bundled, made lean and packed exactly as a record's train_gpt.py is (records/bundle.py). Two floors
are printed: every unexecuted statement dropped (a stub specialised to this one run, which could not
even say why a bad setting is bad), and the same keeping each unexecuted `raise` with the `if`s that
guard it (the error messages issue 13 requires); "unparsed" is the same rewrite dropping nothing,
the footing the two floors compare against. Definitions are kept even when never called (the
lean pass drops the unreachable ones). The files a short trace never reaches but a long run does
(periodic validation, checkpoints) count as unexecuted, so both figures are lower bounds.
"""
from __future__ import annotations

import argparse
import ast
import shutil
import tempfile
from pathlib import Path

from records.bundle import REPO, bundle_source, pack_source
from records.lean import lean_source

_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _has_raise(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Raise) for n in ast.walk(node))


class _Strip(ast.NodeTransformer):
    def __init__(self, missing: set[int], keep_raise: bool):
        self.missing, self.keep_raise = missing, keep_raise

    def _body(self, body: list[ast.stmt]) -> list[ast.stmt]:
        out = []
        for st in body:
            if st.lineno in self.missing and not isinstance(st, _DEFS):
                if not (self.keep_raise and _has_raise(st)):
                    continue
                if not isinstance(st, (ast.Raise, ast.If)):  # a try/with/loop around a raise: keep whole
                    out.append(st)
                    continue
            self.visit(st)
            out.append(st)
        return out

    def generic_visit(self, node: ast.AST) -> ast.AST:
        for name in ("body", "orelse", "finalbody"):
            block = getattr(node, name, None)
            if isinstance(block, list) and block and isinstance(block[0], ast.stmt):
                setattr(node, name, self._body(block) or ([ast.Pass()] if name == "body" else []))
        for handler in getattr(node, "handlers", []):
            handler.body = self._body(handler.body) or [ast.Pass()]
        return node


def strip_unexecuted(source: str, missing: set[int], keep_raise: bool = False) -> str:
    """`source` without the statements on the `missing` lines (line numbers of `source`)."""
    tree = _Strip(set(missing), keep_raise).visit(ast.parse(source))
    return ast.unparse(ast.fix_missing_locations(tree)) + "\n"


def stub_bytes(root: Path, modules: tuple[str, ...]) -> tuple[int, int]:
    """(lean bytes, counted stub bytes) of the bundle of `root` with the lazily imported `modules`."""
    lean = lean_source(bundle_source(root, modules))
    return len(lean.encode("utf-8")), len(pack_source(lean).encode("utf-8"))


def floors(data_file: str, modules: tuple[str, ...], root: Path = REPO) -> dict[str, tuple[int, int]]:
    import coverage  # only this tool needs it: `pip install coverage`

    cov = coverage.Coverage(data_file=data_file)
    cov.load()
    root = Path(root).resolve()
    missing = {}
    for name in cov.get_data().measured_files():
        path = Path(name).resolve()
        if root in path.parents and path.relative_to(root).parts[0] in ("train_gpt.py", "hybrid", "quant", "data"):
            missing[path.relative_to(root)] = set(cov.analysis2(name)[3])
    out = {"current": stub_bytes(root, modules)}
    # "unparsed" drops nothing but goes through ast.unparse like the others (quotes and layout change)
    for label, keep, drop in (("unparsed", True, False), ("executed_plus_raises", True, True),
                              ("executed_only", False, True)):
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "repo"
            shutil.copytree(root, copy, ignore=shutil.ignore_patterns(".git", "runs", "logs", "checkpoints",
                                                                      "datasets", "tokenizers", "__pycache__"))
            for rel, lines in missing.items():
                (copy / rel).write_text(strip_unexecuted((root / rel).read_text(encoding="utf-8"),
                                                         lines if drop else set(), keep),
                                        encoding="utf-8")
            out[label] = stub_bytes(copy, modules)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data_file", help="coverage data of one run (python -m coverage run --data-file=...)")
    ap.add_argument("--modules", default="", help="the run's lazily imported modules (its log's code_modules:)")
    a = ap.parse_args(argv)
    modules = tuple(sorted(m for m in a.modules.split(",") if m))
    for label, (lean, stub) in floors(a.data_file, modules).items():
        print(f"code_floor {label}: lean_bytes:{lean} counted_bytes:{stub}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
