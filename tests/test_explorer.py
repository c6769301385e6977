"""FeatureExplorer driven as a user would, in a plain Python process: set a widget's value,
click a button, then read the figure's data and the rendered HTML."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter

import ipywidgets
import numpy as np
import pytest
import torch
from bs4 import BeautifulSoup

import sae_nb
from sae_nb.activations.models import hf_model
from sae_nb.dictionaries.architectures import TopKSAE
from sae_nb.latents.contexts import latent_contexts
from sae_nb.latents.stats import LogitEffects, feature_stats
from sae_nb.views import explorer as explorer_module
from sae_nb.views.explorer import FeatureExplorer, latent_order, top_latents, unusual_latents

SITE = "resid_out_layer1"
TEXT = "the state of the union is strong"


@pytest.fixture(scope="module")
def setup(llama, corpus_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("explorer")
    store = sae_nb.extract_activations(llama, folder, sites=[SITE], corpus=str(corpus_dir),
                                       n_tokens=1024, ctx_len=32, dtype="float32",
                                       progress=False)[SITE]
    torch.manual_seed(3)
    sae = TopKSAE(32, 64, k=4)
    sae.metadata = {"site": SITE, "model": "tiny"}
    stats = feature_stats(store, sae, n_top=6, n_quantiles=3, per_quantile=2, n_bins=10,
                          batch_size=256, progress=False)
    assert (stats.density > 0).sum() > 10  # enough live latents to tell them apart
    return store, sae, stats


@pytest.fixture
def explorer(setup, llama):
    store, sae, stats = setup
    # Plain sort order: half the tiny dictionary's latents are "dense" (k=4 of 64 fire per row).
    return FeatureExplorer(stats, store, sae, model=llama, n_contexts=4, before=5, after=2,
                           skip_unusual=False)


def shown_rows(html: str) -> list[int]:
    return [int(tr["data-row"]) for tr in BeautifulSoup(html, "html.parser").find_all("tr")]


def titles(html: str) -> list[float]:
    soup = BeautifulSoup(html, "html.parser")
    return [float(s["title"]) for s in soup.find_all("span", class_="tok")]


def check_shows(explorer, stats, latent: int) -> None:
    """Every panel shows ``latent``: controls, histogram data, contexts, summary."""
    assert explorer.latent == latent and explorer.number.value == latent
    assert explorer.order[explorer.slider.value] == latent
    bar = explorer.figure.data[0]
    assert list(bar.y) == stats.hist_counts[latent].tolist()
    edges = stats.hist_edges[latent]
    assert np.allclose(bar.x, (edges[:-1] + edges[1:]) / 2)
    top = stats.top_rows[latent, :4]
    assert shown_rows(explorer.contexts.value) == top[top >= 0].tolist()
    centers = BeautifulSoup(explorer.contexts.value, "html.parser").find_all(class_="center")
    assert [float(c["title"]) for c in centers] == pytest.approx(
        stats.top_values[latent, : len(centers)].tolist(), rel=1e-3)
    assert f"latent {latent}" in explorer.summary.value


def test_setting_the_latent_changes_the_figure_and_the_contexts(explorer, setup):
    store, sae, stats = setup
    alive = np.nonzero(stats.density > 0)[0]
    a, b = int(alive[0]), int(alive[-1])
    explorer.number.value = a
    check_shows(explorer, stats, a)
    before = (list(explorer.figure.data[0].y), explorer.contexts.value)
    explorer.number.value = b
    check_shows(explorer, stats, b)
    assert (list(explorer.figure.data[0].y), explorer.contexts.value) != before
    contexts = explorer.show_latent(a)
    assert contexts == latent_contexts(store, sae, a, stats.top_rows[a, :4], explorer.tokenizer,
                                       5, 2)


def test_sort_maps_the_slider_to_latents(explorer, setup):
    _, _, stats = setup
    explorer.sort.value = "max activation"
    explorer.slider.value = 0
    check_shows(explorer, stats, int(np.argmax(stats.max_act)))
    explorer.slider.value = 1
    assert stats.max_act[explorer.latent] == np.sort(stats.max_act)[-2]
    latent = explorer.latent
    explorer.sort.value = "density"  # the latent stays; its rank follows the new order
    assert explorer.latent == latent
    by_density_order = latent_order(stats, "density", skip_unusual=False)
    assert explorer.slider.value == int(np.nonzero(by_density_order == latent)[0][0])
    explorer.slider.value = 0
    check_shows(explorer, stats, int(np.argmax(stats.density)))
    store, sae, _ = setup
    by_density = FeatureExplorer(stats, store, sae, tokenizer=explorer.tokenizer, sort="density",
                                 n_contexts=4, before=5, after=2, skip_unusual=False)
    assert by_density.sort.value == "density"
    check_shows(by_density, stats, int(np.argmax(stats.density)))
    chosen = top_latents(stats, 5, skip_unusual=False)
    assert chosen == np.argsort(-stats.max_act, kind="stable")[:5].tolist()
    assert (stats.density[top_latents(stats, 64, "index")] > 0).all()
    with pytest.raises(ValueError, match="sort='size'"):
        latent_order(stats, "size")
    with pytest.raises(ValueError, match="latent=64"):
        explorer.show_latent(64)


def test_search_finds_latents_by_their_top_tokens(explorer, setup):
    store, sae, stats = setup
    latent = int(np.argmax(stats.max_act))
    (top,) = latent_contexts(store, sae, latent, stats.top_rows[latent, :1], explorer.tokenizer)
    word = "".join(top["tokens"][max(top["center"] - 3, 0) : top["center"] + 1])  # byte tokens
    explorer.query.value = word
    found = [value for _, value in explorer.matches.options]
    assert latent in found
    for i in found:  # every match has the query among its top tokens or its contexts
        rows = stats.top_rows[i][stats.top_rows[i] >= 0]
        text = "\0".join("".join(c["tokens"]) for c in latent_contexts(store, sae, i, rows,
                                                                         explorer.tokenizer, 4, 0))
        assert word.lower() in text.lower()
    explorer.matches.value = found[-1]
    check_shows(explorer, stats, found[-1])
    assert explorer.search("no such text anywhere §§") == []


def direct_codes(llama, sae, text: str) -> torch.Tensor:
    """Codes of ``text``'s tokens, from the transformers model's hidden states (BOS first)."""
    tok = llama.tokenizer
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = hf_model(llama)(torch.tensor([ids]), output_hidden_states=True)
        return sae.encode(out.hidden_states[2][0, 1:])  # after block 1; BOS left out


def test_text_box_shows_activations_equal_to_a_direct_encode(explorer, setup, llama):
    _, sae, stats = setup
    codes = direct_codes(llama, sae, TEXT)  # (T, F)
    latent = int(codes.max(0).values.argmax())
    explorer.number.value = latent
    explorer.text.value = TEXT
    explorer.run_button.click()
    torch.testing.assert_close(torch.tensor(titles(explorer.text_view.value)), codes[:, latent],
                               rtol=1e-3, atol=1e-5)
    spans = BeautifulSoup(explorer.text_view.value, "html.parser").find_all(class_="tok")
    assert "".join(s.get_text() for s in spans) == TEXT
    acts = explorer.run_text(TEXT)
    torch.testing.assert_close(torch.from_numpy(acts), codes[:, latent], rtol=1e-4, atol=1e-5)
    listed = [value for _, value in explorer.text_jump.options]
    other = listed[1]
    explorer.text_jump.value = other  # choosing a strong latent of the text shows it
    check_shows(explorer, stats, other)
    torch.testing.assert_close(torch.tensor(titles(explorer.text_view.value)), codes[:, other],
                               rtol=1e-3, atol=1e-5)


def test_text_box_without_a_model_says_what_to_pass(setup, llama):
    store, sae, stats = setup
    explorer = FeatureExplorer(stats, store, sae, tokenizer=llama.tokenizer)
    explorer.text.value = TEXT
    explorer.run_button.click()
    assert "model=" in explorer.text_view.value
    with pytest.raises(ValueError, match="model="):
        explorer.run_text(TEXT)
    with pytest.raises(ValueError, match="tokenizer"):
        FeatureExplorer(stats, store, sae)


def test_recent_latents_are_cached(explorer, setup, monkeypatch):
    _, _, stats = setup
    calls = []
    real = explorer_module.latent_contexts
    monkeypatch.setattr(explorer_module, "latent_contexts",
                        lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    explorer.cache_size = 2
    explorer._cache.clear()
    alive = [int(i) for i in np.nonzero(stats.density > 0)[0][:3]]
    for latent in alive + alive[1:]:
        explorer.show_latent(latent)
    assert calls == alive  # the last two were cached
    explorer.show_latent(alive[0])  # evicted: encoded again
    assert calls == alive + alive[:1]
    assert re.search(r"latent \d+", explorer.summary.value)


def test_logit_effects_panel_and_search_by_promoted_token(setup, llama):
    store, sae, stats = setup
    tok = llama.tokenizer
    F, k = stats.d_sae, 3
    a, q, z = (tok.convert_tokens_to_ids(c) for c in "aQz")  # no "q" in the test corpus
    top_ids = np.full((F, k), a)
    top_ids[7, 1] = q
    values = np.arange(F * k, dtype=np.float32).reshape(F, k)
    effects = LogitEffects(top_ids, values, np.full((F, k), z), -values)
    explorer = FeatureExplorer(stats, store, sae, tokenizer=tok, logit_effects=effects)
    explorer.number.value = 7
    rows = BeautifulSoup(explorer.logits.value, "html.parser").find_all("tr")[1:]
    cells = [[td.get_text() for td in tr.find_all("td")] for tr in rows]
    m = float(stats.mean_act[7])  # the values are at the latent's mean activation (scale 1)
    assert cells == [["a", f"+{21 * m:.3f}", "z", f"-{21 * m:.3f}"],
                     ["Q", f"+{22 * m:.3f}", "z", f"-{22 * m:.3f}"],
                     ["a", f"+{23 * m:.3f}", "z", f"-{23 * m:.3f}"]]
    assert explorer.search("Q") == [7]


def test_styles_stay_inside_the_widget(explorer):
    """JupyterLab applies a widget's <style> to the whole page: every rule must be scoped."""
    assert "sae-nb-explorer" in explorer.widget._dom_classes
    style = explorer.widget.children[0].value
    rules = re.findall(r"([^{}]+)\{", style.removeprefix("<style>"))
    assert len(rules) >= 8
    for head in rules:
        for selector in head.split(","):
            assert selector.strip().startswith(".sae-nb-explorer "), selector


