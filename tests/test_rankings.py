"""Honest rankings of explanations: each explanation against its own control of the same score,
shown as a latent's best only beyond noise; the score summary, the method verdict and the
captions that say what each number is."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sae_nb.explanations import ranking
from sae_nb.explanations.tables import (
    best_explained,
    best_explanations,
    explanation_captions,
    explanation_verdicts,
    method_comparison,
    method_verdict,
    score_summary,
    summary_notes,
    with_explanations,
)

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "08_explain.ipynb"


def f1_row(latent, method, explanation, tp, fired, matched):
    """A rule row scored by held-out F1 from its counts, as rules.explanation_table writes."""
    return {"latent": latent, "method": method, "explanation": explanation,
            "score": 2 * tp / (fired + matched), "score_name": "f1", "error": "",
            "precision": tp / matched if matched else 0.0, "n_fired_heldout": fired,
            "n_matched_heldout": matched}


def auroc_row(latent, method, explanation, score, name, n=10):
    """A detection or embedding row, as scoring writes it: n firing and n silent contexts."""
    return {"latent": latent, "method": method, "explanation": explanation, "score": score,
            "score_name": name, "error": "", "n_positive": n, "n_negative": n}


def latent_2579(rule_tp: int) -> list[dict]:
    """The case of the issue: the language model's "months" scores an embedding AUROC of 0.59,
    the highest raw number of the latent, while another latent's rule scores 0.70 on it. The
    rule's own F1 comes from ``rule_tp`` true positives of 40 held-out firings."""
    rule = "tokens ' April', ' June', ' July'"
    return [
        f1_row(2579, "rule", rule, rule_tp, 40, 31),
        f1_row(2579, "rule:control", "tokens ' tax'", 0, 40, 25),
        auroc_row(2579, "rule", rule, 0.55, "embedding_auroc"),
        auroc_row(2579, "rule:control", "tokens ' tax'", 0.70, "embedding_auroc"),
        auroc_row(2579, "llm", "months", 0.59, "embedding_auroc"),
        auroc_row(2579, "llm:control", "sports teams", 0.55, "embedding_auroc"),
        auroc_row(2579, "rule", rule, 0.50, "detection_auroc"),
        auroc_row(2579, "rule:control", "tokens ' tax'", 0.45, "detection_auroc"),
        auroc_row(2579, "llm", "months", 0.52, "detection_auroc"),
        auroc_row(2579, "llm:control", "sports teams", 0.50, "detection_auroc"),
    ]


def test_the_best_explanation_beats_its_own_control_beyond_noise_not_the_raw_score():
    """A rule with 8 of 40 held-out firings right (F1 0.23, control 0.00) is beyond noise; the
    label "months" (AUROC 0.59 against its control's 0.55, from 10 + 10 contexts) is not, so it
    is never shown as best, though its raw number is the latent's highest."""
    table = pd.DataFrame(latent_2579(rule_tp=8))
    best = best_explanations(table)
    row = best.loc[2579]
    assert row["method"] == "rule" and row["score_name"] == "f1"
    assert row["score"] == pytest.approx(16 / 71) and row["control"] == 0.0
    # the margin's noise: a Poisson bootstrap of the held-out counts (tp 8, fp 23, fn 32); for
    # counts this size it is the delta method's sqrt(4 a (b + c) (a + b + c)) / (2a + b + c)^2
    a, b, c = 8, 23, 32
    delta = math.sqrt(4 * a * (b + c) * (a + b + c)) / (2 * a + b + c) ** 2
    assert row["noise"] == pytest.approx(delta, rel=0.2)
    assert row["effect"] == pytest.approx(row["margin"] / row["noise"]) and row["effect"] > 2


