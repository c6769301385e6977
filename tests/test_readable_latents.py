"""Tokens, logit tables, captions and search orders as a reader meets them, against values
worked out by hand: spaces and whitespace visible, logit effects at a typical activation with
word pieces last, ties in search broken by selectivity, an explorer opening on a word."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from bs4 import BeautifulSoup

from sae_nb.activations.store import INDEX_DTYPE
from sae_nb.latents.logit_effects import (
    LogitEffects,
    final_norm,
    is_word_piece,
    residual_scale,
    store_words,
)
from sae_nb.views.dashboard import display_token, latent_captions, logit_table_html, token_label
from sae_nb.views.explorer_data import LatentSearch, opening_latent

VOCAB = [" great", " Great", "\n", " ", "eveloped", " comprom", "ise", " tax", " taxable",
         "\ufffd", " the", "House", "3", " ", "`):x"]
ID = {t: i for i, t in enumerate(VOCAB) if t not in ("\ufffd",)}


class Tokenizer:
    """One string per id (as ``batch_decode`` of a single id gives it)."""

    def batch_decode(self, batches):
        return [VOCAB[b[0]] for b in batches]

    def convert_ids_to_tokens(self, i):
        return "<0xE2>" if VOCAB[i] == "\ufffd" else VOCAB[i]


class Store:
    """A store's index alone: one context per list of token ids."""

    def __init__(self, contexts: list[list[int]]):
        rows = [(t, c, o, c, o) for c, ids in enumerate(contexts) for o, t in enumerate(ids)]
        self._index = np.array(rows, dtype=INDEX_DTYPE)

    def index(self, rows=slice(None)):
        return self._index[rows]


# -- tokens read alone ------------------------------------------------------------------------

def test_tokens_alone_show_their_spaces_and_whitespace():
    assert token_label(" great") == "·great"
    assert token_label(" ") == "·" and token_label("  ") == "··"
    assert token_label("\n") == "↵" and token_label("\t") == "⇥" and token_label("") == "∅"
    assert token_label("\r\r\n  ") == "⇤⇤↵··"  # a glyph chromium's monospace font has
    assert display_token(" <b>", alone=True) == "·&lt;b&gt;"
    assert display_token(" great") == " great"  # inside a context, text stays text


def test_captions_are_labelled_and_show_spaces_and_byte_fragments():
    tops = np.array([[ID[" great"], ID[" great"], ID[" Great"]], [ID["\n"], 9, 9]])
    stats = SimpleNamespace(d_sae=2, top_rows=np.array([[0, 1, 2], [3, 4, 5]]))
    store = SimpleNamespace(index=lambda rows: {"token": tops.reshape(-1)[rows]})
    captions = latent_captions(stats, store, Tokenizer())
    assert captions[0] == "top tokens: ·great, ·Great"
    assert captions[1] == "top tokens: \\xe2, ↵"  # the fragment's byte, not "\ufffd"


# -- logit effects on a comparable scale, words first ---------------------------------------

def test_word_pieces_by_their_text():
    pieces = ["eveloped", "ise", " \\xe2\\x80", "getenv", "x_1", "`):x"]
    words = [" great", " Great", "House", "3", " U.S.", "'s", '",', "\n", " well-being", "-"]
    assert [is_word_piece(t) for t in pieces] == [True] * len(pieces)
    assert [is_word_piece(t) for t in words] == [False] * len(words)


def test_store_words_leave_out_word_starts_and_unseen_tokens():
    # " comprom" is followed by "ise" both times it occurs: a word's start, not a word.
    store = Store([[ID[" the"], ID[" comprom"], ID["ise"], ID[" tax"]],
                   [ID[" comprom"], ID["ise"], ID[" the"], ID[" tax"], ID["3"]]])
    words = store_words(store, Tokenizer())
    assert words == {ID[" the"], ID["ise"], ID[" tax"], ID["3"]}


