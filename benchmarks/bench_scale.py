"""Benchmark: data-parallel training, 1 process x 2 threads against 2 processes x 1 thread.

Same store, same global batches, same settings as bench_train (TopK, d_in 576, 4608 latents,
k 32, batch 4096, fp32, ``resid_out_layer6`` of the default model, in ``outputs/bench/``). Each
configuration runs in its own interpreter: one process with 2 (and 1) torch threads, and
``torchrun --nproc_per_node 2`` (gloo, 1 thread per rank, each rank reading 2048 rows of every
batch with ``rank_batches``). Prints steady-state training tokens/s side by side, the time each
step spends in the gradient all-reduce (one flat buffer, 2·D·F + D + 2·F floats: waiting for the
slower rank included), a bare all-reduce of that buffer timed alone, and how far the 2-rank
dictionary lies from the 1-process one.

    nice python benchmarks/bench_scale.py                 # 24 steps per configuration
    nice python benchmarks/bench_scale.py --steps 48
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
D, F, K, BATCH = 576, 4608, 32, 4096
WARMUP = 4  # steps left out of the rate (first-touch allocations, caches)
STORE_TOKENS = BATCH * 9  # 8 whole batches; training cycles over them (speed, not quality)


class Timed:
    """Wrap rank-local batches, recording when the trainer asks for each one."""

    rank_local = True

    def __init__(self, inner):
        self.inner, self.identity, self.times = inner, inner.identity, []

    def __iter__(self):
        for batch in self.inner:
            self.times.append(time.perf_counter())
            yield batch


def worker(args) -> None:
    """One configuration: train ``args.steps`` steps, write its timings (rank 0)."""
    import torch

    from sae_nb.activations.store import ActivationStore
    from sae_nb.training.distributed import Group, rank_batches, setup
    from sae_nb.training.trainer import train_dictionary

    torch.set_num_threads(args.threads)
    group = setup()
    store = ActivationStore(args.store)
    reduce_times: list[float] = []
    average = Group.average_gradients

    def timed_average(self, params, extra=None):
        start = time.perf_counter()
        out = average(self, params, extra)
        reduce_times.append(time.perf_counter() - start)
        return out

    Group.average_gradients = timed_average
    batches = Timed(rank_batches(store, BATCH, seed=0))
    result = train_dictionary(batches, architecture="topk", d_sae=F, k=K,
                              total_tokens=BATCH * args.steps, seed=0, progress=False)
    Group.average_gradients = average
    steps = [b - a for a, b in zip(batches.times[WARMUP:], batches.times[WARMUP + 1:])]
    bare = []
    if group.world > 1:  # the same buffer alone: the wire cost without waiting for the other rank
        buffer = torch.zeros(2 * D * F + D + 2 * F)
        for _ in range(6):
            group.barrier()
            start = time.perf_counter()
            group.sum_(buffer)
            bare.append(time.perf_counter() - start)
        bare = bare[1:]
    if group.main:
        torch.save(result.dictionary.state_dict(), f"{args.out}.pt")
        Path(f"{args.out}.json").write_text(json.dumps({
            "world": group.world, "threads": torch.get_num_threads(), "step_s": steps,
            "reduce_s": reduce_times[WARMUP:], "bare_reduce_s": bare,
            "fvu": float(result.log["fvu"].iloc[-1])}))


def run(config: str, store: Path, steps: int, out: Path) -> dict:
    threads, world = {"1x2": (2, 1), "1x1": (1, 1), "2x1": (1, 2)}[config]
    target = [str(Path(__file__).resolve()), "--worker", "--store", str(store), "--steps",
              str(steps), "--threads", str(threads), "--out", str(out / config)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    command = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={world}"] if world > 1 else [sys.executable]) + target
    subprocess.run(command, check=True, env=env, cwd=ROOT)
    return json.loads((out / f"{config}.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24, help="training steps per configuration")
    parser.add_argument("--site", default="resid_out_layer6")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    import numpy as np
    import torch

    import sae_nb

    store = sae_nb.extract_activations(sae_nb.load_model(), ROOT / "outputs" / "bench",
                                       sites=[args.site], n_tokens=STORE_TOKENS,
                                       dtype="float32")[args.site]
    load = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for config in ("1x2", "2x1", "1x1"):
            results[config] = run(config, store.path, args.steps, Path(tmp))
        states = {c: torch.load(Path(tmp) / f"{c}.pt", weights_only=True) for c in results}
    # Largest difference over each tensor's largest magnitude, the worst tensor.
    gaps = {c: max(float((states["1x2"][k] - states[c][k]).abs().max()
                         / states["1x2"][k].abs().max())
                   for k in states[c]) for c in ("2x1", "1x1")}
    buffer_mb = (2 * D * F + D + 2 * F) * 4 / 1e6
    print(f"torch {torch.__version__}; TopK d_in {D}, d_sae {F}, k {K}, global batch {BATCH}, "
          f"fp32, {args.site}, {len(store):,} rows; {args.steps} steps per run, rate over the "
          f"last {args.steps - WARMUP - 1}; load average before: "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} cores")
    print(f"{'configuration':<32}{'tokens/s':>10}{'s/step':>9}{'all-reduce s/step':>19}"
          f"{'share':>7}{'last FVU':>10}")
    names = {"1x2": "1 process x 2 threads", "2x1": "2 processes x 1 thread (gloo)",
             "1x1": "1 process x 1 thread"}
    for config, r in results.items():
        step = float(np.median(r["step_s"]))
        reduce = float(np.median(r["reduce_s"])) if r["reduce_s"] else 0.0
        print(f"{names[config]:<32}{BATCH / step:>10,.0f}{step:>9.3f}{reduce:>19.4f}"
              f"{reduce / step:>7.1%}{r['fvu']:>10.4f}")
    bare = float(np.median(results["2x1"]["bare_reduce_s"]))
    print(f"bare all-reduce of the {buffer_mb:.1f} MB gradient buffer, 2 ranks: "
          f"{bare * 1e3:.1f} ms ({buffer_mb / bare:,.0f} MB/s)")
    print(f"weights against the 1x2 run's (largest difference / largest weight, worst tensor): "
          f"2x1 {gaps['2x1']:.1e}, 1x1 {gaps['1x1']:.1e}. The ranks sum gradients in another "
          f"order, and the rounding grows over the steps (tests: 1e-5 over 40 small steps).")


if __name__ == "__main__":
    main()
