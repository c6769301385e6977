"""Peer side of benchmarks/bench_peers.py: trains one established trainer's TopK SAE, its own code.

Run by bench_peers.py in the peers environment (.ci/peers-env: SAELens's pinned environment plus
dictionary_learning and sparsify in .ci-peers-lib/). dictionary_learning's package __init__
imports nnsight for its activation buffer and sparsify's imports its Trainer (datasets, a
language model's hooks); we load the modules we drive without those __init__s. Reads the
training rows in their batch order (``train.npy``, float32, one batch after another) and the
held-out rows (``heldout.npy``); writes, under ``<peer>-seed<seed>``, the held-out
reconstruction (``_xhat.npy``), the number of nonzero latents of each held-out token
(``_nonzero.npy``, :func:`nonzero_per_token`, which bench_peers.py applies to ours too) and the
training seconds (``.json``, the step loop only; batches are views of a memory-mapped file, read
before the clock starts for each step). bench_peers.py computes FVU and L0 for every trainer with
one function each.

    python benchmarks/peers_side.py sparsify DIR --seed 0 --k 32 --d-sae 4608 --batch 4096

The sparsify peers reproduce the step of sparsify 1.3.3's ``Trainer`` (its ``fit`` drives a
language model through forward hooks, so we call its ``SparseCoder`` and optimizers as that hook
and loop do); the line references in :func:`train_sparsify` are to sparsify/trainer.py.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

LIB = Path(__file__).resolve().parents[1] / ".ci-peers-lib"
PEERS = ("dictionary_learning", "saelens", "sparsify", "sparsify_adam")


def _without_init(module: str):
    """``module`` from .ci-peers-lib/, its package's __init__ not run: the package (and each
    subpackage on the way) is an empty module whose path is its folder."""
    parts = module.split(".")
    for i in range(1, len(parts)):
        name = ".".join(parts[:i])
        if name not in sys.modules:
            stub = types.ModuleType(name)
            stub.__path__ = [str(LIB.joinpath(*parts[:i]))]
            sys.modules[name] = stub
    return importlib.import_module(module)


def nonzero_per_token(codes: torch.Tensor) -> np.ndarray:
    """``(N, F)`` latent activations -> ``(N,)`` int32: how many are nonzero in each row. The one
    count behind every trainer's L0 (bench_peers.py imports it for ours)."""
    codes = codes.to_dense() if codes.is_sparse else codes
    return (codes != 0).sum(-1).to(torch.int32).numpy()


