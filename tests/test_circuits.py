"""The replacement model and attribution graphs on the tiny Llama: the frozen map reproduces the
model's logits, every edge is the finite difference of the frozen map, every node's input is
the sum of its incoming edges plus the constant the map gives at zero sources, exact
transcoders give a complete graph, and bad input gets a clear error."""

from __future__ import annotations

import pytest
import torch
from conftest import plain_model_io

from sae_nb.activations.models import hf_model
from sae_nb.circuits.attribute import attribute
from sae_nb.circuits.graph import graph_scores
from sae_nb.circuits.replacement import build_replacement
from sae_nb.circuits.transcoder_set import TranscoderSet
from sae_nb.dictionaries.architectures import TopKSAE
from sae_nb.interventions.attribution import as_ids

PROMPT = "We must work for peace"
SHORT = "The war and"  # 12 tokens with BOS: fewer than d_model, for exact transcoders


def record_mlps(lm, ids):
    """Each layer's MLP input and output ``(T, D)``, read with plain hooks on the model."""
    logits, _, mlps = plain_model_io(lm, ids[None])
    return [(x[0], y[0]) for x, y in mlps], logits[0]


def exact_set(lm, ids) -> TranscoderSet:
    """Transcoders exact on the prompt: with ``X`` the MLP inputs (T, D), T <= D, the encoder
    ``pinv(X)`` maps position p's input to the one-hot code e_p (TopK with k = 1 keeps it) and
    the decoder's row p is the MLP output there."""
    mlps, _ = record_mlps(lm, ids)
    out = []
    for layer, (x, y) in enumerate(mlps):
        tc = TopKSAE(x.shape[1], x.shape[0], k=1, apply_b_dec_to_input=False)
        with torch.no_grad():
            tc.W_enc.copy_(torch.linalg.pinv(x.double()).float())
            tc.W_dec.copy_(y)
            tc.b_enc.zero_()
            tc.b_dec.zero_()
        tc.metadata = {"site": f"mlp_in_layer{layer}", "target_site": f"mlp_out_layer{layer}"}
        out.append(tc)
    return TranscoderSet(out)


@pytest.fixture(params=["plain", "skip", "cross"])
def tset(llama, request):
    """Per-layer transcoders, with skip connections, or a cross-layer transcoder."""
    return TranscoderSet.random(llama, d_sae=64, k=4, skip=request.param == "skip", seed=3,
                                cross_layer=request.param == "cross")


def node_values(rm, graph, tset, acts, errors, embeds):
    """Every node's input in the frozen map at these sources, computed from its definition: a
    feature's encoder projection of its MLP input, a logit node's logit minus the mean logit
    (zero for errors and embeddings, which have no inputs)."""
    mlp_in, logits = rm.forward(acts, errors, embeds)
    f = graph.features
    W = torch.stack([tset[int(L)].W_enc[:, int(i)] for L, i in zip(f[:, 0], f[:, 2])])
    W = W.detach().double()
    feats = (mlp_in[f[:, 0], f[:, 1]] * W).sum(-1)
    last = logits[-1]
    toks = torch.tensor(graph.logit_tokens)
    out = torch.zeros(graph.n_nodes, dtype=torch.float64)
    out[:graph.n_features] = feats
    out[graph.logit_start:] = last[toks] - last.mean()
    return out


def sources(rm):
    return rm.activations.clone(), rm.errors.clone(), rm.embeds.clone()


def test_replacement_with_error_terms_reproduces_the_logits(llama, tset):
    ids = as_ids(llama, PROMPT)[0]
    rm = build_replacement(llama, tset, ids)
    mlps, logits = record_mlps(llama, ids)
    mlp_in, frozen = rm.forward()
    assert (frozen - logits).abs().max() < 1e-4
    for layer, (x, _) in enumerate(mlps):
        assert (mlp_in[layer] - x).abs().max() < 1e-5
    # Without the error terms it is another model: the errors are not negligible here.
    _, no_error = rm.forward(errors=torch.zeros_like(rm.errors))
    assert (no_error - logits).abs().max() > 1e-2
    # Position 0 (BOS) holds no latent and no error node.
    assert not (rm.features[:, 1] == 0).any() and not rm.errors[:, 0].any()


