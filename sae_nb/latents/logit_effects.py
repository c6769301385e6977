"""Logit effects: the output tokens each latent's decoder direction promotes and suppresses.

A latent writes ``W_dec[f]`` into the residual stream. Read straight through the unembedding
(the "logit lens" of the direction, as Neuronpedia and SAEDashboard show it), its effect on
the logits is ``norm(W_dec[f]) @ W_U.T``, with the final norm taken as linear: RMSNorm is a
per-dimension gain ``gamma`` (Llama, SmolLM2; Gemma stores ``gamma - 1``), LayerNorm centres the
direction first, then applies its gain (GPT-2, GPT-NeoX). The normalising scale and the norm's
bias are the same for every latent, so they cannot change a latent's ranking and are left out.

To read the numbers beside activations, :meth:`LogitEffects.tokens` puts them on the scale of
a real forward pass: the norm divides by the residual stream's RMS, measured once on a short
text (``scale``, the median over its tokens but the first), and the latent fires at its typical
activation, not at 1. So a value is the logit change, in nats, when the latent fires as it
usually does: about 0.1-1 on SmolLM2, where the raw products read 80-220. Word pieces (a
word's middle, a fragment of a character's bytes, code mixed of letters and symbols) are listed
after whole words and symbols: read straight through the unembedding, rarely trained pieces
with large output weights top most latents' lists.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from sae_nb.activations.corpora import token_labels
from sae_nb.activations.models import Model, hf_model
from sae_nb.dictionaries.architectures import Dictionary
from sae_nb.util.io import atomic_save_npz

log = logging.getLogger(__name__)

LOGITS_FILE = "logit_effects.npz"
# The text whose tokens give the typical RMS at the final norm (LogitEffects.scale).
SCALE_TEXT = ("The committee met on Tuesday to discuss the new budget. Several members argued that "
              "taxes on working families were already too high, while others wanted more money "
              "for schools, roads and hospitals.\n\nIn the end, they agreed to vote next week.")
# A word piece as read alone: the middle of a word (no space, a lowercase start), letters mixed
# with symbols other than ' - . (code), or a byte fragment escaped by token_labels.
WORD_PIECE = re.compile(r"^[a-z]|\\x[0-9a-f]{2}|^\W*[A-Za-z]+[^A-Za-z0-9\s'.-]+|"
                        r"^[^A-Za-z0-9\s'.-]+[A-Za-z]")
# Attribute paths of the final norm in the families sae_nb loads.
FINAL_NORMS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm",
               "model.final_layernorm", "model.decoder.final_layer_norm")


def is_word_piece(label: str) -> bool:
    """Whether a token read alone (a label of :func:`sae_nb.activations.corpora.token_labels`)
    is a word piece: it continues a word (``"eveloped"``), holds part of a character's bytes, or
    mixes letters with code symbols (``"[:,:,x"``). Words with their space (``" tax"``),
    capitalised starts, numbers and punctuation are not."""
    return bool(WORD_PIECE.search(label))


def store_words(store, tokenizer, share: float = 0.5) -> frozenset[int]:
    """Token ids the store shows as whole tokens: seen in it, and, for a token that starts with
    a letter, not followed by a word's middle (a lowercase start, no space) in ``share`` or
    more of its occurrences. The rest, never seen or mostly a word's start (``" comprom"``,
    ``" policym"``), are word pieces for :meth:`LogitEffects.tokens`: no rule can tell those
    from words by their text alone; the corpus can."""
    index = store.index()
    token, context, offset = index["token"].astype(np.int64), index["context"], index["offset"]
    follows = ((context[1:] == context[:-1]) & (offset[1:] == offset[:-1] + 1)
               & (token[:-1] >= 0) & (token[1:] >= 0))  # row r + 1: the token after row r's
    first, nxt = token[:-1][follows], token[1:][follows]
    seen = np.unique(token[token >= 0])
    if not len(first):
        return frozenset(seen.tolist())
    uniq, inverse = np.unique(nxt, return_inverse=True)
    middle = np.array([bool(re.match(r"[a-z]", t)) for t in token_labels(tokenizer, uniq)],
                      dtype=bool)[inverse]  # (n,) the next token continues the word
    count = np.bincount(first, minlength=int(seen.max()) + 1)
    continued = np.bincount(first, weights=middle.astype(np.float64), minlength=len(count))
    starts = {int(i) for i in np.nonzero(continued >= share * np.maximum(count, 1))[0]
              if count[i] > 0}
    letters = {i for i, t in zip(sorted(starts), token_labels(tokenizer, sorted(starts)))
               if re.match(r"\s?[A-Za-z]", t)} if starts else set()
    return frozenset(int(i) for i in seen if int(i) not in letters)


@dataclass
class LogitEffects:
    """Per latent, the ``k`` token ids with the largest and the most negative logit effect."""

    top_ids: np.ndarray  # (F, k) promoted tokens, largest first
    top_values: np.ndarray  # (F, k)
    bottom_ids: np.ndarray  # (F, k) suppressed tokens, most negative first
    bottom_values: np.ndarray  # (F, k)
    scale: float = 1.0  # the residual stream's typical RMS at the final norm (1: unknown)

    def tokens(self, tokenizer, latent: int, activation: float = 1.0, n: int | None = None,
               words: frozenset[int] | None = None) -> pd.DataFrame:
        """One latent's promoted and suppressed tokens, decoded (a fragment of a character as
        its bytes), side by side: each value is the logit change when the latent fires at
        ``activation`` (e.g. its mean when firing), through the final norm at its typical
        ``scale``. Each side lists its words first, then its word pieces
        (:func:`is_word_piece`, and with ``words`` (:func:`store_words`) every token not in it;
        flagged in ``*_piece``), each by its value; ``n`` rows."""
        factor = float(activation) / float(self.scale)
        out = {}
        for side, ids, values in (("promoted", self.top_ids, self.top_values),
                                  ("suppressed", self.bottom_ids, self.bottom_values)):
            labels = token_labels(tokenizer, ids[latent])
            piece = np.array([is_word_piece(t) or (words is not None and int(i) not in words)
                              for t, i in zip(labels, ids[latent])], dtype=bool)
            order = np.argsort(piece, kind="stable")[:n]  # words first, each part in rank order
            out.update({side: [labels[i] for i in order], f"{side}_id": ids[latent][order],
                        f"{side}_value": np.asarray(values[latent], np.float64)[order] * factor,
                        f"{side}_piece": piece[order]})
        return pd.DataFrame(out)

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
                                                   "bottom_values")},
                           scale=float(data["scale"]) if "scale" in data else 1.0)
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
def logit_effects(model: Model, dictionary: Dictionary, k: int = 20, batch: int = 512,
                  cache: str | Path | None = None, progress: bool = True) -> LogitEffects:
    """The ``k`` most promoted and most suppressed tokens of every latent, and the residual
    stream's typical RMS at the final norm (:func:`residual_scale`).

    ``(norm(W_dec) @ W_U.T)`` is ``(F, V)`` (900 MB for the default dictionary), so it is formed
    ``batch`` latents at a time. ``cache``: a folder to reuse and save the result in. ``k`` is
    twice the rows a table shows, so that words still fill it when word pieces go last.
    ``progress``: a bar over the batches, with the time left.
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
             for lo in tqdm(range(0, W_dec.shape[0], batch), desc="logit effects",
                            unit="batch", disable=not progress)]
    effects = LogitEffects(*(np.concatenate(p) for p in zip(*parts)),
                           scale=residual_scale(model))
    if cache is not None:
        effects.save(cache, key)
    return effects


