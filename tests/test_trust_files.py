"""Files that must not be trusted blindly: a saved dictionary's dtype, two saves into one folder,
shard names that leave their store, and bytes changed inside a shard or a weights file.

A changed file is found on open by comparing each file's size and modification time with the
ones recorded when it was written, and hashing it only when they differ (or were taken in the
same clock tick as the record), so an intact store opens without reading its shards.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import sae_nb
from sae_nb.activations.store import (
    INDEX_DTYPE,
    MANIFEST,
    STAMPS,
    ActivationStore,
    StoreError,
    StoreWriter,
)
from sae_nb.dictionaries import saving
from sae_nb.dictionaries.architectures import TopKSAE
from sae_nb.dictionaries.saving import (
    DictionaryFormatError,
    load_sae_nb,
    save_dictionary,
    save_trained,
)
from sae_nb.training.trainer import TrainConfig, TrainResult
from sae_nb.util import io as io_module

D, F, K = 6, 16, 3


def tiny_topk(seed: int = 0) -> TopKSAE:
    torch.manual_seed(seed)
    sae = TopKSAE(D, F, k=K)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.7)  # values between float16's and float32's grid
    return sae


# -- the saved dtype ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["int8", "bool", "int64", "uint8", "float8_e4m3fn", "complex64",
                                   "float128", "no_such_dtype"])
def test_save_refuses_a_dtype_that_is_not_a_float_naming_it(tmp_path, dtype):
    with pytest.raises(DictionaryFormatError) as err:
        save_dictionary(tiny_topk(), tmp_path / "d", model="m", site="embed", dtype=dtype)
    message = str(err.value)
    assert repr(dtype) in message and "float32" in message and "float16" in message
    assert not (tmp_path / "d").exists()  # nothing written


def test_save_trained_refuses_int8_as_notebook_02_passes_it(tmp_path):
    @dataclass
    class Store:
        manifest: dict

    store = Store({"model": "m", "site": "embed", "ctx_len": 8, "corpus": "docs"})
    with pytest.raises(DictionaryFormatError, match=r"'int8'.*float32"):
        result = TrainResult(tiny_topk(), pd.DataFrame(), TrainConfig(), (1.0, 1.0))
        save_trained(result, tmp_path, "mine", store, dtype="int8")
    assert not (tmp_path / "m" / "embed" / "mine").exists()


@pytest.mark.parametrize("dtype, cast", [("float32", torch.float32), ("float16", torch.float16),
                                         ("bfloat16", torch.bfloat16),
                                         (torch.float16, torch.float16)])
def test_float_dtypes_round_trip_to_their_own_grid(tmp_path, dtype, cast):
    """Each loaded weight is the saved one rounded once to the dtype's grid, and no further."""
    sae = tiny_topk()
    folder = save_dictionary(sae, tmp_path / "d", model="m", site="embed", dtype=dtype)
    loaded = load_sae_nb(folder)
    for name, value in sae.state_dict().items():
        want = value.to(cast).to(torch.float32)
        assert torch.equal(loaded.state_dict()[name], want), name
    if cast is not torch.float32:  # the rounding is real: float32 values are not on the grid
        assert not torch.equal(loaded.W_dec, sae.W_dec)
    assert json.loads((folder / "cfg.json").read_text())["dtype"] == str(cast).split(".")[-1]


def test_float16_overflow_is_refused_naming_the_tensor(tmp_path):
    sae = tiny_topk()
    with torch.no_grad():
        sae.b_dec[2] = 1.0e5  # beyond float16's largest finite value, 65504
    with pytest.raises(DictionaryFormatError) as err:
        save_dictionary(sae, tmp_path / "d", model="m", site="embed", dtype="float16")
    message = str(err.value)
    assert "b_dec" in message and "65504" in message and "float32" in message
    folder = save_dictionary(sae, tmp_path / "b", model="m", site="embed", dtype="bfloat16")
    assert float(load_sae_nb(folder).b_dec[2].detach()) == pytest.approx(1.0e5, rel=2**-8)