# -- what a person sees and does in the browser -----------------------------------------------

def second_alive(stats, other: int) -> int:
    """An alive latent whose histogram differs from ``other``'s."""
    return next(int(i) for i in np.nonzero(stats.density > 0)[0]
                if stats.hist_counts[i].tolist() != stats.hist_counts[other].tolist())


def test_reloaded_page_gets_the_shown_latents_histogram(explorer, setup):
    """A reloaded page rebuilds the figure from the widget's synced state, not from the
    messages that updated it: that state must hold the latent shown."""
    _, _, stats = setup
    latent = second_alive(stats, explorer.latent)
    explorer.number.value = latent
    (bar,) = explorer.figure._widget_data  # what a new browser view is built from
    assert list(bar["y"]) == stats.hist_counts[latent].tolist()
    edges = stats.hist_edges[latent]
    assert np.allclose(bar["x"], (edges[:-1] + edges[1:]) / 2)
    assert f"latent {latent}" in explorer.figure._widget_layout["title"]["text"]


def test_search_moves_to_the_first_match_and_counts_them(explorer, setup):
    store, sae, stats = setup
    latent = int(np.argmax(stats.max_act))
    (top,) = latent_contexts(store, sae, latent, stats.top_rows[latent, :1], explorer.tokenizer)
    word = "".join(top["tokens"][max(top["center"] - 2, 0) : top["center"] + 1])
    explorer.number.value = second_alive(stats, latent)
    explorer.query.value = word  # Enter in the search box
    found = [value for _, value in explorer.matches.options]
    assert found and explorer.latent == found[0]  # the panel moved to the best match
    check_shows(explorer, stats, found[0])
    assert explorer.matches.value == found[0]  # the menu shows its first item
    total = explorer._search.n_found
    assert total >= len(found) and f"{total} match" in explorer.search_status.value
    elsewhere = next(i for i in np.nonzero(stats.density > 0)[0] if int(i) not in found)
    explorer.number.value = int(elsewhere)  # navigating elsewhere clears the stale match
    assert explorer.matches.value is None and explorer.latent == int(elsewhere)
    assert "showing the best" not in explorer.search_status.value  # it no longer is
    assert f"{total} match" in explorer.search_status.value  # the count stays
    explorer.matches.value = found[-1]  # the menu still offers the matches
    check_shows(explorer, stats, found[-1])
    explorer.query.value = "no such text anywhere §§"
    assert explorer.matches.options == () and "No latent" in explorer.search_status.value


