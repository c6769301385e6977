"""Crash safety: an interrupted extraction resumes to exactly the rows of an uninterrupted one.

Interruptions are an exception after N shards (in-process) and a real SIGKILL of a child
process caught in the middle of writing a shard. Also: stale temporary files, a store written
with other settings, and extending a finished store with more tokens.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import sae_nb
from sae_nb.activations.store import StoreError, StoreWriter

SITES = ["resid_out_layer0", "mlp_out_layer1"]
# 20 contexts of 16 in batches of 2: 30 kept rows per batch, so every batch closes a shard.
TOKEN_RUN = dict(sites=SITES, n_tokens=320, ctx_len=16, batch_size=2, dtype="float32",
                 shard_rows=20, progress=False)
SENTENCE_RUN = dict(sites=SITES, mode="sentences", ctx_len=64, batch_size=3, dtype="float32",
                    shard_rows=3, progress=False)


class Interrupted(Exception):
    pass


def fail_after(monkeypatch, n_shards: int) -> None:
    """Make StoreWriter.write_shard raise once ``n_shards`` shards (over all sites) exist."""
    real = StoreWriter.write_shard
    written = []

    def flaky(self, *args, **kwargs):
        if len(written) == n_shards:
            raise Interrupted(f"simulated crash after {n_shards} shards")
        written.append(self.path.name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(StoreWriter, "write_shard", flaky)


def store_bytes(run_dir: Path) -> dict[str, tuple[bytes, bytes, list]]:
    """Per site: all rows as bytes, all index rows as bytes, and the shard layout."""
    stores = sae_nb.open_stores(run_dir)
    return {site: (s[:].tobytes(), s.index().tobytes(),
                   [(sh["rows"], sh["units"]) for sh in s.manifest["shards"]])
            for site, s in stores.items()}


def assert_same_stores(run_dir: Path, reference: Path) -> None:
    got, want = store_bytes(run_dir), store_bytes(reference)
    assert set(got) == set(SITES) == set(want)
    for site in SITES:
        assert got[site][0] == want[site][0], f"{site}: activations differ"
        assert got[site][1] == want[site][1], f"{site}: index differs"
        assert got[site][2] == want[site][2], f"{site}: shard layout differs"
    for store in sae_nb.open_stores(run_dir).values():
        assert store.manifest["complete"]
        assert not list(store.path.glob("*.tmp"))


@pytest.fixture(scope="module")
def token_reference(models, corpus_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference_tokens")
    sae_nb.extract_activations(models["llama"], run_dir, corpus=str(corpus_dir), **TOKEN_RUN)
    return run_dir


@pytest.fixture(scope="module")
def sentence_reference(models, sentences_csv, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference_sentences")
    sae_nb.extract_activations(models["llama"], run_dir, corpus=str(sentences_csv), **SENTENCE_RUN)
    return run_dir


def test_reference_has_many_shards(token_reference, sentence_reference):
    for run_dir in (token_reference, sentence_reference):
        for store in sae_nb.open_stores(run_dir).values():
            assert len(store.manifest["shards"]) >= 8


# n_shards counts over both sites: an odd count leaves one site a shard ahead of the other.
@pytest.mark.parametrize("n_shards", [1, 6, 7, 18])
def test_token_run_resumes_after_exception(llama, corpus_dir, token_reference, tmp_path,
                                           monkeypatch, n_shards):
    with monkeypatch.context() as patch:
        fail_after(patch, n_shards)
        with pytest.raises(Interrupted):
            sae_nb.extract_activations(llama, tmp_path, corpus=str(corpus_dir), **TOKEN_RUN)
    partial = sae_nb.open_stores(tmp_path, allow_partial=True)
    assert sum(len(s.manifest["shards"]) for s in partial.values()) == n_shards
    assert not any(s.manifest["complete"] for s in partial.values())
    sae_nb.extract_activations(llama, tmp_path, corpus=str(corpus_dir), **TOKEN_RUN)
    assert_same_stores(tmp_path, token_reference)


@pytest.mark.parametrize("n_shards", [3, 9])
def test_sentence_run_resumes_after_exception(llama, sentences_csv, sentence_reference, tmp_path,
                                              monkeypatch, n_shards):
    with monkeypatch.context() as patch:
        fail_after(patch, n_shards)
        with pytest.raises(Interrupted):
            sae_nb.extract_activations(llama, tmp_path, corpus=str(sentences_csv), **SENTENCE_RUN)
    sae_nb.extract_activations(llama, tmp_path, corpus=str(sentences_csv), **SENTENCE_RUN)
    assert_same_stores(tmp_path, sentence_reference)


@pytest.mark.parametrize("mode", ["tokens", "sentences"])
def test_resume_with_another_batch_size(llama, corpus_dir, sentences_csv, token_reference,
                                        sentence_reference, tmp_path, monkeypatch, mode):
    """batch_size does not define the rows: a rerun with another one resumes mid-batch."""
    run, corpus, reference = ((TOKEN_RUN, corpus_dir, token_reference) if mode == "tokens"
                              else (SENTENCE_RUN, sentences_csv, sentence_reference))
    with monkeypatch.context() as patch:
        fail_after(patch, 5)  # sites end at different units, neither a multiple of 5
        with pytest.raises(Interrupted):
            sae_nb.extract_activations(llama, tmp_path, corpus=str(corpus), **run)
    resumed = sae_nb.extract_activations(llama, tmp_path, corpus=str(corpus),
                                         **{**run, "batch_size": 5})
    want = sae_nb.open_stores(reference)
    for site in SITES:
        np.testing.assert_array_equal(resumed[site].index(), want[site].index())
        np.testing.assert_allclose(resumed[site][:], want[site][:], rtol=1e-5, atol=1e-5)


CHILD = textwrap.dedent("""
    import io, json, sys, time
    from pathlib import Path
    import numpy as np
    import torch
    torch.set_num_threads(1)
    import sae_nb
    from sae_nb.activations import store

    folder, run_dir, kill_at, options = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    real_save, saves = store.atomic_save_npy, []

    def save_then_hang(path, array):
        # On save number kill_at: leave half a file under the temporary name and wait to die.
        if len(saves) == kill_at:
            buffer = io.BytesIO()
            np.save(buffer, array)
            with open(path.with_name(path.name + ".tmp"), "wb") as f:
                f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            print("WRITING", path.name, flush=True)
            time.sleep(120)
        saves.append(path.name)
        real_save(path, array)

    store.atomic_save_npy = save_then_hang
    model = sae_nb.load_model(folder, device="cpu")
    sae_nb.extract_activations(model, run_dir, **json.loads(options))
    print("FINISHED", flush=True)
