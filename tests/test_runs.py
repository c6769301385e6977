"""choose_run_dir: an empty run_dir reads the interactive run folder when notebook 01 wrote
there, else the main job's (so Run All right after the main job reads its outputs)."""

from __future__ import annotations

import json

import nbformat
import pytest

from sae_nb.activations.store import MANIFEST, STORE_FORMAT, STORE_VERSION, StoreError
from sae_nb.running.notebooks import NOTEBOOKS_DIR, run_notebook
from sae_nb.running.run_dir import choose_output_dir, choose_run_dir


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


@pytest.mark.slow  # runs a notebook in a kernel
def test_executed_notebook_saves_progress_bars_as_they_ended(tmp_path):
    """A tqdm bar saved in an executed notebook read ``0% 0/272`` (its text when it
    appeared); the main job's run_notebook rewrites it from the widget state it ended in."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell('run_dir = ""', metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("from tqdm.auto import tqdm\n"
                                          "for _ in tqdm(range(272), desc='Loading weights'):\n"
                                          "    pass")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    path = tmp_path / "nb" / "99_bars.ipynb"
    path.parent.mkdir()
    nbformat.write(nb, path)
    output = run_notebook(path, tmp_path / "run")
    (bar,) = nbformat.read(output, as_version=4).cells[-1].outputs
    assert "application/vnd.jupyter.widget-view+json" in bar["data"]  # still a live widget
    text = bar["data"]["text/plain"]
    assert text.startswith("Loading weights: 100%|██████████| 272/272 ["), text


def test_write_only_notebooks_write_beside_the_run_they_would_read(tmp_path, monkeypatch):
    """Notebooks 03 and 04 only write: an empty run_dir follows the run folder notebooks 02,
    05 and 06 read, and is the interactive folder on a fresh clone."""
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    monkeypatch.chdir(notebooks)
    run_dir, note = choose_output_dir("")
    assert run_dir == "../outputs/interactive" and "run_dir" in note
    fake_store("default", tmp_path)
    assert choose_output_dir("")[0] == "../outputs/default"
    assert choose_output_dir("/x/y")[0] == "/x/y"


READERS = ["02_train", "05_cluster", "06_visualize"]  # read run_dir/activations
WRITERS = ["03_load_pretrained", "04_probe"]


@pytest.mark.parametrize("stem", READERS + WRITERS)
def test_notebooks_choose_their_run_folder_after_the_main_job(stem, tmp_path, monkeypatch):
    """Run All after the main job. Each notebook's run_dir defaults to empty and its
    first cell that uses run_dir chooses the folder (and prints why); the chosen folder after
    the main job is the main job's."""
    nb = nbformat.read(NOTEBOOKS_DIR / f"{stem}.ipynb", as_version=4)
    parameters = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assert 'run_dir = ""  #' in parameters.source
    code = [c.source for c in nb.cells if c.cell_type == "code" and c is not parameters]
    first = next(src for src in code[1:] if "run_dir" in src)  # code[0]: the imports
    chooser = "choose_run_dir" if stem in READERS else "choose_output_dir"
    assert first.startswith(f"run_dir, note = sae_nb.{chooser}(run_dir)\nprint(note)"), first
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    monkeypatch.chdir(notebooks)
    fake_store("default", tmp_path)
    namespace = {}
    exec(code[0], namespace)  # the notebook's imports
    namespace["run_dir"] = ""
    exec(first.split("\n", 2)[0], namespace)
    assert namespace["run_dir"] == "../outputs/default"