def test_text_box_shows_a_busy_state_then_clears_it(explorer, setup, monkeypatch):
    seen = []
    real = explorer_module.text_activations

    def spy(*args, **kwargs):
        seen.append((explorer.run_button.disabled, explorer.run_button.description,
                     explorer.text_view.value))
        return real(*args, **kwargs)

    monkeypatch.setattr(explorer_module, "text_activations", spy)
    explorer.text.value = TEXT
    explorer.run_button.click()
    ((disabled, label, view),) = seen  # while the model ran
    assert disabled and "Running" in label and "Running the model" in view
    assert not explorer.run_button.disabled and explorer.run_button.description == "Run"
    assert "tok" in explorer.text_view.value and explorer.text_jump.options


def test_empty_text_says_what_to_do_and_clears_the_last_result(explorer):
    explorer.text.value = TEXT
    explorer.run_button.click()
    assert explorer.text_jump.options
    for empty in ("", "   \n"):
        explorer.text.value = empty
        explorer.run_button.click()
        assert "Type some text" in explorer.text_view.value
        assert "Error" not in explorer.text_view.value  # no exception name shown to the user
        assert explorer.text_latents.value == "" and explorer.text_jump.options == ()
        assert not explorer.run_button.disabled
    explorer.number.value = (explorer.latent + 1) % explorer.stats.d_sae  # the old text is gone
    assert "Type some text" in explorer.text_view.value