def test_a_latent_no_explanation_of_which_beats_its_control_is_unexplained():
    """With one true positive of 40 firings the rule's F1 (0.03) is within noise of its
    control's 0: nothing is beyond noise, so the latent has no best explanation and its verdict
    says it is unexplained (not "months", the highest raw score)."""
    table = pd.DataFrame(latent_2579(rule_tp=1))
    assert 2579 not in best_explanations(table).index
    verdict = explanation_verdicts(table).loc[2579]
    assert verdict["verdict"] == "unexplained"
    assert verdict["effect"] < 2  # the closest candidate, for the record
    joined = with_explanations(pd.DataFrame({"latent": [2579, 7]}), explanation_verdicts(table))
    assert joined.loc[0, "explanation"] == "" and joined.loc[0, "explanation_verdict"] == (
        "unexplained")
    assert joined.loc[1, "explanation_verdict"] == "not scored"


def test_an_explanation_without_a_control_is_never_shown_as_best():
    table = pd.DataFrame([f1_row(0, "rule", "tokens ' tax'", 30, 40, 35)])
    assert best_explanations(table).empty
    assert explanation_verdicts(table).loc[0, "verdict"] == "unexplained"


def test_a_table_with_nothing_usable_gives_no_margins_not_rows_of_nan():
    """Every row an error or a control (a latent that never fired where rules were scored):
    no margin rows at all (they came back as rows of NaN, one per row of the table)."""
    rows = [{**f1_row(i, m, "", 0, 1, 1), "score": np.nan,
             "error": "never fires in the held-out rows"}
            for i in range(2) for m in ("rule", "rule:control")]
    out = ranking.margins(pd.DataFrame(rows))
    assert out.empty and list(out.columns)[:2] == ["latent", "explanation"]


def test_auroc_noise_is_the_spread_of_a_chance_auroc():
    """The closed form sqrt((n1 + n2 + 1) / (12 n1 n2)) against AUROCs of random scores,
    computed by brute force over every pair."""
    rng = np.random.default_rng(0)
    for n1, n2 in [(3, 3), (10, 10), (10, 4)]:
        draws = rng.normal(size=(20000, n1 + n2))
        pos, neg = draws[:, :n1, None], draws[:, None, n1:]
        aurocs = (pos > neg).mean((1, 2))
        assert ranking.auroc_noise(n1, n2) == pytest.approx(aurocs.std(), rel=0.03)
    assert np.isnan(ranking.auroc_noise(0, 10))


def test_f1_noise_matches_a_bootstrap_over_the_heldout_tokens():
    """A bootstrap that resamples the held-out tokens themselves (multinomial over the rows,
    true negatives included) against the noise computed from the counts alone."""
    rng = np.random.default_rng(1)
    tp, fp, fn, tn = 12, 5, 20, 2000
    cells = np.repeat([0, 1, 2, 3], [tp, fp, fn, tn])
    f1s = []
    for _ in range(3000):
        k = np.bincount(rng.choice(cells, size=cells.size), minlength=4)
        f1s.append(2 * k[0] / max(2 * k[0] + k[1] + k[2], 1))
    noise = ranking.f1_noise(np.array([tp]), np.array([fp]), np.array([fn]))[0]
    assert noise == pytest.approx(np.std(f1s), rel=0.12)
    assert ranking.f1_noise(np.array([0]), np.array([0]), np.array([40]))[0] == 0.0


def ranked_table() -> pd.DataFrame:
    """Four latents: 0 a sure rule, 1 a sure but weaker rule scored on few tokens, 2 explained
    only by a label far above its control, 3 a label that looks good but whose control is as
    high."""
    rows = [f1_row(0, "rule", "tokens ' tax'", 300, 400, 350),
            f1_row(0, "rule:control", "c", 0, 400, 100),
            f1_row(1, "rule", "tokens ' the'", 9, 12, 14),
            f1_row(1, "rule:control", "c", 0, 12, 30),
            f1_row(2, "rule", "tokens ' a'", 1, 40, 30),
            f1_row(2, "rule:control", "c", 0, 40, 30),
            auroc_row(2, "llm", "war words", 0.98, "detection_auroc"),
            auroc_row(2, "llm:control", "c", 0.40, "detection_auroc"),
            auroc_row(3, "llm", "good words", 0.95, "detection_auroc"),
            auroc_row(3, "llm:control", "c", 0.90, "detection_auroc")]
    return pd.DataFrame(rows)


