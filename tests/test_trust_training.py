"""Training that must not silently continue on the wrong data or race another training.

A checkpoint names its data by content (the store's shard checksums, the first batch's
SHA-256), so a store extracted again with another seed, or another iterator, is refused rather
than resumed; one training holds its checkpoint folder for the whole run; a batch size below
one row is refused by name.

The stores here are written directly with StoreWriter: 20 contexts of 8 tokens (7 rows each
after BOS), their values drawn from a seed, so two stores of one header can hold the same number
of rows and different activations, as two extractions with different seeds do.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_nb.__main__ import main
from sae_nb.activations.store import INDEX_DTYPE, ActivationStore, StoreWriter
from sae_nb.training import trainer
from sae_nb.training.distributed import DistributedError, RankBatches
from sae_nb.training.streaming import train_sites
from sae_nb.training.trainer import TrainingError, train_dictionary
from sae_nb.util.io import hold_lock

SITE, D, CTX_LEN, N_CONTEXTS = "resid_out_layer1", 6, 8, 20
ROWS = N_CONTEXTS * (CTX_LEN - 1)  # BOS rows are not stored


def write_store(run_dir: Path, seed: int, change_row: int | None = None) -> ActivationStore:
    """A finished store of ROWS rows whose values come from ``seed`` (the extraction's seed,
    recorded in the header); ``change_row`` adds 1 to one value of that row."""
    header = {"model": "tiny", "site": SITE, "module": "m", "io": "output", "d": D,
              "dtype": "float32", "tokenizer": "bytes", "mode": "tokens", "pool": None,
              "ctx_len": CTX_LEN, "corpus": "docs", "text_column": None, "seed": seed,
              "prepend_bos": True, "exclude_bos": True, "bos_token_id": 256}
    acts = np.random.default_rng(seed).normal(size=(ROWS, D)).astype(np.float32)
    if change_row is not None:
        acts[change_row, 0] += 1.0
    writer = StoreWriter(run_dir / "activations" / SITE, header, overwrite=True)
    row = 0
    for shard in np.array_split(np.arange(N_CONTEXTS), 4):
        index = np.array([(100 + o, c, o, c, o) for c in shard for o in range(1, CTX_LEN)],
                         dtype=INDEX_DTYPE)
        writer.write_shard(acts[row:row + len(index)], index, units_end=int(shard[-1]) + 1)
        row += len(index)
    writer.finish()
    return ActivationStore(run_dir / "activations" / SITE)


TRAIN = ["--model", "tiny", "--site", SITE, "--name", "mine", "--train-only", "--device", "cpu",
         "--architecture", "topk", "--expansion", "2", "--k", "2", "--total-tokens", "128",
         "--batch-size", "16", "--heldout-tokens", "21", "--ce-contexts", "0",
         "--checkpoint-every", "4", "--no-progress"]


def train_cli(run_dir: Path, *extra: str) -> int:
    return main(["train", "--run-dir", str(run_dir), *TRAIN, *extra])


def test_a_store_extracted_again_with_another_seed_is_not_resumed(tmp_path, capsys):
    """A store extracted again: same model, site, corpus, ctx_len and row count, other rows."""
    first = write_store(tmp_path, seed=0)
    assert train_cli(tmp_path) == 0
    folder = tmp_path / "checkpoints" / "mine"
    saved = torch.load(folder / trainer.CHECKPOINT, weights_only=True)
    assert saved["step"] == 8
    # The same store again: the finished run is resumed (nothing to redo), as before.
    assert train_cli(tmp_path) == 0
    capsys.readouterr()
    second = write_store(tmp_path, seed=1)
    assert len(second) == len(first) and not np.array_equal(second[:], first[:])
    assert train_cli(tmp_path) == 1
    err = capsys.readouterr().err
    assert str(folder) in err and "other data" in err
    assert "--name" in err and "delete the folder" in err
    # The fix it names works: another name trains afresh on the new rows.
    assert train_cli(tmp_path, "--name", "mine_seed1") == 0


def test_the_store_checksums_name_the_data_beyond_the_first_batch(tmp_path):
    """Two stores differing in one row that the first batch does not hold: the first batch's
    digest cannot tell them apart, the store's shard checksums can."""
    train_rows = slice(0, 120)
    order = np.random.default_rng(0).permutation(120)  # RankBatches' first epoch, seed 0
    unseen = int(order[16:][0])  # a training row outside the first batch of 16
    a = write_store(tmp_path / "a", seed=0)
    b = write_store(tmp_path / "b", seed=0, change_row=unseen)
    first_a, first_b = (next(iter(RankBatches(s, 16, rows=train_rows))) for s in (a, b))
    assert torch.equal(first_a, first_b)  # the same first batch
    folder = tmp_path / "ckpt"
    common = dict(architecture="topk", d_sae=12, k=2, total_tokens=16 * 6, checkpoint_every=2,
                  progress=False, device="cpu", checkpoint_dir=str(folder))
    train_dictionary(RankBatches(a, 16, rows=train_rows), **common)
    with pytest.raises(TrainingError) as err:
        train_dictionary(RankBatches(b, 16, rows=train_rows), **common)
    message = str(err.value)
    assert str(folder) in message and "shard_checksums" in message
    assert "delete the folder" in message and "checkpoint_dir" in message
    # The identity is the recorded checksums: those of b's manifest, not a's.
    sha = [sorted(s["sha256"].values()) for s in b.manifest["shards"]]
    assert sha != [sorted(s["sha256"].values()) for s in a.manifest["shards"]]