def test_default_order_puts_dense_and_outlier_latents_last(setup, llama):
    """The first latents shown are not the dense ones nor the max-activation outliers; a
    switch shows them in plain sort order."""
    store, sae, stats = setup
    planted = dataclasses.replace(stats, max_act=stats.max_act.copy(),
                                  density=stats.density.copy())
    alive = np.nonzero(stats.density > 0)[0]
    outliers = alive[:3]
    planted.max_act[outliers] = 50 * stats.max_act.max()  # far above every other latent
    planted.density[alive[3:5]] = 0.5  # fire on half of the tokens
    dense = np.nonzero(planted.density > explorer_module.DENSE)[0]
    assert set(np.nonzero(unusual_latents(planted))[0]) == set(outliers) | set(dense)
    usual = [int(i) for i in alive if i not in set(outliers) | set(dense)]
    assert len(usual) > 10
    by_max = sorted(usual, key=lambda i: (-planted.max_act[i], i))
    assert latent_order(planted, "max activation")[: len(usual)].tolist() == by_max
    assert top_latents(planted, 4) == by_max[:4]
    plain = latent_order(planted, "max activation", skip_unusual=False)
    assert set(plain[:3].tolist()) == set(outliers.tolist())
    ex = FeatureExplorer(planted, store, sae, tokenizer=llama.tokenizer, sort="max activation")
    assert ex.latent == by_max[0] and "outlier" not in ex.summary.value
    ex.show_unusual.value = True  # the switch: outliers first again
    ex.slider.value = 0
    assert ex.latent in set(outliers.tolist())
    assert "outlier" in ex.summary.value


