"""bench/code_floor.py: the statement stripper behind the counted-code floor."""
import ast

from bench.code_floor import strip_unexecuted

SOURCE = '''def f(x):
    if x < 0:
        raise ValueError("x must be >= 0")
    if x == 0:
        return "zero"
    y = x + 1
    return y


def g():
    return 1
'''


def test_drops_the_unexecuted_statements_and_keeps_definitions():
    out = strip_unexecuted(SOURCE, {3, 5, 11})  # the raise, the early return and g's body never ran
    assert "raise" not in out and '"zero"' not in out
    tree = ast.parse(out)
    f, g = tree.body
    assert [type(s).__name__ for s in f.body] == ["If", "If", "Assign", "Return"]
    assert isinstance(f.body[1].body[0], ast.Pass)  # an emptied body becomes pass
    assert isinstance(g.body[0], ast.Pass)
    ns = {}
    exec(compile(out, "<floor>", "exec"), ns)
    assert ns["f"](2) == 3  # what ran still runs the same


def test_keep_raise_keeps_the_guarded_message():
    out = strip_unexecuted(SOURCE, {2, 3, 5}, keep_raise=True)  # the whole first if never ran
    assert 'raise ValueError("x must be >= 0")' in out.replace("'", '"')
    assert '"zero"' not in out
    ns = {}
    exec(compile(out, "<floor>", "exec"), ns)
    try:
        ns["f"](-1)
    except ValueError as exc:
        assert "x must be >= 0" in str(exc)
    else:
        raise AssertionError("the kept raise did not fire")


def test_nothing_missing_is_the_same_program():
    out = strip_unexecuted(SOURCE, set())
    assert ast.dump(ast.parse(out)) == ast.dump(ast.parse(SOURCE))
