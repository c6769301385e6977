"""One latent in context: its activation over the tokens around chosen store rows, or over a text.

:func:`latent_contexts` runs on every latent switch of the explorer, so it avoids the full
``(rows, F)`` encoder matmul where the architecture allows. A ReLU or JumpReLU latent depends
only on its own pre-activation, one encoder column. A TopK latent is active where its
pre-activation is among the row's k largest; the statistics pass records, per store row, the
k-th and (k+1)-th largest pre-activations (``FeatureStats.row_bounds``), so with those one
column decides too. Rows whose two bounds lie too close to decide safely under float rounding
are encoded in full.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from sae_nb.activations.corpora import sentence_batches, token_strings
from sae_nb.activations.extract import resolve_sites, run_sites
from sae_nb.activations.models import Model
from sae_nb.activations.store import IDENTITY, ActivationStore
from sae_nb.dictionaries.architectures import (
    Dictionary,
    JumpReLUSAE,
    ReLUSAE,
    TopKSAE,
    dictionary_hash,
    dictionary_site,
)
from sae_nb.util.threads import one_thread

if TYPE_CHECKING:
    from sae_nb.latents.stats import FeatureStats

# Rounding margin of a pre-activation, relative to |x - b_dec| * max_f |W_enc[:, f]| (+ |b|):
# two float32 computations of one pre-activation (a gemm in the statistics pass, a gemv here)
# differ by at most ~6e-8 of that on the default dictionary; 1e-6 leaves a wide margin. A row
# whose k-th and (k+1)-th pre-activations lie within 4 margins is encoded in full (~1% of rows).
BOUNDARY_TOL = 1e-6


def latent_contexts(store: ActivationStore, dictionary: Dictionary, latent: int, rows,
                    tokenizer, before: int = 16, after: int = 4,
                    stats: FeatureStats | None = None) -> list[dict]:
    """The token window around each store row in ``rows``, with ``latent``'s activation at every
    token: what the explorer shows for a latent's top or interval examples.

    A window never crosses into another context; all windows are encoded in one batch. Each
    dict holds ``row``, ``tokens`` (decoded strings), ``token_ids``, ``acts``, ``center`` (the
    row's index in the window) and ``value`` (the activation at the row). Rows of -1 (padding
    in :class:`FeatureStats`) are skipped. Passing the ``stats`` of this dictionary and store
    lets a TopK dictionary read one encoder column instead of all (default dictionary, 20
    windows, 2 busy cores: ~12 ms instead of ~35 ms); other stats raise a ``ValueError``.
    """
    _check_args(store, dictionary, latent)
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    rows = rows[rows >= 0]
    if rows.size == 0:
        return []
    window, same = _windows(store, rows, before, after)
    needed, inverse = np.unique(window[same], return_inverse=True)
    bounds = _row_bounds(stats, store, dictionary)
    acts = _latent_acts(dictionary, store[needed], latent,
                        None if bounds is None else bounds[needed])[inverse]
    ids = store.index(needed)["token"][inverse]
    names = token_strings(tokenizer, ids)
    out, start = [], 0
    for i, row in enumerate(rows):
        n, center = int(same[i].sum()), int(same[i, :before].sum())
        sl = slice(start, start + n)
        out.append({"row": int(row), "tokens": names[sl], "token_ids": ids[sl].tolist(),
                    "acts": acts[sl].tolist(), "center": center, "value": float(acts[sl][center])})
        start += n
    return out


def _check_args(store: ActivationStore, dictionary: Dictionary, latent: int) -> None:
    if store.manifest.get("mode") != "tokens":
        raise ValueError(f"latent_contexts needs a token-mode store; {str(store.path)!r} holds "
                         f"{store.manifest.get('mode')!r} rows, which have no neighbours.")
    if store.d != dictionary.d_in:
        raise ValueError(f"The store {str(store.path)!r} holds {store.d}-wide activations but "
                         f"the dictionary reads d_in={dictionary.d_in}: use the dictionary's site.")
    if not 0 <= latent < dictionary.d_sae:
        raise IndexError(f"latent={latent} is out of range for a dictionary of "
                         f"d_sae={dictionary.d_sae} latents.")


def _windows(store: ActivationStore, rows: np.ndarray, before: int, after: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """``(R, W)`` store rows around each of ``rows`` and a mask of those in the same context.

    Rows of one context are stored consecutively and in order, so the window is the rows
    ``row - before .. row + after`` that share the row's context."""
    offsets = np.arange(-before, after + 1)
    window = rows[:, None] + offsets[None, :]  # (R, W)
    inside = (window >= 0) & (window < len(store))
    window = np.clip(window, 0, len(store) - 1)
    context = store.index(window.reshape(-1))["context"].reshape(window.shape)
    same = inside & (context == context[:, before : before + 1])
    return window, same