def test_prev_and_next_step_one_rank(explorer, setup):
    _, _, stats = setup
    explorer.sort.value = "density"
    explorer.slider.value = 5
    explorer.next_button.click()
    assert explorer.slider.value == 6 and explorer.latent == explorer.order[6]
    explorer.prev_button.click()
    explorer.prev_button.click()
    assert explorer.slider.value == 4 and explorer.latent == explorer.order[4]
    explorer.slider.value = 0
    explorer.prev_button.click()  # stays at the ends
    assert explorer.slider.value == 0


def test_logit_table_says_what_its_values_are(explorer):
    """The logit values come with their scale: at the latent's mean activation, in nats."""
    def texts(widget):
        if isinstance(widget, ipywidgets.HTML) and not widget.value.startswith("<style>"):
            yield widget.value
        for child in getattr(widget, "children", ()):
            yield from texts(child)

    (caption,) = [BeautifulSoup(t, "html.parser").get_text() for t in texts(explorer.widget)
                  if "Logit effects" in t]
    assert "decoder direction promotes" in caption
    note = BeautifulSoup(explorer.logits.value, "html.parser").find(class_="logit-note")
    if explorer.logit_effects is not None:
        text = note.get_text()
        assert "mean activation when firing" in text and "nats" in text and "word pieces" in text
        assert f"({float(explorer.stats.mean_act[explorer.latent]):.3g})" in text


def brute_caption(stats, store, tokenizer, latent: int, n: int = 2) -> str:
    """The commonest tokens at the latent's top rows (ties: the stronger row's first), labelled,
    spaces as · and newlines as ↵."""
    ids = [int(store.index(np.array([r]))["token"][0]) for r in stats.top_rows[latent] if r >= 0]
    def label(t: int) -> str:
        text = tokenizer.decode([t])
        shown = text.replace(" ", "·").replace("\n", "↵").replace("\t", "⇥")
        if text and set(text) == {" "}:  # a lone space is named
            shown += " (space)" if len(text) == 1 else f" ({len(text)} spaces)"
        return shown

    shown = [label(t) for t, _ in Counter(ids).most_common(n)]
    return "top tokens: " + ", ".join(shown) if shown else ""


