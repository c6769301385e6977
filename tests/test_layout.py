"""The package's layout holds: folders ordered as layers, each folder importing only from itself
and the folders below it, no import cycle, no private name borrowed across modules, a docstring
saying each module's one job, function-level imports only where a comment says why, and
notebooks that use the two import forms (``sae_nb.<name>``, ``from sae_nb.<folder> import
<module>``) with public names only.

The checks read the source with ``ast`` (nothing is imported but ``sae_nb`` itself for the
notebook checks), so a cycle is found even where Python's lazy imports would hide it. Each check
is a function of a package folder, run on the real package and on planted packages that break it.
"""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import sae_nb

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sae_nb"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))

# The package's folders, lowest first (docs/layout.md). A module imports only from its own folder
# or lower ones; a new folder must be placed here, and the test fails until it is.
FOLDERS = ["util", "activations", "dictionaries", "training", "latents", "texts",
           "interventions", "explanations", "comparison", "circuits", "views", "running"]
# The only modules at the top: the package's face (names notebooks call) and the command line.
FACE = ["__init__", "__main__"]


def package_modules(root: Path) -> dict[str, ast.Module]:
    """Every module of the package at ``root``, by dotted name below it (``"util.io"``,
    ``"__init__"``, ``"util"`` for ``util/__init__.py``)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if len(parts) > 1 and parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = ast.parse(path.read_text(), str(path))
    return found


def package_imports(tree: ast.Module, package: str, modules) -> list[tuple[str, str]]:
    """``(module, name)`` for every import of the package in ``tree``, at any depth (function-level
    and ``if TYPE_CHECKING:`` imports count: a cycle Python merely postpones is still a tangle):
    ``from sae_nb.util.io import x`` gives ``("util.io", "x")``, ``from sae_nb.views import
    plotting`` gives ``("views.plotting", "")``, ``import sae_nb.util.io`` ``("util.io", "")``.
    A relative import gives ``(".", name)``: the package imports absolutely."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            found.extend((".", a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and (
                node.module == package or node.module.startswith(package + ".")):
            base = node.module.removeprefix(package).lstrip(".")
            for a in node.names:
                sub = f"{base}.{a.name}".lstrip(".")
                found.append((sub, "") if sub in modules else (base, a.name))
        elif isinstance(node, ast.Import):
            found.extend((a.name.removeprefix(package + "."), "") for a in node.names
                         if a.name.startswith(package + "."))
    return found


def rank_of(module: str) -> int:
    """A module's layer: its folder's place in FOLDERS, the face above every folder."""
    top = module.split(".")[0]
    return FOLDERS.index(top) if top in FOLDERS else len(FOLDERS)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle as a path ``[a, b, ..., a]`` by depth-first search, or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layout_problems(root: Path) -> list[str]:
    """Everything wrong with the layout of the package at ``root``, one line each."""
    package = root.name
    mods = package_modules(root)
    problems = []
    for name in mods:
        top = name.split(".")[0]
        if "." not in name and name not in FACE and name not in FOLDERS:
            problems.append(f"{name}: a module at the top or an unplaced folder (put it in a "
                            f"folder of FOLDERS, or place its folder there)")
        elif top not in FACE and top not in FOLDERS:
            problems.append(f"{name}: folder {top!r} is not in FOLDERS")
    edges: dict[str, set[str]] = {}
    for name, tree in mods.items():
        if name != "__main__" and not (ast.get_docstring(tree) or "").strip():
            problems.append(f"{name}: no docstring saying its one job")
        for target, imported in package_imports(tree, package, mods):
            if target == ".":
                problems.append(f"{name}: relative import of {imported!r} (write "
                                f"'from {package}.<folder>.<module> import ...')")
                continue
            if target not in mods:
                continue
            if imported.startswith("_"):
                problems.append(f"{name} borrows the private name {target}.{imported}")
            if target != name and name != "__init__":
                edges.setdefault(name, set()).add(target)
            if rank_of(target) > rank_of(name):
                problems.append(f"{name} ({name.split('.')[0]}) imports {target} upward "
                                f"({target.split('.')[0]})")
    if cycle := find_cycle(edges):
        problems.append("import cycle: " + " -> ".join(cycle))
    return problems


def lazy_imports_without_reason(root: Path) -> list[str]:
    """Function-level imports with no comment on their line or the line above saying why."""
    found = []
    for path in sorted(root.rglob("*.py")):
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef,
                                                                  ast.AsyncFunctionDef))
                 for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if id(node) in inner:
                here, above = lines[node.lineno - 1], lines[node.lineno - 2]
                if "#" not in here and not above.strip().startswith("#"):
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno}")
    return found


def test_the_real_package_keeps_its_layout():
    assert [p.name for p in sorted(PACKAGE.iterdir()) if p.is_dir() and p.name in FOLDERS]
    assert not layout_problems(PACKAGE), "\n".join(layout_problems(PACKAGE))
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert top == FACE, f"only the face sits at the top of sae_nb/: {top}"


def test_every_function_level_import_says_why():
    missing = lazy_imports_without_reason(PACKAGE)
    assert not missing, ("a function-level import needs a comment saying why it is not at the "
                         f"top of its module: {missing}")


def plant(root: Path, files: dict[str, str]) -> Path:
    package = root / "sae_nb"
    for rel, source in files.items():
        path = package / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return package


