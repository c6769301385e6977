"""Peer side of benchmarks/bench_peers.py: trains one established trainer's TopK SAE, its own code.

Run by bench_peers.py in the peers environment (.ci/peers-env: SAELens's pinned environment plus
dictionary_learning, whose package __init__ imports nnsight for its activation buffer; we load
its dictionary and trainer modules without that __init__). Reads the training rows in their
batch order (``train.npy``, float32, one batch after another) and the held-out rows
(``heldout.npy``); writes the held-out reconstruction (``<peer>_xhat.npy``) and the training
seconds (``<peer>.json``, the step loop only; batches are views of a memory-mapped file, read
before the clock starts for each step). bench_peers.py computes FVU for every trainer with one
function.

    python benchmarks/peers_side.py dictionary_learning DIR --k 32 --d-sae 4608 --batch 4096
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

LIB = Path(__file__).resolve().parents[1] / ".ci-peers-lib"


def _dictionary_learning_topk():
    """dictionary_learning.trainers.top_k, loaded without the package __init__ (nnsight)."""
    root = LIB / "dictionary_learning"
    for name, path in (("dictionary_learning", root),
                       ("dictionary_learning.trainers", root / "trainers")):
        module = types.ModuleType(name)
        module.__path__ = [str(path)]
        sys.modules[name] = module
    spec = importlib.util.find_spec("dictionary_learning.trainers.top_k")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def batches(train: np.ndarray, batch: int):
    for i in range(len(train) // batch):
        yield torch.from_numpy(np.array(train[i * batch:(i + 1) * batch]))


def train_dictionary_learning(train, args):
    """dictionary_learning's TopKTrainer with its defaults, its trainSAE step loop (update)."""
    top_k = _dictionary_learning_topk()
    steps = len(train) // args.batch
    # Its default warmup_steps=1000 exceeds this budget (it asserts warmup < steps): 5% of the
    # steps, as ours; decay_start stays at its default (None: no decay).
    trainer = top_k.TopKTrainer(steps=steps, activation_dim=train.shape[1], dict_size=args.d_sae,
                                k=args.k, layer=6, lm_name="smollm2-135m", seed=0, device="cpu",
                                warmup_steps=max(1, steps // 20))
    seconds = 0.0
    for step, x in enumerate(batches(train, args.batch)):
        start = time.perf_counter()
        trainer.update(step, x)
        seconds += time.perf_counter() - start
    ae = trainer.ae.eval()
    return seconds, lambda x: ae(x), {"lr": trainer.lr, "warmup_steps": trainer.warmup_steps}


def train_saelens(train, args):
    """SAELens's TopKTrainingSAE driven by its SAETrainer (Adam, constant lr, its defaults)."""
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=train.shape[1], d_sae=args.d_sae, k=args.k,
                                                device="cpu"))
    steps = len(train) // args.batch
    # lr_end: what SAELens's runner config sets (lr / 10; unused by its constant schedule).
    cfg = SAETrainerConfig(total_training_samples=steps * args.batch,
                           train_batch_size_samples=args.batch, device="cpu",
                           lr_end=SAETrainerConfig.lr / 10)
    clock = {"seconds": 0.0, "last": None}

    def provider():  # the clock counts from one batch handed over to the next request
        for x in batches(train, args.batch):
            if clock["last"] is not None:
                clock["seconds"] += time.perf_counter() - clock["last"]
            clock["last"] = time.perf_counter()
            yield x

    trainer = SAETrainer(cfg, sae, provider())
    trainer.fit()
    clock["seconds"] += time.perf_counter() - clock["last"]  # the last step (and fit's wrap-up)
    sae.eval()
    return clock["seconds"], lambda x: sae(x), {"lr": cfg.lr}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("peer", choices=["dictionary_learning", "saelens"])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--batch", type=int, default=4096)
    args = parser.parse_args()
    train = np.load(args.dir / "train.npy", mmap_mode="r")
    heldout = torch.from_numpy(np.load(args.dir / "heldout.npy"))
    run = train_dictionary_learning if args.peer == "dictionary_learning" else train_saelens
    seconds, reconstruct, extra = run(train, args)
    with torch.no_grad():
        x_hat = torch.cat([reconstruct(x) for x in heldout.split(8192)])
    np.save(args.dir / f"{args.peer}_xhat.npy", x_hat.float().numpy())
    steps = len(train) // args.batch
    (args.dir / f"{args.peer}.json").write_text(json.dumps(
        {"seconds": seconds, "tokens": steps * args.batch, "threads": torch.get_num_threads(),
         "torch": torch.__version__, **extra}))


if __name__ == "__main__":
    main()
