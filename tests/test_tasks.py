"""Tasks from shipped data, k-sparse probing, and absorption scored on planted directions."""

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ArrayStore, make_tokenizer

from sae_nb.comparison import tasks
from sae_nb.dictionaries.architectures import ReLUSAE
from sae_nb.texts.probing import DEFAULT_CACHE, VADER_SDIST, LabelError, split_labeled, top_latents


def planted_tokens(child_share, seed=0, n=4000, d=16, n_background=12):
    """Tokens with a property carried by a parent latent (0, decoder e0); on a share of them
    a child latent (1, decoder (e0 + e1)/sqrt 2) fires and the parent goes silent. Background
    latents (decoders orthogonal to e0 and e1) fire on every kind of token."""
    rng = np.random.default_rng(seed)
    F = 2 + n_background
    W = np.zeros((F, d))
    W[0, 0] = 1.0
    W[1, :2] = 1 / np.sqrt(2)
    bg = rng.normal(size=(n_background, d))
    bg[:, :2] = 0
    W[2:] = bg / np.linalg.norm(bg, axis=1, keepdims=True)
    has = rng.random(n) < 0.4
    child = has & (rng.random(n) < child_share)
    codes = np.zeros((n, F))
    codes[has & ~child, 0] = rng.uniform(2, 4, (has & ~child).sum())
    codes[child, 1] = rng.uniform(2, 4, child.sum()) * np.sqrt(2)
    on = rng.random((n, n_background)) < 0.2
    codes[:, 2:] = on * rng.uniform(0.5, 3, (n, n_background))
    b_dec = rng.normal(size=d) * 0.5
    acts = codes @ W + b_dec + rng.normal(size=(n, d)) * 0.05
    return acts, codes, W, b_dec, has


def score(child_share, **kw):
    acts, codes, W, b, has = planted_tokens(child_share, **kw)
    train, test = split_labeled(has, 0.25, 0)
    return tasks.absorption_scores(acts, codes, W, b, has, train, test)


def test_one_latent_carrying_the_property_is_not_absorbed():
    s = score(0.0)
    assert s["main_latents"] == [0]
    assert s["probe_accuracy"] > 0.98 and s["main_f1"] > 0.98
    assert s["full_absorption"] < 0.02 and s["absorption_fraction"] < 0.02


@pytest.mark.parametrize("share", [0.3, 0.45])
def test_a_silent_parent_on_a_child_subset_is_absorption(share):
    s = score(share, seed=1)
    assert s["main_latents"] == [0]  # the parent still detects the property best
    # the scored tokens are the probe's true positives, about all tokens with the property
    assert s["true_positives"] > 300
    assert abs(s["full_absorption"] - share) < 0.06, s
    assert abs(s["absorption_fraction"] - share) < 0.06, s
    assert abs(s["main_silent"] - share) < 0.06, s


def test_feature_splitting_takes_the_child_as_a_main_latent():
    # the child fires where the parent is silent: together they detect the property, so
    # SAEBench's feature splitting keeps both and nothing is left to call absorption
    acts, codes, W, b, has = planted_tokens(0.3, seed=2)
    assert list(tasks.split_latents(codes, has)) == [0, 1]
    assert tasks.firing_f1(codes, has, [0, 1]) == 1.0
    train, test = split_labeled(has, 0.25, 0)
    s = tasks.absorption_scores(acts, codes, W, b, has, train, test, split_tau=0.03)
    assert s["main_latents"] == [0, 1] and s["full_absorption"] < 0.02


def test_k_sparse_probe_picks_the_planted_latent():
    rng = np.random.default_rng(0)
    n, F = 400, 50
    y = rng.integers(0, 2, n)
    codes = np.maximum(rng.normal(size=(n, F)), 0)
    codes[:, 17] = np.where(y == 1, rng.uniform(1, 2, n), 0.0) + 0.1 * rng.random(n)
    raw = rng.normal(size=(n, 8))
    train, test = split_labeled(y, 0.25, 0)
    assert list(top_latents(codes[train], y[train], 1)) == [17]
    table = tasks.sparse_probing_rows(raw, codes, y, train, test, k_values=(1, 2, 5))
    acc = table.set_index("probe")["accuracy"]
    assert list(acc.index) == ["raw", "all latents", "top 1 latents", "top 2 latents",
                               "top 5 latents"]
    assert acc["top 1 latents"] > 0.95 and acc["raw"] < 0.7


