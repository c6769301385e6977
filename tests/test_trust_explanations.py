"""Explanation caches under a hostile user: several explainers in one folder, damaged or
foreign lines and keys, and the contexts a scorer may use.

The planted store, its dictionary and the oracle backend come from ``test_autointerp``: latent
0 fires exactly on "z", latent 1 on digits, and the oracle names them "the letter z" and
"digits".
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
import test_autointerp as planted
from test_autointerp import Oracle

from sae_nb.explanations import scoring
from sae_nb.explanations.autointerp import ExplainSettings, llm_explanations, shown_rows
from sae_nb.explanations.scoring import ScoreSettings, detection_scores, embedding_scores
from sae_nb.explanations.tables import load_explanations
from sae_nb.latents.stats import feature_stats
from sae_nb.util.errors import SaeNbError

# the planted store's fixtures, shared with test_autointerp
store, dictionary, stats = planted.store, planted.dictionary, planted.stats
tokenizer = planted.tokenizer


class Another(Oracle):
    """A second explainer (another identity) with labels of its own."""

    name = "another"

    def complete(self, prompt, max_tokens=32, stop=("\n",)):
        self.calls += 1
        return "another label"


def records_file(folder, kind: str = "llm"):
    """The one results file of ``kind`` in ``folder``."""
    found = sorted(folder.glob(f"{kind}*.jsonl"))
    assert len(found) == 1, found
    return found[0]


# -- one results file per explainer -----------------------------------------------------------
def test_a_second_explainer_keeps_the_first_explainers_labels(store, dictionary, stats,
                                                              tokenizer, tmp_path):
    first = llm_explanations(store, dictionary, stats, [0, 1], tokenizer, backend=Oracle(),
                             cache=tmp_path)
    assert first["explanation"].tolist() == ["the letter z", "digits"]
    other = llm_explanations(store, dictionary, stats, [0, 1], tokenizer, backend=Another(),
                             cache=tmp_path)
    assert other["explanation"].tolist() == ["another label"] * 2
    assert load_explanations(tmp_path)["explanation"].tolist() == ["another label"] * 2
    back = Oracle()
    again = llm_explanations(store, dictionary, stats, [0, 1], tokenizer, backend=back,
                             cache=tmp_path)
    assert back.calls == 0  # the first explainer's labels were kept
    assert again["explanation"].tolist() == ["the letter z", "digits"]
    # reading the folder gives the explainer used last
    assert load_explanations(tmp_path)["explanation"].tolist() == ["the letter z", "digits"]


def test_a_second_scorer_keeps_the_first_scorers_scores(store, dictionary, stats, tokenizer,
                                                        tmp_path):
    table = llm_explanations(store, dictionary, stats, [0, 1], tokenizer, backend=Oracle())
    first = detection_scores(store, dictionary, stats, table, tokenizer, backend=Oracle(),
                             cache=tmp_path)
    detection_scores(store, dictionary, stats, table, tokenizer, backend=Another(),
                     cache=tmp_path)
    back = Oracle()
    again = detection_scores(store, dictionary, stats, table, tokenizer, backend=back,
                             cache=tmp_path)
    assert back.calls == 0 and again.equals(first)


def test_a_missing_identity_file_does_not_delete_the_records(store, dictionary, stats,
                                                             tokenizer, tmp_path):
    llm_explanations(store, dictionary, stats, [0, 1], tokenizer, backend=Oracle(),
                     cache=tmp_path)
    path = records_file(tmp_path)
    saved = path.read_text()
    for key in tmp_path.glob("llm*.identity.json"):
        key.unlink()
    again = Oracle()
    table = llm_explanations(store, dictionary, stats, [0, 1], tokenizer, backend=again,
                             cache=tmp_path)
    assert path.exists() and path.read_text() == saved
    assert again.calls == 0 and table["explanation"].tolist() == ["the letter z", "digits"]
    # a records file left without its key (an older version, a copy) is kept as it is
    old = tmp_path / "old"
    old.mkdir()
    line = {"key": "0", "latent": 0, "method": "llm", "explanation": "old label", "score": None,
            "score_name": "", "error": ""}
    (old / "llm.jsonl").write_text(json.dumps(line) + "\n")
    llm_explanations(store, dictionary, stats, [0, 1], tokenizer, backend=Oracle(), cache=old)
    assert (old / "llm.jsonl").read_text() == json.dumps(line) + "\n"


# -- damaged lines and keys -------------------------------------------------------------------
def test_lines_that_are_not_records_are_skipped_by_name_and_redone(store, dictionary, stats,
                                                                   tokenizer, tmp_path,
                                                                   caplog):
    llm_explanations(store, dictionary, stats, [0, 1, 2], tokenizer, backend=Oracle(),
                     cache=tmp_path)
    path = records_file(tmp_path)
    lines = path.read_text().splitlines()
    no_key = {k: v for k, v in json.loads(lines[2]).items() if k != "key"}
    path.write_text("\n".join([lines[0], "[1, 2]", "5", json.dumps(no_key), '{"key": "1"}'])
                    + "\n")
    again = Oracle()
    with caplog.at_level(logging.WARNING):
        table = llm_explanations(store, dictionary, stats, [0, 1, 2], tokenizer, backend=again,
                                 cache=tmp_path)
    assert again.calls == 2  # latents 1 and 2 are explained again, latent 0 is reused
    assert table["explanation"].tolist()[:2] == ["the letter z", "digits"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for number in (2, 3, 4, 5):
        assert any(f"{path.name}, line {number}" in m for m in warned), warned


def test_a_folder_with_lines_that_are_not_records_still_loads(tmp_path, caplog):
    good = {"key": "a", "latent": 3, "method": "llm", "explanation": "tax words", "score": 0.8,
            "score_name": "detection_auroc", "error": ""}
    (tmp_path / "detection.jsonl").write_text(f"[1, 2]\n{json.dumps(good)}\n7\n")
    with caplog.at_level(logging.WARNING):
        table = load_explanations(tmp_path)
    assert table["explanation"].tolist() == ["tax words"] and table["score"].tolist() == [0.8]
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "detection.jsonl, line 1" in warned and "detection.jsonl, line 3" in warned


def test_an_earlier_versions_records_of_this_identity_are_taken_over(store, dictionary, stats,
                                                                     tokenizer, tmp_path):
    llm_explanations(store, dictionary, stats, [0, 1], tokenizer, backend=Oracle(),
                     cache=tmp_path)
    path = records_file(tmp_path)
    saved = path.read_text()
    # the names an earlier version gave them: one file per kind
    path.rename(tmp_path / "llm.jsonl")
    [key] = tmp_path.glob("llm.*.identity.json")
    key.rename(tmp_path / "llm.identity.json")
    (tmp_path / "llm.current.json").unlink()
    again = Oracle()
    llm_explanations(store, dictionary, stats, [0, 1], tokenizer, backend=again, cache=tmp_path)
    assert again.calls == 0 and path.read_text() == saved
    assert not (tmp_path / "llm.jsonl").exists()


@pytest.mark.parametrize("garbage", ["{not json", "[1, 2]", "", '{"dictionary": "another"}'])
def test_a_damaged_identity_file_is_a_clear_error(store, dictionary, stats, tokenizer,
                                                  tmp_path, garbage):
    llm_explanations(store, dictionary, stats, [0], tokenizer, backend=Oracle(), cache=tmp_path)
    path = records_file(tmp_path)
    saved = path.read_text()
    [key] = tmp_path.glob("llm*.identity.json")
    key.write_text(garbage)
    with pytest.raises(SaeNbError) as err:
        llm_explanations(store, dictionary, stats, [0], tokenizer, backend=Oracle(),
                         cache=tmp_path)
    assert key.name in str(err.value) and "delete" in str(err.value).lower()
    assert path.read_text() == saved  # nothing lost


# -- the contexts a scorer may use ------------------------------------------------------------
@pytest.fixture(scope="module")
def deep_stats(store, dictionary):
    """More top rows and intervals than the explainer's defaults show."""
    return feature_stats(store, dictionary, n_top=20, n_quantiles=6, per_quantile=10,
                         progress=False)


