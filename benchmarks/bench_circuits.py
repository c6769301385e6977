"""Benchmark: transcoder sets and attribution graphs on the embedded model, against circuit-tracer.

Three figures, as ratios where there is a baseline, in one run on the 2-core machine:

1. **Training a set.** Tokens/s of ``train_transcoder_set`` (a TopK transcoder at every one of
   the 30 layers, one streamed pass) against the model's own forward pass alone over the same
   contexts (the stream's reading of the 60 sites, no training): how much the 30 transcoders add.
2. **One graph.** The wall time and peak memory (resident set above the loaded model) of
   ``attribute`` for a 16-token prompt (BOS included) through the set.
3. **circuit-tracer 0.5.0**, in its own pinned environment (``.ci/circuit-tracer-env``), on the
   same model folder, the same transcoders saved in its format
   (``sae_nb.circuits.tracer_format``) and the same token ids: its ``attribute`` wall and CPU
   time against ours, and the adjacency matrices compared on the nodes both graphs hold
   (features by layer, position and latent; error nodes by layer and position; embeddings;
   logits by token): the relative Frobenius error and the largest entry error.

    python benchmarks/bench_circuits.py                       # a set of 1536 latents, k 16
    python benchmarks/bench_circuits.py --set outputs/default/transcoders/1536_k16_200k  # nb 10
    python benchmarks/bench_circuits.py --no-tracer           # ours only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "In 1776, the Declaration of Independence was signed in the city of"


def peak_rss_mb() -> float:
    """This process's peak resident set since the last :func:`reset_peak` (MiB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> None:
    """Start a new peak of the resident set (Linux: clear_refs 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def training_figures(lm, n_tokens: int, d_sae: int, k: int, folder: Path):
    """Print the set's training tokens/s against the stream's forward passes alone; the set."""
    from sae_nb.circuits.sets import train_transcoder_set
    from sae_nb.circuits.transcoder_set import in_site, out_site
    from sae_nb.training.streaming import ActivationStream

    layers = 30
    sites = [s for layer in range(layers) for s in (in_site(layer), out_site(layer))]
    stream = ActivationStream(lm, sites=sites, n_tokens=n_tokens, batch_rows=4096,
                              buffer_rows=16384)
    start = time.perf_counter()
    rows = sum(4096 for _ in stream)
    forward = rows / (time.perf_counter() - start)
    start = time.perf_counter()
    tset = train_transcoder_set(lm, folder, d_sae=d_sae, k=k, n_tokens=n_tokens,
                                heldout_tokens=4096, progress=False)
    seconds = time.perf_counter() - start
    trained = tset.metadata["training_tokens"] / seconds
    print(f"training a set of 30 x {d_sae} latents (k {k}) on {rows:,} rows: "
          f"{trained:,.0f} tok/s; the forward passes alone {forward:,.0f} tok/s "
          f"(training at {trained / forward:.2f}x the forward pass; {seconds:.0f} s, held-out "
          f"evaluation and saving included)")
    fvu = [row["fvu"] for row in tset.metadata["per_layer"]]
    print(f"  held-out FVU of the MLP outputs: median {np.median(fvu):.3f}, "
          f"range {min(fvu):.3f}-{max(fvu):.3f}")
    return tset


def graph_figures(lm, tset, ids: torch.Tensor, max_feature_nodes) -> tuple[float, object]:
    """Print one graph's time, peak memory and scores; its wall time and the graph."""
    from sae_nb.circuits.attribute import attribute
    from sae_nb.circuits.graph import graph_scores

    attribute(lm, tset, ids[None], max_feature_nodes=max_feature_nodes)  # warm-up
    reset_peak()
    base = peak_rss_mb()  # the resident set now: the model and the set loaded
    cpu = time.process_time()
    start = time.perf_counter()
    graph = attribute(lm, tset, ids[None], max_feature_nodes=max_feature_nodes)
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu
    peak = peak_rss_mb()
    replacement, completeness = graph_scores(graph)
    print(f"graph of {len(ids)} tokens: {graph.n_features:,} feature nodes, {graph.n_nodes:,} "
          f"nodes, {wall:.2f} s wall ({cpu:.2f} s CPU), peak resident set "
          f"{peak:,.0f} MiB ({peak - base:+,.0f} MiB over the loaded model before); "
          f"replacement {replacement:.3f}, completeness {completeness:.3f}")
    return wall, graph


