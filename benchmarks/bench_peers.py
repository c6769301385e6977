"""Benchmark: our TopK trainer against dictionary_learning's, SAELens's and sparsify's, one run.

All train a TopK SAE (d_in 576 -> 4608 latents, k 32, batch 4096, fp32, CPU) on the identical
rows in the identical order: the training batches are drawn once from the store (its shuffled
iterator, seed 0) and dumped to ``outputs/bench-peers/train.npy`` (float32, one batch after
another) with the held-out rows (the store's last ``--heldout``) beside them; each trainer reads
that file. The peers run their own code with their own defaults in their own environment
(``.ci/peers-env``: SAELens's pinned environment plus dictionary_learning and sparsify, built on
first use) through ``benchmarks/peers_side.py``, which returns the held-out reconstruction and
each held-out token's count of nonzero latents. sparsify runs twice: ``sparsify`` is its default
step (sign SGD under a schedule-free wrapper), ``sparsify_adam`` its ``optimizer="adam"``.

Each trainer is trained once per seed (``--seeds``: 0, 1, ...; the seed sets the model's
initialisation, the batches stay the same), seeds outermost so that a slower moment of the machine
falls on every trainer alike. Prints each run, then per trainer: tokens/s over the training steps
only (batch reading excluded; median over seeds), held-out FVU (squared error over the variance
around the held-out mean; mean over seeds and its 95% t-interval, n - 1 degrees of freedom) and
held-out L0 (mean nonzero latents per held-out token), each computed by one function for all;
then our tokens/s over each peer's and our FVU minus sparsify's with its 95% Welch t-interval.

Data: ``resid_out_layer6`` activations of the default model, extracted once into
``outputs/bench/`` (as ``benchmarks/bench_train.py`` does; resumable) and reused.

    python benchmarks/bench_peers.py                       # 1M training tokens, 65,536 held out
    python benchmarks/bench_peers.py --tokens 131072 --heldout 16384 --seeds 2
    python benchmarks/bench_peers.py --only ours sparsify  # a subset
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
from bench_train import Timed  # benchmarks/, this script's folder, is on the path
from peers_side import PEERS, nonzero_per_token
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
D, F, K, BATCH = 576, 4608, 32, 4096
# Ours at its defaults (on a CPU with AMX: the certified bfloat16 screen), ours with the dense
# float32 encoder, and ours with sparsify's step (sign descent under schedule-free averaging, no
# AuxK): the same optimiser in both trainers, the rest of each trainer its own.
OURS = {"ours": {}, "ours_fp32": {"encoder_precision": "float32"},
        "ours_signsgd": {"optimizer": "signsgd_schedulefree", "auxk_alpha": 0.0}}
TRAINERS = tuple(OURS) + PEERS
SPLIT = 8192  # held-out rows encoded at a time


def fvu(x: np.ndarray, x_hat: np.ndarray) -> float:
    """Held-out FVU, the same for every trainer: sum of squared error / total variance."""
    x, x_hat = x.astype(np.float64), x_hat.astype(np.float64)
    return float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def l0(nonzero: np.ndarray) -> float:
    """Held-out L0, the same for every trainer: mean number of nonzero latents per token
    (``nonzero``: each token's count, from peers_side's ``nonzero_per_token``)."""
    return float(np.mean(nonzero, dtype=np.float64))


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (n - 1 degrees of freedom; nan for n 1)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / len(v) ** 0.5)


def difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """``mean(a) - mean(b)`` and the half-width of its 95% Welch t-interval (the seeds of two
    trainers are independent draws, not pairs; nan with fewer than 2 of either)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    diff = float(a.mean() - b.mean())
    if min(len(a), len(b)) < 2:
        return diff, float("nan")
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:
        return diff, 0.0
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return diff, float(stats.t.ppf(0.975, df) * (va + vb) ** 0.5)


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


def train_ours(out: Path, seed: int,
               options: dict) -> tuple[float, np.ndarray, np.ndarray, dict]:
    """Our trainer on the dump: seconds, held-out reconstruction, nonzero latents per held-out
    token, and what to print beside them."""
    from sae_nb.training.trainer import train_dictionary

    train = np.load(out / "train.npy", mmap_mode="r")
    steps = len(train) // BATCH
    # The same rows in the same order as the peers; reading them is left out.
    batches = Timed(torch.from_numpy(np.array(train[i * BATCH:(i + 1) * BATCH]))
                    for i in range(steps))
    start = time.perf_counter()
    result = train_dictionary(batches, architecture="topk", d_sae=F, k=K,
                              total_tokens=steps * BATCH, seed=seed, progress=False, **options)
    seconds = time.perf_counter() - start - batches.seconds
    heldout = torch.from_numpy(np.load(out / "heldout.npy"))
    x_hats, nonzero = [], []
    with torch.no_grad():  # the contract's codes and reconstruction
        for x in heldout.split(SPLIT):
            codes, x_hat = result.dictionary.encode_and_reconstruct(x)
            x_hats.append(x_hat.numpy())
            nonzero.append(nonzero_per_token(codes))
    return seconds, np.concatenate(x_hats), np.concatenate(nonzero), {
        "lr": result.config.learning_rate(F)}


