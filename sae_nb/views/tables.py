"""Tables that fit a notebook's width, and notebooks 07's and 09's frames shown that way.

:func:`fitted_table` writes a frame as a plain HTML table: no index, numbers to three decimals,
texts whole and left-aligned, every number or ``0.169 [0.149, 0.190]`` interval on one line
(``white-space: nowrap`` on its cell), prose columns wrapping between words only, optional group
rows, and a legend under the table saying what each short header means. The styles sit on each
cell, so JupyterLab's own table styles (right-aligned, wrapping anywhere) cannot override them.
The frames the package returns stay as they are; these functions only show them.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence

import numpy as np
import pandas as pd
from IPython.display import HTML

from sae_nb.comparison import grid

CELL_CSS = "padding: 2px 6px; vertical-align: top"
NOWRAP = "white-space: nowrap"
# Prose (a verdict, an explanation): wraps between words only, in a column at least this wide.
WRAP = "white-space: normal; overflow-wrap: normal; word-break: normal; min-width: 16em"
TABLE_CSS = "text-align: right; padding: 2px 8px; white-space: nowrap"  # explanation_tables'
NUMERIC = re.compile(r"^[-+]?(\d[\d.,]*(e[-+]?\d+)?|nan)?( ?± ?[\d.]+)?"
                     r"( / [\d.]+)?( ?\[[-+]?[\d.]+(e[-+]?\d+)?, [-+]?[\d.]+(e[-+]?\d+)?\])?%?$")
# Digits a metric's values are shown with: L0 counts latents per token, 16.0 reads better
# than 16.000; every other metric to three decimals.
DIGITS = {"l0": 1}
# Characters of a table's cells (with 2 for padding per column) that fit a notebook's output
# area at 1,400 px with the file browser open (about 960 px at 7 px a character).
WIDE = 136


def number(value, signed: bool = False, digits: int = 3) -> str:
    """``value`` to ``digits`` decimals (``+`` on positive ones when ``signed``); "" for NaN."""
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return ""
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def interval(value, low, high, signed: bool = False, digits: int = 3) -> str:
    """``0.189 [0.079, 0.291]``; the value alone without an interval, "" without a value."""
    if not number(value):
        return ""
    if not number(low) or not number(high):
        return number(value, signed, digits)
    return (f"{number(value, signed, digits)} [{number(low, signed, digits)}, "
            f"{number(high, signed, digits)}]")


def _numeric(values) -> bool:
    """Whether every value of a column reads as a number or an interval (right-aligned)."""
    texts = [str(v) for v in values if str(v) != ""]
    return bool(texts) and all(NUMERIC.match(t) for t in texts)


def fitted_table(frame: pd.DataFrame, legend: str = "", notes: Sequence[str] = (),
                 wrap: Sequence[str] = (), group: str | None = None,
                 group_labels: dict | None = None) -> HTML:
    """``frame`` (short headers, text or numbers) as an HTML table without its index.

    Floats go to three decimals; a column of numbers or intervals is right-aligned, texts
    left-aligned and whole; every cell stays on one line except those of the ``wrap`` columns
    (prose), which wrap between words. ``group``: a column whose runs of equal values become a
    row above them (``group_labels[value]``, HTML, or the value) instead of a column. The
    ``legend`` (HTML) and each of ``notes`` (text) go under the table."""
    shown = frame.copy()
    for column in shown.columns:
        if pd.api.types.is_float_dtype(shown[column]):
            shown[column] = [number(v) for v in shown[column]]
        else:
            shown[column] = ["" if v is None or (isinstance(v, float) and math.isnan(v))
                             else str(v) for v in shown[column]]
    columns = [c for c in shown.columns if c != group]
    align = {c: "left" if c in wrap or not _numeric(shown[c]) else "right" for c in columns}
    style = {c: f"{CELL_CSS}; text-align: {align[c]}; {WRAP if c in wrap else NOWRAP}"
             for c in columns}
    head = "".join(f'<th style="{CELL_CSS}; text-align: {align[c]}; {NOWRAP}">'
                   f"{html.escape(str(c))}</th>" for c in columns)
    rows, last = [], object()
    for _, row in shown.iterrows():
        if group is not None and row[group] != last:
            last = row[group]
            label = (group_labels or {}).get(last, html.escape(last))
            rows.append(f'<tr><td colspan="{len(columns)}" style="{CELL_CSS}; text-align: left; '
                        f'padding-top: 8px">{label}</td></tr>')
        rows.append("<tr>" + "".join(f'<td style="{style[c]}">{html.escape(row[c])}</td>'
                                     for c in columns) + "</tr>")
    table = ('<table class="sae-nb-fitted" style="table-layout: auto; margin-left: 0; '
             f'margin-right: auto"><thead><tr>{head}</tr></thead>'
             f'<tbody>{"".join(rows)}</tbody></table>')
    lines = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    under = (f'<div style="max-width: 860px; font-size: 0.9em; margin-top: 4px">{legend}'
             + (f'<ul style="margin: 2px 0">{lines}</ul>' if lines else "") + "</div>")
    return HTML(table + under if legend or lines else table)


def _definitions(metrics) -> str:
    """``<b>m</b>: its definition`` for each of ``metrics`` grid.METRICS defines."""
    return "; ".join(f"<b>{m}</b>: {html.escape(grid.METRICS[m])}" for m in metrics
                     if m in grid.METRICS)


# -- notebook 09 ------------------------------------------------------------------------------

def summary_view(summary: pd.DataFrame, metrics, by=("architecture", "k"),
                 bootstrap: bool = True) -> HTML:
    """:func:`sae_nb.comparison.grid.summarize_runs`'s table as a person reads it (what
    :func:`~sae_nb.comparison.grid.readable` writes as a frame): per metric its mean over the
    seeds with the seed interval in one cell, then (``bootstrap``) the mean of the runs'
    held-out bootstrap intervals, ``n`` only when the groups differ in seeds; a legend. More
    metrics than fit :data:`WIDE` characters go in two or more tables of as many metrics."""
    boots = [m for m in metrics if bootstrap and f"{m}_boot_low" in summary.columns]
    same_n = summary["n"].nunique() == 1
    shown = summary[list(by)].copy()
    for m in metrics:
        d = DIGITS.get(m, 3)
        shown[m] = [interval(r[m], r[f"{m}_low"], r[f"{m}_high"], digits=d)
                    for _, r in summary.iterrows()]
        if m in boots:
            shown[f"{m} boot"] = [f"[{number(lo, digits=d)}, {number(hi, digits=d)}]" for lo, hi
                                  in zip(summary[f"{m}_boot_low"], summary[f"{m}_boot_high"])]
    if not same_n:
        shown["n"] = summary["n"].astype(int).to_numpy()
    n_text = (f"each row over {int(summary['n'].iloc[0])} distinct seeds" if same_n
              else "<b>n</b>: distinct seeds of the row")
    legend = (f"Each metric: its mean over the seeds [95% t interval over seeds; the mean alone "
              f"with one seed] ({n_text})"
              + ("; <b><i>m</i>&nbsp;boot</b>: the mean of the runs' 95% bootstrap intervals over "
                 "held-out rows (whole contexts on a store)" if boots else "")
              + ". " + _definitions(metrics) + ".")
    chunks = [[m] + ([f"{m} boot"] if m in boots else []) for m in metrics]
    width = {c: 2 + max(len(str(c)), *(len(str(v)) for v in shown[c])) for c in shown.columns}
    fixed = sum(width[c] for c in shown.columns if not any(c in k for k in chunks))
    total = sum(width[c] for k in chunks for c in k)
    parts = max(1, math.ceil(total / max(WIDE - fixed, 1)))
    per = math.ceil(len(chunks) / parts)
    keep = [c for c in shown.columns if not any(c in k for k in chunks)]
    pieces = [chunks[i:i + per] for i in range(0, len(chunks), per)]
    return HTML("".join(
        fitted_table(shown[keep[:len(by)] + [c for k in piece for c in k] + keep[len(by):]],
                     legend if i == len(pieces) - 1 else "").data
        for i, piece in enumerate(pieces)))


def verdict_view(summary: pd.DataFrame, metrics, by=("architecture", "k")) -> HTML:
    """:func:`sae_nb.comparison.grid.verdict_table` to read: per metric which way is better,
    the best configuration, its mean [seed interval] on one line, the verdict as prose."""
    table = grid.verdict_table(summary, metrics, by)
    s = grid.labelled(summary, by)
    table["mean [95%]"] = [interval(s.loc[b, m], s.loc[b, f"{m}_low"], s.loc[b, f"{m}_high"],
                                    digits=DIGITS.get(m, 3))
                           for m, b in zip(table["metric"], table["best"])]
    legend = ("<b>better</b>: which way is better; <b>best</b>: the configuration with the best "
              "mean over seeds; <b>mean [95%]</b>: that mean [95% seed interval]; "
              "<b>verdict</b>: ahead of every other when its interval clears all of theirs, "
              "else the configurations whose intervals reach it.")
    return fitted_table(table[["metric", "better", "best", "mean [95%]", "verdict"]], legend,
                        wrap=["verdict"])


def reference_view(reference: dict | None, metrics=("fvu", "l0", "ce_loss_recovered")) -> HTML:
    """:func:`sae_nb.comparison.grid.score_reference`'s row as one line: per metric its value
    [95% bootstrap interval], as the summaries show theirs; a line saying so without one."""
    if not reference:
        return HTML("<p>No reference point: the shipped default reads another site.</p>")
    shown = [m for m in metrics if m in reference]
    row = {"dictionary": reference.get("name", "reference")}
    row.update({m: interval(reference[m], reference.get(f"{m}_boot_low"),
                            reference.get(f"{m}_boot_high"), digits=DIGITS.get(m, 3))
                for m in shown})
    legend = ("Each metric: its value on the held-out rows [95% bootstrap interval over "
              "held-out contexts; CE contexts for ce_loss_recovered]. One dictionary: no "
              "seed interval.")
    return fitted_table(pd.DataFrame([row]), legend)


def pairs_view(pairs: pd.DataFrame) -> HTML:
    """:func:`sae_nb.comparison.uncertainty.compare`'s pairs (with
    :func:`~sae_nb.comparison.grid.with_l0`'s L0s where they have them) grouped by metric,
    each group headed by its counts (:func:`~sae_nb.comparison.grid.pair_counts`): the two
    configurations, their values, the signed difference (with its interval where the pairs
    carry ``low`` and ``high``), the verdict as prose and the two L0s in one cell."""
    rows = []
    for r in pairs.itertuples():
        d = DIGITS.get(r.metric, 3)
        low, high = getattr(r, "low", None), getattr(r, "high", None)
        row = {"metric": r.metric, "a": r.a, "b": r.b, "value a": number(r.a_value, digits=d),
               "value b": number(r.b_value, digits=d),
               "a - b": interval(r.difference, low, high, signed=True, digits=d),
               "verdict": r.verdict}
        if "a_l0" in pairs.columns:
            row["L0 a / b"] = f"{r.a_l0:.1f} / {r.b_l0:.1f}"
        rows.append(row)
    counts = grid.pair_counts(pairs).set_index("metric")
    labels = {m: (f"<b>{html.escape(m)}</b>: {c['pairs']} pairs, {c['within noise']} within "
                  f"noise, {c['told apart']} told apart, {c['no verdict']} without a verdict")
              for m, c in counts.iterrows()}
    legend = ("Per metric, every pair of configurations <b>a</b> and <b>b</b>: their means over "
              "seeds (<b>value a</b>, <b>value b</b>), the difference <b>a - b</b>"
              + (" [95% interval]" if "low" in pairs.columns else "")
              + "; <b>verdict</b>: within noise when their seed intervals overlap, else which is "
              "better" + ("; <b>L0 a / b</b>: their L0s (a pair at different L0 is not like for "
                          "like)" if "a_l0" in pairs.columns else "")
              + ". Every column at full precision: the CSV the notebook writes.")
    return fitted_table(pd.DataFrame(rows), legend, wrap=["verdict"], group="metric",
                        group_labels=labels)


def agreement_view(table: pd.DataFrame) -> HTML:
    """:func:`sae_nb.comparison.grid.agreement`'s table: spearman to three decimals, the
    p-value as :func:`~sae_nb.comparison.grid.readable_agreement` writes it, agrees as yes/no."""
    shown = grid.readable_agreement(table)
    shown["spearman"] = [number(v, signed=True) for v in table["spearman"]]
    shown["agrees"] = ["yes" if a else "no" for a in table["agrees"]]
    shown = shown.rename(columns={"p_value": "p"})
    legend = (f"<b>spearman</b>: the rank correlation, across the grid's {int(table['runs'].max())}"
              " runs, of the metric (oriented as said) with MCC; <b>p</b>: the chance of one "
              "this strong with no relation (two-sided); <b>agrees</b>: positive and p &lt; 0.05.")
    return fitted_table(shown, legend)


def definitions_view(columns) -> HTML:
    """The definitions of the metrics among ``columns``
    (:func:`~sae_nb.comparison.grid.metric_definitions`), each on its row."""
    return fitted_table(grid.metric_definitions(columns), wrap=["definition"])


# -- notebook 07 ------------------------------------------------------------------------------

SWEEP_LEGEND = ("Per method and <b>coef</b> (the steering coefficient, in median token norms): "
                "<b>score</b>: the probe's mean score of the continuations; <b>shift</b>: its "
                "change from the clean continuations (paired by prompt) <b>± se</b> its "
                "standard error over prompts; <b>KL</b>: KL(clean || steered) per token on "
                "neutral text; <b>ΔCE</b>: the cross-entropy increase per token there (clean "
                "CE {ce}); <b>shift/KL</b>: shift per nat of KL. Every column at full precision: "
                "<code>sweep.table</code> and steering_sweep.csv.")


def sweep_view(table: pd.DataFrame) -> HTML:
    """:func:`sae_nb.interventions.steering.steering_sweep`'s table grouped by method: three
    decimals, changes signed, the shift with its standard error in one cell, short headers
    with a legend (the clean CE, the same on every row, in it)."""
    rows = [{"method": r.method, "coef": f"{r.coefficient:g}", "score": number(r.score),
             "shift ± se": f"{number(r.shift, signed=True)} ± {number(r.shift_se)}"
             if number(r.shift_se) else number(r.shift, signed=True),
             "KL": number(r.kl), "ΔCE": number(r.ce_increase, signed=True),
             "shift/KL": number(r.shift_per_kl, signed=True)}
            for r in table.itertuples()]
    ce = ", ".join(number(v) for v in pd.unique(table["ce_clean"]))
    labels = {m: f"<b>{html.escape(m)}</b>" for m in table["method"]}
    return fitted_table(pd.DataFrame(rows), SWEEP_LEGEND.format(ce=ce), group="method",
                        group_labels=labels)
