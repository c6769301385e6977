"""circuit-tracer's local transcoder format: our transcoders round-trip through it, and folders
laid out as circuit-tracer 0.5.0 writes them (per-layer ``layer_{L}.safetensors``, cross-layer
``W_enc_{L}`` / ``W_dec_{L}`` files, ``config.yaml``) load and compute what circuit-tracer's
own maths computes, written out by hand here from its ``encode``, ``decode`` and
``compute_reconstruction`` (``transcoder/single_layer_transcoder.py``,
``transcoder/cross_layer_transcoder.py``), never with our code. Bad folders get a
``DictionaryFormatError``; a pickle or a YAML tag that would run code runs nothing.

The last two tests run circuit-tracer itself (its pinned environment, ``.ci/circuit-tracer-env``):
its loader on the folders we save, our loader on the files its own ``to_safetensors`` writes, and
``benchmarks/circuit_tracer_side.py`` on the tiny Llama. They skip unless
``SAE_NB_CIRCUIT_TRACER_PYTHON`` names that environment's python::

    export SAE_NB_CIRCUIT_TRACER_PYTHON="$(.ci/circuit-tracer-env)"
    pytest tests/test_tracer_format.py
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from sae_nb.circuits.tracer_format import (
    CrossLayerTranscoder,
    load_tracer_transcoders,
    save_tracer_transcoders,
)
from sae_nb.dictionaries.architectures import GatedSAE, JumpReLUSAE, SkipTopKSAE, TopKSAE
from sae_nb.dictionaries.saving import DictionaryFormatError

N_LAYERS, D, F, K, B = 3, 16, 48, 5, 40
ATOL = 1e-5


def randomize(tc):
    """Random weights of unit-ish scale in every tensor, so each one matters to the checks."""
    gen = torch.Generator().manual_seed(tc.d_sae * 7 + tc.d_in)
    with torch.no_grad():
        for p in tc.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return tc.eval()


def topk_set(skip: bool = False):
    cls = SkipTopKSAE if skip else TopKSAE
    return {layer: randomize(cls(D, F, k=K, apply_b_dec_to_input=False))
            for layer in range(N_LAYERS)}


def ref_topk(pre, k):
    """circuit-tracer's TopK (keep the k largest as they are) followed by our relu."""
    _, idx = torch.topk(pre, k, dim=-1)
    gate = torch.zeros_like(pre).scatter_(-1, idx, 1.0)
    return torch.relu(pre * gate)


# -- round trip -------------------------------------------------------------------------------
def test_topk_set_with_skips_round_trips_and_files_hold_circuit_tracer_fields(tmp_path):
    transcoders = topk_set()
    skips = {layer: torch.randn(D, D) / D for layer in range(N_LAYERS)}
    save_tracer_transcoders(transcoders, tmp_path / "set", "tiny-llama", skips=skips)

    config = yaml.safe_load((tmp_path / "set" / "config.yaml").read_text())
    assert config == {"model_name": "tiny-llama", "model_kind": "transcoder_set",
                      "feature_input_hook": "mlp.hook_in", "feature_output_hook": "mlp.hook_out",
                      "activation_function": "topk", "top_k": K}
    x = torch.randn(B, D) * 2
    for layer, tc in transcoders.items():
        raw = load_file(tmp_path / "set" / f"layer_{layer}.safetensors")
        assert set(raw) == {"W_enc", "W_dec", "b_enc", "b_dec", "W_skip"}
        assert raw["W_enc"].shape == (F, D) and raw["W_dec"].shape == (F, D)
        # circuit-tracer's encode F.linear(x, W_enc, b_enc), our relu-TopK, its decode + skip
        f = ref_topk(x @ raw["W_enc"].T + raw["b_enc"], K)
        y = f @ raw["W_dec"] + raw["b_dec"] + x @ raw["W_skip"].T
        torch.testing.assert_close(f, tc.encode(x), atol=ATOL, rtol=0)
        torch.testing.assert_close(y, tc.decode(tc.encode(x)) + x @ skips[layer].T,
                                   atol=ATOL, rtol=0)

    loaded, loaded_skips, meta = load_tracer_transcoders(tmp_path / "set")
    assert sorted(loaded) == list(range(N_LAYERS)) and sorted(loaded_skips) == sorted(skips)
    assert meta["model_kind"] == "transcoder_set" and meta["model_name"] == "tiny-llama"
    assert meta["activation_function"] == ["topk"] * N_LAYERS
    for layer, tc in transcoders.items():
        got = loaded[layer]
        assert type(got) is TopKSAE and got.k == K and not got.apply_b_dec_to_input
        assert got.metadata["site"] == f"mlp_in_layer{layer}"
        assert got.metadata["target_site"] == f"mlp_out_layer{layer}"
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            assert torch.equal(getattr(got, name), getattr(tc, name)), name
        assert torch.equal(loaded_skips[layer], skips[layer])


