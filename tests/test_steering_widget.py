"""The steering widget's callbacks in a plain Python process (no browser): set values, click."""

from __future__ import annotations

import html
import re

import numpy as np
import pandas as pd
import pytest
import torch
from test_intervene import PROMPT, SITE, topk
from test_steering_session import bf16_greedy, bf16_model

import sae_nb
from sae_nb.interventions.effects import generate, sample_tokens
from sae_nb.interventions.session import Continuations
from sae_nb.interventions.splice import Splice, ablate, prompt_tokens
from sae_nb.interventions.steering import latent_method
from sae_nb.latents.contexts import latent_contexts
from sae_nb.latents.stats import feature_stats
from sae_nb.views import steering_widget
from sae_nb.views.dashboard import latent_captions
from sae_nb.views.explorer_data import best_of, explained_captions
from sae_nb.views.steering_widget import SteeringWidget


def visible(markup: str) -> str:
    """The text a browser shows for ``markup`` (tags dropped, entities read)."""
    return html.unescape(re.sub(r"<[^>]+>", "", markup))


def test_generate_shows_clean_and_steered_text_and_tables(llama):
    sae = topk()
    w = SteeringWidget(llama, sae, prompt=PROMPT, latent=3, coefficient=0.0, scale=5.0,
                       max_new_tokens=6, n_attributed=4, precision="float32")
    w.generate_button.click()
    assert w.clean_text == w.steered_text  # coefficient 0
    assert w.clean_text == generate(llama, PROMPT, max_new_tokens=6)[0]
    w.coefficient.value = 1.0
    w.generate_button.click()
    expected = generate(llama, PROMPT, sae, latent_method(sae, 3, 5.0).edits(1.0),
                        max_new_tokens=6)[0]
    assert w.steered_text == expected and w.steered_text != w.clean_text
    assert "promoted" in w.logits.value and "suppressed" in w.logits.value
    assert len(w.attributed.children) == 4
    first = w.top.iloc[0]
    w.attributed.children[0].children[0].click()  # ablate the top attributed latent
    text = generate(llama, PROMPT, sae, [ablate(int(first.latent), int(first.position),
                                                int(first.position) + 1)], max_new_tokens=6)[0]
    shown = visible(w.ablation.value)
    assert f"Latent {first.latent} ablated at position {first.position}" in shown
    assert PROMPT + text in shown and PROMPT + w.clean_text in shown  # beside the clean text
    assert "without the steering edit" in shown


def test_the_default_decodes_in_bfloat16_and_says_so(llama):
    sae = topk()
    w = SteeringWidget(llama, sae, prompt=PROMPT, latent=3, coefficient=1.0, scale=5.0,
                       max_new_tokens=6, n_attributed=2)
    w.generate_button.click()
    ref, ids = bf16_model(llama), prompt_tokens(llama, PROMPT)
    bump = 5.0 * sae.W_dec[3].detach() / sae.W_dec[3].detach().norm()
    tok = llama.tokenizer
    assert w.clean_text == tok.decode(bf16_greedy(ref, ids, 6))
    assert w.steered_text == tok.decode(bf16_greedy(ref, ids, 6, bump))
    assert "continuations decoded in bfloat16" in visible(w.status.value)
    plain = SteeringWidget(llama, sae, prompt=PROMPT, scale=5.0, max_new_tokens=2,
                           n_attributed=1, precision="float32")
    plain.generate_button.click()
    assert "continuations decoded in float32" in visible(plain.status.value)


def test_an_empty_prompt_is_reported_in_the_widget(llama):
    w = SteeringWidget(llama, topk(), prompt="", scale=1.0)
    w.generate_button.click()
    assert "empty" in w.status.value and w.texts.value == ""


def test_a_prompt_longer_than_the_models_positions_is_reported_in_the_widget(llama):
    """The interventions layer refuses it by name; the widget shows that, not a traceback."""
    w = SteeringWidget(llama, topk(), prompt="a" * 300, scale=1.0, max_new_tokens=4)
    w.generate_button.click()
    assert "301 tokens" in w.status.value and "256 positions" in w.status.value
    assert w.texts.value == "" and not w.generate_button.disabled
    w.prompt.value, w.tokens.value = "a" * 250, 20  # fits, but not with 20 new tokens
    w.generate_button.click()
    assert "max_new_tokens=20" in w.status.value and w.texts.value == ""


