"""Sharded extraction: N processes over gloo write one store that reads exactly like a
single-process store; a killed multi-process run resumes to the identical store.

The processes are real: ``python -m sae_nb extract`` started twice with torchrun's environment
variables (rank, world size, master address), or by torchrun itself; each is bounded in time.
The reference is the single-process extraction in this interpreter. "Exactly like" means the
same rows (bytes), the same index (bytes) and the same manifest apart from ``shards``, whose
names, sizes and checksums say which process wrote what.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

import sae_nb
from sae_nb.activations.shards import block_bounds
from sae_nb.activations.store import PARTS, StoreError, StoreWriter

SITES = ["resid_out_layer0", "mlp_out_layer1"]
# 20 contexts of 16 in batches of 2, a shard per batch: each of 2 ranks writes 5 shards a site.
TOKEN_RUN = dict(sites=SITES, n_tokens=320, ctx_len=16, batch_size=2, dtype="float32",
                 shard_rows=20)
SENTENCE_RUN = dict(sites=SITES, mode="sentences", ctx_len=64, batch_size=3, dtype="float32",
                    shard_rows=3)
TIMEOUT_S = 240

# Runs the command line's main() on each argument list in turn, in one process (one start-up
# for several extractions). With KILL_AT set, rank 1 stops on that array save: it leaves half
# a file under a temporary name, says WRITING and waits to be killed.
CHILD = textwrap.dedent("""
    import io, json, os, sys, time
    import numpy as np
    import torch
    torch.set_num_threads(1)
    from sae_nb.activations import store
    from sae_nb.__main__ import main

    kill_at = int(os.environ.get("KILL_AT", "-1"))
    if os.environ["RANK"] == "1" and kill_at >= 0:
        real_save, saves = store.atomic_save_npy, []

        def save_then_hang(path, array):
            if len(saves) == kill_at:
                buffer = io.BytesIO()
                np.save(buffer, array)
                with open(path.with_name(path.name + ".tmp"), "wb") as f:
                    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                print("WRITING", path.name, flush=True)
                time.sleep(300)
            saves.append(path.name)
            real_save(path, array)

        store.atomic_save_npy = save_then_hang
    for argv in json.loads(sys.argv[1]):
        code = main(argv)
        if code:
            sys.exit(code)
    print("FINISHED", flush=True)
""")


def options(params: dict) -> list[str]:
    argv = []
    for name, value in params.items():
        argv += [f"--{name}", *map(str, value)] if isinstance(value, list) else [f"--{name}",
                                                                                  str(value)]
    return argv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(argvs_by_rank: list[list[list[str]]], env_extra: dict | None = None):
    """One child per rank, each running CHILD on its argument lists, with torchrun's variables."""
    port, world = free_port(), len(argvs_by_rank)
    children = []
    for rank, argvs in enumerate(argvs_by_rank):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **(env_extra or {})}
        children.append(subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(argvs)],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True, env=env))
    return children


def finish(children) -> list[tuple[int, str, str]]:
    try:
        results = [c.communicate(timeout=TIMEOUT_S) for c in children]
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
                c.wait()
    return [(c.returncode, out, err) for c, (out, err) in zip(children, results)]


def without_shards(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "shards"}


def assert_reads_like(run_dir, reference, same_shards: bool = False) -> None:
    got, want = sae_nb.open_stores(run_dir), sae_nb.open_stores(reference)
    assert set(got) == set(want) == set(SITES)
    for site in SITES:
        assert got[site][:].tobytes() == want[site][:].tobytes(), f"{site}: rows differ"
        assert got[site].index().tobytes() == want[site].index().tobytes(), f"{site}: index"
        if same_shards:
            assert got[site].manifest == want[site].manifest, site
        else:
            assert without_shards(got[site].manifest) == without_shards(want[site].manifest)
        assert got[site].verify() == 2 * len(got[site].manifest["shards"])  # every checksum
        assert not list(got[site].path.rglob("*.tmp"))


@pytest.fixture(scope="module")
def job_argv(model_dirs, corpus_dir, sentences_csv):
    def argv(run_dir, mode: str = "tokens") -> list[str]:
        run, corpus = (TOKEN_RUN, corpus_dir) if mode == "tokens" else (SENTENCE_RUN, sentences_csv)
        return ["extract", "--model", str(model_dirs["llama"]), "--corpus", str(corpus),
                "--run_dir", str(run_dir), "--no-progress", *options(run)]
    return argv


@pytest.fixture(scope="module")
def two_rank_runs(job_argv, llama, corpus_dir, tmp_path_factory):
    """Token and sentence mode, each extracted by 2 processes, and a single-process store of
    half the tokens extended by 2 processes (one launch for all three)."""
    root = tmp_path_factory.mktemp("two_ranks")
    sae_nb.extract_activations(llama, root / "extend", corpus=str(corpus_dir), progress=False,
                               **{**TOKEN_RUN, "n_tokens": 160})
    argvs = [job_argv(root / "tokens"), job_argv(root / "sentences", "sentences"),
             job_argv(root / "extend")]
    results = finish(start_ranks([argvs, argvs]))
    assert [code for code, _, _ in results] == [0, 0], results
    return root


