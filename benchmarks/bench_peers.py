"""Benchmark: our TopK trainer against dictionary_learning's and SAELens's, same batches, one run.

All three train a TopK SAE (d_in 576 -> 4608 latents, k 32, batch 4096, fp32, CPU) on the
identical rows in the identical order: the training batches are drawn once from the store
(its shuffled iterator, seed 0) and dumped to ``outputs/bench-peers/train.npy`` (float32, one
batch after another) with the held-out rows (the store's last ``--heldout``) beside them; each
trainer reads that file. The peers run their own code with their own defaults in their own
environment (``.ci/peers-env``: SAELens's pinned environment plus dictionary_learning, built on
first use) through ``benchmarks/peers_side.py``, which returns the held-out reconstruction.
Prints, per trainer, tokens/s over the training steps only (batch reading excluded) and the
held-out FVU, computed by one function for all (squared error over the variance around the
held-out mean), and the ratio of our tokens/s to the faster peer's.

Data: ``resid_out_layer6`` activations of the default model, extracted once into
``outputs/bench/`` (as ``benchmarks/bench_train.py`` does; resumable) and reused.

    python benchmarks/bench_peers.py                       # 1M training tokens, 65,536 held out
    python benchmarks/bench_peers.py --tokens 131072 --heldout 16384 --run-dir outputs/default
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
D, F, K, BATCH = 576, 4608, 32, 4096
PEERS = ("dictionary_learning", "saelens")


def fvu(x: np.ndarray, x_hat: np.ndarray) -> float:
    """Held-out FVU, the same for every trainer: sum of squared error / total variance."""
    x, x_hat = x.astype(np.float64), x_hat.astype(np.float64)
    return float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def dump_batches(run_dir: Path, site: str, tokens: int, heldout: int, out: Path) -> int:
    """Write the training batches in order and the held-out rows; reused when they match."""
    steps = tokens // BATCH
    meta = {"run_dir": str(run_dir.resolve()), "site": site, "steps": steps, "batch": BATCH,
            "heldout": heldout, "seed": 0}
    if (out / "meta.json").exists() and json.loads((out / "meta.json").read_text()) == meta:
        return steps
    from sae_nb.activations.store import open_store

    try:
        store = open_store(run_dir, site)
    except Exception:  # noqa: BLE001 - missing or partial: extract (resumable), as bench_train
        import sae_nb

        store = sae_nb.extract_activations(sae_nb.load_model(), run_dir, sites=[site],
                                           n_tokens=tokens + heldout + BATCH, dtype="float32")[site]
    n_train = len(store) - heldout
    if n_train < BATCH:
        raise SystemExit(f"The store under {run_dir} has {len(store):,} rows: too few for "
                         f"--heldout {heldout} and a batch of {BATCH}; lower --heldout.")
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)
    train = np.lib.format.open_memmap(out / "train.npy", mode="w+", dtype=np.float32,
                                      shape=(steps * BATCH, store.d))
    source = store.batches(BATCH, rows=slice(0, n_train), epochs=None, drop_last=True, seed=0)
    for i, x in zip(range(steps), source):
        train[i * BATCH:(i + 1) * BATCH] = x.numpy()
    train.flush()
    np.save(out / "heldout.npy", np.asarray(store[n_train:], dtype=np.float32))
    (out / "meta.json").write_text(json.dumps(meta))
    return steps


def train_ours(out: Path) -> tuple[float, np.ndarray, dict]:
    from sae_nb.training.trainer import train_dictionary

    train = np.load(out / "train.npy", mmap_mode="r")
    steps = len(train) // BATCH
    reading = [0.0]

    def batches():  # the same rows in the same order as the peers; reading time excluded
        for i in range(steps):
            start = time.perf_counter()
            x = torch.from_numpy(np.array(train[i * BATCH:(i + 1) * BATCH]))
            reading[0] += time.perf_counter() - start
            yield x

    start = time.perf_counter()
    result = train_dictionary(batches(), architecture="topk", d_sae=F, k=K,
                              total_tokens=steps * BATCH, seed=0, progress=False)
    seconds = time.perf_counter() - start - reading[0]
    heldout = torch.from_numpy(np.load(out / "heldout.npy"))
    with torch.no_grad():
        x_hat = result.dictionary.reconstruct(heldout).numpy()  # the contract's reconstruction
    return seconds, x_hat, {"lr": result.config.learning_rate(F)}


def train_peer(peer: str, out: Path, python: str) -> tuple[float, np.ndarray, dict]:
    subprocess.run([python, str(ROOT / "benchmarks" / "peers_side.py"), peer, str(out),
                    "--k", str(K), "--d-sae", str(F), "--batch", str(BATCH)], check=True,
                   env={**os.environ, "PYTHONPATH": ""})
    info = json.loads((out / f"{peer}.json").read_text())
    return info["seconds"], np.load(out / f"{peer}_xhat.npy"), info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1_000_000, help="training budget")
    parser.add_argument("--heldout", type=int, default=65_536)
    parser.add_argument("--site", default="resid_out_layer6")
    parser.add_argument("--run-dir", type=Path, default=ROOT / "outputs" / "bench",
                        help="the run folder holding (or to hold) the store")
    parser.add_argument("--only", nargs="+", choices=("ours",) + PEERS, default=("ours",) + PEERS)
    args = parser.parse_args()
    out = ROOT / "outputs" / "bench-peers"
    steps = dump_batches(args.run_dir, args.site, args.tokens, args.heldout, out)
    python = None
    if set(args.only) & set(PEERS):
        python = subprocess.run([str(ROOT / ".ci" / "peers-env")], check=True, text=True,
                                stdout=subprocess.PIPE).stdout.strip().splitlines()[-1]
    heldout = np.load(out / "heldout.npy")
    print(f"TopK d_in {D} -> {F}, k {K}, batch {BATCH}, fp32, CPU, {torch.get_num_threads()} "
          f"threads; {steps} steps = {steps * BATCH:,} training tokens of {args.site}, the same "
          f"{len(heldout):,} held-out tokens; load {os.getloadavg()[0]:.2f}", flush=True)
    rates = {}
    for name in args.only:
        seconds, x_hat, info = train_ours(out) if name == "ours" else train_peer(name, out, python)
        rates[name] = steps * BATCH / seconds
        print(f"{name:>20}: {rates[name]:8,.0f} tokens/s ({seconds:6.1f} s), held-out FVU "
              f"{fvu(heldout, x_hat):.4f}, lr {info['lr']:.2e}", flush=True)
    peers = [rates[p] for p in PEERS if p in rates]
    if "ours" in rates and peers:
        print(f"ours / faster peer: {rates['ours'] / max(peers):.2f}x tokens/s "
              f"(load at the end {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    sys.exit(main())