@pytest.fixture(scope="module")
def searchable(llama, corpus_dir, tmp_path_factory):
    """A store of the tiny model at the dictionary's site and the dictionary's statistics."""
    store = sae_nb.extract_activations(llama, tmp_path_factory.mktemp("widget"), sites=[SITE],
                                       corpus=str(corpus_dir), n_tokens=1024, ctx_len=32,
                                       dtype="float32", progress=False)[SITE]
    sae = topk()
    stats = feature_stats(store, sae, n_top=6, n_quantiles=3, per_quantile=2, n_bins=10,
                          batch_size=256, progress=False)
    return store, sae, stats


def test_token_search_picks_the_steered_latent_with_its_caption(llama, searchable):
    store, sae, stats = searchable
    latent = int(np.argmax(stats.max_act))
    (top,) = latent_contexts(store, sae, latent, stats.top_rows[latent, :1], llama.tokenizer)
    word = "".join(top["tokens"][max(top["center"] - 2, 0): top["center"] + 1])
    w = SteeringWidget(llama, sae, prompt=PROMPT, latent=0, scale=5.0, max_new_tokens=4,
                       stats=stats, store=store)
    w.query.value = word  # Enter in the search box
    found = [value for _, value in w.matches.options]
    assert latent in found and w.latent.value == found[0]  # the best match is now steered
    for i in found:  # each one has the query in its top contexts, as the explorer's search
        rows = stats.top_rows[i][stats.top_rows[i] >= 0]
        text = "\0".join("".join(c["tokens"]) for c in latent_contexts(store, sae, i, rows,
                                                                         llama.tokenizer, 4, 0))
        assert word.lower() in text.lower()
    w.matches.value = found[-1]
    assert w.latent.value == found[-1]
    caption = latent_captions(stats, store, llama.tokenizer, latents=[found[-1]])[found[-1]]
    assert caption and html.escape(caption) in w.rows.children[0].caption.value  # top tokens
    assert w._search.n_found >= len(found) and f"{w._search.n_found} match" in w.search_status.value
    w.query.value = "no such text anywhere §§"
    assert w.matches.options == () and "No latent" in w.search_status.value
    assert w.latent.value == found[-1]  # a failed search leaves the latent as it was


def test_without_statistics_the_widget_says_how_to_get_the_search(llama):
    w = SteeringWidget(llama, topk(), prompt=PROMPT, scale=1.0)
    assert "stats=" in w.children[3].children[1].value
    with pytest.raises(ValueError, match="stats=feature_stats"):
        w.search("the")


def test_generate_shows_a_busy_state_then_everything_at_once(llama, monkeypatch):
    w = SteeringWidget(llama, topk(), prompt=PROMPT, latent=3, coefficient=1.0, scale=5.0,
                       max_new_tokens=4, n_attributed=2)
    seen = []
    real = w.session.logit_changes

    def spy(*args, **kwargs):  # the last computation before the results are shown
        seen.append((w.generate_button.disabled, w.generate_button.description,
                     w.status.value, w.texts.value, w.logits.value))
        return real(*args, **kwargs)

    monkeypatch.setattr(w.session, "logit_changes", spy)
    w.generate_button.click()
    ((disabled, label, status, texts, logits),) = seen
    assert disabled and label == "Generating..." and "generating" in status
    assert texts == logits == ""  # nothing new shown before everything is computed
    assert not w.generate_button.disabled and w.generate_button.description == "Generate"
    assert w.texts.value and w.logits.value and len(w.attributed.children) == 2