def test_the_best_explained_table_and_the_dashboard_pick_rank_by_the_same_lift():
    table = ranked_table()
    best = best_explanations(table)
    assert sorted(best["latent"]) == [0, 1, 2]  # 3's label is not beyond its control
    assert best.loc[2, "method"] == "llm"  # the rule's 1 of 40 is noise; the label is not
    # by hand: effect = margin / noise, AUROC noise sqrt(2) * sqrt(21 / 1200)
    assert best.loc[2, "effect"] == pytest.approx(0.58 / math.sqrt(2 * 21 / 1200))
    order = best_explained(best)
    # by hand, the share of the way from the control to 1: latent 2 (0.98 - 0.40) / 0.60,
    # 0 an F1 of 600 / 750 over a control of 0, 1 an F1 of 18 / 26
    assert order["lift"].tolist() == pytest.approx([0.58 / 0.60, 0.8, 18 / 26])
    assert order["latent"].tolist() == [2, 0, 1]
    assert best_explained(best, 2)["latent"].tolist() == order["latent"].tolist()[:2]
    # the raw score would have put latent 3 (0.95) and 2 (0.98) first, F1 0.80 and 0.69 after
    raw = table[~table["method"].str.endswith(":control")].sort_values("score", ascending=False)
    assert raw["latent"].iloc[1] == 3 and 3 not in order["latent"].tolist()


def test_best_explained_lists_sparse_latents_before_common_ones_with_their_density():
    """A comma latent (fires on 9% of tokens, F1 0.96 over thousands of held-out firings: a
    huge effect) and a tax latent (0.2%, F1 0.90, a far smaller effect): a reader is shown the
    tax latent first, with each latent's firing rate."""
    table = pd.DataFrame([f1_row(0, "rule", "token ','", 4800, 5000, 5000),
                          f1_row(0, "rule:control", "c", 10, 5000, 800),
                          f1_row(1, "rule", "tokens ' tax', ' taxes'", 90, 100, 100),
                          f1_row(1, "rule:control", "c", 0, 100, 900),
                          f1_row(2, "rule", "tokens ' war'", 80, 100, 100),
                          f1_row(2, "rule:control", "c", 0, 100, 900)])
    best = best_explanations(table)
    assert best.loc[0, "effect"] > best.loc[1, "effect"] > best.loc[2, "effect"]
    density = np.array([0.09, 0.002, 0.003])
    order = best_explained(best, density=density)
    assert order["latent"].tolist() == [1, 2, 0]
    assert order["density"].tolist() == [0.002, 0.003, 0.09]
    # the rate that counts as common is a parameter: at 10% the comma latent leads by lift
    assert best_explained(best, density=density, max_density=0.1)["latent"].tolist() == [
        0, 1, 2]
    assert best_explained(best, 1, density=density)["latent"].tolist() == [1]


def label_rows(n: int, errors: dict[int, str]) -> pd.DataFrame:
    """The language model's labels of latents 0..n-1, as autointerp writes them: no score of
    their own; the latents in ``errors`` failed with that error and have no label."""
    return pd.DataFrame({"latent": range(n), "method": "llm",
                         "explanation": [("" if f in errors else f"label {f}") for f in range(n)],
                         "score": math.nan, "score_name": "",
                         "error": [errors.get(f, "") for f in range(n)]})


def scored_rows(labels: pd.DataFrame, name: str, scores: list[float]) -> pd.DataFrame:
    """Each label's ``name`` row as scoring writes it: a failed label gets no score and the
    error "no explanation to score (<why>)"; the others get the next of ``scores``."""
    rows, given = [], iter(scores)
    for r in labels.itertuples():
        if r.error:
            rows.append({**auroc_row(r.latent, "llm", "", math.nan, name),
                         "error": f"no explanation to score ({r.error})"})
        else:
            rows.append(auroc_row(r.latent, "llm", r.explanation, next(given), name))
    return pd.DataFrame(rows)


