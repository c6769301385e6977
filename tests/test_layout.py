"""The package's layout holds: no import cycle, no private name borrowed across modules, one job
per module (its docstring's first line), and every name a notebook uses importable from
``sae_nb`` or the one submodule the notebook imports.

These read the source with ``ast``; nothing is imported except ``sae_nb`` itself for the last
check, so a cycle is found even where Python's lazy imports would hide it.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sae_nb"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.glob("*.py"))}


def package_imports(tree: ast.Module) -> list[tuple[str, list[str]]]:
    """``(module, names)`` for every ``from .module import names`` / ``from . import module``,
    at any depth: function-level imports and ``if TYPE_CHECKING:`` ones count too (a cycle
    Python merely postpones, or one only a type checker follows, is still a tangle to read)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [a.name for a in node.names]
            if node.module:
                found.append((node.module.split(".")[0], names))
            else:  # from . import plotting, probing
                found.extend((name, []) for name in names)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: {dep for dep, _ in package_imports(t) if dep in mods and dep != m}
            for m, t in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle as a path ``[a, b, ..., a]`` by depth-first search, or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(edges[node]):
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


def test_find_cycle_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# The package's layers, lowest first (README, "Layout"). A module imports only from its own
# layer or lower ones. A new module must be placed here: the test fails until it is.
LAYERS = {
    "ground": ["threads", "checks", "io", "sites", "models", "corpora", "store", "shards", "split",
               "distributed"],
    "dictionaries": ["dictionary", "sparse_ops", "saving", "formats", "catalogue"],
    "producing": ["extract", "objectives", "train", "evaluate", "synthetic", "streaming"],
    "studying": ["codes", "features", "contexts", "logit_effects", "probing", "clustering",
                 "families", "intervene", "effects", "attribution", "steering", "explanations",
                 "rules", "backends", "autointerp", "scoring", "recovery", "uncertainty",
                 "bags", "tasks"],
    "showing": ["plotting", "dashboard", "explorer_data", "explorer", "steering_widget",
                "compare"],
    "running": ["runs", "pipeline", "jobs", "sweep", "__main__", "__init__"],
}


def test_every_module_has_a_layer_and_imports_downwards():
    rank = {m: i for i, mods in enumerate(LAYERS.values()) for m in mods}
    unplaced = sorted(set(modules()) - set(rank))
    assert not unplaced, f"place these modules in a layer of LAYERS: {unplaced}"
    upward = [f"{m} ({layer_of(m)}) imports {dep} ({layer_of(dep)})"
              for m, deps in graph().items() for dep in deps if rank[dep] > rank[m]]
    assert not upward, upward


def layer_of(module: str) -> str:
    return next(name for name, mods in LAYERS.items() if module in mods)


def test_no_private_name_imported_across_modules():
    borrowed = [f"{m} imports {name} from {dep}"
                for m, tree in modules().items() for dep, names in package_imports(tree)
                for name in names if name.startswith("_")]
    assert not borrowed, borrowed


def test_every_module_says_its_job():
    missing = [m for m, tree in modules().items()
               if m != "__main__" and not (ast.get_docstring(tree) or "").strip()]
    assert not missing, f"modules without a docstring: {missing}"


def notebook_code(path: Path) -> str:
    nb = json.loads(path.read_text())
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_names_are_public(path):
    """Every ``sae_nb.x`` / ``from sae_nb[.mod] import x`` a notebook uses exists and is public."""
    import importlib

    import sae_nb

    tree = ast.parse(notebook_code(path))
    wanted: list[tuple[str, str]] = []
    aliases = {"sae_nb": "sae_nb"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sae_nb"):
            for a in node.names:
                if node.module == "sae_nb" and (PACKAGE / f"{a.name}.py").exists():
                    aliases[a.asname or a.name] = f"sae_nb.{a.name}"
                else:
                    wanted.append((node.module, a.name))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases):
            wanted.append((aliases[node.value.id], node.attr))
    assert wanted, f"{path.name} uses nothing from sae_nb?"
    missing = [f"{mod}.{name}" for mod, name in wanted
               if name.startswith("_") or not hasattr(importlib.import_module(mod), name)]
    assert not missing, f"{path.name} uses names that are missing or private: {missing}"
    assert sae_nb.__all__ and all(hasattr(sae_nb, n) for n in sae_nb.__all__)


def test_every_name_a_notebook_imports_is_on_sae_nb_too():
    """A name a notebook imports from a submodule is importable from ``sae_nb`` itself (the
    same object; the heavier ones on first use), unless it is also a submodule's name."""
    import importlib

    import sae_nb

    wanted = {}
    for path in NOTEBOOKS:
        for node in ast.walk(ast.parse(notebook_code(path))):
            if (isinstance(node, ast.ImportFrom) and node.module
                    and node.module.startswith("sae_nb.")):
                wanted.update({a.name: node.module for a in node.names})
    wanted = {n: m for n, m in wanted.items() if not (PACKAGE / f"{n}.py").exists()}
    assert len(wanted) > 20
    wrong = [f"{m}.{n}" for n, m in wanted.items()
             if getattr(sae_nb, n, None) is not getattr(importlib.import_module(m), n)]
    assert not wrong, f"not on sae_nb (add them to sae_nb.LAZY): {wrong}"
    assert set(sae_nb.LAZY) <= set(dir(sae_nb))
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        sae_nb.no_such_name
