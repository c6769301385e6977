"""FeatureExplorer: look at one latent at a time, live in JupyterLab.

Pick a latent by slider (its rank in the chosen sort order), by number, or by a search over the
tokens where latents fire most; see its top contexts with every token shaded by activation
(value on hover), its summary, the histogram of its activations and the output tokens it
promotes and suppresses. A text box runs the model on any text and shades the chosen latent
over its tokens, beside the latents that fire most on it.

Switching latents encodes only that latent's context rows (``features.latent_contexts``), and
recent latents are cached, so a switch stays well under 100 ms (``benchmarks/bench_explorer.py``).
Every callback is a method (``show_latent``, ``run_text``, ``search``), so tests and scripts
drive the explorer without a browser.
"""

from __future__ import annotations

import html
from collections import OrderedDict

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go

from . import plotting
from .corpora import token_strings
from .dashboard import (contexts_html, latents_table_html, logit_table_html,
                        scoped_css, shaded_tokens_html, summary_html)
from .features import latent_contexts, text_activations

SORTS = ("index", "density", "max activation")
WIDGET_CLASS = "sae-nb-explorer"  # the explorer's styles apply inside this class only


def latent_order(stats, sort: str) -> np.ndarray:
    """Latents in display order: by index, or by density / max activation, largest first."""
    if sort == "index":
        return np.arange(stats.d_sae)
    key = {"density": stats.density, "max activation": stats.max_act}.get(sort)
    if key is None:
        raise ValueError(f"sort={sort!r}; choose one of {SORTS}.")
    return np.argsort(-np.asarray(key, dtype=np.float64), kind="stable")


def top_latents(stats, n: int, sort: str = "max activation") -> list[int]:
    """The first ``n`` latents that fired at least once, in ``sort`` order (see
    :func:`latent_order`): e.g. the latents to export to dashboards."""
    return [int(i) for i in latent_order(stats, sort) if stats.density[i] > 0][:n]


class LatentSearch:
    """Finds latents by the text around their strongest activations.

    For each latent, the token at each top row scores 2 when it contains the query (case
    folded) and the ``window`` tokens before it plus that token score 1; a promoted output
    token (with logit effects) scores 1. Built once, on the first query."""

    def __init__(self, stats, store, tokenizer, logit_effects=None, window: int = 4):
        rows = np.asarray(stats.top_rows)  # (F, n_top)
        valid = rows >= 0
        flat = np.where(valid, rows, 0).reshape(-1)
        around = flat[:, None] + np.arange(-window, 1)  # (F * n_top, window + 1)
        inside = around >= 0
        index = store.index(np.maximum(around, 0).reshape(-1)).reshape(around.shape)
        same = inside & (index["context"] == index["context"][:, -1:])  # last column: the row
        ids = np.where(same, index["token"], -1)
        uniq = [int(i) for i in np.unique(ids) if i >= 0]
        vocab = {i: s.lower() for i, s in zip(uniq, token_strings(tokenizer, uniq))}
        vocab[-1] = ""
        F, n_top = rows.shape
        self.centers = [[vocab[int(ids[f * n_top + j, -1])] for j in range(n_top) if valid[f, j]]
                        for f in range(F)]
        self.windows = [["".join(vocab[int(t)] for t in ids[f * n_top + j])
                         for j in range(n_top) if valid[f, j]] for f in range(F)]
        self.promoted = [[] for _ in range(F)]
        if logit_effects is not None:
            top_ids = np.asarray(logit_effects.top_ids)
            self.promoted = [[s.lower() for s in token_strings(tokenizer, top_ids[f])]
                             for f in range(F)]

    def __call__(self, query: str, limit: int = 20) -> list[tuple[int, int]]:
        """``(latent, score)`` of the best-matching latents, best first; [] for no query."""
        if not query.strip():
            return []
        q = query.lower()  # spaces kept: " con" finds word starts
        scores = [2 * sum(q in t for t in c) + sum(q in w for w in ws) + sum(q in p for p in ps)
                  for c, ws, ps in zip(self.centers, self.windows, self.promoted)]
        scores = np.asarray(scores)
        hits = np.nonzero(scores)[0]
        best = hits[np.argsort(-scores[hits], kind="stable")][:limit]
        return [(int(i), int(scores[i])) for i in best]


