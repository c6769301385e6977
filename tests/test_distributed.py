"""Data-parallel training: two ranks over gloo on the CPU, launched with torchrun by the test.

The file is also the worker torchrun runs (``python tests/test_distributed.py SCENARIO DIR``):
each scenario trains on a tiny store in DIR and rank 0 saves what it got there. The test side
compares it with one process trained in-process on the same global batches: the same
dictionary within 1e-5 (every architecture, slicing global batches or reading only the rank's
rows), both ranks bit-identical, a run SIGKILLed after a checkpoint resuming bit for bit, a
resume with another world size re-sharded, and bad inputs refused on every rank.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
D, F, K, BATCH, STEPS = 16, 64, 4, 128, 40
# name: (store, settings). "resampling": ReLU on data of rank 2, where latents die and are
# resampled at steps 10, 20, 30 (each rank draws the same rows of the gathered batch).
CASES = {"topk": ("store", {"architecture": "topk"}),
         "standard": ("store", {"architecture": "standard"}),
         "batchtopk": ("store", {"architecture": "batchtopk"}),
         "jumprelu": ("store", {"architecture": "jumprelu"}),
         "resampling": ("lowrank_store", {"architecture": "standard", "resample_every": 10})}
# The interrupted runs: TopK stops on an exception on both ranks, then ReLU with resampling
# by a SIGKILL of rank 1, which ends the job; both at batch 25, after the step-20 checkpoint.
CHECKPOINTED = ["topk", "resampling"]
KILL_AT = 25


def settings(architecture: str, **extra) -> dict:
    return {"architecture": architecture, "d_sae": F, "k": K, "total_tokens": BATCH * STEPS,
            "lr": 3e-3, "l1_coefficient": 0.05, "dead_window_tokens": BATCH * 3, "log_every": 5,
            "progress": False, **extra}


def case(name: str, folder: Path, **extra):
    """The store and training settings of case ``name``."""
    from sae_nb.activations.store import ActivationStore

    store, options = CASES[name]
    return ActivationStore(folder / store), settings(**{**options, **extra})


def data(n: int = 2000, seed: int = 0, directions: int = 48, density: float = 0.08) -> np.ndarray:
    """Sparse combinations of a few hidden directions plus an offset: SAE-shaped data."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(directions, D, generator=g)
    codes = (torch.rand(n, directions, generator=g)
             * (torch.rand(n, directions, generator=g) < density))
    return (codes @ dirs + 3.0).numpy()


