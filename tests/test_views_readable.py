"""What a reader meets in notebooks 06-09 outside the figures: the dashboard link that JupyterLab
can open (or a plain word that it cannot), captions that name a lone space, the logit table's
headers saying how its rows are ranked."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
from bs4 import BeautifulSoup

from sae_nb.latents.logit_effects import LogitEffects
from sae_nb.views import dashboard
from sae_nb.views.dashboard import latent_captions, logit_table_html


def serve(runtime, root):
    """The record a JupyterLab serving ``root`` leaves for the kernels it starts (this process
    stands in for a kernel: the record is under its parent's process id)."""
    runtime.mkdir(parents=True, exist_ok=True)
    (runtime / f"jpserver-{os.getppid()}.json").write_text(json.dumps(
        {"root_dir": str(root), "pid": os.getppid(), "port": 8888}))


def test_dashboard_link_is_relative_to_the_notebook_inside_jupyterlabs_root(tmp_path,
                                                                          monkeypatch):
    root = tmp_path / "lab"
    page = root / "outputs" / "run" / "dashboards" / "d.html"
    page.parent.mkdir(parents=True)
    page.write_text("<html></html>")
    (root / "notebooks").mkdir()
    serve(tmp_path / "runtime", root)
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.chdir(root / "notebooks")  # a kernel runs in its notebook's folder
    link = BeautifulSoup(dashboard.file_link(page, "Written to ")._repr_html_(), "html.parser")
    assert link.a["href"] == "../outputs/run/dashboards/d.html"
    assert link.get_text() == f"Written to {page}"


def test_a_dashboard_outside_jupyterlabs_root_says_how_to_open_it(tmp_path, monkeypatch):
    """JupyterLab serves only its root: a link climbing out of it is a 404. The notebook says
    so and gives the file's address instead of a dead link."""
    root, elsewhere = tmp_path / "lab", tmp_path / "runs" / "remeasure"
    page = elsewhere / "dashboards" / "d.html"
    page.parent.mkdir(parents=True)
    page.write_text("<html></html>")
    (root / "notebooks").mkdir(parents=True)
    serve(tmp_path / "runtime", root)
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.chdir(root / "notebooks")
    shown = BeautifulSoup(dashboard.file_link(page, "Written to ")._repr_html_(), "html.parser")
    assert shown.find("a") is None  # no link JupyterLab would answer with 404
    text = shown.get_text()
    assert str(page) in text and page.resolve().as_uri() in text
    assert "outside the folder JupyterLab serves" in text and str(root.resolve()) in text
    # with no JupyterLab (papermill, a script) the link stays, relative to the notebook
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "none"))
    plain = BeautifulSoup(dashboard.file_link(page)._repr_html_(), "html.parser")
    assert plain.a["href"] == os.path.relpath(page, root / "notebooks")


def test_a_caption_names_a_lone_space_token():
    vocab = [" ", " the", "  "]
    tops = np.array([[0, 0, 1], [2, 2, 0]])
    stats = SimpleNamespace(d_sae=2, top_rows=np.array([[0, 1, 2], [3, 4, 5]]))
    store = SimpleNamespace(index=lambda rows: {"token": tops.reshape(-1)[rows]})
    tokenizer = SimpleNamespace(batch_decode=lambda b: [vocab[i[0]] for i in b],
                                convert_ids_to_tokens=lambda i: vocab[i])
    captions = latent_captions(stats, store, tokenizer)
    assert captions[0] == "top tokens: · (space), ·the"
    assert captions[1] == "top tokens: ·· (2 spaces), · (space)"


def test_logit_table_headers_say_words_come_first_and_where_the_values_are_sorted():
    """Words first, then word pieces, each by Δ logit: a piece's larger value comes after a
    word's smaller one, so no header claims a plain sort over the whole column."""
    ids = np.array([[0, 1, 2]])
    values = np.array([[3.0, 2.0, 1.0]])
    effects = LogitEffects(ids, values, ids[:, ::-1], -values[:, ::-1], scale=1.0)
    tok = SimpleNamespace(batch_decode=lambda b: [["eveloped", " great", " good"][i[0]]
                                                  for i in b],
                          convert_ids_to_tokens=lambda i: ["eveloped", " great", " good"][i])
    table = effects.tokens(tok, 0, activation=1.0, words=frozenset({1, 2}))
    page = BeautifulSoup(logit_table_html(table, 1.0), "html.parser")
    head = [th.get_text() for th in page.find_all("th")]
    column = [float(tr.find_all("td")[1].get_text()) for tr in page.find_all("tr")[1:]]
    assert column == [2.0, 1.0, 3.0]  # not sorted over the whole column
    assert "▼" not in head[1] or "within each" in head[1]
    assert "words" in head[0] and "pieces" in head[0]  # the first criterion, over its column
    assert "words" in head[2] and ("▲" not in head[3] or "within each" in head[3])
