"""Build the attribution graph of a prompt: every active latent, error node, token and logit
target, and the direct effect of each on each, from batched backward passes.

The algorithm of Ameisen et al., 2025 ("Circuit tracing", the methods paper's section on
attribution graphs) and circuit-tracer's ``attribute``: on the prompt's replacement model
(:mod:`sae_nb.circuits.replacement`), the edge from source ``s`` to target ``t`` is
``a_s * (w_s . dt/dx_s)``, the source's activation times the target's gradient along the
source's output direction (a latent's decoder row; the vector itself for an error node or a
token embedding), where the target is

- for a latent: its encoder's input projection ``W_enc[:, i] . x`` of its layer's MLP input at
  its position (the pre-activation without its bias, as circuit-tracer injects the encoder row),
- for a logit node: ``vocab . logits`` at the last position (:mod:`sae_nb.circuits.targets`;
  by default a top token's logit minus the mean logit, as circuit-tracer's demeaned unembedding).

Because the replacement model is linear in its sources, each target equals the sum of its
incoming edges plus a constant (biases, and the frozen BOS position). One backward pass of the
transposed map gives the whole row of a target; targets go in batches sorted by (layer,
position), so each batch only visits the layers below its top one and the positions up to its
last (:meth:`ReplacementModel.backward`). With ``max_feature_nodes`` only that many features get
rows, chosen as circuit-tracer does: logit rows first, then repeatedly the not yet visited
features of highest influence on the logits through the rows computed so far.
"""

from __future__ import annotations

import time

import torch

from sae_nb.activations.corpora import token_strings
from sae_nb.activations.models import Model
from sae_nb.circuits.graph import Graph, normalize
from sae_nb.circuits.replacement import ReplacementModel, build_replacement
from sae_nb.circuits.targets import make_targets
from sae_nb.circuits.transcoder_set import CircuitError, TranscoderSet
from sae_nb.interventions.attribution import as_ids
from sae_nb.util.checks import whole_number


def attribute(model: Model, transcoders: TranscoderSet, prompt: str | torch.Tensor,
              targets=None, *, max_n_logits: int = 10, desired_logit_prob: float = 0.95,
              batch_size: int = 256, max_feature_nodes: int | None = None,
              update_interval: int = 4, zero_bos: bool = True) -> Graph:
    """The attribution graph of ``prompt`` (text, BOS prepended; or token ids) through
    ``transcoders``, explaining ``targets`` (None: the top tokens; see
    :mod:`sae_nb.circuits.targets`). ``batch_size`` targets per backward pass."""
    batch_size = whole_number("batch_size", batch_size, 1, CircuitError)
    start = time.perf_counter()
    ids = as_ids(model, prompt)[0]
    rm = build_replacement(model, transcoders, ids, zero_bos)
    if rm.n_features == 0:
        raise CircuitError(f"No latent of the transcoder set is active on the prompt "
                           f"{token_strings(model.tokenizer, ids.tolist())!r} (BOS excluded), so "
                           f"the graph would have no feature node; use a longer prompt or "
                           f"transcoders that fire on it.")
    tg = make_targets(rm.logits[-1], model.tokenizer, targets, max_n_logits, desired_logit_prob)
    built = time.perf_counter()
    n_f, n_src = rm.n_features, rm.n_sources
    cap = n_f if max_feature_nodes is None else min(
        whole_number("max_feature_nodes", max_feature_nodes, 1, CircuitError), n_f)

    logit_vecs = torch.stack([t.vocab for t in tg]).float() @ rm.W_U  # (k, D)
    logit_rows = torch.cat([rm.backward(torch.full((len(v),), rm.n_layers),
                                        torch.full((len(v),), rm.n_pos - 1), v)
                            for v in logit_vecs.split(batch_size)])
    enc = rm.encoder_rows()  # (n_f, D)
    k = len(tg)
    # Every feature gets a row: write the rows straight into the adjacency (no copy of an
    # n^2 matrix). Else rows in visiting order, columns of unvisited features dropped later.
    adjacency = torch.zeros(n_src + k, n_src + k) if cap == n_f else None
    rows = adjacency[:n_f, :n_src] if cap == n_f else torch.zeros(cap, n_src)
    order = torch.empty(cap, dtype=torch.long)  # which feature each row is
    weights = torch.tensor([t.weight for t in tg])
    visited = torch.zeros(n_f, dtype=torch.bool)
    done = 0
    while done < cap:
        if cap == n_f:
            pending = torch.arange(n_f)
        else:
            inf = _partial_influence(rows[:done], order[:done], logit_rows, weights, n_src)
            ranked = inf[:n_f].argsort(descending=True)
            pending = ranked[~visited[ranked]][:min(update_interval * batch_size, cap - done)]
        pending = pending.sort().values  # (layer, position) order: cheap batches
        for batch in pending.split(batch_size):
            f = rm.features[batch]
            rows[done:done + len(batch)] = rm.backward(f[:, 0], f[:, 1], enc[batch])
            order[done:done + len(batch)] = batch
            visited[batch] = True
            done += len(batch)
    if adjacency is not None:
        adjacency[n_src:, :n_src] = logit_rows
    else:
        adjacency = _assemble(rm, rows, order, logit_rows)
        order = order.sort().values
    edges = time.perf_counter()
    ids = rm.tokens
    names = token_strings(model.tokenizer, ids.tolist())
    return Graph(
        prompt=prompt if isinstance(prompt, str) else "".join(names), tokens=ids,
        token_strings=names, features=rm.features[order], activations=rm.activations[order],
        adjacency=adjacency, n_layers=rm.n_layers, logit_names=[t.name for t in tg],
        logit_tokens=[t.token for t in tg], logit_weights=weights,
        model_name=rm.model_name, d_sae=rm.transcoders[0].d_sae,
        info=dict(n_active=n_f, replacement_s=built - start, edges_s=edges - built,
                  batch_size=batch_size))


def _partial_influence(rows: torch.Tensor, order: torch.Tensor, logit_rows: torch.Tensor,
                       weights: torch.Tensor, n_src: int) -> torch.Tensor:
    """``(n_src,)`` influence on the weighted logits through the rows computed so far (features
    without a row pass nothing on)."""
    norm = normalize(torch.cat([rows, logit_rows]))  # (m + k, n_src): row i is node_of[i]
    node_of = torch.cat([order, torch.arange(n_src, n_src + len(logit_rows))])
    x = torch.zeros(n_src + len(logit_rows))
    x[n_src:] = weights
    total = torch.zeros(n_src)
    for _ in range(1000):  # the graph is acyclic: the walk dies out after the layers
        y = x[node_of] @ norm
        if not y.any():
            return total
        total += y
        x[:n_src], x[n_src:] = y, 0
    raise CircuitError("The influence did not vanish after 1000 steps; rebuild the graph.")


def _assemble(rm: ReplacementModel, rows: torch.Tensor, order: torch.Tensor,
              logit_rows: torch.Tensor) -> torch.Tensor:
    """The adjacency of the visited features (in feature order), errors, embeddings, logits:
    columns of features without a row are dropped."""
    keep = order.sort().values  # selected features, in (layer, position, latent) order
    cols = torch.cat([keep, torch.arange(rm.n_features, rm.n_sources)])
    k, n_sel, N = len(logit_rows), len(keep), len(cols) + len(logit_rows)
    adjacency = torch.zeros(N, N)
    adjacency[:n_sel, :len(cols)] = rows[order.argsort()][:, cols]
    adjacency[N - k:, :len(cols)] = logit_rows[:, cols]
    return adjacency
