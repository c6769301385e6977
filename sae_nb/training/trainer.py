"""Train a dictionary from any iterable of activation batches.

``train_dictionary(batches, config)`` accepts tensors ``(B, D)`` (an SAE) or pairs
``(x, y)`` (a transcoder: input at one site, target at another), e.g. the activation store's
shuffled iterator. Adam with linear warm-up, a final linear decay and the gradient's norm
clipped (which tames the first steps' large gradients); inputs scaled to unit
mean squared norm while training and the scale folded into the weights at the end; dead
latents tracked over a window of tokens (AuxK for TopK, resampling for ReLU); checkpoints every
N steps that resume bit for bit on the CPU, naming their data by content (a rerun on other data
is refused) in a folder one run holds at a time. :class:`Training` is one dictionary a step at a
time (``sae_nb.training.streaming.train_sites`` drives several in lockstep); a batch source with
``state_dict``/``load_state_dict`` (``sae_nb.training.streaming.ActivationStream``) is checkpointed
with the dictionary instead of being replayed on resumption.

Under ``torchrun`` (or in a process group the caller initialised) the same call trains data
parallel: each rank takes its slice of every global batch (or reads only that slice, with
``sae_nb.training.distributed.rank_batches``), gradients and batch-wide statistics are reduced (see
``sae_nb.training.distributed``), every rank ends with the same dictionary, and rank 0 writes the
checkpoints. The result equals a one-process run on the same global batches up to float
rounding; a checkpoint resumes with any world size that divides the batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Literal

import pandas as pd
import torch
from tqdm.auto import tqdm

from sae_nb.activations.models import resolve_device
from sae_nb.dictionaries.architectures import (
    BatchTopKSAE,
    Dictionary,
    JumpReLUSAE,
    ReLUSAE,
    TopKSAE,
    build_dictionary,
)
from sae_nb.training.distributed import (
    ONE_PROCESS,
    Group,
    batch_digest,
    batch_metrics,
    first_global_batch,
    rank_device,
    rank_slice,
    setup,
)
from sae_nb.training.objectives import (
    check_matryoshka_widths,
    compute_step,
    default_matryoshka_widths,
)
from sae_nb.training.optimizers import ScheduleFreeSignSGD
from sae_nb.training.sparse_ops import release_scratch
from sae_nb.util.checks import real_number, whole_number
from sae_nb.util.errors import SaeNbError
from sae_nb.util.heap import kept_heap
from sae_nb.util.io import LockHeld, atomic_open, folder_name, hold_lock, jsonable

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
TRAIN_LOCK = "train.lock"  # held (flock) in the checkpoint folder by the one training using it
ARCHITECTURE_NAMES = ("topk", "batchtopk", "matryoshka_batchtopk", "standard", "jumprelu")
# Settings that may change between a run and its resumption without changing the result: where
# checkpoints go, how often it logs, the device, and the encoder's precision (each keeps
# float32's top k: the same codes).
RESUMABLE_CHANGES = ("checkpoint_dir", "checkpoint_every", "log_every", "device",
                     "encoder_precision")
OPTIMIZERS = ("adam", "signsgd_schedulefree")
# Settings added after checkpoints were first written, with the value every earlier run had.
ADDED_SETTINGS = {"optimizer": "adam", "momentum": 0.95, "skip_connection": False,
                  "encoder_precision": "float32"}
ENCODER_PRECISIONS = ("auto", "float32", "bfloat16")
# The default learning rate is LR_BASE / sqrt(d_sae / 2**14) per optimizer. Adam's was 2e-4 (Gao
# et al.'s law) until checkpoints recorded their rate; 4x that reaches a lower held-out FVU at
# every architecture and width measured (docs/performance.md, "The learning rate").
LR_BASE = {"adam": 8e-4, "signsgd_schedulefree": 5e-3}
FORMER_LR_BASE = {"adam": 2e-4, "signsgd_schedulefree": 5e-3}


class TrainingError(SaeNbError, ValueError):
    """Bad training input: the message names the batch or setting and the fix."""


@dataclass
class TrainConfig:
    """How to train. Defaults follow Gao et al. (TopK) and dictionary_learning (the rest).

    As in dictionary_learning, decoder rows are kept at unit norm (the gradient along each row
    projected out, rows renormalised after each step) for every architecture except the ReLU
    with ``l1_weighted_by_decoder_norm``, Anthropic's April update, which leaves them free."""

    architecture: Literal["topk", "batchtopk", "matryoshka_batchtopk", "standard",
                          "jumprelu"] = "topk"
    """topk, batchtopk, matryoshka_batchtopk, standard (ReLU with L1) or jumprelu."""
    d_in: int | None = None
    """Input width; None takes it from the first batch."""
    expansion: int = 8
    """Latents per input dimension: d_sae is expansion * d_in, unless d_sae is given."""
    d_sae: int | None = None
    """Latents in the dictionary; None for expansion * d_in."""
    k: int = 32
    """Active latents per token (TopK, BatchTopK, Matryoshka BatchTopK)."""
    matryoshka_widths: tuple[int, ...] | None = None
    """Matryoshka BatchTopK: the nested prefix sizes, strictly increasing, ending at d_sae.

    None: (d_sae/8, d_sae/4, d_sae/2, d_sae). The loss sums each prefix's reconstruction error."""
    total_tokens: int = 1_000_000
    """Training budget in rows; steps = total_tokens // rows per batch."""
    lr: float | None = None
    """Learning rate; None for 8e-4 / sqrt(d_sae / 2**14) with Adam.

    That is 4x Gao et al.'s scaling law (2e-4 / sqrt(d_sae / 2**14)), which after 1M tokens left
    held-out FVU far above what the same budget reaches (TopK 4608: 0.079 against 0.056 at 4x)."""
    warmup_steps: int | None = None
    """Steps of linear learning-rate warm-up; None for 5% of the steps."""
    decay_start: float = 0.8
    """Fraction of the steps after which the learning rate decays linearly to 0."""
    optimizer: Literal["adam", "signsgd_schedulefree"] = "adam"
    """adam (warm-up, final decay, clipping) or signsgd_schedulefree.

    signsgd_schedulefree is sign descent under schedule-free averaging, sparsify's default step
    (:class:`sae_nb.training.optimizers.ScheduleFreeSignSGD`): a constant learning rate (lr None
    for 5e-3 / sqrt(d_sae / 2**14), sparsify's), warm-up only when warmup_steps is given, no
    decay and no clipping (the sign of a gradient does not depend on its scale)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam's two betas: the decay rates of its gradient and squared-gradient averages."""
    momentum: float = 0.95
    """signsgd_schedulefree: where the gradient is taken, between the averaged weights (1) and
    the descent sequence (0)."""
    grad_clip_norm: float | None = 0.05
    """The whole gradient's norm is clipped to this (None: never).

    With inputs at unit mean squared norm the first steps' gradients are 30-1000x the later ones
    (the log's grad_norm column shows them); unclipped they fill Adam's second moment (beta2
    0.999 remembers ~1000 steps) and shrink every later step. Clipping them cut held-out FVU
    after 1M tokens of SmolLM2 activations (benchmarks/bench_peers.py's data, 4608 latents):
    TopK 0.092 -> 0.078, BatchTopK 0.126 -> 0.102, JumpReLU 0.176 -> 0.093. The units are the
    normalised inputs'; with normalize_activations=False pick it for your scale."""
    l1_coefficient: float = 0.1
    """Standard (ReLU): the sparsity penalty's weight; higher is sparser.

    With inputs at unit mean squared norm, 0.1 gives L0 24.7 at 8x after 1M tokens of
    benchmarks/bench_peers.py's SmolLM2 activations."""
    sparsity_penalty: Literal["l1", "entropy"] = "l1"
    """Standard: the penalty, l1 (sum of activations) or entropy (of each row's normalised ones)."""
    l1_weighted_by_decoder_norm: bool = False
    """Standard: weigh each latent's L1 by its decoder row's norm (Anthropic's April-2024 update).

    Decoder rows are then left free instead of kept at unit norm."""
    resample_every: int | None = None
    """Standard: steps between resamplings of dead latents; None: never."""
    l0_coefficient: float = 1e-3
    """JumpReLU: the L0 penalty's weight; higher is sparser."""
    jumprelu_bandwidth: float = 0.001
    """JumpReLU: width of the kernel of the threshold's straight-through gradient."""
    dead_window_tokens: int = 250_000
    """A latent not fired within the last this-many tokens is dead.

    Counted in whole batches (dead once the batches since a latent last fired hold this many
    tokens). AuxK revives dead latents for TopK and BatchTopK; the log's dead_frac is their
    fraction."""
    skip_connection: bool = False
    """TopK: add a linear skip term ``x @ W_skip.T`` to the reconstruction, trained with the rest
    from zero (sparsify's skip transcoders, Paulo et al. 2025): a transcoder's latents then
    explain what the MLP adds beyond a linear map of its input."""
    auxk_alpha: float = 1 / 32
    """TopK and BatchTopK: the weight of the AuxK loss that revives dead latents."""
    k_aux: int | None = None
    """TopK and BatchTopK: dead latents the AuxK loss reconstructs with; None for d_in // 2."""
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    """The decoder bias's start: the first batch's geometric median or mean, or zeros."""
    normalize_activations: bool = True
    """Train on inputs scaled to unit mean squared norm; the scale is folded in at the end."""
    seed: int = 0
    """Seeds the initialisation."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu, cuda or cuda:N."""
    autocast: bool = False
    """bf16 autocast on CUDA."""
    encoder_precision: Literal["auto", "float32", "bfloat16"] = "auto"
    """TopK: ``"bfloat16"`` ranks the latents with the encoder's dense product in bfloat16 (~9x
    faster than float32 on a CPU with AMX, as on a GPU), recomputes the best candidates in
    float32 and certifies each token's top k against the product's rounding bound (the tokens
    not certified, ~2%, get the float32 product): the same codes as ``"float32"``, training
    1.5x faster (docs/performance.md), slower on a CPU without bfloat16 matrix units.
    ``"auto"`` (the default): bfloat16 for TopK on a CPU with AMX and compiled kernels (a C
    compiler), float32 elsewhere."""
    checkpoint_dir: str | None = None
    """Folder of the checkpoint that training writes and resumes from; None: no checkpoints."""
    checkpoint_every: int = 0
    """Steps between checkpoints; 0: only at the end (when checkpoint_dir is set)."""
    log_every: int = 10
    """Steps between rows of the training log."""
    metadata: dict = field(default_factory=dict)
    """Saved with the dictionary: its training data (model, sites, BOS handling)."""

    def __post_init__(self):
        if self.architecture not in ARCHITECTURE_NAMES:
            raise TrainingError(f"Unknown architecture {self.architecture!r}; choose one of "
                                f"{', '.join(map(repr, ARCHITECTURE_NAMES))}.")
        if self.matryoshka_widths is not None:
            if self.architecture != "matryoshka_batchtopk":
                raise TrainingError(f"matryoshka_widths is set but architecture="
                                    f"{self.architecture!r}; use architecture="
                                    f"'matryoshka_batchtopk' or drop matryoshka_widths.")
            self.matryoshka_widths = check_matryoshka_widths(
                self.matryoshka_widths, self.d_sae, TrainingError)
        for name, minimum in (("total_tokens", 1), ("expansion", 1), ("k", 1), ("seed", 0),
                              ("dead_window_tokens", 1), ("checkpoint_every", 0),
                              ("log_every", 1), ("d_sae", 1), ("d_in", 1), ("k_aux", 1),
                              ("warmup_steps", 0), ("resample_every", 1)):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, whole_number(name, value, minimum, TrainingError))
        for name in ("l1_coefficient", "l0_coefficient", "auxk_alpha"):
            setattr(self, name, real_number(name, getattr(self, name), 0.0, error=TrainingError))
        for name in ("lr", "jumprelu_bandwidth", "grad_clip_norm"):
            if getattr(self, name) is not None:
                setattr(self, name, real_number(name, getattr(self, name), 0.0, strict=True,
                                                error=TrainingError))
        if self.encoder_precision not in ENCODER_PRECISIONS:
            raise TrainingError(f"Unknown encoder_precision {self.encoder_precision!r}; choose "
                                f"one of {', '.join(map(repr, ENCODER_PRECISIONS))}.")
        if self.encoder_precision == "bfloat16" and self.architecture != "topk":
            raise TrainingError(f"encoder_precision={self.encoder_precision!r} is for "
                                f"architecture='topk' (this run: {self.architecture!r}); drop "
                                f"it or train TopK.")
        if self.optimizer not in OPTIMIZERS:
            raise TrainingError(f"Unknown optimizer {self.optimizer!r}; choose one of "
                                f"{', '.join(map(repr, OPTIMIZERS))}.")
        self.momentum = real_number("momentum", self.momentum, 0.0, strict=True,
                                    error=TrainingError)
        if self.momentum >= 1:
            raise TrainingError(f"momentum={self.momentum!r}; use a value in (0, 1), e.g. 0.95.")
        if self.skip_connection and self.architecture != "topk":
            raise TrainingError(f"skip_connection=True needs architecture='topk' (got "
                                f"{self.architecture!r}); drop skip_connection or train TopK.")
        if self.sparsity_penalty not in ("l1", "entropy"):
            raise TrainingError(f"sparsity_penalty={self.sparsity_penalty!r}; use 'l1' or "
                                f"'entropy'.")

    def width(self, d_in: int) -> int:
        return int(self.d_sae or self.expansion * d_in)

    def matryoshka_widths_value(self, d_sae: int) -> tuple[int, ...]:
        """The prefix sizes for a dictionary of ``d_sae`` latents (checked against it)."""
        if self.matryoshka_widths is None:
            return default_matryoshka_widths(d_sae)
        return check_matryoshka_widths(self.matryoshka_widths, d_sae, TrainingError)

    def k_aux_value(self, sae: Dictionary) -> int:
        return int(self.k_aux or sae.d_in // 2)

    def learning_rate(self, d_sae: int, bases: dict[str, float] = LR_BASE) -> float:
        """The learning rate for ``d_sae`` latents: ``lr``, else the optimizer's default."""
        return float(self.lr or bases[self.optimizer] / math.sqrt(d_sae / 2**14))


@dataclass
class TrainResult:
    dictionary: Dictionary
    log: pd.DataFrame  # per logged step: step, tokens, loss, mse, l0, fvu, dead, lr, grad_norm
    config: TrainConfig
    scale: tuple[float, float]  # (input, target) scale used in training, now folded in

    def settings(self) -> dict[str, Any]:
        """The config as a dict, with the learning rate it trained at (``lr`` None stands for a
        default that may change; the rate does not)."""
        return {**asdict(self.config),
                "learning_rate": self.config.learning_rate(self.dictionary.d_sae)}


def _split(batch) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            raise TrainingError("A batch must be a tensor (B, D) or a pair (input, target).")
        return batch[0], batch[1]
    return batch, batch


def _all_finite(t: torch.Tensor) -> bool:
    """Every value finite. A finite sum proves it (a NaN or inf term makes the sum NaN or inf):
    one fast pass; the elementwise check only when the sum is not finite (overflow, or a bad
    value)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _check_batch(i: int, x: torch.Tensor, y: torch.Tensor, d_in: int, d_out: int) -> None:
    if x.ndim >= 1 and x.shape[0] == 0:
        raise TrainingError(f"Batch {i} has no rows; every batch needs at least one activation "
                            f"row. Check batch_size and the store's rows.")
    if x.ndim != 2 or x.shape[1] != d_in or y.shape != (x.shape[0], d_out):
        raise TrainingError(f"Batch {i} has shape {tuple(x.shape)} (target {tuple(y.shape)}); "
                            f"this dictionary expects (B, {d_in}). Check the site and d_in.")
    if not _all_finite(x) or (y is not x and not _all_finite(y)):
        bad = int((~torch.isfinite(x)).any(1).sum())
        raise TrainingError(f"Batch {i} holds NaN or infinite activations ({bad} rows). "
                            f"Re-extract the store (fp16 overflow?) or drop those rows.")


def geometric_median(points: torch.Tensor, iters: int = 100, tol: float = 1e-5) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of distances to ``points``."""
    guess = points.mean(0)
    for _ in range(iters):
        dist = (points - guess).norm(dim=1).clamp_min(1e-8)
        new = (points / dist[:, None]).sum(0) / (1 / dist).sum()
        if (new - guess).norm() < tol * guess.norm().clamp_min(1e-8):
            return new
        guess = new
    return guess


def _init(cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor,
          device) -> tuple[Dictionary, float, float]:
    torch.manual_seed(cfg.seed)
    transcoder = not torch.equal(x, y) if x.shape == y.shape else True
    if transcoder and x.shape[1] != y.shape[1]:
        raise TrainingError("Transcoders with different input and output widths are not "
                            "supported yet.")
    d_in = x.shape[1]
    if cfg.d_in is not None and cfg.d_in != d_in:
        raise TrainingError(f"config.d_in={cfg.d_in} but the batches have width {d_in}: "
                            f"wrong site or store. Set d_in=None to take it from the data.")
    d_sae = cfg.width(d_in)
    if cfg.architecture in ("topk", "batchtopk", "matryoshka_batchtopk") and not 0 < cfg.k <= d_sae:
        raise TrainingError(f"k={cfg.k} must lie in 1..d_sae={d_sae}.")
    if cfg.architecture == "matryoshka_batchtopk":
        cfg.matryoshka_widths_value(d_sae)  # fail before training when they do not fit d_sae
    # Matryoshka BatchTopK trains a BatchTopK dictionary with a nested loss.
    arch = "batchtopk" if cfg.architecture == "matryoshka_batchtopk" else cfg.architecture
    sae = build_dictionary("topk_skip" if cfg.skip_connection else arch, d_in, d_sae, k=cfg.k,
                           apply_b_dec_to_input=not transcoder).to(device)
    x, y = x.to(device).float(), y.to(device).float()
    s_in = float(1 / x.pow(2).sum(1).mean().sqrt()) if cfg.normalize_activations else 1.0
    s_out = float(1 / y.pow(2).sum(1).mean().sqrt()) if cfg.normalize_activations else 1.0
    with torch.no_grad():
        target = y * s_out
        if cfg.b_dec_init == "geometric_median":
            sae.b_dec.copy_(geometric_median(target))
        elif cfg.b_dec_init == "mean":
            sae.b_dec.copy_(target.mean(0))
    return sae, s_in, s_out


def _lr_lambda(cfg: TrainConfig, steps: int):
    if cfg.optimizer == "signsgd_schedulefree":  # its averaging replaces warm-up and decay
        warm, decay = cfg.warmup_steps or 0, None
    else:
        warm = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, steps // 20)
        decay = int(cfg.decay_start * steps)

    def factor(step: int) -> float:
        w = min(1.0, (step + 1) / warm) if warm else 1.0
        if decay is None or step < decay:
            return w
        d = max(0.0, (steps - step) / max(1, steps - decay))
        return w * d

    return factor


@torch.no_grad()
def _project_out_parallel_grad(sae: Dictionary) -> None:
    """Keep decoder rows on the unit sphere: drop the gradient along each row."""
    if sae.W_dec.grad is not None:  # in place: no (F, D) temporaries
        g, w = sae.W_dec.grad, sae.W_dec.detach()
        g.addcmul_(w, torch.linalg.vecdot(g, w).unsqueeze(1), value=-1)


def train_dictionary(batches: Iterable, config: TrainConfig | None = None, progress: bool = True,
                     resume: bool = True, **options) -> TrainResult:
    """Train a dictionary on ``batches`` (tensors ``(B, D)`` or ``(x, y)`` pairs).

    With ``config.checkpoint_dir`` set and a checkpoint there, training resumes from it
    (skipping the batches already consumed) and ends bit-identical to an uninterrupted run.
    A source with ``state_dict``/``load_state_dict``
    (:class:`sae_nb.training.streaming.ActivationStream`) is not replayed: its state goes in the
    checkpoint and is restored before the next batch.

    Under ``torchrun`` every rank calls this with the same global batches (each keeps its
    slice) or with ``sae_nb.training.distributed.rank_batches`` (each reads only its slice);
    every rank returns the same dictionary, and rank 0 alone writes checkpoints.

    The checkpoint names its data by content (:func:`data_identity`): a rerun on other data
    (a store extracted again, another iterator) is refused rather than resumed. The run holds
    the checkpoint folder's lock from start to end: a second training into it is refused.
    """
    cfg = TrainConfig(**{**(asdict(config) if config else {}), **options})
    group = setup()  # one process, or the ranks of a torchrun job
    lock = lock_checkpoint_dir(cfg.checkpoint_dir, group)
    try:
        with kept_heap():  # the steps reuse freed memory instead of faulting in fresh pages
            return _train(batches, cfg, group, progress, resume)
    finally:
        if lock is not None:
            lock.close()


def _train(batches: Iterable, cfg: TrainConfig, group: Group, progress: bool,
           resume: bool) -> TrainResult:
    """:func:`train_dictionary` once the checkpoint folder is held."""
    device = rank_device(resolve_device(cfg.device), group)
    local = bool(getattr(batches, "rank_local", False))  # yields this rank's slices already
    stream = batches if callable(getattr(batches, "load_state_dict", None)) else None
    ckpt = Path(cfg.checkpoint_dir) / CHECKPOINT if cfg.checkpoint_dir else None
    saved = (read_checkpoint(ckpt, cfg) if resume and ckpt is not None
             and _checkpoint_exists(ckpt, group) else None)
    if saved is not None and stream is not None:
        if "source" not in saved:
            raise TrainingError(f"The checkpoint {str(ckpt)!r} was written by a run on other "
                                f"batches (no stream position in it); delete it to train afresh.")
        stream.load_state_dict(saved["source"])  # the next batch is the one after the checkpoint
    it = iter(batches)
    try:
        first = next(it)
    except StopIteration:
        raise TrainingError("The batch iterator is empty: no activations to train on. "
                            "Check that the store has rows.") from None
    x0, y0 = _split(first)
    _check_batch(0, x0, y0, x0.shape[-1] if x0.ndim == 2 else -1,
                 y0.shape[-1] if y0.ndim == 2 else -1)
    if group.world > 1:  # every rank initialises from the whole first global batch
        x0, y0 = first_global_batch(group, jsonable(asdict(cfg)), batches, local, x0, y0)
    data = data_identity(batches, x0, y0, replayed=stream is None)
    if saved is not None:
        check_same_data(ckpt.parent, saved.get("data"), data)
    run = Training(x0, y0, cfg, group, device, progress)
    run.data = data
    if saved is not None:
        run.restore(saved, ckpt)
        if stream is None:
            for _ in range(run.state["step"] - 1):  # the first batch was already taken
                next(it, None)
            first = None
    while not run.done:
        batch = first if first is not None else next(it, None)
        first = None
        if batch is None:
            log.warning("Batches ran out after %d of %d steps.", run.state["step"], run.steps)
            break
        run.step(batch, local)
        if ckpt is not None and cfg.checkpoint_every and \
                not run.state["step"] % cfg.checkpoint_every:
            run.save(ckpt, source=stream)
    if ckpt is not None:
        run.save(ckpt, source=stream)
    return run.finish()


class Training:
    """One dictionary in training, a step at a time. :func:`train_dictionary` drives one;
    :func:`sae_nb.training.streaming.train_sites` drives several in lockstep on the same
    batches. Each keeps its own torch RNG state (swapped in around its steps), so interleaved
    dictionaries train exactly as each would alone."""

    def __init__(self, x0: torch.Tensor, y0: torch.Tensor, cfg: TrainConfig,
                 group: Group = ONE_PROCESS, device=None, progress: bool = True):
        device = torch.device("cpu") if device is None else torch.device(device)
        self.cfg, self.group, self.device, self.progress = cfg, group, device, progress
        self.sae, s_in, s_out = _init(cfg, x0, y0, device)
        if isinstance(self.sae, TopKSAE | BatchTopKSAE):
            _latent_major_encoder(self.sae)
        self.scale = (s_in, s_out)
        self.steps = max(1, cfg.total_tokens // len(x0))
        lr = cfg.learning_rate(self.sae.d_sae)
        if cfg.optimizer == "signsgd_schedulefree":
            self.opt = ScheduleFreeSignSGD(self.sae.parameters(), lr=lr, momentum=cfg.momentum)
        else:  # the fused kernel updates every tensor in one pass, not one kernel per tensor
            self.opt = torch.optim.Adam(self.sae.parameters(), lr=lr, betas=cfg.adam_betas,
                                        fused=device.type in ("cpu", "cuda"))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _lr_lambda(cfg, self.steps))
        # since_fired (F,): tokens in the batches after the last one in which each latent fired.
        self.state = {"step": 0, "tokens": 0, "steps": self.steps, "log": [],
                      "since_fired": torch.zeros(self.sae.d_sae, dtype=torch.long, device=device)}
        self.rng = _rng_state(device)
        self.bar = None
        self.data: dict[str, Any] | None = None  # what it trains on (data_identity), if known

    @property
    def done(self) -> bool:
        return self.state["step"] >= self.steps

    def step(self, batch, local: bool = False) -> None:
        """One optimiser step on ``batch`` (a global batch unless ``local``)."""
        if self.bar is None:
            self.bar = tqdm(total=self.steps, initial=self.state["step"],
                            disable=not self.progress or not self.group.main,
                            desc=f"train {self.cfg.architecture}")
        x, y = _split(batch)
        if not local:
            x, y = rank_slice(self.state["step"], x, y, self.group)
        _check_batch(self.state["step"], x, y, self.sae.d_in, self.sae.d_in)
        s_in, s_out = self.scale
        _set_rng_state(self.rng, self.device)
        x_in = x.to(self.device).float() * s_in
        y_in = x_in if y is x and s_in == s_out else y.to(self.device).float() * s_out
        _train_step(self.sae, self.opt, self.sched, self.cfg, self.state, x_in, y_in,
                    self.bar, self.group)
        self.rng = _rng_state(self.device)

    def payload(self) -> dict:
        """Everything a resumption needs (what the checkpoint file holds)."""
        return {"model": self.sae.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "step": self.state["step"],
                "tokens": self.state["tokens"], "tokens_since_fired": self.state["since_fired"],
                "log": self.state["log"], "scale": list(self.scale), "world_size": self.group.world,
                "config": jsonable(asdict(self.cfg)), "data": self.data,
                "learning_rate": self.cfg.learning_rate(self.sae.d_sae), "torch_rng": self.rng[0],
                **({"cuda_rng": self.rng[1]} if self.rng[1] is not None else {})}

    def save(self, path: Path, source=None) -> None:
        """Write the checkpoint (rank 0, atomically), with ``source.state_dict()`` if given."""
        _save_checkpoint(path, self, source, self.group)

    def restore(self, payload: dict, path: Path) -> None:
        """Continue from a checkpoint's ``payload`` (read by :func:`read_checkpoint`)."""
        self.scale = _load_checkpoint(path, payload, self.sae, self.opt, self.sched, self.state,
                                      self.group)
        self.rng = (payload["torch_rng"], payload.get("cuda_rng"))

    def finish(self) -> TrainResult:
        """Fold the input scale into the weights and return the trained dictionary."""
        if self.bar is not None:
            self.bar.close()
        release_scratch()
        if isinstance(self.opt, ScheduleFreeSignSGD):
            self.opt.averaged()  # the averaged weights, not the point the gradients were taken at
        with torch.no_grad():  # back to the usual (D, F) layout, contiguous
            self.sae.W_enc = torch.nn.Parameter(self.sae.W_enc.detach().contiguous())
        self.sae.fold_scale(*self.scale)
        self.sae.metadata = dict(self.cfg.metadata)  # its training data (site, BOS handling)
        return TrainResult(self.sae.eval(), pd.DataFrame(self.state["log"]), self.cfg,
                           tuple(self.scale))


@torch.no_grad()
def _latent_major_encoder(sae: Dictionary) -> None:
    """Store ``W_enc`` (D, F) latent-major, as the transpose of an (F, D) matrix: the sparse
    backward forms its gradient as (F, D), which then lands in ``.grad`` without the transposing
    copy autograd makes for a gradient laid out unlike its parameter (the matmul reads either
    layout at the same speed). :meth:`Training.finish` makes it contiguous again."""
    sae.W_enc = torch.nn.Parameter(sae.W_enc.detach().t().contiguous().t())


@contextmanager
def _contiguous_for_step(opt) -> Iterator[None]:
    """Show fused Adam the latent-major ``W_enc`` as its contiguous (F, D) transpose during the
    step: given the (D, F) view, the kernel copies the gradient to a contiguous tensor first
    (~6 ms of an 8 ms update at 576 x 4,608). Parameter, gradient and moments are transposed
    together (views of the same memory) and back after the step."""
    swapped = []
    if isinstance(opt, torch.optim.Adam) and opt.defaults.get("fused"):
        for group in opt.param_groups:
            for p in group["params"]:
                if (p.dim() == 2 and p.grad is not None and not p.is_contiguous()
                        and p.t().is_contiguous() and p.grad.stride() == p.stride()):
                    swapped.append(p)
    for p in swapped:
        _transpose_in_place(p, opt.state.get(p, {}))
    try:
        yield
    finally:
        for p in swapped:
            _transpose_in_place(p, opt.state.get(p, {}))


def _transpose_in_place(p: torch.nn.Parameter, state: dict) -> None:
    grad, p.grad = p.grad, None  # the new shape first: a gradient must match its parameter
    p.data = p.data.t()
    p.grad = grad.t()
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.dim() == 2:
            state[key] = value.t()


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state[1], device)


