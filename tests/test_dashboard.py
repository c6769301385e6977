"""Static dashboards: the HTML pieces, the exported file, and the file in a real browser.

The export runs end to end on a tiny model: a store extracted from the test corpus, a small
TopK dictionary, its feature statistics. The browser test opens the exported file in headless
Chromium (Debian's ``chromium``, which ``.ci/run`` installs) and reads the DOM after plotly.js
ran: the shaded token spans and the histogram's bars.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import Counter

import numpy as np
import pytest
import torch
from bs4 import BeautifulSoup

import sae_nb
from sae_nb.dictionaries.architectures import TopKSAE
from sae_nb.latents.contexts import latent_contexts
from sae_nb.latents.stats import feature_stats
from sae_nb.views.dashboard import (
    contexts_html,
    dashboard_path,
    display_token,
    export_dashboards,
    shade_alpha,
    shaded_tokens_html,
    token_label,
    token_span,
)

SITE = "resid_out_layer1"
ALPHA_RE = re.compile(r"rgba\(255,140,0,([0-9.]+)\)")


BAR_RE = re.compile(r"M[-\d.]+,([-\d.]+)V([-\d.]+)H")


def bar_height(d: str) -> float:
    """The pixel height of a plotly bar from its SVG path (``M x,y0 V y1 H ...``)."""
    y0, y1 = map(float, BAR_RE.match(d).groups())
    return y0 - y1


def alpha_of(span) -> float:
    return float(ALPHA_RE.search(span["style"]).group(1))


# -- the HTML pieces ------------------------------------------------------------------------

def test_token_span_escapes_shades_and_titles():
    span = BeautifulSoup(token_span("<b>&\n", 1.5, 3.0, center=True), "html.parser").span
    assert span.get_text() == "<b>&↵"  # escaped markup shows as text; the newline is visible
    assert span.find("b") is None
    assert span["title"] == "1.5" and alpha_of(span) == 0.5
    assert "center" in span["class"]
    assert shade_alpha(7.0, 3.0) == 1.0 and shade_alpha(-1.0, 3.0) == 0.0
    assert shade_alpha(1.0, 0.0) == 0.0
    assert display_token("\tx") == "⇥x"


def test_shaded_tokens_and_contexts():
    tokens, acts = [" the", " cat", " sat"], [0.0, 2.0, 4.0]
    spans = BeautifulSoup(shaded_tokens_html(tokens, acts, 4.0, center=2), "html.parser")
    found = spans.find_all("span", class_="tok")
    assert [s.get_text() for s in found] == tokens
    assert [alpha_of(s) for s in found] == [0.0, 0.5, 1.0]
    assert [s["title"] for s in found] == ["0", "2", "4"]
    with pytest.raises(ValueError, match="2 tokens but 3 activations"):
        shaded_tokens_html(["a", "b"], [1, 2, 3], 1.0)
    table = BeautifulSoup(contexts_html([{"row": 7, "tokens": tokens, "acts": acts,
                                          "center": 2, "value": 4.0}], 8.0), "html.parser")
    assert table.find("tr")["data-row"] == "7"
    assert table.find("td", class_="value").get_text() == "4"
    assert "never fired" in contexts_html([], 1.0)


# -- a real export on a tiny model ----------------------------------------------------------

def tiny_setup(llama, corpus_dir, folder):
    """A store of the tiny llama's ``resid_out_layer1``, a TopK dictionary, its statistics."""
    store = sae_nb.extract_activations(llama, folder, sites=[SITE], corpus=str(corpus_dir),
                                       n_tokens=1024, ctx_len=32, dtype="float32",
                                       progress=False)[SITE]
    torch.manual_seed(3)
    sae = TopKSAE(32, 64, k=4)
    sae.metadata = {"site": SITE, "model": "tiny", "path": str(folder / "tiny_topk")}
    stats = feature_stats(store, sae, n_top=6, n_quantiles=3, per_quantile=2, n_bins=10,
                          batch_size=256, progress=False)
    return store, sae, stats