def test_planted_faults_are_each_found(tmp_path):
    """Each fault in a planted package is named: an upward import, a cycle, a borrowed private
    name, a module without a docstring, a relative import, a module at the top."""
    package = plant(tmp_path, {
        "__init__.py": '"""face"""\nfrom sae_nb.views.plotting import figure\n',
        "util/__init__.py": '"""util"""\n',
        "util/io.py": '"""files"""\nfrom sae_nb.views.plotting import figure\n',
        "util/a.py": '"""a"""\nfrom sae_nb.util.b import x\n',
        "util/b.py": '"""b"""\n\ndef f():\n    from sae_nb.util.a import y\n',
        "views/__init__.py": '"""views"""\n',
        "views/plotting.py": '"""figures"""\nfrom sae_nb.util.io import _private\nfigure = 1\n',
        "views/table.py": "from .plotting import figure\n",
        "stray.py": '"""a module at the top"""\n',
    })
    problems = "\n".join(layout_problems(package))
    assert "util.io (util) imports views.plotting upward (views)" in problems
    assert "import cycle: util.a -> util.b -> util.a" in problems
    assert "views.plotting borrows the private name util.io._private" in problems
    assert "views.table: no docstring" in problems
    assert "views.table: relative import of 'figure'" in problems
    assert "stray: a module at the top" in problems
    assert len(layout_problems(package)) == 6, problems
    assert lazy_imports_without_reason(package) == ["sae_nb/util/b.py:4"]


def test_a_clean_planted_package_passes(tmp_path):
    package = plant(tmp_path, {
        "__init__.py": '"""face"""\nfrom sae_nb.views import plotting\n',
        "util/__init__.py": '"""util"""\n',
        "util/io.py": '"""files"""\nx = 1\n',
        "views/__init__.py": '"""views"""\n',
        "views/plotting.py": '"""figures"""\nfrom sae_nb.util.io import x\n\n\ndef f():\n'
                             '    # plotly is heavy: loaded on first use\n    import json\n',
    })
    assert layout_problems(package) == []
    assert lazy_imports_without_reason(package) == []


def test_find_cycle_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def notebook_code(path: Path) -> str:
    nb = json.loads(path.read_text())
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")


def notebook_import_problems(code: str) -> list[str]:
    """Imports of sae_nb other than ``import sae_nb`` and ``from sae_nb.<folder> import
    <module>``."""
    wrong = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            wrong += [a.name for a in node.names
                      if a.name.startswith("sae_nb.") or (a.name == "sae_nb" and a.asname)]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sae_nb"):
            folder = node.module.removeprefix("sae_nb").lstrip(".")
            if folder not in FOLDERS or not all(
                    (PACKAGE / folder / f"{a.name}.py").exists() and not a.asname
                    for a in node.names):
                wrong.append(f"from {node.module} import "
                             + ", ".join(a.name for a in node.names))
    return wrong


def test_notebook_import_rule_catches_planted_imports():
    assert notebook_import_problems("import sae_nb\nfrom sae_nb.views import plotting") == []
    assert notebook_import_problems(
        "from sae_nb import plotting\nfrom sae_nb.views.plotting import figure\n"
        "from sae_nb.views import nothing_here\nimport sae_nb.views.plotting\n"
        "from sae_nb.comparison import grid as compare") == [
        "from sae_nb import plotting", "from sae_nb.views.plotting import figure",
        "from sae_nb.views import nothing_here", "sae_nb.views.plotting",
        "from sae_nb.comparison import grid"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebooks_use_the_two_import_forms_and_public_names(path):
    """``import sae_nb`` and ``from sae_nb.<folder> import <module>`` only, and every
    ``sae_nb.x`` / ``module.x`` a notebook uses exists and is public."""
    import importlib


    code = notebook_code(path)
    assert not notebook_import_problems(code), notebook_import_problems(code)
    tree = ast.parse(code)
    aliases = {"sae_nb": "sae_nb"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sae_nb."):
            aliases.update({a.name: f"{node.module}.{a.name}" for a in node.names})
    wanted = [(aliases[n.value.id], n.attr) for n in ast.walk(tree)
              if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
              and n.value.id in aliases]
    assert any(module == "sae_nb" for module, _ in wanted), f"{path.name} never calls sae_nb.x?"
    missing = [f"{mod}.{name}" for mod, name in wanted
               if name.startswith("_") or not hasattr(importlib.import_module(mod), name)]
    assert not missing, f"{path.name} uses names that are missing or private: {missing}"


def test_import_sae_nb_stays_light_and_offers_every_name():
    """``import sae_nb`` loads no widget, figure, notebook-runner or embedding library; the names
    of ``sae_nb.LAZY`` resolve on first use to the very objects of their modules."""
    heavy = ["plotly", "ipywidgets", "papermill", "sentence_transformers", "sklearn", "nnsight"]
    probe = f"import sys, sae_nb; print(','.join(m for m in {heavy!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True, cwd=ROOT).stdout.strip()
    assert loaded == "", f"import sae_nb loaded {loaded}"
    assert sae_nb.__all__ and all(hasattr(sae_nb, n) for n in sae_nb.__all__)
    wrong = [f"{m}.{n}" for n, m in sae_nb.LAZY.items()
             if getattr(sae_nb, n) is not getattr(importlib.import_module(f"sae_nb.{m}"), n)]
    assert not wrong, wrong
    assert set(sae_nb.LAZY) <= set(dir(sae_nb))
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        _ = sae_nb.no_such_name


def test_ruff_is_clean():
    """The linter configured in pyproject.toml finds nothing in the package, the tests, the
    benchmarks or the notebooks."""
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache",
                             "--output-format", "concise", "."],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]
