"""Notebook 08's tables (score summary, method comparison, labels, search) fitting a notebook.

Short headers, numbers to three decimals, an interval as one ``0.189 [0.079, 0.291]`` cell,
and a legend under each table saying what every header means (the notes of
:func:`sae_nb.explanations.tables.summary_notes` under the summary). The full frames, with
every column at full precision, stay what ``score_summary`` and ``method_comparison`` return.
The language model's labels beside the rules and a search by meaning show every text whole and
left-aligned. The generic part (``fitted_table``, ``number``, ``interval``) lives in
:mod:`sae_nb.views.tables`.
"""

from __future__ import annotations

import pandas as pd
from IPython.display import HTML

from sae_nb.explanations.tables import score_summary, summary_notes
from sae_nb.views.tables import TABLE_CSS, fitted_table, interval, number

__all__ = ["COMPARISON_LEGEND", "SUMMARY_HEADERS", "SUMMARY_LEGEND", "TABLE_CSS",
           "comparison_view", "fitted_table", "interval", "labels_view", "number",
           "score_summary_view", "search_view"]

SUMMARY_HEADERS = {"method": "method", "score_name": "score", "latents": "latents",
                   "scored": "scored", "not_scored": "not scored", "mean": "mean",
                   "median": "median", "q25": "q25", "q75": "q75", "above_0.5": ">0.5",
                   "above_0.8": ">0.8"}
SUMMARY_LEGEND = ("<b>latents</b>: rows of the method and score; <b>not scored</b>: no score "
                  "(why, below); <b>mean</b>, <b>median</b>, <b>q25</b>, <b>q75</b>: over the "
                  "scored latents; <b>&gt;0.5</b>, <b>&gt;0.8</b>: the share of them scoring "
                  "above 0.5, 0.8. A <i>:control</i> method is another latent's explanation "
                  "scored on this one.")
COMPARISON_LEGEND = ("Over the latents every method of the score has: <b>mean</b> score, its "
                     "<b>control</b>'s mean on them, the <b>margin</b> over the control with "
                     "its 95% bootstrap interval; <b>beyond noise</b>: the interval above 0; "
                     "<b>lead</b>: the margin minus that of the method named in <b>over</b> "
                     "(the best other), paired per latent, with its interval.")
def score_summary_view(table: pd.DataFrame) -> HTML:
    """The score summary of an explanation ``table`` (:func:`score_summary`) as a table that
    fits a notebook at 1400 px, with its legend and what it leaves out (:func:`summary_notes`:
    label rows, methods that did not run, why rows are not scored) under it."""
    summary = score_summary(table).rename(columns=SUMMARY_HEADERS)
    return fitted_table(summary, SUMMARY_LEGEND, summary_notes(table))


def comparison_view(comparison: pd.DataFrame) -> HTML:
    """``method_comparison``'s table that fits a notebook: each interval in one cell, beyond
    noise as yes or no, the lead with the method it is over."""
    rows = [{"score": r.score_name, "method": r.method, "latents": int(r.latents),
             "mean": number(r.mean), "control": number(r.control_mean),
             "margin [95%]": interval(r.margin, r.margin_low, r.margin_high, signed=True),
             "beyond noise": "yes" if r.beyond_noise else "no", "over": r.lead_over,
             "lead [95%]": interval(r.lead, r.lead_low, r.lead_high, signed=True)}
            for r in comparison.itertuples()]
    columns = ["score", "method", "latents", "mean", "control", "margin [95%]", "beyond noise",
               "over", "lead [95%]"]
    return fitted_table(pd.DataFrame(rows, columns=columns), COMPARISON_LEGEND)


LABELS_LEGEND = ("<b>label</b>: the language model's explanation of the latent; <b>rule</b>: "
                 "its executable rule (the table above); <b>error</b>: why a label is missing "
                 "(the run goes on without it).")


def labels_view(llm: pd.DataFrame, rules: pd.DataFrame) -> HTML:
    """Each latent the language model explained (``llm``, of
    :func:`sae_nb.explanations.autointerp.llm_explanations`) with its label beside its rule (the
    ``rule`` rows of ``rules``) and the error of a failed label, every text whole."""
    merged = llm.merge(rules[["latent", "explanation"]], on="latent", how="left",
                       suffixes=("", "_rule"))
    shown = pd.DataFrame({"latent": merged["latent"], "label": merged["explanation"],
                          "rule": merged["explanation_rule"], "error": merged["error"]})
    return fitted_table(shown, LABELS_LEGEND, wrap=["label", "rule", "error"])


def search_view(results: pd.DataFrame, explanation_weight: float = 0.7) -> HTML:
    """A search by meaning (:meth:`sae_nb.explanations.meaning.MeaningIndex.search`): scores
    to three decimals, each latent's explanation whole."""
    shown = results.rename(columns={"explanation_similarity": "expl. sim",
                                    "context_similarity": "context sim"})
    w = f"{explanation_weight:g}"
    legend = (f"<b>score</b>: {w} x <b>expl. sim</b> (the query's cosine with the latent's "
              f"best explanation) + {1 - explanation_weight:g} x <b>context sim</b> (its mean "
              f"cosine with the latent's top contexts); a latent without an explanation by its "
              f"contexts alone.")
    return fitted_table(shown, legend, wrap=["explanation"])
