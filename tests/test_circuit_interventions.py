"""Interventions from attribution graphs on the tiny Llama: with no edit the edited model is the
model, the last layer's latents change the logits by a closed form, the graph's prediction is
the replacement model's linear response and equals the measured change where the model is
linear, generation steers as a hand-written hook does, and bad edits get clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import plain_model_io

from sae_nb.activations.models import hf_model
from sae_nb.circuits.attribute import attribute
from sae_nb.circuits.interventions import (
    GraphIntervener,
    clean_run,
    intervene,
    predicted_change,
    steer_generate,
)
from sae_nb.circuits.replacement import build_replacement
from sae_nb.circuits.transcoder_set import CircuitError, TranscoderSet
from sae_nb.interventions.attribution import as_ids

PROMPT = "We must work for peace"


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "skip"])
def tset(llama, request):
    return TranscoderSet.random(llama, d_sae=64, k=4, skip=request.param, seed=3)


@pytest.fixture(scope="module")
def linear_set(llama):
    """Transcoders whose every latent is active on the prompt (k = d_sae, a large encoder
    bias): the frozen model is then exactly linear in the latents' activations."""
    tset = TranscoderSet.random(llama, d_sae=16, k=16, skip=True, seed=5)
    with torch.no_grad():
        for tc in tset.transcoders:
            tc.b_enc.fill_(6.0)
    return tset


def record(lm, ids):
    """The model's logits ``(T, V)``, the final norm's input ``(T, D)`` and each MLP's input,
    read with plain hooks."""
    logits, final, mlps = plain_model_io(lm, ids[None])
    return logits[0], final[0], [x[0] for x, _ in mlps]


def demeaned(token: int, V: int) -> torch.Tensor:
    v = torch.full((V,), -1.0 / V, dtype=torch.float64)
    v[token] += 1.0
    return v


@pytest.mark.parametrize("frozen", [False, True], ids=["live", "frozen"])
def test_no_edit_gives_the_models_logits(llama, tset, frozen):
    ids = as_ids(llama, PROMPT)[0]
    logits, _, _ = record(llama, ids)
    result = intervene(llama, tset, PROMPT, [], frozen_attention=frozen)
    assert torch.allclose(result.logits, logits, atol=1e-4)
    assert torch.allclose(result.clean_logits, logits, atol=1e-6)
    assert result.switched == 0
    top = result.table
    assert list(top.columns[:2]) == ["token", "token_id"]
    assert top["p_before"].iloc[0] == pytest.approx(float(torch.softmax(logits[-1].double(),
                                                                        -1).max()))


def test_scaling_by_one_changes_nothing(llama, tset):
    graph = attribute(llama, tset, PROMPT)
    nodes = list(range(min(12, graph.n_features)))
    plain = intervene(llama, tset, PROMPT, [])
    same = intervene(llama, tset, PROMPT, {"nodes": nodes, "mode": "scale", "factor": 1.0},
                     graph=graph)
    assert torch.allclose(same.logits, plain.logits, atol=1e-6)
    assert predicted_change(graph, nodes, "scale", 1.0).abs().max() == 0
    ablated = intervene(llama, tset, PROMPT, {"nodes": nodes, "mode": "ablate"}, graph=graph)
    assert (ablated.logits[-1] - plain.logits[-1]).abs().max() > 1e-3  # the edit does act


