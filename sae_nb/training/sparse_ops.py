"""Fast TopK encoding and decoding for training on a CPU.

A dense TopK step spends ~10 * D * F FLOPs per token: the encoder matmul, its two backward
matmuls (weights and input) and a dense decoder. Only k of F latents are active, so:

- the decoder is a weighted gather of k rows of ``W_dec`` (``embedding_bag``), forward and back;
- the encoder's and decoder's weight gradients touch only the active (row, latent) pairs: two
  sparse products over one pattern (embedding bags over the pairs sorted by latent once per
  step);
- ``b_dec`` enters the encoder as ``b_enc - b_dec @ W_enc``, a vector, so its gradient is a
  vector-matrix product and no ``(B, F) @ (F, D)`` input gradient is ever formed.

That leaves one dense matmul per step (the forward pre-activations), ~2 * D * F FLOPs per token.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from sae_nb.dictionaries.architectures import folded_bias
from sae_nb.training import kernels

# AuxK runs dense over the dead columns when it keeps at least this share of them per token
# (k_aux >= share * dead): a dense product costs ~1/8 of a gather per multiply-add on a CPU.
DENSE_AUX_SHARE = 1 / 8

# One reusable (B, F) buffer per use for the pre-activations: a fresh 75 MB tensor every step
# costs ~20 ms of page faults on a CPU, more than the top-k itself.
_scratch: dict[str, torch.Tensor] = {}


def _buffer(name: str, shape: tuple[int, ...], dtype: torch.dtype,
            device: torch.device) -> torch.Tensor:
    held = _scratch.get(name)
    if held is None or held.shape != shape or held.dtype != dtype or held.device != device:
        _scratch.pop(name, None)  # the old one freed before the new one is made
        _scratch[name] = held = torch.empty(shape, dtype=dtype, device=device)
    return held


def release_scratch() -> None:
    """Free the pre-activation buffer (the trainer calls this when it finishes)."""
    _scratch.clear()


def by_latent(flat: torch.Tensor, F: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bag offsets ``(F + 1,)`` and the order that groups ``flat``'s entries by latent.

    On the CPU a stable radix sort of 16-bit keys in numpy (0.5 ms for 131k entries): torch's
    own CPU sort of the same keys took 37-300 ms on two threads (its parallel sort), more than
    the rest of the backward."""
    if flat.device.type == "cpu":
        keys = flat.numpy().astype(np.int16 if F <= np.iinfo(np.int16).max else np.int32)
        order = torch.from_numpy(np.argsort(keys, kind="stable"))
    else:
        order = torch.sort(flat, stable=True).indices
    offsets = torch.zeros(F + 1, dtype=torch.long, device=flat.device)
    offsets[1:] = torch.bincount(flat, minlength=F).cumsum(0)
    return offsets, order


def bag_sum(offsets, rows, weights, source) -> torch.Tensor:
    """``out[f] = sum_{e in bag f} weights[e] * source[rows[e]]``, ``(F, D)``: the product of a
    sparse ``(F, B)`` matrix in CSR form (``offsets``, ``rows``, ``weights``) with ``source``
    ``(B, D)``, as an embedding bag (a gather-and-sum, 4-6x torch's CSR matmul on a CPU)."""
    return F.embedding_bag(rows, source, offsets, per_sample_weights=weights, mode="sum",
                           include_last_offset=True)


