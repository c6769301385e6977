"""Training objectives, one function per architecture: ``(dictionary, x, y) -> Step``.

``x`` is the (scaled) input and ``y`` the (scaled) target: the same tensor for an SAE, the
next site's activation for a transcoder. Each returns the loss to minimise plus what the
trainer logs and needs (which latents fired, for dead-latent tracking).

Matryoshka BatchTopK is BatchTopK with a nested loss (``matryoshka_widths``): the same
dictionary class, saved and loaded as BatchTopK (SAELens: a JumpReLU with one threshold).

Under data parallelism (``group`` of several ranks) each rank passes its slice of the global
batch; the two terms that are not means of per-row terms, AuxK's normaliser and BatchTopK's
batch-wide selection and threshold, are reduced over the ranks, so the mean of the ranks'
gradients is the gradient of the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .dictionary import BatchTopKSAE, Dictionary, JumpReLUSAE, ReLUSAE, TopKSAE
from .distributed import Group
from .sparse_ops import sparse_decode, topk_encode


@dataclass
class Step:
    loss: torch.Tensor
    mse: torch.Tensor  # mean squared error summed over D, averaged over rows
    l0: float  # mean active latents per row
    fired: torch.Tensor  # (F,) bool: latents active anywhere in this batch
    fvu: float  # fraction of variance unexplained in this batch
    x_hat: torch.Tensor  # (B, D) reconstruction (detached)


def _fvu(y: torch.Tensor, err_sq: torch.Tensor) -> float:
    return float(err_sq / (y - y.mean(0)).pow(2).sum().clamp_min(1e-12))


def _residual_variance(residual: torch.Tensor, group: Group | None) -> torch.Tensor:
    """``mean_i |r_i - mean(r)|^2`` over the global batch (this rank's rows without a group)."""
    if group is None or group.world == 1:
        return (residual - residual.mean(0)).pow(2).sum(-1).mean()
    n, residual = len(residual) * group.world, residual.float()  # bf16 under autocast
    mean = group.sum_(residual.sum(0)) / n  # (D,)
    return group.sum_((residual - mean).pow(2).sum()) / n


def topk_step(sae: TopKSAE, x, y, dead: torch.Tensor | None, k_aux: int, auxk_alpha: float,
              group: Group | None = None) -> Step:
    """TopK (Gao et al. 2024) with the AuxK loss: the dead latents' top ``k_aux`` codes are asked
    to reconstruct the residual error, which gives dead latents a gradient again."""
    use_aux = dead is not None and bool(dead.any())
    vals, idx, aux_vals, aux_idx = topk_encode(
        x, sae.W_enc, sae.b_enc, sae.b_dec if sae.apply_b_dec_to_input else torch.zeros_like(sae.b_dec),
        sae.k, dead if use_aux else None, min(k_aux, int(dead.sum())) if use_aux else 0)
    x_hat = sparse_decode(vals, idx, sae.W_dec, sae.b_dec)
    err = y - x_hat
    err_sq = err.pow(2).sum()
    mse = err_sq / len(x)
    loss = mse
    if use_aux:
        residual = err.detach()
        aux_hat = sparse_decode(aux_vals, aux_idx, sae.W_dec)
        aux_mse = (residual - aux_hat).pow(2).sum(-1).mean()
        # Normalised by the residual's variance, as in Gao et al.; guarded against NaN early.
        denom = _residual_variance(residual, group).clamp_min(1e-8)
        loss = loss + auxk_alpha * torch.nan_to_num(aux_mse / denom)
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=x.device)
    fired[idx[vals > 0]] = True
    return Step(loss, mse.detach(), float((vals > 0).sum()) / len(x), fired,
                _fvu(y, err_sq.detach()), x_hat.detach())


def _global_batch_topk(pre: torch.Tensor, k: int, group: Group) -> torch.Tensor:
    """BatchTopK over the global batch of ``B = b * world`` rows: keep activations at least the
    ``k * B``-th largest of all ranks'. Each rank's share of those lies among its own ``k * B``
    largest, so gathering those candidates finds the cut."""
    acts = torch.relu(pre)  # (b, F)
    n = k * len(pre) * group.world
    flat = acts.detach().float().flatten()
    candidates = group.gather(flat.topk(min(n, flat.numel()), sorted=False).values)
    cut = candidates.topk(n, sorted=False).values.min()
    return acts * (acts >= cut)


