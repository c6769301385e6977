"""Reading the activation store: random access, shuffled batches, chunks, memory maps, errors.

The store here is written directly with StoreWriter, with shards of uneven sizes, and column 0
of every row holds its row number, so any mix-up of rows shows.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from sae_nb.activations.store import (
    INDEX_DTYPE,
    MANIFEST,
    STAMPS,
    ActivationStore,
    StoreError,
    StoreWriter,
    open_stores,
)
from sae_nb.util.io import folder_name

SHARD_ROWS = [7, 1, 12, 5, 9]  # uneven on purpose; 34 rows in all
N = sum(SHARD_ROWS)
D = 3


def header(site: str = "resid_out_layer1", dtype: str = "float32") -> dict:
    return {"model": "tiny", "site": site, "module": "model.layers.1", "io": "output", "d": D,
            "dtype": dtype, "tokenizer": "bytes", "mode": "tokens", "pool": None, "ctx_len": 8,
            "corpus": "docs", "text_column": None, "seed": 0, "prepend_bos": True,
            "exclude_bos": True, "bos_token_id": 256}


def rows_data(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row r holds (r, -2r, r + 0.25); its index says context r // 8, offset r % 8."""
    acts = np.stack([rows, -2.0 * rows, rows + 0.25], axis=1).astype(np.float32)
    index = np.zeros(len(rows), dtype=INDEX_DTYPE)
    index["token"], index["doc"], index["pos"] = rows % 250, rows // 10, rows % 10
    index["context"], index["offset"] = rows // 8, rows % 8
    return acts, index


def write_store(path, site="resid_out_layer1", dtype="float32") -> ActivationStore:
    writer = StoreWriter(path, header(site, dtype))
    start = 0
    for k, n in enumerate(SHARD_ROWS):
        acts, index = rows_data(np.arange(start, start + n))
        writer.write_shard(acts, index, units_end=k + 1)
        start += n
    writer.finish(n_units_total=len(SHARD_ROWS))
    return ActivationStore(path)


@pytest.fixture
def store(tmp_path) -> ActivationStore:
    return write_store(tmp_path / "store")


@pytest.fixture
def full() -> np.ndarray:
    return rows_data(np.arange(N))[0]


def test_store_is_memory_mapped_and_sized(store):
    assert len(store) == N and store.d == D and store.site == "resid_out_layer1"
    assert len(store._acts) == len(SHARD_ROWS)
    assert all(isinstance(a, np.memmap) for a in store._acts + store._index)
    assert [len(a) for a in store._acts] == SHARD_ROWS
    summary = store.summary()
    assert summary["rows"] == N and summary["shards"] == 5 and summary["complete"]


def test_random_access_equals_concatenated_data(store, full):
    for i in range(-N, N):
        np.testing.assert_array_equal(store[i], full[i])
    for sl in [slice(None), slice(3, 30), slice(5, 9), slice(None, None, 4), slice(30, 2, -3),
               slice(-5, None), slice(8, 8)]:
        np.testing.assert_array_equal(store[sl], full[sl])
    rng = np.random.default_rng(0)
    for size in (1, 5, N, 3 * N):  # any order, duplicates, across shards
        rows = rng.integers(0, N, size)
        np.testing.assert_array_equal(store[rows], full[rows])
        np.testing.assert_array_equal(store[list(rows)], full[rows])
    rows = np.array([33, 0, 7, 7, 6, 20, 8])  # shard boundaries, descending and repeated
    np.testing.assert_array_equal(store[rows], full[rows])
    assert store[np.array([], dtype=int)].shape == (0, D)
    assert store[rows].dtype == np.float32


def test_index_matches_rows(store):
    expected = rows_data(np.arange(N))[1]
    np.testing.assert_array_equal(store.index(), expected)
    np.testing.assert_array_equal(store.index(np.array([30, 2, 9])), expected[[30, 2, 9]])
    assert store.index(9)["context"] == 1 and store.index(9)["offset"] == 1


@pytest.mark.parametrize("rows", [N, -N - 1, np.array([0, N]), np.array([-1])])
def test_out_of_range_rows_raise(store, rows):
    message = "out of range" if isinstance(rows, int) else f"0..{N - 1}"
    with pytest.raises(IndexError, match=message):
        store[rows]


def first_column(batches) -> list[np.ndarray]:
    return [b[:, 0].numpy().astype(np.int64) for b in batches]