@pytest.mark.slow  # two interpreters
@pytest.mark.parametrize("mode", ["tokens", "sentences", "extend"])
def test_two_ranks_write_the_store_one_rank_writes(two_rank_runs, llama, corpus_dir,
                                                   sentences_csv, tmp_path, mode):
    run, corpus = (SENTENCE_RUN, sentences_csv) if mode == "sentences" else (TOKEN_RUN, corpus_dir)
    sae_nb.extract_activations(llama, tmp_path, corpus=str(corpus), progress=False, **run)
    assert_reads_like(two_rank_runs / mode, tmp_path)
    for store in sae_nb.open_stores(two_rank_runs / mode).values():
        parts = sorted(p.name for p in (store.path / PARTS).iterdir())
        assert len(parts) == 2  # each rank wrote its own part, listed in unit order
        names = [s["name"] for s in store.manifest["shards"]]
        assert names == sorted(names, key=lambda n: (n.startswith(PARTS), n))
        assert all(n.startswith(f"{PARTS}/part_") for n in names) == (mode != "extend")
        assert "pending" not in store.manifest and store.manifest["complete"]
    if mode == "extend":  # the parts took over where the single-process store ended
        assert parts == ["part_000000010_000000014", "part_000000014_000000020"]  # 2 + 3 batches


@pytest.mark.slow  # two interpreters killed mid-shard, then torchrun
def test_a_killed_two_rank_extraction_resumes_to_the_identical_store(two_rank_runs, job_argv,
                                                                     llama, corpus_dir,
                                                                     tmp_path):
    run_dir = tmp_path / "run"
    # Rank 1 writes units 10..20: a shard per batch and site, (acts, index) per shard, one site
    # then the other; save 10 is the second site's acts of its shard 2.
    children = start_ranks([[job_argv(run_dir)]] * 2, {"KILL_AT": "10"})
    try:
        line = children[1].stdout.readline()
        assert line.startswith("WRITING"), \
            f"rank 1 ended early: {line!r} {children[1].stderr.read()}"
    finally:
        for child in children:
            if child.poll() is None:
                os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
            child.stdout.close()
            child.stderr.close()
    with pytest.raises(StoreError, match=r"on 2 processes stopped.*--nproc_per_node 2"):
        sae_nb.open_stores(run_dir)
    with pytest.warns(UserWarning, match=r"on 2 processes stopped with \d+ rows in the parts"):
        killed = sae_nb.open_stores(run_dir, allow_partial=True)
    for store in killed.values():
        assert not store.manifest["complete"] and store.manifest["pending"]["world_size"] == 2
    part = run_dir / "activations" / SITES[1] / PARTS / "part_000000010_000000020"
    assert list(part.glob("*.tmp")), "the kill should leave a half-written temporary file"

    # Another number of processes is refused, naming the one to use.
    with pytest.raises(StoreError, match=r"2 process\(es\) left unfinished.*--nproc_per_node 2"):
        sae_nb.extract_activations(llama, run_dir, corpus=str(corpus_dir), progress=False,
                                   **TOKEN_RUN)

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", "sae_nb", *job_argv(run_dir)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("rows in") == 2  # rank 0 alone prints the two stores
    assert_reads_like(run_dir, two_rank_runs / "tokens", same_shards=True)


@pytest.mark.slow  # two interpreters
def test_ranks_started_with_different_settings_are_refused(job_argv, tmp_path):
    run_dir = tmp_path / "run"
    results = finish(start_ranks([[job_argv(run_dir)],
                                  [job_argv(run_dir) + ["--n_tokens", "640"]]]))
    for code, out, err in results:
        assert code == 1, (out, err)
        assert "different extraction settings" in err and "on rank 1" in err
        assert "n_tokens" in err and "Traceback" not in err
    assert not list(run_dir.rglob("shard_*.npy"))  # refused before anything was written


def test_several_processes_refuse_a_store_one_process_left_unfinished(tmp_path):
    header = {"model": "tiny", "site": "s", "module": "m", "io": "output", "d": 3,
              "dtype": "float32", "tokenizer": "bytes", "mode": "tokens", "pool": None,
              "ctx_len": 8, "corpus": "docs", "text_column": None, "seed": 0,
              "prepend_bos": True, "exclude_bos": True, "bos_token_id": 256}
    StoreWriter(tmp_path, header).close()  # an extraction that stopped before finishing
    with pytest.raises(StoreError, match="1 process.*with a single process"):
        StoreWriter(tmp_path, header, world_size=2)
    StoreWriter(tmp_path, header, world_size=2, overwrite=True).close()  # the named fix


@pytest.mark.parametrize("start, total, batch, world, want", [
    (0, 20, 2, 2, [0, 10, 20]),
    (0, 21, 2, 2, [0, 10, 21]),  # 11 batches: 5 and 6
    (0, 7, 3, 2, [0, 3, 7]),  # blocks start at batch boundaries
    (4, 20, 2, 4, [4, 8, 12, 16, 20]),  # an extension starts where the store ends
    (0, 2, 2, 3, [0, 0, 0, 2]),  # fewer batches than processes: empty blocks
])
def test_blocks_are_whole_batches_in_order(start, total, batch, world, want):
    bounds = block_bounds(start, total, batch, world)
    assert bounds == want
    assert all((b - start) % batch == 0 for b in bounds[:-1])