def test_skip_topk_sae_saves_its_own_skip(tmp_path):
    transcoders = topk_set(skip=True)
    save_tracer_transcoders(transcoders, tmp_path / "set", "m")
    _, skips, _ = load_tracer_transcoders(tmp_path / "set")
    for layer, tc in transcoders.items():
        assert torch.equal(skips[layer], tc.W_skip)


def test_sae_style_encoder_and_negative_thresholds_keep_their_codes(tmp_path):
    """An encoder that subtracts b_dec is saved with b_dec folded into b_enc; a JumpReLU
    threshold below 0 is saved as 0. Both encode the same batch as before, as checked against
    the formula ``relu(x - b_dec) @ W_enc + b_enc) * (pre > t)`` written out here."""
    transcoders = {}
    for layer in range(N_LAYERS):
        tc = randomize(JumpReLUSAE(D, F, apply_b_dec_to_input=True))
        with torch.no_grad():
            tc.threshold.copy_(torch.linspace(-0.5, 0.8, F))
        transcoders[layer] = tc
    save_tracer_transcoders(transcoders, tmp_path / "set", "m")
    loaded, skips, meta = load_tracer_transcoders(tmp_path / "set")
    assert skips == {} and meta["activation_function"] == ["jump_relu"] * N_LAYERS
    x = torch.randn(B, D) * 2
    for layer, tc in transcoders.items():
        pre = (x - tc.b_dec) @ tc.W_enc + tc.b_enc
        expected = torch.relu(pre) * (pre > tc.threshold)
        assert (expected > 0).any() and (expected == 0).any()
        torch.testing.assert_close(loaded[layer].encode(x), expected, atol=ATOL, rtol=0)
        raw = load_file(tmp_path / "set" / f"layer_{layer}.safetensors")
        assert (raw["activation_function.threshold"] >= 0).all()


def test_mixed_activations_round_trip_layer_by_layer(tmp_path):
    from sae_nb.dictionaries.architectures import ReLUSAE

    transcoders = {0: randomize(TopKSAE(D, F, k=3, apply_b_dec_to_input=False)),
                   1: randomize(JumpReLUSAE(D, F, apply_b_dec_to_input=False)),
                   2: randomize(TopKSAE(D, F, k=7, apply_b_dec_to_input=False)),
                   3: randomize(ReLUSAE(D, F, apply_b_dec_to_input=False))}
    with torch.no_grad():
        transcoders[1].threshold.abs_()
    save_tracer_transcoders(transcoders, tmp_path / "set", "m")
    config = yaml.safe_load((tmp_path / "set" / "config.yaml").read_text())
    assert config["activation_function"] == ["topk", "jump_relu", "topk", "relu"]
    assert config["top_k"] == [3, None, 7, None]
    loaded, _, meta = load_tracer_transcoders(tmp_path / "set")
    assert [type(tc) for tc in loaded.values()] == [TopKSAE, JumpReLUSAE, TopKSAE, ReLUSAE]
    assert [loaded[0].k, loaded[2].k] == [3, 7]
    x = torch.randn(B, D) * 2
    for layer, tc in transcoders.items():
        torch.testing.assert_close(loaded[layer].encode(x), tc.encode(x), atol=ATOL, rtol=0)


