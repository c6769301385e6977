"""Dictionary architectures behind one interface: ``encode``, ``decode``, ``reconstruct``.

The contract every class keeps (``tests/test_contract.py`` checks it over ``DICTIONARY_CLASSES``):

- ``encode(x)`` ``(B, D) -> (B, F)``: the latent activations, zero where a latent is off.
- ``decode(f)`` ``(B, F) -> (B, D)``: the dictionary part of the output, ``f @ W_dec + b_dec``.
  It is the reconstruction only where nothing else enters it (not for ``SkipTopKSAE``, whose
  skip term needs ``x``, nor ``NormalizedTopKSAE``, whose output is in normalised units).
- ``reconstruct(x)`` ``(B, D) -> (B, D)``: the reconstruction (an SAE) or prediction (a
  transcoder) in the units of the activations, ``forward(x)`` is the same. Every consumer that
  needs a reconstruction calls this (metrics, the spliced cross-entropy, the fit check), never
  ``decode(encode(x))``. ``encode_and_reconstruct(x)`` returns both in one pass.
- ``folded_encoder()``: ``(W, b)`` with ``pre_acts(x) == x @ W + b`` when the pre-activation is
  that plain affine map (``b_dec`` folded into the encoder bias), else ``None``. Fast paths
  (sparse training, feature statistics, one-column latent contexts) use it and nothing else.

All share the SAELens parameterisation, so saving and loading are one code path:
``W_enc`` (D, F), ``b_enc`` (F,), ``W_dec`` (F, D), ``b_dec`` (D,), plus ``threshold`` (F,)
for JumpReLU. Encoding is ``act((x - b_dec) @ W_enc + b_enc)`` (no ``b_dec`` subtraction for
transcoders, whose input and target live at different sites); decoding ``f @ W_dec + b_dec``.

- ``ReLUSAE``: ReLU + L1, "Towards Monosemanticity" (Bricken et al., 2023) as
  dictionary_learning trains it, with the April-2024 update (L1 weighted by decoder norms).
- ``TopKSAE``: keep the k largest pre-activations (Gao et al., 2024, "Scaling and evaluating
  sparse autoencoders").
- ``BatchTopKSAE``: top ``k * batch`` activations over the whole batch in training (Bussmann
  et al., 2024); at inference a single threshold estimated during training, i.e. a JumpReLU.
- ``JumpReLUSAE``: ``relu(pre) * (pre > threshold)`` (SAELens's formula; the same as
  ``pre * (pre > threshold)`` for the positive thresholds training keeps), trained with
  straight-through estimators and an L0 penalty (Rajamanoharan et al., 2024).

Classes that exist to load other libraries' dictionaries (``sae_nb.dictionaries.formats``):

- ``GatedSAE``: a gate and a magnitude path sharing ``W_enc`` (Rajamanoharan et al., 2024,
  "Improving dictionary learning with gated sparse autoencoders"; SAELens ``gated``,
  dictionary_learning ``GatedAutoEncoder``).
- ``SkipTopKSAE``: sparsify's TopK with a linear skip connection ``x @ W_skip.T`` added to the
  reconstruction (EleutherAI sparsify, ``skip_connection=True``).
- ``NormalizedTopKSAE``: OpenAI's TopK autoencoder (Gao et al., 2024), which layer-normalises
  its input without parameters and maps the reconstruction back.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn


@dataclass
class SparseCode:
    """The k active latents of each row: values and indices, both ``(B, k)``."""

    values: torch.Tensor
    indices: torch.Tensor

    def dense(self, d_sae: int) -> torch.Tensor:
        out = self.values.new_zeros(self.values.shape[0], d_sae)
        return out.scatter_(1, self.indices, self.values)


def folded_bias(W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """``b_enc - b_dec @ W_enc`` (F,): ``(x - b_dec) @ W_enc + b_enc == x @ W_enc + this``."""
    return b_enc - b_dec @ W_enc


class Dictionary(nn.Module):
    """The common interface. Subclasses define ``activation(pre)``."""

    architecture: ClassVar[str] = "base"

    def __init__(self, d_in: int, d_sae: int, apply_b_dec_to_input: bool = True,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.d_in, self.d_sae = int(d_in), int(d_sae)
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae, dtype=dtype))  # (D, F)
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dtype))  # (F,)
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in, dtype=dtype))  # (F, D)
        self.b_dec = nn.Parameter(torch.zeros(d_in, dtype=dtype))  # (D,)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Unit-norm random decoder rows; the encoder starts as the decoder's transpose."""
        with torch.no_grad():
            self.W_dec.copy_(torch.randn_like(self.W_dec))
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)
            self.W_enc.copy_(self.W_dec.T)

    # -- the interface ---------------------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc  # (B, F)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, D) -> (B, F)`` latent activations."""
        return self.activation(self.pre_acts(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """``(B, F) -> (B, D)``: the dictionary part of the output, ``f @ W_dec + b_dec``."""
        return f @ self.W_dec + self.b_dec

    def encode_and_reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f, x_hat)``: the codes ``(B, F)`` and the reconstruction ``(B, D)`` of ``x``, one
        encoder pass. Subclasses whose output is more than ``decode(f)`` override this."""
        f = self.encode(x)
        return f, self.decode(f)

    def output_scale(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., 1)``: what one unit of code is worth in ``x``'s own units, per row, so that
        latent ``j`` adds ``output_scale(x) * f[..., j] * W_dec[j]`` to ``reconstruct(x)``: 1,
        except where a subclass decodes in other units."""
        return torch.ones(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, D) -> (B, D)``: the reconstruction of ``x`` in its own units."""
        return self.encode_and_reconstruct(x)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(x)

    def folded_encoder(self, latents=None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(W_enc (D, F), bias (F,))`` with ``pre_acts(x) == x @ W_enc + bias``: ``b_dec``
        folded into the encoder bias (``b_enc - b_dec @ W_enc``), one matmul and a vector.
        ``latents`` (an index or slice) selects columns: ``(D,)`` and a scalar for one latent.
        ``None`` when a subclass computes its pre-activation otherwise (gated, normalised)."""
        if type(self).pre_acts is not Dictionary.pre_acts:
            return None
        W, b_enc = (self.W_enc, self.b_enc) if latents is None else \
            (self.W_enc[:, latents], self.b_enc[latents])
        if not self.apply_b_dec_to_input:
            return W, b_enc
        return W, folded_bias(W, b_enc, self.b_dec)

    def config(self) -> dict:
        """Architecture fields for saving (SAELens names)."""
        return {"architecture": self.architecture, "d_in": self.d_in, "d_sae": self.d_sae,
                "apply_b_dec_to_input": self.apply_b_dec_to_input}

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def fold_scale(self, scale_in: float, scale_out: float | None = None) -> None:
        """Fold training-time scaling (input ``x * scale_in``, target ``y * scale_out``) into
        the weights, so the dictionary reads and writes unscaled activations: the codes stay
        the same and reconstructions come out in the original units."""
        scale_out = scale_in if scale_out is None else scale_out
        self.W_enc *= scale_in
        self.W_dec /= scale_out
        self.b_dec /= scale_out  # for an SAE scale_in == scale_out, so the input shift folds too


_hash_memo: weakref.WeakKeyDictionary[Dictionary, tuple] = weakref.WeakKeyDictionary()


def dictionary_hash(dictionary: Dictionary) -> str:
    """A short hash of everything that decides the codes: class, k and encoder-side tensors.

    Remembered per dictionary until one of its tensors is replaced or changed in place (every
    in-place write bumps a tensor's ``_version``), so the explorer can check it on each call."""
    tensors = dictionary.state_dict(keep_vars=True)
    stamp = tuple((n, t.data_ptr(), t._version) for n, t in tensors.items())
    memo = _hash_memo.get(dictionary)
    if memo is not None and memo[0] == stamp:
        return memo[1]
    h = hashlib.sha256(f"{type(dictionary).__name__}:{getattr(dictionary, 'k', None)}:"
                       f"{getattr(dictionary, 'apply_b_dec_to_input', None)}".encode())
    for name, tensor in sorted(tensors.items()):
        if name != "W_dec":  # the decoder does not change the codes
            h.update(name.encode())
            h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    _hash_memo[dictionary] = (stamp, h.hexdigest()[:16])
    return _hash_memo[dictionary][1]


def dictionary_site(dictionary: Dictionary, site: str | None = None) -> str:
    """The site a dictionary reads: ``site`` if given, else what its metadata says."""
    site = site or (getattr(dictionary, "metadata", {}) or {}).get("site")
    if not site:
        raise ValueError("This dictionary's metadata names no site; pass site=..., e.g. "
                         "site='resid_out_layer6'.")
    return site


class ReLUSAE(Dictionary):
    architecture = "standard"

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)


