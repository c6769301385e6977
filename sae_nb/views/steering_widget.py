"""SteeringWidget: steer the model with one latent, live in JupyterLab.

Type a prompt, pick a latent by number or (given notebook 06's statistics and store) by the
explorer's token search, slide the coefficient (in units of the median token norm at the site,
as in :mod:`sae_nb.interventions.steering`), press Generate: the clean and steered
continuations side by side, the next tokens the edit promotes and suppresses, and the prompt's
top attributed latents (activation x gradient of the clean model's top next token against its
second), each with a button that ablates it at its position and shows what changes. While it
works the button says so; everything it shows is replaced at once when it is done.

Every callback is a method (``generate``, ``ablate``), so tests drive the widget in a plain
Python process: set a widget's ``.value``, call ``Button.click()``, read the HTML.
"""

from __future__ import annotations

import html

import ipywidgets as widgets
import pandas as pd

from sae_nb.activations.models import Model
from sae_nb.dictionaries.architectures import Dictionary
from sae_nb.interventions.attribution import attribute
from sae_nb.interventions.effects import generate, logit_changes, neutral_tokens
from sae_nb.interventions.splice import InterventionError, ablate, edited_logits, prompt_tokens
from sae_nb.interventions.steering import latent_method, site_scale
from sae_nb.views.dashboard import latent_captions, latent_label
from sae_nb.views.explorer_data import LatentSearch, best_of, explained_captions

WIDGET_CLASS = "sae-nb-steering"


def _table_html(table: pd.DataFrame, columns: list[str]) -> str:
    formats = {"p_clean": "{:.4f}".format, "p_edited": "{:.4f}".format,
               "logprob_change": "{:+.2f}".format}
    return table[columns].to_html(index=False, formatters=formats, escape=True, border=0)


def _text_html(title: str, text: str) -> str:
    return (f'<div style="flex: 1; min-width: 280px"><b>{html.escape(title)}</b>'
            f'<pre style="white-space: pre-wrap">{html.escape(text)}</pre></div>')