@torch.no_grad()
def residual_scale(model: Model, text: str = SCALE_TEXT) -> float:
    """The median RMS of the final norm's input over the tokens of ``text`` but the first (whose
    norm is often tens of times the rest): what the norm divides a direction by."""
    seen: list[torch.Tensor] = []
    hook = final_norm(model).register_forward_hook(lambda m, args, out: seen.append(args[0]))
    hf = hf_model(model)
    try:
        ids = model.tokenizer(text, return_tensors="pt").input_ids.to(hf.device)
        hf(ids)
    finally:
        hook.remove()
    rms = seen[0][0].float().pow(2).mean(-1).sqrt()  # (T,)
    return float(rms[1:].median() if len(rms) > 1 else rms[0])


def _extremes(logits: torch.Tensor, k: int) -> tuple[np.ndarray, ...]:
    """Top and bottom ``k`` of each row of ``logits`` (n, V)."""
    top = logits.topk(k, dim=1)
    bottom = logits.topk(k, dim=1, largest=False)
    return (top.indices.cpu().numpy(), top.values.cpu().numpy(),
            bottom.indices.cpu().numpy(), bottom.values.cpu().numpy())


def _key(hf: torch.nn.Module, dictionary: Dictionary, k: int) -> str:
    """What a cached result depends on: the model, the decoder weights and ``k``."""
    w = dictionary.W_dec.detach().float().cpu().contiguous().numpy()
    return json.dumps({"model": str(hf.config._name_or_path), "k": k, "scale": "rms v1",
                       "W_dec": hashlib.sha256(w.tobytes()).hexdigest()[:16]})