@pytest.mark.parametrize("frozen", [False, True], ids=["live", "frozen"])
def test_last_layer_latent_closed_form(llama, tset, frozen):
    """Ablating a latent of the last layer at the last position removes ``a * W_dec[i]`` from
    the final residual stream: the logits change by the final norm (frozen: its clean scale)
    and the unembedding applied to that, and nothing else."""
    hf = hf_model(llama)
    ids = as_ids(llama, PROMPT)[0]
    logits, final, mlp_in = record(llama, ids)
    L, T = len(tset), len(ids)
    tc = tset[L - 1]
    with torch.no_grad():
        codes = tc.encode(mlp_in[L - 1][-1:])[0]
        latent = int(codes.argmax())
        a = float(codes[latent])
        assert a > 0
        dec = tc.W_dec[latent]
        norm, W_U = hf.model.norm, hf.lm_head.weight
        if frozen:
            s = torch.rsqrt(final[-1].pow(2).mean() + norm.variance_epsilon)
            expected = -a * (dec * s * norm.weight) @ W_U.T
        else:
            expected = norm(final[-1] - a * dec) @ W_U.T - norm(final[-1]) @ W_U.T
    result = intervene(llama, tset, PROMPT, [(L - 1, T - 1, latent, 0.0)],
                       frozen_attention=frozen)
    assert torch.allclose(result.logits[-1] - logits[-1], expected, atol=2e-5)
    assert torch.allclose(result.logits[:-1], logits[:-1], atol=1e-5)  # causal: no earlier change
    same = intervene(llama, tset, PROMPT, [(np.int64(L - 1), -1, np.int64(latent), 0)],
                     frozen_attention=frozen)  # numpy integers, the last position as -1
    assert torch.equal(same.logits, result.logits)
    if frozen:  # the graph predicts the same, as a node of the graph
        graph = attribute(llama, tset, PROMPT)
        node = int(((graph.features == torch.tensor([L - 1, T - 1, latent])).all(1))
                   .nonzero()[0, 0])
        V = logits.shape[-1]
        want = torch.stack([demeaned(t, V) for t in graph.logit_tokens]) @ expected.double()
        assert torch.allclose(predicted_change(graph, node), want, rtol=1e-4, atol=1e-6)
        table = GraphIntervener(llama, tset, graph, frozen_attention=True)(node, "ablate")
        assert list(table.columns) == ["token", "before", "after", "predicted change",
                                       "measured change"]
        assert torch.allclose(torch.tensor(table["measured change"].values), want, atol=1e-5)


def linear_response(rm, edits: dict[int, float], targets: torch.Tensor) -> torch.Tensor:
    """Brute force in the replacement model (float64), without the adjacency: hold the edited
    features at their new values, move every other feature by the change of its encoder
    projection, until nothing moves; the change of each target ``(k, V) . logits[-1]``."""
    rm = rm.to(torch.float64)
    enc = rm.encoder_rows()  # (n, D)
    f = rm.features

    def pre(acts):
        mlp_in, logits = rm.forward(acts)
        return (mlp_in[f[:, 0], f[:, 1]] * enc).sum(-1), logits[-1]

    a0 = rm.activations.clone()
    pre0, logits0 = pre(a0)
    acts = a0.clone()
    for node, value in edits.items():
        acts[node] = value
    free = torch.ones(len(a0), dtype=torch.bool)
    free[list(edits)] = False
    for _ in range(rm.n_layers + 1):
        p, logits = pre(acts)
        acts = torch.where(free, a0 + (p - pre0), acts)
    _, logits = pre(acts)
    return targets @ (logits - logits0)


def test_prediction_is_the_linear_response_and_the_measured_change(llama, linear_set):
    ids = as_ids(llama, PROMPT)[0]
    graph = attribute(llama, linear_set, PROMPT)
    rm = build_replacement(llama, linear_set, ids)
    assert torch.equal(graph.features, rm.features)  # every latent active: all are nodes
    V = rm.logits.shape[-1]
    targets = torch.stack([demeaned(t, V) for t in graph.logit_tokens])
    intervener = GraphIntervener(llama, linear_set, graph, frozen_attention=True)
    f, a = graph.features, graph.activations.double()
    first = int(((f[:, 0] == 0) & (f[:, 1] == len(ids) - 3)).nonzero()[0, 0])  # layer 0
    second = int(((f[:, 0] == 1) & (f[:, 1] == len(ids) - 1)).nonzero()[2, 0])  # downstream
    cases = [([first], "ablate", None, {first: 0.0}),
             ([first, second], "ablate", None, {first: 0.0, second: 0.0}),
             ([first, second], "scale", 2.5, {first: 2.5 * a[first], second: 2.5 * a[second]}),
             ([second], "clamp", 1.0, {second: 1.0})]
    for nodes, mode, factor, new in cases:
        want = linear_response(rm, new, targets)
        got = predicted_change(graph, nodes, mode, factor)
        scale = want.abs().max()
        assert scale > 1e-3
        assert torch.allclose(got, want, atol=1e-4 * scale), (nodes, mode)
        table = intervener(nodes, mode, factor)
        assert intervener.last.switched == 0  # no latent switched: the model is linear here
        measured = torch.tensor(table["measured change"].values)
        assert torch.allclose(measured, want, atol=1e-3 * scale), (nodes, mode)


