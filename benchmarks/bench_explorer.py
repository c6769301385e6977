"""Benchmark: how long the feature explorer takes to switch from one latent to another.

Uses the shipped default dictionary (``resid_out_layer6`` of SmolLM2-135M, 4608 latents) on the
``resid_out_layer6`` store of a run folder; when the run has none, a small one is extracted
there first. Statistics and logit effects are computed once (and cached in the run folder).
Then the explorer shows ``--latents`` different live latents, each for the first time (its top
contexts are encoded and rendered), and once more (from the explorer's cache), and the time of
each ``show_latent`` call, which is what a slider move or a typed number runs, is printed
against the 100 ms target.

    python benchmarks/bench_explorer.py                       # outputs/default
    python benchmarks/bench_explorer.py --run-dir /tmp/run --latents 50
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch

import sae_nb
from sae_nb.activations.store import StoreError
from sae_nb.latents.stats import feature_stats, logit_effects, stats_folder
from sae_nb.running.notebooks import OUTPUTS_DIR
from sae_nb.views.dashboard import dictionary_label
from sae_nb.views.explorer import FeatureExplorer

SITE = "resid_out_layer6"
TARGET_MS = 100.0


def store_for(run_dir: Path, model, n_tokens: int):
    """The run's store of ``SITE``, extracted first when the run has none."""
    try:
        return sae_nb.open_store(run_dir, SITE, sae_nb.DEFAULT_MODEL)
    except StoreError:
        print(f"No {SITE} store under {run_dir}; extracting {n_tokens:,} tokens there.")
        return sae_nb.extract_activations(model, run_dir, sites=[SITE], n_tokens=n_tokens,
                                          ctx_len=128, progress=False)[SITE]


def time_switches(explorer: FeatureExplorer, latents: list[int]) -> np.ndarray:
    """Milliseconds of ``show_latent`` for each latent, in order."""
    out = []
    for latent in latents:
        start = time.perf_counter()
        explorer.show_latent(latent)
        out.append((time.perf_counter() - start) * 1000)
    return np.array(out)


def report(name: str, ms: np.ndarray) -> None:
    verdict = "meets" if np.percentile(ms, 95) < TARGET_MS else "MISSES"
    print(f"{name:<34} median {np.median(ms):6.1f} ms   p95 {np.percentile(ms, 95):6.1f} ms   "
          f"max {ms.max():6.1f} ms   ({verdict} the {TARGET_MS:.0f} ms target at p95)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default=str(OUTPUTS_DIR / "default"))
    parser.add_argument("--latents", type=int, default=30, help="latents to switch between")
    parser.add_argument("--n-tokens", type=int, default=50_000,
                        help="tokens to extract when the run has no store")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(args.seed)

    run_dir = Path(args.run_dir)
    model = sae_nb.load_model()
    sae = sae_nb.load_default_dictionary()
    store = store_for(run_dir, model, args.n_tokens)
    folder = stats_folder(run_dir, dictionary_label(sae))
    start = time.perf_counter()
    stats = feature_stats(store, sae, cache=folder, progress=False)
    effects = logit_effects(model, sae, cache=folder)
    print(f"store: {len(store):,} rows of {SITE}; statistics and logit effects ready in "
          f"{time.perf_counter() - start:.1f} s (cached in {folder})")

    start = time.perf_counter()
    explorer = FeatureExplorer(stats, store, sae, model=model, logit_effects=effects)
    print(f"explorer built and first latent shown in {time.perf_counter() - start:.2f} s; "
          f"torch threads {torch.get_num_threads()}")
    alive = np.nonzero(stats.density > 0)[0]
    rng = np.random.default_rng(args.seed)
    latents = [int(i) for i in rng.choice(alive[alive != explorer.latent],
                                          min(args.latents, len(alive) - 1), replace=False)]
    first = time_switches(explorer, latents)
    again = time_switches(explorer, latents)
    print(f"{len(latents)} latents, {explorer.n_contexts} top contexts each "
          f"({explorer.before} tokens before, {explorer.after} after):")
    report("first view (encode + render)", first)
    report("cached view", again)


if __name__ == "__main__":
    main()
