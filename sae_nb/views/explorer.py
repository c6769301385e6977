"""FeatureExplorer: look at one latent at a time, live in JupyterLab.

Pick a latent by slider (its rank in the chosen sort order), by number, or by a search over the
tokens where latents fire most; see its top contexts with every token shaded by activation
(value on hover), its summary, the histogram of its activations and the output tokens it
promotes and suppresses. A text box runs the model on any text and shades the chosen latent
over its tokens, beside the latents that fire most on it. Given explanation tables
(``sae_nb.explanations.tables``), every latent shown carries its best explanation and score, and a
meaning search ("taxes", "negation") lists the latents whose explanations and top contexts are
closest to a query.

Switching latents encodes only that latent's context rows
(:func:`sae_nb.latents.contexts.latent_contexts`), and recent latents are cached, so a switch
stays well under 100 ms (``benchmarks/bench_explorer.py``). Every callback is a method
(``show_latent``, ``run_text``, ``search``, ``search_meaning``), so tests and scripts drive the
explorer without a browser.

Past 500 lines: one widget whose controls all read and set the same shown latent.
"""

from __future__ import annotations

import html
from collections import OrderedDict
from copy import deepcopy
from functools import cached_property
from pathlib import Path

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go

from sae_nb.activations.models import Model
from sae_nb.dictionaries.architectures import Dictionary
from sae_nb.explanations.meaning import MeaningIndex, meaning_index
from sae_nb.latents.contexts import latent_contexts, text_activations
from sae_nb.latents.logit_effects import store_words
from sae_nb.views import plotting
from sae_nb.views.dashboard import (
    contexts_html,
    explanation_html,
    latent_captions,
    latent_label,
    latent_link_html,
    latents_table_html,
    logit_table_html,
    scoped_css,
    shaded_tokens_html,
    summary_html,
)
from sae_nb.views.explorer_data import (  # noqa: F401
    DENSE,
    OUTLIER_Z,
    SORTS,
    LatentSearch,
    best_of,
    explained_captions,
    latent_order,
    load_families,
    nearest_latents,
    opening_latent,
    scores_of,
    strongest_on_text,
    top_latents,
    unit_decoder_rows,  # public here too
    unusual_latents,
)

HISTOGRAM_WIDTH = 440  # px; with the logit table (about 360 px) it fits one row of a notebook
# Under the logit table's title (the table's own note says what its numbers are).
LOGIT_CAPTION = ('<div class="muted" style="font-size: 12px; max-width: 420px">The output tokens '
                 "its decoder direction promotes and suppresses.</div>")

WIDGET_CLASS = "sae-nb-explorer"  # the explorer's styles apply inside this class only
# A latent link's click: put its number in this explorer's number box, as if typed (the box's
# change event, which must bubble up to the widget's handler, sends it to the kernel). In a
# static copy the script is stripped; the link stays.
JUMP_JS = ("const b = this.closest('.sae-nb-explorer')?.querySelector('.sae-nb-number input');"
           " if (b) {{ b.value = '{latent}';"
           " b.dispatchEvent(new Event('change', {{bubbles: true}})); }} return false;")


def fit_menu(menu: widgets.Dropdown, options: list[tuple[str, int]]) -> None:
    """Give ``menu`` its options and a width that shows the longest whole: about 6 px a
    character of the widget font measured in chromium, 8 allowed, plus its description."""
    menu.options = options
    longest = max((len(label) for label, _ in options), default=0)
    menu.layout.width = f"{max(460, 130 + 8 * longest)}px"