# -- folders laid out as circuit-tracer writes them -------------------------------------------
def write_plt(folder: Path, jump: bool, skip: bool, config: dict | None, dtype=torch.float32):
    """``TranscoderSet.to_safetensors``'s files, plus the cache's config.yaml when given."""
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(3)
    raw = {}
    for layer in range(N_LAYERS):
        t = {"W_enc": torch.randn(F, D, generator=gen) * 0.5,
             "W_dec": torch.randn(F, D, generator=gen) * 0.5,
             "b_enc": torch.randn(F, generator=gen) * 0.3,
             "b_dec": torch.randn(D, generator=gen) * 0.3}
        if jump:
            t["activation_function.threshold"] = torch.rand(F, generator=gen)
        if skip:
            t["W_skip"] = torch.randn(D, D, generator=gen) / D
        t = {k: v.to(dtype) for k, v in t.items()}
        save_file(t, folder / f"layer_{layer}.safetensors")
        raw[layer] = {k: v.float() for k, v in t.items()}
    if config is not None:
        (folder / "config.yaml").write_text(yaml.dump(config))
    return raw


def write_clt(folder: Path, jump: bool, config: dict | None):
    """``CrossLayerTranscoder.to_safetensors``'s files."""
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(4)
    raw = {}
    for i in range(N_LAYERS):
        enc = {f"W_enc_{i}": torch.randn(F, D, generator=gen) * 0.5,
               f"b_enc_{i}": torch.randn(F, generator=gen) * 0.3,
               f"b_dec_{i}": torch.randn(D, generator=gen) * 0.3}
        if jump:
            enc[f"threshold_{i}"] = torch.rand(F, generator=gen)
        dec = {f"W_dec_{i}": torch.randn(F, N_LAYERS - i, D, generator=gen) * 0.5}
        save_file(enc, folder / f"W_enc_{i}.safetensors")
        save_file(dec, folder / f"W_dec_{i}.safetensors")
        raw[i] = {**enc, **dec}
    if config is not None:
        (folder / "config.yaml").write_text(yaml.dump(config))
    return raw


CACHE_CONFIG = {"model_name": "google/gemma-2-2b", "feature_input_hook": "hook_resid_mid",
                "feature_output_hook": "hook_mlp_out", "scan": "some/scan"}


@pytest.mark.parametrize("jump,skip,with_config,dtype", [
    (False, True, True, torch.float32), (True, False, True, torch.bfloat16),
    (True, True, False, torch.float32)])
def test_plt_folder_encodes_as_circuit_tracer(tmp_path, jump, skip, with_config, dtype):
    config = {**CACHE_CONFIG, "model_kind": "transcoder_set"} if with_config else None
    raw = write_plt(tmp_path / "plt", jump, skip, config, dtype)
    loaded, skips, meta = load_tracer_transcoders(tmp_path / "plt")
    assert meta["model_kind"] == "transcoder_set"
    assert meta["model_name"] == (CACHE_CONFIG["model_name"] if with_config else None)
    assert sorted(skips) == (list(range(N_LAYERS)) if skip else [])
    x = torch.randn(B, D) * 2
    for layer in range(N_LAYERS):
        r = raw[layer]
        pre = x @ r["W_enc"].T + r["b_enc"]
        # jumprelu.forward: x * (x > threshold); else F.relu
        f = pre * (pre > r["activation_function.threshold"]) if jump else torch.clamp(pre, min=0)
        y = f @ r["W_dec"] + r["b_dec"] + (x @ r["W_skip"].T if skip else 0)
        assert (f > 0).any() and (f == 0).any()
        tc = loaded[layer]
        assert isinstance(tc, JumpReLUSAE) == jump
        torch.testing.assert_close(tc.encode(x), f, atol=ATOL, rtol=0)
        ours = tc.decode(tc.encode(x)) + (x @ skips[layer].T if skip else 0)
        torch.testing.assert_close(ours, y, atol=1e-4, rtol=0)
        if with_config:
            assert tc.metadata["site"] is None  # hook_resid_mid is no site of ours
            assert tc.metadata["target_site"] == f"mlp_out_layer{layer}"