def test_shuffled_batches_cover_every_row_once_per_epoch(store, full):
    batches = list(store.batches(batch_size=8, shuffle=True, seed=1, epochs=3))
    assert [len(b) for b in batches] == [8, 8, 8, 8, 2] * 3
    for b in batches:  # whole rows travel together
        assert b.dtype == torch.float32
        np.testing.assert_array_equal(b.numpy(), full[b[:, 0].numpy().astype(int)])
    rows = first_column(batches)
    epochs = [np.concatenate(rows[i * 5 : (i + 1) * 5]) for i in range(3)]
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(N))
        assert epoch.tolist() != list(range(N))  # actually shuffled
    assert epochs[0].tolist() != epochs[1].tolist()  # each epoch reshuffles


def test_shuffle_is_deterministic_per_seed(store):
    a = np.concatenate(first_column(store.batches(8, seed=5)))
    b = np.concatenate(first_column(store.batches(8, seed=5)))
    c = np.concatenate(first_column(store.batches(8, seed=6)))
    np.testing.assert_array_equal(a, b)
    assert a.tolist() != c.tolist()
    assert sorted(c.tolist()) == list(range(N))


def test_unshuffled_batches_and_drop_last(store, full):
    ordered = np.concatenate([b.numpy() for b in store.batches(10, shuffle=False)])
    np.testing.assert_array_equal(ordered, full)
    dropped = list(store.batches(10, seed=0, drop_last=True, epochs=2))
    assert [len(b) for b in dropped] == [10, 10, 10] * 2
    assert len(set(np.concatenate(first_column(dropped[:3])).tolist())) == 30
    half = next(store.batches(4, dtype=torch.float16))
    assert half.dtype == torch.float16 and half.shape == (4, D)


def test_chunks_cover_everything_in_order(store, full):
    chunks = list(store.chunks(rows_per_chunk=10))
    assert [start for start, _ in chunks] == [0, 10, 20, 30]
    np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), full)
    assert len(list(store.chunks())) == 1


def test_float16_store_reads_as_float32(tmp_path, full):
    store = write_store(tmp_path / "half", dtype="float16")
    assert store._acts[0].dtype == np.float16
    assert store[:].dtype == np.float32
    np.testing.assert_array_equal(store[:], full.astype(np.float16).astype(np.float32))


def test_context_lists_rows_of_the_same_context(store):
    df = store.context(20, before=6, after=6)
    assert set(df["context"]) == {2}  # rows 16..23
    assert df["row"].tolist() == list(range(16, 24))
    assert df["offset"].tolist() == list(range(8))


def test_context_shows_each_token_and_its_norm(store):
    """Row r holds (r, -2r, r + 0.25): its norm is sqrt(5 r^2 + (r + 0.25)^2) in closed form."""

    class Tokenizer:  # decodes id i as "<i>", one call per distinct id
        def batch_decode(self, seqs):
            return [f"<{s[0]}>" for s in seqs]

    df = store.context(20, before=6, after=6, tokenizer=Tokenizer())
    rows = np.arange(16, 24)
    assert df["text"].tolist() == [f"<{r % 250}>" for r in rows]
    np.testing.assert_allclose(df["norm"], np.sqrt(5 * rows**2 + (rows + 0.25) ** 2), atol=0.006)
    assert "text" not in store.context(20).columns


def test_open_stores_keys_by_site(tmp_path):
    for site in ("embed", "model.layers.1.mlp:input"):
        write_store(tmp_path / "activations" / folder_name(site), site=site)
    stores = open_stores(tmp_path)
    assert set(stores) == {"embed", "model.layers.1.mlp:input"}
    assert all(len(s) == N for s in stores.values())
    with pytest.raises(StoreError, match="No activation stores under"):
        open_stores(tmp_path / "elsewhere")


def test_shard_written_but_not_in_manifest_is_ignored(tmp_path, full):
    """A crash between a shard's rename and the manifest update leaves an orphan shard."""
    store = write_store(tmp_path / "s")
    np.save(store.path / "shard_00005.npy", np.ones((4, D), np.float32))
    assert len(ActivationStore(store.path)) == N


def test_writer_refuses_a_shard_of_the_wrong_width(tmp_path):
    writer = StoreWriter(tmp_path / "s", header())
    acts, index = rows_data(np.arange(4))
    with pytest.raises(StoreError, match="width 3"):
        writer.write_shard(acts[:, :2], index, units_end=1)


