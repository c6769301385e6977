"""A transcoder set: one transcoder per layer, each reading an MLP's input and predicting its
output, checked against the model it replaces.

Transcoder ``L`` reads ``mlp_in_layer{L}`` (the MLP's input, after ``post_attention_layernorm``)
and predicts ``mlp_out_layer{L}``: ``decode(encode(x)) + x @ W_skip.T`` where a skip
connection exists (sparsify's skip transcoders, Paulo et al., 2025, "Transcoders beat sparse
autoencoders for interpretability"), else ``decode(encode(x))``. The set is a plain container
(``transcoders``, ``model_name``): file formats are built on top of it.

A cross-layer transcoder (CLT; Ameisen et al., 2025) is the same set plus ``cross``: the latents
read at layer L write the MLP outputs of every layer T >= L, through ``cross[L][:, T - L]``.
``transcoders[L]`` then holds layer L's encoder, its decoder to layer L itself and layer L's
output bias, so everything that reads one layer's latents works unchanged.

Any dictionary whose pre-activation is one affine map works as a transcoder (``TopKSAE``,
``SkipTopKSAE``, ``JumpReLUSAE``, ``ReLUSAE``; :meth:`Dictionary.folded_encoder`); gated and
normalised dictionaries are refused, since the attribution graph needs a linear read-in.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from sae_nb.activations.models import Model, hf_model, model_name
from sae_nb.activations.sites import n_layers
from sae_nb.dictionaries.architectures import Dictionary, SkipTopKSAE, TopKSAE
from sae_nb.util.errors import SaeNbError


class CircuitError(SaeNbError, ValueError):
    """A transcoder set, prompt, target or graph the circuits code cannot use; the message says
    what to change."""


def in_site(layer: int) -> str:
    return f"mlp_in_layer{layer}"


def out_site(layer: int) -> str:
    return f"mlp_out_layer{layer}"


@dataclass
class TranscoderSet:
    """One transcoder per layer, ``transcoders[L]`` reading ``mlp_in_layer{L}`` and writing
    ``mlp_out_layer{L}``, for the model named ``model_name``."""

    transcoders: list[Dictionary]
    model_name: str | None = None
    """The model the set was trained on (``model_name(lm)`` of that model), or None."""
    metadata: dict = field(default_factory=dict)
    """Free-form facts about the set (training tokens, per-layer FVU, ...) for savers to keep."""
    cross: list[torch.Tensor] | None = None
    """A cross-layer transcoder's decoders, ``cross[L]`` ``(F, n_layers - L, D)``: the latents
    read at layer L write ``cross[L][:, T - L]`` into layer T's MLP output (``cross[L][:, 0]``
    is ``transcoders[L].W_dec``). None: per-layer transcoders."""

    def __post_init__(self) -> None:
        if isinstance(self.transcoders, dict):
            self.transcoders = _as_list(self.transcoders)
        self.transcoders = list(self.transcoders)
        if not self.transcoders:
            raise CircuitError("The transcoder set is empty; give one transcoder per layer, "
                               "e.g. TranscoderSet([tc0, tc1, ...], model_name=...).")
        for layer, tc in enumerate(self.transcoders):
            _check_transcoder(layer, tc)
        if self.cross is not None:
            self.cross = list(self.cross)
            _check_cross(self.transcoders, self.cross)

    @property
    def is_cross_layer(self) -> bool:
        return self.cross is not None

    def __len__(self) -> int:
        return len(self.transcoders)

    def __getitem__(self, layer: int) -> Dictionary:
        return self.transcoders[layer]

    @property
    def d_model(self) -> int:
        return self.transcoders[0].d_in

    @property
    def has_skip(self) -> bool:
        return any(skip_matrix(tc) is not None for tc in self.transcoders)

    def check(self, model: Model) -> None:
        """Refuse a set that does not fit ``model``: a missing layer, another width of the
        residual stream, a transcoder reading another site. A differing model name only warns
        (a folder and a hub name may be the same model)."""
        hf = hf_model(model)
        layers, d_model = n_layers(hf), int(hf.config.hidden_size)
        name = model_name(model)
        if len(self) != layers:
            missing = f"layers {list(range(len(self), layers))} are missing" \
                if len(self) < layers else f"it has {len(self) - layers} layers too many"
            raise CircuitError(
                f"The transcoder set has {len(self)} transcoders but model {name!r} has {layers} "
                f"layers ({missing}); give one transcoder per layer 0..{layers - 1}, or load the "
                f"set made for this model.")
        for layer, tc in enumerate(self.transcoders):
            if tc.d_in != d_model:
                raise CircuitError(
                    f"Transcoder {layer} reads vectors of width {tc.d_in} but model {name!r} has "
                    f"d_model {d_model}: this set was made for another model "
                    f"({self.model_name!r}); load the set made for {name!r}.")
        if self.model_name is not None and self.model_name != name:
            warnings.warn(f"The transcoder set was made for model {self.model_name!r}, and is "
                          f"used with {name!r} of the same shape.", stacklevel=2)

    @classmethod
    def random(cls, model: Model, d_sae: int, k: int, skip: bool = False, seed: int = 0,
               cross_layer: bool = False) -> TranscoderSet:
        """Untrained TopK transcoders (unit-norm random decoder rows, the encoder their
        transpose; a small random skip matrix when ``skip``; with ``cross_layer``, random
        decoders to every later layer too, and random output biases): for tests and timings."""
        hf = hf_model(model)
        d_model, layers = int(hf.config.hidden_size), n_layers(hf)
        gen = torch.Generator().manual_seed(seed)
        transcoders = []
        for layer in range(layers):
            tc = (SkipTopKSAE if skip else TopKSAE)(d_model, d_sae, k=k,
                                                   apply_b_dec_to_input=False)
            with torch.no_grad():
                w = torch.randn(d_sae, d_model, generator=gen)
                tc.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
                tc.W_enc.copy_(tc.W_dec.T)
                if skip:
                    tc.W_skip.copy_(torch.randn(d_model, d_model, generator=gen) / d_model)
            tc.metadata = {"site": in_site(layer), "target_site": out_site(layer)}
            transcoders.append(tc.eval())
        cross = None
        if cross_layer:
            cross = []
            for layer, tc in enumerate(transcoders):
                w = torch.randn(d_sae, layers - layer, d_model, generator=gen)
                w = w / w.norm(dim=-1, keepdim=True) / (layers - layer) ** 0.5
                with torch.no_grad():
                    w[:, 0] = tc.W_dec
                    tc.b_dec.copy_(torch.randn(d_model, generator=gen) * 0.1)
                cross.append(w)
        return cls(transcoders, model_name=model_name(model), cross=cross)


def skip_matrix(tc: Dictionary) -> torch.Tensor | None:
    """A transcoder's skip connection ``W_skip`` (D, D) (its output adds ``x @ W_skip.T``), or
    None."""
    return getattr(tc, "W_skip", None)


def _as_list(by_layer: dict) -> list[Dictionary]:
    layers = sorted(by_layer)
    expected = list(range(len(layers)))
    if layers != expected:
        missing = sorted(set(range(max(layers) + 1)) - set(layers))
        raise CircuitError(f"The transcoder set has layers {layers}: layers {missing} are "
                           f"missing; give one transcoder per layer 0..{max(layers)}.")
    return [by_layer[i] for i in layers]


def _check_cross(transcoders: list[Dictionary], cross: list[torch.Tensor]) -> None:
    """A cross-layer transcoder's decoders must match its encoders, layer by layer."""
    n = len(transcoders)
    if len(cross) != n:
        raise CircuitError(f"The cross-layer decoders cover {len(cross)} source layers but the "
                           f"set has {n} encoders; give one decoder (F, n_layers - L, D) per "
                           f"layer L.")
    for layer, (tc, w) in enumerate(zip(transcoders, cross)):
        want = (tc.d_sae, n - layer, tc.d_in)
        if tuple(w.shape) != want:
            raise CircuitError(f"The cross-layer decoder of layer {layer} is "
                               f"{tuple(w.shape)}; it must be {want} (latents, layers {layer}.."
                               f"{n - 1}, d_model).")
        if not torch.equal(w[:, 0].to(tc.W_dec.dtype), tc.W_dec.detach()):
            raise CircuitError(f"The cross-layer decoder of layer {layer} to itself differs from "
                               f"transcoder {layer}'s W_dec; they must be the same tensor's "
                               f"values (load the set with load_transcoder_set).")


def _check_transcoder(layer: int, tc: Dictionary) -> None:
    if not isinstance(tc, Dictionary):
        raise CircuitError(f"Transcoder {layer} is a {type(tc).__name__}, not a sae_nb "
                           f"Dictionary; load it with sae_nb.load_dictionary or build a TopKSAE.")
    if tc.folded_encoder() is None:
        raise CircuitError(f"Transcoder {layer} is a {type(tc).__name__}, whose pre-activation is "
                           f"not one affine map of its input; attribution graphs need a TopK, "
                           f"JumpReLU or ReLU transcoder.")
    metadata = getattr(tc, "metadata", None) or {}
    site, target = metadata.get("site"), metadata.get("target_site")
    if site is not None and site != in_site(layer):
        raise CircuitError(f"Transcoder {layer} reads site {site!r}, not {in_site(layer)!r}; put "
                           f"each layer's transcoder at its own place in the set.")
    if target is not None and target != out_site(layer):
        raise CircuitError(f"Transcoder {layer} writes site {target!r}, not {out_site(layer)!r}; "
                           f"a transcoder set predicts each MLP's output from its input.")
