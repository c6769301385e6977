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
from test_circuits import PROMPT, node_values, sources

from sae_nb.circuits.attribute import attribute
from sae_nb.circuits.interventions import intervene
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


def test_interventions_in_the_model_refuse_a_cross_layer_set_by_name(llama, clt):
    with pytest.raises(CircuitError, match="cross-layer transcoder.*per-layer transcoder set"):
        intervene(llama, clt, PROMPT, [(1, 1, 0)])


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