def test_score_summary_counts_no_unscored_row_as_a_failure():
    """Notebook 08's run: 20 latents labelled, one failed ("nonsense reply"); the labels are
    rows without a score of their own. The summary has no row for them (never NaN beside a
    count of failures); the failed label is a latent not scored, with its reason in the notes."""
    labels = label_rows(20, {7: "nonsense reply: '7, 8, 9, 10, 11'"})
    scores = [0.05 * i for i in range(1, 20)]  # 0.05 .. 0.95 for the 19 labelled latents
    table = pd.concat([labels, scored_rows(labels, "detection_auroc", scores)])
    summary = score_summary(table)
    assert summary[["method", "score_name"]].values.tolist() == [["llm", "detection_auroc"]]
    row = summary.iloc[0]
    assert (row["latents"], row["scored"], row["not_scored"]) == (20, 19, 1)
    assert "failed" not in summary.columns
    assert row["mean"] == pytest.approx(0.5) and row["median"] == pytest.approx(0.5)
    assert row["above_0.5"] == pytest.approx(9 / 19)  # 0.55 .. 0.95
    assert row["above_0.8"] == pytest.approx(3 / 19)  # 0.85, 0.90, 0.95
    assert not summary.drop(columns=["method", "score_name"]).isna().any().any()
    assert summary_notes(table) == [
        "llm labels: 19 of 20 latents have one; without: nonsense reply: '7, 8, 9, 10, 11' (1)",
        "llm detection_auroc: 1 not scored: no explanation to score (nonsense reply: '7, 8, "
        "9, 10, 11') (1)"]


def test_a_method_with_no_scored_row_is_left_out_and_noted_as_not_run():
    """The explainer's endpoint was down: every label failed, so nothing of the language
    model's was scored. The summary keeps the rules' row only; the notes say the language
    model's scores did not run, and why."""
    labels = label_rows(4, {f: "connection refused" for f in range(4)})
    table = pd.concat([labels, scored_rows(labels, "embedding_auroc", []),
                       pd.DataFrame([f1_row(f, "rule", "tokens ' a'", 3, 4, 4)
                                     for f in range(4)])])
    summary = score_summary(table)
    assert summary[["method", "score_name", "latents", "scored", "not_scored"]
                   ].values.tolist() == [["rule", "f1", 4, 4, 0]]
    assert summary.loc[0, "mean"] == pytest.approx(0.75)  # 2 * 3 / (4 + 4)
    assert summary_notes(table) == [
        "llm labels: 0 of 4 latents have one; without: connection refused (4)",
        "llm embedding_auroc: not run, none of 4 latents scored: no explanation to score "
        "(connection refused) (4)"]
    # labels alone, never scored: said so, and no summary row at all
    assert score_summary(labels).empty
    assert summary_notes(label_rows(3, {})) == [
        "llm labels: 3 of 3 latents have one; not run: no score of the labels (no detection "
        "or embedding rows)"]


def chance_table(margins: dict[str, float], n: int = 20, spread: float = 0.2) -> pd.DataFrame:
    """``n`` latents; per method its detection AUROC scores 0.5 + margin + noise of +-spread
    against its control at 0.5, the noise's signs a different pattern per method (alternating,
    then in pairs), each half + and half -."""
    rows = []
    for latent in range(n):
        for k, (method, margin) in enumerate(margins.items()):
            wobble = spread if (latent >> k) & 1 else -spread
            rows += [auroc_row(latent, method, "e", 0.5 + margin + wobble, "detection_auroc"),
                     auroc_row(latent, method + ":control", "c", 0.5, "detection_auroc")]
    return pd.DataFrame(rows)


def test_the_verdict_says_when_no_method_is_beyond_noise():
    """The issue's case: margins of +0.018 and -0.006 over 20 latents, everything at chance."""
    comparison = method_comparison(chance_table({"rule": 0.018, "llm": -0.006}))
    c = comparison.set_index("method")
    # the interval against a normal approximation, mean +- 1.96 sd / sqrt(n)
    half = 1.96 * 0.2 / math.sqrt(20)
    assert c.loc["rule", "margin"] == pytest.approx(0.018)
    assert c.loc["rule", "margin_low"] == pytest.approx(0.018 - half, abs=0.03)
    assert c.loc["rule", "margin_high"] == pytest.approx(0.018 + half, abs=0.03)
    assert not c["beyond_noise"].any()
    verdict = method_verdict(comparison).set_index("score_name").loc["detection_auroc"]
    assert verdict["best"] == "none" and verdict["top"] == "rule"
    assert "no method beyond noise" in verdict["verdict"]
    assert verdict["margin"] == pytest.approx(0.018) and verdict["latents"] == 20


