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

from sae_nb.dictionaries.architectures import (
    BatchTopKSAE,
    Dictionary,
    JumpReLUSAE,
    ReLUSAE,
    SkipTopKSAE,
    TopKSAE,
    folded_bias,
)
from sae_nb.training import kernels
from sae_nb.training.distributed import Group
from sae_nb.training.sparse_ops import (
    bag_sum,
    batch_top,
    by_latent,
    sparse_decode,
    topk_sae_forward,
)


@dataclass
class Step:
    loss: torch.Tensor
    mse: torch.Tensor  # mean squared error summed over D, averaged over rows
    l0: float  # mean active latents per row
    fired: torch.Tensor  # (F,) bool: latents active anywhere in this batch
    err_sq: torch.Tensor  # squared error summed over the batch (detached)
    y: torch.Tensor  # (B, D) the target
    x_hat: torch.Tensor  # (B, D) reconstruction (detached)

    @property
    def fvu(self) -> float:
        """The batch's fraction of variance unexplained, computed when read (the trainer reads
        it only on logged steps: the target's variance is a pass over the batch)."""
        return float(self.err_sq / (self.y - self.y.mean(0)).pow(2).sum().clamp_min(1e-12))


def _residual_variance(residual: torch.Tensor, group: Group | None) -> torch.Tensor:
    """``mean_i |r_i - mean(r)|^2`` over the global batch (this rank's rows without a group)."""
    if group is None or group.world == 1:
        centred = (residual - residual.mean(0)).reshape(-1)
        return torch.dot(centred, centred) / len(residual)
    n, residual = len(residual) * group.world, residual.float()  # bf16 under autocast
    mean = group.sum_(residual.sum(0)) / n  # (D,)
    return group.sum_((residual - mean).pow(2).sum()) / n


def topk_step(sae: TopKSAE, x, y, dead: torch.Tensor | None, k_aux: int, auxk_alpha: float,
              group: Group | None = None, screen: bool = False) -> Step:
    """TopK (Gao et al. 2024) with the AuxK loss: the dead latents' top ``k_aux`` codes are asked
    to reconstruct the residual error, which gives dead latents a gradient again. ``screen``:
    the latents are ranked in bfloat16 first (``sparse_ops.screened_topk``)."""
    use_aux = dead is not None and bool(dead.any())
    b_dec_in = sae.b_dec if sae.apply_b_dec_to_input else torch.zeros_like(sae.b_dec)
    x_hat, aux_hat, vals, idx = topk_sae_forward(
        x, sae.W_enc, sae.b_enc, b_dec_in, sae.W_dec, sae.b_dec, sae.k,
        dead if use_aux else None, min(k_aux, int(dead.sum())) if use_aux else 0, screen)
    if isinstance(sae, SkipTopKSAE):  # the linear skip term, a dense (D, D) product
        x_hat = torch.addmm(x_hat, x, sae.W_skip.T)
    denom = None
    if use_aux and group is not None and group.world > 1:
        denom = _residual_variance((y - x_hat).detach(), group)
    loss, err_sq = _TopKLoss.apply(x_hat, aux_hat if use_aux else None, y, auxk_alpha, denom)
    mse = err_sq / len(x)
    # Latents with a positive code anywhere in the batch (zero codes go to a spare slot).
    fired = torch.zeros(sae.d_sae + 1, dtype=torch.bool, device=x.device)
    fired[torch.where(vals > 0, idx, sae.d_sae).flatten()] = True
    return Step(loss, mse.detach(), float((vals > 0).sum()) / len(x), fired[:-1],
                err_sq.detach(), y, x_hat.detach())