class FeatureExplorer:
    """An ipywidgets explorer of a dictionary's latents over an activation store.

    ``stats`` are :func:`sae_nb.latents.stats.feature_stats` of ``dictionary`` on ``store``;
    ``model`` (for the text box) and ``logit_effects`` are optional. ``tokenizer`` defaults to
    the model's. ``sort`` orders the slider (see :func:`latent_order`), dense and outlier
    latents last unless ``skip_unusual`` is False (a checkbox switches it); ``n_contexts`` top
    contexts are shown, each ``before`` tokens before and ``after`` after the token it fires on.
    ``explanations`` (an explanation table, or its folder
    :func:`sae_nb.explanations.tables.explanations_folder`, where the meaning index is then
    cached) put each latent's best explanation beside it; ``meaning`` is a ready
    :class:`sae_nb.explanations.meaning.MeaningIndex` (else built on the first query).
    Display it as the last expression of a cell, or ``display(explorer.widget)``.
    """

    def __init__(self, stats, store, dictionary: Dictionary, model: Model | None = None,
                 logit_effects=None, tokenizer=None, sort: str = "index", n_contexts: int = 10,
                 before: int = 16, after: int = 4, cache_size: int = 64,
                 skip_unusual: bool = True, families=None, n_nearest: int = 5,
                 explanations=None, meaning: MeaningIndex | None = None):
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
        self._cache: OrderedDict[tuple[int, int], tuple[list[dict], str, str]] = OrderedDict()
        self.n_shown = n_contexts  # contexts shown of the current latent ("more contexts")
        self.n_nearest = n_nearest
        self.unit_rows = unit_decoder_rows(dictionary)  # (F, D), for the nearest latents
        self.families = (load_families(families) if isinstance(families, (str, Path))
                         else dict(families or {}))
        self._search: LatentSearch | None = None
        self._text: tuple[list[str], np.ndarray] | None = None
        self._busy = False
        self.unusual = unusual_latents(stats)
        # Each latent's commonest tokens at its top rows (after its best explanation, when given)
        # beside its number wherever it is listed.
        self.token_captions = latent_captions(stats, store, self.tokenizer)
        self.explanations = best_of(explanations)  # one row per explained latent, or None
        self.captions = explained_captions(self.token_captions, self.explanations)
        self._meaning, self._explanation_source = meaning, explanations
        self.order = latent_order(stats, sort, skip_unusual)
        self.latent = -1
        self._build_widgets(sort, skip_unusual)
        self.show_latent(opening_latent(self.order, self.token_captions))

    # -- layout --------------------------------------------------------------------------------
    def _build_widgets(self, sort: str, skip_unusual: bool) -> None:
        F = self.stats.d_sae
        fit = {"width": "auto"}  # a control as wide as its content, so rows wrap, never clip
        self.sort = widgets.Dropdown(options=SORTS, value=sort, description="sort by",
                                     layout={"width": "250px"})
        self.show_unusual = widgets.Checkbox(not skip_unusual, indent=False, layout=fit,
                                             description="dense and outlier latents in order")
        self.slider = widgets.IntSlider(0, min=0, max=F - 1, description="rank",  # a 290 px track
                                        continuous_update=False, layout={"width": "460px"})
        self.prev_button = widgets.Button(description="◀", tooltip="previous rank",
                                          layout={"width": "36px"})
        self.next_button = widgets.Button(description="▶", tooltip="next rank",
                                          layout={"width": "36px"})
        self.number = widgets.BoundedIntText(0, min=0, max=F - 1, description="latent",
                                             layout={"width": "200px"})
        self.query = widgets.Text(placeholder="a token or phrase, then Enter",
                                  description="search", continuous_update=False,
                                  layout={"width": "360px"})
        # widened to its labels (fit_menu), never past its row (less the widget margins)
        menu = {"width": "460px", "max_width": "calc(100% - 4px)"}
        self.matches = widgets.Dropdown(options=[], description="matches", layout=menu)
        self.search_status = widgets.HTML()
        self.meaning = widgets.Text(placeholder="a meaning, e.g. taxes, then Enter",
                                    description="meaning", continuous_update=False,
                                    layout={"width": "360px"})
        self.meaning_matches = widgets.Dropdown(options=[], description="by meaning", layout=menu)
        self.meaning_status = widgets.HTML()
        self.summary = widgets.HTML()
        self.related = widgets.HTML()
        self.more_button = widgets.Button(description="more contexts", layout=fit,
                                          tooltip="show the next strongest contexts")
        self.figure = go.FigureWidget(plotting.latent_histogram_figure(
            self.stats.hist_edges[0], self.stats.hist_counts[0]))
        self.figure.layout.width = HISTOGRAM_WIDTH
        # Two title lines (the latent, then its density) below plotly's toolbar, not under it.
        self.figure.layout.margin.t = 86
        self.figure.layout.title.update(y=1 - 52 / self.figure.layout.height, yanchor="top")
        self.logits = widgets.HTML()
        self.contexts = widgets.HTML()
        self.text = widgets.Textarea(placeholder="Type any text, then Run", rows=3,
                                     layout={"width": "auto", "flex": "1 1 300px"})
        self.run_button = widgets.Button(description="Run", button_style="primary")
        self.text_view = widgets.HTML()
        self.text_latents = widgets.HTML()
        self.text_jump = widgets.Dropdown(options=[], description="go to", layout=menu)
        self.sort.observe(lambda c: self.set_sort(c["new"]), names="value")
        self.show_unusual.observe(lambda c: self.set_sort(self.sort.value), names="value")
        self.slider.observe(lambda c: self._on_rank(c["new"]), names="value")
        self.prev_button.on_click(lambda _: self.step(-1))
        self.next_button.on_click(lambda _: self.step(+1))
        self.number.observe(lambda c: self._on_number(c["new"]), names="value")
        self.query.observe(lambda c: self.search(c["new"]), names="value")
        self.matches.observe(lambda c: self._jump(c["new"]), names="value")
        self.meaning.observe(lambda c: self.search_meaning(c["new"]), names="value")
        self.meaning_matches.observe(lambda c: self._jump(c["new"]), names="value")
        self.text_jump.observe(lambda c: self._jump(c["new"]), names="value")
        self.run_button.on_click(lambda _: self._on_run())
        self.more_button.on_click(lambda _: self.show_more())
        row = lambda *children, align="center": widgets.HBox(  # noqa: E731
            children, layout={"flex_flow": "row wrap", "align_items": align,
                              "grid_gap": "4px 12px"})
        logits = widgets.VBox([widgets.HTML(f"<b>Logit effects</b>{LOGIT_CAPTION}"),
                               self.logits], layout={"flex": "1 1 300px", "min_width": "0"})
        self.widget = widgets.VBox([
            widgets.HTML(f"<style>{scoped_css('.' + WIDGET_CLASS)}</style>"),
            row(self.sort, self.show_unusual),
            row(self.slider, self.prev_button, self.next_button, self.number),
            row(self.query, self.matches, self.search_status),
            row(self.meaning, self.meaning_matches, self.meaning_status),
            self.summary,
            self.related,
            row(self.figure, logits, align="flex-start"),
            widgets.HTML("<b>Top activations</b> (hover a token for its activation)"),
            self.contexts,
            row(self.more_button),
            widgets.HTML("<b>Your text</b>"),
            row(self.text, self.run_button),
            self.text_view,
            row(self.text_latents, self.text_jump),
        ])
        for name in ("slider", "number", "query", "matches", "search_status", "summary",
                     "figure", "logits", "contexts", "text", "run_button", "text_view",
                     "text_latents", "text_jump", "prev_button", "next_button", "show_unusual",
                     "related", "more_button", "meaning", "meaning_matches", "meaning_status"):
            getattr(self, name).add_class(f"sae-nb-{name.replace('_', '-')}")  # for tests
        self.widget.add_class(WIDGET_CLASS)

    def _repr_mimebundle_(self, **kwargs):
        """The widget, plus a static HTML snapshot and a plain-text line: JupyterLab draws a
        widget only in a trusted notebook whose kernel holds it, and an executed notebook opened
        later (the main job's copy, or on GitHub) shows the richest of the others."""
        bundle = self.widget._repr_mimebundle_(**kwargs)
        bundle["text/html"] = self.snapshot_html()
        bundle["text/plain"] = (f"FeatureExplorer of {self.stats.d_sae:,} latents, showing latent "
                                f"{self.label(self.latent)}: a live widget; run this cell in "
                                f"JupyterLab to use it.")
        return bundle

    def snapshot_html(self, n_listed: int = 10) -> str:
        """What the explorer shows now, as static HTML (no widget, no script): the latent's
        summary, logit effects and top contexts, and the first latents in the slider's order."""
        _, contexts_view, logits_view = self._view(self.latent, self.n_shown)
        listed = "".join(f"<li>{html.escape(self.label(int(i)))}</li>"
                         for i in self.order[:n_listed])
        scope = f"{WIDGET_CLASS}-snapshot"
        summary = self._summary(self.latent)
        # JupyterLab's sanitizer drops <style> from an untrusted notebook: inline styles stay.
        inline = {'<span class="tokens">': '<span class="tokens" style="font-family: monospace; '
                                           'white-space: pre-wrap">',
                  "<td>": '<td style="text-align: left">',
                  '<div class="summary"><span>': '<div class="summary"><span style="margin-right:'
                                                 ' 1.5em">',
                  "</span><span>": '</span><span style="margin-right: 1.5em">'}
        for old, new in inline.items():
            contexts_view, summary = contexts_view.replace(old, new), summary.replace(old, new)
        return (f'<div class="{scope}"><style>{scoped_css("." + scope)}</style>'
                f'<p class="muted"><b>Feature explorer (a static snapshot).</b> The live '
                f'explorer is a widget: run this cell with a kernel to use it.</p>{summary}'
                f'<div style="display: flex; flex-wrap: wrap; gap: 2em"><div><b>Logit effects</b>'
                f'{LOGIT_CAPTION}{logits_view}</div><div><b>First latents in "{self.sort.value}" '
                f'order</b><ol start="0">{listed}</ol></div></div>'
                f'<b>Top activations</b> (hover a token for its activation){contexts_view}</div>')

    # -- choosing a latent ------------------------------------------------------------------
    def show_latent(self, latent: int) -> list[dict]:
        """Show ``latent`` in every panel; returns the top contexts shown."""
        latent = int(latent)
        if not 0 <= latent < self.stats.d_sae:
            raise ValueError(f"latent={latent} is not in 0..{self.stats.d_sae - 1}.")
        contexts, contexts_view, logits_view = self._view(latent, self.n_contexts)
        self.latent, self.n_shown = latent, self.n_contexts
        self._busy = True  # the controls follow the latent without calling back
        try:
            self.number.value = latent
            self.slider.value = int(np.nonzero(self.order == latent)[0][0])
            for menu, status in ((self.matches, self.search_status),  # now stale
                                 (self.meaning_matches, self.meaning_status),
                                 (self.text_jump, None)):
                if menu.value is not None and menu.value != latent:
                    menu.value = None
                    if status is not None:  # the count stays; 'showing the best' no longer holds
                        status.value = status.value.split("; showing the best")[0]
        finally:
            self._busy = False
        self.summary.value = self._summary(latent)
        self.contexts.value = contexts_view
        self._update_more_button()
        self.related.value = self._related_html(latent)
        self.logits.value = logits_view
        x, width, y = plotting.histogram_bars(self.stats.hist_edges[latent],
                                              self.stats.hist_counts[latent])
        with self.figure.batch_update():
            bar = self.figure.data[0]
            bar.x, bar.y, bar.width = x, y, width
            self.figure.layout.title.text = (f"latent {latent}: nonzero activations<br><sup>"
                                             f"density {float(self.stats.density[latent]):.3%} "
                                             f"of {self.stats.n_tokens:,} tokens</sup>")
        # A reloaded page builds the figure from these synced traits, not from the update
        # messages above: keep them on the latent shown (plotly sets them only when displayed).
        self.figure._widget_data = deepcopy(self.figure._data)
        self.figure._widget_layout = deepcopy(self.figure._layout_obj._props)
        if self._text is not None:
            self._render_text()
        return contexts

    def _summary(self, latent: int) -> str:
        return (summary_html(self.stats, latent, self._tags(latent), self.token_captions[latent])
                + explanation_html(self.explanations, latent))

    def _view(self, latent: int, n: int) -> tuple[list[dict], str, str]:
        """The latent's ``n`` top contexts and rendered panels, from a small LRU cache."""
        if (latent, n) in self._cache:
            self._cache.move_to_end((latent, n))
            return self._cache[(latent, n)]
        rows = self.stats.top_rows[latent, :n]
        rows = rows[rows >= 0]
        contexts = latent_contexts(self.store, self.dictionary, latent, rows, self.tokenizer,
                                   self.before, self.after) if len(rows) else []
        activation = float(self.stats.mean_act[latent])
        table = (self.logit_effects.tokens(self.tokenizer, latent, activation, 10, self.words)
                 if self.logit_effects is not None else None)
        view = (contexts, contexts_html(contexts, float(self.stats.max_act[latent])),
                logit_table_html(table, activation))
        self._cache[(latent, n)] = view
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return view

    @cached_property
    def words(self) -> frozenset[int]:
        """The store's whole tokens (:func:`sae_nb.latents.logit_effects.store_words`)."""
        return store_words(self.store, self.tokenizer)

    def show_more(self) -> list[dict]:
        """Show ``n_contexts`` more of the latent's top contexts (up to the statistics'
        ``n_top``); returns all the contexts shown."""
        available = int((self.stats.top_rows[self.latent] >= 0).sum())
        self.n_shown = min(self.n_shown + self.n_contexts, available)
        contexts, view, _ = self._view(self.latent, self.n_shown)
        self.contexts.value = view
        self._update_more_button()
        return contexts

    def _update_more_button(self) -> None:
        available = int((self.stats.top_rows[self.latent] >= 0).sum())
        shown = min(self.n_shown, available)
        self.more_button.disabled = shown >= available
        self.more_button.description = (f"more contexts ({shown} of {available} shown)"
                                        if available else "no contexts")

    def link(self, latent: int, caption: bool = True) -> str:
        """HTML: ``latent`` as a link that opens it in this explorer, then its caption."""
        return latent_link_html(latent, self.captions[int(latent)] if caption else "",
                                script=JUMP_JS.format(latent=int(latent)))

    def _related_html(self, latent: int) -> str:
        """The latent's nearest latents by decoder direction and its family, as links."""
        near = ", ".join(f"{self.link(i)} <span class=\"muted\">({c:.2f})</span>"
                         for i, c in nearest_latents(self.unit_rows, latent, self.n_nearest))
        parts = [f"<span>nearest by decoder cosine: {near}</span>"]
        family = [m for m in self.families.get(latent, []) if m != latent]
        if family:
            shown = ", ".join(self.link(m) for m in family[:8])
            more = f" and {len(family) - 8} more" if len(family) > 8 else ""
            parts.append(f"<span>co-firing family (notebook 05), {len(family) + 1} latents: "
                         f"{shown}{more}</span>")
        return f'<div class="related">{"<br>".join(parts)}</div>'

    def label(self, latent: int) -> str:
        """``'1258 " depressions", " dem"'``: the latent's number and its top tokens."""
        return latent_label(latent, self.captions[int(latent)])

    def _tags(self, latent: int) -> list[str]:
        if not self.unusual[latent]:
            return []
        dense = self.stats.density[latent] > DENSE
        return ["dense" if dense else "outlier of max activation",
                "listed last unless 'dense and outlier latents in order' is ticked"]

    def set_sort(self, sort: str) -> None:
        """Order the slider by ``sort`` ("index", "density", "max activation"), keeping the
        latent shown; dense and outlier latents last unless ``show_unusual`` is ticked."""
        self.order = latent_order(self.stats, sort, skip_unusual=not self.show_unusual.value)
        if self.sort.value != sort:
            self.sort.value = sort  # calls back here once, harmlessly
        self.show_latent(self.latent)

    def _on_rank(self, rank: int) -> None:
        if not self._busy:
            self.show_latent(int(self.order[rank]))

    def step(self, by: int) -> None:
        """Move ``by`` ranks in the slider's order (the prev and next buttons), within its ends."""
        rank = min(max(self.slider.value + by, 0), self.stats.d_sae - 1)
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
        fill the matches menu, the best one is shown, and choosing another shows it."""
        if self._search is None and query.strip():
            self.search_status.value = '<span class="muted">searching...</span>'
            self._search = LatentSearch(self.stats, self.store, self.tokenizer,
                                        self.logit_effects, explanation_scores=scores_of(
                                            self.explanations, self.stats.d_sae))
        found = self._search(query) if self._search is not None else []
        self._busy = True
        try:
            fit_menu(self.matches, [(f"latent {self.label(i)} (score {s})", i)
                                    for i, s in found])
            self.matches.value = found[0][0] if found else None
        finally:
            self._busy = False
        shown = html.escape(repr(query))
        if not query.strip():
            self.search_status.value = ""
        elif found:
            total = self._search.n_found
            listed = f"the best {len(found)} in the menu" if total > len(found) else "best first"
            self.show_latent(found[0][0])  # first: the count appears once the match is shown
            self.search_status.value = (f"{total} match{'es' if total > 1 else ''} for {shown} "
                                        f"({listed}); showing the best")
        else:
            self.search_status.value = f"No latent has {shown} in its top contexts."
        return [i for i, _ in found]

    def search_meaning(self, query: str, limit: int = 20) -> list[int]:
        """Latents whose best explanation and top contexts are closest in meaning to ``query``
        (:class:`sae_nb.explanations.meaning.MeaningIndex`), best first, with their
        similarity: they fill the 'by meaning' menu and the best one is shown."""
        if self._meaning is None and query.strip():
            self.meaning_status.value = ('<span class="muted">embedding the latents\' '
                                         'explanations and contexts (once)...</span>')
            source = self._explanation_source  # a folder also caches the index
            self._meaning = meaning_index(self.stats, self.store, self.tokenizer, source,
                                          cache=source if isinstance(source, (str, Path)) else None)
        found = self._meaning.search(query, limit) if query.strip() else None
        pairs = [] if found is None else list(zip(found["latent"].tolist(), found["score"]))
        self._busy = True
        try:
            fit_menu(self.meaning_matches, [(f"latent {self.label(i)} (similarity {s:.2f})", i)
                                            for i, s in pairs])
            self.meaning_matches.value = pairs[0][0] if pairs else None
        finally:
            self._busy = False
        if pairs:
            self.show_latent(pairs[0][0])
            self.meaning_status.value = (f"the {len(pairs)} latents closest in meaning to "
                                         f"{html.escape(repr(query))}, best first; showing the "
                                         f"best (similarity {pairs[0][1]:.2f})")
        else:
            self.meaning_status.value = ""
        return [i for i, _ in pairs]

    # -- the text box -------------------------------------------------------------------------
    def run_text(self, text: str) -> np.ndarray:
        """Run the model on ``text``; shade the current latent over its tokens and list the
        latents firing most on it, relative to their max over the store. Returns the current
        latent's per-token activations."""
        if self.model is None:
            raise ValueError("The text box runs the model: create the explorer with model=....")
        self.run_button.disabled, self.run_button.description = True, "Running..."
        self.text_view.value = '<span class="muted">Running the model on your text...</span>'
        try:
            tokens, codes = text_activations(self.model, self.dictionary, text,
                                             site=self.stats.site)
        finally:
            self.run_button.disabled, self.run_button.description = False, "Run"
        codes = codes.float().cpu().numpy()  # (T, F)
        self._text = (list(tokens), codes)
        strongest, peak, relative = strongest_on_text(codes, self.stats.max_act)
        at = codes[:, strongest].argmax(0) if strongest else []
        self.text_latents.value = latents_table_html(
            strongest, peak[strongest], self.stats.density[strongest], relative[strongest],
            [self.captions[i] for i in strongest], [tokens[t] for t in at], JUMP_JS)
        self._busy = True
        try:
            fit_menu(self.text_jump, [(f"latent {self.label(i)} ({relative[i]:.1%} of its max)", i)
                                      for i in strongest])
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
        if not self.text.value.strip():
            self._clear_text('<span class="muted">Type some text in the box above, then press '
                             'Run.</span>')
            return
        try:
            self.run_text(self.text.value)
        except Exception as err:  # shown in the widget: a callback's exception is lost otherwise
            self._clear_text(f'<span style="color: crimson">{type(err).__name__}: '
                             f'{html.escape(str(err))}</span>')

    def _clear_text(self, message: str) -> None:
        """Drop the last text's result and show ``message`` in its place."""
        self._text = None
        self.text_view.value, self.text_latents.value = message, ""
        self._busy = True
        try:
            self.text_jump.options = []
        finally:
            self._busy = False