def test_custom_target_measured_as_the_graph_defines_it(llama, linear_set):
    """A logit-difference graph: its node's measured change is the change of ``logit[a] -
    logit[b]`` (remade from ``targets``), equal to the prediction in the linear model; without
    ``targets`` the intervener cannot know the node's direction and says NaN."""
    a, b = " ", "e"
    graph = attribute(llama, linear_set, PROMPT, targets=(a, b))
    f = graph.features
    nodes = ((f[:, 0] == 0) & (f[:, 1] == graph.n_pos - 2)).nonzero().flatten()[:3].tolist()
    table = GraphIntervener(llama, linear_set, graph, frozen_attention=True,
                            targets=(a, b))(nodes, "ablate")
    result = intervene(llama, linear_set, PROMPT, {"nodes": nodes}, graph=graph,
                       frozen_attention=True)
    ia, ib = (llama.tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in (a, b))
    change = result.logits[-1] - result.clean_logits[-1]
    want = float(change[ia] - change[ib])
    assert abs(want) > 1e-4
    assert table["measured change"].iloc[0] == pytest.approx(want, rel=1e-4)
    assert table["predicted change"].iloc[0] == pytest.approx(want, rel=1e-3)
    blind = GraphIntervener(llama, linear_set, graph, frozen_attention=True)(nodes, "ablate")
    assert blind["measured change"].isna().all() and blind["before"].isna().all()


def test_unfrozen_attention_differs_from_the_prediction(llama, linear_set):
    """Without frozen attention and norms the model is not linear: the measured change departs
    from the prediction (so the frozen agreement above is not a tautology)."""
    graph = attribute(llama, linear_set, PROMPT)
    f = graph.features
    nodes = ((f[:, 0] == 0) & (f[:, 1] >= 2)).nonzero().flatten()[:64].tolist()
    live = GraphIntervener(llama, linear_set, graph)(nodes, "ablate")
    gap = (live["measured change"] - live["predicted change"]).abs().max()
    assert gap > 1e-3 * live["predicted change"].abs().max()


def greedy_reference(lm, ids, n, hook_layer=None, hook=None):
    """Greedy tokens by full forward passes (no cache), a hand-written MLP hook on."""
    hf = hf_model(lm)
    handle = (hf.model.layers[hook_layer].mlp.register_forward_hook(hook)
              if hook is not None else None)
    seq = ids.clone()
    try:
        with torch.no_grad():
            for _ in range(n):
                nxt = hf(input_ids=seq[None]).logits[0, -1].argmax()
                seq = torch.cat([seq, nxt[None]])
    finally:
        if handle is not None:
            handle.remove()
    return seq[len(ids):]