class _TopKLoss(torch.autograd.Function):
    """TopK's loss, ``(loss, err_sq)``: the squared error ``|y - x_hat|^2`` summed over the
    batch (detached) and ``loss = err_sq / B + alpha * aux / var``, where ``aux`` is AuxK's
    mean squared error in reconstructing the residual ``y - x_hat`` (detached) from the dead
    latents' codes, ``var`` the residual's variance (Gao et al.; from this batch, or ``denom``
    over the ranks' global batch), the ratio zeroed where not finite (early steps). Its gradient
    is written out, ``-2 (y - x_hat) / B`` and ``-2 alpha (residual - aux_hat) / (B var)``:
    five passes over the batch instead of the fifteen of the same terms under autograd."""

    @staticmethod
    def forward(ctx, x_hat, aux_hat, y, alpha: float, denom):
        B = len(y)
        err = y - x_hat
        flat = err.view(-1)
        err_sq = torch.dot(flat, flat)
        loss, aux_scale, d = err_sq / B, None, None
        if aux_hat is not None:
            d = err - aux_hat
            var = (_residual_variance(err, None) if denom is None else denom).clamp_min(1e-8)
            ratio = torch.dot(d.view(-1), d.view(-1)) / B / var
            finite = bool(torch.isfinite(ratio))
            loss = loss + alpha * (ratio if finite else torch.nan_to_num(ratio))
            aux_scale = -2 * alpha / (B * var) if finite else None
        ctx.save_for_backward(err, d)
        ctx.aux_scale, ctx.B = aux_scale, B
        ctx.mark_non_differentiable(err_sq)
        return loss, err_sq

    @staticmethod
    def backward(ctx, g_loss, _g_err_sq):
        err, d = ctx.saved_tensors
        g_x_hat = err * (-2 * g_loss / ctx.B)
        g_aux_hat = None
        if d is not None:  # AuxK's term
            g_aux_hat = (d * (ctx.aux_scale * g_loss) if ctx.aux_scale is not None
                         else torch.zeros_like(d))
        return g_x_hat, g_aux_hat, None, None, None


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