@pytest.fixture(scope="module")
def exported(llama, corpus_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dash")
    store, sae, stats = tiny_setup(llama, corpus_dir, folder)
    latents = [int(i) for i in np.argsort(-stats.max_act)[:3]]
    path = export_dashboards(stats, store, sae, latents, dashboard_path(folder, sae),
                             tokenizer=llama.tokenizer, n_contexts=4, before=5, after=2)
    return path, store, sae, stats, latents, llama.tokenizer


def check_sections(soup, stats, latents, store, sae, tokenizer):
    """Each latent's section shows its top rows, centre tokens shaded by the top values."""
    sections = [s for s in soup.find_all("section", class_="latent")
                if "related-latent" not in s["class"]]
    assert [int(s["data-latent"]) for s in sections] == latents
    for section, latent in zip(sections, latents):
        top = stats.top_rows[latent, :4]
        table = section.find("table", class_="contexts")  # the first: top activations
        rows = table.find_all("tr")
        assert [int(r["data-row"]) for r in rows] == top[top >= 0].tolist()
        expected = latent_contexts(store, sae, latent, top, tokenizer, 5, 2)
        for tr, ctx, value in zip(rows, expected, stats.top_values[latent]):
            spans = tr.find_all("span", class_="tok")
            assert len(spans) == len(ctx["tokens"])
            center = tr.find("span", class_="center")
            assert float(center["title"]) == pytest.approx(float(value), rel=1e-3)
            assert alpha_of(center) == pytest.approx(value / stats.max_act[latent], abs=2e-3)
            assert [float(s["title"]) for s in spans] == pytest.approx(ctx["acts"], rel=1e-3,
                                                                        abs=1e-6)
        assert section.find("div", id=f"hist-{latent}") is not None
    return sections


def test_export_writes_one_self_contained_file(exported):
    path, store, sae, stats, latents, tokenizer = exported
    assert path == path.parent.parent / "dashboards" / "tiny_topk.html"
    assert not path.with_name(path.name + ".tmp").exists()
    text = path.read_text(encoding="utf-8")
    soup = BeautifulSoup(text, "html.parser")
    assert not soup.find_all("script", src=True)  # nothing to fetch: it opens offline
    assert text.count("Plotly v") <= 2  # plotly.js (its banner) inline once, not per latent
    assert len(text) > 1_000_000
    sections = check_sections(soup, stats, latents, store, sae, tokenizer)
    for section, latent in zip(sections, latents):
        assert f"{stats.max_act[latent]:.4g}" in section.find("div", class_="summary").get_text()
        intervals = section.find_all("table", class_="contexts")[1:]
        expected = [r[r >= 0].tolist() for r in stats.quantile_rows[latent][::-1] if (r >= 0).any()]
        shown = [[int(tr["data-row"]) for tr in t.find_all("tr")] for t in intervals]
        assert [sorted(rows) for rows in shown] == [sorted(rows) for rows in expected]
        for table in intervals:  # strongest first within each interval
            values = [float(td.get_text()) for td in table.find_all("td", class_="value")]
            assert values == sorted(values, reverse=True), values
        labels = [h.get_text() for h in section.find_all("h4")]
        assert len(labels) == len(expected) and labels[0].startswith("interval 3 of 3")
    assert [a["href"] for a in soup.find("ul").find_all("a")] == [f"#latent-{i}" for i in latents]
    linked = {a["href"] for a in soup.find_all("a")}  # every link leads to a section here
    assert linked <= {f"#{s['id']}" for s in soup.find_all("section", class_="latent")}
    # every latent named beside an exported one is a link, to its own short section
    for near in soup.find_all("span", class_="near"):
        link = near.find("a", class_="latent-link")
        assert link is not None and link["href"] == f"#latent-{near['data-latent']}"
        target = soup.find("section", id=f"latent-{near['data-latent']}")
        rows = stats.top_rows[int(near["data-latent"])]
        assert target is not None
        if "related-latent" in target["class"]:
            assert len(target.find_all("tr")) == min(5, (rows >= 0).sum())


def test_dashboard_index_and_sections_caption_each_latent(exported):
    """The index lists each latent with its top tokens, not as a bare number."""
    path, store, sae, stats, latents, tokenizer = exported
    soup = BeautifulSoup(path.read_text(encoding="utf-8"), "html.parser")
    items = soup.find("ul").find_all("li")
    for item, section, latent in zip(items, soup.find_all("section", class_="latent"), latents):
        ids = [int(store.index(np.array([r]))["token"][0]) for r in stats.top_rows[latent]
               if r >= 0]
        caption = "top tokens: " + ", ".join(token_label(tokenizer.decode([t]))
                                             for t, _ in Counter(ids).most_common(2))
        assert item.get_text().startswith(f"latent {latent} {caption} ")
        assert f"latent {latent} {caption}" in section.find("div", class_="summary").get_text()


def test_export_refuses_bad_latents(exported):
    path, store, sae, stats, _, tokenizer = exported
    with pytest.raises(ValueError, match="not in 0..63"):
        export_dashboards(stats, store, sae, [64], path.with_name("x.html"), tokenizer=tokenizer)
    with pytest.raises(ValueError, match="tokenizer"):
        export_dashboards(stats, store, sae, [0], path.with_name("x.html"))


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if os.environ.get("CI"):
        pytest.fail("No chromium on PATH: install Debian's chromium (apt-get install chromium); "
                    ".ci/run does this.")
    pytest.skip("chromium is not installed (apt-get install chromium)")


@pytest.mark.slow  # a headless browser
def test_dashboard_renders_in_headless_chromium(exported, tmp_path):
    path, store, sae, stats, latents, tokenizer = exported
    chromium = find_chromium()
    run = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
         f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", path.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    dom = BeautifulSoup(run.stdout, "html.parser")
    check_sections(dom, stats, latents, store, sae, tokenizer)
    shaded = [s for s in dom.find_all("span", class_="tok") if alpha_of(s) > 0]
    assert len(shaded) >= len(latents)
    for latent in latents:  # plotly.js ran: an SVG with one bar per nonempty bin
        div = dom.find("div", id=f"hist-{latent}")
        assert div.find("svg", class_="main-svg") is not None
        heights = np.array([bar_height(p["d"]) for p in div.select(".barlayer .point path")])
        counts = stats.hist_counts[latent]
        assert len(heights) == len(counts)
        assert heights / heights.max() == pytest.approx(counts / counts.max(), abs=0.01)


# -- the figures ------------------------------------------------------------------------------

def test_latent_histogram_and_density_figures():
    from sae_nb.views import plotting

    fig = plotting.latent_histogram_figure([0.0, 1.0, 3.0], [4, 2])
    bar = fig.data[0]
    assert list(bar.x) == [0.5, 2.0] and list(bar.width) == [1.0, 2.0] and list(bar.y) == [4, 2]
    with pytest.raises(ValueError, match="n \\+ 1 edges"):
        plotting.latent_histogram_figure([0.0, 1.0], [4, 2])
    density, max_act = np.array([0.0, 0.1, 0.01]), np.array([0.0, 2.0, 5.0])
    fig = plotting.density_max_figure(density, max_act, latents=[2])
    assert list(fig.data[0].customdata) == [1, 2]  # the dead latent 0 is left out
    assert list(fig.data[1].x) == [0.01] and list(fig.data[1].y) == [5.0]


def test_dashboard_sections_list_nearest_latents_linking_those_exported(exported):
    """Expected feature: each section names its nearest latents by decoder cosine (brute force
    over the decoder rows), a link when that latent has a section of its own."""
    path, store, sae, stats, latents, tokenizer = exported
    soup = BeautifulSoup(path.read_text(encoding="utf-8"), "html.parser")
    w = sae.W_dec.detach().numpy()
    unit = w / np.linalg.norm(w, axis=1, keepdims=True)
    for section, latent in zip(soup.find_all("section", class_="latent"), latents):
        cos = unit @ unit[latent]
        cos[latent] = -np.inf
        expected = np.argsort(-cos)[:5].tolist()
        near = section.find("p", class_="related").find_all("span", class_="near")
        assert [int(s["data-latent"]) for s in near] == expected
        for s, i in zip(near, expected):
            assert s.get_text().endswith(f"({cos[i]:.2f})")
        links = [int(a["data-latent"]) for a in section.find("p", class_="related").find_all("a")]
        assert links == expected  # each a link: to its section, or its short one at the end


def test_dashboard_shows_each_latents_best_explanation(exported, tmp_path):
    """With explanation tables, each section's heading and explanation line, and the index,
    carry the best explanation and its score (never a control's)."""
    import pandas as pd

    path, store, sae, stats, latents, tokenizer = exported
    a, b = latents[0], latents[1]
    nan = float("nan")
    table = pd.DataFrame({"latent": [a, a, b, b],
                          "method": ["rule", "rule:control", "llm", "llm:control"],
                          "explanation": ["tokens ' tax'", "control words", "tax words",
                                          "control words"],
                          "score": [0.61, 0.0, 0.88, 0.3], "error": ["", "", "", ""],
                          "score_name": ["f1", "f1", "detection_auroc", "detection_auroc"],
                          # the counts each score's noise comes from
                          "precision": [0.61, 0.0, nan, nan],
                          "n_fired_heldout": [100, 100, nan, nan],
                          "n_matched_heldout": [100, 20, nan, nan],
                          "n_positive": [nan, nan, 20, 20], "n_negative": [nan, nan, 20, 20]})
    out = export_dashboards(stats, store, sae, latents, tmp_path / "d.html", tokenizer=tokenizer,
                            n_contexts=4, before=5, after=2, explanations=table)
    soup = BeautifulSoup(out.read_text(encoding="utf-8"), "html.parser")
    sections = {int(s["data-latent"]): s for s in soup.find_all("section", class_="latent")}
    assert sections[a].find("h2").get_text() == f"Latent {a}: tokens ' tax'"
    line = sections[a].find("div", class_="explanation").get_text()
    assert "tokens ' tax'" in line and "rule, f1 0.61" in line
    assert sections[b].find("h2").get_text() == f"Latent {b}: tax words"
    assert sections[latents[2]].find("div", class_="explanation") is None  # none given
    assert "control words" not in soup.get_text()
    index = [li.get_text() for li in soup.find("ul").find_all("li")]
    assert index[0].startswith(f"latent {a} rule: tokens ' tax' (F1 0.61, control 0.00) · ")
    assert index[1].startswith(
        f"latent {b} llm: tax words (detection AUROC 0.88, control 0.30) · ")


def test_latents_table_shows_a_space_token_where_it_peaked():
    from sae_nb.views.dashboard import latents_table_html

    page = latents_table_html([3, 4, 5, 6], [1.0, 2.0, 3.0, 4.0],
                              at_tokens=[" ", "\n", " the", "<a>"])
    cells = re.findall(r'<span class="tokens">(.*?)</span>', page)
    assert cells == ["·", "↵", "·the", "&lt;a&gt;"]