def batches_of(x: torch.Tensor, batch: int = 16):
    while True:
        yield from x.split(batch)


def test_a_plain_iterator_of_other_data_is_not_resumed(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, other = torch.randn(160, D, generator=g), torch.randn(160, D, generator=g)
    folder = tmp_path / "ckpt"
    common = dict(architecture="topk", d_sae=12, k=2, total_tokens=16 * 8, checkpoint_every=2,
                  progress=False, device="cpu", checkpoint_dir=str(folder))
    done = train_dictionary(batches_of(x), **common)
    again = train_dictionary(batches_of(x), **common)  # the same data: resumed, the same result
    assert torch.equal(again.dictionary.W_dec, done.dictionary.W_dec)
    with pytest.raises(TrainingError) as err:
        train_dictionary(batches_of(other), **common)
    message = str(err.value)
    # The digest it compares is the SHA-256 of the first batch's float32 bytes.
    digest = hashlib.sha256(other[:16].numpy().tobytes() + other[:16].numpy().tobytes())
    assert str(folder) in message and "first batch" in message
    assert digest.hexdigest()[:16] in message
    assert "delete the folder" in message and "checkpoint_dir" in message


def test_train_sites_refuses_other_data_too(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, other = torch.randn(160, D, generator=g), torch.randn(160, D, generator=g)
    folder = tmp_path / "ckpt"
    common = dict(architecture="topk", d_sae=12, k=2, total_tokens=16 * 4, progress=False,
                  device="cpu", checkpoint_dir=str(folder))
    sites = lambda a, b: ({"s0": p, "s1": q} for p, q in zip(batches_of(a), batches_of(b)))  # noqa: E731
    train_sites(sites(x, other), **common)
    train_sites(sites(x, other), **common)  # the same data resumes
    with pytest.raises(TrainingError, match="other data"):
        train_sites(sites(x, x), **common)  # site s1 now reads other rows


@pytest.mark.parametrize("driver", ["train_dictionary", "train_sites"])
def test_a_second_training_into_a_held_checkpoint_folder_is_refused(tmp_path, monkeypatch,
                                                                      driver):
    """Two trainings into one folder at once: the second (started while the first is inside a
    step) is refused naming the folder; the first finishes and its checkpoint stays."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(160, D, generator=g)
    folder = tmp_path / "checkpoints" / "mine"
    common = dict(architecture="topk", d_sae=12, k=2, total_tokens=16 * 4, checkpoint_every=1,
                  progress=False, device="cpu", checkpoint_dir=str(folder))
    train = train_dictionary if driver == "train_dictionary" else train_sites
    source = (lambda: batches_of(x)) if driver == "train_dictionary" else \
        (lambda: ({"s0": b} for b in batches_of(x)))
    real_step, started, refused = trainer.Training.step, [], []

    def step_and_start_another(self, *args, **kwargs):
        if not started:  # the first run's first step, before it wrote any checkpoint
            started.append(True)
            try:
                train(source(), **{**common, "seed": 1})  # the other training, started now
                refused.append(None)
            except TrainingError as err:
                refused.append(str(err))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(trainer.Training, "step", step_and_start_another)
    first = train(source(), **common)
    assert refused[0] is not None, "the second training ran into the held folder"
    assert str(folder) in refused[0] and "another training" in refused[0]
    assert "another name" in refused[0] or "--name" in refused[0]
    monkeypatch.undo()
    file = folder / (trainer.CHECKPOINT if driver == "train_dictionary" else "sites_checkpoint.pt")
    saved = torch.load(file, weights_only=True)
    assert saved["config"]["seed"] == 0  # the first run's checkpoint, not the intruder's
    # Released at the end: a later run into the folder resumes the finished one.
    again = train(source(), **common)
    w = (lambda r: r.dictionary.W_dec) if driver == "train_dictionary" else \
        (lambda r: r["s0"].dictionary.W_dec)
    assert torch.equal(w(again), w(first))


@pytest.mark.parametrize("size", [0, -16])
def test_a_batch_size_below_one_row_is_refused_by_name(tmp_path, size):
    store = write_store(tmp_path, seed=0)
    with pytest.raises(DistributedError) as err:
        RankBatches(store, size)
    message = str(err.value)
    assert f"batch_size={size}" in message and "at least 1" in message
    assert "--batch-size" in message


def test_train_with_batch_size_zero_names_the_option(tmp_path, capsys):
    write_store(tmp_path, seed=0)
    assert train_cli(tmp_path, "--batch-size", "0") == 1
    err = capsys.readouterr().err
    assert "batch_size=0" in err and "--batch-size" in err and "Traceback" not in err


def test_checkpoint_records_the_data_identity(tmp_path):
    """What the checkpoint holds to name its data: the source's identity (the store's) and the
    first batch's digest."""
    store = write_store(tmp_path, seed=0)
    folder = tmp_path / "ckpt"
    train_dictionary(RankBatches(store, 16, rows=slice(0, 120)), architecture="topk", d_sae=12,
                     k=2, total_tokens=32, progress=False, device="cpu",
                     checkpoint_dir=str(folder))
    data = torch.load(folder / trainer.CHECKPOINT, weights_only=True)["data"]
    shards = [(s["rows"], sorted(s["sha256"].values())) for s in store.manifest["shards"]]
    assert data["source"]["shard_checksums"] == \
        hashlib.sha256(json.dumps(shards).encode()).hexdigest()[:16]
    first = next(iter(RankBatches(store, 16, rows=slice(0, 120)))).numpy()
    assert data["first_batch"] == hashlib.sha256(first.tobytes() + first.tobytes()).hexdigest()[:16]


def test_the_train_command_names_a_held_checkpoint_folder_and_its_holder(tmp_path, capsys):
    write_store(tmp_path, seed=0)
    folder = tmp_path / "checkpoints" / "mine"
    folder.mkdir(parents=True)
    held = hold_lock(folder / trainer.TRAIN_LOCK)  # as another training's process holds it
    try:
        assert train_cli(tmp_path) == 1
    finally:
        held.close()
    err = capsys.readouterr().err
    assert str(folder) in err and f"pid {os.getpid()}" in err and "--name" in err
    assert not (folder / trainer.CHECKPOINT).exists()
    assert train_cli(tmp_path) == 0  # released: it trains


def test_a_checkpoint_from_before_data_identities_resumes_with_a_warning(tmp_path, caplog):
    """Judged: an older checkpoint cannot be checked; it resumes, and the log says so."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(160, D, generator=g)
    folder = tmp_path / "ckpt"
    common = dict(architecture="topk", d_sae=12, k=2, total_tokens=16 * 8, checkpoint_every=2,
                  progress=False, device="cpu", checkpoint_dir=str(folder))
    done = train_dictionary(batches_of(x), **common)
    payload = torch.load(folder / trainer.CHECKPOINT, weights_only=True)
    del payload["data"]
    torch.save(payload, folder / trainer.CHECKPOINT)
    with caplog.at_level("WARNING", logger="sae_nb.training.trainer"):
        again = train_dictionary(batches_of(x), **common)
    assert "written before checkpoints named their data" in caplog.text and str(folder) in \
        caplog.text
    assert torch.equal(again.dictionary.W_dec, done.dictionary.W_dec)


def test_an_unwritable_checkpoint_folder_is_named_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(TrainingError) as err:
        train_dictionary(batches_of(torch.randn(32, D)), architecture="topk", d_sae=12, k=2,
                         total_tokens=32, progress=False, device="cpu",
                         checkpoint_dir=str(blocker / "ckpt"))
    assert str(blocker / "ckpt") in str(err.value) and "checkpoint_dir" in str(err.value)


def _rate(base: float, d_sae: int) -> float:
    return base / (d_sae / 2**14) ** 0.5


def test_a_checkpoint_from_the_former_default_rate_is_refused_naming_it_and_resumes_given_it(
        tmp_path):
    """The default Adam rate changed (2e-4 -> 8e-4 / sqrt(d_sae / 2**14)). A checkpoint written
    before rates were recorded, with lr=None, trained at the former default: resuming it at the
    new one would mix two rates in one run, so it is refused naming both; given its rate, it
    resumes and ends where a run at that rate throughout ends."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(160, D, generator=g)
    old = _rate(2e-4, 12)
    common = dict(architecture="topk", d_sae=12, k=2, total_tokens=16 * 8, checkpoint_every=2,
                  progress=False, device="cpu")
    whole = train_dictionary(batches_of(x), lr=old, **common,
                             checkpoint_dir=str(tmp_path / "whole"))
    folder = tmp_path / "checkpoints" / "ckpt"  # where the command line keeps it
    train_dictionary(iter(list(x.split(16))[:4]), lr=old, **common, checkpoint_dir=str(folder))
    # What the code before recorded rates wrote: the config's lr None, no rate.
    payload = torch.load(folder / trainer.CHECKPOINT, weights_only=True)
    assert payload["step"] == 4 and payload["learning_rate"] == pytest.approx(old)
    payload["config"]["lr"] = None
    del payload["learning_rate"]
    torch.save(payload, folder / trainer.CHECKPOINT)
    with pytest.raises(TrainingError) as err:
        train_dictionary(batches_of(x), **common, checkpoint_dir=str(folder))
    message = str(err.value)
    assert str(folder / trainer.CHECKPOINT) in message
    assert f"{old:.6g}" in message and f"{_rate(8e-4, 12):.6g}" in message
    assert f"lr={old!r}" in message and "delete the folder" in message
    # The same refusal before training starts, from the command line's folder check.
    with pytest.raises(TrainingError, match="trained at learning rate"):
        trainer.checkpoint_dir(tmp_path, "ckpt", trainer.TrainConfig(**{
            k: v for k, v in common.items() if k != "progress"}))
    resumed = train_dictionary(batches_of(x), lr=old, **common, checkpoint_dir=str(folder))
    assert torch.equal(resumed.dictionary.W_dec, whole.dictionary.W_dec)
    assert torch.equal(resumed.dictionary.W_enc, whole.dictionary.W_enc)


def test_a_checkpoint_records_its_rate_so_a_later_default_change_is_caught(tmp_path,
                                                                          monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(160, D, generator=g)
    folder = tmp_path / "ckpt"
    common = dict(architecture="topk", d_sae=12, k=2, total_tokens=16 * 8, checkpoint_every=2,
                  progress=False, device="cpu", checkpoint_dir=str(folder))
    done = train_dictionary(iter(list(x.split(16))[:4]), **common)
    assert torch.load(folder / trainer.CHECKPOINT, weights_only=True)["learning_rate"] == \
        pytest.approx(_rate(8e-4, 12))
    # The rate it ran at, from the optimizer's own schedule: the log's peak.
    assert done.log["lr"].max() == pytest.approx(_rate(8e-4, 12))
    monkeypatch.setitem(trainer.LR_BASE, "adam", 1e-3)
    with pytest.raises(TrainingError, match=r"trained at learning rate 0\.0295603; .* 0\.03695"):
        train_dictionary(batches_of(x), **common)