def _gather_dot(W: torch.Tensor, idx: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``out[b, j] = W[idx[b, j]] . g[b]``, ``(B, n)``, without forming the ``(B, n, D)`` gather:
    torch's own kernel for embedding_bag's per-sample-weight gradient (bags of equal size)."""
    B, n = idx.shape
    bags = torch.arange(B, device=idx.device)
    out = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        g, W, idx.flatten(), bags * n, bags.repeat_interleave(n), 0)
    return out.view(B, n)


def row_topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``pre.topk(k, dim=-1, sorted=False)`` for ``pre (B, F)``, the same values (which of equal
    values at the cut are kept may differ), in about 30% less time on a CPU.

    torch's CPU top-k spends ~10 ns per entry ranking (value, index) pairs; this ranks only a
    few percent of the entries. The columns form ``F / 8`` strided groups (column ``c`` belongs
    to group ``c mod F/8``); a group's maximum is one vectorised pass. The k-th largest of the
    group maxima (of unions of up to 8 groups when there are many) is at most the row's k-th
    largest entry, since the k largest maxima are k distinct entries. So every kept entry is at
    least that bound and lies in a group whose maximum is too: those groups' entries at least the
    bound (~42 per row for k = 32 of 4,608 on real activations) are ranked exactly. A batch
    with NaN, with -inf at a row's bound, or with a row of far more candidates than k (many
    equal values) is ranked by torch's top-k. With the compiled kernels (a float32 matrix on
    the CPU) the same scheme runs per row in C, 4k groups, and only the rows it leaves (NaN,
    inf, many ties) go to torch's top-k."""
    B, F_ = pre.shape
    if (pre.device.type == "cpu" and pre.dtype == torch.float32 and pre.is_contiguous()
            and 0 < k <= F_ and B > 0 and kernels.library() is not None):
        # the compiled scan (kernels.c, the same bound), torch's top-k for the rows it leaves
        values, indices, done = kernels.row_topk(pre, k)
        left = (~done).nonzero().squeeze(1)
        if len(left):
            v, i = pre.index_select(0, left).topk(k, dim=-1, sorted=False)
            values.index_copy_(0, left, v)
            indices.index_copy_(0, left, i)
        return values, indices
    g = 8
    if pre.device.type != "cpu" or F_ % g or F_ // g < 4 * k or B == 0:
        return pre.topk(k, dim=-1, sorted=False)
    G = F_ // g
    gmax = pre.view(B, g, G).amax(1)  # (B, G): group c holds columns c, c + G, ..., c + 7G
    coarse = gmax  # ranked for the bound: the fewest maxima of unions of groups, at least 2k
    for c in (8, 4, 2):
        if G % c == 0 and G // c >= 2 * k:
            coarse = gmax.view(B, c, G // c).amax(1)
            break
    low = coarse.topk(k, dim=-1, sorted=False).values.amin(1)  # (B,) <= each row's k-th
    # NaN propagates through the maxima; -inf at a bound admits every column of its row.
    if bool(coarse.isnan().any()) or not bool(torch.isfinite(low).all()):
        return pre.topk(k, dim=-1, sorted=False)
    rows, groups = (gmax >= low.unsqueeze(1)).nonzero(as_tuple=True)  # row-major
    flat = (rows * F_ + groups).unsqueeze(1) + G * torch.arange(g, device=pre.device)  # (N, g)
    vals = torch.take(pre, flat)
    keep = (vals >= low[rows].unsqueeze(1)).view(-1).nonzero().squeeze(1)
    flat, vals = flat.view(-1)[keep], vals.view(-1)[keep]  # still grouped by row
    rows = flat // F_
    counts = torch.bincount(rows, minlength=B)
    width = int(counts.max())
    if int(counts.min()) < k or width > 16 * k:
        return pre.topk(k, dim=-1, sorted=False)
    slot = rows * width + torch.arange(len(rows), device=pre.device) - (counts.cumsum(0) -
                                                                         counts)[rows]
    ranked = torch.full((B * width,), float("-inf"), dtype=pre.dtype, device=pre.device)
    column = torch.zeros(B * width, dtype=torch.long, device=pre.device)
    ranked[slot], column[slot] = vals, flat - rows * F_
    values, j = ranked.view(B, width).topk(k, dim=-1, sorted=False)
    return values, column.view(B, width).gather(1, j)


def _top_among(pre: torch.Tensor, among: torch.Tensor, k: int):
    """The ``k`` largest of each row of ``pre`` among the columns marked in ``among`` (F,):
    ``(values, indices)``, ``(B, k)``. Few marked columns (dead latents, usually) are gathered
    and ranked alone, at a cost proportional to their number; many are ranked in place (the
    others set to -inf in ``pre``, which is scratch)."""
    columns = among.nonzero().squeeze(1)
    if 4 * len(columns) < pre.shape[1]:
        values, j = pre.index_select(1, columns).topk(k, dim=-1, sorted=False)
        return values, columns[j]
    return row_topk(pre.masked_fill_(~among, float("-inf")), k)


class _TopKSAEForward(torch.autograd.Function):
    """A TopK SAE's training forward in one function, ``x -> (x_hat, aux_hat, values, idx)``:
    the pre-activations (one dense matmul, ``b_dec`` folded into the bias), the top k and, given
    dead latents, the AuxK top ``k_aux`` among them, and both sparse decodes (``aux_hat``: the
    AuxK codes' reconstruction, no bias). The backward sorts the active (row, latent) pairs by
    latent once and forms all four weight gradients from that one order: ``W_enc``'s and
    ``W_dec``'s as two embedding bags over the same pattern (main and AuxK entries together)."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec_in, W_dec, b_dec, k: int, dead, k_aux: int,
                screen: bool = False):
        B, F_ = x.shape[0], W_enc.shape[1]
        if screen:
            pre = None  # only the candidates' pre-activations are formed in float32
            vals, idx = screened_topk(x, W_enc, b_enc, b_dec_in, k)
        else:
            pre = torch.addmm(folded_bias(W_enc, b_enc, b_dec_in), x, W_enc,
                              out=_buffer("pre", (B, F_), x.dtype, x.device))
            vals, idx = row_topk(pre, k)  # (B, k)
        acts = torch.relu(vals)
        x_hat = F.embedding_bag(idx, W_dec, per_sample_weights=acts, mode="sum") + b_dec
        aux_hat = aux_idx = aux_acts = aux_cols = W_dead = None
        if dead is not None and k_aux > 0:
            aux_cols = dead.nonzero().squeeze(1)
            pre_dead = None  # screened: the dead columns' pre-activations formed here, float32
            if pre is None:
                W_cols = W_enc.t().index_select(0, aux_cols).t()  # W_enc's rows: latent-major
                pre_dead = torch.addmm(folded_bias(W_cols, b_enc[aux_cols], b_dec_in), x, W_cols)
            if DENSE_AUX_SHARE * len(aux_cols) <= k_aux:
                # Many codes per dead latent: dense products over the dead columns cost less
                # than gathers of k_aux rows per token (aux_acts is then (B, dead) codes).
                if pre_dead is None:
                    pre_dead = pre.index_select(1, aux_cols)
                if k_aux < len(aux_cols):
                    aux_vals, j = row_topk(pre_dead, k_aux)
                    aux_acts = torch.zeros_like(pre_dead).scatter_(1, j, torch.relu(aux_vals))
                else:  # every dead latent is kept
                    aux_acts = pre_dead.relu_()
                W_dead = W_dec.index_select(0, aux_cols)
                with torch.autocast(x.device.type, enabled=False):  # in x's dtype, as the bags
                    aux_hat = aux_acts @ W_dead
            else:
                if pre_dead is None:
                    aux_vals, aux_idx = _top_among(pre, dead, k_aux)
                else:
                    aux_vals, j = pre_dead.topk(k_aux, dim=-1, sorted=False)
                    aux_idx = aux_cols[j]
                aux_cols = None
                aux_acts = torch.relu(aux_vals)
                aux_hat = F.embedding_bag(aux_idx, W_dec, per_sample_weights=aux_acts,
                                          mode="sum")
        ctx.save_for_backward(x, W_enc, b_dec_in, W_dec, idx, acts, aux_idx, aux_acts, aux_cols,
                              W_dead)
        ctx.mark_non_differentiable(acts, idx)
        return x_hat, aux_hat, acts, idx

    @staticmethod
    def backward(ctx, g_hat, g_aux_hat, _g_acts, _g_idx):
        (x, W_enc, b_dec_in, W_dec, idx, acts, aux_idx, aux_acts, aux_cols,
         W_dead) = ctx.saved_tensors
        B, F_ = x.shape[0], W_enc.shape[1]
        g_hat = torch.zeros_like(x) if g_hat is None else g_hat.contiguous()
        x_in = x - b_dec_in
        # Gradient at each kept pre-activation: the decoder row's dot with the output gradient,
        # through the ReLU.
        g_pre, cols, weights = _gather_dot(W_dec, idx, g_hat) * (acts > 0), idx, acts
        sources, aux = g_hat, aux_idx is not None and g_aux_hat is not None
        if aux:
            g_aux_hat = g_aux_hat.contiguous()
            g_pre = torch.cat([g_pre, _gather_dot(W_dec, aux_idx, g_aux_hat) * (aux_acts > 0)], 1)
            cols, weights = torch.cat([idx, aux_idx], 1), torch.cat([acts, aux_acts], 1)
            sources = torch.cat([g_hat, g_aux_hat])
        n = cols.shape[1]
        flat = cols.flatten()
        crow, order = by_latent(flat, F_)
        in_rows = order // n  # the input row of each sorted entry
        g_W_enc = bag_sum(crow, in_rows, g_pre.flatten()[order], x_in)  # (F, D)
        # For W_dec an entry reads row b of g_hat, or for an AuxK entry (column k and on) row b
        # of g_aux_hat: row B + b of the stacked sources.
        dec_rows = in_rows + B * (order % n >= idx.shape[1]) if aux else in_rows
        g_W_dec = bag_sum(crow, dec_rows, weights.flatten()[order], sources)
        g_b_enc = torch.zeros(F_, dtype=x.dtype, device=x.device).index_add_(0, flat,
                                                                             g_pre.flatten())
        if aux_cols is not None and g_aux_hat is not None:  # dense AuxK over the dead columns
            g_aux_hat = g_aux_hat.contiguous()
            g_aux = (g_aux_hat @ W_dead.T) * (aux_acts > 0)  # (B, dead)
            g_W_enc.index_add_(0, aux_cols, g_aux.T @ x_in)
            g_W_dec.index_add_(0, aux_cols, aux_acts.T @ g_aux_hat)
            g_b_enc.index_add_(0, aux_cols, g_aux.sum(0))
        g_W_enc = g_W_enc.T
        g_b_dec_in = -(W_enc @ g_b_enc)  # b_dec's path through the encoder's input
        g_b_dec = g_hat.sum(0)
        return None, g_W_enc, g_b_enc, g_b_dec_in, g_W_dec, g_b_dec, None, None, None, None


def topk_sae_forward(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
                     b_dec_in: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, k: int,
                     dead: torch.Tensor | None = None, k_aux: int = 0, screen: bool = False):
    """A TopK SAE's reconstruction for training, ``(x_hat, aux_hat, values, indices)``: what
    :func:`topk_encode` then :func:`sparse_decode` give (and the AuxK reconstruction, None
    without dead latents), with one sort in the backward instead of three. ``b_dec_in`` is
    subtracted from the input (zeros for a transcoder), ``b_dec`` added to the output.
    ``screen``: rank in bfloat16 first (:func:`screened_topk`)."""
    return _TopKSAEForward.apply(x, W_enc, b_enc, b_dec_in, W_dec, b_dec, k, dead, k_aux, screen)


def screened_topk(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
                  b_dec_in: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of ``(x - b_dec_in) @ W_enc + b_enc`` per row, ``(values, indices)``, the
    values in float32, with the dense product in bfloat16: ~9x faster than float32 on a CPU
    with AMX, as on a GPU's tensor cores. The kept set is float32's top k, certified row by row.

    The bfloat16 product (both operands rounded to nearest) only ranks. Its error in a row is at
    most ``|dx| max|w~| + |x| max|dw| + rounding`` (``dx``, ``dw``: the rows' rounding errors,
    measured), see :func:`screen_slack`. Each row's best candidates by the screen are recomputed
    in float32, and every column that might still beat the k-th recomputed value, given that
    bound, is recomputed too. The row is certified when no column left out can beat the k-th
    value (or none can be positive: ReLU zeroes them all). The rows not certified (~2% of real
    layer-6 rows, and every row holding NaN or inf) get their dense float32 product."""
    B, F_ = x.shape[0], W_enc.shape[1]
    m = min(F_, max(SCREEN_CANDIDATES * k, k + 32))
    latent_major = W_enc.t().contiguous()  # (F, D): the trainer keeps W_enc stored this way
    lib = kernels.library() if _screen_kernels(x, W_enc) else None
    with torch.autocast(x.device.type, enabled=False):
        if lib is not None:
            xc, xb, x_norm, x_err, xb_norm = kernels.round_rows(x, b_dec_in)
            _, Wb, w_norm, w_err, wb_norm = kernels.round_rows(latent_major)
        else:
            xc = x - b_dec_in
            xb, Wb = xc.to(torch.bfloat16), latent_major.to(torch.bfloat16)
            x_norm, x_err, xb_norm = _row_norms(xc, xb)
            w_norm, w_err, wb_norm = _row_norms(latent_major, Wb)
        bias_max = b_enc.detach().abs().max()
        slack = screen_slack(x_norm, x_err, xb_norm, w_norm.max(), w_err.max(),
                             wb_norm.max(), bias_max, xc.shape[1])
        screen = torch.mm(xb, Wb.t(), out=_buffer("screen", (B, F_), torch.bfloat16, x.device))
        if lib is not None:
            values, indices, ok, dots = kernels.screen_topk(
                screen, xc, latent_major, b_enc.detach().contiguous(), slack, k, m,
                SCREEN_ROUNDING, float(bias_max))
        else:
            values, indices, ok, dots = _screen_topk_torch(screen, xc, latent_major, b_enc,
                                                           slack, k, m, float(bias_max))
        SCREEN_STATS["rows"] += B
        SCREEN_STATS["certified"] += int(ok.sum())
        SCREEN_STATS["dots"] += dots
        bad = (~ok).nonzero().squeeze(1)
        if len(bad):  # the dense float32 product for the rows not certified
            pre = torch.addmm(b_enc, xc.index_select(0, bad), W_enc)
            v, i = pre.topk(k, dim=-1, sorted=False)
            values.index_copy_(0, bad, v)
            indices.index_copy_(0, bad, i)
    return values, indices


# bfloat16 keeps 8 significant bits: rounding to nearest moves a value by at most 2^-8 of
# itself, or 2^-8 / (1 - 2^-8) of the rounded value.
BF16_UNIT = 2.0 ** -8
SCREEN_ROUNDING = BF16_UNIT / (1 - BF16_UNIT)

# Candidates each row takes from the screen: this many times k (at least k + 32). Those that
# cannot beat the k-th recomputed value are skipped, so a larger pool costs little; with
# max(2k, k + 32) = 64 of 4,608 latents, 97.7% of real layer-6 rows were certified.
SCREEN_CANDIDATES = 2

# Rows screened, certified, and candidates recomputed since the process started.
SCREEN_STATS = {"rows": 0, "certified": 0, "dots": 0}


def screen_slack(x_norm, x_err, xb_norm, w_max, w_err_max, wb_max, bias_max,
                 d: int) -> torch.Tensor:
    """Each row's bound on ``|screen - exact|`` but for the bfloat16 output's rounding, (B,):
    ``x~ . w~ - x . w = dx . w~ + x . dw`` (Cauchy-Schwarz on each term), plus float32's
    accumulation of the ``d`` products and of the recomputed values' own (``gamma``)."""
    gamma = 1.01 * (d + 2) * 2.0 ** -24
    return (x_err * wb_max + x_norm * w_err_max
            + gamma * (xb_norm * wb_max + x_norm * w_max + 2 * bias_max) + 1e-30)


def _row_norms(exact: torch.Tensor, rounded: torch.Tensor):
    r = rounded.float()
    return exact.norm(dim=1), (r - exact).norm(dim=1), r.norm(dim=1)


def _screen_kernels(x: torch.Tensor, W_enc: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32
            and W_enc.dtype == torch.float32 and x.shape[0] > 0)


def _screen_topk_torch(screen, xc, latent_major, b_enc, slack, k: int, m: int,
                       bias_max: float):
    """:func:`kernels.screen_topk` in torch's ops: every one of the ``m`` candidates is
    recomputed (the kernel skips those that cannot win), with the same certificate."""
    F_ = screen.shape[1]
    s = screen.float() + b_enc
    if m < F_:
        sv, cand = s.topk(m + 1, dim=-1)
        drop, cand = sv[:, m], cand[:, :m].contiguous()
    else:
        cand = torch.arange(F_, device=s.device).expand(s.shape[0], F_).contiguous()
        drop = torch.full((s.shape[0],), float("-inf"), device=s.device)
    exact = _gather_dot(latent_major, cand, xc) + b_enc[cand]
    values, j = exact.topk(k, dim=-1, sorted=False)
    kth = values.amin(1)
    above = drop + SCREEN_ROUNDING * (drop.abs() + bias_max) + slack
    ok = torch.where(torch.isinf(drop) & (drop < 0), ~slack.isnan(),
                     (kth > above) | (above <= 0))
    return values, cand.gather(1, j), ok, cand.numel()


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor,
                  b_dec: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_j values[:, j] * W_dec[indices[:, j]] (+ b_dec)``: ``(B, k) -> (B, D)``."""
    out = F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")
    return out if b_dec is None else out + b_dec


def batch_top(acts: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, flat indices)`` of the ``n`` largest entries of ``acts`` ``(B, F)``, the
    indices ascending (row-major): BatchTopK's selection, as ``acts.flatten().topk(n)`` gives
    it (which among equal values at the cut is kept may differ; their values do not).

    One top-k over ``B * F`` entries and a sort of its indices cost twice the step's matmul.
    Instead each row gives its ``4 * ceil(n / B)`` largest (four times the mean share); the
    ``n``-th largest of those candidates is at most the true cut, so the entries at least that
    large (one pass, row-major) hold every kept one, and the ``n`` largest of them are exact,
    however many a single row holds."""
    B, F_ = acts.shape
    n = min(n, acts.numel())
    m = min(F_, 4 * -(-n // B))
    flat_acts = acts.flatten()
    if m * B <= n or m >= F_:
        vals, flat = flat_acts.topk(n, sorted=False)
        flat, order = flat.sort()
        return vals[order], flat
    low = acts.topk(m, dim=1, sorted=False).values.flatten().topk(n, sorted=False).values.min()
    flat = (flat_acts >= low).nonzero().squeeze(1)  # ascending; a superset of the kept ones
    if len(flat) > n:
        _, pos = flat_acts[flat].topk(n, sorted=False)
        keep = torch.zeros(len(flat), dtype=torch.bool, device=acts.device)
        keep[pos] = True
        flat = flat[keep]  # still ascending
    return flat_acts[flat], flat
