"""The repository documents itself: no file points at notes that live outside it, and every docs page
a file names exists.

Users get only this repository, so a citation must name a primary source (a golf PR, a record folder,
a paper) or a page under docs/, most often docs/TECHNIQUES.md. The files checked are the tracked ones
plus the untracked files git does not ignore (a new file is checked before it is committed); runs/
(run outputs) and binary files are skipped.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SKIPPED_DIRS = ("runs/",)

# Names of the team's private notes, assembled from parts so that this file does not cite them itself.
PRIVATE_NOTES = tuple(name + ".md" for name in ("GOLF", "ARCHS", "STYLE")) + (".." + "/shared",)
PRIVATE_PATTERN = re.compile("|".join(re.escape(n) for n in PRIVATE_NOTES))
# The techniques page exists in the repository too, but only under docs/: a bare name means the notes.
BARE_TECHNIQUES = re.compile(r"(?<!docs/)" + re.escape("TECHNIQUES" + ".md"))
# A path to a page under docs/, e.g. docs/PERF.md or ./docs/PERF.md, not part of a longer path.
DOCS_PATH = re.compile(r"(?<![\w./-])(?:\./)?(" + "docs" + r"/[\w./-]+?\.md)(?!\w)")


def repo_files() -> list[str]:
    """Tracked files plus untracked, non-ignored ones (paths relative to the repository), runs/ excluded."""
    out = []
    for extra in ([], ["--others", "--exclude-standard"]):
        try:
            res = subprocess.run(["git", "ls-files", "-z", *extra], cwd=REPO, capture_output=True, check=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            pytest.skip(f"not a git checkout ({exc}): the file list comes from git ls-files")
        out += [p for p in res.stdout.decode("utf-8").split("\0") if p]
    return sorted({p for p in out if not p.startswith(SKIPPED_DIRS)})


def text_lines(path: str) -> list[str] | None:
    """The file's lines, or None for a binary, non-UTF-8 or missing (deleted, not yet staged) file."""
    try:
        data = (REPO / path).read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return None
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        return None


def scan(pattern_fn) -> list[str]:
    """'file:line: text' for every line where pattern_fn(path, line) is true."""
    hits = []
    for path in repo_files():
        for i, line in enumerate(text_lines(path) or (), start=1):
            if pattern_fn(path, line):
                hits.append(f"{path}:{i}: {line.strip()}")
    return hits


def test_no_citation_of_notes_outside_the_repository():
    hits = scan(lambda _, line: bool(PRIVATE_PATTERN.search(line) or BARE_TECHNIQUES.search(line)))
    assert not hits, ("cite a primary source (golf PR, record folder, paper) or docs/TECHNIQUES.md instead of "
                      "notes outside the repository:\n" + "\n".join(hits))


def test_named_docs_pages_exist():
    files = set(repo_files())
    hits = scan(lambda _, line: any(m.group(1) not in files for m in DOCS_PATH.finditer(line)))
    assert not hits, "these lines name a docs page that is not in the repository:\n" + "\n".join(hits)


def test_patterns():
    """The matchers themselves, on made-up lines."""
    notes = "GOLF" + ".md"
    assert PRIVATE_PATTERN.search(f"the bpb rule ({notes} §2.1)")
    assert PRIVATE_PATTERN.search("see " + ".." + "/shared/x")
    assert BARE_TECHNIQUES.search("(" + "TECHNIQUES" + ".md §2.11)")
    assert not BARE_TECHNIQUES.search('(docs/' + "TECHNIQUES" + '.md, "XSA")')
    d = "doc" + "s/"  # assembled, so that the docs-page test does not read these made-up paths
    found = [m.group(1) for m in DOCS_PATH.finditer(f"{d}PERF.md, ./{d}A.md's; x/{d}B.md {d}C.mdx")]
    assert found == [d + "PERF.md", d + "A.md"]