# -- two saves into one folder --------------------------------------------------------------
def test_a_save_into_a_folder_another_save_is_writing_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "dictionaries" / "m" / "embed" / "mine"
    first, second = tiny_topk(1), tiny_topk(2)
    inside, release = threading.Event(), threading.Event()
    real_save_file = saving.save_file
    errors = []

    def slow_save_file(tensors, path, *args, **kwargs):
        if threading.current_thread().name == "first" and Path(path).name == saving.WEIGHTS_FILE:
            inside.set()  # the first save is writing its weights: hold it there
            release.wait(20)
        return real_save_file(tensors, path, *args, **kwargs)

    def save_first():
        try:
            save_dictionary(first, folder, model="m", site="embed")
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    monkeypatch.setattr(saving, "save_file", slow_save_file)
    thread = threading.Thread(target=save_first, name="first")
    thread.start()
    try:
        assert inside.wait(20)
        with pytest.raises(DictionaryFormatError) as err:
            save_dictionary(second, folder, model="m", site="embed")
    finally:
        release.set()
        thread.join(20)
    message = str(err.value)
    assert str(folder) in message and f"pid {os.getpid()}" in message
    assert "another name" in message
    assert errors == []
    torch.testing.assert_close(load_sae_nb(folder).W_dec, first.W_dec, rtol=0, atol=0)
    save_dictionary(second, folder, model="m", site="embed")  # free again once it is done
    torch.testing.assert_close(load_sae_nb(folder).W_dec, second.W_dec, rtol=0, atol=0)
    assert sorted(p.name for p in folder.parent.iterdir() if not p.name.startswith(".")) == [
        "mine"]


# -- shard names stay inside their store ----------------------------------------------------
def header() -> dict:
    return {"model": "tiny", "site": "resid_out_layer1", "module": "model.layers.1", "io": "output",
            "d": 3, "dtype": "float32", "tokenizer": "bytes", "mode": "tokens", "pool": None,
            "ctx_len": 8, "corpus": "docs", "text_column": None, "seed": 0, "prepend_bos": True,
            "exclude_bos": True, "bos_token_id": 256}


def write_store(path: Path, shards: int = 4, rows: int = 5, value: float = 0.0) -> Path:
    """A complete store whose row r holds (r + value, -r, 2r); ``shards`` shards of ``rows``."""
    writer = StoreWriter(path, header())
    for s in range(shards):
        r = np.arange(s * rows, (s + 1) * rows, dtype=np.float32)
        index = np.zeros(rows, INDEX_DTYPE)
        index["context"] = r // 8
        writer.write_shard(np.stack([r + value, -r, 2 * r], 1), index, units_end=s + 1)
    writer.finish(n_units_total=shards)
    return path


def edit_manifest(path: Path, change) -> None:
    manifest = json.loads((path / MANIFEST).read_text())
    change(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest))


def outside_names(tmp_path: Path, store: Path) -> list[str]:
    """Names of a shard written by another store outside ``store``: relative and absolute."""
    other = write_store(tmp_path / "elsewhere" / "other", value=1000.0)
    relative = os.path.relpath(other / "shard_00001", store)
    assert relative.startswith("..")
    (store / "parts").mkdir(exist_ok=True)  # a path through it resolves
    return [relative, str(other / "shard_00001"), f"parts/../{relative}"]


@pytest.mark.parametrize("which", [0, 1, 2])
def test_a_shard_named_outside_the_store_is_refused_naming_the_entry(tmp_path, which):
    store = write_store(tmp_path / "run" / "activations" / "s")
    name = outside_names(tmp_path, store)[which]
    edit_manifest(store, lambda m: m["shards"][2].update(name=name))  # checksums left as they were
    with pytest.raises(StoreError) as err:
        ActivationStore(store)[:]
    message = str(err.value)
    assert name in message and "shard 2" in message and "overwrite=True" in message


def test_verify_and_the_reader_use_the_same_files(tmp_path):
    """Entry 1 names shard_00002 (inside the store) while its checksums record shard_00001's
    files: the reader would read shard 2's rows twice, and a verify() hashing the recorded
    names would pass."""
    store = write_store(tmp_path / "s")
    edit_manifest(store, lambda m: m["shards"][1].update(name="shard_00002"))
    with pytest.raises(StoreError) as err:
        ActivationStore(store)[:]
    message = str(err.value)
    assert "shard_00002.npy" in message and "no checksum" in message


def test_a_resumed_store_with_a_shard_outside_is_refused_before_writing(tmp_path):
    store = tmp_path / "run" / "s"
    writer = StoreWriter(store, header())
    writer.write_shard(np.ones((4, 3), np.float32), np.zeros(4, INDEX_DTYPE), 1)
    writer.close()  # killed before finishing: the next writer resumes
    name = outside_names(tmp_path, store)[1]
    edit_manifest(store, lambda m: m["shards"][0].update(name=name))
    with pytest.raises(StoreError, match=r"shard 0.*outside"):
        StoreWriter(store, header())