def test_edges_equal_finite_differences_of_the_frozen_map(llama, tset):
    graph = attribute(llama, tset, PROMPT)
    rm = build_replacement(llama, tset, as_ids(llama, PROMPT)[0]).to(torch.float64)
    assert torch.equal(graph.features, rm.features)
    base = node_values(rm, graph, tset, *sources(rm))
    gen = torch.Generator().manual_seed(0)
    adj = graph.adjacency.double()
    scale = adj.abs().max()
    rows = torch.cat([torch.arange(graph.n_features), torch.arange(graph.logit_start,
                                                                   graph.n_nodes)])
    t_nz, s_nz = adj[rows].nonzero(as_tuple=True)
    pick = torch.randperm(len(t_nz), generator=gen)[:48]  # real edges
    anywhere = torch.randint(len(rows), (48,), generator=gen)  # any pair, most of them zero
    pairs = list(zip(rows[torch.cat([t_nz[pick], anywhere])].tolist(),
                     torch.cat([s_nz[pick], torch.randint(graph.logit_start, (48,),
                                                          generator=gen)]).tolist()))
    checked = nonzero = 0
    eps = 0.5
    for t, s in pairs:
        acts, errors, embeds = sources(rm)
        node = graph.node(s)
        if node["kind"] == "feature":
            acts[s] *= 1 + eps
        elif node["kind"] == "error":
            errors[node["layer"], node["position"]] *= 1 + eps
        else:
            embeds[node["position"]] *= 1 + eps
        moved = node_values(rm, graph, tset, acts, errors, embeds)[t] - base[t]
        assert float((moved / eps - adj[t, s]).abs()) <= 1e-4 * float(scale), (t, s)
        checked += 1
        nonzero += bool(adj[t, s].abs() > 1e-3 * scale)
    assert checked == 96 and nonzero >= 40  # the sample holds real edges, not only zeros


def test_every_node_input_is_its_incoming_edges_plus_constants(llama, tset):
    graph = attribute(llama, tset, PROMPT)
    rm = build_replacement(llama, tset, as_ids(llama, PROMPT)[0]).to(torch.float64)
    acts, errors, embeds = sources(rm)
    full = node_values(rm, graph, tset, acts, errors, embeds)
    constant = node_values(rm, graph, tset, torch.zeros_like(acts), torch.zeros_like(errors),
                           torch.zeros_like(embeds))
    incoming = graph.adjacency.double().sum(1)
    targets = torch.cat([torch.arange(graph.n_features),
                         torch.arange(graph.logit_start, graph.n_nodes)])
    gap = (full - constant - incoming)[targets].abs().max()
    assert gap <= 1e-4 * full[targets].abs().max()
    # Errors and embeddings have no incoming edges; nothing reads a logit node.
    assert not graph.adjacency[graph.n_features:graph.logit_start].any()
    assert not graph.adjacency[:, graph.logit_start:].any()
    # Causality: no edge from a later position, no edge from a feature's own or a later layer.
    f = graph.features
    later = (f[None, :, 1] > f[:, None, 1]) | (f[None, :, 0] >= f[:, None, 0])
    assert not graph.adjacency[:graph.n_features, :graph.n_features][later].any()


def test_batch_size_does_not_change_the_graph(llama):
    tset = TranscoderSet.random(llama, d_sae=64, k=4, skip=True, seed=1)
    one = attribute(llama, tset, PROMPT, batch_size=1)
    many = attribute(llama, tset, PROMPT, batch_size=1000)
    assert torch.allclose(one.adjacency, many.adjacency, atol=1e-6, rtol=1e-5)


def brute_force_scores(adjacency, weights, error, tokens):
    """Replacement and completeness from their definitions, with the total influence
    ``w @ ((I - A)^-1 - I)`` by a matrix inverse in float64."""
    a = adjacency.double().abs()
    A = a / a.sum(1, keepdim=True).clamp(min=1e-10)
    w = weights.double()
    inf = w @ (torch.linalg.inv(torch.eye(len(A), dtype=A.dtype) - A) - torch.eye(len(A)))
    replacement = inf[tokens].sum() / (inf[tokens].sum() + inf[error].sum())
    out = inf + w
    completeness = ((1 - A[:, error].sum(1)) * out).sum() / out.sum()
    return inf, float(replacement), float(completeness)


def test_graph_scores_match_their_definitions(llama, tset):
    graph = attribute(llama, tset, PROMPT)
    errors = slice(graph.error_start, graph.token_start)
    tokens = slice(graph.token_start, graph.logit_start)
    _, replacement, completeness = brute_force_scores(graph.adjacency, graph.logit_vector(),
                                                      errors, tokens)
    got = graph_scores(graph)
    assert got == pytest.approx((replacement, completeness), abs=1e-5)
    assert completeness < 0.99  # random transcoders leave real error terms


def test_exact_transcoders_give_completeness_one(llama):
    ids = as_ids(llama, SHORT)[0]
    assert len(ids) < hf_model(llama).config.hidden_size
    exact = exact_set(llama, ids)
    rm = build_replacement(llama, exact, ids)
    assert rm.errors.abs().max() < 1e-4 * rm.mlp_out.abs().max()
    _, no_error = rm.forward(errors=torch.zeros_like(rm.errors))
    assert (no_error - rm.logits).abs().max() < 1e-4  # the replacement alone is the model
    graph = attribute(llama, exact, SHORT)
    assert graph.n_features == (len(ids) - 1) * len(exact)  # one latent per position and layer
    replacement, completeness = graph_scores(graph)
    assert completeness == pytest.approx(1.0, abs=1e-4)
    assert replacement == pytest.approx(1.0, abs=1e-3)