@pytest.mark.parametrize("jump", [False, True])
def test_clt_folder_encodes_and_reconstructs_as_circuit_tracer(tmp_path, jump):
    raw = write_clt(tmp_path / "clt", jump, {**CACHE_CONFIG, "model_kind":
                                             "cross_layer_transcoder"})
    clt, skips, meta = load_tracer_transcoders(tmp_path / "clt")
    assert isinstance(clt, CrossLayerTranscoder) and len(clt) == N_LAYERS and skips == {}
    assert meta["model_kind"] == "cross_layer_transcoder"
    xs = [torch.randn(B, D) * 2 for _ in range(N_LAYERS)]
    feats = []
    for i in range(N_LAYERS):
        pre = xs[i] @ raw[i][f"W_enc_{i}"].T + raw[i][f"b_enc_{i}"]
        f = pre * (pre > raw[i][f"threshold_{i}"]) if jump else torch.clamp(pre, min=0)
        feats.append(f)
        torch.testing.assert_close(clt.encode(i, xs[i]), f, atol=ATOL, rtol=0)
    # compute_reconstruction: every (source i, target t >= i) pair adds W_dec_i[:, t - i]
    expected = torch.zeros(N_LAYERS, B, D)
    for t in range(N_LAYERS):
        expected[t] = raw[t][f"b_dec_{t}"]
        for i in range(t + 1):
            for b in range(B):
                expected[t, b] += feats[i][b] @ raw[i][f"W_dec_{i}"][:, t - i, :]
    torch.testing.assert_close(clt.reconstruct(xs), expected, atol=1e-4, rtol=0)


# -- bad folders --------------------------------------------------------------------------------
def test_missing_layer_file_is_named(tmp_path):
    write_plt(tmp_path / "plt", False, False, None)
    (tmp_path / "plt" / "layer_1.safetensors").unlink()
    with pytest.raises(DictionaryFormatError, match="layer_1.safetensors"):
        load_tracer_transcoders(tmp_path / "plt")
    write_clt(tmp_path / "clt", False, None)
    (tmp_path / "clt" / "W_dec_2.safetensors").unlink()
    with pytest.raises(DictionaryFormatError, match="W_dec_2.safetensors"):
        load_tracer_transcoders(tmp_path / "clt")


def test_wrong_shapes_are_refused(tmp_path):
    write_plt(tmp_path / "plt", False, False, None)
    t = load_file(tmp_path / "plt" / "layer_2.safetensors")
    t["W_dec"] = t["W_dec"].T.contiguous()  # (D, F): transposed
    save_file(t, tmp_path / "plt" / "layer_2.safetensors")
    with pytest.raises(DictionaryFormatError, match="W_dec has shape"):
        load_tracer_transcoders(tmp_path / "plt")
    write_clt(tmp_path / "clt", False, None)
    save_file({"W_dec_1": torch.zeros(F, N_LAYERS, D)}, tmp_path / "clt" / "W_dec_1.safetensors")
    with pytest.raises(DictionaryFormatError, match="W_dec_1 has shape"):
        load_tracer_transcoders(tmp_path / "clt")


@pytest.mark.parametrize("config,match", [
    ({"model_kind": "transcoder_set", "activation_function": "gelu"}, "gelu"),
    ({"model_kind": "transcoder_set", "activation_function": "topk", "top_k": 0}, "top_k=0"),
    ({"model_kind": "transcoder_set", "activation_function": "jump_relu"}, "no 'activation"),
    ({"model_kind": "sparse_autoencoder"}, "sparse_autoencoder"),
    ({"model_kind": "transcoder_set", "transcoders": ["hf://org/repo/layer_0.safetensors"]},
     "download the set first"),
    ({"model_kind": "transcoder_set", "transcoders": ["params.npz"]}, "only .safetensors"),
])
def test_bad_config_is_refused(tmp_path, config, match):
    write_plt(tmp_path / "plt", False, False, config)
    with pytest.raises(DictionaryFormatError, match=match):
        load_tracer_transcoders(tmp_path / "plt")


