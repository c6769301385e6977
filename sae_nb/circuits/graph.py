"""An attribution graph: its nodes and adjacency, influence, pruning, scores and its JSON.

The layout is circuit-tracer's (Ameisen et al., 2025; ``circuit_tracer/graph.py``): nodes in
the order selected features, error nodes (layer-major: ``error[layer][position]``), token
embeddings (one per position), logit nodes; ``adjacency[target, source]`` is the direct effect
of ``source`` on ``target`` (rows targets, columns sources).

Influence: with ``A`` the adjacency with each row's absolute values normalised to sum 1 and
``w`` the logit nodes' weights (their probabilities), a node's influence on the logits is
``w @ (A + A^2 + A^3 + ...)``, its total (direct and indirect) share of the logits' inputs.

- :func:`prune` keeps the nodes holding ``node_threshold`` (0.8) of the total influence (tokens
  and logits always), then the edges holding ``edge_threshold`` (0.98) of the edge influence
  (an edge's normalised weight times its target's influence plus weight), then drops features
  and errors left without outgoing edges and features without incoming ones, as circuit-tracer's
  ``prune_graph`` does; ``max_feature_nodes`` also caps the kept features at the most influential.
  A zero score never passes a threshold (circuit-tracer's can keep zeros at a share of 1.0).
- :func:`graph_scores`: the replacement score, the share of the tokens' and errors' influence
  that the tokens hold (1 when no error node has influence), and the completeness score, the
  influence-weighted share of every node's normalised inputs that do not come from error nodes
  (circuit-tracer's ``compute_graph_scores``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import torch

from sae_nb.circuits.transcoder_set import CircuitError
from sae_nb.util.io import atomic_write_json


@dataclass
class Graph:
    """The direct effects between the nodes of one prompt's replacement model."""

    prompt: str
    tokens: torch.Tensor  # (T,) prompt token ids
    token_strings: list[str]  # each prompt token as text
    features: torch.Tensor  # (n, 3) long: layer, position, latent of each feature node
    activations: torch.Tensor  # (n,)
    adjacency: torch.Tensor  # (N, N) rows targets, columns sources
    n_layers: int
    logit_names: list[str]  # each logit node's name
    logit_tokens: list[int | None]  # its token (None for a custom target)
    logit_weights: torch.Tensor  # (k,) its weight: the token's probability, or 1
    model_name: str = ""
    d_sae: int | None = None  # the transcoders' width, for the JSON's feature ids
    info: dict = field(default_factory=dict)  # how it was made: timings, counts

    @property
    def n_features(self) -> int:
        return int(self.features.shape[0])

    @property
    def n_pos(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_logits(self) -> int:
        return len(self.logit_names)

    @property
    def n_nodes(self) -> int:
        return self.adjacency.shape[0]

    @property
    def error_start(self) -> int:
        return self.n_features

    @property
    def token_start(self) -> int:
        return self.n_features + self.n_layers * self.n_pos

    @property
    def logit_start(self) -> int:
        return self.token_start + self.n_pos

    def node(self, index: int) -> dict:
        """One node's kind, layer, position, latent and activation (None where not one)."""
        if index < self.error_start:
            layer, pos, latent = (int(v) for v in self.features[index])
            return dict(kind="feature", layer=layer, position=pos, latent=latent,
                        activation=float(self.activations[index]), name=f"L{layer}/{latent}")
        if index < self.token_start:
            layer, pos = divmod(index - self.error_start, self.n_pos)
            return dict(kind="error", layer=layer, position=pos, latent=None, activation=None,
                        name=f"error L{layer}")
        if index < self.logit_start:
            pos = index - self.token_start
            return dict(kind="embedding", layer=None, position=pos, latent=None, activation=None,
                        name=f"emb {self.token_strings[pos]!r}")
        i = index - self.logit_start
        return dict(kind="logit", layer=self.n_layers, position=self.n_pos - 1, latent=None,
                    activation=None, name=self.logit_names[i])

    def node_id(self, index: int) -> str:
        """The node's id in the graph JSON: ``{layer}_{latent}_{pos}`` for a feature,
        ``{layer}_-1_{pos}`` for an error node, ``E_{token}_{pos}`` for an embedding and
        ``{n_layers + 1}_{token}_{pos}`` for a logit (``-1 - k`` for the k-th custom target):
        distinct for every node."""
        n = self.node(index)
        if n["kind"] == "feature":
            return f"{n['layer']}_{n['latent']}_{n['position']}"
        if n["kind"] == "error":
            return f"{n['layer']}_-1_{n['position']}"
        if n["kind"] == "embedding":
            return f"E_{int(self.tokens[n['position']])}_{n['position']}"
        k = index - self.logit_start
        vocab = self.logit_tokens[k] if self.logit_tokens[k] is not None else -1 - k
        return f"{self.n_layers + 1}_{vocab}_{n['position']}"

    def nodes(self) -> pd.DataFrame:
        """A table of every node (:meth:`node`), with its influence on the logits."""
        table = pd.DataFrame([self.node(i) for i in range(self.n_nodes)])
        table["influence"] = node_influence(self).numpy()
        return table

    def logit_vector(self) -> torch.Tensor:
        """``(N,)``: the logit nodes' weights, zero elsewhere."""
        w = torch.zeros(self.n_nodes, dtype=self.adjacency.dtype)
        w[self.logit_start:] = self.logit_weights.to(w.dtype)
        return w

    def to_json(self, path: str | Path | None = None, slug: str = "graph",
                node_threshold: float = 0.8, edge_threshold: float = 0.98) -> dict:
        """The pruned graph in the JSON that circuit-tracer's and Neuronpedia's front end reads
        (``metadata``, ``qParams``, ``nodes``, ``links``); written to ``path`` when given."""
        pruned = prune(self, node_threshold, edge_threshold)
        nodes = {}
        for i in pruned.node_mask.nonzero().flatten().tolist():
            nodes[i] = _json_node(self, i, float(pruned.cumulative_scores[i]))
        targets, sources = pruned.edge_mask.nonzero(as_tuple=True)
        links = [{"source": nodes[s]["node_id"], "target": nodes[t]["node_id"],
                  "weight": float(self.adjacency[t, s])}
                 for t, s in zip(targets.tolist(), sources.tolist()) if s in nodes and t in nodes]
        linked = {x for link in links for x in (link["source"], link["target"])}
        kept = [n for n in nodes.values()
                if n["node_id"] in linked or n["feature_type"] in ("embedding", "logit")]
        out = {"metadata": {"slug": slug, "scan": self.model_name, "transcoder_list": [],
                            "prompt_tokens": [_clean(t) for t in self.token_strings],
                            "prompt": self.prompt, "node_threshold": node_threshold},
               "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both",
                           "clickedId": "", "sg_pos": ""},
               "nodes": kept, "links": links}
        if path is not None:
            atomic_write_json(path, out, indent=1)
        return out