def make_store(path: Path, acts: np.ndarray, shard_rows: int = 300):
    from sae_nb.activations.store import INDEX_DTYPE, ActivationStore, StoreWriter

    header = {"model": "toy", "site": "resid_out_layer1", "module": "m", "io": "output",
              "d": acts.shape[1], "dtype": "float32", "tokenizer": "bytes", "mode": "tokens",
              "pool": None, "ctx_len": 10, "corpus": "toy", "text_column": None, "seed": 0,
              "prepend_bos": True, "exclude_bos": True, "bos_token_id": 256}
    writer = StoreWriter(path, header)
    for lo in range(0, len(acts), shard_rows):
        rows = np.arange(lo, min(lo + shard_rows, len(acts)))
        index = np.zeros(len(rows), dtype=INDEX_DTYPE)
        index["context"], index["offset"] = rows // 10, rows % 10
        writer.write_shard(acts[rows], index, units_end=int(rows[-1]) // 10 + 1)
    writer.finish()
    return ActivationStore(path)


def global_batches(store, seed: int = 0, batch: int = BATCH):
    return store.batches(batch, seed=seed, epochs=None, drop_last=True)


# ------------------------------------------------------------------------ the worker side


class Interrupted(Exception):
    pass


class Dying:
    """Rank-local batches that stop at batch ``at``: rank 1 kills its own process (SIGKILL),
    or every rank raises :class:`Interrupted`."""

    rank_local = True

    def __init__(self, inner, at: int, kill: bool):
        self.inner, self.at, self.kill, self.identity = inner, at, kill, inner.identity

    def __iter__(self):
        for i, batch in enumerate(self.inner):
            if i == self.at and not self.kill:
                raise Interrupted
            if i == self.at and int(os.environ["RANK"]) == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            yield batch


def save(result, name: str, out: Path, rank: int) -> None:
    torch.save({"state": result.dictionary.state_dict(), "log": result.log.to_dict("list")},
               out / f"{name}.rank{rank}.pt")


def worker(scenario: str, out: Path) -> None:
    from sae_nb.activations.store import ActivationStore
    from sae_nb.training.distributed import DistributedError, Group, rank_batches
    from sae_nb.training.trainer import TrainingError, train_dictionary

    rank = int(os.environ["RANK"])
    store = ActivationStore(out / "store")
    if scenario == "equal":
        for name in CASES:
            data_store, options = case(name, out)
            save(train_dictionary(global_batches(data_store), **options),
                 f"{name}_global", out, rank)
            save(train_dictionary(rank_batches(data_store, BATCH), **options),
                 f"{name}_local", out, rank)
        for name in CHECKPOINTED:  # the uninterrupted runs of the kill test
            data_store, options = case(name, out, checkpoint_dir=str(out / f"full_{name}"),
                                       checkpoint_every=10)
            save(train_dictionary(rank_batches(data_store, BATCH), **options),
                 f"{name}_full", out, rank)
    elif scenario in ("kill", "resume"):
        for name in CHECKPOINTED:
            data_store, options = case(name, out, checkpoint_dir=str(out / f"cut_{name}"),
                                       checkpoint_every=10)
            batches = rank_batches(data_store, BATCH)
            if scenario == "kill":
                batches = Dying(batches, KILL_AT, kill=name == "resampling")
            try:
                run = train_dictionary(batches, **options)
            except Interrupted:
                continue
            save(run, f"{name}_resumed", out, rank)
    elif scenario == "gpu":  # tests/test_gpu.py: two ranks sharing one GPU
        for arch in ("topk", "batchtopk"):
            for autocast in (False, True):
                run = train_dictionary(global_batches(store), **settings(
                    arch, device="cuda", autocast=autocast))
                save(run, f"gpu_{arch}_{autocast}", out, rank)
    elif scenario == "bad":
        other = ActivationStore(out / "other_store")

        def diverging():
            """Rank 1 adds to one gradient after the all-reduce: caught at the first checkpoint."""
            average = Group.average_gradients

            def skewed(self, params, extra=None):
                out = average(self, params, extra)
                params[0].grad[0, 0] += float(rank)
                return out

            Group.average_gradients = skewed
            try:
                train_dictionary(global_batches(store), **settings(
                    "topk", checkpoint_dir=str(out / "diverged"), checkpoint_every=5))
            finally:
                Group.average_gradients = average

        attempts = {
            "uneven_global": lambda: train_dictionary(global_batches(store, batch=127),
                                                      **settings("topk")),
            "uneven_local": lambda: rank_batches(store, 127),
            "stores": lambda: train_dictionary(rank_batches(store if rank == 0 else other, BATCH),
                                               **settings("topk")),
            "batches": lambda: train_dictionary(global_batches(store, seed=rank),
                                                **settings("topk")),
            "settings": lambda: train_dictionary(global_batches(store),
                                                 **settings("topk", seed=rank)),
            "diverged": diverging,
        }
        errors = {}
        for name, attempt in attempts.items():
            try:
                attempt()
                errors[name] = None
            except (DistributedError, TrainingError) as err:
                errors[name] = f"{type(err).__name__}: {err}"
        (out / f"bad.rank{rank}.json").write_text(json.dumps(errors))


# -------------------------------------------------------------------------- the test side


def torchrun(scenario: str, out: Path, ranks: int = 2,
             timeout: float = 150) -> subprocess.CompletedProcess:
    """Run this file's worker under torchrun; kill the whole process group on a timeout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={ranks}", __file__, scenario, str(out)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun {scenario} ran over {timeout} s:\n{output[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, output)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("distributed")
    make_store(out / "store", data())
    make_store(out / "other_store", data(seed=1))
    make_store(out / "lowrank_store", data(seed=2, directions=2, density=1.0))
    return out


@pytest.fixture(scope="module")
def equal_runs(folder) -> Path:
    done = torchrun("equal", folder)
    assert done.returncode == 0, done.stdout[-4000:]
    return folder


def load(folder: Path, name: str, rank: int = 0) -> dict:
    return torch.load(folder / f"{name}.rank{rank}.pt", weights_only=True)


def one_process(folder: Path, name: str, **extra):
    from sae_nb.training.trainer import train_dictionary

    store, options = case(name, folder, **extra)
    return train_dictionary(global_batches(store), **options)


def assert_close(state: dict, reference: dict, tol: float = 1e-5) -> None:
    for key, value in reference.items():
        torch.testing.assert_close(state[key], value, rtol=tol, atol=tol, msg=key)


def test_rank_batches_are_slices_of_the_store_batches(tmp_path):
    """Rank r's batch i is rows [r*b, (r+1)*b) of the store's global batch i, every epoch."""
    from sae_nb.training.distributed import DistributedError, Group, RankBatches

    store = make_store(tmp_path / "s", data(n=600))
    ranks = [iter(RankBatches(store, 90, seed=3, rows=slice(0, 500), group=Group(3, r)))
             for r in range(3)]
    whole = store.batches(90, seed=3, rows=slice(0, 500), epochs=None, drop_last=True)
    for _ in range(12):  # 5 batches per epoch: into the third epoch
        torch.testing.assert_close(torch.cat([next(r) for r in ranks]), next(whole), rtol=0, atol=0)
    with pytest.raises(DistributedError, match="batch_size=100 cannot be split over 3 ranks"):
        RankBatches(store, 100, group=Group(3, 0))


def test_one_process_group_is_a_no_op():
    from sae_nb.training.distributed import ONE_PROCESS, setup

    assert setup() is ONE_PROCESS and ONE_PROCESS.main
    t = torch.arange(4.0)
    assert ONE_PROCESS.sum_(t) is t and ONE_PROCESS.gather(t) is t
    assert ONE_PROCESS.average_gradients([], t) is t


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["global", "local"])
@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_train_the_dictionary_of_one_process(equal_runs, name, mode, caplog):
    """Same global batches: the same dictionary (1e-5) and log; both ranks hold it bit for bit."""
    with caplog.at_level("INFO", logger="sae_nb.training.trainer"):
        reference = one_process(equal_runs, name)
    assert ("Resampled" in caplog.text) == (name == "resampling")
    ranks = [load(equal_runs, f"{name}_{mode}", r) for r in (0, 1)]
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), f"ranks differ in {key}"
    # A resampled decoder row is the unit residual y - y_hat of a row: the cancellation there
    # magnifies rounding (one element 1.3e-5 off in a run); everything else holds 1e-5.
    assert_close(ranks[0]["state"], reference.dictionary.state_dict(),
                 1e-4 if name == "resampling" else 1e-5)
    got = ranks[0]["log"]
    for column in ("step", "tokens", "loss", "mse", "l0", "fvu", "dead_frac", "lr"):
        np.testing.assert_allclose(got[column], reference.log[column], rtol=1e-4, atol=1e-6,
                                   err_msg=column)


@pytest.mark.slow
def test_killed_two_rank_run_resumes_bit_for_bit(equal_runs, caplog):
    """SIGKILL of rank 1 after the step-20 checkpoint; a 2-rank rerun ends bit-identical to the
    uninterrupted 2-rank run; a 1-rank rerun of the same checkpoint is re-sharded (a warning)
    and ends equal within rounding."""
    folder = equal_runs
    killed = torchrun("kill", folder)
    assert killed.returncode != 0, killed.stdout[-3000:]
    assert "Signal 9" in killed.stdout or "SIGKILL" in killed.stdout, killed.stdout[-3000:]
    for name in CHECKPOINTED:
        saved = torch.load(folder / f"cut_{name}" / "checkpoint.pt", weights_only=True)
        assert saved["step"] == 20 and saved["world_size"] == 2
        shutil.copytree(folder / f"cut_{name}", folder / f"cut1_{name}")
    resumed = torchrun("resume", folder)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    for name in CHECKPOINTED:
        full, again = load(folder, f"{name}_full"), load(folder, f"{name}_resumed")
        for key, value in full["state"].items():
            assert torch.equal(value, again["state"][key]), f"{name}: {key} differs"
        assert full["log"] == again["log"]
        with caplog.at_level("WARNING", logger="sae_nb.training.trainer"):
            one = one_process(folder, name, checkpoint_dir=str(folder / f"cut1_{name}"),
                              checkpoint_every=10)
        assert "written by 2 rank(s), with 1: re-sharded" in caplog.text
        assert_close(one.dictionary.state_dict(), full["state"])


@pytest.mark.slow
def test_bad_inputs_are_refused_clearly_on_every_rank(folder):
    done = torchrun("bad", folder)
    assert done.returncode == 0, done.stdout[-4000:]
    for rank in (0, 1):
        errors = json.loads((folder / f"bad.rank{rank}.json").read_text())
        assert errors["uneven_global"].startswith("DistributedError: Batch 0 has 127 rows, which 2 "
                                                  "ranks cannot share evenly")
        assert "divisible by 2" in errors["uneven_global"]
        assert errors["uneven_local"].startswith("DistributedError: batch_size=127 cannot be "
                                                 "split over 2 ranks; use a multiple of 2")
        assert "disagree on the data" in errors["stores"]
        assert "same store" in errors["stores"]
        assert "disagree on the first global batch" in errors["batches"]
        assert "disagree on the training settings" in errors["settings"]
        assert "seed=0 (rank 0) vs 1 (rank 1)" in errors["settings"]
        assert "disagree on the dictionary's weights at step 5" in errors["diverged"]
        assert not (folder / "diverged" / "checkpoint.pt").exists()


if __name__ == "__main__":
    torch.set_num_threads(1)
    worker(sys.argv[1], Path(sys.argv[2]))