def test_negative_jumprelu_threshold_is_refused(tmp_path):
    write_plt(tmp_path / "plt", True, False, None)
    t = load_file(tmp_path / "plt" / "layer_0.safetensors")
    t["activation_function.threshold"][:3] = -0.1
    save_file(t, tmp_path / "plt" / "layer_0.safetensors")
    with pytest.raises(DictionaryFormatError, match="3 JumpReLU thresholds are below 0"):
        load_tracer_transcoders(tmp_path / "plt")


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_files_run_nothing(tmp_path):
    marker = tmp_path / "ran"
    write_plt(tmp_path / "plt", False, False, None)
    (tmp_path / "plt" / "layer_1.safetensors").write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(DictionaryFormatError, match="layer_1.safetensors"):
        load_tracer_transcoders(tmp_path / "plt")
    (tmp_path / "plt2").mkdir()
    (tmp_path / "plt2" / "config.yaml").write_text(
        f"model_kind: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(DictionaryFormatError, match="not plain YAML"):
        load_tracer_transcoders(tmp_path / "plt2")
    assert not marker.exists()


def test_not_a_transcoder_folder(tmp_path):
    with pytest.raises(DictionaryFormatError, match="is not a folder"):
        load_tracer_transcoders(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DictionaryFormatError, match="neither layer_<L>"):
        load_tracer_transcoders(tmp_path / "empty")


def test_bad_sets_are_not_saved(tmp_path):
    transcoders = topk_set()
    with pytest.raises(DictionaryFormatError, match=r"missing \[1\]"):
        save_tracer_transcoders({0: transcoders[0], 2: transcoders[2]}, tmp_path / "a", "m")
    wide = {**transcoders, 1: TopKSAE(D, 2 * F, k=K, apply_b_dec_to_input=False)}
    with pytest.raises(DictionaryFormatError, match="one width"):
        save_tracer_transcoders(wide, tmp_path / "b", "m")
    gated = {**transcoders, 2: GatedSAE(D, F)}
    with pytest.raises(DictionaryFormatError, match="GatedSAE"):
        save_tracer_transcoders(gated, tmp_path / "c", "m")
    with pytest.raises(DictionaryFormatError, match="skip of layer 0"):
        save_tracer_transcoders(transcoders, tmp_path / "d", "m", skips={0: torch.zeros(D, 3)})
    assert not any(tmp_path.iterdir())


# -- circuit-tracer itself ----------------------------------------------------------------------
def tracer_python() -> str:
    """``$SAE_NB_CIRCUIT_TRACER_PYTHON``; without it skip, or fail under ``CI=true`` (``.ci/run``
    must build the environment)."""
    python = os.environ.get("SAE_NB_CIRCUIT_TRACER_PYTHON")
    if not python:
        why = 'set SAE_NB_CIRCUIT_TRACER_PYTHON="$(.ci/circuit-tracer-env)" to run circuit-tracer'
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"CI=true but no circuit-tracer environment: {why}")
        pytest.skip(why)
    return python


SIDE = textwrap.dedent("""
    import json, sys, torch
    from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder
    from circuit_tracer.utils.caching import load_transcoders_from_cache
    ours, clt_dir, out = sys.argv[1:4]
    x = torch.load(out + "/x.pt", weights_only=True)
    result = {}
    # our saved (ReLU + skip) folder through circuit-tracer's own cache loader
    tset, config = load_transcoders_from_cache("set", cache_dir=ours, device=torch.device("cpu"),
                                               lazy_decoder=False)
    result["config"] = config
    result["plt"] = [tc(x).tolist() for tc in tset]
    result["plt_codes"] = [tc.encode(x).tolist() for tc in tset]
    # a CLT written by circuit-tracer's to_safetensors
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(3, 48, 16, lazy_decoder=False, device=torch.device("cpu"),
                               dtype=torch.float32)
    with torch.no_grad():
        for p in clt.parameters():
            p.normal_(0, 0.5)
    clt.to_safetensors(clt_dir)
    xs = torch.stack([x, 2 * x, -x])
    result["clt"] = clt(xs).tolist()
    json.dump(result, open(out + "/result.json", "w"))
""")