def test_text_box_lists_latents_with_captions_tokens_and_unclipped_fractions(explorer, setup,
                                                                             llama):
    """Each listed latent has its top tokens and the token of the text it fires on most;
    "of its max" is peak / store max unclipped (several rows read 100% before), by it."""
    store, sae, stats = setup
    codes = direct_codes(llama, sae, TEXT).numpy()  # (T, F)
    tokens = [llama.tokenizer.decode([t]) for t in llama.tokenizer(TEXT, add_special_tokens=False)
              ["input_ids"]]
    explorer.text.value = TEXT
    explorer.run_button.click()
    peak = codes.max(0)
    alive = (peak > 0) & (stats.max_act > 0)
    relative = np.where(alive, peak / np.where(stats.max_act > 0, stats.max_act, 1), -1)
    expected = [int(i) for i in np.argsort(-relative, kind="stable")[: min(10, alive.sum())]]
    rows = BeautifulSoup(explorer.text_latents.value, "html.parser").find_all("tr")[1:]
    listed = [v for _, v in explorer.text_jump.options]
    assert relative[listed] == pytest.approx(relative[expected], rel=1e-4)
    for row, latent in zip(rows, listed):
        cells = [td.get_text() for td in row.find_all("td")]
        assert f"{relative[latent]:.1%}" in cells, cells
        caption = brute_caption(stats, store, llama.tokenizer, latent)
        assert caption and cells[0] == f"{latent} {caption}"
        assert float(cells[1]) == pytest.approx(float(peak[latent]), rel=1e-3)
        at = tokens[int(codes[:, latent].argmax())]
        at = at.replace(" ", "·")  # a token alone shows its spaces
        assert cells[2] == at.replace("\n", "↵")
        assert cells[3] == f"{relative[latent]:.1%}"
    labels = [label for label, _ in explorer.text_jump.options]
    first = brute_caption(stats, store, llama.tokenizer, listed[0])
    assert labels[0].startswith(f"latent {listed[0]} {first} (")
    assert len(set(labels)) == len(labels)
    assert "of its max" in explorer.text_latents.value and "largest activation in the store" in \
        explorer.text_latents.value


def test_summary_and_search_menu_show_captions(explorer, setup, llama):
    """The summary and the search matches name each latent's top tokens."""
    store, sae, stats = setup
    latent = int(np.argmax(stats.max_act))
    caption = brute_caption(stats, store, llama.tokenizer, latent)
    explorer.number.value = latent
    summary = BeautifulSoup(explorer.summary.value, "html.parser").get_text()
    assert f"latent {latent} {caption}" in summary
    (top,) = latent_contexts(store, sae, latent, stats.top_rows[latent, :1], explorer.tokenizer)
    explorer.query.value = top["tokens"][top["center"]]
    for label, value in explorer.matches.options:
        caption = brute_caption(stats, store, llama.tokenizer, value)
        assert label.startswith(f"latent {value} {caption} (score ")


def test_display_bundle_carries_a_static_snapshot(explorer, setup, llama):
    """An executed notebook opened without the widget's kernel shows the richest non-widget
    output: a snapshot of the latent shown (no script), not the VBox repr."""
    store, sae, stats = setup
    latent = int(np.argmax(stats.max_act))
    explorer.number.value = latent
    bundle = explorer._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert "VBox" not in bundle["text/plain"] and f"latent {latent} " in bundle["text/plain"]
    soup = BeautifulSoup(bundle["text/html"], "html.parser")
    assert not soup.find_all("script")
    assert f"latent {latent} {brute_caption(stats, store, llama.tokenizer, latent)}" in \
        soup.find("div", class_="summary").get_text()
    top = stats.top_rows[latent, :4]
    assert shown_rows(str(soup.find("table", class_="contexts"))) == top[top >= 0].tolist()
    first = [li.get_text() for li in soup.find("ol").find_all("li")]
    caption = brute_caption(stats, store, llama.tokenizer, explorer.order[0])
    assert first[0] == f"{explorer.order[0]} {caption}".rstrip()


def test_more_contexts_shows_the_next_strongest(explorer, setup):
    """Expected feature: "more contexts" adds the next strongest top rows, up to n_top."""
    store, sae, stats = setup
    latent = int(np.argmax(stats.max_act))
    top = stats.top_rows[latent][stats.top_rows[latent] >= 0].tolist()
    assert len(top) == 6  # n_top of the fixture, explorer shows 4
    explorer.number.value = latent
    assert shown_rows(explorer.contexts.value) == top[:4]
    explorer.more_button.click()
    assert shown_rows(explorer.contexts.value) == top
    codes = sae.encode(torch.from_numpy(store[np.array(top)]).float())[:, latent]
    centers = BeautifulSoup(explorer.contexts.value, "html.parser").find_all(class_="center")
    assert [float(c["title"]) for c in centers] == pytest.approx(codes.tolist(), rel=1e-3)
    assert explorer.more_button.disabled and "6 of 6" in explorer.more_button.description
    explorer.step(+1)  # another latent starts again at n_contexts
    assert len(shown_rows(explorer.contexts.value)) <= 4 and not (
        explorer.more_button.disabled and len(shown_rows(explorer.contexts.value)) == 4)