def _clean(token: str) -> str:
    return token.replace("\n", "⏎").replace("\t", "→").replace("\r", "↵")


def _json_node(graph: Graph, i: int, influence: float) -> dict:
    """One node in the front end's fields (circuit-tracer's ``frontend/graph_models.py``)."""
    n = graph.node(i)
    base = dict(ctx_idx=n["position"], token_prob=0.0, is_target_logit=False, run_idx=0,
                reverse_ctx_idx=0, clerp="", influence=influence, activation=n["activation"])
    if n["kind"] == "feature":
        offset = 10 ** math.ceil(math.log10(graph.d_sae)) if graph.d_sae else 0
        layer, latent = n["layer"], n["latent"]
        return dict(base, node_id=graph.node_id(i), feature=latent + offset * layer,
                    layer=str(layer), feature_type="cross layer transcoder",
                    jsNodeId=f"{layer}_{latent}-0")
    if n["kind"] == "error":  # latent -1: never a feature's id
        return dict(base, node_id=graph.node_id(i), feature=-1,
                    layer=str(n["layer"]), feature_type="mlp reconstruction error",
                    jsNodeId=f"{n['layer']}_-1-{n['position']}")
    if n["kind"] == "embedding":
        tok = int(graph.tokens[n["position"]])
        return dict(base, node_id=graph.node_id(i), feature=n["position"], layer="E",
                    feature_type="embedding", jsNodeId=f"E_{tok}-{n['position']}")
    k = i - graph.logit_start
    tok = graph.logit_tokens[k]
    vocab = tok if tok is not None else -1 - k  # a custom target has no token
    prob = float(graph.logit_weights[k])
    return dict(base, node_id=graph.node_id(i), feature=vocab,
                layer=str(graph.n_layers + 1), feature_type="logit", token_prob=prob,
                is_target_logit=k == 0, jsNodeId=f"L_{vocab}-{n['position']}",
                clerp=f'Output "{_clean(graph.logit_names[k])}" (p={prob:.3f})')