def test_missing_or_damaged_stores_raise(tmp_path):
    with pytest.raises(StoreError, match="No activation store at"):
        ActivationStore(tmp_path / "nothing")
    store = write_store(tmp_path / "s")
    (store.path / "shard_00002.index.npy").unlink()
    with pytest.raises(StoreError, match="shard_00002.index.npy"):
        ActivationStore(store.path)

    store = write_store(tmp_path / "t")
    manifest = json.loads((store.path / MANIFEST).read_text())
    manifest["shards"][1]["rows"] = 2
    (store.path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="holds 1 rows; the manifest says 2"):
        ActivationStore(store.path)

    (store.path / MANIFEST).write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        ActivationStore(store.path)

    manifest["version"] = 99
    (store.path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="version 99"):
        ActivationStore(store.path)


def test_store_without_a_recorded_total_is_refused_with_its_rows(tmp_path):
    writer = StoreWriter(tmp_path / "s", header())
    writer.write_shard(*rows_data(np.arange(5)), units_end=1)
    writer.close()  # never finished
    with pytest.raises(StoreError, match="incomplete.*5 rows from 1 contexts .the total was not"):
        ActivationStore(tmp_path / "s")
    with pytest.warns(UserWarning, match="incomplete"):
        assert len(ActivationStore(tmp_path / "s", allow_partial=True)) == 5


def test_manifest_records_each_shard_files_sha256(store):
    files = sorted(p.name for p in store.path.glob("shard_*.npy"))
    assert len(files) == 2 * len(SHARD_ROWS)
    recorded = {name: digest for shard in store.manifest["shards"]
                for name, digest in shard["sha256"].items()}
    assert recorded == {name: hashlib.sha256((store.path / name).read_bytes()).hexdigest()
                        for name in files}
    assert store.verify() == len(files)


@pytest.mark.parametrize("name", ["shard_00002.npy", "shard_00001.index.npy"])
def test_verify_names_a_shard_with_bytes_changed_inside(tmp_path, name):
    """Bytes changed with the file's mtime put back: an open (which trusts a size and mtime
    older than their record) still opens, verify() (which reads every byte) does not."""
    store = write_store(tmp_path / "s")
    file = store.path / name
    before = file.stat()
    data = bytearray(file.read_bytes())
    data[-3:] = np.random.default_rng(0).bytes(3)  # inside the rows, after the .npy header
    file.write_bytes(bytes(data))
    os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))
    stamps = store.path / STAMPS
    os.utime(stamps, ns=(before.st_atime_ns, stamps.stat().st_mtime_ns + 10**9))
    opened = ActivationStore(store.path)
    assert len(opened) == N
    with pytest.raises(StoreError) as err:
        opened.verify()
    message = str(err.value)
    assert name in message and "checksum" in message and "overwrite=True" in message
    others = {p.name for p in store.path.glob("shard_*.npy")} - {name}
    assert not any(other in message for other in others)


def test_zero_byte_shard_is_a_store_error_naming_it(tmp_path):
    store = write_store(tmp_path / "s")
    (store.path / "shard_00001.npy").write_bytes(b"")
    with pytest.raises(StoreError, match="shard_00001.npy"):
        ActivationStore(store.path)


@pytest.mark.parametrize("width, dtype", [(D + 1, np.float32), (D - 1, np.float32),
                                          (D, np.float64)])
def test_shard_of_another_width_or_dtype_is_a_store_error_naming_it(tmp_path, width, dtype):
    """Its recorded size and checksum refuse it first; in a store written before checksums
    (none recorded), the shard's own header does."""
    store = write_store(tmp_path / "s")
    np.save(store.path / "shard_00003.npy", np.ones((SHARD_ROWS[3], width), dtype))
    with pytest.raises(StoreError, match=r"shard_00003\.npy has changed since it was written"):
        ActivationStore(store.path)
    manifest = json.loads((store.path / MANIFEST).read_text())
    for shard in manifest["shards"]:
        del shard["sha256"]
    (store.path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(StoreError) as err:
        ActivationStore(store.path)[:]
    message = str(err.value)
    assert "shard_00003.npy" in message
    assert (f"width {width}" in message) if width != D else ("float64" in message)


def test_empty_store_refuses_batches(tmp_path):
    writer = StoreWriter(tmp_path / "s", header())
    writer.finish()
    store = ActivationStore(tmp_path / "s")
    assert len(store) == 0
    with pytest.raises(StoreError, match="has no rows"):
        next(store.batches(4))


def test_drop_last_with_fewer_rows_than_a_batch_is_refused(tmp_path):
    writer = StoreWriter(tmp_path / "s", header())
    writer.write_shard(np.zeros((3, D), np.float16), np.zeros(3, INDEX_DTYPE), 1)
    writer.finish()
    with pytest.raises(StoreError, match="fewer than one batch of 8"):
        next(ActivationStore(tmp_path / "s").batches(8, drop_last=True, epochs=None))