def test_histogram_title_gives_the_density(explorer, setup):
    """Expected feature: activation density on the histogram (brute force over the store)."""
    store, sae, stats = setup
    with torch.no_grad():
        codes = sae.encode(torch.from_numpy(store[:]).float())  # (N, F)
    latent = int(np.argmax(stats.max_act))
    explorer.number.value = latent
    density = float((codes[:, latent] > 0).float().mean())
    assert f"density {density:.3%} of {len(store):,} tokens" in explorer.figure.layout.title.text


def test_nearest_latents_and_family_are_links(setup, llama, tmp_path):
    """Expected features: the latent's nearest latents by decoder cosine (brute force over the
    decoder rows) and its family from notebook 05's latents.csv, each a link that opens it."""
    store, sae, stats = setup
    latent = int(np.argmax(stats.max_act))
    family = [latent, (latent + 7) % 64, (latent + 9) % 64]
    others = [i for i in range(64) if i not in family][:3]
    csv = tmp_path / "latents.csv"
    csv.write_text("latent,fires,cofiring_family\n" + "".join(
        f"{m},5,{0 if m in family else 1}\n" for m in family + others))
    ex = FeatureExplorer(stats, store, sae, model=llama, n_contexts=4, before=5, after=2,
                         skip_unusual=False, families=str(csv), n_nearest=3)
    ex.number.value = latent
    w = sae.W_dec.detach().numpy()
    cos = (w @ w[latent]) / np.linalg.norm(w, axis=1) / np.linalg.norm(w[latent])
    cos[latent] = -np.inf
    soup = BeautifulSoup(ex.related.value, "html.parser")
    spans = soup.find_all("span", recursive=True)
    near = [int(a["data-latent"]) for a in spans[0].find_all("a")]
    assert near == np.argsort(-cos)[:3].tolist()
    assert [int(a["data-latent"]) for a in soup.find_all("a")][3:] == family[1:]
    for a in soup.find_all("a"):
        assert ".sae-nb-number input" in a["onclick"] and f"'{a['data-latent']}'" in a["onclick"]
    assert FeatureExplorer(stats, store, sae, model=llama, n_contexts=4,
                           families=str(tmp_path / "none.csv")).families == {}


def test_text_table_latents_are_links_to_them(explorer):
    """Expected feature: every latent in the text box's table is a link that opens it."""
    explorer.text.value = TEXT
    explorer.run_button.click()
    rows = BeautifulSoup(explorer.text_latents.value, "html.parser").find_all("tr")[1:]
    for row in rows:
        link = row.find("a", class_="latent-link")
        assert link["data-latent"] == row["data-latent"]
        assert f"b.value = '{row['data-latent']}'" in link["onclick"]


def hand_explanations(stats) -> tuple[int, int, object]:
    """Two alive latents explained by hand ("tax words" by a rule, "the days of the week" by a
    label), each far beyond its control; the controls and a failed row must never show."""
    import pandas as pd

    alive = np.nonzero(stats.density > 0)[0]
    tax, days = int(alive[0]), int(alive[-1])
    nan = float("nan")
    return tax, days, pd.DataFrame({
        "latent": [tax, tax, days, days, days],
        "method": ["rule", "rule:control", "llm", "llm:control", "rule"],
        "explanation": ["tax words", "a control text", "the days of the week", "a control text",
                        ""],
        "score": [0.83, 0.0, 0.71, 0.2, nan],
        "score_name": ["f1", "f1", "detection_auroc", "detection_auroc", "f1"],
        "error": ["", "", "", "", "never fired"],
        # the counts each score's noise comes from (sae_nb.explanations.ranking)
        "precision": [0.83, 0.0, nan, nan, nan], "n_fired_heldout": [100, 100, nan, nan, nan],
        "n_matched_heldout": [100, 20, nan, nan, nan], "n_positive": [nan, nan, 20, 20, nan],
        "n_negative": [nan, nan, 20, 20, nan]})


