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

import torch
import torch.nn.functional as F


class _TopKEncode(torch.autograd.Function):
    """``acts, idx = relu(topk(x @ W_enc + bias, k))``, with an optional AuxK branch: the
    ``k_aux`` largest pre-activations among the latents marked dead."""

    @staticmethod
    def forward(ctx, x, W_enc, bias, k: int, dead: torch.Tensor | None, k_aux: int):
        pre = torch.addmm(bias, x, W_enc)  # (B, F)
        vals, idx = pre.topk(k, dim=-1, sorted=False)  # (B, k)
        aux_vals = aux_idx = None
        if dead is not None and k_aux > 0:
            masked = pre.masked_fill_(~dead, float("-inf"))  # pre is not needed after this
            aux_vals, aux_idx = masked.topk(k_aux, dim=-1, sorted=False)
            aux_vals = torch.relu(aux_vals)
        del pre
        acts = torch.relu(vals)
        ctx.save_for_backward(x, idx, acts > 0, aux_idx,
                              None if aux_vals is None else aux_vals > 0)
        ctx.d_sae = W_enc.shape[1]
        ctx.mark_non_differentiable(idx)
        if aux_idx is not None:
            ctx.mark_non_differentiable(aux_idx)
        return acts, idx, aux_vals, aux_idx

    @staticmethod
    def backward(ctx, g_acts, _g_idx, g_aux, _g_aux_idx):
        x, idx, alive, aux_idx, aux_alive = ctx.saved_tensors
        g, cols = g_acts * alive, idx  # (B, k): gradient at each active latent
        if aux_idx is not None and g_aux is not None:
            g = torch.cat([g, g_aux * aux_alive], dim=1)
            cols = torch.cat([idx, aux_idx], dim=1)
        B, n = g.shape
        rows = torch.arange(B, device=x.device).repeat_interleave(n)
        # (F, B) sparse gradient of the pre-activations, times x: the W_enc gradient as (F, D).
        g_pre_T = torch.sparse_coo_tensor(torch.stack([cols.flatten(), rows]), g.flatten(),
                                          (ctx.d_sae, B), check_invariants=False).coalesce()
        g_W = torch.sparse.mm(g_pre_T, x).T  # (D, F)
        g_bias = torch.zeros(ctx.d_sae, dtype=g.dtype, device=g.device)
        g_bias.index_add_(0, cols.flatten(), g.flatten())
        return None, g_W, g_bias, None, None, None


def topk_encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor,
                k: int, dead: torch.Tensor | None = None, k_aux: int = 0):
    """Sparse TopK codes of ``x``: ``(values, indices)`` and, when ``dead`` is given, the AuxK
    codes over dead latents. ``b_dec`` is subtracted from the input as in SAELens."""
    bias = b_enc - b_dec @ W_enc  # (F,): (x - b_dec) @ W + b == x @ W + (b - b_dec @ W)
    return _TopKEncode.apply(x, W_enc, bias, k, dead, k_aux)


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor,
                  b_dec: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_j values[:, j] * W_dec[indices[:, j]] (+ b_dec)``: ``(B, k) -> (B, D)``."""
    out = F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")
    return out if b_dec is None else out + b_dec