def check_matryoshka_widths(widths, d_sae: int | None = None, error=ValueError) -> tuple[int, ...]:
    """``widths`` as a tuple of ints, checked: strictly increasing positive prefix sizes, the last
    one ``d_sae`` (when given). Raises ``error`` naming the value and the fix."""
    try:
        out = tuple(int(w) for w in widths)
        if any(int(w) != w for w in widths):
            raise ValueError
    except (TypeError, ValueError):
        raise error(f"matryoshka_widths={widths!r} must be a list of whole numbers, the sizes of "
                    f"the nested prefixes of the latents, e.g. [512, 1024, 2048, 4096].") from None
    if not out:
        raise error("matryoshka_widths is empty; give the prefix sizes, ending with d_sae, e.g. "
                    "[d_sae // 8, d_sae // 4, d_sae // 2, d_sae], or None for that default.")
    if out[0] < 1 or any(b <= a for a, b in zip(out, out[1:])):
        raise error(f"matryoshka_widths={list(out)} must be strictly increasing positive prefix "
                    f"sizes (each prefix holds the one before it), e.g. [512, 1024, 2048, 4096].")
    if d_sae is not None and out[-1] != d_sae:
        raise error(f"matryoshka_widths={list(out)} ends at {out[-1]}, but d_sae={d_sae}: the last "
                    f"prefix must be the whole dictionary. End the list with {d_sae}.")
    return out


