"""Two writers of one store: the second is refused with the holder's name; no torn files.

The main test starts two real extraction processes on one run folder at the same instant; each
process is bounded in time. One must win and write a store equal to a single-process run; the
other must stop with a StoreError naming the winner's pid, before touching the store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import sae_nb
from sae_nb.activations import store as store_module
from sae_nb.activations.store import INDEX_DTYPE, StoreError, StoreWriter

SITES = ["resid_out_layer0", "mlp_out_layer1"]
RUN = dict(sites=SITES, n_tokens=320, ctx_len=16, batch_size=2, dtype="float32", shard_rows=20,
           progress=False)

CHILD = textwrap.dedent("""
    import json, os, sys, time
    import torch
    torch.set_num_threads(1)
    import sae_nb
    from sae_nb.activations import store

    folder, run_dir, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    real_write = store.StoreWriter.write_shard

    def slow_write(self, *args, **kwargs):  # widen the window in which both run (10 shards)
        time.sleep(0.3)
        return real_write(self, *args, **kwargs)

    store.StoreWriter.write_shard = slow_write
    model = sae_nb.load_model(folder, device="cpu")
    print("READY", flush=True)
    sys.stdin.readline()  # both children start extracting at the same instant
    try:
        sae_nb.extract_activations(model, run_dir, **options)
    except sae_nb.StoreError as err:
        print("STORE_ERROR", str(err).replace(chr(10), " "), flush=True)
        sys.exit(3)
    print("FINISHED", flush=True)
""")


def store_bytes(run_dir) -> dict[str, tuple[bytes, bytes]]:
    return {site: (s[:].tobytes(), s.index().tobytes())
            for site, s in sae_nb.open_stores(run_dir).items()}


@pytest.mark.slow
def test_two_extraction_processes_on_one_run_folder(llama, model_dirs, corpus_dir, tmp_path):
    options = {**RUN, "corpus": str(corpus_dir)}
    run_dir = tmp_path / "shared_run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(model_dirs["llama"]),
                                  str(run_dir), json.dumps(options)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env)
                for _ in range(2)]
    try:
        for child in children:
            line = child.stdout.readline()
            assert line.startswith("READY"), f"child failed to start: {child.stderr.read()}"
        for child in children:
            child.stdin.write("go\n")
            child.stdin.flush()
        results = [child.communicate(timeout=180) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    codes = [child.returncode for child in children]
    outputs = [out + err for out, err in results]
    assert sorted(codes) == [0, 3], f"exit codes {codes}: {outputs}"
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    assert "FINISHED" in results[winner][0]
    refused = results[loser][0]
    assert "STORE_ERROR" in refused and "being written by another" in refused
    assert f"pid {children[winner].pid}" in refused  # names the holder
    assert "Traceback" not in results[loser][1]

    reference = tmp_path / "single"
    sae_nb.extract_activations(llama, reference, corpus=str(corpus_dir), **RUN)
    got, want = store_bytes(run_dir), store_bytes(reference)
    assert set(got) == set(want) == set(SITES)
    for site in SITES:
        assert got[site] == want[site], f"{site}: the winner's store differs from a single run"
        manifest = sae_nb.open_stores(run_dir)[site].manifest
        assert manifest["complete"]
        assert manifest["rows"] == len(want[site][1]) // INDEX_DTYPE.itemsize


def header(d: int = 3) -> dict:
    return {"model": "tiny", "site": "resid_out_layer1", "module": "model.layers.1",
            "io": "output", "d": d, "dtype": "float32", "tokenizer": "bytes", "mode": "tokens",
            "pool": None, "ctx_len": 8, "corpus": "docs", "text_column": None, "seed": 0,
            "prepend_bos": True, "exclude_bos": True, "bos_token_id": 256}


def test_second_writer_is_refused_until_the_first_closes(tmp_path):
    first = StoreWriter(tmp_path / "s", header())
    first.write_shard(np.ones((4, 3), np.float32), np.zeros(4, INDEX_DTYPE), 1)
    with pytest.raises(StoreError) as err:
        StoreWriter(tmp_path / "s", header())
    message = str(err.value)
    assert f"pid {os.getpid()}" in message and "being written by another" in message
    assert os.uname().nodename in message
    assert len(first.manifest["shards"]) == 1  # the refused writer deleted nothing
    assert (tmp_path / "s" / "shard_00000.npy").exists()
    first.finish()
    second = StoreWriter(tmp_path / "s", header())  # the lock is free again
    assert second.done == 1
    second.finish()


def test_concurrent_atomic_writes_of_one_file_never_collide(tmp_path):
    """Two threads rewrite one manifest 300 times each: no error, never a torn file."""
    path = tmp_path / "manifest.json"
    contents = [json.dumps({"writer": w, "pad": "x" * 20_000}).encode() for w in range(2)]
    errors, seen = [], set()

    def write(w: int) -> None:
        try:
            for _ in range(300):
                store_module.atomic_write_bytes(path, contents[w])
        except Exception as err:  # noqa: BLE001 - collected and reported below
            errors.append(repr(err))

    def read() -> None:
        while any(t.is_alive() for t in writers):
            if path.exists():
                seen.add(path.read_bytes())

    writers = [threading.Thread(target=write, args=(w,)) for w in range(2)]
    reader = threading.Thread(target=read)
    for t in writers:
        t.start()
    reader.start()
    for t in writers + [reader]:
        t.join(timeout=120)
    assert errors == []
    assert seen <= set(contents) and path.read_bytes() in contents
    assert not list(tmp_path.glob("*.tmp"))


def test_a_reader_during_an_extraction_is_told_it_is_still_running(tmp_path):
    writer = StoreWriter(tmp_path / "s", header())
    writer.write_shard(np.ones((4, 3), np.float32), np.zeros(4, INDEX_DTYPE), 1)
    with pytest.raises(StoreError) as err:
        sae_nb.ActivationStore(tmp_path / "s")
    message = str(err.value)
    assert "still being written" in message and f"pid {os.getpid()}" in message
    assert "Wait for it to finish" in message and "allow_partial=True" in message
    writer.close()  # the writer died: now the store is an interrupted one
    with pytest.raises(StoreError, match="stopped with 4 rows.*running notebook 01 again"):
        sae_nb.ActivationStore(tmp_path / "s")


def test_a_reader_asking_who_writes_does_not_look_like_a_second_writer(tmp_path):
    """Readers take the lock file's shared lock for a moment; a writer starting then waits."""
    import fcntl

    StoreWriter(tmp_path / "s", header()).close()
    with open(tmp_path / "s" / "writer.lock") as reader:
        fcntl.flock(reader.fileno(), fcntl.LOCK_SH)
        threading.Timer(0.2, fcntl.flock, (reader.fileno(), fcntl.LOCK_UN)).start()
        writer = StoreWriter(tmp_path / "s", header())
    writer.finish()
    assert sae_nb.ActivationStore(tmp_path / "s").manifest["complete"]