def _row_bounds(stats, store: ActivationStore, dictionary: Dictionary) -> np.ndarray | None:
    """``stats.row_bounds`` when ``stats`` were computed for this dictionary and store."""
    if stats is None or stats.row_bounds is None:
        return None
    ident = stats.identity or {}
    manifest = {k: store.manifest.get(k) for k in IDENTITY}
    if (ident.get("dictionary") != dictionary_hash(dictionary) or stats.n_tokens != len(store)
            or ident.get("store_manifest") != manifest):
        raise ValueError("These stats were computed for another dictionary or store; pass the "
                         "FeatureStats of this dictionary and store, or stats=None.")
    return stats.row_bounds


@torch.no_grad()
def _latent_acts(dictionary: Dictionary, x: np.ndarray, latent: int,
                 bounds: np.ndarray | None) -> np.ndarray:
    """One latent's activation on each row of ``x`` (B, D), from one encoder column where the
    architecture allows it."""
    x = torch.from_numpy(x).to(dictionary.W_enc.device, dictionary.W_enc.dtype)
    column = dictionary.folded_encoder(latent)  # ((D,), scalar), None if not plain
    with one_thread():
        if column is not None and type(dictionary) is ReLUSAE:
            return torch.relu(_pre_column(x, column)).float().cpu().numpy()
        if column is not None and isinstance(dictionary, JumpReLUSAE):
            pre = _pre_column(x, column)
            return (torch.relu(pre) * (pre > dictionary.threshold[latent])).float().cpu().numpy()
        if column is not None and type(dictionary) is TopKSAE and bounds is not None:
            return _topk_column(dictionary, x, latent, column, torch.from_numpy(bounds))
        return _full_encode(dictionary, x, latent)


def _pre_column(x: torch.Tensor, column: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    w, bias = column  # (D,), scalar: one latent of Dictionary.folded_encoder
    return x @ w + bias  # (B,)


def _topk_column(dictionary: TopKSAE, x: torch.Tensor, latent: int,
                 column: tuple[torch.Tensor, torch.Tensor], bounds: torch.Tensor) -> np.ndarray:
    """A TopK latent from its column: active where its pre-activation clears the midpoint of
    the row's k-th and (k+1)-th largest; rows where those two are too close, encoded in full."""
    pre = _pre_column(x, column).float().cpu()  # (B,)
    hi, lo = bounds[:, 0], bounds[:, 1]  # (B,) each
    acts = torch.where(pre > (hi + lo) / 2, torch.relu(pre), torch.zeros_like(pre))
    W = dictionary.W_enc
    scale = ((x.norm(dim=1) + dictionary.b_dec.norm()) * W.norm(dim=0).max()
             + dictionary.folded_encoder()[1].abs().max()).float().cpu()  # (B,)
    unsure = (hi - lo) <= 4 * BOUNDARY_TOL * scale
    if unsure.any():
        acts[unsure] = torch.from_numpy(_full_encode(dictionary, x[unsure.to(x.device)], latent))
    return acts.numpy()


def _full_encode(dictionary: Dictionary, x: torch.Tensor, latent: int) -> np.ndarray:
    if isinstance(dictionary, TopKSAE):
        code = dictionary.sparse_encode(x)  # (B, k)
        return (code.values * (code.indices == latent)).sum(1).float().cpu().numpy()
    return dictionary.encode(x)[:, latent].float().cpu().numpy()


@torch.no_grad()
def text_activations(model: Model, dictionary: Dictionary, text: str, site: str | None = None,
                     max_len: int = 1024) -> tuple[list[str], torch.Tensor]:
    """The tokens of ``text`` (BOS excluded) and their codes ``(T, F)`` at the dictionary's site:
    what the explorer's text box shows."""
    site = dictionary_site(dictionary, site)
    sites = resolve_sites(model, [site])
    _, ids, mask = next(sentence_batches([text], model.tokenizer, 1, max_len=max_len))
    acts = run_sites(model, sites, torch.from_numpy(ids), torch.from_numpy(mask))[0]
    acts = acts[0, 1:]  # (T, D), BOS dropped
    if acts.shape[-1] != dictionary.d_in:
        raise ValueError(f"Site {site!r} is {acts.shape[-1]} wide but the dictionary reads "
                         f"d_in={dictionary.d_in}: wrong model or site.")
    codes = dictionary.encode(acts.to(dictionary.W_enc.device, dictionary.W_enc.dtype))  # (T, F)
    return token_strings(model.tokenizer, ids[0, 1:]), codes.float().cpu()