""")


@pytest.mark.slow  # a second interpreter, killed mid-shard
def test_sigkill_mid_shard_then_resume_is_byte_identical(llama, model_dirs, corpus_dir,
                                                         token_reference, tmp_path):
    options = {**TOKEN_RUN, "corpus": str(corpus_dir)}
    run_dir = tmp_path / "run"
    # Every batch closes a shard per site, saved as (acts, index) for one site, then the other:
    # saves 0-3 are shard 0, ..., so save 14 is the second site's acts of shard 3, when the
    # first site's manifest already lists 4 shards and the second site's lists 3.
    kill_at = 14
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(model_dirs["llama"]), str(run_dir), str(kill_at),
         json.dumps(options)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = child.stdout.readline()
        assert line.startswith("WRITING"), f"child ended early: {line!r} {child.stderr.read()}"
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        child.stdout.close()
        child.stderr.close()
    second = run_dir / "activations" / SITES[1]
    assert list(second.glob("*.tmp")), "the kill should leave a half-written temporary file"
    killed = {site: s.manifest
              for site, s in sae_nb.open_stores(run_dir, allow_partial=True).items()}
    assert [len(killed[s]["shards"]) for s in SITES] == [4, 3]
    assert not any(m["complete"] for m in killed.values())

    sae_nb.extract_activations(llama, run_dir, corpus=str(corpus_dir), **TOKEN_RUN)
    assert_same_stores(run_dir, token_reference)


def test_stale_tmp_files_are_removed(llama, corpus_dir, token_reference, tmp_path):
    sae_nb.extract_activations(llama, tmp_path, corpus=str(corpus_dir), **TOKEN_RUN)
    junk = []
    for site in SITES:
        folder = tmp_path / "activations" / site
        for name in ("shard_00003.npy.tmp", "manifest.json.tmp"):
            (folder / name).write_bytes(b"half a write")
            junk.append(folder / name)
    sae_nb.extract_activations(llama, tmp_path, corpus=str(corpus_dir), **TOKEN_RUN)
    assert not any(p.exists() for p in junk)
    assert_same_stores(tmp_path, token_reference)


def test_resume_refuses_a_damaged_shard_naming_it(llama, corpus_dir, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        fail_after(patch, 6)
        with pytest.raises(Interrupted):
            sae_nb.extract_activations(llama, tmp_path, corpus=str(corpus_dir), **TOKEN_RUN)
    shard = tmp_path / "activations" / SITES[1] / "shard_00001.npy"
    data = bytearray(shard.read_bytes())
    data[-4:] = b"\x00\xff\x00\xff"  # inside the last row
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError) as err:
        sae_nb.extract_activations(llama, tmp_path, corpus=str(corpus_dir), **TOKEN_RUN)
    assert "shard_00001.npy" in str(err.value) and "overwrite=True" in str(err.value)
    assert bytes(data) == shard.read_bytes()  # refused before writing anything
    sae_nb.extract_activations(llama, tmp_path, corpus=str(corpus_dir), overwrite=True,
                               **TOKEN_RUN)
    assert len(sae_nb.open_stores(tmp_path)[SITES[1]].manifest["shards"]) >= 8


@pytest.mark.parametrize("change, message", [
    ({"ctx_len": 32}, "ctx_len=16 (stored) vs 32 (asked)"),
    ({"seed": 3}, "seed=0 (stored) vs 3 (asked)"),
    ({"dtype": "float16"}, "dtype='float32' (stored) vs 'float16' (asked)"),
    ({"exclude_bos": False}, "exclude_bos=True (stored) vs False (asked)"),
])
def test_other_settings_in_same_run_dir_raise(llama, corpus_dir, tmp_path, change, message):
    small = {**TOKEN_RUN, "n_tokens": 64}
    sae_nb.extract_activations(llama, tmp_path, corpus=str(corpus_dir), **small)
    with pytest.raises(StoreError) as err:
        sae_nb.extract_activations(llama, tmp_path, corpus=str(corpus_dir), **{**small, **change})
    assert message in str(err.value)
    assert "overwrite=True" in str(err.value)
    # overwrite=True replaces the store with one of the new settings.
    stores = sae_nb.extract_activations(llama, tmp_path, corpus=str(corpus_dir), overwrite=True,
                                        **{**small, **change})
    key, value = next(iter(change.items()))
    assert all(s.manifest[key] == value for s in stores.values())


def test_other_corpus_in_same_run_dir_raises(llama, corpus_dir, sentences_csv, tmp_path):
    small = {**TOKEN_RUN, "n_tokens": 64}
    sae_nb.extract_activations(llama, tmp_path, corpus=str(corpus_dir), **small)
    with pytest.raises(StoreError, match="corpus="):
        sae_nb.extract_activations(llama, tmp_path, corpus=str(sentences_csv), **small)


@pytest.mark.parametrize("first_tokens", [160, 96])
def test_more_tokens_extend_to_a_single_bigger_run(llama, corpus_dir, token_reference, tmp_path,
                                                   first_tokens):
    """10 contexts (not a multiple of batch_size 4) or 6, then all 20: equal to one run of 20."""
    run = {**TOKEN_RUN, "batch_size": 4}
    first = sae_nb.extract_activations(llama, tmp_path / "grown", corpus=str(corpus_dir),
                                       **{**run, "n_tokens": first_tokens})
    n_first = len(first[SITES[0]])
    grown = sae_nb.extract_activations(llama, tmp_path / "grown", corpus=str(corpus_dir), **run)
    single = sae_nb.extract_activations(llama, tmp_path / "single", corpus=str(corpus_dir), **run)
    for site in SITES:
        assert grown[site].manifest["units"] == 20 and grown[site].manifest["complete"]
        assert len(grown[site]) == len(single[site]) > n_first
        np.testing.assert_array_equal(grown[site].index(), single[site].index())
        np.testing.assert_allclose(grown[site][:], single[site][:], rtol=1e-6, atol=1e-6)
        # the first run's rows are untouched: the extension only appended
        np.testing.assert_array_equal(grown[site][:n_first], first[site][:n_first])
