"""The tables notebooks 07, 08 and 09 show (sae_nb.views.tables, explanation_tables): read
back from their HTML, against hand-built frames whose numbers are written here: no index
column, every number and interval whole in a cell that does not wrap, prose whole in a cell
that wraps between words only, numbers to three decimals, a legend under the table."""

from __future__ import annotations

from html.parser import HTMLParser

import numpy as np
import pandas as pd

from sae_nb.comparison import grid
from sae_nb.comparison.uncertainty import compare
from sae_nb.views import explanation_tables, tables

LONG = ("tokens ' tax', ' taxes', ' pay', ' taxation', ' revenue', ' fiscal', ' budget', "
        "' income', ' deduction', ' refund', ' levy', ' tariff', ' duty', ' excise', ' VAT'")


class Cells(HTMLParser):
    """The header texts, and per body row its cells as (text, style, colspan)."""

    def __init__(self, html: str):
        super().__init__()
        self.headers, self.rows, self.cell, self.under = [], [], None, []
        self.feed(html.split("</table>")[0])
        self.legend = html.split("</table>", 1)[1] if "</table>" in html else ""

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr":
            self.row = []
        elif tag in ("th", "td"):
            self.cell = [tag, "", attrs.get("style", ""), attrs.get("colspan")]

    def handle_data(self, data):
        if self.cell is not None:
            self.cell[1] += data

    def handle_endtag(self, tag):
        if tag in ("th", "td") and self.cell is not None:
            kind, text, style, span = self.cell
            if kind == "th":
                self.headers.append(text)
            else:
                self.row.append((text, style, span))
            self.cell = None
        elif tag == "tr" and self.row:
            self.rows.append(self.row)

    def body(self) -> list[list[tuple]]:
        """Rows of cells, group rows (one cell spanning the table) left out."""
        return [r for r in self.rows if r[0][2] is None]

    def column(self, header: str) -> list[tuple]:
        i = self.headers.index(header)
        return [r[i] for r in self.body()]


def nowrap(style: str) -> bool:
    return "white-space: nowrap" in style


def hand_summary() -> pd.DataFrame:
    """Three configurations with seed and bootstrap intervals, written by hand."""
    return pd.DataFrame({
        "architecture": ["topk", "topk", "matryoshka_batchtopk"], "k": [16, 32, 16],
        "fvu": [0.5004, 0.33, 0.3], "fvu_low": [0.45, 0.30, 0.28],
        "fvu_high": [0.55, 0.36, 0.32], "fvu_boot_low": [0.49, 0.32, 0.29],
        "fvu_boot_high": [0.51, 0.34, 0.31],
        "l0": [16.0, 32.0, 14.64], "l0_low": [16.0, 32.0, 0.8], "l0_high": [16.0, 32.0, 28.3],
        "mcc": [0.7, 0.6, 0.4], "mcc_low": [0.68, 0.55, 0.3], "mcc_high": [0.72, 0.65, 0.5],
        "n": [2, 2, 2]})


def test_summary_view_shows_each_interval_whole_on_one_line_without_an_index():
    shown = Cells(tables.summary_view(hand_summary(), ["fvu", "l0", "mcc"]).data)
    assert shown.headers == ["architecture", "k", "fvu", "fvu boot", "l0", "mcc"]  # no index
    fvu = shown.column("fvu")
    assert [t for t, _, _ in fvu] == ["0.500 [0.450, 0.550]", "0.330 [0.300, 0.360]",
                                      "0.300 [0.280, 0.320]"]
    assert [t for t, _, _ in shown.column("l0")][2] == "14.6 [0.8, 28.3]"  # L0 to 1 decimal
    assert [t for t, _, _ in shown.column("fvu boot")] == ["[0.490, 0.510]", "[0.320, 0.340]",
                                                           "[0.290, 0.310]"]
    assert all(nowrap(style) for row in shown.body() for _, style, _ in row)
    assert [r[0][0] for r in shown.body()] == ["topk", "topk", "matryoshka_batchtopk"]
    assert "each row over 2 distinct seeds" in shown.legend
    assert grid.METRICS["mcc"] in shown.legend  # the headers defined under the table
    one_seed = hand_summary().assign(n=[2, 2, 1], mcc_low=[0.68, 0.55, np.nan])
    shown = Cells(tables.summary_view(one_seed, ["mcc"], bootstrap=False).data)
    assert shown.headers == ["architecture", "k", "mcc", "n"]
    assert [t for t, _, _ in shown.column("mcc")][2] == "0.400"  # no interval: the mean alone