class Letters:
    """A fake embedder: whether a text has a z, a digit."""

    def encode(self, texts):
        return np.array([["z" in t, any(c.isdigit() for c in t)] for t in texts], float)


@pytest.mark.parametrize("recorded", [True, False])
def test_scorers_leave_out_exactly_the_contexts_the_explainer_was_shown(
        store, dictionary, deep_stats, tokenizer, monkeypatch, recorded):
    wide = ExplainSettings(n_top=16, n_interval=6)  # more than the defaults (8 and 4)
    table = llm_explanations(store, dictionary, deep_stats, [0, 1], tokenizer,
                             backend=Oracle(), settings=wide)
    rules = pd.DataFrame({"latent": [0, 1], "method": "rule", "explanation": ["z", "0"],
                          "score": 1.0, "score_name": "f1", "error": ""})
    table = pd.concat([rules, table], ignore_index=True)  # as notebook 08 scores them
    explain = {}
    if not recorded:  # a table that does not say what was shown: the settings are passed
        table = pd.DataFrame(table[["latent", "method", "explanation", "score", "score_name",
                                    "error"]])
        explain = {"explain": wide}
    used = []
    original = scoring.scoring_examples
    monkeypatch.setattr(scoring, "scoring_examples",
                        lambda *a, **k: used.append(original(*a, **k)) or used[-1])
    every = ScoreSettings(n_positive=1000, n_negative=5)  # all the contexts it may use
    detection_scores(store, dictionary, deep_stats, table, tokenizer, backend=Oracle(),
                     settings=every, control=False, **explain)
    embedding_scores(store, dictionary, deep_stats, table, tokenizer, embedder=Letters(),
                     settings=every, control=False, **explain)
    assert sorted(ex.latent for ex in used) == [0, 0, 1, 1]
    for ex in used:
        top, intervals = deep_stats.top_rows[ex.latent], deep_stats.quantile_rows[ex.latent]
        shown = set(top[:16].tolist()) | set(intervals[:6, 0].tolist())
        pool = set(top.tolist()) | set(intervals.reshape(-1).tolist())
        shown.discard(-1)
        pool.discard(-1)
        assert len(shown) > 12  # more than the defaults would leave out
        assert {w["row"] for w in ex.positives} == pool - shown


def test_shown_rows_are_read_back_from_text_and_a_bad_cell_is_named():
    class Stats:  # one latent: top rows 5, 6 (then padding); interval samples 7 and 9 first
        top_rows = np.array([[5, 6, -1]])
        quantile_rows = np.array([[[7, 8], [9, 1]]])

    csv = pd.DataFrame({"latent": [0, 0], "method": ["llm", "rule"],
                        "shown_rows": ["[3, 1]", np.nan]})  # as a CSV round trip gives them
    assert shown_rows(csv, Stats)[0].tolist() == [1, 3]
    unrecorded = csv.assign(shown_rows=[np.nan, None])  # the default settings' rows instead
    assert shown_rows(unrecorded, Stats)[0].tolist() == [5, 6, 7, 9]
    for bad in ("abc", "[1.5]", "7"):
        with pytest.raises(SaeNbError, match=r"shown_rows=.*explain="):
            shown_rows(csv.assign(shown_rows=[bad, None]), Stats)
