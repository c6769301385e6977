"""Benchmark: task metrics beyond sentiment, and codes as bags, on the shipped dictionary.

On SmolLM2-135M with the shipped dictionary (``resid_out_layer6``, 576 -> 4608, TopK k 32),
prints four tables:

1. k-sparse probing (k = 1, 2, 5) on the shipped tasks of :mod:`sae_nb.comparison.tasks` (SOTU
   era and party, VADER sentiment and source domain; balanced, split 75/25, seed 0), beside the
   all-latent and raw probes and the majority baseline.
2. Absorption on token properties the tokenizer decides (leading space, capital, digit), on
   tokens of the run's layer-6 store (:func:`sae_nb.comparison.tasks.absorption_table`).
3. The bag treatments of pooled codes (:func:`sae_nb.texts.bags.treatment_table`) on VADER's four
   source domains (and on its movie sentiment): probing at k = 1, 5, 50 and all, and
   clustering ARI (spherical KMeans, k = the classes), against raw activations.
4. The same treatments' ARI on the topic sentences of ``data/sentences.csv`` (9 topics).

    nice -n 10 python benchmarks/bench_tasks.py --run-dir outputs/default

Pooled features are cached under ``--cache-dir/probing`` (a second run skips the model).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent


def markdown(df: pd.DataFrame, digits: int = 3) -> str:
    """A pipe table (no tabulate needed), numbers rounded."""
    df = df.reset_index() if df.index.name or not isinstance(df.index, pd.RangeIndex) else df
    cells = [[f"{v:.{digits}f}" if isinstance(v, (float, np.floating)) else str(v) for v in row]
             for row in df.itertuples(index=False)]
    lines = ["| " + " | ".join(map(str, df.columns)) + " |",
             "|" + "---|" * len(df.columns)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells])


def main() -> None:
    import sae_nb
    from sae_nb.comparison import tasks
    from sae_nb.texts import bags, clustering, probing
    from sae_nb.util.threads import one_thread

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default=str(ROOT / "outputs" / "default"),
                    help="a run folder whose activations/ holds the resid_out_layer6 store")
    ap.add_argument("--cache-dir", default=str(ROOT / "outputs" / "bench-tasks"))
    ap.add_argument("--n-per-class", type=int, default=300)
    ap.add_argument("--cluster-seeds", type=int, default=5, help="KMeans seeds averaged")
    ap.add_argument("--tokens", type=int, default=20000, help="store tokens for absorption")
    ap.add_argument("--threshold", type=float, default=0.5,
                    help="drop_dense: latents firing in more than this share of texts")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t0 = time.time()
    sae = sae_nb.load_default_dictionary()
    lm = sae_nb.load_model("smollm2-135m", device="cpu")
    site = sae_nb.dictionary_site(sae)
    print(f"model and dictionary loaded in {time.time() - t0:.0f} s; site {site}")

    t = time.time()
    table = tasks.sparse_probing_table(lm, sae, n_per_class=args.n_per_class, seed=args.seed,
                                       run_dir=args.cache_dir)
    wide = tasks.sparse_probing_wide(table)
    wide.insert(0, "rows", table.groupby("task")["rows"].first())
    print(f"\n## Sparse probing, held-out accuracy ({time.time() - t:.0f} s)\n")
    print(markdown(wide))

    t = time.time()
    store = sae_nb.open_store(args.run_dir, site)
    with one_thread():
        absorb = pd.concat([tasks.absorption_table(store, sae, lm.tokenizer,
                                                   n_tokens=args.tokens, seed=args.seed,
                                                   split_tau=tau).assign(main=how)
                            for how, tau in (("k=1", None), ("split 0.03", 0.03))])
    print(f"\n## Absorption on token properties, {args.tokens:,} store tokens "
          f"({time.time() - t:.0f} s)\n")
    print(markdown(absorb.reset_index(drop=True)))

    for name in ("vader_domain", "vader_sentiment"):
        t = time.time()
        data = tasks.build_task(name, args.n_per_class, args.seed)
        y = data["label"].to_numpy()
        train, test = probing.split_labeled(y, 0.25, args.seed)
        raw, codes = probing.probe_features(lm, sae, data["text"].tolist(), site,
                                            run_dir=args.cache_dir)
        treat = bags.treatment_table(raw, codes, y, train, test, threshold=args.threshold,
                                     seed=args.seed, n_seeds=args.cluster_seeds)
        print(f"\n## Bag treatments on {name} ({len(data)} snippets, held-out accuracy "
              f"and ARI, {time.time() - t:.0f} s)\n")
        print(markdown(treat))

    t = time.time()
    topics = clustering.load_texts(ROOT / "data" / "sentences.csv", "sentence", "topic")
    traw, tcodes = probing.probe_features(lm, sae, topics["text"].tolist(), site,
                                          run_dir=args.cache_dir)
    ty = topics["label"].to_numpy()
    k = len(np.unique(ty))
    from sklearn.metrics import adjusted_rand_score
    seeds = range(args.seed, args.seed + args.cluster_seeds)

    def ari(cluster) -> dict[str, float]:
        values = [adjusted_rand_score(ty, cluster(s)) for s in seeds]
        return {"ari": np.mean(values), "ari_sd": np.std(values)}

    rows = [{"representation": "raw", "treatment": "standardize",
             **ari(lambda s: clustering.kmeans(traw, k, s, "standardize").labels)},
            {"representation": "raw", "treatment": "l2",
             **ari(lambda s: bags.spherical_kmeans(traw, k, s))}]
    for name in bags.TREATMENTS:
        X = bags.treat(tcodes, name, threshold=args.threshold, seed=args.seed)
        rows.append({"representation": "codes", "treatment": name,
                     **ari(lambda s, X=X: bags.spherical_kmeans(X, k, s))})
    print(f"\n## Topic clustering ARI, data/sentences.csv ({len(topics)} sentences, k={k}, "
          f"mean over {args.cluster_seeds} KMeans seeds, {time.time() - t:.0f} s)\n")
    print(markdown(pd.DataFrame(rows)))
    print(f"\ntotal {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
