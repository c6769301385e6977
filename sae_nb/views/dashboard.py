"""HTML views of latents: shaded tokens, summaries, logit tables, and self-contained dashboards.

The pieces here are shared by the live explorer (``sae_nb.views.explorer``) and the static export.
Every token is one ``<span class="tok">`` whose background alpha is its activation over a scale
(the latent's largest activation), with the value in its ``title`` (shown on hover). Token text
is escaped, and newlines and tabs are drawn as visible symbols.

``export_dashboards`` writes one HTML file for a list of latents: an index, then a section per
latent with its summary, activation histogram (plotly.js embedded once, inline), logit effects,
top contexts and examples from each activation interval. It opens offline, with no server.
Given explanation tables (``sae_nb.explanations.tables``), every latent shown carries its best
explanation and that explanation's score.
"""

from __future__ import annotations

import datetime
import html
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from jupyter_core.paths import jupyter_runtime_dir
from plotly.offline import get_plotlyjs

from sae_nb.activations.corpora import token_labels
from sae_nb.dictionaries.architectures import Dictionary
from sae_nb.latents.contexts import latent_contexts
from sae_nb.latents.logit_effects import store_words
from sae_nb.util.io import atomic_write_text
from sae_nb.views import plotting
from sae_nb.views.explorer_data import (
    best_of,
    explained_captions,
    load_families,
    nearest_latents,
    unit_decoder_rows,
)