# -- influence ----------------------------------------------------------------------------------
def normalize(adjacency: torch.Tensor) -> torch.Tensor:
    """Each row's absolute values scaled to sum 1 (rows of zeros stay zero): one new matrix."""
    a = adjacency.abs()
    return a.div_(a.sum(1, keepdim=True).clamp(min=1e-10))


def influence(normalized: torch.Tensor, weights: torch.Tensor, max_iter: int = 1000
              ) -> torch.Tensor:
    """``weights @ (A + A^2 + ...)`` for a normalised adjacency ``A`` of an acyclic graph."""
    current = weights @ normalized
    total = current.clone()
    for _ in range(max_iter):
        if not current.any():
            return total
        current = current @ normalized
        total += current
    raise CircuitError(f"The influence did not vanish after {max_iter} steps: the adjacency "
                       f"has a cycle, which an attribution graph cannot have; rebuild the graph.")


def node_influence(graph: Graph) -> torch.Tensor:
    """``(N,)``: each node's influence on the weighted logits."""
    return influence(normalize(graph.adjacency), graph.logit_vector())


def _threshold(scores: torch.Tensor, share: float) -> torch.Tensor:
    """The smallest score among the top scores that hold ``share`` of their total (zero
    scores never count: a score of 0 is no influence and no edge)."""
    positive = scores[scores > 0]
    if not len(positive):
        return scores.new_tensor(float("inf"))
    ordered = positive.sort(descending=True).values
    cumulative = ordered.double().cumsum(0) / ordered.sum(dtype=torch.float64)
    i = int(torch.searchsorted(cumulative, torch.tensor(share, dtype=torch.float64)))
    return ordered[min(i, len(ordered) - 1)]


class PruneResult(NamedTuple):
    node_mask: torch.Tensor  # (N,) bool: nodes kept
    edge_mask: torch.Tensor  # (N, N) bool: edges kept
    cumulative_scores: torch.Tensor  # (N,) each node's place in the cumulative influence


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98,
          max_feature_nodes: int | None = None) -> PruneResult:
    """The nodes and edges that carry most of the influence on the logits (module docstring)."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise CircuitError(f"{name}={value} is not a share; give a number in 0..1, e.g. "
                               f"0.8 for nodes, 0.98 for edges.")
    keep_always = graph.token_start  # tokens and logits from here on
    weights = graph.logit_vector()
    node_inf = node_influence(graph)
    node_mask = node_inf >= _threshold(node_inf, node_threshold)
    node_mask[keep_always:] = True
    if max_feature_nodes is not None and node_mask[:graph.n_features].sum() > max_feature_nodes:
        ranked = node_inf[:graph.n_features].argsort(descending=True)
        node_mask[ranked[max_feature_nodes:]] = False
    # Edges between kept nodes only: work on that block (the rest of the pruned matrix is 0).
    kept = node_mask.nonzero().flatten()
    block = normalize(graph.adjacency[kept][:, kept])
    block.mul_((influence(block, weights[kept]) + weights[kept])[:, None])  # edge scores
    edge_mask = torch.zeros_like(graph.adjacency, dtype=torch.bool)
    edge_mask[kept[:, None], kept[None, :]] = block >= _threshold(block, edge_threshold)
    while True:  # drop nodes left without outgoing (features, errors) or incoming (features) edges
        before = node_mask.clone()
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[:keep_always] &= edge_mask[:, :keep_always].any(0)
        node_mask[:graph.n_features] &= edge_mask[:graph.n_features].any(1)
        if torch.equal(before, node_mask):
            break
    ordered, order = node_inf.sort(descending=True)
    cumulative = torch.zeros_like(node_inf)
    cumulative[order] = ordered.cumsum(0) / ordered.sum()
    return PruneResult(node_mask, edge_mask, cumulative)


def graph_scores(graph: Graph) -> tuple[float, float]:
    """``(replacement score, completeness score)`` of a graph (module docstring)."""
    norm = normalize(graph.adjacency)
    weights = graph.logit_vector()
    inf = influence(norm, weights)
    errors = slice(graph.error_start, graph.token_start)
    token_inf = inf[graph.token_start:graph.logit_start].sum()
    error_inf = inf[errors].sum()
    replacement = token_inf / (token_inf + error_inf)
    non_error = 1 - norm[:, errors].sum(1)
    out = inf + weights
    completeness = (non_error * out).sum() / out.sum()
    return float(replacement), float(completeness)