class TopKSAE(Dictionary):
    architecture = "topk"

    def __init__(self, d_in: int, d_sae: int, k: int, **kw):
        if not 0 < k <= d_sae:
            raise ValueError(f"k={k} must lie in 1..d_sae={d_sae}.")
        super().__init__(d_in, d_sae, **kw)
        self.k = int(k)

    def sparse_encode(self, x: torch.Tensor) -> SparseCode:
        values, indices = self.pre_acts(x).topk(self.k, dim=-1, sorted=False)
        return SparseCode(torch.relu(values), indices)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, indices, torch.relu(values))

    def config(self) -> dict:
        return {**super().config(), "k": self.k}


class JumpReLUSAE(Dictionary):
    architecture = "jumprelu"

    def __init__(self, d_in: int, d_sae: int, threshold: float = 0.001, **kw):
        super().__init__(d_in, d_sae, **kw)
        self.threshold = nn.Parameter(torch.full((d_sae,), float(threshold),
                                                 dtype=self.W_enc.dtype))  # (F,)

    # Training keeps every threshold at least this (in pre-activation units): an Adam step may
    # overshoot below 0, where the JumpReLU would let negative pre-activations through.
    MIN_THRESHOLD: ClassVar[float] = 1e-6

    @torch.no_grad()
    def project_threshold(self) -> None:
        """Clamp the thresholds back to ``>= MIN_THRESHOLD`` (projected gradient descent)."""
        self.threshold.clamp_(min=self.MIN_THRESHOLD)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        # SAELens's formula, so any file (even one with thresholds <= 0) encodes as it does there.
        return torch.relu(pre) * (pre > self.threshold)


