"""choose_run_dir: an empty run_dir reads the interactive run folder when notebook 01 wrote
there, else the main job's (issue 12, point 1: Run All right after the main job)."""

from __future__ import annotations

import json

import pytest

from sae_nb.runs import choose_run_dir
from sae_nb.store import MANIFEST, STORE_FORMAT, STORE_VERSION, StoreError


def fake_store(run: str, root, site: str = "resid_out_layer6") -> None:
    folder = root / "outputs" / run / "activations" / site
    folder.mkdir(parents=True)
    (folder / MANIFEST).write_text(json.dumps({"format": STORE_FORMAT, "version": STORE_VERSION,
                                               "site": site}))


def test_empty_run_dir_reads_the_main_jobs_run_after_the_main_job(tmp_path, monkeypatch):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    monkeypatch.chdir(notebooks)  # notebooks run with their own folder as working directory
    with pytest.raises(StoreError, match="interactive.*default.*python -m sae_nb run"):
        choose_run_dir("")
    fake_store("default", tmp_path)  # the main job wrote outputs/default
    run_dir, note = choose_run_dir("")
    assert run_dir == "../outputs/default"
    assert "../outputs/default" in note and "main job" in note and "run_dir" in note
    fake_store("interactive", tmp_path)  # notebook 01 run by hand wins once it has written
    assert choose_run_dir("")[0] == "../outputs/interactive"
    assert choose_run_dir("/somewhere/else")[0] == "/somewhere/else"  # a given one is kept