def test_the_latent_picker_shows_each_latents_best_explanation(llama, searchable):
    """The widget shows the caption the explorer shows (the explorer's best explanation, chosen
    by sae_nb.explanations.tables, in front of the top tokens), for every latent it lists."""
    store, sae, stats = searchable
    latent = int(np.argmax(stats.max_act))
    other = int(np.argsort(stats.max_act)[-2])
    table = pd.DataFrame({"latent": [latent, latent, latent, other],
                          "method": ["rule", "llm", "rule:control", "rule"],
                          "explanation": ["tokens ' z'", "the letter zed", "control text",
                                          "digits"],
                          "score": [0.9, 0.4, 0.1, 0.7], "score_name": ["f1", "f1", "f1", "f1"],
                          "error": ["", "", "", ""]})
    w = SteeringWidget(llama, sae, prompt=PROMPT, latent=latent, scale=5.0, stats=stats,
                       store=store, explanations=table)
    tokens = latent_captions(stats, store, llama.tokenizer, latents=[latent, other])
    expected = explained_captions(tokens, best_of(table))
    shown = w.rows.children[0].caption.value
    assert html.escape(expected[latent]) in shown and tokens[latent] in expected[latent]
    assert "control text" not in shown
    w.latent.value = other
    assert html.escape(expected[other]) in w.rows.children[0].caption.value
    plain = SteeringWidget(llama, sae, prompt=PROMPT, latent=other, scale=5.0, explanations=table)
    only = explained_captions({other: ""}, best_of(table))[other]
    assert plain.label(other) == f"{other} {only}".rstrip()  # no store: no top tokens


def test_two_latents_three_samples_and_the_divergence_highlighted(llama):
    sae = topk()
    w = SteeringWidget(llama, sae, prompt=PROMPT, latent=[3, 11], coefficient=[0.8, -0.6],
                       scale=5.0, max_new_tokens=6, n_attributed=2, temperature=0.9, seed=7,
                       samples=3, precision="float32")
    w.generate_button.click()
    edits = (latent_method(sae, 3, 5.0).edits(0.8) + latent_method(sae, 11, 5.0).edits(-0.6))
    ids = prompt_tokens(llama, PROMPT)
    pairs = re.findall(r'<div class="sae-nb-pair".*?</div></div></div>', w.texts.value, re.S)
    assert len(pairs) == 3
    differ = 0
    for j, seed in enumerate((7, 8, 9)):
        clean = generate(llama, PROMPT, max_new_tokens=6, temperature=0.9, seed=seed)[0]
        steered = generate(llama, PROMPT, sae, edits, max_new_tokens=6, temperature=0.9,
                           seed=seed)[0]
        assert (w.clean_texts[j], w.steered_texts[j]) == (clean, steered)
        shown = visible(pairs[j])
        assert PROMPT + clean in shown and PROMPT + steered in shown  # in full
        ids_seed = ids.repeat(1, 1)
        a = sample_tokens(llama, ids_seed, 6, 0.9, seed)[0].tolist()
        with Splice(llama, sae, edits):
            b = sample_tokens(llama, ids_seed, 6, 0.9, seed)[0].tolist()
        tails = re.findall(r'<span class="diverged"', pairs[j])
        assert len(tails) == (2 if a != b else 0)  # highlighted exactly when tokens differ
        differ += a != b
    assert differ  # the steering changed some sample
    assert "seeds [7, 8, 9]" in w.status.value


def test_the_highlight_starts_at_the_first_differing_token(llama):
    tok = llama.tokenizer
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    clean = Continuations([ids("abcdef")], ["abcdef"], torch.zeros(1))
    other = Continuations([ids("abXYZf")], ["abXYZf"], torch.zeros(1))
    page = steering_widget.pair_html("P", clean, other, "steered", tok, [0])
    tails = re.findall(r'<span class="diverged"[^>]*>(.*?)</span>', page)
    assert tails == ["cdef", "XYZf"] and "diverges at generated token 3 of 6" in page
    same = steering_widget.pair_html("P", clean, clean, "steered", tok, [0])
    assert "diverged" not in same and "the same 6 tokens" in same


def test_a_second_generate_reuses_the_clean_run(llama, monkeypatch):
    w = SteeringWidget(llama, topk(), prompt=PROMPT, latent=3, coefficient=0.5, scale=5.0,
                       max_new_tokens=4, n_attributed=2, temperature=0.7, samples=2)
    w.generate_button.click()
    assert set(w.session.computed) == {"clean", "steered", "attribution"}
    w.coefficient.value = 0.9
    w.generate_button.click()
    assert w.session.computed == ["steered"] and "clean run cached" in w.status.value


def test_rows_add_remove_and_the_search_fills_the_last_row(llama, searchable):
    store, sae, stats = searchable
    w = SteeringWidget(llama, sae, prompt=PROMPT, latent=0, scale=5.0, stats=stats, store=store)
    w.add_button.click()
    assert len(w.rows.children) == 2
    found = w.search("the")
    assert w.rows.children[-1].latent.value == found[0] and w.latent.value == 0
    w.rows.children[0].remove.click()
    assert [r.latent.value for r in w.rows.children] == [found[0]]
    w.rows.children[0].remove.click()  # the last row stays
    assert len(w.rows.children) == 1