class BatchTopKSAE(JumpReLUSAE):
    """Trained with batch top-k; encodes with the learned threshold (saved as JumpReLU)."""

    architecture = "jumprelu"  # what SAELens loads it as: one constant threshold
    kind = "batchtopk"

    def __init__(self, d_in: int, d_sae: int, k: int, **kw):
        super().__init__(d_in, d_sae, threshold=0.0, **kw)
        self.k = int(k)
        self.threshold.requires_grad_(False)

    def batch_activation(self, pre: torch.Tensor) -> torch.Tensor:
        """Training-time activation: the ``k * B`` largest positive pre-activations."""
        flat = torch.relu(pre).flatten()
        values, indices = flat.topk(self.k * pre.shape[0], sorted=False)
        return torch.zeros_like(flat).scatter_(0, indices, values).view_as(pre)


class GatedSAE(Dictionary):
    """``gate = (pre + b_gate > 0)``, ``mag = relu(pre * exp(r_mag) + b_mag)``, ``f = gate * mag``
    with ``pre = (x - b_dec) @ W_enc``: no ``b_enc`` (Rajamanoharan et al., 2024)."""

    architecture = "gated"

    def __init__(self, d_in: int, d_sae: int, **kw):
        super().__init__(d_in, d_sae, **kw)
        del self.b_enc  # the gate and magnitude paths carry their own biases
        dtype = self.W_enc.dtype
        self.b_gate = nn.Parameter(torch.zeros(d_sae, dtype=dtype))  # (F,)
        self.r_mag = nn.Parameter(torch.zeros(d_sae, dtype=dtype))  # (F,)
        self.b_mag = nn.Parameter(torch.zeros(d_sae, dtype=dtype))  # (F,)

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc  # (B, F)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        gate = (pre + self.b_gate) > 0
        return gate * torch.relu(pre * torch.exp(self.r_mag) + self.b_mag)


