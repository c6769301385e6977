"""Attribution graphs on the tiny Llama beyond the edges: pruning keeps its share of the
influence (against a brute-force influence), the feature cap, custom targets (a logit
difference, a vector, a function of the logits), the graph JSON, and clear errors for a set
missing a layer, a set for another model, a prompt past the context, a target not in the
vocabulary and a prompt on which no latent fires."""

from __future__ import annotations

import json

import pytest
import torch

from sae_nb.activations.models import hf_model
from sae_nb.circuits.attribute import attribute
from sae_nb.circuits.graph import prune
from sae_nb.circuits.replacement import build_replacement
from sae_nb.circuits.transcoder_set import CircuitError, TranscoderSet
from sae_nb.interventions.attribution import as_ids
from sae_nb.util.errors import SaeNbError

PROMPT = "We must work for peace"


@pytest.fixture(scope="module")
def tset(llama):
    return TranscoderSet.random(llama, d_sae=64, k=4, skip=True, seed=5)


@pytest.fixture(scope="module")
def graph(llama, tset):
    return attribute(llama, tset, PROMPT)


def brute_influence(adjacency, weights):
    """``w @ ((I - A)^-1 - I)`` with ``A`` the row-normalised |adjacency|, in float64."""
    a = adjacency.double().abs()
    A = a / a.sum(1, keepdim=True).clamp(min=1e-10)
    eye = torch.eye(len(A), dtype=A.dtype)
    return weights.double() @ (torch.linalg.inv(eye - A) - eye), A


@pytest.mark.parametrize("node_threshold,edge_threshold", [(0.8, 0.98), (0.5, 0.9)])
def test_pruning_keeps_the_stated_share_of_influence(graph, node_threshold, edge_threshold):
    result = prune(graph, node_threshold, edge_threshold)
    w = graph.logit_vector()
    inf, _ = brute_influence(graph.adjacency, w)
    kept = float(inf[result.node_mask].sum() / inf.sum())
    assert kept >= node_threshold - 1e-6
    assert result.node_mask.sum() < graph.n_nodes  # it did prune
    # The edges kept hold the edge share of the pruned graph's edge influence.
    pruned = graph.adjacency.clone()
    pruned[~result.node_mask] = 0
    pruned[:, ~result.node_mask] = 0
    inf_p, A = brute_influence(pruned, w)
    scores = A * (inf_p + w.double())[:, None]
    assert float(scores[result.edge_mask].sum() / scores.sum()) >= edge_threshold - 1e-6
    assert not result.edge_mask[~result.node_mask].any()
    assert not result.edge_mask[:, ~result.node_mask].any()
    # Tokens and logits always stay.
    assert result.node_mask[graph.token_start:].all()


def test_the_feature_cap_keeps_the_most_influential_features(graph):
    capped = prune(graph, 1.0, 1.0, max_feature_nodes=5)
    assert capped.node_mask[:graph.n_features].sum() <= 5
    inf, _ = brute_influence(graph.adjacency, graph.logit_vector())
    top = inf[:graph.n_features].argsort(descending=True)[:5]
    assert set(capped.node_mask[:graph.n_features].nonzero().flatten().tolist()) <= set(
        top.tolist())


def test_a_graph_with_capped_feature_nodes_keeps_exact_rows(llama, tset, graph):
    capped = attribute(llama, tset, PROMPT, max_feature_nodes=20, batch_size=8,
                       update_interval=1)
    assert capped.n_features == 20
    # Each kept feature's row is its row in the full graph, on the kept columns.
    where = {tuple(f.tolist()): i for i, f in enumerate(graph.features)}
    idx = torch.tensor([where[tuple(f.tolist())] for f in capped.features])
    cols = torch.cat([idx, torch.arange(graph.n_features, graph.n_nodes)])
    rows = torch.cat([idx, torch.arange(graph.logit_start, graph.n_nodes)])
    ours = torch.cat([torch.arange(20), torch.arange(capped.logit_start, capped.n_nodes)])
    assert torch.allclose(capped.adjacency[ours], graph.adjacency[rows][:, cols], atol=1e-6)
    # The first features chosen are those with the largest direct influence on the logits.
    direct = graph.adjacency[graph.logit_start:, :graph.n_features].abs()
    direct = (graph.logit_weights[:, None] * direct / graph.adjacency[
        graph.logit_start:].abs().sum(1, keepdim=True)).sum(0)
    assert set(direct.argsort(descending=True)[:8].tolist()) <= set(idx.tolist())


def test_default_targets_are_the_top_tokens_up_to_95_percent(llama, tset, graph):
    rm = build_replacement(llama, tset, as_ids(llama, PROMPT)[0])
    probs = torch.softmax(rm.logits[-1].double(), -1)
    top = probs.argsort(descending=True)
    n = min(10, int((probs[top].cumsum(0) < 0.95).sum()) + 1)
    assert graph.logit_tokens == top[:n].tolist()
    assert torch.allclose(graph.logit_weights.double(), probs[top[:n]], atol=1e-6)
    few = attribute(llama, tset, PROMPT, max_n_logits=3, desired_logit_prob=0.01)
    assert few.logit_tokens == top[:1].tolist()


