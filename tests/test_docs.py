"""The README stays short and the manual in docs/ stays reachable and true to the code: every
page linked, every relative link resolving, every ``sae_nb.x.y`` it names importable, and no
docstring citing an issue number or a file that does not exist."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
LINK = re.compile(r"\[[^\]]*\]\(([^)#\s]+)(?:#[^)]*)?\)")
DOTTED = re.compile(r"\bsae_nb(?:\.[A-Za-z_]\w*)+")
ISSUE = re.compile(r"\b(?:issue|ticket)s? #?\d+|\bpoint \d+ of\b", re.IGNORECASE)
PY_FILE = re.compile(r"(?<![\w./-])((?:[\w-]+/)*[\w-]+\.py)\b")


def broken_links(page: Path) -> list[str]:
    return [target for target in LINK.findall(page.read_text())
            if "://" not in target and not target.startswith("mailto:")
            and not (page.parent / target).exists()]


def missing_names(text: str) -> list[str]:
    """Each ``sae_nb.a.b.c`` in ``text`` that is neither a module nor an attribute of one."""
    missing = []
    for dotted in sorted(set(DOTTED.findall(text))):
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            for attr in parts[cut:]:
                obj = getattr(obj, attr, None)
            if obj is None and dotted.endswith(".json"):
                obj = True  # a file name such as sae_nb.json
            break
        else:
            obj = None
        if obj is None:
            missing.append(dotted)
    return missing


def test_readme_is_short_and_links_every_docs_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move the detail into docs/"
    assert DOCS, "docs/ holds the manual"
    linked = {(README.parent / t).resolve() for t in LINK.findall(README.read_text())}
    unlinked = [p.name for p in DOCS if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README never links: {unlinked}"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_links_resolve_and_named_code_exists(page):
    assert not broken_links(page), f"{page.name}: links to nothing: {broken_links(page)}"
    missing = missing_names(page.read_text())
    assert not missing, f"{page.name} names code that does not exist: {missing}"


def test_the_checks_catch_planted_faults(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[ok](page.md) [gone](nowhere.md) [web](https://example.org)\n"
                    "sae_nb.training.trainer.TrainConfig sae_nb.train.TrainConfig "
                    "sae_nb.training.trainer.no_such_thing sae_nb.json")
    assert broken_links(page) == ["nowhere.md"]
    assert missing_names(page.read_text()) == ["sae_nb.train.TrainConfig",
                                               "sae_nb.training.trainer.no_such_thing"]
    assert ISSUE.search("see issue 12") and ISSUE.search("point 4 of the plan")
    assert not ISSUE.search("the issue is that rows 12 differ")
    assert PY_FILE.findall("see sae_nb/util/io.py and train.py, not x.pyc") == [
        "sae_nb/util/io.py", "train.py"]
    assert cited_files_missing("sae_nb/util/io.py sae_nb/io.py features.py io.py "
                               "sparse_autoencoder/paths.py script.py") == [
        "sae_nb/io.py", "features.py"]


def repo_py_names() -> set[str]:
    tracked = [*(ROOT / "sae_nb").rglob("*.py"), *(ROOT / "tests").glob("*.py"),
               *(ROOT / "benchmarks").glob("*.py"), *(ROOT / ".ci").glob("*.py")]
    return {p.name for p in tracked}


OURS = ("sae_nb", "tests", "benchmarks", "notebooks", "docs", ".ci", "data", "dictionaries")
PLACEHOLDERS = {"script.py"}  # a user's own script in a command line (torchrun ... script.py)


def cited_files_missing(text: str, names: set[str] | None = None) -> list[str]:
    """``*.py`` files of this repository that a text names and that do not exist: a path under
    one of its folders that is not there, or a bare file name found nowhere in the package, the
    tests or the benchmarks. Another project's paths (``sparse_autoencoder/paths.py``) pass."""
    names = repo_py_names() if names is None else names
    missing = []
    for f in PY_FILE.findall(text):
        if "/" in f:
            if f.split("/")[0] in OURS and not (ROOT / f).exists():
                missing.append(f)
        elif f not in names and f not in PLACEHOLDERS:
            missing.append(f)
    return missing


def docstrings(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            if doc := ast.get_docstring(node):
                yield getattr(node, "lineno", 1), doc


def test_no_docstring_or_comment_cites_an_issue_or_a_missing_file():
    found, names = [], repo_py_names()
    for path in sorted([*(ROOT / "sae_nb").rglob("*.py"), *(ROOT / "tests").glob("*.py"),
                        *(ROOT / "benchmarks").glob("*.py")]):
        source = path.read_text()
        texts = [(n, d) for n, d in docstrings(ast.parse(source))]
        texts += [(n, line) for n, line in enumerate(source.splitlines(), 1) if "#" in line]
        for lineno, text in texts:
            if path.name == "test_docs.py":
                continue
            if ISSUE.search(text):
                found.append(f"{path.relative_to(ROOT)}:{lineno} cites {ISSUE.search(text)[0]!r}")
            found += [f"{path.relative_to(ROOT)}:{lineno} names {f}, which does not exist"
                      for f in cited_files_missing(text, names)]
    assert not found, "\n".join(found)
