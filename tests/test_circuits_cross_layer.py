"""Cross-layer transcoders in the replacement model and the attribution graph, and circuit-tracer
folders loaded as whole sets (cross-layer decoders and per-layer skip connections kept).

The expected values come from the definitions, written out here: layer T's MLP output is
``b_dec_T + sum over L <= T of f_L @ W_dec_L[:, T - L]`` (circuit-tracer's CLT), and edges are
finite differences of the frozen map. tests/test_circuits.py runs its checks (logits, sampled
edges, each node's input as its incoming edges plus constants, the scores) on a cross-layer set
too."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import plain_model_io
from safetensors.torch import save_file
from test_circuit_interventions import demeaned, greedy_reference, linear_response
from test_circuits import PROMPT, node_values, sources

from sae_nb.activations.models import hf_model
from sae_nb.circuits.attribute import attribute
from sae_nb.circuits.interventions import (
    GraphIntervener,
    intervene,
    predicted_change,
    steer_generate,
)
from sae_nb.circuits.replacement import build_replacement
from sae_nb.circuits.sets import load_transcoder_set
from sae_nb.circuits.tracer_format import save_tracer_transcoders
from sae_nb.circuits.transcoder_set import CircuitError, TranscoderSet
from sae_nb.dictionaries.architectures import JumpReLUSAE, ReLUSAE, SkipTopKSAE
from sae_nb.interventions.attribution import as_ids


@pytest.fixture(params=[False, True], ids=["plain", "skip"])
def clt(llama, request):
    return TranscoderSet.random(llama, d_sae=48, k=4, skip=request.param, seed=7,
                                cross_layer=True)


def by_hand(tset: TranscoderSet, mlp_in: list[torch.Tensor]) -> torch.Tensor:
    """``(L, T, D)``: each layer's MLP output as the cross-layer transcoder predicts it, from
    circuit-tracer's definition, with the skip term where a layer has one."""
    codes = [tc.encode(x) for tc, x in zip(tset.transcoders, mlp_in)]
    out = []
    for T, tc in enumerate(tset.transcoders):
        y = tc.b_dec.detach().clone().expand(len(mlp_in[T]), -1).clone()
        for L in range(T + 1):
            for i in range(tset[L].d_sae):
                y += codes[L][:, i:i + 1] * tset.cross[L][i, T - L]
        if getattr(tc, "W_skip", None) is not None:
            y += mlp_in[T] @ tc.W_skip.detach().T
        out.append(y)
    return torch.stack(out)


def test_a_cross_layer_set_reproduces_the_logits_with_its_errors_by_definition(llama, clt):
    ids = as_ids(llama, PROMPT)[0]
    logits, _, mlps = plain_model_io(llama, ids[None])
    rm = build_replacement(llama, clt, ids)
    _, frozen = rm.forward()
    assert (frozen - logits[0]).abs().max() < 1e-4
    with torch.no_grad():
        predicted = by_hand(clt, [x[0] for x, _ in mlps])
    real = torch.stack([y[0] for _, y in mlps])
    # The error node is what the CLT misses; position 0 (BOS) holds none.
    assert (rm.errors[:, 1:] - (real - predicted)[:, 1:]).abs().max() < 1e-4
    assert not rm.errors[:, 0].any()
    # The later layers' decoders matter: one layer's own decoder alone gives other errors.
    own_only = TranscoderSet(clt.transcoders)
    assert (build_replacement(llama, own_only, ids).errors - rm.errors).abs().max() > 1e-2


def test_cross_layer_edges_equal_finite_differences(llama, clt):
    graph = attribute(llama, clt, PROMPT, batch_size=7)
    rm = build_replacement(llama, clt, as_ids(llama, PROMPT)[0]).to(torch.float64)
    base = node_values(rm, graph, clt, *sources(rm))
    adj = graph.adjacency.double()
    scale = adj.abs().max()
    f = graph.features
    # Edges from a feature to a feature two or more layers up: they run through the later
    # decoders (and, as for any transcoder, through attention); plus edges into the logits.
    n = graph.n_features
    far = (((f[:, None, 0] - f[None, :, 0]) >= 2)
           & (adj[:n, :n].abs() > 1e-3 * scale)).nonzero().tolist()
    assert len(far) >= 30  # the set has such edges to check
    gen = torch.Generator().manual_seed(1)
    picks = [far[int(i)] for i in torch.randperm(len(far), generator=gen)[:30]]
    picks += [(graph.logit_start, int(s)) for s in torch.randperm(graph.n_features,
                                                                   generator=gen)[:10]]
    eps = 0.5
    for t, s in picks:
        acts, errors, embeds = sources(rm)
        acts[s] *= 1 + eps
        moved = node_values(rm, graph, clt, acts, errors, embeds)[t] - base[t]
        assert float((moved / eps - adj[t, s]).abs()) <= 1e-4 * float(scale), (t, s)


