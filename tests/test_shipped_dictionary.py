"""The dictionary shipped for the default model: it loads, its files match their checksums, it
fits fresh activations, and its recorded FVU and L0 reproduce on fresh activations."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import sae_nb
from sae_nb.dictionaries.architectures import TopKSAE


@pytest.fixture(scope="module")
def shipped():
    return sae_nb.load_default_dictionary()


def test_shipped_dictionary_is_small_topk_for_the_default_model(shipped):
    assert isinstance(shipped, TopKSAE)
    assert (shipped.d_in, shipped.d_sae, shipped.k) == (576, 4608, 32)
    assert shipped.metadata["model"] == "smollm2-135m"
    assert shipped.metadata["site"] == "resid_out_layer6"
    size = sum(f.stat().st_size for f in sae_nb.DEFAULT_DICTIONARY.iterdir())
    assert size < 12 * 2**20
    cfg = json.loads((sae_nb.DEFAULT_DICTIONARY / "cfg.json").read_text())
    assert cfg["dtype"] == "float16" and cfg["metadata"]["hook_name"] == "blocks.6.hook_resid_post"


def test_shipped_files_name_no_folder_of_the_machine_that_trained_them():
    """Every text file of the shipped folder is free of absolute paths (a home, /work, /tmp)."""
    import re

    for file in sae_nb.DEFAULT_DICTIONARY.iterdir():
        if file.suffix == ".json":
            found = re.findall(r'"(/[^"]*)"', file.read_text())
            assert not found, (file.name, found)


def test_shipped_files_match_their_recorded_checksums():
    import hashlib

    checked = sae_nb.verify_dictionary(sae_nb.DEFAULT_DICTIONARY)
    assert set(checked) == {"cfg.json", "sae_weights.safetensors", "sparsity.safetensors"}
    for name, digest in checked.items():
        assert hashlib.sha256((sae_nb.DEFAULT_DICTIONARY / name).read_bytes()).hexdigest() == digest


def test_a_copy_with_any_mtimes_loads_and_changed_weights_do_not(shipped, tmp_path):
    """A checkout sets arbitrary mtimes, and the shipped sae_nb.json records checksums only: a
    load then hashes, and loads when the bytes match. Changed weights are refused."""
    import os
    import shutil

    copy = tmp_path / "shipped"
    shutil.copytree(sae_nb.DEFAULT_DICTIONARY, copy)
    for i, file in enumerate(sorted(copy.iterdir())):
        os.utime(file, ns=(0, (1_000_000_000 + 7_777 * i) * 10**9))
    loaded = sae_nb.load_dictionary(copy)
    for key, value in shipped.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    weights = copy / "sae_weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(64)  # the last weights, zeroed
    weights.write_bytes(bytes(data))
    with pytest.raises(sae_nb.DictionaryFormatError, match=r"sae_weights\.safetensors has changed"):
        sae_nb.load_dictionary(copy)


@pytest.mark.slow  # the real embedded model
def test_recorded_fvu_and_l0_reproduce_on_fresh_speech_activations(tmp_path):
    """The FVU and L0 recorded in sae_nb.json, recomputed in plain float64 torch from the raw
    weights (TopK maths of SAELens, not our classes) on real activations of the default model
    over State of the Union text, the corpus they were measured on. The recorded ones come from
    65,650 held-out tokens; these from 8,192 tokens of a different packing (seed 1; FVU 0.060 to
    0.068 over seeds 0-2 when retrained, recorded 0.063), hence the tolerance. The recorded CE
    loss recovered and dead fraction are not asserted: they need far more tokens."""
    folder = sae_nb.DEFAULT_DICTIONARY
    recorded = json.loads((folder / "sae_nb.json").read_text())["metrics"]
    k = json.loads((folder / "cfg.json").read_text())["k"]
    w = {key: v.double() for key, v in load_file(folder / "sae_weights.safetensors").items()}
    store = sae_nb.extract_activations(sae_nb.load_model(), tmp_path, sites=["resid_out_layer6"],
                                       corpus="sotu", ctx_len=128, n_tokens=8192, seed=1,
                                       progress=False)["resid_out_layer6"]
    x = torch.from_numpy(store[:]).double()  # (N, 576), BOS rows excluded as in training
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]  # (N, 4608)
    values, index = pre.topk(k, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, index, torch.relu(values))
    x_hat = f @ w["W_dec"] + w["b_dec"]
    fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    l0 = float((f != 0).sum(-1).double().mean())
    assert fvu == pytest.approx(recorded["fvu"], abs=0.015), (fvu, recorded["fvu"])
    assert l0 == pytest.approx(recorded["l0"], abs=0.5), (l0, recorded["l0"])


@pytest.mark.slow  # the real embedded model
def test_shipped_dictionary_reconstructs_fresh_activations(shipped, tmp_path):
    """Real activations of the default model on text the dictionary never saw."""
    model = sae_nb.load_model()
    sentences = sae_nb.DEFAULT_DICTIONARY.parents[3] / "data" / "sentences.csv"
    store = sae_nb.extract_activations(model, tmp_path, sites=["resid_out_layer6"],
                                       corpus=str(sentences), ctx_len=64, n_tokens=640,
                                       progress=False)["resid_out_layer6"]
    x = torch.from_numpy(store[:])
    with torch.no_grad():
        f = shipped.encode(x)
        fvu = float((x - shipped.decode(f)).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert ((f != 0).sum(1) <= 32).all()
    assert fvu < 0.2, fvu  # 0.10 when shipped: short sentences unlike the speeches it saw
