"""The training notebook's helpers: store lookup, the held-out split, names, checkpoints, figures.

The store here is written directly with StoreWriter: contexts of 8 tokens whose rows number
6 or 7 (a document separator inside a context is not stored, as in notebook 01), and column 0
of every row holds its row number, so a training batch that reaches a held-out row shows.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

import sae_nb
from sae_nb import (
    StoreError,
    TrainConfig,
    TrainingError,
    checkpoint_dir,
    dictionary_name,
    dictionary_path,
    folder_files,
    heldout_split,
    open_store,
    train_dictionary,
)
from sae_nb.activations.store import INDEX_DTYPE, ActivationStore, StoreWriter
from sae_nb.views import plotting

CTX_LEN, D, BOS = 8, 4, 256
N_CONTEXTS = 20


def write_store(run_dir: Path, site: str = "resid_out_layer1", mode: str = "tokens",
                model: str = "tiny") -> ActivationStore:
    header = {"model": model, "site": site, "module": "m", "io": "output", "d": D,
              "dtype": "float32", "tokenizer": "bytes", "mode": mode, "pool": None,
              "ctx_len": CTX_LEN, "corpus": "docs", "text_column": None, "seed": 0,
              "prepend_bos": True, "exclude_bos": True, "bos_token_id": BOS}
    writer = StoreWriter(run_dir / "activations" / site, header)
    row = 0
    for shard in np.array_split(np.arange(N_CONTEXTS), 3):  # shards cross the split
        index = []
        for c in shard:  # offset 0 is BOS; every third context has a separator at offset 4
            offsets = [o for o in range(1, CTX_LEN) if not (c % 3 == 0 and o == 4)]
            for o in offsets:
                index.append((100 + 10 * c + o, c, o, c, o))
        index = np.array(index, dtype=INDEX_DTYPE)
        acts = np.zeros((len(index), D), dtype=np.float32)
        acts[:, 0] = np.arange(row, row + len(index))
        acts[:, 1:] = np.random.default_rng(row).normal(size=(len(index), D - 1))
        writer.write_shard(acts, index, units_end=int(shard[-1]) + 1)
        row += len(index)
    writer.finish()
    return ActivationStore(run_dir / "activations" / site)


@pytest.fixture
def store(tmp_path: Path) -> ActivationStore:
    return write_store(tmp_path)


# -- the store and the split ------------------------------------------------------------------

def test_open_store_finds_the_site_and_checks_the_model(tmp_path: Path, store):
    assert open_store(tmp_path, "resid_out_layer1", "tiny").path == store.path
    with pytest.raises(StoreError, match=r"resid_out_layer9.*\['resid_out_layer1'\]"):
        open_store(tmp_path, "resid_out_layer9")
    with pytest.raises(StoreError, match="Set model to 'tiny'"):
        open_store(tmp_path, "resid_out_layer1", "smollm2-135m")


@pytest.mark.parametrize("heldout_tokens", [1, 6, 7, 20, 50])
def test_heldout_rows_are_whole_contexts_disjoint_from_training(store, heldout_tokens):
    split = heldout_split(store, heldout_tokens, n_contexts=1)
    contexts = store.index()["context"]
    train, heldout = contexts[split.train_rows], contexts[split.heldout_rows]
    assert len(heldout) >= heldout_tokens and len(train) + len(heldout) == len(store)
    assert train.max() < heldout.min()  # no context on both sides
    assert len(heldout) - heldout_tokens < CTX_LEN  # widened by less than one context
    assert set(split.ce_contexts) <= set(heldout) and not set(split.ce_contexts) & set(train)
    np.testing.assert_array_equal(split.heldout_acts.numpy(), store[split.heldout_rows])


def test_ce_tokens_are_the_heldout_contexts_with_bos(store):
    split = heldout_split(store, 30, n_contexts=3)
    tokens = split.ce_tokens
    assert tokens.shape == (3, CTX_LEN) and tokens.dtype == torch.int64
    for context, row in zip(split.ce_contexts, tokens.tolist()):
        expected = [BOS if o == 0 or (context % 3 == 0 and o == 4) else 100 + 10 * context + o
                    for o in range(CTX_LEN)]
        assert row == expected
    assert split.bos_token_id == BOS
    assert heldout_split(store, 30, n_contexts=0).ce_tokens is None


def test_train_batches_never_reach_heldout_rows_and_do_not_end(store):
    split = heldout_split(store, 40, n_contexts=2)
    seen = torch.cat([b for _, b in zip(range(30), split.train_batches(16, seed=3))])
    assert len(seen) == 30 * 16 > split.boundary  # several epochs
    rows = seen[:, 0].long()
    assert rows.max() < split.boundary
    assert set(rows.tolist()) == set(range(split.boundary))  # every training row is used


def test_split_summary_and_metadata(store):
    split = heldout_split(store, 20, n_contexts=2)
    summary = split.summary()
    assert summary["rows"].sum() == len(store)
    assert summary.loc["held out", "contexts for CE"] == 2
    assert summary["contexts"].sum() == N_CONTEXTS
    meta = split.metadata(batch_size=16)
    assert meta["train_rows"] == split.boundary and meta["batch_size"] == 16
    assert meta["train_rows"] + meta["heldout_rows"] == len(store)


def test_split_errors_name_the_fix(store, tmp_path: Path):
    for bad in (0, len(store)):
        with pytest.raises(StoreError, match="heldout_tokens"):
            heldout_split(store, bad, 1)
    with pytest.raises(StoreError, match="Lower heldout_tokens"):
        heldout_split(store, len(store) - 2, 1)  # the boundary falls back to row 0
    with pytest.raises(StoreError, match="raise heldout_tokens or lower ce_contexts"):
        heldout_split(store, 10, 5)
    with pytest.raises(StoreError, match="lower batch_size"):
        heldout_split(store, 10, 1).train_batches(10_000)
    sentences = write_store(tmp_path / "s", mode="sentences")
    with pytest.raises(StoreError, match="Set ce_contexts to 0"):
        heldout_split(sentences, 10, 1)
    assert heldout_split(sentences, 10, 0).ce_tokens is None


class Interrupted(Exception):
    pass


def test_an_interrupted_store_is_refused_unless_partial_is_asked_for(llama, corpus_dir,
                                                                      tmp_path: Path, monkeypatch):
    """A real extraction stopped after 3 of its 10 shards: 6 of 20 contexts."""
    site = "resid_out_layer1"
    run = dict(sites=[site], corpus=str(corpus_dir), n_tokens=320, ctx_len=16, batch_size=2,
               dtype="float32", shard_rows=20, progress=False)
    real, written = StoreWriter.write_shard, []

    def crash_after_three(self, *args, **kwargs):
        if len(written) == 3:
            raise Interrupted
        written.append(1)
        return real(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(StoreWriter, "write_shard", crash_after_three)
        with pytest.raises(Interrupted):
            sae_nb.extract_activations(llama, tmp_path, **run)
    folder = tmp_path / "activations" / site
    rows = sum(len(np.load(f)) for f in folder.glob("shard_*.index.npy"))
    assert 6 * (16 - 1) - 6 <= rows <= 6 * (16 - 1)  # 15 a context, less document separators
    for opener in (lambda: open_store(tmp_path, site), lambda: sae_nb.open_stores(tmp_path),
                   lambda: ActivationStore(folder)):
        with pytest.raises(StoreError) as err:
            opener()
        message = str(err.value)
        assert "incomplete" in message and f"{rows} rows" in message
        assert "6 of 20 contexts" in message and f"about {round(rows * 20 / 6):,} rows" in message
        assert "notebook 01" in message and "allow_partial=True" in message
    with pytest.warns(UserWarning, match="6 of 20 contexts"):
        partial = open_store(tmp_path, site, allow_partial=True)
    assert len(partial) == rows
    split = heldout_split(partial, 30, 1)
    assert split.boundary + len(split.heldout_acts) == rows

    sae_nb.extract_activations(llama, tmp_path, **run)  # the rerun resumes and completes it
    full = sum(len(np.load(f)) for f in folder.glob("shard_*.index.npy"))
    assert len(open_store(tmp_path, site)) == full > rows


# -- names, folders, checkpoints --------------------------------------------------------------

@pytest.mark.parametrize("options, expected", [
    ({"architecture": "topk", "k": 32}, "topk_4608_k32"),
    ({"architecture": "batchtopk", "k": 16, "expansion": 4}, "batchtopk_2304_k16"),
    ({"architecture": "standard", "l1_coefficient": 0.4}, "standard_4608_l1_0.4"),
    ({"architecture": "jumprelu", "l0_coefficient": 1e-3}, "jumprelu_4608_l0_0.001"),
])
def test_dictionary_name(options, expected):
    assert dictionary_name(TrainConfig(**options), 576) == expected


def test_dictionary_path(tmp_path: Path):
    assert dictionary_path("d", "smollm2-135m", "resid_out_layer6", "topk_4608_k32") == \
        Path("d/smollm2-135m/resid_out_layer6/topk_4608_k32")
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    path = dictionary_path("d", str(model_dir), "model.layers.1:input", "x")
    assert path == Path("d/my-model/model.layers.1_input/x")


def test_checkpoint_dir_resumes_the_same_run_and_refuses_another(tmp_path: Path, store):
    split = heldout_split(store, 20, 0)
    config = TrainConfig(expansion=2, k=2, total_tokens=64, checkpoint_every=2, device="cpu",
                         metadata=split.metadata(16))
    folder = checkpoint_dir(tmp_path, "topk_8_k2", config)
    assert folder == str(tmp_path / "checkpoints" / "topk_8_k2")
    first = train_dictionary(split.train_batches(16), config, progress=False,
                             checkpoint_dir=folder)
    assert (Path(folder) / "checkpoint.pt").exists()
    # The same settings (where and how often it checkpoints aside) resume the finished run.
    again = TrainConfig(**{**config.__dict__, "checkpoint_every": 5, "device": "cpu"})
    assert checkpoint_dir(tmp_path, "topk_8_k2", again) == folder
    second = train_dictionary(split.train_batches(16), again, progress=False,
                              checkpoint_dir=folder)
    torch.testing.assert_close(second.dictionary.W_dec, first.dictionary.W_dec)
    pd.testing.assert_frame_equal(second.log, first.log)
    changed = TrainConfig(**{**config.__dict__, "total_tokens": 128})
    with pytest.raises(TrainingError, match=r"total_tokens=64 \(checkpoint\) vs 128"):
        checkpoint_dir(tmp_path, "topk_8_k2", changed)
    other_batches = TrainConfig(**{**config.__dict__, "metadata": split.metadata(32)})
    with pytest.raises(TrainingError, match="batch_size"):
        checkpoint_dir(tmp_path, "topk_8_k2", other_batches)
    assert checkpoint_dir(tmp_path, "another", changed).endswith("another")


def test_a_checkpoint_from_before_clipping_is_refused_by_name_and_resumes_unclipped(
        tmp_path, store):
    split = heldout_split(store, 20, 0)
    old = TrainConfig(expansion=2, k=2, total_tokens=64, checkpoint_every=2, device="cpu",
                      metadata=split.metadata(16), grad_clip_norm=None)
    folder = checkpoint_dir(tmp_path, "old", old)
    first = train_dictionary(split.train_batches(16), old, progress=False, checkpoint_dir=folder)
    # Written by a version without the setting: the key is missing from the saved config.
    file = Path(folder) / "checkpoint.pt"
    payload = torch.load(file, weights_only=True)
    del payload["config"]["grad_clip_norm"]
    torch.save(payload, file)
    default = TrainConfig(**{**old.__dict__, "grad_clip_norm": 0.05})
    with pytest.raises(TrainingError, match=r"grad_clip_norm=None \(checkpoint\) vs 0\.05 \(now\)"
                                            r".*Pass the checkpoint's values"):
        checkpoint_dir(tmp_path, "old", default)
    resumed = train_dictionary(split.train_batches(16), old, progress=False,
                               checkpoint_dir=checkpoint_dir(tmp_path, "old", old))
    torch.testing.assert_close(resumed.dictionary.W_dec, first.dictionary.W_dec)


class Malicious:
    """Unpickling this would create a folder: the proof that a checkpoint ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_checkpoint_dir_refuses_damaged_or_malicious_checkpoints(tmp_path: Path, store):
    split = heldout_split(store, 20, 0)
    config = TrainConfig(expansion=2, k=2, total_tokens=64, checkpoint_every=2, device="cpu",
                         metadata=split.metadata(16))
    folder = Path(checkpoint_dir(tmp_path, "good", config))
    train_dictionary(split.train_batches(16), config, progress=False, checkpoint_dir=str(folder))
    good = (folder / "checkpoint.pt").read_bytes()
    marker = tmp_path / "code_ran"
    evil_zip = tmp_path / "evil.pt"
    torch.save({"config": Malicious(marker), "model": {}}, evil_zip)
    damaged = {
        "truncated": good[: len(good) // 2],
        "random_bytes": np.random.default_rng(0).bytes(4096),
        "raw_pickle": pickle.dumps(Malicious(marker)),
        "torch_zip_with_code": evil_zip.read_bytes(),
        "no_config": _torch_bytes({"weights": torch.zeros(3)}, tmp_path / "other.pt"),
        "empty": b"",
    }
    for name, data in damaged.items():
        bad = tmp_path / "checkpoints" / name / "checkpoint.pt"
        bad.parent.mkdir(parents=True)
        bad.write_bytes(data)
        with pytest.raises(TrainingError) as err:
            checkpoint_dir(tmp_path, name, config)
        message = str(err.value)
        assert str(bad) in message, name
        assert "Delete the folder" in message and "another name" in message, name
        assert not marker.exists(), f"{name}: loading the checkpoint ran its code"


def _torch_bytes(value, path: Path) -> bytes:
    torch.save(value, path)
    return path.read_bytes()


def test_save_trained_records_what_the_store_and_evaluation_say(tmp_path: Path, store):
    split = heldout_split(store, heldout_tokens=40, n_contexts=0)
    result = train_dictionary(split.train_batches(32), d_sae=8, k=2, total_tokens=32 * 4,
                              progress=False, metadata=split.metadata(32))
    evaluation = sae_nb.evaluate_dictionary(result.dictionary, split.heldout_acts)
    folder = sae_nb.save_trained(result, tmp_path / "dicts", "mine", store, evaluation)
    assert folder == tmp_path / "dicts" / "tiny" / "resid_out_layer1" / "mine"
    loaded = sae_nb.load_sae_nb(folder)
    assert loaded.metadata["model"] == "tiny" and loaded.metadata["site"] == "resid_out_layer1"
    assert loaded.metadata["metrics"]["fvu"] == pytest.approx(
        float(evaluation.metrics["fvu"].iloc[0]))
    assert loaded.metadata["train_config"]["k"] == 2
    cfg = __import__("json").loads((folder / "cfg.json").read_text())
    assert cfg["metadata"]["context_size"] == CTX_LEN and cfg["metadata"]["dataset_path"] == "docs"
    x = split.heldout_acts
    torch.testing.assert_close(loaded.encode(x), result.dictionary.encode(x))


def test_folder_files(tmp_path: Path):
    (tmp_path / "b.json").write_text("{}")
    (tmp_path / "a.bin").write_bytes(b"x" * 2048)
    (tmp_path / "sub").mkdir()
    files = folder_files(tmp_path)
    assert files["file"].tolist() == ["a.bin", "b.json"] and files["KB"].iloc[0] == 2.0


# -- figures ----------------------------------------------------------------------------------

def training_log(steps: int = 12) -> pd.DataFrame:
    step = np.arange(1, steps + 1)
    return pd.DataFrame({"step": step, "tokens": 256 * step, "loss": 1 / step, "mse": 1 / step,
                         "l0": np.full(steps, 8.0), "fvu": 0.5 / step,
                         "dead_frac": np.linspace(0, 0.1, steps), "lr": np.full(steps, 1e-3)})


def test_training_curves_figure_plots_each_column_against_tokens():
    log = training_log()
    fig = plotting.training_curves_figure(log)
    assert isinstance(fig, go.Figure) and len(fig.data) == 4
    for trace, (column, _, _) in zip(fig.data, plotting.TRAINING_PANELS):
        np.testing.assert_array_equal(trace.x, log["tokens"])
        np.testing.assert_array_equal(trace.y, log[column])
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis3.type == "log"  # loss and FVU
    assert fig.layout.yaxis2.type != "log"
    with pytest.raises(ValueError, match="fvu"):
        plotting.training_curves_figure(log.drop(columns="fvu"))
    with pytest.raises(ValueError, match="empty"):
        plotting.training_curves_figure(log.iloc[:0])


def test_density_histogram_counts_alive_and_dead_latents_separately():
    density = np.concatenate([np.zeros(7), np.full(20, 1e-3), np.full(10, 0.1), np.ones(3)])
    log10 = np.log10(density + 1e-10)  # as Evaluation.log10_density()
    fig = plotting.density_histogram_figure(log10, bins=10)
    alive, dead = fig.data
    assert alive.name == "alive" and dead.name == "dead"
    assert sum(alive.y) == 33 and list(dead.y) == [7]
    assert max(dead.x) < min(alive.x)  # the dead bar sits left of every alive bin
    assert "7 dead" in fig.layout.title.text and "33 alive" in fig.layout.title.text
    assert fig.layout.annotations[0].text == "dead: 7 (17.5%)"  # 7 of 40
    one = plotting.density_histogram_figure(np.log10(np.r_[0.0, np.full(4607, 0.01)] + 1e-10))
    assert one.layout.annotations[0].text == "dead: 1 (0.022%)"  # not 0.0%: 1 / 4,608


def test_density_histogram_with_no_dead_or_no_alive_latents():
    fig = plotting.density_histogram_figure(np.full(5, -2.0))
    assert sum(fig.data[0].y) == 5 and list(fig.data[1].y) == [0]
    fig = plotting.density_histogram_figure(np.full(5, -10.0))
    assert sum(fig.data[0].y) == 0 and list(fig.data[1].y) == [5]