class _BatchTopKEncode(torch.autograd.Function):
    """BatchTopK codes as a ragged sparse list: ``(values (N,), rows (N,), cols (N,))`` of the
    kept activations, sorted by row, plus the AuxK codes ``(B, k_aux)`` over dead latents.

    The sparse TopK training of ``sae_nb.training.sparse_ops`` for a batch-wide selection: one
    dense matmul (the pre-activations, ``b_dec`` folded into the bias), the encoder's weight
    gradient a CSR matmul over the kept (row, latent) pairs, no ``(B, F) @ (F, D)`` product
    anywhere.
    ``group`` (data parallelism): keep the positive activations >= the cut of the global batch
    (as ``_global_batch_topk``); None: the ``k * B`` largest of this batch, as
    :meth:`BatchTopKSAE.batch_activation`."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, k: int, dead, k_aux: int, group):
        pre = torch.addmm(folded_bias(W_enc, b_enc, b_dec), x, W_enc)  # (B, F)
        B, F = pre.shape
        acts = torch.relu(pre)
        if group is None:
            vals, flat = batch_top(acts, k * B)
        else:
            n = k * B * group.world
            local = acts.flatten()
            own = local.float().topk(min(n, local.numel()), sorted=False).values  # this rank's
            candidates = group.gather(own)
            cut = candidates.topk(n, sorted=False).values.min().to(acts.dtype)
            flat = ((local >= cut) & (local > 0)).nonzero().squeeze(1)  # sorted; zeros add nothing
            vals = local[flat]
        rows, cols = flat // F, flat % F
        aux_vals = aux_idx = None
        if dead is not None and k_aux > 0:
            aux_vals, aux_idx = pre.masked_fill_(~dead, float("-inf")).topk(k_aux, dim=-1,
                                                                           sorted=False)
            aux_vals = torch.relu(aux_vals)
        ctx.save_for_backward(x, W_enc, b_dec, rows, cols, vals > 0, aux_idx,
                              None if aux_vals is None else aux_vals > 0)
        ctx.mark_non_differentiable(rows, cols)
        if aux_idx is not None:
            ctx.mark_non_differentiable(aux_idx)
        return vals, rows, cols, aux_vals, aux_idx

    @staticmethod
    def backward(ctx, g_vals, _g_rows, _g_cols, g_aux, _g_aux_idx):
        x, W_enc, b_dec, rows, cols, alive, aux_idx, aux_alive = ctx.saved_tensors
        g = (g_vals * alive).to(x.dtype)  # bf16 under autocast; the weights' gradient in fp32
        if aux_idx is not None and g_aux is not None:
            B, n = aux_idx.shape
            g = torch.cat([g, (g_aux * aux_alive).flatten().to(x.dtype)])
            rows = torch.cat([rows, torch.arange(B, device=x.device).repeat_interleave(n)])
            cols = torch.cat([cols, aux_idx.flatten()])
        F = W_enc.shape[1]
        offsets, order = by_latent(cols, F)
        g_W = bag_sum(offsets, rows[order], g[order], x - b_dec).T  # (D, F)
        g_b_enc = torch.zeros(F, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
        return None, g_W, g_b_enc, -(W_enc @ g_b_enc), None, None, None, None


def _ragged_decode(vals: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, B: int,
                   W_dec: torch.Tensor, b_dec: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, D)``: row ``i`` is ``sum vals[j] * W_dec[cols[j]]`` over ``rows[j] == i`` (rows
    sorted), plus ``b_dec``: a weighted gather of the kept decoder rows."""
    offsets = torch.zeros(B, dtype=torch.long, device=vals.device)
    offsets[1:] = torch.bincount(rows, minlength=B)[:-1].cumsum(0)
    out = torch.nn.functional.embedding_bag(cols, W_dec, offsets, mode="sum",
                                            per_sample_weights=vals.to(W_dec.dtype))
    return out if b_dec is None else out + b_dec


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
                   matryoshka_widths=None, sparse: bool = False) -> Step:
    """BatchTopK (Bussmann et al. 2024): the k*B largest activations over the whole batch; the
    inference threshold tracks the smallest kept activation with an exponential average.

    With ``matryoshka_widths`` (several increasing prefix sizes ending at ``d_sae``): Matryoshka
    BatchTopK (Bussmann et al. 2025), the loss summing every prefix's reconstruction error
    (:func:`matryoshka_loss`); AuxK and the threshold as in BatchTopK (SAELens's default, AuxK
    on the full dictionary's residual).

    ``sparse`` (what the trainer uses): the same step on sparse codes (``_BatchTopKEncode``, each
    group of latents decoded once); the dense form here is its reference."""
    ranks = group is not None and group.world > 1
    if sparse:
        return _sparse_batchtopk_step(sae, x, y, dead, k_aux, auxk_alpha, update_threshold,
                                      threshold_beta, group if ranks else None, matryoshka_widths)
    pre = sae.pre_acts(x)
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
        aux_mse = (residual - aux_hat).pow(2).sum(-1).mean()
        loss = loss + auxk_alpha * torch.nan_to_num(aux_mse / denom)
    with torch.no_grad():
        active = f > 0
        kept_min = f[active].min() if active.any() else None
        if ranks and update_threshold:  # the smallest kept activation over all ranks
            local = kept_min if kept_min is not None else f.new_tensor(float("inf"))
            kept_min = group.min_(local.float().reshape(1))[0]
            kept_min = kept_min if torch.isfinite(kept_min) else None
        if kept_min is not None and update_threshold:
            t = sae.threshold
            t.copy_(torch.where(t == 0, kept_min,
                                threshold_beta * t + (1 - threshold_beta) * kept_min))
    return Step(loss, mse.detach(), float(active.sum()) / len(x), active.any(0),
                err_sq.detach(), y, x_hat.detach())


def _update_threshold(sae: BatchTopKSAE, kept_min: torch.Tensor | None, update: bool, beta: float,
                      group: Group | None) -> None:
    with torch.no_grad():
        if group is not None and update:  # the smallest kept activation over all ranks
            local = kept_min if kept_min is not None else sae.threshold.new_tensor(float("inf"))
            kept_min = group.min_(local.float().reshape(1))[0]
            kept_min = kept_min if torch.isfinite(kept_min) else None
        if kept_min is not None and update:
            t = sae.threshold
            t.copy_(torch.where(t == 0, kept_min, beta * t + (1 - beta) * kept_min))


