"""Notebook 08's score summary and method comparison as tables that fit a notebook's width.

Short headers, numbers to three decimals, an interval as one ``0.189 [0.079, 0.291]`` cell,
and a legend under each table saying what every header means (the notes of
:func:`sae_nb.explanations.tables.summary_notes` under the summary). The full frames, with
every column at full precision, stay what ``score_summary`` and ``method_comparison`` return.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

import pandas as pd
from IPython.display import HTML

from sae_nb.explanations.tables import score_summary, summary_notes

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
TABLE_CSS = "text-align: right; padding: 2px 8px; white-space: nowrap"


def number(value, signed: bool = False) -> str:
    """``value`` to three decimals (``+`` on positive ones when ``signed``); "" for NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def interval(value, low, high, signed: bool = False) -> str:
    """``0.189 [0.079, 0.291]``; the value alone without an interval, "" without a value."""
    if not number(value):
        return ""
    if not number(low) or not number(high):
        return number(value, signed)
    return f"{number(value, signed)} [{number(low, signed)}, {number(high, signed)}]"


def fitted_table(frame: pd.DataFrame, legend: str, notes: Sequence[str] = ()) -> HTML:
    """``frame`` (already short, text or numbers) as a plain HTML table without its index,
    numbers to three decimals, the ``legend`` (HTML) and each of ``notes`` (text) under it."""
    shown = frame.copy()
    for column in shown.columns:
        if pd.api.types.is_float_dtype(shown[column]):
            shown[column] = [number(v) for v in shown[column]]
    style = shown.style.hide(axis="index").set_table_styles(
        [{"selector": "th, td", "props": TABLE_CSS},
         {"selector": "th", "props": "text-align: center"}])
    lines = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    under = (f'<div style="max-width: 860px; font-size: 0.9em; margin-top: 4px">{legend}'
             + (f'<ul style="margin: 2px 0">{lines}</ul>' if lines else "") + "</div>")
    return HTML(style.to_html() + under)


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