def write_tracer_clt(folder, tset: TranscoderSet, model_name: str) -> None:
    """circuit-tracer's CLT files (``CrossLayerTranscoder.to_safetensors``) for ``tset``."""
    folder.mkdir(parents=True)
    for L, tc in enumerate(tset.transcoders):
        enc = {f"W_enc_{L}": tc.W_enc.detach().T.contiguous(),
               f"b_enc_{L}": tc.b_enc.detach().clone(), f"b_dec_{L}": tc.b_dec.detach().clone()}
        if isinstance(tc, JumpReLUSAE):
            enc[f"threshold_{L}"] = tc.threshold.detach().clone()
        save_file(enc, folder / f"W_enc_{L}.safetensors")
        save_file({f"W_dec_{L}": tset.cross[L].contiguous()}, folder / f"W_dec_{L}.safetensors")
    (folder / "config.yaml").write_text(yaml.safe_dump({
        "model_name": model_name, "model_kind": "cross_layer_transcoder",
        "feature_input_hook": "mlp.hook_in", "feature_output_hook": "mlp.hook_out",
        "activation_function": "jump_relu"}))


def jumprelu_clt(llama) -> TranscoderSet:
    base = TranscoderSet.random(llama, d_sae=32, k=4, seed=2, cross_layer=True)
    gen = torch.Generator().manual_seed(3)
    out = []
    for tc in base.transcoders:
        j = JumpReLUSAE(tc.d_in, tc.d_sae, apply_b_dec_to_input=False)
        with torch.no_grad():
            for name in ("W_enc", "W_dec", "b_dec"):
                getattr(j, name).copy_(getattr(tc, name))
            j.b_enc.copy_(torch.randn(tc.d_sae, generator=gen) * 0.2)
            j.threshold.copy_(torch.rand(tc.d_sae, generator=gen) * 0.5)
        j.metadata = dict(tc.metadata)
        out.append(j.eval())
    return TranscoderSet(out, model_name=base.model_name, cross=base.cross)


def test_a_circuit_tracer_clt_folder_loads_as_a_cross_layer_set_and_gives_its_graph(
        llama, tmp_path):
    tset = jumprelu_clt(llama)
    write_tracer_clt(tmp_path / "clt", tset, tset.model_name)
    loaded = load_transcoder_set(tmp_path / "clt")
    assert loaded.is_cross_layer and len(loaded) == len(tset)
    for a, b in zip(loaded.cross, tset.cross):
        assert torch.equal(a, b)
    ours, theirs = attribute(llama, tset, PROMPT), attribute(llama, loaded, PROMPT)
    assert ours.n_features > 0 and torch.equal(ours.features, theirs.features)
    torch.testing.assert_close(theirs.adjacency, ours.adjacency, atol=1e-6, rtol=1e-5)


def decode_by_hand(tset: TranscoderSet, codes: list[torch.Tensor], layer: int) -> torch.Tensor:
    """Layer ``layer``'s MLP output decoded from every lower layer's ``codes`` (T, F), one
    latent at a time, without the bias and skip terms."""
    out = torch.zeros(len(codes[0]), tset.d_model)
    for L in range(layer + 1):
        for i in range(tset[L].d_sae):
            out += codes[L][:, i:i + 1] * tset.cross[L][i, layer - L]
    return out