def _sparse_batchtopk_step(sae: BatchTopKSAE, x, y, dead, k_aux, auxk_alpha, update_threshold,
                           threshold_beta, group, widths) -> Step:
    use_aux = dead is not None and bool(dead.any())
    b_dec_in = sae.b_dec if sae.apply_b_dec_to_input else torch.zeros_like(sae.b_dec)
    vals, rows, cols, aux_vals, aux_idx = _BatchTopKEncode.apply(
        x, sae.W_enc, sae.b_enc, b_dec_in, sae.k, dead if use_aux else None,
        min(k_aux, int(dead.sum())) if use_aux else 0, group)
    B = len(x)
    mses = []
    if widths is not None and len(widths) > 1:
        # Prefix m's codes are the kept ones of latents < m: decode each group of latents
        # [previous width, width) once and add it to the previous prefix's reconstruction, so
        # all prefixes cost one full decode (a gather per kept code), forward and back.
        x_hat, start = sae.b_dec, 0
        for i, width in enumerate(widths):
            keep = (cols >= start) & (cols < width)
            x_hat = x_hat + _ragged_decode(vals[keep], rows[keep], cols[keep], B, sae.W_dec)
            if i < len(widths) - 1:
                mses.append((y - x_hat).pow(2).sum(-1).mean())
            start = width
    else:
        x_hat = _ragged_decode(vals, rows, cols, B, sae.W_dec, sae.b_dec)
    err = y - x_hat
    err_sq = err.pow(2).sum()
    mse = err_sq / B
    loss = torch.stack([*mses, mse]).sum() if mses else mse
    if use_aux:
        residual = err.detach()
        aux_hat = sparse_decode(aux_vals, aux_idx, sae.W_dec)
        denom = _residual_variance(residual, group).clamp_min(1e-8)
        aux_mse = (residual - aux_hat).pow(2).sum(-1).mean()
        loss = loss + auxk_alpha * torch.nan_to_num(aux_mse / denom)
    active = vals > 0
    _update_threshold(sae, vals[active].detach().min() if active.any() else None,
                      update_threshold, threshold_beta, group)
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=x.device)
    fired[cols[active]] = True
    return Step(loss, mse.detach(), float(active.sum()) / B, fired, err_sq.detach(), y,
                x_hat.detach())


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
                active.any(0), err_sq.detach(), y, x_hat.detach())


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
                active.any(0), err_sq.detach(), y, x_hat.detach())


def screens(encoder_precision: str, x: torch.Tensor) -> bool:
    """Whether a TopK step ranks its latents with the certified bfloat16 screen: asked for, or
    ``"auto"`` on a CPU whose bfloat16 matrix units (AMX) make it faster, with the kernels."""
    if encoder_precision != "auto":
        return encoder_precision == "bfloat16"
    return (x.device.type == "cpu" and x.dtype == torch.float32 and kernels.amx()
            and kernels.library() is not None)


def compute_step(sae: Dictionary, x, y, cfg, dead, past_warmup: bool = True,
                 group: Group | None = None) -> Step:
    """Dispatch on the dictionary's class; ``group``: the ranks sharing the batch, if any."""
    if isinstance(sae, BatchTopKSAE):
        widths = None
        if getattr(cfg, "architecture", None) == "matryoshka_batchtopk":
            widths = cfg.matryoshka_widths_value(sae.d_sae)
        return batchtopk_step(sae, x, y, dead, cfg.k_aux_value(sae), cfg.auxk_alpha, past_warmup,
                              group=group, matryoshka_widths=widths, sparse=True)
    if isinstance(sae, TopKSAE):
        return topk_step(sae, x, y, dead, cfg.k_aux_value(sae), cfg.auxk_alpha, group,
                         screen=screens(getattr(cfg, "encoder_precision", "float32"), x))
    if isinstance(sae, JumpReLUSAE):
        return jumprelu_step(sae, x, y, cfg.l0_coefficient, cfg.jumprelu_bandwidth)
    return relu_step(sae, x, y, cfg.l1_coefficient, cfg.sparsity_penalty,
                     cfg.l1_weighted_by_decoder_norm)