def test_logit_table_values_at_a_typical_activation_words_first():
    ids = np.array([[ID["eveloped"], ID[" comprom"], ID[" great"], ID["3"]]])
    values = np.array([[220.0, 150.0, 90.0, 80.0]])
    effects = LogitEffects(ids, values, ids[:, ::-1], -values[:, ::-1], scale=40.0)
    words = frozenset({ID[" great"], ID["3"], ID["eveloped"]})
    table = effects.tokens(Tokenizer(), 0, activation=0.1, words=words)
    # words (by value) then pieces (by value): "eveloped" is a piece by its text alone
    assert table["promoted"].tolist() == [" great", "3", "eveloped", " comprom"]
    assert table["promoted_value"].tolist() == pytest.approx([90 * 0.1 / 40, 80 * 0.1 / 40,
                                                              220 * 0.1 / 40, 150 * 0.1 / 40])
    assert table["promoted_piece"].tolist() == [False, False, True, True]
    assert table["suppressed"].tolist() == ["3", " great", " comprom", "eveloped"]
    html = BeautifulSoup(logit_table_html(table, 0.1), "html.parser")
    head = [th.get_text() for th in html.find_all("th")]
    assert head == ["promoted (words, then pieces)", "Δ logit ▼ within each",
                    "suppressed (words, then pieces)", "Δ logit ▲ within each"]
    first = [td.get_text() for td in html.find("table").find_all("tr")[1].find_all("td")]
    assert first == ["·great", "+0.225", "3", "-0.200"]
    greyed = [td.get_text() for td in html.find_all("td", class_="muted")]
    assert greyed == ["eveloped", "+0.550", "·comprom", "-0.375", "·comprom", "+0.375",
                      "eveloped", "-0.550"]
    assert "0.1" in html.find(class_="logit-note").get_text()


def test_residual_scale_is_the_median_rms_into_the_final_norm(llama):
    """Read at the last decoder layer's output (what the final norm receives), not the norm."""
    from sae_nb.activations.models import hf_model  # only this test reads the module

    hf = hf_model(llama)
    text = "the cat sat on the mat and the dog sat on the log"
    seen = []
    hook = hf.model.layers[-1].register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with torch.no_grad():
            hf(llama.tokenizer(text, return_tensors="pt").input_ids)
    finally:
        hook.remove()
    out = seen[0][0] if isinstance(seen[0], tuple) else seen[0]  # (1, T, D)
    rms = out[0].float().pow(2).mean(-1).sqrt()
    assert residual_scale(llama, text) == pytest.approx(float(rms[1:].median()), rel=1e-5)
    assert final_norm(llama) is hf.model.norm


# -- search ties and the opening latent --------------------------------------------------------

def test_search_ties_go_to_the_more_selective_latent():
    # Latents 0-3 each have 2 top rows, all on a token containing " tax": equal scores.
    # 0: " taxable" and " tax"; 1, 2, 3: " tax" twice. 2 has the better explanation; 3 fires
    # on fewer tokens than 1.
    contexts = [[ID[" the"], ID[" taxable"]]] + [[ID[" the"], ID[" tax"]]] * 7
    store = Store(contexts)
    rows = np.arange(len(contexts)) * 2 + 1  # the second token of each context
    stats = SimpleNamespace(top_rows=rows.reshape(4, 2),
                            density=np.array([0.001, 0.003, 0.004, 0.002]))
    search = LatentSearch(stats, store, Tokenizer(), window=1,
                          explanation_scores=np.array([0.9, np.nan, 0.8, np.nan]))
    found = search(" tax")
    assert [s for _, s in found] == [6, 6, 6, 6]  # 2 x (2 + 1): a tie on score
    assert [i for i, _ in found] == [2, 3, 1, 0]


def test_explorer_opens_on_a_latent_whose_top_token_is_a_word():
    order = [7, 3, 5, 1]
    captions = {7: "top tokens: ·", 3: "top tokens: aughter", 5: "top tokens: ·Interior, 3",
                1: "top tokens: ·tax"}
    assert opening_latent(order, captions) == 5
    assert opening_latent([7, 3], captions) == 7  # none is a word: the first