def edited_by_hand(lm, tset: TranscoderSet, ids: torch.Tensor,
                   edits: dict[tuple[int, int, int], float]) -> torch.Tensor:
    """The model's logits ``(T, V)`` with every MLP replaced by the cross-layer set plus its
    clean error term, ``edits`` ((layer, position, latent) -> value) held: plain hooks, each
    layer's output ``y_clean + decode(codes) - decode(clean codes)`` plus the skip term's
    change, the codes recomputed from the edited run's MLP inputs."""
    _, _, mlps = plain_model_io(lm, ids[None])
    hf = hf_model(lm)
    with torch.no_grad():
        clean_codes = [tc.encode(x[0]) for tc, (x, _) in zip(tset.transcoders, mlps)]
    codes: list[torch.Tensor] = []

    def hook(module, args, output, layer):
        x = args[0][0]
        c = tset[layer].encode(x).clone()
        for (lay, pos, latent), value in edits.items():
            if lay == layer:
                c[pos, latent] = value
        codes.append(c)
        y = mlps[layer][1][0] + decode_by_hand(tset, codes, layer) \
            - decode_by_hand(tset, clean_codes, layer)
        W_skip = getattr(tset[layer], "W_skip", None)
        if W_skip is not None:
            y = y + (x - mlps[layer][0][0]) @ W_skip.T
        return y[None]

    handles = [block.mlp.register_forward_hook(lambda m, a, o, i=i: hook(m, a, o, i))
               for i, block in enumerate(hf.model.layers)]
    try:
        with torch.no_grad():
            return hf(input_ids=ids[None]).logits[0]
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("frozen", [False, True], ids=["live", "frozen"])
def test_a_cross_layer_set_with_no_edit_gives_the_models_logits(llama, clt, frozen):
    ids = as_ids(llama, PROMPT)[0]
    logits, _, _ = plain_model_io(llama, ids[None])
    result = intervene(llama, clt, PROMPT, [], frozen_attention=frozen)
    assert (result.logits - logits[0]).abs().max() < 1e-4
    assert result.switched == 0


def test_a_cross_layer_ablation_in_the_model_equals_its_definition(llama, clt):
    """An edit at layer 0 reaches every later MLP output through the cross-layer decoders: the
    edited logits equal plain hooks written from circuit-tracer's definition, and differ from
    the same edit with each layer's own decoder alone."""
    ids = as_ids(llama, PROMPT)[0]
    T = len(ids)
    with torch.no_grad():
        _, _, mlps = plain_model_io(llama, ids[None])
        codes = clt[0].encode(mlps[0][0][0])
    edits = {(0, pos, int(codes[pos].argmax())): 0.0 for pos in (1, T - 2)}
    edits[(1, T - 1, 5)] = 3.0  # a clamp of a latent that was off
    got = intervene(llama, clt, PROMPT, [(*key, value) for key, value in edits.items()])
    want = edited_by_hand(llama, clt, ids, edits)
    assert (got.logits - want).abs().max() < 1e-4
    assert (got.logits[-1] - got.clean_logits[-1]).abs().max() > 1e-2  # the edit acts
    own_only = TranscoderSet(clt.transcoders)
    alone = intervene(llama, own_only, PROMPT, [(*key, value) for key, value in edits.items()])
    assert (alone.logits[-1] - got.logits[-1]).abs().max() > 1e-3


def test_a_cross_layer_prediction_is_the_measured_change_where_the_model_is_linear(llama):
    """Every latent active (k = d_sae, a large encoder bias), attention and norms frozen: the
    graph's predicted change equals the brute-force linear response of the replacement model
    and the change measured in the model."""
    tset = TranscoderSet.random(llama, d_sae=16, k=16, seed=5, cross_layer=True)
    with torch.no_grad():
        for tc in tset.transcoders:
            tc.b_enc.fill_(6.0)
    ids = as_ids(llama, PROMPT)[0]
    graph = attribute(llama, tset, PROMPT)
    rm = build_replacement(llama, tset, ids)
    assert torch.equal(graph.features, rm.features)
    V = rm.logits.shape[-1]
    targets = torch.stack([demeaned(t, V) for t in graph.logit_tokens])
    intervener = GraphIntervener(llama, tset, graph, frozen_attention=True)
    f, a = graph.features, graph.activations.double()
    first = int(((f[:, 0] == 0) & (f[:, 1] == len(ids) - 3)).nonzero()[0, 0])
    second = int(((f[:, 0] == 1) & (f[:, 1] == len(ids) - 1)).nonzero()[2, 0])
    for nodes, mode, factor, new in [([first], "ablate", None, {first: 0.0}),
                                     ([first, second], "scale", 2.5,
                                      {first: 2.5 * a[first], second: 2.5 * a[second]})]:
        want = linear_response(rm, new, targets)
        scale = want.abs().max()
        assert scale > 1e-3
        assert torch.allclose(predicted_change(graph, nodes, mode, factor), want,
                              atol=1e-4 * scale)
        measured = torch.tensor(intervener(nodes, mode, factor)["measured change"].values)
        assert intervener.last.switched == 0
        assert torch.allclose(measured, want, atol=1e-3 * scale), (nodes, mode)