def check_task(df, n_per_class, classes):
    counts = df["label"].value_counts()
    assert len(counts) == classes and (counts == n_per_class).all(), counts
    assert df["text"].is_unique
    train, test = split_labeled(df["label"], 0.25, 0)
    assert not set(df["text"].iloc[train]) & set(df["text"].iloc[test])


@pytest.mark.slow  # reads and splits the whole SOTU corpus (about 4 s)
@pytest.mark.parametrize("name,classes", [("sotu_era", 4), ("sotu_party", 2)])
def test_sotu_tasks_are_balanced_with_no_text_in_both_splits(name, classes):
    df = tasks.build_task(name, 40, seed=3)
    check_task(df, 40, classes)
    again = tasks.build_task(name, 40, seed=3)
    pd.testing.assert_frame_equal(df, again)  # the seed decides the draw
    if name == "sotu_era":  # every label agrees with its paragraph's year
        lo = df["label"].str[:4].astype(int)
        hi = df["label"].str[5:].astype(int)
        assert ((df["year"] >= lo) & (df["year"] <= hi)).all()


@pytest.mark.skipif(not (DEFAULT_CACHE / VADER_SDIST).exists(),
                    reason="the VADER source distribution is not cached (probing.fetch_vader)")
@pytest.mark.parametrize("name,classes", [("vader_domain", 4), ("vader_sentiment", 2)])
def test_vader_tasks_are_balanced_with_no_text_in_both_splits(name, classes):
    check_task(tasks.build_task(name, 50), 50, classes)


def test_balanced_refuses_a_small_class_and_dedupes():
    df = pd.DataFrame({"text": ["a", "a", "b", "c", "d"], "label": ["x", "x", "x", "y", "y"]})
    with pytest.raises(LabelError, match="n_per_class=3"):
        tasks.balanced(df, 3)
    out = tasks.balanced(df, 2)
    assert sorted(out["text"]) == ["a", "b", "c", "d"]
    with pytest.raises(LabelError, match="nope"):
        tasks.build_task("nope", 2)


class SpellTokenizer:
    vocab = [" the", "The", "1990", " 7", "ing", " Paris", "\n"]

    def batch_decode(self, ids):
        return [self.vocab[i[0]] for i in ids]


def test_token_properties_follow_the_decoded_text():
    props = tasks.token_properties(SpellTokenizer(), [0, 1, 2, 3, 4, 5, 6])
    assert props["leading_space"].tolist() == [True, False, False, True, False, True, False]
    assert props["capitalised"].tolist() == [False, True, False, False, False, True, False]
    assert props["digit"].tolist() == [False, False, True, True, False, False, False]


