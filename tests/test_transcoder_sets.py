"""Transcoder sets: trained at every layer in one streamed pass, resumed, saved, loaded, checked."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import plain_model_io

import sae_nb.training.trainer as train
from sae_nb.circuits import sets
from sae_nb.circuits.sets import MANIFEST, layer_folder, load_transcoder_set, train_transcoder_set
from sae_nb.circuits.transcoder_set import CircuitError
from sae_nb.training.streaming import ActivationStream, train_sites

N_LAYERS = 3
SET = dict(d_sae=48, k=4, n_tokens=1200, heldout_tokens=200, ctx_len=32, batch_rows=64,
           buffer_rows=256, lr=3e-3, progress=False)


def train_set(llama, corpus_dir, folder, **kw):
    return train_transcoder_set(llama, folder, corpus=str(corpus_dir), **{**SET, **kw})


def same(a, b, atol):
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, atol=atol, rtol=0, msg=name)


@pytest.fixture(scope="module")
def trained(llama, corpus_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("set") / "tc"
    return folder, train_set(llama, corpus_dir, folder)


def test_the_set_trained_in_lockstep_equals_a_run_per_layer(llama, corpus_dir, trained):
    """Each layer's transcoder from the one 3-layer pass equals that layer trained alone on a
    stream of its own two sites (the same rows in the same order), within 1e-5."""
    _, whole = trained
    assert len(whole) == N_LAYERS
    for layer in range(N_LAYERS):
        pair = (f"mlp_in_layer{layer}", f"mlp_out_layer{layer}")
        alone = ActivationStream(llama, sites=list(pair), n_tokens=SET["n_tokens"], ctx_len=32,
                                 corpus=str(corpus_dir), batch_rows=64, buffer_rows=256)
        steps = len(alone.contexts.tokens) * 31 // 64
        result = train_sites(alone, progress=False, dictionaries={"tc": pair}, d_sae=48, k=4,
                             lr=3e-3, total_tokens=steps * 64)["tc"]
        same(whole[layer], result.dictionary, atol=1e-5)


def mlp_pairs(llama, token_ids):
    """Each layer's MLP input and output, read by plain torch hooks on the Hugging Face
    modules (not the nnsight sites the set uses)."""
    return dict(enumerate(plain_model_io(llama, token_ids)[2]))


def test_the_manifest_holds_each_layers_heldout_fvu(llama, corpus_dir, trained):
    """The saved per-layer held-out FVU against one recomputed from hooks on the model's MLPs
    over the contexts packed after the training ones (BOS rows left out)."""
    folder, whole = trained
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["layers"] == N_LAYERS and manifest["d_sae"] == 48 and manifest["k"] == 4
    assert manifest["sites"][2] == ["mlp_in_layer2", "mlp_out_layer2"]
    stream = ActivationStream(llama, sites=["mlp_in_layer0"], n_tokens=SET["n_tokens"],
                              ctx_len=32, corpus=str(corpus_dir))
    from sae_nb.activations.corpora import load_corpus, pack_contexts

    n = len(stream.contexts.tokens)
    packed = pack_contexts(load_corpus(str(corpus_dir)), llama.tokenizer, 32, n + 7, 0, True)
    ids = torch.from_numpy(packed.tokens[n:].astype("int64"))
    keep = torch.from_numpy(packed.pos[n:] != -1)
    pairs = mlp_pairs(llama, ids)
    for layer in range(N_LAYERS):
        x, y = (t[keep] for t in pairs[layer])
        with torch.no_grad():
            err = (y - whole[layer].reconstruct(x)).pow(2).sum()
        fvu = float(err / (y - y.mean(0)).pow(2).sum())
        got = manifest["per_layer"][layer]
        assert got["tokens"] == len(y) == int(keep.sum())
        assert got["fvu"] == pytest.approx(fvu, rel=1e-4) and fvu > 0


def test_a_killed_set_resumes_bit_for_bit(llama, corpus_dir, trained, tmp_path, monkeypatch):
    _, whole = trained
    real = train._train_step

    def crashing(sae, opt, sched, cfg, state, *args, **kw):
        if state["step"] == 9:
            raise KeyboardInterrupt("killed at step 9")
        return real(sae, opt, sched, cfg, state, *args, **kw)

    with monkeypatch.context() as m:
        m.setattr(train, "_train_step", crashing)
        with pytest.raises(KeyboardInterrupt):
            train_set(llama, corpus_dir, tmp_path / "tc", checkpoint_every=4)
    assert not (tmp_path / "tc" / MANIFEST).exists()
    assert (tmp_path / "tc" / sets.CHECKPOINT).is_dir()
    resumed = train_set(llama, corpus_dir, tmp_path / "tc", checkpoint_every=4)
    for layer in range(N_LAYERS):
        same(resumed[layer], whole[layer], atol=0)
    assert not (tmp_path / "tc" / sets.CHECKPOINT).exists()  # removed once the set is saved


def test_a_rerun_reuses_the_set_and_other_settings_are_refused(llama, corpus_dir, trained,
                                                               monkeypatch):
    folder, whole = trained

    def no_training(*args, **kw):
        raise AssertionError("trained again")

    monkeypatch.setattr(sets, "train_sites", no_training)
    again = train_set(llama, corpus_dir, folder)
    for layer in range(N_LAYERS):
        same(again[layer], whole[layer], atol=0)
    with pytest.raises(CircuitError, match="other settings \\(n_tokens differ\\)"):
        train_set(llama, corpus_dir, folder, n_tokens=2000)


def test_a_set_missing_a_layer_or_its_manifest_is_refused(trained, tmp_path):
    folder, _ = trained
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(layer_folder(broken, 1))
    with pytest.raises(CircuitError, match="layers \\[1\\] have no folder"):
        load_transcoder_set(broken)
    with pytest.raises(CircuitError, match="does not exist"):
        load_transcoder_set(tmp_path / "nowhere")
    (broken / MANIFEST).write_text("{not json")
    with pytest.raises(CircuitError, match="cannot be read"):
        load_transcoder_set(broken)


def test_a_set_for_another_model_is_refused(trained, models):
    _, whole = trained
    whole.check(models["llama"])  # its own model: fine
    smaller = type(whole)(whole.transcoders[:2], model_name=whole.model_name)
    with pytest.raises(CircuitError, match="layers \\[2\\] are missing"):
        smaller.check(models["llama"])


def test_the_transcoders_command_trains_a_set_and_refuses_what_it_does_not_take(
        model_dirs, corpus_dir, tmp_path, capsys):
    from sae_nb.__main__ import main

    argv = ["transcoders", "--model", str(model_dirs["llama"]), "--corpus", str(corpus_dir),
            "--n-tokens", "1200", "--heldout-tokens", "200", "--ctx-len", "32",
            "--batch-size", "64", "--buffer-rows", "256", "--d-sae", "48", "--k", "4",
            "--folder", str(tmp_path / "set"), "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"Saved 3 transcoders in {tmp_path / 'set'}" in out and "fvu" in out
    loaded = load_transcoder_set(tmp_path / "set")
    assert [tc.metadata["target_site"] for tc in loaded] == [f"mlp_out_layer{i}" for i in
                                                              range(3)]
    assert main(argv + ["--total-tokens", "5000"]) == 1
    assert "--total-tokens is not an option of the transcoders job" in capsys.readouterr().err


def test_the_command_names_the_set_folder_by_its_settings(model_dirs, corpus_dir, tmp_path,
                                                          capsys):
    """Without --folder the set goes to RUN_DIR/transcoders/<d_sae>_k<k>_<tokens>, so a set of
    other tokens lands beside it instead of being refused in its place."""
    from sae_nb.__main__ import main

    base = ["transcoders", "--model", str(model_dirs["llama"]), "--corpus", str(corpus_dir),
            "--heldout-tokens", "200", "--ctx-len", "32", "--batch-size", "64",
            "--buffer-rows", "256", "--d-sae", "48", "--k", "4", "--run-dir", str(tmp_path),
            "--no-progress"]
    assert main(base + ["--n-tokens", "2000"]) == 0
    assert main(base + ["--n-tokens", "1200"]) == 0
    made = sorted(p.name for p in (tmp_path / "transcoders").iterdir())
    assert made == ["48_k4_1200", "48_k4_2k"]
    for name in made:
        assert len(load_transcoder_set(tmp_path / "transcoders" / name)) == 3