class SteeringWidget(widgets.VBox):
    """Steer and ablate latents of ``dictionary`` in ``model`` from a notebook."""

    def __init__(self, model: Model, dictionary: Dictionary, prompt: str = "The film was",
                 latent: int = 0, coefficient: float = 0.25, scale: float | None = None,
                 max_new_tokens: int = 20, n_attributed: int = 8, stats=None, store=None,
                 explanations=None):
        """``stats`` and ``store`` (notebook 06's :class:`~sae_nb.latents.stats.FeatureStats`
        and the store they were computed on) add the token search and each latent's caption
        (top tokens); ``explanations`` (notebook 08's table or its folder) puts each latent's
        best explanation and score in front of it."""
        self.model, self.dictionary, self.n_attributed = model, dictionary, n_attributed
        self.stats, self.store = stats, store
        self.explanations = best_of(explanations)  # one row per explained latent, or None
        self._search: LatentSearch | None = None
        self.scale = scale if scale is not None else site_scale(
            model, dictionary, neutral_tokens(model, n_contexts=2, ctx_len=32))
        self.prompt = widgets.Textarea(value=prompt, description="prompt",
                                       layout=widgets.Layout(width="95%"))
        self.latent = widgets.BoundedIntText(value=latent, min=0, max=dictionary.d_sae - 1,
                                             description="latent")
        self.coefficient = widgets.FloatSlider(value=coefficient, min=-1.0, max=1.0, step=0.05,
                                               description="coefficient",
                                               continuous_update=False)
        self.tokens = widgets.BoundedIntText(value=max_new_tokens, min=1, max=200,
                                             description="new tokens")
        self.generate_button = widgets.Button(description="Generate", button_style="primary")
        self.generate_button.on_click(lambda _: self.generate())
        self.caption = widgets.HTML()
        self.latent.observe(lambda _: self.show_caption(), names="value")
        self.query = widgets.Text(placeholder="a token, e.g. great", description="find latent",
                                  continuous_update=False)
        self.query.observe(lambda c: self.search(c["new"]), names="value")
        self.matches = widgets.Dropdown(options=[], description="matches",
                                        layout=widgets.Layout(width="360px"))
        self.matches.observe(lambda c: self.pick(c["new"]), names="value")
        self.search_status = widgets.HTML()
        searchable = stats is not None and store is not None
        self.status = widgets.HTML()
        self.texts = widgets.HTML()
        self.logits = widgets.HTML()
        self.attributed = widgets.VBox()
        self.ablation = widgets.HTML()
        search_row = (widgets.HBox([self.query, self.matches, self.search_status]) if searchable
                      else widgets.HTML('<span style="color: gray">Token search: pass stats= and '
                                        'store= (notebook 06\'s) to find latents by token.</span>'))
        super().__init__([
            self.prompt, widgets.HBox([self.latent, self.caption]), search_row,
            widgets.HBox([self.coefficient, self.tokens, self.generate_button]),
            self.status, self.texts,
            widgets.HTML("<b>Next token: promoted and suppressed by the edit</b>"), self.logits,
            widgets.HTML("<b>Top attributed latents of the prompt</b> (the clean model's top "
                         "next token against its second; click to ablate one)"),
            self.attributed, self.ablation])
        self.add_class(WIDGET_CLASS)
        self.steered_text = self.clean_text = ""
        self.show_caption()

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

    def show_caption(self) -> None:
        text = self.label(self.latent.value)[len(str(self.latent.value)):].strip()
        self.caption.value = (f'<span style="color: gray">{html.escape(text)}</span>'
                              if text else "")

    def search(self, query: str) -> list[int]:
        """Latents whose top contexts contain ``query`` (the explorer's token search), best
        first, into the matches menu; the best one becomes the steered latent."""
        if self.stats is None or self.store is None:
            raise ValueError("The token search needs notebook 06's statistics: create the widget "
                             "with stats=feature_stats(store, dictionary) and store=store.")
        if self._search is None and query.strip():
            self._search = LatentSearch(self.stats, self.store, self.model.tokenizer)
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
            self.latent.value = int(latent)

    def edits(self):
        return latent_method(self.dictionary, self.latent.value, self.scale).edits(
            float(self.coefficient.value))

    def generate(self) -> None:
        """The Generate button: continuations, the logit table and the attributed latents, all
        computed first and then shown together (the button says "Generating..." meanwhile)."""
        button = self.generate_button
        button.disabled, button.description = True, "Generating..."
        self.status.value = '<span style="color: gray">generating...</span>'
        try:
            prompt, n = self.prompt.value, int(self.tokens.value)
            clean = generate(self.model, prompt, max_new_tokens=n)[0]
            steered = generate(self.model, prompt, self.dictionary, self.edits(),
                               max_new_tokens=n)[0]
            changes = logit_changes(self.model, self.dictionary, prompt, self.edits(), k=8)
            rows = self.attribution_rows(prompt)
        except InterventionError as err:
            self.status.value = f'<span style="color: crimson">{html.escape(str(err))}</span>'
            return
        finally:
            button.disabled, button.description = False, "Generate"
        self.clean_text, self.steered_text = clean, steered
        self.texts.value = ('<div style="display: flex; gap: 16px">'
                            + _text_html("clean", clean) + _text_html("steered", steered)
                            + "</div>")
        self.logits.value = _table_html(changes, ["effect", "token", "p_clean", "p_edited",
                                                  "logprob_change"])
        self.attributed.children = rows
        self.status.value = (f"latent {html.escape(self.label(self.latent.value))}, coefficient "
                             f"{self.coefficient.value:g} x {self.scale:.1f} (median token norm)")

    def attribution_rows(self, prompt: str) -> list[widgets.HBox]:
        """One row per top attributed latent of ``prompt``, each with its ablate button."""
        ids = prompt_tokens(self.model, prompt)
        self.target = tuple(edited_logits(self.model, ids)[0, -1].topk(2).indices.tolist())
        att = attribute(self.model, self.dictionary, prompt, self.target)
        self.top = att.top(self.model.tokenizer, self.n_attributed)
        rows = []
        for r in self.top.itertuples():
            button = widgets.Button(description=f"ablate {r.latent}",
                                    layout=widgets.Layout(width="120px"))
            button.on_click(lambda _, lat=int(r.latent), pos=int(r.position): self.ablate(lat, pos))
            rows.append(widgets.HBox([button, widgets.HTML(
                f"latent {html.escape(self.label(r.latent))} at position {r.position} "
                f"({html.escape(repr(r.token))}): "
                f"attribution {r.attribution:+.3f} to {html.escape(att.target_name)}")]))
        return rows

    def ablate(self, latent: int, position: int) -> None:
        """An attributed latent's button: ablate it at its position, show the new continuation
        and the next-token changes."""
        edit = [ablate(latent, position, position + 1)]
        prompt, n = self.prompt.value, int(self.tokens.value)
        text = generate(self.model, prompt, self.dictionary, edit, max_new_tokens=n)[0]
        changes = logit_changes(self.model, self.dictionary, prompt, edit, k=5)
        self.ablation.value = (f"<b>latent {latent} ablated at position {position}</b>"
                               + _text_html("continuation", text)
                               + _table_html(changes, ["effect", "token", "p_clean",
                                                       "p_edited", "logprob_change"]))
