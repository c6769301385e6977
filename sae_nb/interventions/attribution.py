"""Attribute a prediction to every latent at every position: activation x gradient.

Attribution patching (Nanda, 2023; Syed et al., 2023, "Attribution patching outperforms
automated circuit discovery"; the latent form of Marks et al., 2024, "Sparse feature
circuits"): with the dictionary spliced in at its site and its error term kept
(:mod:`sae_nb.interventions.splice`), the target ``m`` (a token's logit, or the difference of
two tokens' logits, at one position) is a function of the codes ``f``. One forward and one
backward pass give ``dm/df`` for every latent at every position, and

    attribution[p, i] = f[p, i] * dm/df[p, i]

is the first-order estimate of ``m(clean) - m(latent i ablated at position p)``: how much the
latent's presence there pushes the target up. The gradient at the site ``g`` ``(T, D)`` maps to
the codes through the decoder, ``dm/df = g @ W_dec.T`` (times the input's ``sigma`` for OpenAI's
normalised TopK). Positions kept clean (BOS, when the dictionary was trained without it) get 0.

:func:`ablation_check` measures the true effect of ablating the top-attributed latents, one
forward pass each, to show where the linear estimate holds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from sae_nb.activations.corpora import token_strings
from sae_nb.activations.models import Model, hf_model
from sae_nb.dictionaries.architectures import Dictionary
from sae_nb.interventions.splice import (
    InterventionError,
    Splice,
    ablate,
    check_length,
    edited_logits,
    prompt_tokens,
)
from sae_nb.util.checks import whole_number

Target = int | str | tuple | Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Attribution:
    """Attributions of one prompt: ``scores`` ``(T, F)`` = ``codes * grads``."""

    tokens: torch.Tensor  # (T,) token ids, BOS first
    codes: torch.Tensor  # (T, F) latent activations (0 at positions kept clean)
    grads: torch.Tensor  # (T, F) d target / d code
    target: float  # the target's clean value
    target_name: str

    @property
    def scores(self) -> torch.Tensor:
        return self.codes * self.grads

    def per_latent(self) -> torch.Tensor:
        """``(F,)`` attribution of each latent summed over positions (ablating it everywhere)."""
        return self.scores.sum(0)

    def top(self, tokenizer, k: int = 20) -> pd.DataFrame:
        """The ``k`` (position, latent) pairs of largest |attribution|, largest first."""
        scores = self.scores
        flat = scores.abs().flatten().topk(min(k, int((scores != 0).sum()))).indices
        pos, lat = flat // scores.shape[1], flat % scores.shape[1]
        names = token_strings(tokenizer, self.tokens[pos].numpy())
        return pd.DataFrame({"position": pos.numpy(), "token": names, "latent": lat.numpy(),
                             "activation": self.codes[pos, lat].numpy(),
                             "attribution": scores[pos, lat].numpy()})


def target_function(model: Model,
                    target: Target) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """``(fn, name)``: ``fn(logits (V,)) -> scalar``. ``target`` is a token (id or text: its
    logit), a pair ``(a, b)`` (the logit difference ``a - b``) or any such function."""
    if callable(target):
        return target, getattr(target, "__name__", "target")
    if isinstance(target, (tuple, list)):
        if len(target) != 2:
            raise InterventionError(f"Target {target!r}: give one token, or a pair (a, b) for "
                                    f"the logit difference a - b.")
        (a, na), (b, nb) = (_token_id(model, t) for t in target)
        return (lambda logits: logits[a] - logits[b]), f"logit[{na!r}] - logit[{nb!r}]"
    t, name = _token_id(model, target)
    return (lambda logits: logits[t]), f"logit[{name!r}]"


def _token_id(model: Model, token) -> tuple[int, str]:
    vocab = len(model.tokenizer)
    if isinstance(token, (int, np.integer)):
        if not 0 <= int(token) < vocab:
            raise InterventionError(f"Token id {token} out of range 0..{vocab - 1}.")
        return int(token), token_strings(model.tokenizer, [int(token)])[0]
    ids = model.tokenizer(str(token), add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise InterventionError(f"Target {token!r} is {len(ids)} tokens ({ids}); give one "
                                f"token, e.g. with its leading space (' good'), or its id.")
    return ids[0], str(token)


def attribute(model: Model, dictionary: Dictionary, prompt: str | torch.Tensor, target: Target,
              position: int = -1, site: str | None = None) -> Attribution:
    """Activation x gradient of every latent at every position of ``prompt`` (text, or token
    ids ``(T,)``) for ``target`` at ``position``: one forward and one backward pass."""
    ids = as_ids(model, prompt)
    position = check_position(position, ids.shape[1])
    fn, name = target_function(model, target)
    hf = hf_model(model)
    splice = Splice(model, dictionary, [], site, record=True)
    with splice, torch.enable_grad():
        logits = hf(input_ids=ids.to(next(hf.parameters()).device)).logits
        value = fn(logits[0, position].float())
        (g,) = torch.autograd.grad(value, splice.leaf)  # (1, T, D): d target / d site
    x = splice.codes  # (1, T, F)
    with torch.no_grad():
        g = g * dictionary.output_scale(splice.inputs)  # normalised TopK: d out / d f has sigma
        grads = g @ dictionary.W_dec.float().T  # (1, T, F)
        spliced = splice.positions(0, None, 1, ids.shape[1], x.device)  # (1, T, 1)
        codes = x * spliced
    return Attribution(ids[0].cpu(), codes[0].cpu(), grads[0].cpu(), float(value.detach()), name)


def as_ids(model: Model, prompt: str | torch.Tensor) -> torch.Tensor:
    """``(1, T)`` token ids of a prompt given as text (BOS prepended) or as ids."""
    if isinstance(prompt, str):
        return prompt_tokens(model, prompt)
    ids = torch.as_tensor(prompt).reshape(1, -1).long()
    if ids.shape[1] == 0:
        raise InterventionError("The prompt holds no tokens; give some text.")
    check_length(model, ids.shape[1])
    return ids


def check_position(position: int, n_tokens: int) -> int:
    """``position`` as an int if it indexes a prompt of ``n_tokens`` (``-n..n-1``), else an
    error naming it and the range."""
    ok = isinstance(position, (int, np.integer)) and not isinstance(position, bool)
    if not ok or not -n_tokens <= position < n_tokens:
        raise InterventionError(f"position={position} is outside the prompt's {n_tokens} tokens; "
                                f"give a whole number in -{n_tokens}..{n_tokens - 1} (-1, the "
                                f"last token, is the default).")
    return int(position)


def ablation_effect(model: Model, dictionary: Dictionary, ids: torch.Tensor, fn, latent: int,
                    position: int | None, clean: float, at: int = -1,
                    site: str | None = None) -> float:
    """``clean - m(latent ablated)`` measured with one forward pass: the latent ablated at
    ``position`` only, or at every position when ``position`` is None."""
    edit = ablate(latent) if position is None else ablate(latent, position, position + 1)
    edited = fn(edited_logits(model, ids, Splice(model, dictionary, [edit], site))[0, at])
    return clean - float(edited)


def ablation_check(model: Model, dictionary: Dictionary, prompt: str | torch.Tensor,
                   target: Target, n: int = 20, position: int = -1,
                   site: str | None = None) -> pd.DataFrame:
    """The ``n`` top-attributed (position, latent) pairs with their attribution and their true
    ablation effect (one forward pass each)."""
    n = whole_number("n", n, 1, InterventionError, example="n=20 (position, latent) pairs")
    att = attribute(model, dictionary, prompt, target, position, site)
    fn, _ = target_function(model, target)
    table = att.top(model.tokenizer, n)
    ids = att.tokens[None]
    table["ablation_effect"] = [ablation_effect(model, dictionary, ids, fn, int(lat), int(pos),
                                                att.target, position, site)
                                for pos, lat in zip(table.position, table.latent)]
    return table


def agreement(table: pd.DataFrame) -> dict:
    """Pearson correlation of attribution and ablation effect, and the share with the same sign."""
    a, b = table["attribution"].to_numpy(), table["ablation_effect"].to_numpy()
    corr = float(np.corrcoef(a, b)[0, 1]) if len(a) > 1 and a.std() > 0 and b.std() > 0 \
        else float("nan")
    return {"pairs": len(a), "pearson_r": corr,
            "same_sign": float(np.mean(np.sign(a) == np.sign(b)))}


def per_latent_ablations(model: Model, dictionary: Dictionary, prompt: str | torch.Tensor,
                         target: Target, latents: Sequence[int], position: int = -1,
                         site: str | None = None) -> np.ndarray:
    """The naive alternative to :func:`attribute`: one ablation forward pass per latent (at
    every position), ``m(clean) - m(ablated)`` for each."""
    ids = as_ids(model, prompt)
    position = check_position(position, ids.shape[1])
    fn, _ = target_function(model, target)
    clean = float(fn(edited_logits(model, ids)[0, position]))
    return np.array([ablation_effect(model, dictionary, ids, fn, int(i), None, clean, position,
                                     site) for i in latents])
