"""Notebook 07's views: the live steering widget and its readable tables.

:class:`SteeringWidget`: type a prompt, steer one or several latents at once (each with its own
strength, in units of the median token norm at the site as in
:mod:`sae_nb.interventions.steering`), pick a temperature, a seed and how many samples, press
Generate: each sample's clean and steered texts side by side, in full, with the place where they
diverge highlighted; the next tokens the edit promotes and suppresses (ranked by the change in
probability, shown as a column); and the prompt's top attributed latents (activation x gradient
of the clean model's top next token against its second), each with a button that ablates it at
its position, without the steering edit, and shows the result beside the clean text with the
predicted (attribution) and measured effect. The clean run is cached per prompt and sampling
(:class:`sae_nb.interventions.session.SteeringSession`), so a second Generate runs the steered
texts only; the continuations, clean and steered alike, are decoded in bfloat16 by default
(``precision="float32"`` for the model as loaded), the next-token table and the attribution in
the model's own precision. Given a :class:`~sae_nb.views.explorer.FeatureExplorer`, every
latent number is a link that opens the latent in it. An executed notebook keeps a static
snapshot of what the widget showed. :func:`readable_table` shows the notebook's tables of
texts and tokens in full, left-aligned, with whitespace in tokens visible.

Every callback is a method (``generate``, ``ablate``, ``open_latent``), so tests drive the widget
in a plain Python process: set a widget's ``.value``, call ``Button.click()``, read the HTML.
"""

from __future__ import annotations

import html
import textwrap
import time

import ipywidgets as widgets
import pandas as pd
from IPython.display import HTML

from sae_nb.activations.corpora import token_strings
from sae_nb.activations.models import Model
from sae_nb.dictionaries.architectures import Dictionary
from sae_nb.interventions.effects import neutral_tokens
from sae_nb.interventions.session import Continuations, Sampling, SteeringSession, divergence
from sae_nb.interventions.splice import InterventionError
from sae_nb.interventions.steering import site_scale
from sae_nb.util.threads import one_thread
from sae_nb.views.dashboard import display_token, latent_captions, latent_label, latent_link_html
from sae_nb.views.explorer_data import LatentSearch, best_of, explained_captions, scores_of

WIDGET_CLASS = "sae-nb-steering"
# A latent link's click: put its number in the widget's hidden "open" box and send it to the
# kernel (the box's change event), which opens the latent in the explorer.
OPEN_JS = ("const b = this.closest('.sae-nb-steering')?.querySelector('.sae-nb-open-latent "
           "input'); if (b) {{ b.value = '{latent}'; b.dispatchEvent(new Event('change', "
           "{{bubbles: true}})); }} return false;")
TEXT_STYLE = ("white-space: pre-wrap; overflow-wrap: anywhere; font-family: monospace; "
              "font-size: 13px; text-align: left; margin: 2px 0")
DIVERGED = "background-color: #ffe08a"  # the steered (or ablated) text after it diverges
MUTED = "color: #777"
CELL = "text-align: left; padding: 1px 8px; vertical-align: top"
LABEL = {"description_width": "initial"}  # a control's label in full, never cut
LINK = "color: #1a66c2; text-decoration: underline; cursor: pointer"  # no page styles reach it


def readable_table(frame: pd.DataFrame, tokens=("token",), digits: int = 4):
    """``frame`` as a table a reader can read in a notebook: every text in full (pandas cuts
    them at 50 characters), left-aligned, whitespace kept; the columns named in ``tokens`` as
    tokens with their spaces and newlines visible; numbers to ``digits`` significant digits."""
    shown = frame.copy()
    for column in shown.columns:
        if column in tokens:
            shown[column] = [display_token(str(t), alone=True) for t in shown[column]]
        elif not pd.api.types.is_numeric_dtype(shown[column]):
            shown[column] = [html.escape(str(t)) for t in shown[column]]
    numbers = [c for c in shown.columns if pd.api.types.is_float_dtype(shown[c])]
    style = shown.style.hide(axis="index").format(f"{{:.{digits}g}}", subset=numbers)
    return style.set_properties(**{"text-align": "left", "white-space": "pre-wrap",
                                   "vertical-align": "top"}).set_table_styles(
        [{"selector": "th", "props": "text-align: left"}])