def train_peer(peer: str, out: Path, python: str,
               seed: int) -> tuple[float, np.ndarray, np.ndarray, dict]:
    """One peer on the dump, in the peers environment: as :func:`train_ours`."""
    subprocess.run([python, str(ROOT / "benchmarks" / "peers_side.py"), peer, str(out),
                    "--seed", str(seed), "--k", str(K), "--d-sae", str(F), "--batch", str(BATCH)],
                   check=True, env={**os.environ, "PYTHONPATH": ""})
    run = f"{peer}-seed{seed}"
    info = json.loads((out / f"{run}.json").read_text())
    return (info["seconds"], np.load(out / f"{run}_xhat.npy"), np.load(out / f"{run}_nonzero.npy"),
            info)


def summary(runs: dict[str, list[dict]]) -> None:
    """Per trainer over its seeds, then ours against each peer."""
    seeds = ", ".join(sorted({str(len(rows)) for rows in runs.values()}))
    print(f"\nover {seeds} seeds: median tokens/s, held-out FVU's mean [95% t-interval], mean L0")
    for name, rows in runs.items():
        mean, half = interval([r["fvu"] for r in rows])
        print(f"{name:>20}: {np.median([r['rate'] for r in rows]):8,.0f} tokens/s, held-out FVU "
              f"{mean:.4f} [{mean - half:.4f}, {mean + half:.4f}], L0 "
              f"{np.mean([r['l0'] for r in rows]):.2f}")
    for ours in (name for name in OURS if name in runs):
        rate = np.median([r["rate"] for r in runs[ours]])
        ratios = ", ".join(f"{rate / np.median([r['rate'] for r in rows]):.2f}x {name}"
                           for name, rows in runs.items() if name not in OURS)
        if ratios:
            print(f"{ours} / peer, median tokens/s: {ratios}")
        if "sparsify" in runs:
            diff, half = difference([r["fvu"] for r in runs[ours]],
                                    [r["fvu"] for r in runs["sparsify"]])
            print(f"held-out FVU, {ours} - sparsify: {diff:+.4f} [{diff - half:+.4f}, "
                  f"{diff + half:+.4f}] (95% Welch t-interval)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1_000_000, help="training budget")
    parser.add_argument("--heldout", type=int, default=65_536)
    parser.add_argument("--seeds", type=int, default=3,
                        help="trainings per trainer, seeds 0 .. SEEDS-1 (the model's init)")
    parser.add_argument("--site", default="resid_out_layer6")
    parser.add_argument("--run-dir", type=Path, default=ROOT / "outputs" / "bench",
                        help="the run folder holding (or to hold) the store")
    parser.add_argument("--only", nargs="+", choices=TRAINERS, default=TRAINERS)
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: train at least once (3 or more for an interval)")
    out = ROOT / "outputs" / "bench-peers"
    steps = dump_batches(args.run_dir, args.site, args.tokens, args.heldout, out)
    python = None
    if set(args.only) & set(PEERS):
        python = subprocess.run([str(ROOT / ".ci" / "peers-env")], check=True, text=True,
                                stdout=subprocess.PIPE).stdout.strip().splitlines()[-1]
    heldout = np.load(out / "heldout.npy")
    print(f"TopK d_in {D} -> {F}, k {K}, batch {BATCH}, fp32, CPU, {torch.get_num_threads()} "
          f"threads; {steps} steps = {steps * BATCH:,} training tokens of {args.site}, the same "
          f"{len(heldout):,} held-out tokens; seeds 0-{args.seeds - 1}; load "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    runs = {name: [] for name in args.only}
    for seed in range(args.seeds):
        for name in args.only:
            seconds, x_hat, nonzero, info = (train_ours(out, seed, OURS[name]) if name in OURS
                                             else train_peer(name, out, python, seed))
            runs[name].append({"rate": steps * BATCH / seconds, "fvu": fvu(heldout, x_hat),
                               "l0": l0(nonzero)})
            print(f"{name:>20} seed {seed}: {runs[name][-1]['rate']:8,.0f} tokens/s "
                  f"({seconds:6.1f} s), held-out FVU {runs[name][-1]['fvu']:.4f}, L0 "
                  f"{runs[name][-1]['l0']:.2f}, lr {info['lr']:.2e}", flush=True)
    summary(runs)
    print(f"(load at the end {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    sys.exit(main())