def _train_step(sae: Dictionary, opt, sched, cfg, state, x, y, bar,
                group: Group = ONE_PROCESS) -> None:
    rows = len(x) * group.world  # the global batch
    dead = state["since_fired"] >= cfg.dead_window_tokens  # (F,)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.autocast and x.is_cuda):
        auxk_dead = dead if isinstance(sae, TopKSAE | BatchTopKSAE) and cfg.auxk_alpha > 0 else None
        out = compute_step(sae, x, y, cfg, auxk_dead,
                           past_warmup=state["step"] >= state["steps"] // 10, group=group)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    fired = out.fired
    if group.world > 1:  # mean gradient over ranks; a latent fired if it fired on any rank
        fired = group.average_gradients(list(sae.parameters()), out.fired.float()) > 0
    # Unit-norm decoder rows (gradient projected, rows renormalised) for every architecture, as
    # dictionary_learning trains them, except under the April update, whose L1 weights each
    # latent by its decoder norm instead.
    unit_norm = isinstance(sae, (TopKSAE, JumpReLUSAE)) or (
        isinstance(sae, ReLUSAE) and not cfg.l1_weighted_by_decoder_norm)
    if unit_norm:
        _project_out_parallel_grad(sae)
    grad_norm = None
    # After the projection and the ranks' mean: all agree. A sign step ignores the scale.
    if cfg.grad_clip_norm is not None and cfg.optimizer == "adam":
        grad_norm = torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip_norm)
    with _contiguous_for_step(opt):
        opt.step()
    sched.step()
    if type(sae) is JumpReLUSAE:
        sae.project_threshold()
    if unit_norm:
        sae.normalize_decoder()
    state["since_fired"] += rows
    state["since_fired"][fired] = 0
    state["step"] += 1
    state["tokens"] += rows
    if isinstance(sae, ReLUSAE) and cfg.resample_every and state["step"] % cfg.resample_every == 0:
        # Dead here: not fired in the last resample_every steps (batches of this one's size).
        dead_since = state["since_fired"] >= cfg.resample_every * rows
        # Every rank draws the same rows of the whole batch (same RNG state): same dictionary.
        _resample_dead(sae, opt, group.gather(x), group.gather(y), group.gather(out.x_hat),
                       dead_since)
    if state["step"] % cfg.log_every == 0 or state["step"] == 1:
        row = {"step": state["step"], "tokens": state["tokens"],
               **batch_metrics(out, y, group),
               "dead_frac": float(dead.float().mean()), "lr": sched.get_last_lr()[0],
               "grad_norm": float("nan") if grad_norm is None else float(grad_norm)}
        state["log"].append(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", l0=f"{row['l0']:.1f}", fvu=f"{row['fvu']:.3f}")
    bar.update(1)


@torch.no_grad()
def _resample_dead(sae: ReLUSAE, opt, x, y, y_hat, dead: torch.Tensor) -> None:
    """Re-initialise dead latents toward poorly reconstructed rows (Towards Monosemanticity).

    Rows are picked with probability proportional to their squared loss ``|y - y_hat|^2``,
    squared. A new decoder row points along what the reconstruction misses there, the target
    residual ``y - y_hat`` (in the target's space: for a transcoder not ``x``'s); its encoder
    column along the input as the encoder reads it (``x - b_dec``, or ``x`` for a transcoder),
    scaled to 0.2 times the alive columns' mean norm."""
    n = int(dead.sum())
    if n == 0:
        return
    err = y - y_hat  # (B, D)
    loss = err.pow(2).sum(1)
    picks = torch.multinomial(loss.pow(2) / loss.pow(2).sum(), n, replacement=n > len(x))
    unit = lambda v: v / v.norm(dim=1, keepdim=True).clamp_min(1e-8)  # noqa: E731
    inputs = x[picks] - sae.b_dec if sae.apply_b_dec_to_input else x[picks]  # (n, D)
    alive_norm = sae.W_enc[:, ~dead].norm(dim=0).mean() if (~dead).any() else 1.0
    sae.W_dec[dead] = unit(err[picks])
    sae.W_enc[:, dead] = unit(inputs).T * alive_norm * 0.2
    sae.b_enc[dead] = 0
    for p, rows in ((sae.W_dec, dead), (sae.b_enc, dead)):
        st = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                st[key][rows] = 0
        if "z" in st:  # schedule-free: the new weights start every sequence afresh
            st["z"][rows] = p[rows]
    st = opt.state.get(sae.W_enc, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in st:
            st[key][:, dead] = 0
    if "z" in st:
        st["z"][:, dead] = sae.W_enc[:, dead]
    log.info("Resampled %d dead latents", n)


def _save_checkpoint(path: Path, run: Training, source=None,
                     group: Group = ONE_PROCESS) -> None:
    """Rank 0 writes (atomically), after checking every rank holds the same weights; the others
    wait for it at a barrier."""
    if group.world > 1:
        group.same_everywhere(f"the dictionary's weights at step {run.state['step']} (checksums)",
                              group.checksum(run.sae), "The ranks diverged; report this as a bug.")
    if group.main:
        payload = run.payload()
        if source is not None:
            payload["source"] = source.state_dict()
        with atomic_open(path) as f:
            torch.save(payload, f)
    group.barrier()


def _checkpoint_exists(path: Path, group: Group) -> bool:
    exists = path.exists()
    group.same_everywhere(f"whether {str(path)!r} exists", exists,
                          "Rank 0 writes the checkpoints: put checkpoint_dir on a filesystem "
                          "every rank sees, or delete the stale checkpoint.")
    return exists


def lock_checkpoint_dir(folder: str | Path | None, group: Group = ONE_PROCESS) -> IO | None:
    """Hold ``folder``'s :data:`TRAIN_LOCK` (rank 0, creating the folder) until the returned
    file is closed or the process ends, as an extraction holds its store: two trainings into one
    folder would replace each other's checkpoints. One another training holds is refused on
    every rank, naming the folder and the holder."""
    if not folder:
        return None
    lock, problem = None, None  # rank 0's, told to every rank: all raise, none waits
    if group.main:
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            lock = hold_lock(Path(folder) / TRAIN_LOCK)
        except LockHeld as held:
            problem = (f"The checkpoint folder {str(folder)!r} is in use by another training "
                       f"({held.holder}). Two runs into one folder would overwrite each "
                       f"other's checkpoints: wait for that one to finish (or stop it), or "
                       f"train under another name (--name, or another checkpoint_dir).")
        except OSError as err:
            problem = (f"The checkpoint folder {str(folder)!r} cannot be written "
                       f"({type(err).__name__}: {err.strerror or err}); pass a checkpoint_dir "
                       f"(or --run-dir) in a folder you can write to.")
    problem = group.gather_objects(problem)[0]
    if problem is not None:
        raise TrainingError(problem)
    return lock


def data_identity(batches, x: torch.Tensor, y: torch.Tensor, replayed: bool) -> dict[str, Any]:
    """What a run trains on, by content, saved in its checkpoint and compared on resumption:
    the source's ``identity`` when it has one (a store's shard checksums, the rows used, batch
    size and seed: :class:`sae_nb.training.distributed.RankBatches`) and the SHA-256 of the
    first global batch. A source that restores its position (a stream) is not replayed, so its
    first batch after resumption is not the run's first: it gets no digest (its own
    ``load_state_dict`` refuses other settings)."""
    source = getattr(batches, "identity", None)
    return {"source": jsonable(source) if isinstance(source, dict) else None,
            "first_batch": batch_digest(x, y) if replayed else None}


def check_same_data(folder: Path, saved: dict[str, Any] | None, now: dict[str, Any],
                    batches: str = "these batches") -> None:
    """Refuse to resume the checkpoint in ``folder`` on other data than it was trained on.

    The first batches' digests must agree (a stream's absent one included). The sources'
    identities are compared where both have one: a store's ``rank_batches`` and its plain
    ``batches`` are the same global batches, so a run may resume on either (another world
    size)."""
    if saved is None:
        log.warning("The checkpoint in %s was written before checkpoints named their data; it "
                    "cannot be checked against %s. Delete the folder if the data changed "
                    "since.", folder, batches)
        return
    differ = []
    if saved.get("first_batch") != now.get("first_batch"):
        differ.append(f"first batch (SHA-256)={saved.get('first_batch')!r} (checkpoint) vs "
                      f"{now.get('first_batch')!r} (now)")
    old, new = saved.get("source"), now.get("source")
    if isinstance(old, dict) and isinstance(new, dict):
        differ += [f"{k}={old.get(k)!r} (checkpoint) vs {new.get(k)!r} (now)"
                   for k in dict.fromkeys([*old, *new]) if old.get(k) != new.get(k)]
    if differ:
        raise TrainingError(f"The checkpoint in {str(folder)!r} was trained on other data than "
                            f"{batches}: {'; '.join(differ)}. Resuming it would continue a "
                            f"dictionary trained on rows that are not these. Train under another "
                            f"name (--name, or another checkpoint_dir) to keep it, or delete the "
                            f"folder {str(folder)!r} to train afresh on {batches}.")


def check_resumable(path: Path, saved: dict, config: TrainConfig) -> None:
    """Refuse to resume a checkpoint written with other settings: it would mix two runs. The
    learning rate is compared as the rate trained at, by :func:`check_learning_rate`."""
    asked = jsonable(asdict(config))
    saved = {**ADDED_SETTINGS, **saved}
    differ = [f"{k}={saved.get(k)!r} (checkpoint) vs {asked[k]!r} (now)" for k in asked
              if k not in (*RESUMABLE_CHANGES, "lr") and saved.get(k) != asked[k]]
    if differ:
        # A setting added since the checkpoint was written reads as None there (grad_clip_norm:
        # checkpoints from before clipping existed were trained unclipped).
        raise TrainingError(f"The checkpoint {str(path)!r} was written with other settings: "
                            f"{'; '.join(differ)}. Pass the checkpoint's values to resume it, "
                            f"delete it to train afresh, or use another checkpoint folder "
                            f"(another name) to train a separate dictionary.")


def check_learning_rate(path: Path, payload: dict, config: TrainConfig) -> None:
    """Refuse to resume at another learning rate than the checkpoint trained at. ``lr=None``
    asks for the default, which changed once: a checkpoint from before rates were recorded
    trained at the default of then."""
    model = payload.get("model")
    if not isinstance(model, dict) or "W_dec" not in model:
        return  # a damaged payload fails on loading, with its own message
    d_sae = int(model["W_dec"].shape[0])
    saved = {**ADDED_SETTINGS, **payload["config"]}
    then = payload.get("learning_rate")
    if then is None:
        then = replace(config, lr=saved.get("lr"), optimizer=saved["optimizer"]).learning_rate(
            d_sae, FORMER_LR_BASE)
    now = config.learning_rate(d_sae)
    if math.isclose(then, now, rel_tol=1e-9):
        return
    default = (f", the default for {d_sae} latents with {config.optimizer} now "
               f"({LR_BASE[config.optimizer]:g} / sqrt(d_sae / 2**14))" if config.lr is None
               else "")
    raise TrainingError(
        f"The checkpoint {str(path)!r} trained at learning rate {then:.6g}; this run would "
        f"continue at {now:.6g}{default}. Pass lr={then!r} (--lr {then!r}) to resume it, or "
        f"delete the folder {str(path.parent)!r} to train afresh.")


def check_checkpoint(path: Path, payload: dict, config: TrainConfig) -> None:
    """Refuse to resume ``payload`` (one dictionary's checkpoint) under ``config`` when its
    settings (:func:`check_resumable`) or its learning rate (:func:`check_learning_rate`)
    differ."""
    check_resumable(path, payload["config"], config)
    check_learning_rate(path, payload, config)


def read_checkpoint(path: Path, config: TrainConfig) -> dict:
    """A checkpoint's contents, refused when written with other settings than ``config``."""
    try:
        payload = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint gets the same advice
        raise TrainingError(f"Checkpoint {str(path)!r} cannot be read ({err}); delete it to "
                            f"start over.") from None
    check_checkpoint(path, payload, config)
    return payload


def _load_checkpoint(path: Path, payload: dict, sae: Dictionary, opt, sched, state,
                     group: Group = ONE_PROCESS) -> tuple[float, float]:
    sae.load_state_dict(payload["model"])
    opt.load_state_dict(payload["optimizer"])
    sched.load_state_dict(payload["scheduler"])
    state.update(step=payload["step"], tokens=payload["tokens"], log=payload["log"],
                 since_fired=_tokens_since_fired(payload).to(sae.W_enc.device))
    torch.set_rng_state(payload["torch_rng"])
    written_by = int(payload.get("world_size", 1))
    if written_by != group.world:
        # Every rank holds the whole state and the global batches do not depend on the world
        # size, so the run continues re-sharded: the same training, not the same rounding.
        log.warning("Resuming %s, written by %d rank(s), with %d: re-sharded, each rank now "
                    "takes 1/%d of every global batch. The result matches the uninterrupted run "
                    "up to float rounding, not bit for bit.", path, written_by, group.world,
                    group.world)
    log.info("Resumed from %s at step %d", path, state["step"])
    return tuple(payload["scale"])


def _tokens_since_fired(payload: dict) -> torch.Tensor:
    """Checkpoints before the window counted tokens held steps since firing: convert them with
    the run's batch size (exact when every batch had the same size)."""
    if "tokens_since_fired" in payload:
        return payload["tokens_since_fired"]
    return payload["since_fired"] * (payload["tokens"] // max(1, payload["step"]))


def dictionary_name(config: TrainConfig, d_in: int) -> str:
    """An automatic name from the architecture, width and sparsity: ``topk_4608_k32``."""
    width = config.width(d_in)
    sparsity = {"topk": f"k{config.k}", "batchtopk": f"k{config.k}",
                "matryoshka_batchtopk": f"k{config.k}",
                "standard": f"l1_{config.l1_coefficient:g}",
                "jumprelu": f"l0_{config.l0_coefficient:g}"}[config.architecture]
    return f"{config.architecture}_{width}_{sparsity}"


def checkpoint_dir(run_dir: str | Path, name: str, config: TrainConfig) -> str:
    """``run_dir/checkpoints/<name>``, where training resumes from an existing checkpoint.

    Raises when a checkpoint there was written with other settings than ``config``: resuming
    it would mix two runs. Delete the folder, or pick another name.
    """
    folder = Path(run_dir) / "checkpoints" / folder_name(name)
    file = folder / CHECKPOINT
    if file.exists():  # fail here, before training starts, rather than in train_dictionary
        check_checkpoint(file, _checkpoint_payload(file), config)
    return str(folder)


def _checkpoint_payload(file: Path) -> dict:
    """A checkpoint's contents, its config checked to be a dict. ``weights_only`` unpickles
    tensors and plain containers only, so a malicious file cannot run code; any unreadable file
    gets one error."""
    try:
        payload = torch.load(file, weights_only=True, map_location="cpu", mmap=True)
        saved = payload["config"]
        if not isinstance(saved, dict):
            raise TypeError(f"its config is a {type(saved).__name__}, not a dict")
    except Exception as err:  # noqa: BLE001 - truncated, random, foreign or malicious: same fix
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise TrainingError(f"Checkpoint {str(file)!r} cannot be read ({type(err).__name__}: "
                            f"{reason}); it is damaged or not an sae_nb checkpoint. Delete the "
                            f"folder {str(file.parent)!r} to train afresh, or pick another name."
                            ) from None
    return payload
