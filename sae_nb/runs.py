"""Which run folder a notebook reads when its ``run_dir`` parameter is left empty.

A notebook opened by hand reads ``../outputs/interactive`` (where notebook 01 run by hand writes)
when that folder holds activation stores, and otherwise the main job's ``../outputs/default``
(``python -m sae_nb run``), so Run All works right after the README's main job. The main job
itself always passes its own ``run_dir``. The note returned says which folder was chosen and how
to choose another, for the notebook to print.
"""

from __future__ import annotations

from pathlib import Path

from .store import StoreError, store_folders

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


def _has_store(run_dir: str) -> bool:
    try:
        return bool(store_folders(run_dir))
    except StoreError:
        return False