def test_summary_view_splits_more_metrics_than_fit_into_tables_of_as_many():
    """Six metrics of 22 characters each (with padding) and 25 of configuration pass the 136
    characters that fit: two tables of three metrics, each with the configurations, one legend
    under the last."""
    s = hand_summary()
    for m in ("a", "b", "c"):
        s[m], s[f"{m}_low"], s[f"{m}_high"] = 0.5, 0.25, 0.75
    page = tables.summary_view(s, ["fvu", "mcc", "a", "b", "c", "l0"], bootstrap=False).data
    first, second = page.split("</table>")[:2]
    assert Cells(first + "</table>").headers == ["architecture", "k", "fvu", "mcc", "a"]
    assert Cells(second + "</table>").headers == ["architecture", "k", "b", "c", "l0"]
    assert page.count("<table") == 2 and page.count("Each metric:") == 1
    assert page.index("Each metric:") > page.rindex("<table")
    assert ">0.500 [0.250, 0.750]<" in page


def test_verdict_view_keeps_the_interval_on_one_line_and_the_verdict_whole():
    shown = Cells(tables.verdict_view(hand_summary(), ["mcc", "fvu"]).data)
    assert shown.headers == ["metric", "better", "best", "mean [95%]", "verdict"]
    (mcc, fvu) = shown.body()
    assert mcc[2][0] == "topk k=16" and mcc[3][0] == "0.700 [0.680, 0.720]" and nowrap(mcc[3][1])
    assert mcc[4][0] == "ahead of every other beyond the seed noise"
    # fvu: matryoshka 0.30 [0.28, 0.32] overlaps topk k=32 [0.30, 0.36], not topk k=16
    assert fvu[2][0] == "matryoshka_batchtopk k=16"
    assert fvu[4][0] == "within the seed noise of 1: topk k=32"
    assert "white-space: normal" in fvu[4][1] and "word-break: normal" in fvu[4][1]


def test_reference_view_is_one_row_of_value_and_bootstrap_interval():
    reference = {"name": "shipped default", "fvu": 0.06123, "fvu_boot_low": 0.0594,
                 "fvu_boot_high": 0.0651, "l0": 32.0, "l0_boot_low": 32.0, "l0_boot_high": 32.0,
                 "ce_loss_recovered": 0.9871, "ce_loss_recovered_boot_low": 0.9771,
                 "ce_loss_recovered_boot_high": 0.9982}
    shown = Cells(tables.reference_view(reference).data)
    assert shown.headers == ["dictionary", "fvu", "l0", "ce_loss_recovered"]
    (row,) = shown.body()
    assert [t for t, _, _ in row] == ["shipped default", "0.061 [0.059, 0.065]",
                                      "32.0 [32.0, 32.0]", "0.987 [0.977, 0.998]"]
    assert all(nowrap(s) for _, s, _ in row)
    assert "No reference point" in tables.reference_view(None).data


def test_pairs_view_groups_by_metric_with_counts_and_keeps_each_cell_whole():
    s = hand_summary()
    pairs = grid.with_l0(compare(grid.labelled(s), ["fvu", "mcc"], {"fvu": False, "mcc": True}),
                         s)
    shown = Cells(tables.pairs_view(pairs).data)
    assert shown.headers == ["a", "b", "value a", "value b", "a - b", "verdict", "L0 a / b"]
    groups = [r[0][0] for r in shown.rows if r[0][2] is not None]
    # fvu [0.45, 0.55], [0.30, 0.36], [0.28, 0.32]: only the last two overlap
    # mcc [0.68, 0.72], [0.55, 0.65], [0.30, 0.50]: none overlaps
    assert groups == ["fvu: 3 pairs, 1 within noise, 2 told apart, 0 without a verdict",
                      "mcc: 3 pairs, 0 within noise, 3 told apart, 0 without a verdict"]
    first = shown.body()[0]
    assert [t for t, _, _ in first[:5]] == ["topk k=16", "topk k=32", "0.500", "0.330", "+0.170"]
    assert first[6][0] == "16.0 / 32.0"
    assert first[5][0] == ("topk k=32 better; at different L0 (16.0 vs 32.0): not like for "
                           "like")  # the verdict whole, wrapping between words only
    assert "white-space: normal" in first[5][1]
    assert all(nowrap(style) for row in shown.body() for i, (_, style, _) in enumerate(row)
               if i != 5)
    assert len(shown.body()) == 6
    paired = pd.DataFrame([{"metric": "fvu", "a": "x", "b": "y", "a_value": 0.2, "b_value": 0.1,
                            "difference": 0.1, "low": 0.05, "high": 0.1504,
                            "verdict": "y better"}])
    (row,) = Cells(tables.pairs_view(paired).data).body()
    assert row[4][0] == "+0.100 [+0.050, +0.150]" and nowrap(row[4][1])