def test_every_latent_shown_carries_its_best_explanation(setup, llama):
    """The summary, the menus, the links and the text table show the best explanation and
    its score; a control or failed row never does."""
    store, sae, stats = setup
    tax, days, table = hand_explanations(stats)
    ex = FeatureExplorer(stats, store, sae, model=llama, n_contexts=4, skip_unusual=False,
                         explanations=table)
    ex.number.value = tax
    summary = BeautifulSoup(ex.summary.value, "html.parser")
    line = summary.find("div", class_="explanation").get_text()
    assert "tax words" in line and "rule, f1 0.83" in line and "control" not in line
    assert ex.label(tax).startswith(f"{tax} rule: tax words (F1 0.83, control 0.00) · ")
    assert ex.label(days).startswith(
        f"{days} llm: the days of the week (detection AUROC 0.71, control 0.20)")
    other = next(i for i in range(stats.d_sae) if i not in (tax, days))
    assert ex.label(other) == f"{other} {ex.token_captions[other]}".rstrip()  # tokens only
    assert "(F1" not in ex.label(other) and "AUROC" not in ex.label(other)
    ex.number.value = days
    assert "the days of the week" in ex.summary.value
    bundle = ex._repr_mimebundle_()
    assert "the days of the week" in BeautifulSoup(bundle["text/html"], "html.parser").get_text()
    ex.text.value = TEXT
    ex.run_button.click()
    rows = BeautifulSoup(ex.text_latents.value, "html.parser").find_all("tr")[1:]
    for row in rows:  # the text table names each latent's explanation too
        assert row.find("td").get_text().startswith(ex.label(int(row["data-latent"])))
    labels = dict((v, k) for k, v in ex.text_jump.options)
    assert all(label.startswith(f"latent {ex.label(i)} (") for i, label in labels.items())


def test_meaning_search_lists_latents_by_explanation(setup, llama, tmp_path):
    """A meaning query fills its menu with latents and similarities, the explained latent
    first, and shows it; the index is cached in the explanations folder."""
    from sae_nb.explanations.meaning import MeaningIndex
    from sae_nb.explanations.tables import save_explanations

    store, sae, stats = setup
    tax, days, table = hand_explanations(stats)
    save_explanations(table, tmp_path, "hand", {"test": 1})
    ex = FeatureExplorer(stats, store, sae, model=llama, n_contexts=4, skip_unusual=False,
                         explanations=tmp_path)
    ex.meaning.value = "taxes"
    assert ex.latent == tax and ex.meaning_matches.value == tax
    label, value = ex.meaning_matches.options[0]
    assert value == tax
    assert label.startswith(f"latent {tax} rule: tax words (F1 0.83, control 0.00)")
    assert re.search(r"\(similarity 0\.\d\d\)$", label)
    status = BeautifulSoup(ex.meaning_status.value, "html.parser").get_text()
    assert "closest in meaning to 'taxes'" in status
    ex.meaning.value = "Monday and Friday"
    assert ex.latent == days and ex.meaning_matches.options[0][1] == days
    assert ex.matches.value is None  # the token search's menu is not touched
    assert (tmp_path / "meaning_index.npz").exists()
    assert MeaningIndex.load(tmp_path).explanations[tax] == "tax words"
    ex.meaning.value = ""
    assert ex.meaning_matches.options == () and ex.meaning_status.value == ""