# -- changed bytes are caught on open -------------------------------------------------------
def scribble(file: Path, keep_mtime: bool = False) -> None:
    """Random bytes over the last 8 bytes of ``file`` (inside the data, same size)."""
    before = file.stat()
    data = bytearray(file.read_bytes())
    data[-8:] = np.random.default_rng(7).bytes(8)
    file.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))


def age_stamps(store: Path, seconds: float = 2.0) -> None:
    """Move the stamps file's modification time ahead, as if time had passed between the last
    shard's write and the stamps' write: its records are then not from the shards' tick."""
    stat = (store / STAMPS).stat()
    os.utime(store / STAMPS, ns=(stat.st_atime_ns, stat.st_mtime_ns + int(seconds * 1e9)))


def count_hashes(monkeypatch) -> list[str]:
    """The names of the files hashed from now on (every check hashes through util.io)."""
    hashed = []
    real = io_module.file_sha256

    def spy(path, *args, **kwargs):
        hashed.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(io_module, "file_sha256", spy)
    return hashed


@pytest.mark.parametrize("name", ["shard_00002.npy", "shard_00000.index.npy"])
def test_random_bytes_inside_a_shard_are_refused_on_open(tmp_path, name):
    store = write_store(tmp_path / "s")
    scribble(store / name)
    with pytest.raises(StoreError) as err:
        ActivationStore(store)
    message = str(err.value)
    assert name in message and "changed" in message and "overwrite=True" in message
    others = {p.name for p in store.glob("shard_*.npy")} - {name}
    assert not any(other in message for other in others)