def relu_dictionary(W_dec) -> ReLUSAE:
    """Codes relu(x @ W_dec.T) for orthonormal decoder rows: each latent reads one direction."""
    sae = ReLUSAE(W_dec.shape[1], W_dec.shape[0])
    with torch.no_grad():
        sae.W_dec.copy_(torch.as_tensor(W_dec))
        sae.W_enc.copy_(torch.as_tensor(W_dec).T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_absorption_table_on_a_store_of_tokens():
    tok = make_tokenizer()
    ids = {c: tok.convert_tokens_to_ids(c) for c in "ABCxyz789"}
    rng = np.random.default_rng(0)
    chars = rng.choice(list(ids), 3000)
    d = 8
    acts = rng.normal(size=(3000, d)) * 0.05
    acts[:, :2] = -np.abs(acts[:, :2])  # latents 0 and 1 silent unless their property holds
    acts[:, 2:] += rng.uniform(0, 1, (3000, d - 2))  # other latents fire on every token
    capital = np.array([c.isupper() for c in chars])
    digit = np.array([c.isdigit() for c in chars])
    acts[capital, 0] += rng.uniform(1, 2, capital.sum())  # latent 0: a capital
    acts[digit, 1] += rng.uniform(1, 2, digit.sum())  # latent 1: a digit
    store = ArrayStore(acts, np.array([ids[c] for c in chars]), np.float32)
    props = {"capitalised": tasks.PROPERTIES["capitalised"], "digit": tasks.PROPERTIES["digit"]}
    table = tasks.absorption_table(store, relu_dictionary(np.eye(d)), tok, props,
                                   n_tokens=2000).set_index("property")
    assert table.loc["capitalised", "main_latents"] == "0"
    assert table.loc["digit", "main_latents"] == "1"
    sample = np.sort(np.random.default_rng(0).choice(3000, 2000, replace=False))
    assert table.loc["digit", "share"] == pytest.approx(digit[sample].mean())
    assert (table["probe_accuracy"] > 0.97).all() and (table["main_f1"] > 0.97).all()
    assert (table["full_absorption"] == 0).all() and (table["absorption_fraction"] == 0).all()


def pooled_site_acts(llama, text: str) -> torch.Tensor:
    """``(D,)`` the mean over a text's tokens (BOS left out) of layer 1's output, by a hook."""
    tok = llama.tokenizer
    ids = torch.tensor([[tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]])
    acts = []
    handle = llama._module.model.layers[1].register_forward_hook(
        lambda m, a, out: acts.append(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            llama._module(input_ids=ids)
    finally:
        handle.remove()
    return acts[0][0, 1:].mean(0)


def test_sparse_probing_table_on_the_tiny_model(llama, tmp_path):
    # The label is the text's first word. A ReLU dictionary with one live latent (17) that
    # reads, always above 0 and so linearly, the direction between the two classes' pooled
    # activations (found here by a plain hook): its pooled code is that projection, which
    # separates the classes with a wide margin (checked below), so the top-1 probe, which must
    # pick latent 17 (every other latent is silent), scores 1, as does the raw probe.
    df = pd.DataFrame({"text": [f"{w} number {i}" for i in range(12) for w in ("aaaa", "zzzz")],
                       "label": ["a", "z"] * 12})
    pooled = torch.stack([pooled_site_acts(llama, t) for t in df["text"]])  # (24, D)
    is_a = torch.from_numpy(df["label"].to_numpy() == "a")
    u = pooled[is_a].mean(0) - pooled[~is_a].mean(0)
    u = u / u.norm()
    proj = pooled @ u
    gap = proj[is_a].min() - proj[~is_a].max()
    assert gap > 0.5 * (proj.max() - proj.min())  # a margin: any sane 1-D probe gets it right
    dictionary = ReLUSAE(pooled.shape[1], 64)
    with torch.no_grad():
        dictionary.W_enc.zero_()
        dictionary.W_enc[:, 17] = u
        dictionary.b_enc.fill_(-1e3)  # silent
        dictionary.b_enc[17] = 1e2  # always positive: the code is the projection plus 100
        dictionary.b_dec.zero_()
    dictionary.metadata = {"site": "resid_out_layer1"}
    table = tasks.sparse_probing_table(llama, dictionary, tasks=(), data={"toy": df},
                                       k_values=(1, 2), run_dir=tmp_path)
    assert table["probe"].tolist() == ["raw", "all latents", "top 1 latents", "top 2 latents"]
    assert (table["task"] == "toy").all() and (table["rows"] == 24).all()
    assert (table["classes"] == 2).all()
    # A stratified quarter of 12 + 12 rows: 3 of each class held out, so the majority is 0.5.
    assert (table["majority_baseline"] == 0.5).all()
    assert (table["accuracy"] == 1.0).all() and (table["roc_auc"] == 1.0).all(), table
    assert len(list((tmp_path / "probing").glob("features_*.npz"))) == 1
    wide = tasks.sparse_probing_wide(table)
    assert list(wide.columns) == ["raw", "all latents", "top 1 latents", "top 2 latents",
                                  "majority_baseline"]