def test_steer_generate(llama, tset):
    ids = as_ids(llama, PROMPT)[0]
    n_new, T = 8, len(ids)
    clean = clean_run(llama, tset, PROMPT)
    plain = steer_generate(llama, tset, PROMPT, [], n_new, clean=clean)
    reference = greedy_reference(llama, ids, n_new)
    assert torch.equal(plain.clean_tokens, reference)
    assert torch.equal(plain.steered_tokens, reference)

    _, _, mlp_in = record(llama, torch.cat([ids, reference]))
    tc = tset[1]
    with torch.no_grad():
        counts = (tc.encode(mlp_in[1][T:-1]) != 0).sum(0)
    latent = int(counts.argmax())  # the latent of layer 1 most often active in the continuation
    edit = [(1, T - 1, latent, 25.0)]
    at_prompt = steer_generate(llama, tset, PROMPT, edit, n_new, where="prompt", clean=clean)
    measured = intervene(llama, tset, PROMPT, edit, clean=clean)
    assert torch.allclose(at_prompt.first_logits, measured.logits[-1], atol=1e-5)
    assert int(at_prompt.steered_tokens[0]) == int(measured.logits[-1].argmax())

    def clamp_where_active(module, args, output):  # positions after the prompt only
        x, out = args[0][0], output[0].clone()
        with torch.no_grad():
            codes = tc.encode(x)[:, latent]
        gen = torch.arange(len(x)) >= T
        on = gen & (codes != 0)
        out[on] += (25.0 - codes[on])[:, None] * tc.W_dec[latent]
        return out[None]

    generated = steer_generate(llama, tset, PROMPT, edit, n_new, where="generated", clean=clean)
    want = greedy_reference(llama, ids, n_new, 1, clamp_where_active)
    assert torch.equal(generated.steered_tokens, want)
    assert not torch.equal(generated.steered_tokens, reference)  # the steering does act
    assert generated.table().loc[0, "steered"] == llama.tokenizer.decode(want)


def test_bad_edits_get_clear_errors(llama, tset):
    graph = attribute(llama, tset, PROMPT)
    T, L = graph.n_pos, graph.n_layers
    clean = clean_run(llama, tset, PROMPT)

    def run(edits, **kw):
        return intervene(llama, tset, PROMPT, edits, graph=graph, clean=clean, **kw)

    with pytest.raises(CircuitError, match=r"\(error L0\) is an error node, not a feature"):
        run({"nodes": [graph.error_start + 1]})
    with pytest.raises(CircuitError, match=r"is a logit node, not a feature"):
        run({"nodes": [graph.logit_start]})
    with pytest.raises(CircuitError, match=r"is an embedding node"):
        predicted_change(graph, graph.token_start)
    with pytest.raises(CircuitError, match=rf"Node {graph.n_nodes + 3} is not in the graph"):
        run({"nodes": graph.n_nodes + 3})
    with pytest.raises(CircuitError, match=r"Node -1 is not in the graph"):
        run({"nodes": [-1]})
    with pytest.raises(CircuitError, match=r"Latent 64 .* out of range: transcoder 0 has "
                                           r"latents 0..63"):
        run([(0, 2, 64, 1.0)])
    with pytest.raises(CircuitError, match=rf"Position {T} .* past the prompt's {T} tokens"):
        run([(0, T, 3, 1.0)])
    with pytest.raises(CircuitError, match=rf"Layer {L} .* not a layer of the model"):
        run([(L, 1, 3, 1.0)])
    with pytest.raises(CircuitError, match=r"Mode 'zero' is not one of"):
        run({"nodes": [0], "mode": "zero"})
    with pytest.raises(CircuitError, match=r"Mode 'clamp' needs a finite number \(the value\)"):
        run({"nodes": [0], "mode": "clamp"})
    with pytest.raises(CircuitError, match=r"needs a finite number .*got nan"):
        run([(0, 1, 3, float("nan"))])
    with pytest.raises(CircuitError, match=r"need the graph: pass graph="):
        intervene(llama, tset, PROMPT, {"nodes": [0]}, clean=clean)
    with pytest.raises(CircuitError, match=r"'3' is not a node index"):
        run({"nodes": ["3"]})
    with pytest.raises(CircuitError, match=r"graph is of another prompt"):
        intervene(llama, tset, "We must work", {"nodes": [0]}, graph=graph)
    with pytest.raises(CircuitError, match=r"clean run is of another prompt"):
        steer_generate(llama, tset, "We must", [], 4, clean=clean)
    with pytest.raises(CircuitError, match=r"top"):
        run([], top=0)
    with pytest.raises(CircuitError, match=r"where='later'"):
        steer_generate(llama, tset, PROMPT, [], 4, where="later", clean=clean)
