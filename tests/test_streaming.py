"""Training without a store: the activation stream, its resumption, many sites in one pass.

The file is also the worker of the two-rank test (``python tests/test_streaming.py MODEL CORPUS
OUT`` under torchrun): every rank streams the same batches and trains on its slice of each.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sae_nb.training.streaming as streaming
import sae_nb.training.trainer as train
from sae_nb.activations.corpora import CorpusError
from sae_nb.activations.extract import extract_activations
from sae_nb.activations.sites import SiteError
from sae_nb.training.streaming import ActivationStream, StreamError, train_sites
from sae_nb.training.trainer import TrainingError, train_dictionary

SITE, SITES = "resid_out_layer1", ["resid_out_layer0", "resid_out_layer2"]
ROWS = 32  # rows per training batch
STREAM = dict(n_tokens=640, ctx_len=16, batch_size=4, dtype="float32")  # 40 contexts
TRAIN = dict(architecture="topk", expansion=2, k=4, total_tokens=ROWS * 12, seed=0,
             device="cpu", dead_window_tokens=4 * ROWS, log_every=1)


def stream(llama, corpus_dir, sites=(SITE,), **kw) -> ActivationStream:
    settings = {**STREAM, "batch_rows": ROWS, "buffer_rows": 3 * ROWS, **kw}
    return ActivationStream(llama, sites=list(sites), corpus=str(corpus_dir), **settings)


def same_dictionary(a, b, atol=1e-5):
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, atol=atol, rtol=0, msg=f"{name} differs")


def count_passes(monkeypatch) -> list:
    calls = []
    real = streaming.run_sites

    def counted(model, sites, ids, mask):
        calls.append(len(ids))
        return real(model, sites, ids, mask)

    monkeypatch.setattr(streaming, "run_sites", counted)
    return calls


def test_unshuffled_stream_is_the_store_in_order_and_trains_the_same(llama, corpus_dir, tmp_path):
    store = extract_activations(llama, tmp_path, sites=[SITE], corpus=str(corpus_dir),
                                progress=False, **STREAM)[SITE]
    stored = list(store.batches(ROWS, shuffle=False, drop_last=True))
    streamed = list(stream(llama, corpus_dir, buffer_rows=ROWS, shuffle=False))
    assert len(streamed) == len(stored) == len(store) // ROWS > 12
    for a, b in zip(streamed, stored):
        assert torch.equal(a, b)  # same tokens, same order, BOS left out as in extraction
    bos = store.index()["pos"] == -1
    assert not bos.any() and len(store) < 640

    from_store = train_dictionary(store.batches(ROWS, shuffle=False), progress=False, **TRAIN)
    from_stream = train_dictionary(stream(llama, corpus_dir, buffer_rows=ROWS, shuffle=False),
                                   progress=False, **TRAIN)
    same_dictionary(from_stream.dictionary, from_store.dictionary)
    assert from_stream.log["loss"].tolist() == pytest.approx(from_store.log["loss"].tolist(),
                                                             abs=1e-5)


def test_shuffled_stream_draws_every_row_once_in_a_seeded_order(llama, corpus_dir, tmp_path):
    store = extract_activations(llama, tmp_path, sites=[SITE], corpus=str(corpus_dir),
                                progress=False, **STREAM)[SITE]
    rows = torch.from_numpy(store[0:len(store)]).float()  # (N, d) in corpus order
    drawn = torch.cat(list(stream(llama, corpus_dir)))
    assert len(drawn) == len(rows) // ROWS * ROWS  # the last partial batch is dropped
    # Equal rows occur (the same token right after BOS): compare multisets of rows.
    _, ids = torch.unique(torch.cat([rows, drawn]), dim=0, return_inverse=True)
    have = torch.bincount(ids[: len(rows)], minlength=int(ids.max()) + 1)
    took = torch.bincount(ids[len(rows):], minlength=int(ids.max()) + 1)
    assert (took <= have).all()  # stored rows, each drawn at most as often as stored
    where = (drawn[:, None, :] == rows[None]).all(-1)  # (drawn, N)
    order = where.float().argmax(1)  # the first stored row equal to each drawn row
    assert not torch.equal(order, torch.arange(len(order)))  # shuffled
    assert torch.equal(torch.cat(list(stream(llama, corpus_dir))), drawn)  # seeded
    assert not torch.equal(torch.cat(list(stream(llama, corpus_dir, buffer_seed=1))), drawn)
    # The buffer mixes rows from at most buffer_rows + a pass ahead: the first batch comes
    # from the first refill only.
    first_refill = 3 * ROWS + 4 * 16
    assert order[:ROWS].max() < first_refill


class Crash(RuntimeError):
    pass


def crash_at_step(monkeypatch, step: int) -> None:
    real = train._train_step

    def crashing(sae, opt, sched, cfg, state, *args, **kw):
        if state["step"] == step:
            raise Crash(f"simulated crash at step {step}")
        return real(sae, opt, sched, cfg, state, *args, **kw)

    monkeypatch.setattr(train, "_train_step", crashing)


def test_stream_run_stopped_midway_resumes_to_the_uninterrupted_dictionary(
        llama, corpus_dir, tmp_path, monkeypatch):
    passes = count_passes(monkeypatch)
    whole = train_dictionary(stream(llama, corpus_dir), progress=False, **TRAIN)
    full_passes = len(passes)
    kw = dict(TRAIN, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=3)
    with monkeypatch.context() as m:
        crash_at_step(m, 7)  # after the checkpoint at step 6
        with pytest.raises(Crash):
            train_dictionary(stream(llama, corpus_dir), progress=False, **kw)
    saved = torch.load(tmp_path / "ckpt" / train.CHECKPOINT, weights_only=True)
    assert saved["step"] == 6 and 0 < saved["source"]["next_context"] < 40
    del passes[:]
    resumed = train_dictionary(stream(llama, corpus_dir), progress=False, **kw)
    same_dictionary(resumed.dictionary, whole.dictionary, atol=0)
    assert resumed.log["step"].tolist() == whole.log["step"].tolist()
    assert 0 < len(passes) < full_passes  # the stream continued; it did not replay the corpus


def test_resume_refuses_a_stream_with_other_settings(llama, corpus_dir, tmp_path):
    kw = dict(TRAIN, total_tokens=ROWS * 3, checkpoint_dir=str(tmp_path / "ckpt"))
    train_dictionary(stream(llama, corpus_dir), progress=False, **kw)
    with pytest.raises(StreamError, match="buffer_seed=0 \\(checkpoint\\) vs 1"):
        train_dictionary(stream(llama, corpus_dir, buffer_seed=1), progress=False, **kw)


# ReLU with a strong L1 and a high lr kills latents fast; resampling them draws from the torch
# RNG, so each site must keep its own RNG state.
RESAMPLING = dict(architecture="standard", l1_coefficient=3.0, lr=0.05, warmup_steps=0,
                  resample_every=3, expansion=4)


@pytest.mark.parametrize("kw", [{}, RESAMPLING], ids=["topk", "relu_resampling"])
def test_many_sites_in_one_pass_equal_separate_runs(llama, corpus_dir, monkeypatch, kw):
    kw = dict(TRAIN, **kw)
    resampled = []
    real = train._resample_dead
    monkeypatch.setattr(train, "_resample_dead", lambda sae, opt, x, y, x_hat, dead: (
        resampled.append(int(dead.sum())), real(sae, opt, x, y, x_hat, dead)))
    passes = count_passes(monkeypatch)
    together = train_sites(stream(llama, corpus_dir, SITES), progress=False, **kw)
    assert (sum(resampled) > 0) == ("resample_every" in kw)
    one_pass = len(passes)
    del passes[:]
    for site in SITES:
        alone = train_dictionary(stream(llama, corpus_dir, [site]), progress=False, **kw)
        same_dictionary(together[site].dictionary, alone.dictionary)
        assert together[site].dictionary.metadata["site"] == site
    assert len(passes) == 2 * one_pass  # one forward pass per refill serves both sites
    diff = (together[SITES[0]].dictionary.W_dec - together[SITES[1]].dictionary.W_dec).abs()
    assert diff.max() > 0.01  # two different dictionaries, not one trained twice


def test_transcoders_and_saes_in_one_pass_equal_separate_runs(llama, corpus_dir):
    """A transcoder (one site in, another out) and an SAE trained together on one stream: each
    equals its own run on the same rows (the pairs fed to train_dictionary by hand)."""
    pairs = {"tc": (SITES[0], SITES[1]), "sae": SITES[1]}
    together = train_sites(stream(llama, corpus_dir, SITES), progress=False,
                           dictionaries=pairs, **TRAIN)
    pair_rows = ((b[SITES[0]], b[SITES[1]]) for b in stream(llama, corpus_dir, SITES))
    alone = train_dictionary(pair_rows, progress=False, **TRAIN)
    same_dictionary(together["tc"].dictionary, alone.dictionary)
    assert not together["tc"].dictionary.apply_b_dec_to_input  # read as a transcoder
    meta = together["tc"].dictionary.metadata
    assert (meta["site"], meta["target_site"]) == (SITES[0], SITES[1])
    sae = train_dictionary(stream(llama, corpus_dir, [SITES[1]]), progress=False, **TRAIN)
    same_dictionary(together["sae"].dictionary, sae.dictionary)
    with pytest.raises(TrainingError, match="reads site 'mlp_out_layer0', which the batches"):
        train_sites(stream(llama, corpus_dir, SITES), progress=False,
                    dictionaries={"tc": (SITES[0], "mlp_out_layer0")}, **TRAIN)


def test_many_sites_resume_after_a_crash(llama, corpus_dir, tmp_path, monkeypatch):
    whole = train_sites(stream(llama, corpus_dir, SITES), progress=False, **TRAIN)
    kw = dict(TRAIN, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=4)
    with monkeypatch.context() as m:
        crash_at_step(m, 9)
        with pytest.raises(Crash):
            train_sites(stream(llama, corpus_dir, SITES), progress=False, **kw)
    resumed = train_sites(stream(llama, corpus_dir, SITES), progress=False, **kw)
    for site in SITES:
        same_dictionary(resumed[site].dictionary, whole[site].dictionary, atol=0)


def test_bad_inputs_get_clear_errors(llama, corpus_dir, tmp_path):
    with pytest.raises(SiteError, match="Unknown site 'nowhere'"):
        stream(llama, corpus_dir, ["nowhere"])
    with pytest.raises(SiteError, match="valid layers are 0..2"):
        stream(llama, corpus_dir, [SITE, "resid_out_layer99"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CorpusError, match="no .txt files"):
        stream(llama, empty)
    (empty / "blank.txt").write_text("   \n", encoding="utf-8")
    with pytest.raises(CorpusError):
        stream(llama, empty)
    with pytest.raises(StreamError, match="buffer_rows=16 is smaller than one batch "
                                          "\\(batch_rows=32\\)"):
        stream(llama, corpus_dir, buffer_rows=16)
    with pytest.raises(StreamError, match="batch_rows=0"):
        stream(llama, corpus_dir, batch_rows=0)
    with pytest.raises(StreamError, match="mode='sentences'"):
        stream(llama, corpus_dir, mode="sentences")
    with pytest.raises(TrainingError, match="For one site use train_dictionary"):
        train_sites(stream(llama, corpus_dir), progress=False, **TRAIN)
    too_few = stream(llama, corpus_dir, n_tokens=16, batch_rows=ROWS)  # 15 rows < one batch
    with pytest.raises(StreamError, match="give 15 rows, fewer than one batch"):
        train_dictionary(too_few, progress=False, **TRAIN)


@pytest.mark.slow
def test_two_ranks_streaming_equal_one_process(llama, model_dirs, corpus_dir, tmp_path):
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", __file__, str(model_dirs["llama"]),
                             str(corpus_dir), str(tmp_path)], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"torchrun ran over 240 s:\n{proc.communicate()[0][-3000:]}")
    assert proc.returncode == 0, output[-4000:]
    one = train_dictionary(stream(llama, corpus_dir), progress=False, **TRAIN).dictionary
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for name, p in one.state_dict().items():
        assert torch.equal(ranks[0][name], ranks[1][name])
        torch.testing.assert_close(ranks[0][name], p, atol=1e-5, rtol=0, msg=name)


if __name__ == "__main__":  # the worker of the two-rank test
    torch.set_num_threads(1)
    import sae_nb

    model_dir, corpus, out = sys.argv[1:4]
    result = train_dictionary(stream(sae_nb.load_model(model_dir), corpus), progress=False,
                              **TRAIN)
    torch.save(result.dictionary.state_dict(), Path(out) / f"rank{os.environ['RANK']}.pt")
