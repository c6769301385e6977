"""List the dictionaries under a folder as a DataFrame.

The layout mirrors the published one, ``<model>/<site>/<name>/``; any folder or file that
``load_dictionary`` recognises counts, in whatever format. A dictionary that fails to load is
listed with its error instead of stopping the listing.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from sae_nb.dictionaries.formats import load_dictionary
from sae_nb.dictionaries.saving import (
    DEFAULT_DICTIONARY,
    META_FILE,
    DictionaryFormatError,
    read_json,
)

# Files that mark a folder as one dictionary, in the formats we read.
MARKERS = ("cfg.json", "ae.pt", "params.npz")
SKIP_DIRS = {"checkpoints", ".git", "__pycache__"}


def find_dictionaries(root: str | Path) -> list[Path]:
    """Folders (and OpenAI-style ``.pt`` files) under ``root`` that hold one dictionary."""
    root = Path(root)
    if not root.is_dir():
        raise DictionaryFormatError(f"No folder {str(root)!r} to list dictionaries from; pass "
                                    f"a folder that exists (default: the repository's "
                                    f"dictionaries/).")
    found = []
    for folder in sorted(p for p in [root, *root.rglob("*")] if p.is_dir()):
        parts = folder.relative_to(root).parts
        if SKIP_DIRS & set(parts) or any(part.startswith(".") for part in parts):
            continue
        names = {p.name for p in folder.iterdir()}
        if any(m in names for m in MARKERS):
            found.append(folder)
        elif not any(c.is_dir() for c in folder.iterdir()):
            found += sorted(p for p in folder.glob("*.pt") if p.name != "checkpoint.pt")
    return found


def catalogue(*roots: str | Path) -> pd.DataFrame:
    """One row per dictionary under ``roots`` (default: the repository's ``dictionaries/``):
    model, site, name, format, architecture, d_in, d_sae, and saved metrics when present."""
    roots = roots or (DEFAULT_DICTIONARY.parents[2],)
    rows = []
    for root in roots:
        for path in find_dictionaries(root):
            row = {"path": str(path), "name": path.stem if path.is_file() else path.name}
            try:
                d = load_dictionary(path)
            except Exception as err:  # noqa: BLE001 - listed, not raised: one bad file
                rows.append({**row, "error": f"{type(err).__name__}: {err}"})
                continue
            meta = getattr(d, "metadata", {}) or {}
            row.update(model=meta.get("model"), site=meta.get("site"),
                       format=meta.get("format"), architecture=type(d).__name__,
                       k=getattr(d, "k", None), d_in=d.d_in, d_sae=d.d_sae)
            row.update(_saved_metrics(path))
            rows.append(row)
    columns = ["model", "site", "name", "format", "architecture", "k", "d_in", "d_sae",
               "fvu", "l0", "ce_loss_recovered", "path", "error"]
    df = pd.DataFrame(rows)
    return df.reindex(columns=[c for c in columns if c in df.columns] or columns)


def _saved_metrics(path: Path) -> dict:
    meta = path / META_FILE if path.is_dir() else None
    if meta is None or not meta.exists():
        return {}
    metrics = read_json(meta).get("metrics") or {}
    return {k: metrics[k] for k in ("fvu", "l0", "ce_loss_recovered") if k in metrics}
