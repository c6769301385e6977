"""Benchmark: the feature-statistics pass on the shipped dictionary, against a naive baseline.

Times :func:`sae_nb.latents.stats.feature_stats` over one activation store at the dictionary's site
(``resid_out_layer6`` of SmolLM2-135M, 576 -> 4608, k 32), with no cache. The baseline is what a
first script does: encode each chunk densely (``dictionary.encode``, ``(B, F)``) and update each
latent's count, sum, max and top rows in a Python loop over latents. It runs on the first
``--baseline-chunks`` chunks only (it is far slower) and its rate is extrapolated. Also timed:
:func:`latent_contexts` for one latent's top rows (what the explorer does on each latent
switch) and :func:`logit_effects` over all latents.

    python benchmarks/bench_features.py --run-dir outputs/default     # a run of notebook 01
    python benchmarks/bench_features.py                               # extracts 100k tokens first

Timings on a shared machine are noisy: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

SITE = "resid_out_layer6"


def open_or_extract(model, run_dir: str | None, n_tokens: int):
    """The store of ``SITE`` in ``run_dir``, or one extracted into outputs/bench-features
    (resumed, not redone, on the next run)."""
    import sae_nb

    if run_dir is not None:
        return sae_nb.open_store(run_dir, SITE)
    run_dir = Path("outputs") / "bench-features"
    print(f"extracting {n_tokens} tokens of {SITE} into {run_dir} ...")
    return sae_nb.extract_activations(model, run_dir, sites=[SITE], n_tokens=n_tokens,
                                      progress=False)[SITE]


@torch.no_grad()
def naive_baseline(store, dictionary, batch_size: int, n_chunks: int, n_top: int = 20) -> float:
    """Dense encode per chunk, a Python loop over latents; returns tokens/s."""
    F = dictionary.d_sae
    count, total, peak = np.zeros(F), np.zeros(F), np.zeros(F)
    top_vals = [torch.empty(0) for _ in range(F)]
    top_rows = [torch.empty(0, dtype=torch.long) for _ in range(F)]
    rows_done = 0
    start = time.perf_counter()
    for i, (first, array) in enumerate(store.chunks(batch_size)):
        if i == n_chunks:
            break
        codes = dictionary.encode(torch.from_numpy(array))  # (B, F) dense
        rows = torch.arange(first, first + len(array))
        for f in range(F):
            col = codes[:, f]
            fired = col > 0
            count[f] += int(fired.sum())
            total[f] += float(col.sum())
            peak[f] = max(peak[f], float(col.max()))
            vals = torch.cat([top_vals[f], col[fired]])
            cand = torch.cat([top_rows[f], rows[fired]])
            best = vals.topk(min(n_top, len(vals))).indices
            top_vals[f], top_rows[f] = vals[best], cand[best]
        rows_done += len(array)
    return rows_done / (time.perf_counter() - start)


def time_contexts(store, dictionary, stats, tokenizer, n_latents: int = 10) -> float:
    """Mean ms of latent_contexts over the top rows of the densest latents."""
    from sae_nb.latents.contexts import latent_contexts

    latents = np.argsort(-stats.density)[:n_latents]
    latent_contexts(store, dictionary, int(latents[0]), stats.top_rows[latents[0]], tokenizer,
                    stats=stats)
    start = time.perf_counter()
    for latent in latents:
        latent_contexts(store, dictionary, int(latent), stats.top_rows[latent], tokenizer,
                        stats=stats)
    return (time.perf_counter() - start) / len(latents) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default=None,
                        help="a run folder holding a resid_out_layer6 store")
    parser.add_argument("--n-tokens", type=int, default=100_000,
                        help="tokens to extract when no --run-dir is given")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--baseline-chunks", type=int, default=2)
    parser.add_argument("--skip-logits", action="store_true")
    args = parser.parse_args()

    import sae_nb
    from sae_nb.latents.stats import feature_stats, logit_effects

    model = sae_nb.load_model()
    store = open_or_extract(model, args.run_dir, args.n_tokens)
    dictionary = sae_nb.load_default_dictionary()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; store {len(store)} rows x "
          f"{store.d} ({store.manifest['dtype']}), dictionary {dictionary.d_in} -> "
          f"{dictionary.d_sae}, k {dictionary.k}")
    start = time.perf_counter()
    stats = feature_stats(store, dictionary, batch_size=args.batch_size, progress=False)
    seconds = time.perf_counter() - start
    fast = len(store) / seconds
    print(f"feature_stats (two passes, histograms, samples): {fast:8.0f} tokens/s, {seconds:.1f} s")
    slow = naive_baseline(store, dictionary, args.batch_size, args.baseline_chunks)
    print(f"naive baseline (dense encode + loop over latents, count/sum/max/top only): "
          f"{slow:8.0f} tokens/s over {args.baseline_chunks} chunks -> sae_nb is "
          f"{fast / slow:.1f}x")
    ms = time_contexts(store, dictionary, stats, model.tokenizer)
    print(f"latent_contexts, 20 windows of up to 21 tokens: {ms:.1f} ms per latent")
    if not args.skip_logits:
        start = time.perf_counter()
        logit_effects(model, dictionary)
        print(f"logit_effects, all {dictionary.d_sae} latents x {model.tokenizer.vocab_size} "
              f"tokens: {time.perf_counter() - start:.1f} s")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