@pytest.mark.slow  # a second interpreter: circuit-tracer's environment
def test_circuit_tracer_reads_what_we_save_and_we_read_what_it_writes(tmp_path):
    python = tracer_python()
    from sae_nb.dictionaries.architectures import ReLUSAE

    transcoders = {layer: randomize(ReLUSAE(D, F, apply_b_dec_to_input=False))
                   for layer in range(N_LAYERS)}
    skips = {layer: torch.randn(D, D) / D for layer in range(N_LAYERS)}
    save_tracer_transcoders(transcoders, tmp_path / "ours" / "set", "m", skips=skips)
    x = torch.randn(B, D)
    torch.save(x, tmp_path / "x.pt")
    (tmp_path / "clt").mkdir()
    subprocess.run([python, "-c", SIDE, str(tmp_path / "ours"), str(tmp_path / "clt"),
                    str(tmp_path)], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["config"]["feature_input_hook"] == "mlp.hook_in"
    for layer, tc in transcoders.items():
        torch.testing.assert_close(torch.tensor(result["plt_codes"][layer]), tc.encode(x),
                                   atol=ATOL, rtol=0)
        torch.testing.assert_close(torch.tensor(result["plt"][layer]),
                                   tc.decode(tc.encode(x)) + x @ skips[layer].T,
                                   atol=1e-4, rtol=0)
    clt, _, _ = load_tracer_transcoders(tmp_path / "clt")
    torch.testing.assert_close(clt.reconstruct([x, 2 * x, -x]), torch.tensor(result["clt"]),
                               atol=1e-4, rtol=0)


@pytest.mark.slow  # a second interpreter: circuit-tracer's environment and its attribution
def test_circuit_tracer_side_graph_uses_our_transcoders_on_the_tiny_llama(tmp_path, model_dirs):
    """benchmarks/circuit_tracer_side.py on the tiny Llama with TopK transcoders we save: the
    plain model's logits there (transformers 4.57, the folder patched) equal ours (transformers
    5), and the graph's active features and values are exactly what our loaded transcoders give
    on the MLP inputs captured here (position 0 left out, as circuit-tracer zeroes it)."""
    python = tracer_python()
    import numpy as np
    from transformers import AutoModelForCausalLM

    folder = model_dirs["llama"]
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    d_model = hf.config.hidden_size
    transcoders = {layer: randomize(TopKSAE(d_model, 64, k=4, apply_b_dec_to_input=False))
                   for layer in range(hf.config.num_hidden_layers)}
    save_tracer_transcoders(transcoders, tmp_path / "tc", "tiny-llama")
    side = Path(__file__).resolve().parents[1] / "benchmarks" / "circuit_tracer_side.py"
    subprocess.run([python, str(side), "--model", str(folder), "--transcoders",
                    str(tmp_path / "tc"), "--prompt", "the state of the union", "--threads", "1",
                    "--out", str(tmp_path / "out")], check=True, capture_output=True)
    graph = np.load(tmp_path / "out" / "graph.npz")
    info = json.loads((tmp_path / "out" / "graph.json").read_text())
    ids = torch.tensor(graph["input_tokens"])[None]
    assert info["input_token_strs"][0] == "<bos>" and "".join(info["input_token_strs"][1:]) == \
        "the state of the union"

    inputs = {}
    hooks = [layer.mlp.register_forward_hook(
        lambda m, i, o, L=L: inputs.__setitem__(L, i[0][0])) for L, layer in
        enumerate(hf.model.layers)]
    with torch.no_grad():
        logits = hf(ids).logits[0, -1]
    for h in hooks:
        h.remove()
    torch.testing.assert_close(torch.tensor(graph["model_logits"]), logits, atol=1e-4, rtol=0)
    expected = {}
    for layer, tc in transcoders.items():
        f = tc.encode(inputs[layer]).detach()
        for pos, j in f[1:].nonzero().tolist():
            expected[(layer, pos + 1, j)] = f[pos + 1, j].item()
    got = dict(zip(map(tuple, graph["active_features"].tolist()),
                   graph["activation_values"].tolist()))
    assert set(got) == set(expected) and len(got) == 3 * 4 * (ids.shape[1] - 1)
    assert max(abs(got[key] - expected[key]) for key in got) < 1e-4
    n = len(graph["selected_features"]) + (3 + 1) * ids.shape[1] + len(graph["logit_tokens"])
    assert graph["adjacency_matrix"].shape == (n, n)