def batches(train: np.ndarray, batch: int):
    for i in range(len(train) // batch):
        yield torch.from_numpy(np.array(train[i * batch:(i + 1) * batch]))


def train_dictionary_learning(train, args):
    """dictionary_learning's TopKTrainer with its defaults, its trainSAE step loop (update)."""
    top_k = _without_init("dictionary_learning.trainers.top_k")
    steps = len(train) // args.batch
    # Its default warmup_steps=1000 exceeds this budget (it asserts warmup < steps): 5% of the
    # steps, as ours; decay_start stays at its default (None: no decay).
    trainer = top_k.TopKTrainer(steps=steps, activation_dim=train.shape[1], dict_size=args.d_sae,
                                k=args.k, layer=6, lm_name="smollm2-135m", seed=args.seed,
                                device="cpu", warmup_steps=max(1, steps // 20))
    seconds = 0.0
    for step, x in enumerate(batches(train, args.batch)):
        start = time.perf_counter()
        trainer.update(step, x)
        seconds += time.perf_counter() - start
    ae = trainer.ae.eval()

    def encode_and_reconstruct(x):
        x_hat, codes = ae(x, output_features=True)
        return codes, x_hat

    return seconds, encode_and_reconstruct, {"lr": trainer.lr,
                                             "warmup_steps": trainer.warmup_steps}


def train_saelens(train, args):
    """SAELens's TopKTrainingSAE driven by its SAETrainer (Adam, constant lr, its defaults)."""
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(args.seed)
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

    def encode_and_reconstruct(x):
        codes = sae.encode(x)
        return codes, sae.decode(codes)

    return clock["seconds"], encode_and_reconstruct, {"lr": cfg.lr}


def _sparsify_modules():
    """sparsify's config, sparse_coder and sign_sgd modules, without its package __init__."""
    # Its sparse decoder is a Triton kernel when Triton imports; on CPU tensors sparsify needs
    # its eager decoder (embedding_bag), which it picks itself where Triton is absent.
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    if str(LIB) not in sys.path:  # natsort and schedulefree, after the environment's packages
        sys.path.append(str(LIB))
    return (_without_init("sparsify.config"), _without_init("sparsify.sparse_coder"),
            _without_init("sparsify.sign_sgd"))


def _sparsify_optimizer(sae, cfg, steps: int, sign_sgd: types.ModuleType):
    """The optimizer, lr schedulers and base lr sparsify's Trainer gives ``sae`` (lines of
    sparsify/trainer.py, 1.3.3)."""
    # Imported here: schedulefree is found in .ci-peers-lib/ once _sparsify_modules has put it on
    # the path, and the other peers need neither.
    from schedulefree import ScheduleFreeWrapper
    from transformers import get_linear_schedule_with_warmup

    scale = (sae.num_latents / 2**14) ** 0.5
    if cfg.optimizer == "signum":  # :160-176: no lr schedule
        lr = cfg.lr or 5e-3 / scale
        opt = ScheduleFreeWrapper(sign_sgd.SignSGD([{"params": sae.parameters(), "lr": lr}]),
                                  momentum=0.95)
        opt.train()
        return opt, [], lr
    # :107-136, torch's Adam where bitsandbytes is absent (as here)
    lr = cfg.lr or 2e-4 / scale
    opt = torch.optim.Adam([{"params": sae.parameters(), "lr": lr}])
    return opt, [get_linear_schedule_with_warmup(opt, cfg.lr_warmup_steps, steps)], lr


def train_sparsify(train, args, optimizer: str = "signum"):
    """sparsify's SparseCoder trained by the step of its Trainer, its TrainConfig's defaults:
    ``optimizer="signum"`` (its default: sign SGD under a schedule-free wrapper) or ``"adam"``.
    The numbers in comments are lines of sparsify/trainer.py (1.3.3)."""
    config, sparse_coder, sign_sgd = _sparsify_modules()
    steps = len(train) // args.batch
    sae_cfg = config.SparseCoderConfig(num_latents=args.d_sae, k=args.k)
    # Adam's lr_warmup_steps (linear warmup, then linear decay to 0 at the last step) defaults to
    # 1000, 4x a full run's 244 steps: 5% of the steps, as ours and dictionary_learning's here.
    cfg = config.TrainConfig(sae=sae_cfg, optimizer=optimizer, log_to_wandb=False,
                             lr_warmup_steps=max(1, steps // 20))
    if (cfg.loss_fn, cfg.grad_acc_steps, cfg.micro_acc_steps, cfg.k_decay_steps,
            sae_cfg.multi_topk, sae_cfg.transcode) != ("fvu", 1, 1, 0, False, False):
        raise SystemExit("peers_side.py reproduces sparsify's TrainConfig defaults only.")
    torch.set_float32_matmul_precision("high")  # fit, :253
    torch.manual_seed(args.seed)  # :95, then the coder in fp32 (:99-101)
    sae = sparse_coder.SparseCoder(train.shape[1], sae_cfg, "cpu", dtype=torch.float32)
    opt, schedulers, lr = _sparsify_optimizer(sae, cfg, steps, sign_sgd)
    # Dead-latent bookkeeping (:182-185, :309-312, :463, :567-576); AuxK reads it only when
    # auxk_alpha > 0 (:427-432), and its default is 0.
    since_fired = torch.zeros(sae.num_latents, dtype=torch.long)
    did_fire = torch.zeros(sae.num_latents, dtype=torch.bool)
    seconds = 0.0
    for step, x in enumerate(batches(train, args.batch)):  # x: (B, D), no token excluded
        start = time.perf_counter()
        if step == 0:  # :413-420: b_dec = the mean of the first batch
            sae.b_dec.data = x.mean(0).to(sae.dtype)
        if sae_cfg.normalize_decoder:  # :422-424, before every forward
            sae.set_decoder_norm_to_unit_norm()
        dead_mask = since_fired > cfg.dead_feature_threshold if cfg.auxk_alpha > 0 else None
        total_variance = (x - x.mean(0)).pow(2).sum()  # :452
        out = sae(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)  # :455-460
        did_fire[out.latent_indices.flatten()] = True
        loss = out.fvu + cfg.auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8  # :480-484
        loss.div(cfg.grad_acc_steps * cfg.micro_acc_steps).backward()  # :485
        if sae_cfg.normalize_decoder:  # :551-553
            sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()  # :555-560
        opt.zero_grad()
        for scheduler in schedulers:
            scheduler.step()
        with torch.no_grad():  # :567-576
            since_fired += len(x)
            since_fired[did_fire] = 0
            did_fire.zero_()
        seconds += time.perf_counter() - start
    if optimizer == "signum":
        opt.eval()  # :690-692: its checkpoint holds the schedule-free average x, not y

    def encode_and_reconstruct(x):
        acts, indices, _ = sae.encode(x)  # (N, k) each
        codes = torch.zeros(len(x), sae.num_latents).scatter_(1, indices, acts.float())
        return codes, sae.decode(acts, indices)

    return seconds, encode_and_reconstruct, {
        "lr": lr, "optimizer": optimizer,
        "lr_warmup_steps": cfg.lr_warmup_steps if optimizer == "adam" else None}


TRAINERS = {"dictionary_learning": train_dictionary_learning, "saelens": train_saelens,
            "sparsify": train_sparsify,
            "sparsify_adam": lambda train, args: train_sparsify(train, args, optimizer="adam")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("peer", choices=PEERS)
    parser.add_argument("dir", type=Path)
    parser.add_argument("--seed", type=int, default=0, help="the model init's seed")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--batch", type=int, default=4096)
    args = parser.parse_args()
    train = np.load(args.dir / "train.npy", mmap_mode="r")
    heldout = torch.from_numpy(np.load(args.dir / "heldout.npy"))
    seconds, encode_and_reconstruct, extra = TRAINERS[args.peer](train, args)
    x_hats, nonzero = [], []
    with torch.no_grad():
        for x in heldout.split(8192):
            codes, x_hat = encode_and_reconstruct(x)
            x_hats.append(x_hat.float())
            nonzero.append(nonzero_per_token(codes))
    run = f"{args.peer}-seed{args.seed}"
    np.save(args.dir / f"{run}_xhat.npy", torch.cat(x_hats).numpy())
    np.save(args.dir / f"{run}_nonzero.npy", np.concatenate(nonzero))
    steps = len(train) // args.batch
    (args.dir / f"{run}.json").write_text(json.dumps(
        {"seconds": seconds, "tokens": steps * args.batch, "seed": args.seed,
         "threads": torch.get_num_threads(), "torch": torch.__version__, **extra}))


if __name__ == "__main__":
    main()
