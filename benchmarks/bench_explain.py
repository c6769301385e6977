"""Benchmark: explaining every latent of the shipped dictionary, against a naive per-latent scan.

Times :func:`sae_nb.explanations.rules.rule_explanations`'s pieces (the one counting pass over
the store, the fit of all 4,608 rules from the counts, the held-out scoring with its control) on
the shipped dictionary (``resid_out_layer6`` of SmolLM2-135M, 576 -> 4608, k 32), with no cache,
and prints latents per minute. The baseline is what a first script does per latent: scan the
whole store, encoding each chunk (the same sparse TopK encoder as the one pass, so the ratio
measures the pass, not the encoder) and keeping that latent's column, count its tokens, fit its
token rule and score it on the held-out rows. It runs on ``--naive-latents`` latents; its rate
is extrapolated per latent. Then the distribution of held-out F1 and AUROC over latents with a
score, for the rules and their control.

    python benchmarks/bench_explain.py --run-dir outputs/default     # a run of notebook 01
    python benchmarks/bench_explain.py      # extracts 100k tokens into outputs/bench-features

:func:`time_llm_explanations` times the embedded model's explanations and their detection and
embedding scoring, with controls, for 20 latents (``--skip-llm`` leaves them out). Timings on a
shared machine are noisy: the load average is printed with them.
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
    """The store of ``SITE`` in ``run_dir``, or the one bench_features.py extracts into
    outputs/bench-features (resumed, not redone, on the next run)."""
    import sae_nb

    if run_dir is not None:
        return sae_nb.open_store(run_dir, SITE)
    run_dir = Path("outputs") / "bench-features"
    print(f"extracting {n_tokens} tokens of {SITE} into {run_dir} ...")
    return sae_nb.extract_activations(model, run_dir, sites=[SITE], n_tokens=n_tokens,
                                      progress=False)[SITE]


@torch.no_grad()
def naive_latent(store, dictionary, latent: int, tokens: np.ndarray, boundary: int,
                 batch_size: int, max_items: int = 10, min_count: int = 2, prior: float = 4.0,
                 tolerance: float = 0.01) -> float:
    """One latent the naive way: a full scan of the store for its column, then its token rule
    fitted as fit_rules(kinds=("tokens",)) does (smoothed rates, the fewest items within
    ``tolerance`` of the best smoothed training F1), and its held-out F1."""
    fired = np.zeros(len(store), dtype=bool)
    for first, array in store.chunks(batch_size):
        code = dictionary.sparse_encode(torch.from_numpy(array))  # (B, k)
        hit = (code.indices == latent) & (code.values > 0)
        fired[first:first + len(array)] = hit.any(1).numpy()
    train_tok, train_fired = tokens[:boundary], fired[:boundary]
    ids, n = np.unique(train_tok, return_counts=True)
    c = np.array([(train_fired & (train_tok == t)).sum() for t in ids])
    ok = (n >= min_count) & (c > 0)
    ids, n, c = ids[ok], n[ok], c[ok]
    P = train_fired.sum()
    rate = (c + prior * (P / boundary)) / (n + prior)
    order = np.lexsort((ids, -c, -rate))[:max_items]
    f1 = 2 * np.cumsum(n[order] * rate[order]) / (P + np.cumsum(n[order]))
    size = int(np.flatnonzero(f1 >= f1.max() - tolerance)[0]) + 1 if len(f1) else 0
    match, held = np.isin(tokens[boundary:], ids[order][:size]), fired[boundary:]
    return 2 * (match & held).sum() / max(match.sum() + held.sum(), 1)


def time_llm_explanations(store, dictionary, table, model, n_latents: int = 20) -> None:
    """Language-model explanations (the embedded model, :mod:`sae_nb.explanations.autointerp`)
    and their detection and embedding scoring with controls (:mod:`sae_nb.explanations.scoring`)
    for ``n_latents`` latents drawn with seed 0 among those firing at least 40 times, no cache;
    latents per minute (wall and CPU) beside the rules', and each scorer's AUROC against its
    control."""
    from sae_nb.explanations.autointerp import llm_explanations
    from sae_nb.explanations.backends import LocalBackend
    from sae_nb.explanations.scoring import detection_scores, embedding_scores
    from sae_nb.latents.stats import feature_stats

    stats = feature_stats(store, dictionary, progress=False)
    fired = stats.density * stats.n_tokens
    latents = np.random.default_rng(0).choice(np.nonzero(fired >= 40)[0], n_latents,
                                              replace=False)
    backend = LocalBackend(model)
    wall, cpu = time.perf_counter(), time.process_time()
    explained = llm_explanations(store, dictionary, stats, latents, backend=backend)
    t_explain, c_explain = time.perf_counter() - wall, time.process_time() - cpu
    detected = detection_scores(store, dictionary, stats, explained, backend=backend)
    t_total, c_total = time.perf_counter() - wall, time.process_time() - cpu
    print(f"LLM explanations + detection scoring (with control), {n_latents} latents: "
          f"{t_total:.1f} s wall ({t_explain:.1f} s explaining) = "
          f"{n_latents / t_total * 60:.1f} latents/min; {c_total / n_latents:.1f} CPU s per "
          f"latent (explaining {c_explain / n_latents:.1f})")
    start = time.perf_counter()
    embedded = embedding_scores(store, dictionary, stats, explained, model.tokenizer)
    print(f"embedding scoring (with control), {n_latents} latents: "
          f"{time.perf_counter() - start:.1f} s")
    for name, scores in (("detection", detected), ("embedding", embedded)):
        piv = scores.pivot(index="latent", columns="method", values="score")
        own, ctrl = piv["llm"], piv["llm:control"]
        print(f"  {name} AUROC: explanations {quartiles(own)}; control {quartiles(ctrl)}; "
              f"explanation above its control for {(own > ctrl).sum()} of {own.notna().sum()}")
    for r in explained.head(8).itertuples():
        print(f"  latent {r.latent}: {r.explanation!r} {r.error}")


def quartiles(values) -> str:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if not v.size:
        return "none"
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return f"median {med:.3f} (quartiles {q1:.3f}-{q3:.3f}) over {v.size} latents"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default=None,
                        help="a run folder holding a resid_out_layer6 store")
    parser.add_argument("--n-tokens", type=int, default=100_000,
                        help="tokens to extract when no --run-dir is given")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--naive-latents", type=int, default=3)
    parser.add_argument("--skip-llm", action="store_true")
    args = parser.parse_args()

    import sae_nb
    from sae_nb.explanations import rules

    model = sae_nb.load_model()
    store = open_or_extract(model, args.run_dir, args.n_tokens)
    dictionary = sae_nb.load_default_dictionary()
    F = dictionary.d_sae
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; store {len(store)} rows x "
          f"{store.d} ({store.manifest['dtype']}), dictionary {dictionary.d_in} -> {F}, "
          f"k {dictionary.k}")

    start = time.perf_counter()
    table = rules.rule_explanations(store, dictionary, tokenizer=model.tokenizer, progress=False)
    total = time.perf_counter() - start
    boundary = sae_nb.heldout_split(store, max(1, round(len(store) * 0.2)), 0).boundary
    t0 = time.perf_counter()
    counts = rules.count_store(store, dictionary, boundary, args.batch_size, progress=False)
    t1 = time.perf_counter()
    fitted = rules.fit_rules(counts)
    t2 = time.perf_counter()
    token_only = rules.score_rules(counts, rules.fit_rules(counts, kinds=("tokens",)))
    rules.explanation_table(counts, fitted, tokenizer=model.tokenizer)
    t3 = time.perf_counter()
    print(f"rule_explanations, all {F} latents: {total:.1f} s = {F / total * 60:,.0f} latents/min "
          f"(again in pieces: counting pass {t1 - t0:.1f} s, fit {t2 - t1:.1f} s, "
          f"scoring + control + table {t3 - t2:.1f} s)")

    tokens, _ = rules.store_tokens(store)
    rng = np.random.default_rng(0)
    live = table[(table.method == "rule") & (table.n_fired_train > 0)].latent.to_numpy()
    picks = rng.choice(live, size=min(args.naive_latents, len(live)), replace=False)
    start = time.perf_counter()
    naive_f1 = [naive_latent(store, dictionary, int(f), tokens, boundary, args.batch_size)
                for f in picks]
    per_latent = (time.perf_counter() - start) / len(picks)
    print(f"naive per-latent scan ({len(picks)} latents, token rules only): {per_latent:.2f} s "
          f"per latent -> {F * per_latent / 60:.0f} min for all {F}; one pass: "
          f"{total / F * 1e3:.1f} ms per latent, {per_latent * F / total:,.0f}x faster")
    print("  held-out F1 of token rules, naive / one pass with kinds=('tokens',) (must agree): "
          + ", ".join(f"latent {f}: {a:.4f} / {token_only.f1[f]:.4f}"
                      for f, a in zip(picks, naive_f1)))

    for method in ("rule", "rule:control"):
        rows = table[table.method == method]
        print(f"{method:>12}: held-out F1 {quartiles(rows.score)}; AUROC {quartiles(rows.auroc)}")
    rows = table[(table.method == "rule") & np.isfinite(table.score)]
    print("rule kinds: " + ", ".join(f"{k} {n}" for k, n in rows.rule_kind.value_counts().items())
          + f"; F1 >= 0.5 for {(rows.score >= 0.5).sum()} of {len(rows)} scored latents; "
          f"{(table[table.method == 'rule'].n_fired_train == 0).sum()} never fire in training")
    best = rows.sort_values("score", ascending=False).head(5)
    for _, r in best.iterrows():
        print(f"  latent {r.latent}: {r.explanation[:60]!s:60} F1 {r.score:.3f} "
              f"AUROC {r.auroc:.3f}")
    if not args.skip_llm:
        time_llm_explanations(store, dictionary, table, model)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