def test_steering_generation_with_a_cross_layer_set(llama, clt):
    """Clamping a layer-1 latent where it is active in the continuation adds its change times
    its decoder to layer 1's MLP output and to every later layer's, through the cross-layer
    decoders (greedy, full forward passes, hand-written hooks)."""
    ids = as_ids(llama, PROMPT)[0]
    n_new, T = 6, len(ids)
    plain = steer_generate(llama, clt, PROMPT, [], n_new)
    _, _, mlps = plain_model_io(llama, torch.cat([ids, plain.clean_tokens])[None])
    with torch.no_grad():
        counts = (clt[1].encode(mlps[1][0][0][T:-1]) != 0).sum(0)
    latent = int(counts.argmax())
    change: dict[str, torch.Tensor] = {}

    def hook(module, args, output, layer):
        x, out = args[0][0], output[0].clone()
        if layer == 1:
            with torch.no_grad():
                code = clt[1].encode(x)[:, latent]
            on = (torch.arange(len(x)) >= T) & (code != 0)
            change["d"] = torch.where(on, 25.0 - code, 0.0)
        if layer >= 1:
            out += change["d"][:, None] * clt.cross[1][latent, layer - 1]
        return out[None]

    hf = hf_model(llama)
    handles = [block.mlp.register_forward_hook(lambda m, a, o, i=i: hook(m, a, o, i))
               for i, block in enumerate(hf.model.layers)]
    try:
        want = greedy_reference(llama, ids, n_new)
    finally:
        for h in handles:
            h.remove()
    got = steer_generate(llama, clt, PROMPT, [(1, T - 1, latent, 25.0)], n_new,
                         where="generated")
    assert torch.equal(got.steered_tokens, want)
    assert not torch.equal(got.steered_tokens, plain.clean_tokens)  # the steering does act


def test_a_per_layer_folder_keeps_its_skip_connections(llama, tmp_path):
    tset = TranscoderSet.random(llama, d_sae=32, k=4, skip=True, seed=4)
    save_tracer_transcoders(tset.transcoders, tmp_path / "plt", tset.model_name)
    loaded = load_transcoder_set(tmp_path / "plt")
    assert all(isinstance(tc, SkipTopKSAE) for tc in loaded.transcoders)
    ids = as_ids(llama, PROMPT)[0]
    want, got = build_replacement(llama, tset, ids), build_replacement(llama, loaded, ids)
    torch.testing.assert_close(got.errors, want.errors, atol=1e-5, rtol=0)
    # Without the skips the MLP outputs' linear part would land in the error nodes.
    plain = TranscoderSet([_without_skip(tc) for tc in tset.transcoders])
    assert (build_replacement(llama, plain, ids).errors - want.errors).abs().max() > 1e-2


def _without_skip(tc: SkipTopKSAE):
    from sae_nb.dictionaries.architectures import TopKSAE  # only this helper needs the base

    out = TopKSAE(tc.d_in, tc.d_sae, k=tc.k, apply_b_dec_to_input=False)
    out.load_state_dict({k: v for k, v in tc.state_dict().items() if k != "W_skip"})
    out.metadata = dict(tc.metadata)
    return out.eval()


def test_a_relu_folder_with_skip_connections_is_refused_naming_the_layer(llama, tmp_path):
    tset = TranscoderSet.random(llama, d_sae=32, k=4, seed=4)
    relus = []
    for tc in tset.transcoders:
        r = ReLUSAE(tc.d_in, tc.d_sae, apply_b_dec_to_input=False)
        r.load_state_dict({k: v for k, v in tc.state_dict().items() if k in r.state_dict()})
        relus.append(r.eval())
    skips = {1: torch.eye(tset.d_model) * 0.1}
    save_tracer_transcoders(relus, tmp_path / "plt", tset.model_name, skips=skips)
    with pytest.raises(CircuitError, match="Layer 1 of .* ReLUSAE transcoder with a skip"):
        load_transcoder_set(tmp_path / "plt")