def with_top_tokens(table: pd.DataFrame, stats, store, tokenizer, n_tokens: int = 4,
                    column: str = "latent") -> pd.DataFrame:
    """``table`` with each latent's caption (its commonest tokens at its top store rows, e.g.
    ``top tokens: .`` for a latent of sentence ends) as a ``caption`` column after ``column``:
    what a latent is, beside what a probe says of it. Without statistics the table comes back as it
    was."""
    if stats is None or store is None:
        return table
    captions = latent_captions(stats, store, tokenizer, n_tokens, latents=table[column])
    out = table.copy()
    out.insert(out.columns.get_loc(column) + 1, "caption",
               [captions[int(i)] for i in table[column]])
    return out


def _split(clean: list[int], other: list[int], texts: tuple[str, str], tokenizer) -> int:
    """Where to cut ``texts[1]`` (the other run's text) at the first token that differs from the
    clean run: the length of the shared text in characters."""
    at = divergence(clean, other)
    if at is None:
        return len(texts[1])
    prefix = tokenizer.decode(other[:at])
    if texts[1].startswith(prefix) and texts[0].startswith(prefix):
        return len(prefix)
    n = 0  # a cut inside a character's bytes: fall back to the shared characters
    while n < min(map(len, texts)) and texts[0][n] == texts[1][n]:
        n += 1
    return n


def _text_html(title: str, prompt: str, text: str, cut: int | None, kind: str) -> str:
    """One continuation after its prompt (muted), the part after ``cut`` highlighted."""
    cut = len(text) if cut is None else cut
    tail = (f'<span class="diverged" style="{DIVERGED}">{html.escape(text[cut:])}</span>'
            if cut < len(text) else "")
    return (f'<div style="flex: 1 1 320px; min-width: 0"><b>{title}</b>'
            f'<div class="sae-nb-text" style="{TEXT_STYLE}"><span style="{MUTED}">'
            f'{html.escape(prompt)}</span><span class="continuation {kind}" data-kind="{kind}">'
            f'{html.escape(text[:cut])}{tail}</span></div></div>')


def pair_html(prompt: str, clean: Continuations, other: Continuations, name: str, tokenizer,
              seeds: list[int]) -> str:
    """Each sample's clean text beside the other run's (``name``: steered, ablated), the other's
    text highlighted from the first token where the two differ."""
    out = []
    for j, (c, o) in enumerate(zip(clean.tokens, other.tokens)):
        texts = (clean.texts[j], other.texts[j])
        cut = _split(c, o, texts, tokenizer)
        at = divergence(c, o)
        note = (f"the same {len(o)} tokens" if at is None else
                f"diverges at generated token {at + 1} of {len(o)}")
        head = f"sample {j + 1} (seed {seeds[j]}): " if len(seeds) > 1 else ""
        out.append(f'<div class="sae-nb-pair" style="margin-bottom: 8px"><span style="{MUTED}">'
                   f'{head}{note}</span><div style="display: flex; gap: 16px; flex-wrap: wrap">'
                   + _text_html("clean", prompt, texts[0], cut, "clean")
                   + _text_html(name, prompt, texts[1], cut, name) + "</div></div>")
    return "".join(out)


def changes_html(changes: pd.DataFrame, edited: str = "steered") -> str:
    """The next-token table: tokens with visible whitespace, the ranking (change in probability)
    as a column."""
    head = "".join(f'<th style="{CELL}">{h}</th>' for h in (
        "effect", "token", "Δp (ranked by)", "p clean", f"p {edited}", "Δ log p"))
    body = "".join(
        f'<tr><td style="{CELL}">{r.effect}</td><td style="{CELL}; font-family: monospace">'
        f'{display_token(str(r.token), alone=True)}</td><td style="{CELL}">{r.p_change:+.4f}</td>'
        f'<td style="{CELL}">{r.p_clean:.4f}</td><td style="{CELL}">{r.p_edited:.4f}</td>'
        f'<td style="{CELL}">{r.logprob_change:+.2f}</td></tr>' for r in changes.itertuples())
    return f'<table class="sae-nb-changes"><tr>{head}</tr>{body}</table>'