def node_keys(n_layers: int, n_pos: int, features, logit_tokens) -> list:
    """A key per node, comparable across the two graphs."""
    keys = [("f", *map(int, f)) for f in features]
    keys += [("e", layer, pos) for layer in range(n_layers) for pos in range(n_pos)]
    keys += [("t", pos) for pos in range(n_pos)]
    keys += [("l", int(t)) for t in logit_tokens]
    return keys


def compare_with_tracer(lm, tset, ids: torch.Tensor, ours, ours_s: float, python: str) -> None:
    from sae_nb.activations.models import ensure_default_model
    from sae_nb.circuits.tracer_format import save_tracer_transcoders

    with tempfile.TemporaryDirectory() as tmp:
        folder, out = Path(tmp) / "transcoders", Path(tmp) / "out"
        save_tracer_transcoders(tset.transcoders, folder, model_name=tset.model_name or "")
        env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "2"}
        subprocess.run([python, str(ROOT / "benchmarks" / "circuit_tracer_side.py"),
                        "--model", str(ensure_default_model()), "--transcoders", str(folder),
                        "--tokens", json.dumps(ids.tolist()), "--out", str(out)],
                       check=True, env=env)
        theirs = np.load(out / "graph.npz")
        info = json.loads((out / "graph.json").read_text())
    active = theirs["active_features"]
    features = active[theirs["selected_features"]]
    n_pos, n_layers = len(ids), len(tset)
    their_keys = node_keys(n_layers, n_pos, features, theirs["logit_tokens"])
    our_keys = node_keys(n_layers, n_pos, ours.features.tolist(), ours.logit_tokens)
    where = {k: i for i, k in enumerate(our_keys)}
    both = [(where[k], j) for j, k in enumerate(their_keys) if k in where]
    mine = np.array([i for i, _ in both])
    them = np.array([j for _, j in both])
    A = ours.adjacency.double().numpy()[np.ix_(mine, mine)]
    B = theirs["adjacency_matrix"].astype(np.float64)[np.ix_(them, them)]
    rel = np.linalg.norm(A - B) / max(np.linalg.norm(B), 1e-30)
    worst = np.abs(A - B).max() / max(np.abs(B).max(), 1e-30)
    their_s = info["times"]["attribute_s"] if "times" in info else info.get("attribute_s")
    print(f"circuit-tracer {info.get('versions', {}).get('circuit_tracer', '0.5.0')}: "
          f"{len(their_keys):,} nodes, {len(both):,} shared with ours; adjacency relative "
          f"error {rel:.2e} (largest entry error {worst:.2e} of the largest entry)")
    print(f"  attribution time: ours {ours_s:.2f} s, circuit-tracer {their_s:.2f} s "
          f"({their_s / ours_s:.1f}x ours)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", type=Path, default=None,
                        help="a trained set's folder for the graphs; else the one trained here")
    parser.add_argument("--tokens", type=int, default=24_000,
                        help="training tokens of the set trained for the throughput (0: none)")
    parser.add_argument("--d-sae", type=int, default=1536)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--max-feature-nodes", type=int, default=None)
    parser.add_argument("--no-tracer", action="store_true", help="skip circuit-tracer")
    args = parser.parse_args()
    torch.set_num_threads(2)
    import sae_nb
    from sae_nb.circuits.sets import load_transcoder_set

    lm = sae_nb.load_model()
    tset = None
    if args.tokens > 0:
        folder = Path(tempfile.mkdtemp(prefix="bench_circuits_"))
        tset = training_figures(lm, args.tokens, args.d_sae, args.k, folder / "set")
    if args.set is not None:
        tset = load_transcoder_set(args.set)
        print(f"graphs through the set in {args.set}")
    ids = lm.tokenizer(PROMPT, add_special_tokens=False)["input_ids"][:15]
    ids = torch.tensor([lm.tokenizer.bos_token_id or 0] + ids)  # 16 tokens, BOS first
    wall, graph = graph_figures(lm, tset, ids, args.max_feature_nodes)
    if not args.no_tracer:
        python = subprocess.run([str(ROOT / ".ci" / "circuit-tracer-env")], check=True,
                                capture_output=True, text=True).stdout.strip().splitlines()[-1]
        compare_with_tracer(lm, tset, ids, graph, wall, python)


if __name__ == "__main__":
    main()
