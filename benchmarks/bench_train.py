"""Benchmark: TopK SAE training speed and quality on real activations of the default model.

Settings of the established trainers we compare with: d_in 576 (SmolLM2-135M residual stream),
4608 latents, k = 32, batch 4096, fp32. Prints training tokens/s, how that compares with this
machine's fp32 matmul rate measured before and after training, and the held-out FVU after the
budget. Tokens/s count the training steps only: the time spent reading the store's batches
(memory-mapped float16 shards gathered in shuffled order) is printed apart, as bench_peers
leaves it out. ``--architecture`` and ``--optimizer`` train another kind (k is ignored where it
does not apply).

Data: ``resid_out_layer6`` activations of the default model over the default corpus, extracted
once into ``outputs/bench/`` (resumable; ~5 min on 2 cores) and reused afterwards.

    python benchmarks/bench_train.py                      # 1M training tokens, 64k held out
    python benchmarks/bench_train.py --tokens 200000      # quicker look
    python benchmarks/bench_train.py --profile            # where a step's time goes, by phase
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
D, F, K, BATCH = 576, 4608, 32, 4096


class Timed:
    """Iterates ``source`` and adds the seconds spent producing each item to ``seconds``."""

    def __init__(self, source):
        self.source, self.seconds = source, 0.0

    def __iter__(self):
        it = iter(self.source)
        while True:
            start = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            finally:
                self.seconds += time.perf_counter() - start
            yield item


def matmul_gflops(repeats: int = 10, rounds: int = 3) -> float:
    """Measured fp32 rate of the encoder's matmul shape, (4096, 576) @ (576, 4608): the best
    of ``rounds`` rounds (a first round on cold caches or a waking core reads up to 40% low)."""
    a, b = torch.randn(BATCH, D), torch.randn(D, F)
    a @ b
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * BATCH * D * F * repeats / (time.perf_counter() - start) / 1e9)
    return best


# torch ops by phase of a TopK training step (the profiler's op names); anything else is "other".
PHASES = {
    "encoder matmul (dense)": ("aten::addmm", "aten::mm", "aten::mv"),
    "top-k selection": ("aten::topk", "aten::index_select", "aten::masked_fill_", "aten::nonzero"),
    "sparse decode and backward": ("aten::embedding_bag", "aten::_embedding_bag",
                                   "aten::_embedding_bag_forward_only",
                                   "aten::_embedding_bag_per_sample_weights_backward",
                                   "aten::index_add_", "aten::bincount", "aten::index",
                                   "aten::cumsum"),
    "optimizer and decoder norm": ("aten::_fused_adam_", "aten::linalg_vector_norm",
                                   "aten::_foreach_norm", "aten::_foreach_mul_", "aten::div_",
                                   "aten::clamp", "aten::addcmul_", "aten::sign", "aten::lerp_"),
}


def profile_steps(store, n_train: int, steps: int = 20) -> None:
    """Profile ``steps`` training steps after 5 warm-up ones; print the self time by phase."""
    from torch.profiler import ProfilerActivity, profile

    from sae_nb.training.trainer import TrainConfig, Training

    batches = iter(store.batches(BATCH, rows=slice(0, n_train), epochs=None, drop_last=True,
                                 seed=0))
    data = [next(batches) for _ in range(steps + 5)]
    cfg = TrainConfig(architecture="topk", d_sae=F, k=K, total_tokens=BATCH * (steps + 5))
    run = Training(data[0], data[0], cfg, progress=False)
    for x in data[:5]:
        run.step(x)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for x in data[5:]:
            run.step(x)
    wall = (time.perf_counter() - start) / steps * 1e3
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        phase = next((p for p, ops in PHASES.items() if event.key in ops), "other")
        totals[phase] = totals.get(phase, 0.0) + event.self_cpu_time_total / 1e3 / steps
    whole = sum(totals.values())
    print(f"profile over {steps} steps ({wall:.0f} ms per step under the profiler; self times, "
          f"ms per step):")
    for phase, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {phase:<28} {ms:7.1f} ms  {ms / whole:5.1%}")
    other = sorted((e for e in prof.key_averages()
                    if not any(e.key in ops for ops in PHASES.values())),
                   key=lambda e: -e.self_cpu_time_total)[:6]
    print("  largest in other: " + ", ".join(
        f"{e.key} {e.self_cpu_time_total / 1e3 / steps:.1f}" for e in other))


def activations(n_tokens: int, site: str, run_dir: Path):
    """The store at ``run_dir`` when it holds ``n_tokens`` rows of ``site`` (any dtype), else
    extracted there (float32; resumable)."""
    import sae_nb
    from sae_nb.activations.store import open_store

    try:
        store = open_store(run_dir, site)
        if len(store) >= n_tokens:
            return store
    except Exception:  # noqa: BLE001 - missing or partial: extract it (resumable)
        pass
    return sae_nb.extract_activations(sae_nb.load_model(), run_dir, sites=[site],
                                      n_tokens=n_tokens, dtype="float32")[site]


def main() -> None:
    from sae_nb.training.sparse_ops import SCREEN_STATS
    from sae_nb.training.trainer import ENCODER_PRECISIONS, train_dictionary

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1_000_000, help="training budget")
    parser.add_argument("--heldout", type=int, default=65_536)
    parser.add_argument("--site", default="resid_out_layer6")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--profile", action="store_true", help="also profile 20 steps")
    parser.add_argument("--optimizer", default="adam", help="TrainConfig.optimizer")
    parser.add_argument("--architecture", default="topk", help="TrainConfig.architecture")
    parser.add_argument("--encoder-precision", default="auto",
                        choices=ENCODER_PRECISIONS,
                        help="TrainConfig.encoder_precision (auto, the default: the certified "
                             "bfloat16 screen on a CPU with AMX, else float32)")
    parser.add_argument("--run-dir", type=Path, default=ROOT / "outputs" / "bench",
                        help="the run folder holding (or to hold) the store")
    args = parser.parse_args()
    store = activations(args.tokens + args.heldout + 4096, args.site, args.run_dir)
    n_train = len(store) - args.heldout
    before = matmul_gflops()
    if args.profile:
        profile_steps(store, n_train)
    batches = store.batches(BATCH, rows=slice(0, n_train), epochs=None, drop_last=True, seed=0)
    timed = Timed(batches)  # the store's batches; reading them is left out (a loader overlaps it)
    start = time.perf_counter()
    result = train_dictionary(timed, architecture=args.architecture, d_sae=F, k=K, lr=args.lr,
                              optimizer=args.optimizer, total_tokens=args.tokens, seed=0,
                              encoder_precision=args.encoder_precision, progress=False)
    seconds = time.perf_counter() - start - timed.seconds
    after = matmul_gflops()
    rate = (before + after) / 2
    tokens = (args.tokens // BATCH) * BATCH
    with torch.no_grad():
        x = torch.from_numpy(store[n_train:])
        f = result.dictionary.encode(x)
        x_hat = result.dictionary.decode(f)
        fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
        l0 = float((f > 0).sum(1).float().mean())
        fired = (f > 0).any(0).float().mean()
    tps = tokens / seconds
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.architecture} "
          f"d_in {D}, d_sae {F}, k {K}, batch {BATCH}, fp32, {args.optimizer}, "
          f"encoder {args.encoder_precision}, {args.site}; "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"measured fp32 matmul rate ({BATCH}x{D} @ {D}x{F}): {before:.0f} GFLOP/s before "
          f"training, {after:.0f} after; their mean {rate:.0f} is the rate below")
    print(f"training: {tokens} tokens in {seconds:.1f} s of steps = {tps:,.0f} tokens/s "
          f"(reading the store's batches took {timed.seconds:.1f} s more, left out)")
    for name, flops in (("encoder forward matmul only, 2*D*F", 2),
                        ("sparse-decoder step, 4*D*F", 4), ("dense step, 10*D*F", 10)):
        used = tps * flops * D * F / 1e9
        print(f"  as {name} FLOPs/token: {used:.0f} GFLOP/s = {used / rate:.0%} of the matmul rate "
              f"(bound {rate * 1e9 / (flops * D * F):,.0f} tokens/s)")
    if SCREEN_STATS["rows"]:
        print(f"bfloat16 screen: {SCREEN_STATS['certified'] / SCREEN_STATS['rows']:.1%} of "
              f"{SCREEN_STATS['rows']:,} rows certified (the rest took the float32 product), "
              f"{SCREEN_STATS['dots'] / SCREEN_STATS['rows']:.1f} candidates recomputed per row")
    print(f"held-out ({len(store) - n_train} tokens): FVU {fvu:.4f}, L0 {l0:.1f}, "
          f"latents alive on held-out {fired:.1%}, dead at end of training "
          f"{result.log['dead_frac'].iloc[-1]:.1%}")


if __name__ == "__main__":
    main()
