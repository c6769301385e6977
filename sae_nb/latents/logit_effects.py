"""Logit effects: the output tokens each latent's decoder direction promotes and suppresses.

A latent writes ``W_dec[f]`` into the residual stream. Read straight through the unembedding
(the "logit lens" of the direction, as Neuronpedia and SAEDashboard show it), its effect on
the logits is ``norm(W_dec[f]) @ W_U.T``, with the final norm taken as linear: RMSNorm is a
per-dimension gain ``gamma`` (Llama, SmolLM2; Gemma stores ``gamma - 1``), LayerNorm centres the
direction first, then applies its gain (GPT-2, GPT-NeoX). The normalising scale and the norm's
bias are the same for every latent, so they cannot change a latent's ranking and are left out.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sae_nb.activations.corpora import token_labels
from sae_nb.activations.models import Model, hf_model
from sae_nb.dictionaries.architectures import Dictionary
from sae_nb.util.io import atomic_save_npz

log = logging.getLogger(__name__)

LOGITS_FILE = "logit_effects.npz"
# Attribute paths of the final norm in the families sae_nb loads.
FINAL_NORMS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm",
               "model.final_layernorm", "model.decoder.final_layer_norm")


@dataclass
class LogitEffects:
    """Per latent, the ``k`` token ids with the largest and the most negative logit effect."""

    top_ids: np.ndarray  # (F, k) promoted tokens, largest first
    top_values: np.ndarray  # (F, k)
    bottom_ids: np.ndarray  # (F, k) suppressed tokens, most negative first
    bottom_values: np.ndarray  # (F, k)

    def tokens(self, tokenizer, latent: int) -> pd.DataFrame:
        """One latent's promoted and suppressed tokens, decoded (a fragment of a character as its
        bytes), side by side."""
        decode = lambda ids: token_labels(tokenizer, ids)  # noqa: E731
        return pd.DataFrame({"promoted": decode(self.top_ids[latent]),
                             "promoted_value": self.top_values[latent],
                             "suppressed": decode(self.bottom_ids[latent]),
                             "suppressed_value": self.bottom_values[latent]})

    def save(self, folder: str | Path, key: str = "") -> Path:
        """Write ``logit_effects.npz`` atomically; ``key`` records what it was computed from."""
        return atomic_save_npz(Path(folder) / LOGITS_FILE, key=np.array(key), **vars(self))

    @classmethod
    def load(cls, folder: str | Path, key: str | None = None) -> LogitEffects | None:
        """What :meth:`save` wrote, or None when absent, saved under another key or damaged
        (with a warning naming the file: the caller computes the effects again)."""
        path = Path(folder) / LOGITS_FILE
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                if key is not None and str(data["key"]) != key:
                    return None
                return cls(**{k: data[k] for k in ("top_ids", "top_values", "bottom_ids",
                                                   "bottom_values")})
        except Exception as err:  # BadZipFile, EOFError, ValueError...: damaged in any way
            log.warning("Cannot read the cached logit effects %s (%s: %s); recomputing them.",
                        path, type(err).__name__, err)
            return None


def final_norm(model: Model) -> torch.nn.Module:
    """The norm applied before the unembedding, found by its usual attribute path."""
    module = hf_model(model)
    for path in FINAL_NORMS:
        found = module
        for part in path.split("."):
            found = getattr(found, part, None)
        if found is not None:
            return found
    raise ValueError(f"Cannot find the final norm of {type(module).__name__}; sae_nb looks for "
                     f"{list(FINAL_NORMS)}. Add this model's path to FINAL_NORMS.")


def norm_directions(norm: torch.nn.Module, directions: torch.Tensor) -> torch.Tensor:
    """``directions`` (n, D) as the final norm would pass them on, up to a common scale."""
    weight = norm.weight.detach().float()
    if "Gemma" in type(norm).__name__:  # Gemma's RMSNorm multiplies by (1 + weight)
        weight = weight + 1.0
    if isinstance(norm, torch.nn.LayerNorm):
        directions = directions - directions.mean(dim=1, keepdim=True)
    return directions * weight


@torch.no_grad()
def logit_effects(model: Model, dictionary: Dictionary, k: int = 10, batch: int = 512,
                  cache: str | Path | None = None) -> LogitEffects:
    """The ``k`` most promoted and most suppressed tokens of every latent.

    ``(norm(W_dec) @ W_U.T)`` is ``(F, V)`` (900 MB for the default dictionary), so it is formed
    ``batch`` latents at a time. ``cache``: a folder to reuse and save the result in.
    """
    hf = hf_model(model)
    unembed = hf.get_output_embeddings().weight.detach().float()  # (V, D)
    if unembed.shape[1] != dictionary.d_in:
        raise ValueError(f"The dictionary writes d_in={dictionary.d_in}-wide directions but the "
                         f"model's residual stream is d_model={unembed.shape[1]}: logit effects "
                         f"need a dictionary at a residual-stream site of this model.")
    key = _key(hf, dictionary, k)
    if cache is not None and (found := LogitEffects.load(cache, key)) is not None:
        return found
    norm = final_norm(model)
    W_dec = dictionary.W_dec.detach().float().to(unembed.device)  # (F, D)
    parts = [_extremes(norm_directions(norm, W_dec[lo : lo + batch]) @ unembed.T, k)
             for lo in range(0, W_dec.shape[0], batch)]
    effects = LogitEffects(*(np.concatenate(p) for p in zip(*parts)))
    if cache is not None:
        effects.save(cache, key)
    return effects


def _extremes(logits: torch.Tensor, k: int) -> tuple[np.ndarray, ...]:
    """Top and bottom ``k`` of each row of ``logits`` (n, V)."""
    top = logits.topk(k, dim=1)
    bottom = logits.topk(k, dim=1, largest=False)
    return (top.indices.cpu().numpy(), top.values.cpu().numpy(),
            bottom.indices.cpu().numpy(), bottom.values.cpu().numpy())


def _key(hf: torch.nn.Module, dictionary: Dictionary, k: int) -> str:
    """What a cached result depends on: the model, the decoder weights and ``k``."""
    w = dictionary.W_dec.detach().float().cpu().contiguous().numpy()
    return json.dumps({"model": str(hf.config._name_or_path), "k": k,
                       "W_dec": hashlib.sha256(w.tobytes()).hexdigest()[:16]})