def test_sweep_view_has_three_decimals_signed_changes_and_a_legend():
    table = pd.DataFrame({
        "method": ["latent 7", "latent 7", "random direction"], "coefficient": [0.05, 0.5, 0.05],
        "score": [0.754965, 0.729732, 0.620794], "shift": [0.080844, 0.055611, -0.053327],
        "shift_se": [0.10176, 0.143135, 0.03688], "kl": [0.010274, 1.048166, 0.008555],
        "ce_increase": [0.034724, 1.052925, -0.005981],
        "shift_per_kl": [7.869099, 0.053056, -6.233457], "ce_clean": [4.089279] * 3,
        "ce_edited": [4.124003, 5.142204, 4.083297]})
    shown = Cells(tables.sweep_view(table).data)
    assert shown.headers == ["coef", "score", "shift ± se", "KL", "ΔCE", "shift/KL"]
    assert [r[0][0] for r in shown.rows if r[0][2] is not None] == ["latent 7",
                                                                    "random direction"]
    rows = [[t for t, _, _ in r] for r in shown.body()]
    assert rows[0] == ["0.05", "0.755", "+0.081 ± 0.102", "0.010", "+0.035", "+7.869"]
    assert rows[2] == ["0.05", "0.621", "-0.053 ± 0.037", "0.009", "-0.006", "-6.233"]
    assert all(nowrap(s) for r in shown.body() for _, s, _ in r)
    assert "clean CE 4.089" in shown.legend and "<b>KL</b>" in shown.legend


def test_labels_view_shows_every_text_whole_and_left_aligned():
    llm = pd.DataFrame({"latent": [3, 9], "explanation": ["", "taxes and the words of paying"],
                        "error": ["nonsense reply: '7, 8, 9, 10, 11'", ""]})
    rules = pd.DataFrame({"latent": [9, 3, 4], "explanation": [LONG, "tokens '7'", "x"]})
    shown = Cells(explanation_tables.labels_view(llm, rules).data)
    assert shown.headers == ["latent", "label", "rule", "error"]
    (failed, labelled) = shown.body()
    assert labelled[2][0] == LONG and "..." not in labelled[2][0]  # never cut
    assert labelled[1][0] == "taxes and the words of paying"
    assert failed[2][0] == "tokens '7'" and failed[3][0] == "nonsense reply: '7, 8, 9, 10, 11'"
    for text, style, _ in labelled[1:]:
        assert "text-align: left" in style and "white-space: normal" in style, (text, style)


def test_search_view_has_three_decimals_and_the_whole_explanation():
    results = pd.DataFrame({"latent": [2724, 1235], "score": [0.510097, 0.437358],
                            "explanation_similarity": [0.518348, 0.380628],
                            "context_similarity": [0.490846, 0.569729],
                            "explanation": [LONG, "after ' Reduction'"]})
    shown = Cells(explanation_tables.search_view(results, 0.7).data)
    assert shown.headers == ["latent", "score", "expl. sim", "context sim", "explanation"]
    rows = shown.body()
    assert [t for t, _, _ in rows[0][:4]] == ["2724", "0.510", "0.518", "0.491"]
    assert rows[0][4][0] == LONG and "text-align: left" in rows[0][4][1]
    assert "0.7 x" in shown.legend and "0.3 x" in shown.legend


def test_explanation_tables_keeps_its_public_names():
    assert explanation_tables.fitted_table is tables.fitted_table
    assert explanation_tables.interval(0.1894, 0.0791, 0.2912, signed=True) == (
        "+0.189 [+0.079, +0.291]")
    assert explanation_tables.number(float("nan")) == ""