SHADE_RGB = (255, 140, 0)  # the activation colour (dark orange), alpha = act / scale
VISIBLE = {"\n": "↵", "\t": "⇥", "\r": "⇤"}  # whitespace drawn visibly (fonts lack ␍)
TOP_TOKENS = "top tokens: "  # what a caption's token part is
SPACE = "·"  # a space of a token read alone (" great" is "·great")
# Styles of the shaded tokens and tables: the dashboards' and, scoped to the widget, the
# explorer's (JupyterLab applies a widget's <style> to the whole page).
CSS = """
.tokens { font-family: ui-monospace, monospace; font-size: 13px; white-space: pre-wrap;
          line-height: 1.7; }
.tok { border-radius: 2px; }
.tok.center { outline: 1.5px solid #b35900; }
table.contexts td.value { font-family: ui-monospace, monospace; text-align: right;
                          padding-right: 0.8em; color: #b35900; vertical-align: top; }
table.contexts td { padding: 1px 4px; }
table.logits { border-collapse: collapse; font-size: 13px; }
table.logits td, table.logits th { padding: 1px 8px; text-align: left; }
table.logits td.num { font-family: ui-monospace, monospace; text-align: right; }
.summary span { margin-right: 1.5em; }
.summary span.caption { margin-right: 0; }
.explanation { margin: 2px 0 4px 0; }
a.latent-link { color: #1a62b8; text-decoration: underline; cursor: pointer; }
.muted { color: #777; }
.logit-note { font-size: 12px; max-width: 430px; line-height: 1.35; }
"""
PAGE_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
section.latent { border-top: 2px solid #ddd; margin-top: 2em; padding-top: 0.5em; }
.panels { display: flex; flex-wrap: wrap; gap: 2em; align-items: flex-start; }
.hist { width: 520px; }
"""


def scoped_css(scope: str, css: str = CSS) -> str:
    """``css`` with every selector prefixed by ``scope`` (e.g. a widget's class)."""
    rules = [r.split("{", 1) for r in css.split("}") if "{" in r]
    return "\n".join(", ".join(f"{scope} {sel.strip()}" for sel in head.split(",")) + " {" + body
                     + "}" for head, body in rules)


# -- tokens -----------------------------------------------------------------------------------

def token_label(token: str) -> str:
    """A token read on its own, as plain text: its spaces as "·" (``" great"`` is ``"·great"``,
    so a word start is told from a word piece), newlines, tabs and returns as ↵ ⇥ ⇤, the empty
    token as ∅. Byte fragments come from :func:`sae_nb.activations.corpora.token_labels` as
    escapes (``"\\xe2\\x80"``)."""
    if token == "":
        return "∅"
    return "".join(VISIBLE.get(c, SPACE if c == " " else c) for c in token)


def display_token(token: str, alone: bool = False) -> str:
    """A token as escaped HTML text, with newlines and tabs as visible symbols; ``alone`` (a
    token in a table or caption, not inside its text) also shows its spaces as "·"
    (:func:`token_label`)."""
    if token == "":
        return '<span class="muted">∅</span>'
    if alone:
        return html.escape(token_label(token))
    return html.escape("".join(VISIBLE.get(c, c) for c in token))


def shade_alpha(act: float, scale: float) -> float:
    """Background alpha of a token: ``act / scale`` clipped to [0, 1] (0 when scale <= 0)."""
    if not scale > 0 or not act > 0:
        return 0.0
    return round(min(float(act) / float(scale), 1.0), 3)


def token_span(token: str, act: float, scale: float, center: bool = False) -> str:
    """One token as a ``<span>`` shaded by its activation, the value in its ``title``."""
    r, g, b = SHADE_RGB
    cls = "tok center" if center else "tok"
    return (f'<span class="{cls}" style="background-color: rgba({r},{g},{b},'
            f'{shade_alpha(act, scale)})" title="{float(act):.4g}">{display_token(token)}</span>')


def shaded_tokens_html(tokens: Sequence[str], acts: Sequence[float], scale: float,
                       center: int | None = None) -> str:
    """A run of tokens, each shaded by its activation relative to ``scale``."""
    if len(tokens) != len(acts):
        raise ValueError(f"{len(tokens)} tokens but {len(acts)} activations; pass one activation "
                         f"per token.")
    spans = "".join(token_span(t, a, scale, i == center) for i, (t, a) in
                    enumerate(zip(tokens, acts)))
    return f'<span class="tokens">{spans}</span>'


def contexts_html(contexts: Iterable[dict], scale: float) -> str:
    """A table of contexts (the dicts of :func:`sae_nb.latents.contexts.latent_contexts`), one
    per line: the activation at the centre token, then the shaded tokens."""
    rows = [f'<tr data-row="{c["row"]}"><td class="value">{c["value"]:.3g}</td><td>'
            f'{shaded_tokens_html(c["tokens"], c["acts"], scale, c["center"])}</td></tr>'
            for c in contexts]
    if not rows:
        return '<p class="muted">No examples: this latent never fired on the store.</p>'
    return f'<table class="contexts">{"".join(rows)}</table>'


# -- tables -----------------------------------------------------------------------------------

def summary_html(stats, latent: int, tags: Sequence[str] = (), caption: str = "") -> str:
    """The latent's number and caption (top tokens), its density, mean activation where
    firing, and largest activation, then ``tags`` (e.g. "dense"), muted."""
    density = float(stats.density[latent])
    fired = int(round(density * stats.n_tokens))
    notes = "".join(f'<span class="muted">{html.escape(t)}</span>' for t in tags)
    cap = f' <span class="muted caption">{html.escape(caption)}</span>' if caption else ""
    return (f'<div class="summary"><span><b>latent {latent}</b>{cap}</span>'
            f'<span>density {density:.3%} ({fired:,} of {stats.n_tokens:,} tokens)</span>'
            f'<span>mean when firing {float(stats.mean_act[latent]):.4g}</span>'
            f'<span>max {float(stats.max_act[latent]):.4g}</span>{notes}</div>')


def explanation_html(best: pd.DataFrame | None, latent: int) -> str:
    """The latent's best explanation (a row of
    :func:`sae_nb.explanations.tables.best_explanations`) with its method and score, or ""
    when it has none."""
    if best is None or int(latent) not in best.index:
        return ""
    r = best.loc[int(latent)]
    return (f'<div class="explanation" data-latent="{int(latent)}">explanation: '
            f'<b>{html.escape(str(r["explanation"]))}</b> <span class="muted">(best of the '
            f'methods: {html.escape(str(r["method"]))}, {html.escape(str(r["score_name"]))} '
            f'{float(r["score"]):.2f})</span></div>')


# What the logit table's numbers are and how its rows are ranked, under the table.
LOGIT_NOTE = ("<i>Δ logit</i>: the change of each output logit when this latent fires at its mean "
              "activation when firing ({activation:.3g}), along the direct path: its decoder row "
              "through the final norm (at the residual stream's typical RMS) and the "
              "unembedding, in nats. Each side is ranked by it, words first; "
              '<span class="muted">grey</span>: word pieces and tokens never seen whole in the '
              "store, ranked after. Spaces show as ·.")


def logit_table_html(table: pd.DataFrame | None, activation: float | None = None) -> str:
    """Promoted and suppressed output tokens (``LogitEffects.tokens``) as an HTML table: each
    token read alone (spaces as ·), its Δ logit, the column the rows are ranked by, and word
    pieces (``*_piece``) greyed; with ``activation`` (the one the values are at), the note
    saying what the numbers are."""
    if table is None:
        return '<p class="muted">No logit effects (pass logit_effects).</p>'
    # the rows are ranked by two criteria: words before grey pieces (the token column), then
    # by Δ logit within each; each header says its part, no arrow claims a plain sort
    order = "the rows: words first, then grey pieces; by Δ logit within each"
    head = (f'<tr><th title="{order}">promoted (words, then pieces)</th>'
            f'<th class="num" title="{order}">Δ logit ▼ within each</th>'
            f'<th title="{order}">suppressed (words, then pieces)</th>'
            f'<th class="num" title="{order}">Δ logit ▲ within each</th></tr>')

    def cells(token, value, piece) -> str:
        grey = ' muted" title="a word piece, or a token never seen whole in the store' \
            if piece else ""
        return (f'<td class="tokens{grey}">{display_token(str(token), alone=True)}</td>'
                f'<td class="num{grey}">{value:+.3f}</td>')

    pieces = lambda side: table.get(f"{side}_piece", [False] * len(table))  # noqa: E731
    body = "".join(f"<tr>{cells(p, pv, pp)}{cells(s, sv, sp)}</tr>" for p, pv, pp, s, sv, sp in
                   zip(table["promoted"], table["promoted_value"], pieces("promoted"),
                       table["suppressed"], table["suppressed_value"], pieces("suppressed")))
    note = ("" if activation is None else
            f'<div class="muted logit-note">{LOGIT_NOTE.format(activation=activation)}</div>')
    return f'<table class="logits">{head}{body}</table>{note}'


def latent_captions(stats, store, tokenizer, n_tokens: int = 2, latents=None) -> dict[int, str]:
    """A short caption per latent: its commonest tokens at its top store rows (the rows of
    ``stats.top_rows``; ties by strength), labelled and each read alone (:func:`token_label`),
    e.g. ``"top tokens: ·depressions, ·dem"``; "" for a latent that never fired or a store of
    sentence rows. ``latents`` defaults to all."""
    latents = np.arange(stats.d_sae) if latents is None else np.asarray(latents, dtype=np.int64)
    rows = np.asarray(stats.top_rows)[latents]  # (L, n_top)
    flat = rows[rows >= 0]
    ids = np.full(rows.shape, -1, dtype=np.int64)
    ids[rows >= 0] = store.index(flat)["token"] if flat.size else []
    uniq = np.unique(ids[ids >= 0])
    names = dict(zip(uniq.tolist(), token_labels(tokenizer, uniq))) if uniq.size else {}
    out = {}
    for latent, row_ids in zip(latents.tolist(), ids):
        counts: dict[int, int] = {}
        for t in row_ids[row_ids >= 0].tolist():  # strongest first: a tie keeps that order
            counts[t] = counts.get(t, 0) + 1
        best = sorted(counts, key=lambda t: -counts[t])[:n_tokens]
        out[latent] = (TOP_TOKENS + ", ".join(caption_token(names[t]) for t in best)
                       if best else "")
    return out


def caption_token(token: str) -> str:
    """A token in a caption: :func:`token_label`, with a token of spaces alone named (a lone
    "·" reads as a separator that runs into the text after it): ``'· (space)'``."""
    label = token_label(token)
    if token and set(token) == {" "}:
        return f"{label} ({'space' if len(token) == 1 else f'{len(token)} spaces'})"
    return label


def latent_label(latent: int, caption: str = "") -> str:
    """``'1258 top tokens: ·depressions, ·dem'``: a latent's number and caption, as plain
    text."""
    return f"{int(latent)} {caption}".rstrip()


def latent_link_html(latent: int, caption: str = "", href: str | None = None,
                     script: str = "") -> str:
    """A latent's number as a link (``data-latent`` holds it) followed by its muted caption;
    ``script`` is the link's onclick JavaScript (the explorer's jump to the latent)."""
    href = f"#latent-{int(latent)}" if href is None else href
    cap = f' <span class="muted caption">{html.escape(caption)}</span>' if caption else ""
    onclick = f' onclick="{html.escape(script)}"' if script else ""
    return (f'<a class="latent-link" href="{html.escape(href)}" data-latent="{int(latent)}"'
            f'{onclick}>{int(latent)}</a>{cap}')


# What the text table's "of its max" column is (a fraction above 100% is stronger than any
# activation of the latent over the store).
FRACTION_NOTE = ("<i>of its max</i>: the latent's peak on your text over its largest activation "
                 "in the store (above 100%: stronger than anywhere in the store)")


def latents_table_html(latents: Sequence[int], values: Sequence[float],
                       densities: Sequence[float] | None = None,
                       fractions: Sequence[float] | None = None,
                       captions: Sequence[str] | None = None,
                       at_tokens: Sequence[str] | None = None, link_script: str = "") -> str:
    """A small table of latents and a value each (e.g. the strongest latents of a text), with
    their caption (top tokens), the token where the value is reached, their density and the
    value as a fraction of their max, when given; the latent numbers are links (with
    ``link_script``, a ``{latent}`` template, as their onclick)."""
    n = len(latents)
    none = [None] * n
    densities = densities if densities is not None else none
    fractions = fractions if fractions is not None else none
    captions = captions if captions is not None else [""] * n
    at_tokens = at_tokens if at_tokens is not None else none
    pct = lambda x, fmt: "" if x is None else format(float(x), fmt)  # noqa: E731
    frac = lambda x: ("" if x is None  # noqa: E731
                      else "never fired in the store" if not np.isfinite(x) else f"{x:.1%}")
    # A token alone in a cell: its spaces shown (a space-only token read as an empty cell).
    tok = lambda t: ("" if t is None  # noqa: E731
                     else f'<span class="tokens">{display_token(t, alone=True)}</span>')
    rows = "".join(
        f'<tr data-latent="{int(i)}"><td>'
        f'{latent_link_html(i, c, script=link_script.format(latent=int(i)))}</td>'
        f'<td class="num">{float(v):.4g}</td><td>{tok(t)}</td>'
        f'<td class="num">{frac(f)}</td><td class="num">{pct(d, ".3%")}</td></tr>'
        for i, v, d, f, c, t in zip(latents, values, densities, fractions, captions, at_tokens))
    return ('<table class="logits"><tr><th>latent (top tokens)</th><th>max on text</th>'
            f'<th>at token</th><th>of its max</th><th>density</th></tr>{rows}</table>'
            f'<div class="muted" style="font-size: 12px">{FRACTION_NOTE}</div>')


# -- the static export ------------------------------------------------------------------------

def dictionary_label(dictionary: Dictionary) -> str:
    """A short name for a dictionary: its folder's name, else its class name."""
    path = (getattr(dictionary, "metadata", None) or {}).get("path")
    return Path(path).name if path else type(dictionary).__name__


def dashboard_path(run_dir: str | Path, dictionary: Dictionary) -> Path:
    """``run_dir/dashboards/<dictionary name>.html``, where the notebook exports dashboards."""
    return Path(run_dir) / "dashboards" / f"{dictionary_label(dictionary)}.html"


def interval_sections(stats, latent: int) -> list[tuple[str, np.ndarray]]:
    """``(label, rows)`` per activation interval of a latent (``FeatureStats.quantile_rows``:
    equal-width intervals of ``(0, max_act]``), strongest interval first, and within each the
    strongest example first."""
    bounds = stats.quantile_bounds[latent]
    out = []
    n = stats.quantile_rows.shape[1]
    for q in reversed(range(n)):
        rows, values = stats.quantile_rows[latent, q], stats.quantile_values[latent, q]
        rows = rows[rows >= 0][np.argsort(-values[rows >= 0], kind="stable")]  # strongest first
        if len(rows):
            out.append((f"interval {q + 1} of {n}: activations {bounds[q]:.3g} to "
                        f"{bounds[q + 1]:.3g}",
                        rows))
    return out


def latent_section_html(stats, latent: int, top_contexts: list[dict],
                        intervals: list[tuple[str, list[dict]]], logit_table: pd.DataFrame | None,
                        caption: str = "", related: str = "", explanation: str = "",
                        title: str = "") -> str:
    """One latent's dashboard section: summary, ``explanation`` (HTML, see
    :func:`explanation_html`), histogram, logit effects, contexts; ``title`` follows the
    latent's number in the heading."""
    fig = plotting.latent_histogram_figure(stats.hist_edges[latent], stats.hist_counts[latent],
                                           title=f"latent {latent}: nonzero activations")
    hist = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"hist-{latent}",
                       config={"displayModeBar": False})
    scale = float(stats.max_act[latent])
    interval_html = "".join(f"<h4>{html.escape(label)}</h4>{contexts_html(c, scale)}"
                            for label, c in intervals)
    return (f'<section class="latent" id="latent-{latent}" data-latent="{latent}">'
            f'<h2>Latent {latent}{": " + html.escape(title) if title else ""}</h2>'
            f'{summary_html(stats, latent, caption=caption)}{explanation}{related}'
            f'<div class="panels"><div class="hist">{hist}</div>'
            f'<div><h3>Logit effects</h3>'
            f'{logit_table_html(logit_table, float(stats.mean_act[latent]))}</div></div>'
            f'<h3>Top activations</h3>{contexts_html(top_contexts, scale)}'
            f'<h3>Examples by activation interval</h3>{interval_html}</section>')


def related_html(latent: int, nearest: Sequence[tuple[int, float]], family: Sequence[int],
                 captions: dict[int, str], linked: set[int]) -> str:
    """A latent's nearest latents (``(latent, cosine)``) and family members, each with its
    caption; those in ``linked`` (sections of the page: all of them in an export) are links to
    their section."""
    name = lambda i: (latent_link_html(i, captions.get(i, "")) if i in linked  # noqa: E731
                      else f'{i} <span class="muted caption">{html.escape(captions.get(i, ""))}'
                           f'</span>')
    near = ", ".join(f'<span class="near" data-latent="{i}">{name(i)} '
                     f'<span class="muted">({c:.2f})</span></span>' for i, c in nearest)
    parts = [f"nearest by decoder cosine: {near}"]
    members = [m for m in family if m != latent]
    if members:
        parts.append(f"co-firing family (notebook 05), {len(members) + 1} latents: "
                     + ", ".join(name(m) for m in members))
    return f'<p class="related">{"<br>".join(parts)}</p>'


def jupyter_root(runtime_dir: str | Path | None = None) -> Path | None:
    """The folder the JupyterLab that started this kernel serves, or None outside one.

    Read from the server's own record, ``jpserver-<pid>.json`` in Jupyter's runtime folder, of
    the kernel's parent process (the server starts its kernels itself)."""
    folder = Path(runtime_dir or jupyter_runtime_dir())
    try:
        record = json.loads((folder / f"jpserver-{os.getppid()}.json").read_text())
        return Path(record["root_dir"]).expanduser().resolve()
    except (OSError, ValueError, KeyError, TypeError):
        return None


class FileLink:
    """A written file as a notebook shows it: a link (relative to the notebook's folder, which
    JupyterLab opens) and its path as plain text, not ``PosixPath('...')``. A file outside the
    folder JupyterLab serves cannot be opened from the page: the link says so and gives the
    file's ``file://`` address to open in a browser instead."""

    def __init__(self, path: str | Path, text: str = "", root: str | Path | None = None):
        self.path, self.text = Path(path), text
        self.root = Path(root).resolve() if root is not None else jupyter_root()

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"{self.text}{self.path}"

    def served(self) -> bool:
        """Whether JupyterLab can open the file (True when no server is known, as in papermill)."""
        return self.root is None or self.path.resolve().is_relative_to(self.root)

    def _repr_html_(self) -> str:
        shown = html.escape(str(self.path))
        if not self.served():
            uri = html.escape(self.path.resolve().as_uri())
            return (f"{html.escape(self.text)}{shown}<br><span>It lies outside the folder "
                    f"JupyterLab serves ({html.escape(str(self.root))}), so JupyterLab cannot "
                    f"open it: open <code>{uri}</code> in a browser, or start JupyterLab in a "
                    f"folder that holds both the notebook and the run folder.</span>")
        href = Path(os.path.relpath(self.path.resolve(), Path.cwd().resolve())).as_posix()
        return (f'{html.escape(self.text)}<a href="{html.escape(href)}" target="_blank">'
                f"{shown}</a>")


def file_link(path: str | Path, text: str = "", root: str | Path | None = None) -> FileLink:
    """``path`` shown as a link after ``text`` (e.g. "Dashboards written to "); ``root``: the
    folder JupyterLab serves, found from the server that started this kernel when None."""
    return FileLink(path, text, root)


def page_html(title: str, header: str, sections: Sequence[str], plotlyjs: str) -> str:
    """A whole self-contained page: styles and plotly.js inline, then the sections."""
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}'
            f'</title><style>{PAGE_CSS}{CSS}</style>'
            f'<script type="text/javascript">{plotlyjs}</script>'
            f'</head><body><h1>{html.escape(title)}</h1>{header}{"".join(sections)}'
            f'</body></html>')