def changes_view(changes: pd.DataFrame, edited: str = "edited") -> HTML:
    """The next-token table of :func:`sae_nb.interventions.effects.logit_changes` as the widget
    shows it: a promoted token is one whose probability rose, a suppressed one whose
    probability fell (rows that did neither are left out), ranked by that change. No raw
    logit change: an edit can lower every logit, so a token whose probability rose may show a
    negative one; the change of log-probability beside it has the sign of the effect."""
    kept = changes[((changes["effect"] == "promoted") & (changes["p_change"] > 0))
                   | ((changes["effect"] == "suppressed") & (changes["p_change"] < 0))]
    return HTML(changes_html(kept, edited))


def wrapped(text: str, width: int = 88) -> str:
    """Prose (a verdict) cut into lines of at most ``width`` characters between words, to
    print: a notebook's output wraps a long printed line anywhere, "senti / ment"."""
    return textwrap.fill(text, width, break_long_words=False, break_on_hyphens=False)


class LatentRow(widgets.HBox):
    """One steered latent: its number, its strength, its caption (a link to the explorer)."""

    def __init__(self, owner: SteeringWidget, latent: int, strength: float):
        self.owner = owner
        self.latent = widgets.BoundedIntText(value=latent, min=0,
                                             max=owner.dictionary.d_sae - 1, description="latent",
                                             style=LABEL, layout=widgets.Layout(width="170px"))
        self.strength = widgets.FloatSlider(value=strength, min=-1.0, max=1.0, step=0.05,
                                            description="strength", continuous_update=False,
                                            style=LABEL, layout=widgets.Layout(width="360px"))
        self.caption = widgets.HTML()
        self.remove = widgets.Button(description="remove", tooltip="stop steering this latent",
                                     layout=widgets.Layout(width="80px"))
        self.remove.on_click(lambda _: owner.remove_row(self))
        self.latent.observe(lambda _: self.show_caption(), names="value")
        super().__init__([self.latent, self.strength, self.remove, self.caption],
                         layout=widgets.Layout(flex_flow="row wrap", align_items="center"))
        for name in ("latent", "strength", "remove", "caption"):  # for tests and styles
            getattr(self, name).add_class(f"sae-nb-row-{name}")
        self.add_class("sae-nb-row")
        self.show_caption()

    def show_caption(self) -> None:
        self.caption.value = self.owner.latent_html(self.latent.value)


