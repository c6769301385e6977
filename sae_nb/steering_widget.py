"""SteeringWidget: steer the model with one latent, live in JupyterLab.

Type a prompt, pick a latent by number, slide the coefficient (in units of the median token norm
at the site, as in :mod:`sae_nb.steering`), press Generate: the clean and steered continuations
side by side, the next tokens the edit promotes and suppresses, and the prompt's top attributed
latents (activation x gradient of the clean model's top next token against its second), each
with a button that ablates it at its position and shows what changes.

Every callback is a method (``generate``, ``ablate``), so tests drive the widget in a plain
Python process: set a widget's ``.value``, call ``Button.click()``, read the HTML.
"""

from __future__ import annotations

import html

import ipywidgets as widgets
import pandas as pd

from .attribution import attribute
from .effects import generate, logit_changes, neutral_tokens
from .intervene import InterventionError, ablate, edited_logits, prompt_tokens
from .steering import latent_method, site_scale

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

    def __init__(self, model, dictionary, prompt: str = "The film was", latent: int = 0,
                 coefficient: float = 0.25, scale: float | None = None, max_new_tokens: int = 20,
                 n_attributed: int = 8):
        self.model, self.dictionary, self.n_attributed = model, dictionary, n_attributed
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
        self.status = widgets.HTML()
        self.texts = widgets.HTML()
        self.logits = widgets.HTML()
        self.attributed = widgets.VBox()
        self.ablation = widgets.HTML()
        super().__init__([
            self.prompt, widgets.HBox([self.latent, self.coefficient, self.tokens,
                                       self.generate_button]),
            self.status, self.texts,
            widgets.HTML("<b>Next token: promoted and suppressed by the edit</b>"), self.logits,
            widgets.HTML("<b>Top attributed latents of the prompt</b> (the clean model's top "
                         "next token against its second; click to ablate one)"),
            self.attributed, self.ablation])
        self.add_class(WIDGET_CLASS)
        self.steered_text = self.clean_text = ""

    def edits(self):
        return latent_method(self.dictionary, self.latent.value, self.scale).edits(
            float(self.coefficient.value))

    def generate(self) -> None:
        """The Generate button: continuations, the logit table and the attributed latents."""
        try:
            prompt, n = self.prompt.value, int(self.tokens.value)
            self.clean_text = generate(self.model, prompt, max_new_tokens=n)[0]
            self.steered_text = generate(self.model, prompt, self.dictionary, self.edits(),
                                         max_new_tokens=n)[0]
        except InterventionError as err:
            self.status.value = f'<span style="color: crimson">{html.escape(str(err))}</span>'
            return
        self.status.value = (f"latent {self.latent.value}, coefficient "
                             f"{self.coefficient.value:g} x {self.scale:.1f} (median token norm)")
        self.texts.value = ('<div style="display: flex; gap: 16px">'
                            + _text_html("clean", self.clean_text)
                            + _text_html("steered", self.steered_text) + "</div>")
        changes = logit_changes(self.model, self.dictionary, prompt, self.edits(), k=8)
        self.logits.value = _table_html(changes, ["effect", "token", "p_clean", "p_edited",
                                                  "logprob_change"])
        self.show_attribution(prompt)

    def show_attribution(self, prompt: str) -> None:
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
                f"latent {r.latent} at position {r.position} ({html.escape(repr(r.token))}): "
                f"attribution {r.attribution:+.3f} to {html.escape(att.target_name)}")]))
        self.attributed.children = rows

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