def export_dashboards(stats, store, dictionary: Dictionary, latents: Sequence[int],
                      path: str | Path, logit_effects=None, tokenizer=None, n_contexts: int = 10,
                      before: int = 16, after: int = 4, n_nearest: int = 5,
                      families=None, explanations=None, n_related: int = 5) -> Path:
    """Write one self-contained HTML dashboard file for ``latents`` to ``path``; returns it.

    Per latent: density, mean and max activation, the histogram of its nonzero activations,
    the output tokens it promotes and suppresses (when ``logit_effects`` is given), its top
    ``n_contexts`` contexts and examples from each activation interval, every token shaded,
    its ``n_nearest`` latents by decoder cosine and its family (``families``: notebook 05's
    ``clustering/latents.csv`` or a dict, optional); latents in the file are links. With
    ``explanations`` (an explanation table or its folder,
    :func:`sae_nb.explanations.tables.explanations_folder`) each latent's best explanation and
    score head its section and follow it in every list. Every latent named beside them (nearest,
    family) gets a short section after them, its ``n_related`` strongest contexts, so that
    every latent number on the page is a link.
    The file is written to a temporary name and renamed, so it is complete or absent.
    """
    latents = [int(i) for i in latents]
    bad = [i for i in latents if not 0 <= i < stats.d_sae]
    if bad or not latents:
        raise ValueError(f"Latents {bad or latents} are not in 0..{stats.d_sae - 1}; pass a "
                         f"non-empty list of latent indices of this dictionary.")
    if tokenizer is None:
        raise ValueError("export_dashboards needs tokenizer=... (e.g. model.tokenizer) to show "
                         "the tokens of each context.")
    unit = unit_decoder_rows(dictionary)
    words = store_words(store, tokenizer) if logit_effects is not None else None
    near = {i: nearest_latents(unit, i, n_nearest) for i in latents}
    families = (load_families(families) if isinstance(families, (str, Path))
                else dict(families or {}))
    named = set(latents) | {j for n in near.values() for j, _ in n} | {
        m for i in latents for m in families.get(i, [])}
    tokens = latent_captions(stats, store, tokenizer, latents=sorted(named))
    best = best_of(explanations)
    captions = explained_captions(tokens, best)
    sections = []
    for latent in latents:
        top = stats.top_rows[latent, :n_contexts]
        groups = [("top", top[top >= 0])] + interval_sections(stats, latent)
        rows = np.concatenate([r for _, r in groups]).astype(np.int64)
        contexts = latent_contexts(store, dictionary, latent, rows, tokenizer, before, after)
        split = np.cumsum([len(r) for _, r in groups])[:-1]
        parts = np.split(np.arange(len(rows)), split)
        grouped = [[contexts[j] for j in part] for part in parts]
        table = (logit_effects.tokens(tokenizer, latent, float(stats.mean_act[latent]), 10, words)
                 if logit_effects is not None else None)
        sections.append(latent_section_html(stats, latent, grouped[0],
                                            list(zip([g[0] for g in groups[1:]], grouped[1:])),
                                            table, tokens[latent],
                                            related_html(latent, near[latent],
                                                         families.get(latent, []), captions,
                                                         named),
                                            explanation_html(best, latent),
                                            best.loc[latent, "explanation"]
                                            if best is not None and latent in best.index
                                            else ""))
    others = sorted(named - set(latents))  # named beside a latent: a short section each
    if others:
        sections.append(f'<h2 id="related-latents">Related latents</h2><p class="muted">The '
                        f"latents named beside those above, each with its {n_related} strongest "
                        f"contexts.</p>")
    for latent in others:
        top = stats.top_rows[latent, :n_related]
        contexts = latent_contexts(store, dictionary, latent, top[top >= 0], tokenizer, before,
                                   after)
        sections.append(f'<section class="latent related-latent" id="latent-{latent}" '
                        f'data-latent="{latent}"><h3>Latent {latent}</h3>'
                        f'{summary_html(stats, latent, caption=tokens[latent])}'
                        f'{explanation_html(best, latent)}'
                        f'{contexts_html(contexts, float(stats.max_act[latent]))}</section>')
    title = f"{dictionary_label(dictionary)} · {stats.model} · {stats.site}"
    page = page_html(title, index_html(stats, latents, captions), sections, get_plotlyjs())
    return atomic_write_text(Path(path), page)


def index_html(stats, latents: Sequence[int], captions: dict[int, str] | None = None) -> str:
    """The page header: what the statistics cover, and a linked list of the latents, each
    with its caption (top tokens)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    captions = captions or {}
    links = "".join(f'<li>latent {latent_link_html(i, captions.get(i, ""))} '
                    f'<span class="muted">density '
                    f'{float(stats.density[i]):.3%}, max {float(stats.max_act[i]):.3g}</span></li>'
                    for i in latents)
    return (f'<p class="muted">{stats.d_sae:,} latents; statistics over {stats.n_tokens:,} '
            f'tokens; written {stamp}. Hover a token for its activation.</p><ul>{links}</ul>')

