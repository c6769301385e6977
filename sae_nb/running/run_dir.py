"""Which run folder a notebook reads when its ``run_dir`` parameter is left empty.

A notebook opened by hand reads ``../outputs/interactive`` (where notebook 01 run by hand writes)
when that folder holds activation stores, and otherwise the main job's ``../outputs/default``
(``python -m sae_nb run``), so Run All works right after the main job. The main job itself
always passes its own ``run_dir``. The note returned says which folder was chosen and how to
choose another, for the notebook to print. :func:`writable_folder` refuses, by name, a run
folder that cannot be created or written, before a job starts.

:func:`finish_progress_bars` makes the progress bars saved in an executed notebook read their
final state.
"""

from __future__ import annotations

import html
import tempfile
from pathlib import Path

from sae_nb.activations.store import StoreError, store_folders
from sae_nb.util.io import atomic_write_text

INTERACTIVE_RUN = "../outputs/interactive"  # notebook 01 run by hand, from notebooks/
MAIN_JOB_RUN = "../outputs/default"  # python -m sae_nb run, seen from notebooks/


def choose_run_dir(run_dir: str = "") -> tuple[str, str]:
    """``(run_dir, note)``: ``run_dir`` itself when given; when empty, the first of the
    interactive run and the main job's run that holds an activation store.

    Raises :class:`StoreError`, naming both folders, when neither holds one."""
    if str(run_dir):
        return str(run_dir), f"Run folder: {run_dir} (the run_dir parameter)."
    for folder, what in ((INTERACTIVE_RUN, "notebook 01 run by hand"),
                         (MAIN_JOB_RUN, "the main job, python -m sae_nb run")):
        if _has_store(folder):
            return folder, (f"Run folder: {folder} (written by {what}). To read another, set "
                            f"run_dir in the parameters cell, e.g. run_dir = \"../outputs/NAME\".")
    raise StoreError(f"No activation stores under {INTERACTIVE_RUN!r} nor {MAIN_JOB_RUN!r} "
                     f"(seen from {str(Path.cwd())!r}). Run notebook 01 or the main job "
                     f"(python -m sae_nb run) first, or set run_dir to a run folder that has "
                     f"activations/.")


def choose_output_dir(run_dir: str = "") -> tuple[str, str]:
    """``(run_dir, note)`` for a notebook that only writes (03, 04): ``run_dir`` itself when
    given; when empty, the run folder :func:`choose_run_dir` would read, so its tables sit
    beside that run's; with no run yet, the interactive run folder."""
    try:
        return choose_run_dir(run_dir)
    except StoreError:
        return INTERACTIVE_RUN, (f"Run folder: {INTERACTIVE_RUN} (no run has activations yet). "
                                 f"To write elsewhere, set run_dir in the parameters cell.")


def writable_folder(folder: str | Path, what: str, error: type[Exception],
                    fix: str = "choose a folder you can write to") -> Path:
    """``folder`` when a job can write there: it is a folder a file can be made in, or it does
    not exist yet and its nearest existing parent is such a folder. Otherwise raises ``error``
    naming ``what`` (an option, e.g. ``--run-dir``), the folder, why, and ``fix``.

    Nothing is left behind: the file system is asked by opening an unnamed temporary file (as
    root, permission bits would say yes where ``/proc`` still refuses)."""
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p == Path("."))
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{str(existing)!r} is a file, not a folder")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        reason = str(err) if not err.strerror else f"no file can be made in {str(existing)!r}: " \
            f"{err.strerror}"
        raise error(f"{what} {str(folder)!r} cannot be created or written to ({reason}); "
                    f"{fix}.") from None
    return folder


def _has_store(run_dir: str) -> bool:
    try:
        return bool(store_folders(run_dir))
    except StoreError:
        return False


WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def finish_progress_bars(path: str | Path) -> int:
    """Give each tqdm bar saved in the executed notebook at ``path`` the text of its last state.

    A tqdm bar in a notebook is a widget whose plain-text form is written when it appears
    (``Loading weights: 0% 0/272``); the widget state saved at the end holds how it finished.
    JupyterLab shows the plain text wherever it cannot draw the widget (an executed notebook
    opened later is untrusted), so that text is rewritten from the saved state
    (``Loading weights: 100%|##########| 272/272 [...]``). Returns the number of bars rewritten."""
    # nbformat takes seconds to import (jsonschema's format checkers): every notebook reads
    # choose_run_dir from this module, and only the pipeline rewrites bars
    import nbformat

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    done = 0
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            view = output.get("data", {}).get(WIDGET_VIEW)
            text = _bar_text(state, view["model_id"]) if view else None
            if text is not None:
                output["data"]["text/plain"] = text
                done += 1
    if done:
        atomic_write_text(path, nbformat.writes(nb))
    return done


def _bar_text(state: dict, model_id: str) -> str | None:
    """tqdm's text of the bar widget ``model_id`` (an HBox of HTML, FloatProgress, HTML)."""
    box = state.get(model_id, {})
    children = box.get("state", {}).get("children", []) if box.get("model_name") == "HBoxModel" \
        else []
    models = [state.get(str(c).removeprefix("IPY_MODEL_"), {}) for c in children]
    if [m.get("model_name") for m in models] != ["HTMLModel", "FloatProgressModel", "HTMLModel"]:
        return None
    left, bar, right = (m.get("state", {}) for m in models)
    total, value = float(bar.get("max") or 0), float(bar.get("value") or 0)
    filled = int(10 * min(value / total, 1.0)) if total > 0 else 0
    text = f"{left.get('value', '')}|{'█' * filled}{' ' * (10 - filled)}|{right.get('value', '')}"
    return html.unescape(text).replace("\u2007", " ")
