"""Fast TopK encoding and decoding for training on a CPU.

A dense TopK step spends ~10 * D * F FLOPs per token: the encoder matmul, its two backward
matmuls (weights and input) and a dense decoder. Only k of F latents are active, so:

- the decoder is a weighted gather of k rows of ``W_dec`` (``embedding_bag``), forward and back;
- the encoder's weight gradient touches only the active (row, latent) pairs: a sparse matmul;
- ``b_dec`` enters the encoder as ``b_enc - b_dec @ W_enc``, a vector, so its gradient is a
  vector-matrix product and no ``(B, F) @ (F, D)`` input gradient is ever formed.

That leaves one dense matmul per step (the forward pre-activations), ~2 * D * F FLOPs per token.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from sae_nb.dictionaries.architectures import folded_bias

# One reusable (B, F) buffer for the pre-activations: a fresh 75 MB tensor every step costs
# ~20 ms of page faults on a CPU, more than the top-k itself.
_scratch: dict[tuple, torch.Tensor] = {}


def _buffer(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    key = (shape, like.dtype, like.device)
    if key not in _scratch:
        _scratch.clear()
        _scratch[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
    return _scratch[key]


def release_scratch() -> None:
    """Free the pre-activation buffer (the trainer calls this when it finishes)."""
    _scratch.clear()


class _TopKEncode(torch.autograd.Function):
    """``acts, idx = relu(topk((x - b_dec) @ W_enc + b_enc, k))``, with an optional AuxK
    branch: the ``k_aux`` largest pre-activations among the latents marked dead."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, k: int, dead: torch.Tensor | None, k_aux: int):
        # (x - b_dec) @ W + b_enc == x @ W + (b_enc - b_dec @ W): one matmul, a vector bias
        # (the same folding as Dictionary.folded_encoder; here on raw tensors, for autograd).
        bias = folded_bias(W_enc, b_enc, b_dec)  # (F,)
        pre = torch.addmm(bias, x, W_enc, out=_buffer((x.shape[0], W_enc.shape[1]), x))  # (B, F)
        vals, idx = pre.topk(k, dim=-1, sorted=False)  # (B, k)
        aux_vals = aux_idx = None
        if dead is not None and k_aux > 0:
            pre.masked_fill_(~dead, float("-inf"))  # the buffer is scratch: no copy
            aux_vals, aux_idx = pre.topk(k_aux, dim=-1, sorted=False)
            aux_vals = torch.relu(aux_vals)
        acts = torch.relu(vals)
        ctx.save_for_backward(x, W_enc, b_dec, idx, acts > 0, aux_idx,
                              None if aux_vals is None else aux_vals > 0)
        ctx.mark_non_differentiable(idx)
        if aux_idx is not None:
            ctx.mark_non_differentiable(aux_idx)
        return acts, idx, aux_vals, aux_idx

    @staticmethod
    def backward(ctx, g_acts, _g_idx, g_aux, _g_aux_idx):
        x, W_enc, b_dec, idx, alive, aux_idx, aux_alive = ctx.saved_tensors
        g, cols = g_acts * alive, idx  # (B, n): gradient at each active latent
        if aux_idx is not None and g_aux is not None:
            g = torch.cat([g, g_aux * aux_alive], dim=1)
            cols = torch.cat([idx, aux_idx], dim=1)
        B, n = g.shape
        F = W_enc.shape[1]
        # The pre-activation gradient is sparse: as a CSR (F, B) matrix sorted by latent, its
        # product with the centred input is the W_enc gradient, (F, D), in one sparse matmul.
        flat = cols.flatten()
        order = torch.argsort(flat)
        crow = torch.zeros(F + 1, dtype=torch.long, device=x.device)
        crow[1:] = torch.bincount(flat, minlength=F).cumsum(0)
        with warnings.catch_warnings():  # "CSR support is in beta": it is what we rely on
            warnings.simplefilter("ignore", UserWarning)
            g_pre_T = torch.sparse_csr_tensor(crow, order // n, g.flatten()[order], (F, B),
                                              check_invariants=False)
        g_W = (g_pre_T @ (x - b_dec)).T  # (D, F)
        g_b_enc = torch.zeros(F, dtype=g.dtype, device=g.device).index_add_(0, flat, g.flatten())
        g_b_dec = -(W_enc @ g_b_enc)  # b_dec's path through the encoder input
        return None, g_W, g_b_enc, g_b_dec, None, None, None


def topk_encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor,
                k: int, dead: torch.Tensor | None = None, k_aux: int = 0):
    """Sparse TopK codes of ``x``: ``(values, indices)`` and, when ``dead`` is given, the AuxK
    codes over dead latents. ``b_dec`` is subtracted from the input as in SAELens."""
    return _TopKEncode.apply(x, W_enc, b_enc, b_dec, k, dead, k_aux)


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor,
                  b_dec: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_j values[:, j] * W_dec[indices[:, j]] (+ b_dec)``: ``(B, k) -> (B, D)``."""
    out = F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")
    return out if b_dec is None else out + b_dec
