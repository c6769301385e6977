"""Sparse codes of whole texts: pooled activations encoded, or per-token codes pooled.

``sentence_codes`` mean-pools (or max-pools) each sentence's activations at the dictionary's
site, BOS and padding excluded, and encodes the pooled vectors: the per-sentence view the
field's scripts print. ``pooled_token_codes`` encodes every token and pools the codes, as
sparse-probing studies do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from sae_nb.activations.corpora import sentence_batches
from sae_nb.activations.extract import (
    pool_rows,
    pooled_activations,
    resolve_sites,
    run_sites,
    site_widths,
)
from sae_nb.activations.models import Model, model_name
from sae_nb.dictionaries.architectures import Dictionary, dictionary_site


@dataclass
class SentenceCodes:
    texts: list[str]
    acts: torch.Tensor  # (N, D) pooled activations
    codes: torch.Tensor  # (N, F) the dictionary's codes of the pooled activations

    def table(self) -> pd.DataFrame:
        """Per sentence: mean, variance, max weight and its position, for the activations and
        for the codes (plus the codes' L0)."""
        rows = {"sentence": self.texts}
        for name, m in (("act", self.acts), ("code", self.codes)):
            top = m.max(dim=1)
            rows.update({f"{name}_mean": m.mean(1).numpy(), f"{name}_var": m.var(1).numpy(),
                         f"{name}_max": top.values.numpy(), f"{name}_argmax": top.indices.numpy()})
        rows["code_l0"] = (self.codes != 0).sum(1).numpy()
        return pd.DataFrame(rows)

    def strongest_latents(self, n: int = 20) -> np.ndarray:
        """The ``n`` latents with the largest code on any sentence, strongest first."""
        peak = self.codes.max(dim=0).values
        n = min(n, int((peak > 0).sum()) or 1)
        return peak.topk(n).indices.numpy()


@torch.no_grad()
def sentence_codes(model: Model, dictionary: Dictionary, texts: list[str],
                   site: str | None = None, pool: str = "mean",
                   batch_size: int = 32) -> SentenceCodes:
    """Pool each text's activations at the dictionary's site and encode them."""
    site = dictionary_site(dictionary, site)
    _check_width(dictionary, model, site)
    acts = pooled_activations(model, texts, [site], pool=pool, batch_size=batch_size)[site]
    device = dictionary.W_enc.device
    codes = dictionary.encode(acts.to(device, dictionary.W_enc.dtype)).float().cpu()
    return SentenceCodes(list(texts), acts, codes)


@torch.no_grad()
def pooled_token_codes(model: Model, dictionary: Dictionary, texts: list[str],
                       site: str | None = None, pool: str = "mean", batch_size: int = 32,
                       max_len: int = 128) -> SentenceCodes:
    """Encode every token, then pool the codes over each text's tokens (BOS and padding left
    out), as sparse-probing studies pool SAE latents; the activations are pooled alike.

    Unlike :func:`sentence_codes`, the dictionary only ever sees single-token activations, the
    inputs it was trained on."""
    site = dictionary_site(dictionary, site)
    _check_width(dictionary, model, site)
    sites = resolve_sites(model, [site])
    device = dictionary.W_enc.device
    acts_out = torch.zeros(len(texts), dictionary.d_in)
    codes_out = torch.zeros(len(texts), dictionary.d_sae)
    for rows, ids, mask in sentence_batches(list(texts), model.tokenizer, batch_size, max_len):
        keep = torch.from_numpy(mask.astype(bool))
        keep[:, 0] = False  # BOS
        acts = run_sites(model, sites, torch.from_numpy(ids), torch.from_numpy(mask))[0].float()
        B, T, D = acts.shape
        codes = dictionary.encode(acts.reshape(B * T, D).to(device)).reshape(B, T, -1).float().cpu()
        acts_out[torch.from_numpy(rows)] = pool_rows(acts.cpu(), keep, pool)
        codes_out[torch.from_numpy(rows)] = pool_rows(codes, keep, pool)
    return SentenceCodes(list(texts), acts_out, codes_out)


def _check_width(dictionary: Dictionary, model: Model, site: str) -> None:
    (width,) = site_widths(model, resolve_sites(model, [site])).values()  # site may be an alias
    if width != dictionary.d_in:
        raise ValueError(f"The dictionary reads {dictionary.d_in}-wide activations, but site "
                         f"{site!r} of {model_name(model)!r} is {width} wide: wrong model or site.")
