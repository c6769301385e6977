"""The steering widget's callbacks in a plain Python process (no browser): set values, click."""

from __future__ import annotations

import html

import numpy as np
import pandas as pd
import pytest
from test_intervene import PROMPT, SITE, topk

import sae_nb
from sae_nb.interventions.effects import generate
from sae_nb.interventions.splice import ablate
from sae_nb.interventions.steering import latent_method
from sae_nb.latents.contexts import latent_contexts
from sae_nb.latents.stats import feature_stats
from sae_nb.views import steering_widget
from sae_nb.views.dashboard import latent_captions
from sae_nb.views.steering_widget import SteeringWidget


def test_generate_shows_clean_and_steered_text_and_tables(llama):
    sae = topk()
    w = SteeringWidget(llama, sae, prompt=PROMPT, latent=3, coefficient=0.0, scale=5.0,
                       max_new_tokens=6, n_attributed=4)
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
    assert f"latent {first.latent} ablated at position {first.position}" in w.ablation.value
    assert html.escape(text) in w.ablation.value


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
    assert caption and html.escape(caption) in w.caption.value  # its top tokens beside it
    assert w._search.n_found >= len(found) and f"{w._search.n_found} match" in w.search_status.value
    w.query.value = "no such text anywhere §§"
    assert w.matches.options == () and "No latent" in w.search_status.value
    assert w.latent.value == found[-1]  # a failed search leaves the latent as it was


def test_without_statistics_the_widget_says_how_to_get_the_search(llama):
    w = SteeringWidget(llama, topk(), prompt=PROMPT, scale=1.0)
    assert "stats=" in w.children[2].value
    with pytest.raises(ValueError, match="stats=feature_stats"):
        w.search("the")


def test_generate_shows_a_busy_state_then_everything_at_once(llama, monkeypatch):
    w = SteeringWidget(llama, topk(), prompt=PROMPT, latent=3, coefficient=1.0, scale=5.0,
                       max_new_tokens=4, n_attributed=2)
    seen = []
    real = steering_widget.logit_changes

    def spy(*args, **kwargs):  # the last computation before the results are shown
        seen.append((w.generate_button.disabled, w.generate_button.description,
                     w.status.value, w.texts.value, w.logits.value))
        return real(*args, **kwargs)

    monkeypatch.setattr(steering_widget, "logit_changes", spy)
    w.generate_button.click()
    ((disabled, label, status, texts, logits),) = seen
    assert disabled and label == "Generating..." and "generating" in status
    assert texts == logits == ""  # nothing new shown before everything is computed
    assert not w.generate_button.disabled and w.generate_button.description == "Generate"
    assert w.texts.value and w.logits.value and len(w.attributed.children) == 2


def test_the_latent_picker_shows_each_latents_best_explanation(llama, searchable):
    store, sae, stats = searchable
    latent = int(np.argmax(stats.max_act))
    other = int(np.argsort(stats.max_act)[-2])
    table = pd.DataFrame({"latent": [latent, latent, latent, other],
                          "method": ["rule", "llm", "rule:control", "rule"],
                          "explanation": ["tokens ' z'", "the letter zed", "control text",
                                          "digits"],
                          "score": [0.9, 0.4, 0.95, 0.7], "score_name": ["f1", "f1", "f1", "f1"],
                          "error": ["", "", "", ""]})
    w = SteeringWidget(llama, sae, prompt=PROMPT, latent=latent, scale=5.0, stats=stats,
                       store=store, explanations=table)
    assert "tokens &#x27; z&#x27; (f1 0.90)" in w.caption.value  # the best, not the control
    assert "control text" not in w.caption.value and "zed" not in w.caption.value
    caption = latent_captions(stats, store, llama.tokenizer, latents=[latent])[latent]
    assert html.escape(caption) in w.caption.value  # the top tokens stay after it
    w.latent.value = other
    assert "digits (f1 0.70)" in w.caption.value
    plain = SteeringWidget(llama, sae, prompt=PROMPT, latent=other, scale=5.0, explanations=table)
    assert plain.label(other) == f"{other} digits (f1 0.70)"  # no store: no top tokens