def test_custom_targets_are_linear_in_the_logits(llama, tset):
    a, b = " ", "e"
    ia, ib = (llama.tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in (a, b))
    vocab = hf_model(llama).config.vocab_size
    v = torch.zeros(vocab)
    v[ia], v[ib] = 2.0, -0.5
    g = attribute(llama, tset, PROMPT, targets=[a, b, (a, b), v, lambda z: z[ia] - z[ib]])
    rows = g.adjacency[g.logit_start:]
    # single tokens are demeaned logits: their difference is the logit difference.
    assert torch.allclose(rows[2], rows[0] - rows[1], atol=1e-5)
    assert torch.allclose(rows[4], rows[2], atol=1e-6)  # the function's gradient is e_a - e_b
    # a vector target: sum of its incoming edges is v . logits less the constant terms.
    rm = build_replacement(llama, tset, as_ids(llama, PROMPT)[0]).to(torch.float64)
    _, logits = rm.forward()
    _, constant = rm.forward(torch.zeros_like(rm.activations), torch.zeros_like(rm.errors),
                             torch.zeros_like(rm.embeds))
    want = float(v.double() @ (logits[-1] - constant[-1]))
    assert float(rows[3].double().sum()) == pytest.approx(want, rel=1e-4)
    assert g.logit_names[2] == "logit[' '] - logit['e']" and g.logit_tokens[3] is None


def test_graph_json_holds_the_pruned_nodes_and_links(graph, tmp_path):
    out = graph.to_json(tmp_path / "g.json", slug="peace")
    assert json.loads((tmp_path / "g.json").read_text()) == out
    ids = {n["node_id"] for n in out["nodes"]}
    assert all(link["source"] in ids and link["target"] in ids for link in out["links"])
    kinds = [n["feature_type"] for n in out["nodes"]]
    assert kinds.count("embedding") == graph.n_pos and kinds.count("logit") == graph.n_logits
    assert out["metadata"]["prompt_tokens"][0] == "<bos>"
    table = graph.nodes()
    assert len(table) == graph.n_nodes
    assert table["kind"].value_counts().to_dict() == {
        "feature": graph.n_features, "error": graph.n_layers * graph.n_pos,
        "embedding": graph.n_pos, "logit": graph.n_logits}
    assert table["activation"].iloc[:graph.n_features].tolist() == pytest.approx(
        graph.activations.tolist())
    # A link's weight is the adjacency entry of its target row and source column.
    by_id = {}
    for i in range(graph.n_nodes):
        node = graph.node(i)
        if node["kind"] == "feature":
            by_id[f"{node['layer']}_{node['latent']}_{node['position']}"] = i
    link = next(x for x in out["links"] if x["source"] in by_id and x["target"] in by_id)
    assert link["weight"] == pytest.approx(
        float(graph.adjacency[by_id[link["target"]], by_id[link["source"]]]))


def test_bad_input_gets_clear_errors(llama, models, tset):
    with pytest.raises(CircuitError, match=r"layers \[1\] are missing"):
        TranscoderSet({0: tset[0], 2: tset[2]})
    with pytest.raises(CircuitError, match=r"layers \[2\] are missing"):
        attribute(llama, TranscoderSet(tset.transcoders[:2]), PROMPT)
    other = TranscoderSet.random(llama, d_sae=16, k=2)
    other.transcoders = [type(t)(16, 16, k=2) for t in other.transcoders]
    with pytest.raises(CircuitError, match="d_model 32: this set was made for another model"):
        attribute(llama, other, PROMPT)
    with pytest.raises(CircuitError, match="covers the Llama family"):
        attribute(models["gpt2"], tset, PROMPT)
    with pytest.raises(SaeNbError, match="has 256 positions; shorten it"):
        attribute(llama, tset, "a" * 300)
    with pytest.raises(CircuitError, match="Token id 100000 is not in the vocabulary"):
        attribute(llama, tset, PROMPT, targets=100000)
    with pytest.raises(CircuitError, match="'peace' is not one token of the vocabulary"):
        attribute(llama, tset, PROMPT, targets=("peace", "e"))
    silent = TranscoderSet.random(llama, d_sae=16, k=2)
    for t in silent.transcoders:
        with torch.no_grad():
            t.b_enc.fill_(-1e4)
    with pytest.raises(CircuitError, match="No latent of the transcoder set is active"):
        attribute(llama, silent, PROMPT)
    with pytest.raises(CircuitError, match="node_threshold=1.5 is not a share"):
        prune(attribute(llama, tset, PROMPT), node_threshold=1.5)