def test_random_bytes_written_in_the_same_tick_as_the_record_are_refused(tmp_path):
    """Same size and, at coarse clock ticks, possibly the same mtime: a record taken in the
    changed file's own tick is not trusted without a hash."""
    store = write_store(tmp_path / "s")
    stat = (store / "shard_00001.npy").stat()
    scribble(store / "shard_00001.npy")
    os.utime(store / "shard_00001.npy", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.utime(store / STAMPS, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # one tick for all
    with pytest.raises(StoreError, match=r"shard_00001\.npy.*changed"):
        ActivationStore(store)


def test_an_intact_store_opens_without_hashing_and_verify_still_reads_all(tmp_path, monkeypatch):
    store = write_store(tmp_path / "s")
    age_stamps(store)
    hashed = count_hashes(monkeypatch)
    opened = ActivationStore(store)
    assert hashed == []
    np.testing.assert_array_equal(opened[:][:, 1], -np.arange(20, dtype=np.float32))
    assert opened.verify() == 8 and len(hashed) == 8


def test_bytes_changed_with_the_mtime_put_back_are_left_to_verify(tmp_path):
    """The cheap check trusts size and mtime; a writer that restores the mtime on purpose is
    caught by verify(), which reads every byte."""
    store = write_store(tmp_path / "s")
    age_stamps(store)
    scribble(store / "shard_00003.npy", keep_mtime=True)
    opened = ActivationStore(store)
    with pytest.raises(StoreError, match=r"shard_00003\.npy.*checksum"):
        opened.verify()


def test_a_copy_with_new_mtimes_is_hashed_once_then_opens_fast(tmp_path, monkeypatch):
    """cp without -p, a restore from backup: every mtime differs from its record. The first
    open hashes each file, finds the bytes intact and records the new size and mtime."""
    store = write_store(tmp_path / "s")
    copy = tmp_path / "copy"
    shutil.copytree(store, copy, copy_function=shutil.copyfile)  # new mtimes
    for file in copy.glob("shard_*.npy"):
        os.utime(file, ns=(0, 10**18))
    hashed = count_hashes(monkeypatch)
    first = ActivationStore(copy)
    assert sorted(hashed) == sorted(p.name for p in copy.glob("shard_*.npy"))
    np.testing.assert_array_equal(first[:], ActivationStore(store)[:])
    hashed.clear()
    ActivationStore(copy)
    assert hashed == []


def test_a_store_written_before_stat_records_still_opens(tmp_path):
    store = write_store(tmp_path / "s")
    (store / STAMPS).unlink(missing_ok=True)
    assert len(ActivationStore(store)) == 20
    scribble(store / "shard_00001.npy")
    with pytest.raises(StoreError, match=r"shard_00001\.npy.*changed"):
        ActivationStore(store)


def test_rerunning_a_finished_extraction_over_a_damaged_store_says_so(llama, corpus_dir,
                                                                      tmp_path):
    run = dict(sites=["resid_out_layer0"], n_tokens=96, ctx_len=16, batch_size=2,
               dtype="float32", shard_rows=20, progress=False, corpus=str(corpus_dir))
    sae_nb.extract_activations(llama, tmp_path, **run)
    shard = tmp_path / "activations" / "resid_out_layer0" / "shard_00001.npy"
    scribble(shard)
    damaged = shard.read_bytes()
    with pytest.raises(StoreError) as err:
        sae_nb.extract_activations(llama, tmp_path, **run)
    message = str(err.value)
    assert "shard_00001.npy" in message and "overwrite=True" in message
    assert shard.read_bytes() == damaged  # refused before writing anything
    fresh = sae_nb.extract_activations(llama, tmp_path, overwrite=True, **run)
    assert fresh["resid_out_layer0"].verify() > 0


# -- a dictionary's files -------------------------------------------------------------------
def scribble_weights(folder: Path) -> None:
    """Random bytes in the middle of the tensors of sae_weights.safetensors (same size)."""
    weights = folder / saving.WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")  # the tensors follow the JSON header
    middle = (start + len(data)) // 2
    data[middle:middle + 16] = np.random.default_rng(3).bytes(16)
    weights.write_bytes(bytes(data))


@pytest.mark.parametrize("load", [load_sae_nb, sae_nb.load_dictionary])
def test_random_bytes_inside_a_weights_file_are_refused_on_load(tmp_path, load):
    folder = save_dictionary(tiny_topk(), tmp_path / "d", model="m", site="embed")
    scribble_weights(folder)
    with pytest.raises(DictionaryFormatError) as err:
        load(folder)
    message = str(err.value)
    assert "sae_weights.safetensors" in message and "changed" in message
    assert "save it again" in message


def test_a_dictionary_loads_without_hashing_when_size_and_mtime_match(tmp_path, monkeypatch):
    folder = save_dictionary(tiny_topk(), tmp_path / "d", model="m", site="embed")
    meta = (folder / saving.META_FILE).stat()
    os.utime(folder / saving.META_FILE, ns=(meta.st_atime_ns, meta.st_mtime_ns + 2 * 10**9))
    hashed = count_hashes(monkeypatch)
    torch.testing.assert_close(load_sae_nb(folder).W_dec, tiny_topk().W_dec, rtol=0, atol=0)
    assert hashed == []


def test_a_dictionary_with_new_mtimes_or_no_records_loads_by_hash(tmp_path, monkeypatch):
    """A copy (new mtimes), and a dictionary saved before size and mtime were recorded: both
    load after a hash; bytes changed in either are refused."""
    folder = save_dictionary(tiny_topk(), tmp_path / "d", model="m", site="embed")
    for file in folder.iterdir():
        os.utime(file, ns=(0, 10**18))
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    meta = json.loads((old / saving.META_FILE).read_text())
    meta.pop("stat", None)
    (old / saving.META_FILE).write_text(json.dumps(meta))
    hashed = count_hashes(monkeypatch)
    for path in (folder, old):
        hashed.clear()
        torch.testing.assert_close(load_sae_nb(path).W_dec, tiny_topk().W_dec, rtol=0, atol=0)
        assert saving.WEIGHTS_FILE in hashed
        scribble_weights(path)
        with pytest.raises(DictionaryFormatError, match=r"sae_weights\.safetensors.*changed"):
            load_sae_nb(path)


def test_a_merged_store_keeps_its_parts_stamps_and_refuses_a_changed_part(tmp_path, monkeypatch):
    """The parts of a multi-process extraction, merged as rank 0 does: the merged store's
    stamps name the parts' files, so an open hashes none; a changed part file is refused."""
    from sae_nb.activations import shards

    path = tmp_path / "s"
    main = StoreWriter(path, header(), world_size=2)
    bounds = shards.plan(main, 0, 4, batch_size=1, world_size=2)
    for rank in range(2):
        lo, hi = shards.part_range(bounds, rank, 0)
        with shards.open_part(path, header(), lo, hi) as part:
            for unit in range(lo, hi):
                r = np.arange(5 * unit, 5 * unit + 5, dtype=np.float32)
                part.write_shard(np.stack([r, -r, 2 * r], 1), np.zeros(5, INDEX_DTYPE), unit + 1)
            part.finish(n_units_total=hi)
    shards.merge(main, bounds, 0)
    age_stamps(path)
    hashed = count_hashes(monkeypatch)
    store = ActivationStore(path)
    assert hashed == [] and len(store) == 20
    np.testing.assert_array_equal(store[:][:, 0], np.arange(20, dtype=np.float32))
    name = store.manifest["shards"][3]["name"] + ".npy"
    assert name.startswith("parts/part_")
    scribble(path / name)
    with pytest.raises(StoreError, match=rf"{name}.*changed"):
        ActivationStore(path)
