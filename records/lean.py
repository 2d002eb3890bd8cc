"""The lean source: the code of a readable bundle that a run executes, made small for the counted
stub (records/bundle.py `counted_stub`). `lean_source` drops docstrings, comments, blank lines,
annotations outside class bodies, unused imports, unreachable top-level definitions and dead
statements, and the help text of dataclass fields; with `rename` it shortens local and module-level
names where that cannot change what the program does. Every other token is the readable source's
own text, and the result must parse to the edited syntax tree (LeanError otherwise)."""
from __future__ import annotations

import ast
import bisect
import io
import itertools
import keyword
import re
import string
import sys
import tokenize


class LeanError(RuntimeError):
    """The lean transform could not prove an edit safe (a bundler bug: the bundle is refused)."""

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
            raise LeanError(f"lean: no {text!r} before line {at[0]}")
        return self.tokens[i].start

    def emit(self) -> str:
        """The source without the edited ranges, comments and blank lines; one space per indent level,
        a space between tokens only where two tokens would otherwise fuse."""
        edits = sorted(self.edits)
        for (s0, e0, _), (s1, _, _) in zip(edits, edits[1:]):
            if s1 < e0:
                raise LeanError(f"lean: overlapping edits at lines {s0[0]} and {s1[0]}")
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
            raise LeanError("lean: the edited source does not parse to the edited syntax tree "
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
    own text. The edits are made on the syntax tree too and the result must parse to it (LeanError
    if not)."""
    return _Lean(source, rename).run()
