"""Benchmark: Matryoshka BatchTopK training speed against plain BatchTopK, same batches, one run.

Both train on the identical list of batches (materialised in memory first, so reading is not
timed), alternating which goes first over ``--repeats`` rounds; prints each one's tokens/s (the
median over rounds), their ratio of medians and of best rounds (goal >= 0.8x), and each
dictionary's held-out FVU and per-prefix FVU (the Matryoshka prefixes should reconstruct better
than plain BatchTopK's).
Then the wall time of notebook 09's default grid (its parameters cell's values: the lab grid,
and the real grid on ``outputs/default``'s store with CE recovered when the main job wrote it)
on ``--grid-threads`` torch threads (default 2, the development machine's cores); ``--no-grid``
skips it.

Data: the ``resid_out_layer6`` store of the default model under ``outputs/bench/`` when
present (``benchmarks/bench_train.py`` extracts it), else synthetic sparse activations.

    python benchmarks/bench_compare.py                     # d 576, 4608 latents, k 32, batch 4096
    python benchmarks/bench_compare.py --tokens 32768 --repeats 1 --device cuda
"""

from __future__ import annotations

import argparse
import ast
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
D, F, K, BATCH = 576, 4608, 32, 4096


def load_rows(n: int, heldout: int, site: str,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(train rows, held-out rows, source)``: the bench store's rows (the last ``heldout``
    held out, training rows repeated in fresh shuffles up to ``n``), else synthetic ones."""
    g = torch.Generator().manual_seed(seed)
    try:
        from sae_nb.activations.store import open_store

        store = open_store(ROOT / "outputs" / "bench", site)
        rows = torch.as_tensor(store[:], dtype=torch.float32)
        if len(rows) > heldout + 4096:
            train, held = rows[:-heldout], rows[-heldout:]
            epochs = -(-n // len(train))
            order = torch.cat([torch.randperm(len(train), generator=g) for _ in range(epochs)])
            return train[order[:n]], held, f"store {site} ({len(store):,} rows, {epochs} epoch(s))"
        print(f"(the store has {len(rows):,} rows, too few; synthetic activations)")
    except Exception as err:  # noqa: BLE001 - any missing or partial store: synthetic instead
        print(f"(no usable store: {type(err).__name__}: {err}; synthetic activations)")
    dirs = torch.randn(8 * D, D, generator=g) / D ** 0.5
    codes = (torch.rand(n + heldout, 8 * D, generator=g)
             * (torch.rand(n + heldout, 8 * D, generator=g) < 0.01))
    rows = codes @ dirs + 0.1 * torch.randn(n + heldout, D, generator=g)
    return rows[:n], rows[n:], "synthetic"


def grid_wall_time(threads: int) -> None:
    """Time notebook 09's default grid (lab, then real activations when outputs/default has
    the store) with the notebook's own default values."""
    import sae_nb
    from sae_nb.comparison import grid as compare
    from sae_nb.comparison import synthetic
    from sae_nb.running.notebooks import notebook_parameters

    nb = ROOT / "notebooks" / "09_compare.ipynb"
    p = {k: ast.literal_eval(v["default"]) for k, v in notebook_parameters(nb).items()}
    torch.set_num_threads(threads)
    start = time.perf_counter()
    lab = synthetic.make_lab(rows=p["lab_rows"], n_features=p["lab_features"], d=p["lab_d"],
                             mean_l0=4, n_parents=p["lab_features"] // 16)
    lab_grid = compare.train_grid(lab, p["architectures"], p["lab_ks"], p["seeds"],
                                  d_sae=p["lab_d_sae"], total_tokens=p["lab_tokens"],
                                  batch_size=p["batch_size"], heldout=p["lab_heldout"],
                                  n_resamples=p["n_resamples"], device="cpu", lr=p["lab_lr"])
    lab_s = time.perf_counter() - start
    print(f"notebook 09's lab grid ({len(lab_grid.table)} runs): {lab_s:.1f} s "
          f"on {threads} threads")
    try:
        store = sae_nb.open_store(ROOT / "outputs" / "default", p["site"], p["model"])
    except Exception as err:  # noqa: BLE001 - no main job yet: the lab grid alone
        print(f"(no outputs/default store: {type(err).__name__}; the real grid is not timed)")
        return
    start = time.perf_counter()
    split = sae_nb.heldout_split(store, p["heldout_tokens"], p["ce_contexts"])
    lm = sae_nb.load_model(p["model"], device="cpu")
    real = compare.train_grid(split, p["architectures"], p["ks"], p["seeds"], d_sae=p["d_sae"],
                              total_tokens=p["total_tokens"], batch_size=p["batch_size"],
                              model=lm, n_resamples=p["n_resamples"], device="cpu")
    real_s = time.perf_counter() - start
    print(f"notebook 09's real grid ({len(real.table)} runs, model load included): {real_s:.1f} s; "
          f"default grid in all: {lab_s + real_s:.1f} s on {threads} threads")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=131_072, help="training tokens per run")
    parser.add_argument("--heldout", type=int, default=16_384)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--site", default="resid_out_layer6")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--d-sae", type=int, default=F)
    parser.add_argument("--k", type=int, default=K)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--grid-threads", type=int, default=2)
    parser.add_argument("--no-grid", action="store_true", help="skip notebook 09's grid timing")
    args = parser.parse_args()
    from sae_nb.training.objectives import default_matryoshka_widths, matryoshka_prefix_losses
    from sae_nb.training.trainer import train_dictionary

    steps = max(1, args.tokens // args.batch)
    train, held, source = load_rows(steps * args.batch, args.heldout, args.site)
    batches = list(train.split(args.batch))
    widths = default_matryoshka_widths(args.d_sae)
    print(f"data: {source}; d_in {train.shape[1]}, d_sae {args.d_sae}, k {args.k}, batch "
          f"{args.batch}, {steps} steps, device {args.device}, torch threads "
          f"{torch.get_num_threads()}; Matryoshka widths {list(widths)}")
    kw = dict(d_sae=args.d_sae, k=args.k, total_tokens=steps * args.batch, seed=0,
              progress=False, device=args.device)
    archs = ("batchtopk", "matryoshka_batchtopk")
    rates: dict[str, list[float]] = {a: [] for a in archs}
    results = {}
    for r in range(args.repeats):
        for arch in (archs if r % 2 == 0 else archs[::-1]):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            results[arch] = train_dictionary(iter(batches), architecture=arch, **kw)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            rates[arch].append(steps * args.batch / (time.perf_counter() - start))
    held = held.to(args.device)
    var = float((held - held.mean(0)).pow(2).sum(1).mean())
    for arch in archs:
        sae = results[arch].dictionary
        fvu = [m / var for m in matryoshka_prefix_losses(sae, held, widths)]
        print(f"{arch:>22}: {statistics.median(rates[arch]):>10,.0f} tokens/s "
              f"(rounds: {', '.join(f'{v:,.0f}' for v in rates[arch])}); held-out FVU by prefix "
              f"{', '.join(f'{w}: {v:.3f}' for w, v in zip(widths, fvu))}")
    ratio = statistics.median(rates["matryoshka_batchtopk"]) / statistics.median(rates["batchtopk"])
    best = max(rates["matryoshka_batchtopk"]) / max(rates["batchtopk"])
    print(f"Matryoshka / BatchTopK speed: {ratio:.2f}x of medians, {best:.2f}x of best rounds "
          f"(goal >= 0.8x; on a shared machine the best rounds are the least disturbed)")
    if not args.no_grid:
        grid_wall_time(args.grid_threads)


if __name__ == "__main__":
    main()