def default_matryoshka_widths(d_sae: int) -> tuple[int, ...]:
    """``(F/8, F/4, F/2, F)``, the nesting of Bussmann et al. (2025), fewer levels for small
    ``F`` (repeated sizes dropped)."""
    return tuple(sorted({max(1, d_sae // 8), max(1, d_sae // 4), max(1, d_sae // 2), d_sae}))


def prefix_reconstructions(f: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor,
                           widths) -> list[torch.Tensor]:
    """The reconstruction ``f[:, :m] @ W_dec[:m] + b_dec`` of every prefix width ``m``, built
    group by group (each group's latents decoded once and added to the previous prefix's), so
    all of them together cost one full decode."""
    out, decoded, start = [], b_dec, 0
    for width in widths:
        decoded = f[:, start:width] @ W_dec[start:width] + decoded
        out.append(decoded)
        start = width
    return out


def matryoshka_loss(sae: Dictionary, f: torch.Tensor, y: torch.Tensor, widths) -> tuple[
        torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """``(loss, per-prefix MSEs, full reconstruction)`` for codes ``f`` (B, F): the loss is the
    SUM over prefixes of each prefix's squared error (summed over D, averaged over rows), as in
    Bussmann et al. (2025) and SAELens's ``matryoshka_batchtopk`` (an inner loss per level added
    to the full one). A sum, not a mean, so the full dictionary's term keeps the weight it has
    in plain BatchTopK and one prefix is exactly BatchTopK."""
    recons = prefix_reconstructions(f, sae.W_dec, sae.b_dec, widths)
    mses = [(y - r).pow(2).sum(-1).mean() for r in recons]
    return torch.stack(mses).sum(), mses, recons[-1]


@torch.no_grad()
def matryoshka_prefix_losses(sae: BatchTopKSAE, x: torch.Tensor, widths,
                             batch_topk: bool = True) -> list[float]:
    """Each prefix's reconstruction MSE of ``x`` (the dictionary's own units), with the
    training-time batch top-k selection (``batch_topk``) or the inference threshold."""
    pre = sae.pre_acts(x)
    f = sae.batch_activation(pre) if batch_topk else sae.activation(pre)
    widths = check_matryoshka_widths(widths, sae.d_sae)
    return [float(m) for m in matryoshka_loss(sae, f, x, widths)[1]]


def batchtopk_step(sae: BatchTopKSAE, x, y, dead, k_aux: int, auxk_alpha: float,
                   update_threshold: bool = True,
                   threshold_beta: float = 0.99, group: Group | None = None,
                   matryoshka_widths=None) -> Step:
    """BatchTopK (Bussmann et al. 2024): the k*B largest activations over the whole batch; the
    inference threshold tracks the smallest kept activation with an exponential average.

    With ``matryoshka_widths`` (several increasing prefix sizes ending at ``d_sae``): Matryoshka
    BatchTopK (Bussmann et al. 2025), the loss summing every prefix's reconstruction error
    (:func:`matryoshka_loss`); AuxK and the threshold as in BatchTopK (SAELens's default, AuxK
    on the full dictionary's residual)."""
    pre = sae.pre_acts(x)
    ranks = group is not None and group.world > 1
    f = _global_batch_topk(pre, sae.k, group) if ranks else sae.batch_activation(pre)
    if matryoshka_widths is not None and len(matryoshka_widths) > 1:
        loss, _, x_hat = matryoshka_loss(sae, f, y, matryoshka_widths)
        err = y - x_hat
        err_sq = err.pow(2).sum()
        mse = err_sq / len(x)
    else:
        x_hat = sae.decode(f)
        err = y - x_hat
        err_sq = err.pow(2).sum()
        mse = err_sq / len(x)
        loss = mse
    if dead is not None and bool(dead.any()):
        kk = min(k_aux, int(dead.sum()))
        aux_v, aux_i = pre.masked_fill(~dead, float("-inf")).topk(kk, dim=-1, sorted=False)
        residual = err.detach()
        aux_hat = sparse_decode(torch.relu(aux_v), aux_i, sae.W_dec)
        denom = _residual_variance(residual, group).clamp_min(1e-8)
        loss = loss + auxk_alpha * torch.nan_to_num((residual - aux_hat).pow(2).sum(-1).mean() / denom)
    with torch.no_grad():
        active = f > 0
        kept_min = f[active].min() if active.any() else None
        if ranks and update_threshold:  # the smallest kept activation over all ranks
            local = kept_min if kept_min is not None else f.new_tensor(float("inf"))
            kept_min = group.min_(local.float().reshape(1))[0]
            kept_min = kept_min if torch.isfinite(kept_min) else None
        if kept_min is not None and update_threshold:
            t = sae.threshold
            t.copy_(torch.where(t == 0, kept_min, threshold_beta * t + (1 - threshold_beta) * kept_min))
    return Step(loss, mse.detach(), float(active.sum()) / len(x), active.any(0),
                _fvu(y, err_sq.detach()), x_hat.detach())


def relu_step(sae: ReLUSAE, x, y, l1_coefficient: float, penalty: str,
              weight_by_decoder_norm: bool) -> Step:
    """ReLU + L1 (Towards Monosemanticity), optionally with the April update (L1 weighted by
    decoder row norms), or an entropy penalty on each row's normalised activations."""
    f = sae.encode(x)
    x_hat = sae.decode(f)
    err_sq = (y - x_hat).pow(2).sum()
    mse = err_sq / len(x)
    scaled = f * sae.W_dec.norm(dim=1) if weight_by_decoder_norm else f
    if penalty == "entropy":
        p = scaled / scaled.sum(-1, keepdim=True).clamp_min(1e-8)
        sparsity = -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()
    else:
        sparsity = scaled.sum(-1).mean()
    active = f > 0
    return Step(mse + l1_coefficient * sparsity, mse.detach(), float(active.sum()) / len(x),
                active.any(0), _fvu(y, err_sq.detach()), x_hat.detach())


class _JumpReLU(torch.autograd.Function):
    """``pre * H(pre - t)``; the threshold's gradient uses a rectangle kernel of width ``eps``
    (straight-through estimator of Rajamanoharan et al. 2024)."""

    @staticmethod
    def forward(ctx, pre, threshold, eps: float):
        ctx.save_for_backward(pre, threshold)
        ctx.eps = eps
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, g):
        pre, t = ctx.saved_tensors
        near = ((pre - t).abs() < ctx.eps / 2).to(g.dtype)
        g_t = -(t / ctx.eps) * near * g
        return g * (pre > t), g_t.sum(0), None


class _Step(torch.autograd.Function):
    """Heaviside ``H(pre - t)`` with the same pseudo-derivative, for the L0 penalty."""

    @staticmethod
    def forward(ctx, pre, threshold, eps: float):
        ctx.save_for_backward(pre, threshold)
        ctx.eps = eps
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):
        pre, t = ctx.saved_tensors
        near = ((pre - t).abs() < ctx.eps / 2).to(g.dtype)
        return None, (-(1.0 / ctx.eps) * near * g).sum(0), None


def jumprelu_step(sae: JumpReLUSAE, x, y, l0_coefficient: float, bandwidth: float) -> Step:
    """JumpReLU + L0 (Rajamanoharan et al. 2024). The threshold is trained directly, as in
    dictionary_learning; the trainer projects it back above 0 after every step
    (``JumpReLUSAE.project_threshold``), so the one used here is always positive."""
    pre = sae.pre_acts(x)
    threshold = sae.threshold
    f = _JumpReLU.apply(pre, threshold, bandwidth)
    x_hat = sae.decode(f)
    err_sq = (y - x_hat).pow(2).sum()
    mse = err_sq / len(x)
    l0 = _Step.apply(pre, threshold, bandwidth).sum(-1).mean()
    active = f > 0
    return Step(mse + l0_coefficient * l0, mse.detach(), float(active.sum()) / len(x),
                active.any(0), _fvu(y, err_sq.detach()), x_hat.detach())


def compute_step(sae: Dictionary, x, y, cfg, dead, past_warmup: bool = True,
                 group: Group | None = None) -> Step:
    """Dispatch on the dictionary's class; ``group``: the ranks sharing the batch, if any."""
    if isinstance(sae, BatchTopKSAE):
        widths = None
        if getattr(cfg, "architecture", None) == "matryoshka_batchtopk":
            widths = cfg.matryoshka_widths_value(sae.d_sae)
        return batchtopk_step(sae, x, y, dead, cfg.k_aux_value(sae), cfg.auxk_alpha, past_warmup,
                              group=group, matryoshka_widths=widths)
    if isinstance(sae, TopKSAE):
        return topk_step(sae, x, y, dead, cfg.k_aux_value(sae), cfg.auxk_alpha, group)
    if isinstance(sae, JumpReLUSAE):
        return jumprelu_step(sae, x, y, cfg.l0_coefficient, cfg.jumprelu_bandwidth)
    return relu_step(sae, x, y, cfg.l1_coefficient, cfg.sparsity_penalty, cfg.l1_weighted_by_decoder_norm)