class SkipTopKSAE(TopKSAE):
    """sparsify's TopK with a skip connection:
    ``reconstruct(x) = decode(encode(x)) + x @ W_skip.T``.

    ``decode(f)`` is the dictionary part only; the skip term needs ``x``, so here
    ``reconstruct(x) != decode(encode(x))``."""

    kind = "topk_skip"

    def __init__(self, d_in: int, d_sae: int, k: int, **kw):
        super().__init__(d_in, d_sae, k=k, **kw)
        self.W_skip = nn.Parameter(torch.zeros(d_in, d_in, dtype=self.W_enc.dtype))  # (D, D)

    def encode_and_reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encode(x)
        return f, self.decode(f) + x @ self.W_skip.T

    @torch.no_grad()
    def fold_scale(self, scale_in: float, scale_out: float | None = None) -> None:
        """As :meth:`Dictionary.fold_scale`; the skip map from ``x * scale_in`` to
        ``y * scale_out`` becomes one from ``x`` to ``y``."""
        scale_out = scale_in if scale_out is None else scale_out
        super().fold_scale(scale_in, scale_out)
        self.W_skip *= scale_in / scale_out


class NormalizedTopKSAE(TopKSAE):
    """OpenAI's TopK autoencoder: the input is layer-normalised without parameters,
    ``x' = (x - mu) / (sigma + eps)`` (``sigma`` the unbiased std, ``eps`` 1e-5), encoded and
    decoded, and the reconstruction is mapped back as ``x^ * sigma + mu`` (no eps there).

    ``encode(x)`` normalises ``x`` itself. ``decode(f)`` cannot know ``mu`` and ``sigma``, so it
    returns the reconstruction in normalised units; ``reconstruct(x)`` returns it in the input's
    units (``reconstruct(x) != decode(encode(x))``), as does ``decode(f, mu, sigma)``."""

    eps: ClassVar[float] = 1e-5

    @staticmethod
    def input_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu = x.mean(dim=-1, keepdim=True)  # (B, 1)
        return mu, (x - mu).std(dim=-1, keepdim=True)  # (B, 1) each

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        mu, sigma = self.input_stats(x)
        return super().pre_acts((x - mu) / (sigma + self.eps))

    def decode(self, f: torch.Tensor, mu: torch.Tensor | None = None,
               sigma: torch.Tensor | None = None) -> torch.Tensor:
        x_hat = super().decode(f)  # (B, D), normalised units
        return x_hat if mu is None else x_hat * sigma + mu

    def encode_and_reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, sigma = self.input_stats(x)
        f = self.encode(x)
        return f, self.decode(f, mu, sigma)

    def output_scale(self, x: torch.Tensor) -> torch.Tensor:
        """Each row's ``sigma``: the decoder's units are the normalised ones."""
        return self.input_stats(x)[1]


# Every dictionary class, trainable and load-only: the contract test runs over all of them.
DICTIONARY_CLASSES: tuple[type[Dictionary], ...] = (
    ReLUSAE, TopKSAE, BatchTopKSAE, JumpReLUSAE, GatedSAE, SkipTopKSAE, NormalizedTopKSAE)

ARCHITECTURES: dict[str, type[Dictionary]] = {
    "standard": ReLUSAE, "relu": ReLUSAE, "topk": TopKSAE, "batchtopk": BatchTopKSAE,
    "jumprelu": JumpReLUSAE, "topk_skip": SkipTopKSAE,
}


def build_dictionary(architecture: str, d_in: int, d_sae: int, k: int | None = None,
                     **kw) -> Dictionary:
    """Make an untrained dictionary of a named architecture."""
    cls = ARCHITECTURES.get(architecture)
    if cls is None:
        raise ValueError(f"Unknown architecture {architecture!r}; choose one of "
                         f"{sorted(set(ARCHITECTURES) - {'relu'})}.")
    if issubclass(cls, TopKSAE | BatchTopKSAE):
        if k is None:
            raise ValueError(f"architecture={architecture!r} needs k (active latents per token).")
        if not 0 < k <= d_sae:
            raise ValueError(f"k={k} must lie in 1..d_sae={d_sae}.")
        return cls(d_in, d_sae, k=k, **kw)
    return cls(d_in, d_sae, **kw)