def test_the_verdict_names_a_method_only_when_it_leads_beyond_noise():
    ahead = method_verdict(method_comparison(chance_table({"rule": 0.3, "llm": 0.05},
                                                          spread=0.05)))
    row = ahead.set_index("score_name").loc["detection_auroc"]
    assert row["best"] == "rule" and "ahead of llm beyond noise" in row["verdict"]
    tie = method_verdict(method_comparison(chance_table({"rule": 0.3, "llm": 0.28})))
    row = tie.set_index("score_name").loc["detection_auroc"]
    assert row["best"] == "tie" and "within noise of each other" in row["verdict"]


def test_captions_say_what_each_part_and_number_is():
    best = best_explanations(ranked_table())
    captions = explanation_captions(best)
    assert captions[0] == "rule: tokens ' tax' (F1 0.80, control 0.00)"
    assert captions[2] == "llm: war words (detection AUROC 0.98, control 0.40)"
    short = explanation_captions(best, max_chars=6)
    assert short[2] == "llm: war w… (detection AUROC 0.98, control 0.40)"


LONG_CALLS = {"rule_explanations", "llm_explanations", "detection_scores", "embedding_scores",
              "meaning_index"}


def test_notebook_08_shows_a_progress_bar_on_every_long_call():
    """Every call of notebook 08 that runs longer than ~10 s on 2 cores (the rules' counting
    pass, the labels, the scorers, the meaning index) asks for its progress bar."""
    nb = json.loads(NOTEBOOK.read_text())
    found = set()
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        for node in ast.walk(ast.parse("".join(cell["source"]))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") in LONG_CALLS:
                found.add(node.func.attr)
                progress = [k.value for k in node.keywords if k.arg == "progress"]
                assert progress and isinstance(progress[0], ast.Constant) and progress[0].value, (
                    f"{node.func.attr} runs without progress=True")
    assert found == LONG_CALLS


def test_the_summary_and_comparison_views_are_short_and_say_what_they_leave_out():
    """The tables notebook 08 shows: short headers, three decimals, each interval in one cell,
    the notes under the summary (never a NaN)."""
    from sae_nb.views.explanation_tables import comparison_view, score_summary_view

    labels = label_rows(4, {2: "timeout after 30 s"})
    table = pd.concat([labels, scored_rows(labels, "detection_auroc", [0.9, 0.8, 0.7])])
    shown = score_summary_view(table).data
    assert "<th" in shown and ">not scored<" in shown and ">&gt;0.5<" in shown
    assert ">0.800<" in shown  # the mean of 0.9, 0.8, 0.7, to three decimals
    assert "llm labels: 3 of 4 latents have one; without: timeout after 30 s (1)" in shown
    assert "nan" not in shown.lower()
    comparison = pd.DataFrame([{
        "score_name": "embedding_auroc", "method": "llm", "latents": 20, "mean": 0.6632,
        "median": 0.66, "control_mean": 0.479, "margin": 0.1894, "margin_low": 0.0791,
        "margin_high": 0.2912, "beyond_noise": True, "lead_over": "rule", "lead": 0.0204,
        "lead_low": -0.0871, "lead_high": 0.1243}])
    shown = comparison_view(comparison).data
    for text in (">+0.189 [+0.079, +0.291]<", ">+0.020 [-0.087, +0.124]<", ">yes<", ">rule<",
                 ">0.663<", ">0.479<", ">margin [95%]<", ">lead [95%]<"):
        assert text in shown, text
    assert "lead_high" not in shown and "control_mean" not in shown
