"""Benchmark: many dictionaries from one forward pass (``train_sites``) against one alone.

Streams the default model's activations at ``--sites`` layers (``ActivationStream``, one
forward pass per refill serving every site) and trains a TopK dictionary per layer in lockstep
(4608 latents, k 32, batch 4096, fp32): SAEs on ``resid_out_layer{L}``, or with
``--transcoders`` transcoders from ``mlp_in_layer{L}`` to ``mlp_out_layer{L}``. Then trains one
dictionary of the same kind alone on a one-layer stream of the same tokens. Prints, for both,
the training tokens/s per dictionary, with the stream's time (model forward, buffer) left out
and printed apart, and their ratio: 1.0 means a suite trains each member as fast as a single run.

    python benchmarks/bench_sites.py                       # 30 SAEs, 131,072 tokens each
    python benchmarks/bench_sites.py --transcoders         # 30 transcoders
    python benchmarks/bench_sites.py --sites 4 --tokens 32768   # quick look
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from bench_train import Timed  # benchmarks/, this script's folder, is on the path

F, K, BATCH = 4608, 32, 4096


def run(model, pairs: dict, tokens: int, suite: bool) -> tuple[float, float, int]:
    """Train ``pairs`` ({name: site or (input, target)}); (training s, stream s, dictionaries)."""
    from sae_nb.training.streaming import ActivationStream, train_sites
    from sae_nb.training.trainer import train_dictionary

    sites = sorted({s for p in pairs.values() for s in ((p,) if isinstance(p, str) else p)})
    stream = ActivationStream(model, sites=sites, n_tokens=int(tokens * 1.1) + BATCH,
                              batch_rows=BATCH, buffer_rows=4 * BATCH, dtype="float32")
    timed = Timed(stream)
    common = dict(architecture="topk", d_sae=F, k=K, total_tokens=tokens, seed=0, progress=False)
    start = time.perf_counter()
    if suite:
        train_sites(timed, dictionaries=pairs, **common)
    else:  # the one dictionary's rows (a pair for a transcoder) from the stream's dicts
        (what,) = pairs.values()
        inp, target = (what, what) if isinstance(what, str) else what
        rows = (b if not isinstance(b, dict) else b[inp] if inp == target else
                (b[inp], b[target]) for b in timed)  # one site streams bare tensors
        train_dictionary(rows, **common)
    total = time.perf_counter() - start
    return total - timed.seconds, timed.seconds, len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=30, help="layers 0..N-1")
    parser.add_argument("--tokens", type=int, default=131_072, help="training tokens each")
    parser.add_argument("--transcoders", action="store_true")
    args = parser.parse_args()
    import sae_nb

    model = sae_nb.load_model()

    def pair(layer: int):
        if args.transcoders:
            return (f"mlp_in_layer{layer}", f"mlp_out_layer{layer}")
        return f"resid_out_layer{layer}"

    kind = "transcoders" if args.transcoders else "SAEs"
    tokens = (args.tokens // BATCH) * BATCH
    print(f"TopK {kind}, {F} latents, k {K}, batch {BATCH}, fp32, {torch.get_num_threads()} "
          f"threads, {tokens:,} training tokens each; load {os.getloadavg()[0]:.2f}", flush=True)
    suite = {f"layer{i}": pair(i) for i in range(args.sites)}
    train_s, stream_s, n = run(model, suite, tokens, suite=True)
    per_suite = tokens * n / train_s
    print(f"  {n} {kind} in one pass: training {train_s:6.1f} s, stream {stream_s:6.1f} s; "
          f"{per_suite:8,.0f} tokens/s per dictionary", flush=True)
    train_s, stream_s, _ = run(model, {"alone": pair(args.sites // 2)}, tokens, suite=False)
    alone = tokens / train_s
    print(f"  one alone (layer {args.sites // 2}):  training {train_s:6.1f} s, stream "
          f"{stream_s:6.1f} s; {alone:8,.0f} tokens/s")
    print(f"  suite / alone, tokens/s per dictionary: {per_suite / alone:.2f} (load at the end "
          f"{os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
