"""What an attribution graph explains: its logit nodes, each a direction over the vocabulary.

Every target is ``vocab . logits`` at the prompt's last position, for a vector ``vocab``
``(V,)``; its gradient with respect to the final norm's output is ``W_U.T @ vocab``.

- By default (``None``), the top tokens by probability until they hold ``desired_logit_prob``
  (0.95) of it, at most ``max_n_logits`` (10), as circuit-tracer picks them. Each is its logit
  minus the mean logit (``vocab = e_t - 1/V``, circuit-tracer's demeaned unembedding column),
  weighted by its probability.
- A token (id, or text that is one token): the same demeaned logit, weighted by its probability.
- A pair ``(a, b)``: the logit difference ``logit[a] - logit[b]`` (weight 1).
- A vector ``(V,)``: any linear function of the logits (weight 1).
- A function of the logits ``(V,) -> scalar``: linearised at the prompt's logits, its gradient
  is the vector (weight 1); the node's value is then that gradient dotted with the logits.

A list of these gives several targets. The weights are what the pruning and the graph scores
spread influence from (circuit-tracer's ``logit_probabilities``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from sae_nb.activations.corpora import token_strings
from sae_nb.activations.models import hf_model
from sae_nb.circuits.transcoder_set import CircuitError
from sae_nb.interventions.attribution import as_ids


@dataclass
class Target:
    """One logit node: ``vocab . logits`` at the last position."""

    name: str
    vocab: torch.Tensor  # (V,)
    weight: float  # its share of the influence: the token's probability, or 1
    token: int | None = None  # the token of a single-token target


def salient_targets(logits: torch.Tensor, tokenizer, max_n_logits: int = 10,
                    desired_logit_prob: float = 0.95) -> list[Target]:
    """The fewest top tokens whose probabilities reach ``desired_logit_prob``, at most
    ``max_n_logits``, each as its demeaned logit weighted by its probability."""
    probs = torch.softmax(logits.double(), -1)
    top_p, top_i = probs.topk(min(max_n_logits, len(probs)))
    cutoff = int(torch.searchsorted(top_p.cumsum(0), torch.tensor(desired_logit_prob,
                                                                  dtype=top_p.dtype))) + 1
    return [_token_target(tokenizer, int(i), len(logits), float(p))
            for i, p in zip(top_i[:cutoff], top_p[:cutoff])]


def make_targets(logits: torch.Tensor, tokenizer, spec=None, max_n_logits: int = 10,
                 desired_logit_prob: float = 0.95) -> list[Target]:
    """The targets ``spec`` names (see the module docstring), on the last position's
    ``logits`` ``(V,)``."""
    if spec is None:
        return salient_targets(logits, tokenizer, max_n_logits, desired_logit_prob)
    specs = spec if isinstance(spec, list) else [spec]
    if not specs:
        raise CircuitError("targets=[] names no target; give a token, a pair (a, b), a vector "
                           "over the vocabulary or a function of the logits, or None for the "
                           "top tokens.")
    probs = torch.softmax(logits.double(), -1)
    return [_one_target(logits, probs, tokenizer, s) for s in specs]


def _one_target(logits, probs, tokenizer, spec) -> Target:
    V = len(logits)
    if isinstance(spec, torch.Tensor) and spec.is_floating_point():
        if spec.shape != (V,):
            raise CircuitError(f"A target vector must have one weight per token, shape ({V},); "
                               f"this one has shape {tuple(spec.shape)}.")
        return Target("vector . logits", spec.detach().double().cpu(), 1.0)
    if callable(spec):
        return _function_target(logits, spec)
    if isinstance(spec, tuple):
        if len(spec) != 2:
            raise CircuitError(f"Target {spec!r}: a tuple is a pair (a, b) of tokens, for the "
                               f"logit difference a - b.")
        (a, na), (b, nb) = (token_id(tokenizer, t, V) for t in spec)
        vocab = torch.zeros(V, dtype=torch.float64)
        vocab[a], vocab[b] = 1.0, -1.0
        return Target(f"logit[{na!r}] - logit[{nb!r}]", vocab, 1.0)
    t, _ = token_id(tokenizer, spec, V)
    return _token_target(tokenizer, t, V, float(probs[t]))


def _token_target(tokenizer, token: int, V: int, prob: float) -> Target:
    vocab = torch.full((V,), -1.0 / V, dtype=torch.float64)
    vocab[token] += 1.0
    return Target(token_strings(tokenizer, [token])[0], vocab, prob, token)


def _function_target(logits: torch.Tensor, fn: Callable) -> Target:
    x = logits.detach().double().clone().requires_grad_(True)
    with torch.enable_grad():
        value = fn(x)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise CircuitError(f"The target function {getattr(fn, '__name__', fn)!r} must map "
                               f"the logits (V,) to one number (a 0-d tensor), e.g. "
                               f"lambda l: l[a] - l[b].")
        (grad,) = torch.autograd.grad(value.reshape(()), x, allow_unused=True)
    if grad is None or not bool(grad.any()):
        raise CircuitError(f"The target function {getattr(fn, '__name__', fn)!r} does not "
                           f"depend on the logits; give a function of them.")
    return Target(getattr(fn, "__name__", "f(logits)"), grad.detach(), 1.0)


def token_id(tokenizer, token, vocab_size: int) -> tuple[int, str]:
    """``(id, text)`` of one token given as an id or as text that is exactly one token."""
    if isinstance(token, (int, np.integer)) and not isinstance(token, bool):
        if not 0 <= int(token) < vocab_size:
            raise CircuitError(f"Token id {token} is not in the vocabulary (ids 0..{vocab_size - 1}"
                               f"); give an id in that range or the token's text.")
        return int(token), token_strings(tokenizer, [int(token)])[0]
    if not isinstance(token, str):
        raise CircuitError(f"Target {token!r} is neither a token (id or text), a pair, a vector "
                           f"over the vocabulary nor a function of the logits.")
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or not 0 <= ids[0] < vocab_size:
        raise CircuitError(f"Target {token!r} is not one token of the vocabulary (it tokenizes "
                           f"to {ids}); give a single token, e.g. with its leading space "
                           f"(' Paris'), or its id.")
    return ids[0], token


@torch.no_grad()
def prompt_predictions(model, prompts: list[str]) -> pd.DataFrame:
    """Each prompt's next token under the real model (BOS prepended, as graphs read it): its
    top token, that token's probability and the prompt's length in tokens; a graph is worth
    reading where the model is right and confident."""
    hf, rows = hf_model(model), []
    device = next(hf.parameters()).device
    for prompt in prompts:
        ids = as_ids(model, prompt)
        probs = hf(ids.to(device)).logits[0, -1]
        p, token = probs.float().softmax(-1).max(0)
        rows.append({"prompt": prompt,
                     "top token": token_strings(model.tokenizer, [int(token)])[0],
                     "probability": float(p), "tokens": ids.shape[1]})
    return pd.DataFrame(rows)