def test_ablate_shows_a_busy_state_and_predicted_beside_measured(llama, monkeypatch):
    w = SteeringWidget(llama, topk(), prompt=PROMPT, latent=3, coefficient=0.8, scale=5.0,
                       max_new_tokens=4, n_attributed=3)
    w.generate_button.click()
    seen = []
    real = w.session.ablation

    def spy(*args, **kwargs):
        seen.append(([b.disabled for b in w.ablate_buttons.values()],
                     [b.description for b in w.ablate_buttons.values()], w.ablation.value))
        return real(*args, **kwargs)

    monkeypatch.setattr(w.session, "ablation", spy)
    w.attributed.children[1].children[0].click()
    ((disabled, labels, panel),) = seen
    assert all(disabled) and labels[1] == "Ablating..." and "ablating latent" in panel
    assert not any(b.disabled for b in w.ablate_buttons.values())
    r = w.top.iloc[1]
    result = w.ablated
    shown = visible(w.ablation.value)
    assert f"predicted {result['predicted']:+.3f} (attribution)" in shown
    assert f"measured {result['measured']:+.3f}" in shown
    assert result["predicted"] == pytest.approx(float(r.attribution), rel=1e-5)


def test_latent_numbers_open_the_explorer(llama, searchable):
    store, sae, stats = searchable
    explorer = sae_nb.FeatureExplorer(stats, store, sae, model=llama)
    w = SteeringWidget(llama, sae, prompt=PROMPT, latent=[5, 9], coefficient=[0.5, 0.2],
                       scale=5.0, max_new_tokens=3, n_attributed=3, stats=stats, store=store,
                       explorer=explorer)
    w.generate_button.click()
    links = re.findall(r'data-latent="(\d+)" onclick="([^"]*)"',
                       "".join(r.children[1].value for r in w.attributed.children)
                       + w.status.value + w.rows.children[1].caption.value)
    shown = [int(i) for i, _ in links]
    assert set(w.top["latent"]) <= set(shown) and {5, 9} <= set(shown)
    assert all("sae-nb-open-latent" in html.unescape(js) for _, js in links)
    target = int(w.top.iloc[0].latent)
    w.open_box.value = target  # what a link's click sends
    assert explorer.latent == target and w.explorer_box.selected_index == 0
    assert w.open_box.value == -1  # ready for the same latent again
    w.open_box.value = 9
    assert explorer.latent == 9


def test_the_executed_notebook_keeps_a_static_snapshot(llama):
    w = SteeringWidget(llama, topk(), prompt=PROMPT, latent=3, coefficient=0.8, scale=5.0,
                       max_new_tokens=4, n_attributed=2)
    w.generate()
    bundle = w._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    page = bundle["text/html"]
    assert "static snapshot" in page and "<script" not in page and "<style" not in page
    assert PROMPT + w.steered_text in visible(page) and "promoted" in page
    assert not bundle["text/plain"].startswith("SteeringWidget(children=")


def test_readable_table_shows_texts_in_full_left_aligned_with_visible_tokens():
    long = "a continuation that runs well past fifty characters, " * 3 + "<b>end</b>"
    frame = pd.DataFrame({"prompt": ["The film was"], "continuation": [long],
                          "token": [" good\n"], "p": [0.123456]})
    page = steering_widget.readable_table(frame).to_html()
    assert html.escape(long) in page and "text-align: left" in page
    assert "..." not in page and "..." in frame._repr_html_()  # pandas cuts it at 50
    assert steering_widget.display_token(" good\n", alone=True) in page and "0.1235" in page


def test_the_logit_table_shows_the_ranking_and_visible_tokens(llama, searchable):
    changes = pd.DataFrame({"effect": ["promoted"], "token": [" good"], "p_change": [0.25],
                            "p_clean": [0.1], "p_edited": [0.35], "logprob_change": [1.25]})
    page = steering_widget.changes_html(changes)
    assert "Δp (ranked by)" in page and "+0.2500" in page
    assert steering_widget.display_token(" good", alone=True) in page
    store, sae, stats = searchable
    table = pd.DataFrame({"class": ["a", "b"], "latent": [1, 2], "weight": [0.3, 0.2]})
    shown = steering_widget.with_top_tokens(table, stats, store, llama.tokenizer)
    captions = latent_captions(stats, store, llama.tokenizer, 4, latents=[1, 2])
    assert list(shown.columns) == ["class", "latent", "caption", "weight"]
    assert shown["caption"].tolist() == [captions[1], captions[2]]
    assert steering_widget.with_top_tokens(table, None, None, llama.tokenizer) is table