class SteeringWidget(widgets.VBox):
    """Steer several latents of ``dictionary`` in ``model`` at once, and ablate attributed ones."""

    def __init__(self, model: Model, dictionary: Dictionary, prompt: str = "The film was",
                 latent: int | list[int] = 0, coefficient: float | list[float] = 0.25,
                 scale: float | None = None, max_new_tokens: int = 20, n_attributed: int = 8,
                 stats=None, store=None, explanations=None, explorer=None,
                 temperature: float = 0.0, seed: int = 0, samples: int = 1,
                 precision: str = "bfloat16", logit_effects=None):
        """``latent`` and ``coefficient``: one latent and its strength, or lists of them.
        ``stats`` and ``store`` (notebook 06's) add the token search and each latent's top
        tokens; ``explanations`` (notebook 08's table or folder) each latent's best
        explanation; ``explorer`` (a ``FeatureExplorer``) makes every latent number a link
        that opens it there. ``precision``: what decodes the continuations, a bfloat16 copy
        of the model (the default: about 2.7x faster on a CPU with bfloat16 instructions) or
        ``"float32"``, the model as loaded. ``logit_effects`` (notebook 06's; by default the
        explorer's) let the token search count promoted tokens, so that "find latent" ranks
        the latents as the explorer's search does."""
        self.model, self.dictionary, self.n_attributed = model, dictionary, n_attributed
        self.stats, self.store, self.explorer = stats, store, explorer
        self.logit_effects = (logit_effects if logit_effects is not None
                              else getattr(explorer, "logit_effects", None))
        self.explanations = best_of(explanations)  # one row per explained latent, or None
        self._search: LatentSearch | None = None
        with one_thread():
            self.scale = scale if scale is not None else site_scale(
                model, dictionary, neutral_tokens(model, n_contexts=2, ctx_len=32))
        self.session = SteeringSession(model, dictionary, self.scale, precision=precision)
        latents = latent if isinstance(latent, (list, tuple)) else [latent]
        strengths = (coefficient if isinstance(coefficient, (list, tuple))
                     else [coefficient] * len(latents))
        self.open_box = widgets.IntText(value=-1, layout=widgets.Layout(display="none"))
        self.open_box.add_class("sae-nb-open-latent")
        self.open_box.observe(lambda c: self._on_open(c["new"]), names="value")
        self.prompt = widgets.Textarea(value=prompt, description="prompt", rows=2,
                                       layout=widgets.Layout(width="95%"))
        self.rows = widgets.VBox([LatentRow(self, int(i), float(c))
                                  for i, c in zip(latents, strengths)])
        self.add_button = widgets.Button(description="add a latent", icon="plus",
                                         layout=widgets.Layout(width="auto"))
        self.add_button.on_click(lambda _: self.add_row())
        self.query = widgets.Text(placeholder="a token, e.g. great", description="find latent",
                                  style=LABEL, continuous_update=False,
                                  layout=widgets.Layout(width="300px"))
        self.query.observe(lambda c: self.search(c["new"]), names="value")
        self.matches = widgets.Dropdown(options=[], description="matches", style=LABEL,
                                        layout=widgets.Layout(width="420px"))
        self.matches.observe(lambda c: self.pick(c["new"]), names="value")
        self.search_status = widgets.HTML()
        self.temperature = widgets.FloatSlider(value=temperature, min=0.0, max=2.0, step=0.05,
                                               description="temperature", style=LABEL,
                                               continuous_update=False,
                                               layout=widgets.Layout(width="320px"))
        self.seed = widgets.IntText(value=seed, description="seed", style=LABEL,
                                    layout=widgets.Layout(width="160px"))
        self.samples = widgets.BoundedIntText(value=samples, min=1, max=8, description="samples",
                                              style=LABEL, layout=widgets.Layout(width="160px"))
        self.tokens = widgets.BoundedIntText(value=max_new_tokens, min=1, max=200,
                                             description="new tokens", style=LABEL,
                                             layout=widgets.Layout(width="180px"))
        self.generate_button = widgets.Button(description="Generate", button_style="primary")
        self.generate_button.on_click(lambda _: self.generate())
        self.status, self.texts, self.logits = widgets.HTML(), widgets.HTML(), widgets.HTML()
        self.attributed, self.ablation = widgets.VBox(), widgets.HTML()
        searchable = stats is not None and store is not None
        wrap = widgets.Layout(flex_flow="row wrap", align_items="center")
        search_row = (widgets.HBox([self.query, self.matches, self.search_status], layout=wrap)
                      if searchable else
                      widgets.HTML(f'<span style="{MUTED}">Token search: pass stats= and store= '
                                   f'(notebook 06\'s) to find latents by token.</span>'))
        parts = [self.prompt, widgets.HTML("<b>Steered latents</b> (strength: the added vector's "
                                           "norm over the median token norm at the site)"),
                 self.rows, widgets.HBox([self.add_button, search_row], layout=wrap),
                 widgets.HBox([self.temperature, self.seed, self.samples, self.tokens],
                              layout=wrap),
                 widgets.HBox([self.generate_button, self.status], layout=wrap), self.texts,
                 widgets.HTML("<b>Next token: promoted and suppressed by the steering</b>"),
                 self.logits,
                 widgets.HTML("<b>Top attributed latents of the prompt</b> (the clean model's top "
                              "next token against its second; ablate one to see what it does)"),
                 self.attributed, self.ablation, self.open_box]
        if explorer is not None:
            self.explorer_box = widgets.Accordion([explorer.widget], selected_index=None)
            self.explorer_box.set_title(0, "Feature explorer (click a latent number to open it "
                                           "here)")
            parts.insert(-1, self.explorer_box)
        super().__init__(parts)
        self.add_class(WIDGET_CLASS)
        for name in ("temperature", "seed", "samples", "tokens", "status", "texts", "logits",
                     "ablation", "add_button", "generate_button"):  # for tests and styles
            getattr(self, name).add_class(f"sae-nb-steer-{name.replace('_', '-')}")
        self.steered_text = self.clean_text = ""
        self.last_seconds: float | None = None

    # -- latents -----------------------------------------------------------------------------
    @property
    def latent(self) -> widgets.BoundedIntText:
        """The first steered latent's number box."""
        return self.rows.children[0].latent

    @property
    def coefficient(self) -> widgets.FloatSlider:
        """The first steered latent's strength slider."""
        return self.rows.children[0].strength

    def add_row(self, latent: int = 0, strength: float = 0.25) -> LatentRow:
        row = LatentRow(self, latent, strength)
        self.rows.children = (*self.rows.children, row)
        return row

    def remove_row(self, row: LatentRow) -> None:
        if len(self.rows.children) > 1:  # one row stays: set its strength to 0 to steer none
            self.rows.children = tuple(r for r in self.rows.children if r is not row)

    def strengths(self) -> list[tuple[int, float]]:
        return [(int(r.latent.value), float(r.strength.value)) for r in self.rows.children]

    def label(self, latent: int) -> str:
        """The latent's number, its best explanation and score (with ``explanations``) and its
        caption (top tokens, with ``stats`` and ``store``)."""
        latent = int(latent)
        caption = ""
        if self.stats is not None and self.store is not None:
            caption = latent_captions(self.stats, self.store, self.model.tokenizer,
                                      latents=[latent])[latent]
        best = self.explanations
        if best is not None:
            caption = explained_captions({latent: caption}, best[best["latent"] == latent])[latent]
        return latent_label(latent, caption)

    def latent_html(self, latent: int, caption: bool = True) -> str:
        """The latent's number (a link to the explorer, given one) and its muted caption."""
        text = self.label(latent)[len(str(int(latent))):].strip() if caption else ""
        if self.explorer is None:
            cap = f' <span style="{MUTED}">{html.escape(text)}</span>' if text else ""
            return f"{int(latent)}{cap}"
        link = latent_link_html(latent, text, script=OPEN_JS.format(latent=int(latent)))
        return link.replace('<a class="latent-link"', f'<a class="latent-link" style="{LINK}"', 1)

    def open_latent(self, latent: int) -> None:
        """Show ``latent`` in the explorer and unfold it."""
        if self.explorer is None:
            raise ValueError("No explorer to open the latent in: create the widget with "
                             "explorer=sae_nb.FeatureExplorer(stats, store, dictionary, model).")
        self.explorer.show_latent(int(latent))
        self.explorer_box.selected_index = 0

    def _on_open(self, latent: int) -> None:
        if latent >= 0:
            self.open_latent(latent)
            self.open_box.value = -1  # the same latent clicked again sends a change again

    def search(self, query: str) -> list[int]:
        """Latents whose top contexts contain ``query`` (the explorer's token search), best
        first, into the matches menu; the best one becomes the last row's latent."""
        if self.stats is None or self.store is None:
            raise ValueError("The token search needs notebook 06's statistics: create the widget "
                             "with stats=feature_stats(store, dictionary) and store=store.")
        if self._search is None and query.strip():
            self._search = LatentSearch(
                self.stats, self.store, self.model.tokenizer, self.logit_effects,
                explanation_scores=scores_of(self.explanations, self.stats.d_sae))
        found = self._search(query) if self._search is not None else []
        self.matches.options = [(f"{self.label(i)} (score {score})", i) for i, score in found]
        shown = html.escape(repr(query))
        if not query.strip():
            self.search_status.value = ""
        elif found:
            total = self._search.n_found
            self.search_status.value = f"{total} match{'es' if total > 1 else ''} for {shown}"
            self.matches.value = found[0][0]
        else:
            self.search_status.value = f"No latent has {shown} in its top contexts."
        return [i for i, _ in found]

    def pick(self, latent) -> None:
        if latent is not None:
            self.rows.children[-1].latent.value = int(latent)

    # -- generating --------------------------------------------------------------------------
    def sampling(self) -> Sampling:
        return Sampling(float(self.temperature.value), int(self.seed.value),
                        int(self.samples.value), int(self.tokens.value))

    def generate(self) -> None:
        """The Generate button: each sample's clean and steered texts, the next-token table and
        the attributed latents, computed first and then shown together (the button says
        "Generating..." meanwhile). The clean run and the attribution come from the session's
        cache when the prompt and sampling were seen before."""
        button = self.generate_button
        button.disabled, button.description = True, "Generating..."
        self.status.value = f'<span style="{MUTED}">generating...</span>'
        start = time.perf_counter()
        try:
            prompt, strengths = self.prompt.value, self.strengths()
            with one_thread():  # a busy 2-core machine: thread pools spin, one thread does not
                sampling = self.sampling()
                self.session.computed.clear()
                clean = self.session.clean(prompt, sampling)
                steered = self.session.steered(prompt, strengths, sampling)
                changes = self.session.logit_changes(prompt, steered, sampling)
                rows = self.attribution_rows(prompt)
        except InterventionError as err:
            self.status.value = f'<span style="color: crimson">{html.escape(str(err))}</span>'
            return
        finally:
            button.disabled, button.description = False, "Generate"
        self.last_seconds = time.perf_counter() - start
        self.clean_text, self.steered_text = clean.texts[0], steered.texts[0]
        self.clean_texts, self.steered_texts = clean.texts, steered.texts
        self.texts.value = pair_html(prompt, clean, steered, "steered", self.model.tokenizer,
                                     sampling.seeds)
        self.logits.value = changes_html(changes)
        self.attributed.children = rows
        self.ablation.value = ""
        steered_latents = ", ".join(f"{self.latent_html(i, caption=False)} x {c:g}"
                                    for i, c in strengths)
        cached = "clean run cached" if "clean" not in self.session.computed else "clean run new"
        greedy = ("greedy (temperature 0: one text per setting)" if sampling.temperature == 0
                  else f"temperature {sampling.temperature:g}, seeds {sampling.seeds}")
        self.status.value = (f"steering {steered_latents} (x {self.scale:.1f}, the median token "
                             f"norm); {greedy}; continuations decoded in "
                             f"{self.session.precision}; answered in {self.last_seconds:.1f} s "
                             f"({cached})")

    def attribution_rows(self, prompt: str) -> list[widgets.HBox]:
        """One row per top attributed latent of ``prompt``, each with its ablate button."""
        att, self.target = self.session.attribution(prompt)
        self.top = att.top(self.model.tokenizer, self.n_attributed)
        self.ablate_buttons: dict[tuple[int, int], widgets.Button] = {}
        rows = []
        for r in self.top.itertuples():
            token = display_token(str(r.token), alone=True)
            # the button keeps its width however long the line beside it: without flex 0 0,
            # a line that wraps squeezes it to "ablate 42..."
            button = widgets.Button(description=f"ablate {r.latent}",
                                    layout=widgets.Layout(width="auto", flex="0 0 auto"))
            button.on_click(lambda _, lat=int(r.latent), pos=int(r.position): self.ablate(lat, pos))
            self.ablate_buttons[(int(r.latent), int(r.position))] = button
            rows.append(widgets.HBox([button, widgets.HTML(
                f"at position {r.position} (<span style=\"font-family: monospace\">{token}"
                f"</span>): attribution {r.attribution:+.3f} to "
                f'<span style="white-space: nowrap">{html.escape(att.target_name)}</span>; '
                f"latent {self.latent_html(r.latent)}",
                layout=widgets.Layout(flex="1 1 0", min_width="0"))],
                layout=widgets.Layout(align_items="center")))
        return rows

    def ablate(self, latent: int, position: int) -> None:
        """An attributed latent's button: ablate it at its position with no steering edit, and
        show each sample's continuation beside the clean one, the predicted and measured effect
        on the attribution's target and the next-token changes."""
        clicked = self.ablate_buttons.get((latent, position))
        for b in self.ablate_buttons.values():
            b.disabled = True
        if clicked is not None:
            clicked.description = "Ablating..."
        self.ablation.value = (f'<span style="{MUTED}">ablating latent {latent} at position '
                               f'{position} (without the steering edit)...</span>')
        try:
            prompt, sampling = self.prompt.value, self.sampling()
            with one_thread():
                clean = self.session.clean(prompt, sampling)
                result = self.session.ablation(prompt, latent, position, sampling)
        except InterventionError as err:
            self.ablation.value = f'<span style="color: crimson">{html.escape(str(err))}</span>'
            return
        finally:
            for b in self.ablate_buttons.values():
                b.disabled = False
            if clicked is not None:
                clicked.description = f"ablate {latent}"
        att, _ = self.session.attribution(prompt)
        token = display_token(token_strings(self.model.tokenizer, [int(att.tokens[position])])[0],
                              alone=True)
        self.ablated = result
        self.ablation.value = (
            f'<div class="sae-nb-ablation" style="border-left: 3px solid #bbb; padding-left: 8px">'
            f"<b>Latent {self.latent_html(latent, caption=False)} ablated at position "
            f'{position} (<span style="font-family: monospace">{token}</span>)</b>. This runs '
            f"<b>without the steering edit</b>: the clean model with only this latent removed "
            f"there.<br>Effect on {html.escape(result['target'])} (clean - ablated): "
            f"<b>predicted {result['predicted']:+.3f}</b> (attribution), <b>measured "
            f"{result['measured']:+.3f}</b>."
            + pair_html(prompt, clean, result["continuations"], "ablated", self.model.tokenizer,
                        sampling.seeds)
            + changes_html(result["changes"], "ablated") + "</div>")

    # -- the static copy -----------------------------------------------------------------------
    def _repr_mimebundle_(self, **kwargs):
        """The widget, plus a static HTML snapshot and a plain-text line: an executed notebook
        opened later (untrusted, or without the kernel) shows what the widget showed."""
        bundle = super()._repr_mimebundle_(**kwargs)
        bundle["text/html"] = self.snapshot_html()
        bundle["text/plain"] = (f"SteeringWidget steering {self.strengths()} (latent, strength): "
                                f"a live widget; run this cell in JupyterLab to use it.")
        return bundle

    def snapshot_html(self) -> str:
        """What the widget shows now, as static HTML (no widget, no script, inline styles)."""
        latents = "".join(f"<li>latent {self.latent_html(i)}, strength {c:g}</li>"
                          for i, c in self.strengths())
        attributed = "".join(f"<li>{row.children[1].value}</li>"
                             for row in self.attributed.children)
        s = self.sampling()
        return (f'<div class="{WIDGET_CLASS}-snapshot"><p style="{MUTED}"><b>Steering widget (a '
                f"static snapshot).</b> The live widget needs a kernel: run this cell in "
                f"JupyterLab to use it.</p><div><b>prompt</b> {html.escape(self.prompt.value)}"
                f"</div><b>Steered latents</b><ul>{latents}</ul><div>temperature "
                f"{s.temperature:g}, seed {s.seed}, samples {s.samples}, {s.max_new_tokens} new "
                f"tokens</div><div>{self.status.value}</div>{self.texts.value}"
                f"<b>Next token: promoted and suppressed by the steering</b>{self.logits.value}"
                f"<b>Top attributed latents of the prompt</b><ul>{attributed}</ul>"
                f"{self.ablation.value}</div>")