class FeatureExplorer:
    """An ipywidgets explorer of a dictionary's latents over an activation store.

    ``stats`` are ``features.feature_stats`` of ``dictionary`` on ``store``; ``model`` (for the
    text box) and ``logit_effects`` are optional. ``tokenizer`` defaults to the model's.
    ``sort`` orders the slider (see :func:`latent_order`); ``n_contexts`` top contexts are
    shown, each ``before`` tokens before and ``after`` after the token it fires on.
    Display it as the last expression of a cell, or ``display(explorer.widget)``.
    """

    def __init__(self, stats, store, dictionary, model=None, logit_effects=None, tokenizer=None,
                 sort: str = "index", n_contexts: int = 10, before: int = 16, after: int = 4,
                 cache_size: int = 64):
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        if self.tokenizer is None:
            raise ValueError("FeatureExplorer needs a tokenizer to show tokens: pass model=... "
                             "(its tokenizer is used) or tokenizer=....")
        if stats.d_sae != dictionary.d_sae:
            raise ValueError(f"The statistics cover {stats.d_sae} latents but the dictionary has "
                             f"{dictionary.d_sae}: compute feature_stats with this dictionary.")
        self.stats, self.store, self.dictionary = stats, store, dictionary
        self.model, self.logit_effects = model, logit_effects
        self.n_contexts, self.before, self.after = n_contexts, before, after
        self.cache_size = cache_size
        self._cache: OrderedDict[int, tuple[list[dict], str, str]] = OrderedDict()
        self._search: LatentSearch | None = None
        self._text: tuple[list[str], np.ndarray] | None = None
        self._busy = False
        self.order = latent_order(stats, sort)
        self.latent = -1
        self._build_widgets(sort)
        self.show_latent(int(self.order[0]))

    # -- layout --------------------------------------------------------------------------------
    def _build_widgets(self, sort: str) -> None:
        F = self.stats.d_sae
        self.sort = widgets.Dropdown(options=SORTS, value=sort, description="sort by")
        self.slider = widgets.IntSlider(0, min=0, max=F - 1, description="rank",
                                        continuous_update=False)
        self.number = widgets.BoundedIntText(0, min=0, max=F - 1, description="latent")
        self.query = widgets.Text(placeholder="a token or phrase", description="search",
                                  continuous_update=False)
        self.matches = widgets.Dropdown(options=[], description="matches")
        self.summary = widgets.HTML()
        self.figure = go.FigureWidget(plotting.latent_histogram_figure(
            self.stats.hist_edges[0], self.stats.hist_counts[0]))
        self.logits = widgets.HTML()
        self.contexts = widgets.HTML()
        self.text = widgets.Textarea(placeholder="Type any text, then Run", rows=3,
                                     layout={"width": "90%"})
        self.run_button = widgets.Button(description="Run", button_style="primary")
        self.text_view = widgets.HTML()
        self.text_latents = widgets.HTML()
        self.text_jump = widgets.Dropdown(options=[], description="go to")
        self.sort.observe(lambda c: self.set_sort(c["new"]), names="value")
        self.slider.observe(lambda c: self._on_rank(c["new"]), names="value")
        self.number.observe(lambda c: self._on_number(c["new"]), names="value")
        self.query.observe(lambda c: self.search(c["new"]), names="value")
        self.matches.observe(lambda c: self._jump(c["new"]), names="value")
        self.text_jump.observe(lambda c: self._jump(c["new"]), names="value")
        self.run_button.on_click(lambda _: self._on_run())
        self.widget = widgets.VBox([
            widgets.HTML(f"<style>{scoped_css('.' + WIDGET_CLASS)}</style>"),
            widgets.HBox([self.sort, self.slider, self.number]),
            widgets.HBox([self.query, self.matches]),
            self.summary,
            widgets.HBox([self.figure, widgets.VBox([widgets.HTML("<b>Logit effects</b>"),
                                                     self.logits])]),
            widgets.HTML("<b>Top activations</b> (hover a token for its activation)"),
            self.contexts,
            widgets.HTML("<b>Your text</b>"),
            widgets.HBox([self.text, self.run_button]),
            self.text_view,
            widgets.HBox([self.text_latents, self.text_jump]),
        ])

        self.widget.add_class(WIDGET_CLASS)

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    # -- choosing a latent ------------------------------------------------------------------
    def show_latent(self, latent: int) -> list[dict]:
        """Show ``latent`` in every panel; returns the top contexts shown."""
        latent = int(latent)
        if not 0 <= latent < self.stats.d_sae:
            raise ValueError(f"latent={latent} is not in 0..{self.stats.d_sae - 1}.")
        contexts, contexts_view, logits_view = self._view(latent)
        self.latent = latent
        self._busy = True  # the controls follow the latent without calling back
        try:
            self.number.value = latent
            self.slider.value = int(np.nonzero(self.order == latent)[0][0])
        finally:
            self._busy = False
        self.summary.value = summary_html(self.stats, latent)
        self.contexts.value = contexts_view
        self.logits.value = logits_view
        x, width, y = plotting.histogram_bars(self.stats.hist_edges[latent],
                                              self.stats.hist_counts[latent])
        with self.figure.batch_update():
            bar = self.figure.data[0]
            bar.x, bar.y, bar.width = x, y, width
            self.figure.layout.title.text = f"latent {latent}: nonzero activations"
        if self._text is not None:
            self._render_text()
        return contexts

    def _view(self, latent: int) -> tuple[list[dict], str, str]:
        """The latent's contexts and rendered panels, from a small LRU cache."""
        if latent in self._cache:
            self._cache.move_to_end(latent)
            return self._cache[latent]
        rows = self.stats.top_rows[latent, : self.n_contexts]
        rows = rows[rows >= 0]
        contexts = latent_contexts(self.store, self.dictionary, latent, rows, self.tokenizer,
                                   self.before, self.after) if len(rows) else []
        table = (self.logit_effects.tokens(self.tokenizer, latent)
                 if self.logit_effects is not None else None)
        view = (contexts, contexts_html(contexts, float(self.stats.max_act[latent])),
                logit_table_html(table))
        self._cache[latent] = view
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return view

    def set_sort(self, sort: str) -> None:
        """Order the slider by ``sort`` ("index", "density", "max activation"), keeping the
        latent shown."""
        self.order = latent_order(self.stats, sort)
        if self.sort.value != sort:
            self.sort.value = sort  # calls back here once, harmlessly
        self.show_latent(self.latent)

    def _on_rank(self, rank: int) -> None:
        if not self._busy:
            self.show_latent(int(self.order[rank]))

    def _on_number(self, latent: int) -> None:
        if not self._busy:
            self.show_latent(latent)

    def _jump(self, latent) -> None:
        if latent is not None and not self._busy:
            self.show_latent(latent)

    # -- search -----------------------------------------------------------------------------
    def search(self, query: str) -> list[int]:
        """Latents whose top contexts (or promoted tokens) contain ``query``, best first; they
        fill the matches menu, and choosing one shows it."""
        if self._search is None and query.strip():
            self._search = LatentSearch(self.stats, self.store, self.tokenizer, self.logit_effects)
        found = self._search(query) if self._search is not None else []
        self._busy = True
        try:
            self.matches.options = [(f"latent {i} (score {s})", i) for i, s in found]
            self.matches.value = None
        finally:
            self._busy = False
        return [i for i, _ in found]

    # -- the text box -------------------------------------------------------------------------
    def run_text(self, text: str) -> np.ndarray:
        """Run the model on ``text``; shade the current latent over its tokens and list the
        latents firing most on it, relative to their max over the store. Returns the current
        latent's per-token activations."""
        if self.model is None:
            raise ValueError("The text box runs the model: create the explorer with model=....")
        tokens, codes = text_activations(self.model, self.dictionary, text, site=self.stats.site)
        codes = codes.float().cpu().numpy()  # (T, F)
        self._text = (list(tokens), codes)
        peak = codes.max(0) if len(codes) else np.zeros(self.stats.d_sae, np.float32)
        # Ranked by the peak as a fraction of the latent's max over the store: by raw value,
        # a few dense latents of large scale would top every text.
        relative = peak / np.maximum(self.stats.max_act, peak).clip(min=1e-12)  # (F,)
        strongest = [int(i) for i in np.argsort(-relative, kind="stable")[:10] if peak[i] > 0]
        self.text_latents.value = latents_table_html(
            strongest, peak[strongest], self.stats.density[strongest], relative[strongest])
        self._busy = True
        try:
            self.text_jump.options = [(f"latent {i} ({relative[i]:.0%} of its max)", i)
                                      for i in strongest]
            self.text_jump.value = None
        finally:
            self._busy = False
        self._render_text()
        return codes[:, self.latent]

    def _render_text(self) -> None:
        tokens, codes = self._text
        acts = codes[:, self.latent]
        scale = max(float(self.stats.max_act[self.latent]), float(acts.max(initial=0.0)))
        self.text_view.value = (f"<div>latent {self.latent} on your text (max "
                                f"{float(acts.max(initial=0.0)):.3g})</div>"
                                + shaded_tokens_html(tokens, acts, scale))

    def _on_run(self) -> None:
        try:
            self.run_text(self.text.value)
        except Exception as err:  # shown in the widget: a callback's exception is lost otherwise
            self.text_view.value = (f'<span style="color: crimson">{type(err).__name__}: '
                                    f'{html.escape(str(err))}</span>')