def test_find_latent_ranks_as_the_explorers_search_does(llama, searchable):
    """The same query in the explorer (notebook 06) and in the widget's "find latent"
    (notebook 07) ranks the same latents the same way: both count promoted output tokens."""
    store, sae, stats = searchable
    effects = sae_nb.logit_effects(llama, sae)
    explorer = sae_nb.FeatureExplorer(stats, store, sae, model=llama, logit_effects=effects)
    w = SteeringWidget(llama, sae, prompt=PROMPT, latent=3, coefficient=0.2, scale=5.0,
                       max_new_tokens=3, n_attributed=2, stats=stats, store=store,
                       explorer=explorer)
    (top,) = latent_contexts(store, sae, int(np.argmax(stats.max_act)),
                             stats.top_rows[int(np.argmax(stats.max_act)), :1], llama.tokenizer)
    query = top["tokens"][top["center"]]
    assert w.search(query) == explorer.search(query) != []
    # a token only a latent's logit effects hold is found by both
    promoted = llama.tokenizer.decode([int(effects.top_ids[0, 0])])
    assert w.search(promoted) == explorer.search(promoted)
    assert w._search.promoted == explorer._search.promoted and any(w._search.promoted)


def test_ablate_buttons_keep_their_width_beside_a_long_line(llama):
    w = SteeringWidget(llama, topk(), prompt=PROMPT, latent=3, coefficient=0.2, scale=5.0,
                       max_new_tokens=3, n_attributed=3)
    w.generate()
    for row in w.attributed.children:
        button, line = row.children
        assert button.layout.flex == "0 0 auto"  # never shrunk to "ablate 42..."
        assert line.layout.min_width == "0"  # the line wraps instead
        assert visible(line.value).startswith("at position")  # the caption comes last


def test_the_notebooks_next_token_table_shows_promoted_tokens_with_positive_effects():
    """An edit that lowers every logit (the softmax does not care) while raising one token's
    probability: the table lists that token as promoted with positive changes only, and no
    raw logit change (-1 here) that would read as the opposite."""
    from sae_nb.interventions.effects import change_table

    class Tok:
        def batch_decode(self, batches):
            return [f" t{b[0]}" for b in batches]

        def convert_ids_to_tokens(self, i):
            return f"t{i}"

    clean = torch.tensor([2.0, 1.0, 0.5, 0.0])
    edited = clean - torch.tensor([1.0, 1.0, 1.0, 0.2])  # token 3 rises, by probability
    changes = change_table(Tok(), clean, edited, k=3)
    # Its raw logit change, -0.2, read as the opposite; the table has no such column.
    assert "logit_change" not in changes.columns
    page = steering_widget.changes_view(changes).data
    rows = [visible(r) for r in re.findall(r"<tr>(.*?)</tr>", page)][1:]
    shown = [r for r in rows if r.startswith("promoted")]
    p = torch.softmax(clean, -1), torch.softmax(edited, -1)
    rose = int((p[1] - p[0] > 0).sum())
    assert len(shown) == rose == 1 and "·t3" in shown[0]
    assert all("-" not in r.split("·t3")[1] for r in shown)  # Δp, p, Δ log p all positive
    assert all(visible(r).startswith("suppressed") for r in rows[1:])
    assert "logit_change" not in page and "Δ logit" not in page


def test_a_printed_verdict_wraps_between_words():
    text = ("Per unit of KL on neutral text, difference of means moves sentiment furthest "
            "(+5.552 per nat; shifts count when beyond two standard errors over 8 prompts). "
            "latent 3783: no coefficient moved sentiment beyond noise")
    lines = steering_widget.wrapped(text).splitlines()
    assert len(lines) > 1 and max(map(len, lines)) <= 88  # no line the output wraps again
    assert " ".join(lines) == text  # every break between two words
