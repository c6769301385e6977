"""Edit a model through a dictionary at its site: ablate, clamp, scale or steer latents, or steer
along a raw direction, keeping the dictionary's error term.

With a dictionary at site ``s``, the spliced model replaces the site's activation ``x`` by
``x_hat(f') + (x - x_hat(f))``: ``f = encode(x)`` the codes, ``f'`` the edited codes,
``x_hat`` the dictionary's reconstruction (``encode_and_reconstruct``) and ``x - x_hat(f)``
the error term, the part the dictionary does not explain. With no edit the model is unchanged;
an edit changes only what the edited latents contribute. Because the reconstruction is affine in
the codes (``f @ W_dec + b_dec``, plus terms that depend on ``x`` alone: a skip connection, or
OpenAI's normalisation which scales the dictionary part by the input's ``sigma``), the output is
computed in the equivalent form ``x + (x_hat(f') - x_hat(f))``, exact when nothing is edited.
``error_term=False`` splices ``x_hat(f')`` alone (what the spliced cross-entropy measures).
A transcoder (``metadata["target_site"]`` differs from its site) is spliced the same way at the
site it writes, with codes of the site it reads in the same forward pass: the MLP's output
becomes ``y_hat(f') + (y - y_hat(f))`` with ``f`` the codes of the MLP's input. An explicit
``site=`` names the site a dictionary reads, for a transcoder too: its edits still land where
it writes (:func:`splice_sites`), and a site other than the one it was trained on is refused.

Edits are small frozen dataclasses made by :func:`ablate`, :func:`clamp`, :func:`scale`,
:func:`steer_latent` (``f_i += alpha``, i.e. ``alpha * W_dec[i]`` added to the site, times the
input's ``sigma`` for OpenAI's normalised TopK) and :func:`steer_direction` (``alpha * v / |v|``
added, for a probe direction, a difference of class means or a decoder row at a set norm).
Each applies at positions ``start <= p < stop`` (all by default); positions holding BOS keep
their clean activation when the dictionary was trained without BOS rows
(:func:`sae_nb.training.evaluate.bos_kept_clean`). A coefficient may be one number or one per
batch row, so a sweep over coefficients runs as one batch; it must be finite. Latents are
integers (Python, numpy or torch), never text or floats. A prompt may not be longer than the
positions the model has embeddings for (:func:`check_length`), as extraction refuses.

The splice is a pair of plain PyTorch hooks on the transformers module (not an nnsight trace),
so it works in a forward pass, a backward pass (:mod:`sae_nb.interventions.attribution`) and
generation with a KV cache (:mod:`sae_nb.interventions.effects`) alike.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from sae_nb.activations.corpora import document_separator
from sae_nb.activations.models import Model, hf_model, max_positions, model_name
from sae_nb.activations.sites import Site, resolve_site
from sae_nb.dictionaries.architectures import Dictionary, dictionary_site
from sae_nb.training.evaluate import bos_kept_clean
from sae_nb.util.errors import SaeNbError

Coefficient = float | Sequence[float]


class InterventionError(SaeNbError, ValueError):
    """An edit, prompt or dictionary that cannot be spliced; the message says what to change."""


@dataclass(frozen=True)
class LatentEdit:
    """Set the codes of ``latents`` to ``0`` (ablate), ``value`` (clamp), ``f * value``
    (scale) or ``f + value`` (add: steering by ``value * W_dec[i]``) at positions
    ``start <= p < stop``."""

    kind: Literal["ablate", "clamp", "scale", "add"]
    latents: tuple[int, ...]
    value: Coefficient = 0.0  # one number, or one per batch row
    start: int = 0
    stop: int | None = None


@dataclass(frozen=True)
class DirectionEdit:
    """Add ``value * direction / |direction|`` to the site at positions ``start <= p < stop``:
    steering along a raw direction, the baseline a latent is compared with."""

    direction: torch.Tensor  # (D,)
    value: Coefficient = 0.0  # the norm of the added vector; one number or one per batch row
    start: int = 0
    stop: int | None = None
    name: str = "direction"


Edit = LatentEdit | DirectionEdit


def _is_index(i) -> bool:
    """Whether ``i`` is one integer: Python's, numpy's or a 0-d torch/numpy integer array (not a
    bool, a float or text, which ``int()`` would read as digits or truncate)."""
    if isinstance(i, torch.Tensor):
        return i.ndim == 0 and not (i.dtype.is_floating_point or i.dtype.is_complex
                                    or i.dtype == torch.bool)
    if isinstance(i, np.ndarray):
        return i.ndim == 0 and i.dtype.kind in "iu"
    return isinstance(i, (int, np.integer)) and not isinstance(i, bool)


def latent_index(latent) -> int:
    """One latent index as an ``int``; anything but one integer is refused by name."""
    if not _is_index(latent):
        raise InterventionError(f"Latent {latent!r} is not an integer; give a latent's index as "
                                f"a whole number, e.g. 1850.")
    return int(latent)


def latent_indices(latents) -> tuple[int, ...]:
    """``latents`` (one index, or a list, tuple, range, array or tensor of them) as ints."""
    if _is_index(latents):
        return (int(latents),)
    if isinstance(latents, (str, bytes)) or not isinstance(latents, Iterable) or \
            getattr(latents, "ndim", 1) == 0:  # a 0-d float or bool tensor
        raise InterventionError(f"Latents {latents!r}: give a latent's index (a whole number, "
                                f"e.g. 1850) or a list of them, e.g. [12, 40].")
    items = list(latents)
    bad = [i for i in items if not _is_index(i)]
    if bad or not items:
        raise InterventionError(f"Latents {latents!r} hold {bad[0]!r}, not an integer; give "
                                f"whole numbers, e.g. [12, 40]." if bad else
                                "No latents given; give a latent's index or a list, e.g. [12, 40].")
    return tuple(int(i) for i in items)


def ablate(latents, start: int = 0, stop: int | None = None) -> LatentEdit:
    """Zero the codes of ``latents`` (an index or a list)."""
    return LatentEdit("ablate", latent_indices(latents), 0.0, start, stop)


def clamp(latents, value: Coefficient, start: int = 0, stop: int | None = None) -> LatentEdit:
    """Set the codes of ``latents`` to ``value``."""
    return LatentEdit("clamp", latent_indices(latents), _value(value), start, stop)


def scale(latents, factor: Coefficient, start: int = 0, stop: int | None = None) -> LatentEdit:
    """Multiply the codes of ``latents`` by ``factor``."""
    return LatentEdit("scale", latent_indices(latents), _value(factor), start, stop)


def steer_latent(latents, alpha: Coefficient, start: int = 0,
                 stop: int | None = None) -> LatentEdit:
    """Add ``alpha`` to the codes of ``latents``: ``alpha * W_dec[i]`` added to the site (times
    the input's ``sigma`` for OpenAI's normalised TopK, whose decoder is in normalised units;
    :func:`sae_nb.interventions.steering.latent_method` steers by a set norm instead)."""
    return LatentEdit("add", latent_indices(latents), _value(alpha), start, stop)


def steer_direction(direction, alpha: Coefficient, start: int = 0, stop: int | None = None,
                    name: str = "direction") -> DirectionEdit:
    """Add ``alpha`` times the unit vector along ``direction`` ``(D,)`` to the site."""
    v = torch.as_tensor(direction, dtype=torch.float32).detach().reshape(-1)
    norm = float(v.norm())
    if not norm > 0 or not torch.isfinite(v).all():
        raise InterventionError(f"The direction {name!r} has norm {norm}; pass a nonzero, finite "
                                f"vector (a probe's weights, a difference of class means).")
    return DirectionEdit(v / norm, _value(alpha), start, stop, name)


def _value(value: Coefficient) -> Coefficient:
    """A coefficient as a float, or a tuple of floats (one per batch row); finite only."""
    scalar = isinstance(value, (int, float, np.number)) or getattr(value, "ndim", None) == 0
    if scalar:
        values: tuple[float, ...] = (float(value),)
    else:
        try:
            values = tuple(float(v) for v in torch.as_tensor(value).reshape(-1).tolist())
        except (TypeError, ValueError, RuntimeError) as err:
            raise InterventionError(f"The coefficient {value!r} is not a number or a list of "
                                    f"numbers; give e.g. 2.0 or [0, 2, 4].") from err
        if not values:
            raise InterventionError("The coefficients are empty; give one number, or one per "
                                    "row (e.g. [0, 2, 4]).")
    _check_finite(value, values)
    return values[0] if scalar else values


def _check_finite(value, values: Sequence[float]) -> None:
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        given = "" if len(values) == 1 else f" (in {value!r})"
        raise InterventionError(f"The coefficient {bad[0]}{given} is not a finite number; give "
                                f"finite numbers, e.g. 2.0 or [0, 2, 4].")


def check_length(model: Model, n_tokens: int, what: str = "The prompt") -> None:
    """Refuse ``n_tokens`` beyond the positions the model has embeddings for (as extraction's
    ``ctx_len`` check does): GPT-2 would fail with an index error, rotary models would run on
    positions they never saw."""
    limit = max_positions(model)
    if limit is not None and n_tokens > limit:
        raise InterventionError(f"{what} is {n_tokens} tokens long (BOS included) but model "
                                f"{model_name(model)!r} has {limit} positions; shorten it to "
                                f"{limit} tokens or fewer.")


def prompt_tokens(model: Model, prompt: str, prepend_bos: bool = True) -> torch.Tensor:
    """``(1, T)`` token ids of ``prompt``, after BOS (the document separator) by default."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InterventionError(f"The prompt {prompt!r} is empty; type some text.")
    ids = model.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if prepend_bos:
        ids = [document_separator(model.tokenizer)] + ids
    check_length(model, len(ids))
    return torch.tensor([ids], dtype=torch.long)


class Splice:
    """A dictionary spliced in at its site with ``edits``, as a context manager.

    ``with Splice(lm, sae, [ablate(12)]): hf_model(lm)(input_ids=ids)`` runs the edited model;
    outside the block the model is clean again. ``record=True`` keeps the last forward pass's
    codes (``self.codes``, ``(B, T, F)``) and site inputs (``self.inputs``) and adds a zero
    leaf tensor ``self.leaf`` (``(B, T, D)``, requires grad) to the site's output, whose
    gradient is the gradient at the site. ``hf``: the transformers module to hook, a copy of the
    model's (e.g. in bfloat16) with its module names; the model's own by default. The edit is
    computed in float32 whatever the site's dtype, and cast back to it.
    """

    def __init__(self, model: Model, dictionary: Dictionary, edits: Sequence[Edit] = (),
                 site: str | None = None, error_term: bool = True,
                 splice_bos: bool | None = None, record: bool = False,
                 hf: torch.nn.Module | None = None):
        self.model, self.dictionary, self.hf = model, dictionary, hf
        self.edits = list(edits) if isinstance(edits, (list, tuple)) else [edits]
        self.error_term, self.record = error_term, record
        name, target = splice_sites(dictionary, site)
        hf = hf_model(model)
        self.site = resolve_site(hf, name)  # SiteError when the model lacks it
        # a transcoder reads one site and writes another: codes from there, edits here
        self.target = resolve_site(hf, target) if target is not None else None
        trained = (getattr(dictionary, "metadata", None) or {}).get("site")
        if self.target is not None and site is not None and trained:
            own = resolve_site(hf, trained)
            if (own.module, own.io) != (self.site.module, self.site.io):
                raise InterventionError(f"This transcoder reads {trained!r} and writes "
                                        f"{target!r}, but site={site!r} names another site to "
                                        f"read: leave site= out, or pass site={trained!r} (site= "
                                        f"is the site a dictionary reads; a transcoder's edits "
                                        f"land where it writes).")
        self.d_out = int(dictionary.W_dec.shape[1])
        for where, wide, reads in ((self.site, dictionary.d_in, "reads"),
                                   (self.target, self.d_out, "writes")):
            width = site_width(model, where) if where is not None else None
            if width is not None and width != wide:
                raise InterventionError(f"Site {where.name!r} of this model is {width} wide but "
                                        f"the dictionary {reads} {wide}: it belongs to another "
                                        f"model or site.")
        for edit in self.edits:
            self._check(edit)
        with warnings.catch_warnings():  # unknown: BOS stays clean, the extraction default
            warnings.simplefilter("ignore")
            self.bos = bos_kept_clean(dictionary, model, splice_bos=splice_bos)
        self.tokens: torch.Tensor | None = None
        self.offset = 0
        self.codes: torch.Tensor | None = None
        self.inputs: torch.Tensor | None = None
        self.leaf: torch.Tensor | None = None
        self._source: torch.Tensor | None = None
        self._handles: list = []

    def _check(self, edit) -> None:
        if isinstance(edit, (LatentEdit, DirectionEdit)):  # also edits made by hand
            values = edit.value if isinstance(edit.value, tuple) else (edit.value,)
            if not all(isinstance(v, (int, float, np.number)) for v in values):
                raise InterventionError(f"The coefficient {edit.value!r} is not a number or a "
                                        f"tuple of numbers; give e.g. 2.0 or (0.0, 2.0).")
            _check_finite(edit.value, [float(v) for v in values])
        if isinstance(edit, LatentEdit):
            latent_indices(edit.latents)  # integers only
            bad = [i for i in edit.latents if not 0 <= i < self.dictionary.d_sae]
            if bad or not edit.latents:
                raise InterventionError(f"Latent(s) {bad or '[]'} out of range: this dictionary "
                                        f"has latents 0..{self.dictionary.d_sae - 1}.")
            if edit.kind not in ("ablate", "clamp", "scale", "add"):
                raise InterventionError(f"Edit kind {edit.kind!r}; use ablate, clamp, scale, add.")
        elif isinstance(edit, DirectionEdit):
            if edit.direction.numel() != self.d_out:
                raise InterventionError(f"Direction {edit.name!r} has {edit.direction.numel()} "
                                        f"entries; the edited site is {self.d_out} wide.")
        else:
            raise InterventionError(f"{edit!r} is not an edit; make one with ablate, clamp, "
                                    f"scale, steer_latent or steer_direction.")
        if edit.start < 0 or (edit.stop is not None and edit.stop <= edit.start):
            raise InterventionError(f"Positions start={edit.start}, stop={edit.stop}: need "
                                    f"0 <= start < stop.")

    # -- hooks -------------------------------------------------------------------------------
    def __enter__(self) -> Splice:
        hf = self.hf if self.hf is not None else hf_model(self.model)
        self._handles.append(hf.register_forward_pre_hook(self._see_inputs, with_kwargs=True))
        if self.target is not None:  # a transcoder: note what it reads, edit what it writes
            self._hook(hf, self.site, lambda x: self._note_source(x))
        self._hook(hf, self.target or self.site, self.edit)
        return self

    def _hook(self, hf, site: Site, fn) -> None:
        """Run ``fn`` on the site's activation; what it returns (unless None) replaces it."""
        module = hf.get_submodule(site.module)

        def on_output(module, args, output):
            out = fn(output[0] if isinstance(output, tuple) else output)
            if out is None:
                return None
            return (out,) + tuple(output[1:]) if isinstance(output, tuple) else out

        def on_input(module, args):
            out = fn(args[0])
            return None if out is None else (out,) + tuple(args[1:])

        self._handles.append(module.register_forward_hook(on_output) if site.io == "output"
                             else module.register_forward_pre_hook(on_input))

    def _note_source(self, x: torch.Tensor) -> None:
        self._source = x

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _see_inputs(self, module, args, kwargs) -> None:
        """Note the token ids and the cache length (the absolute position of the first one)."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values")
        self.tokens = ids
        self.offset = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0

    # -- the splice itself ---------------------------------------------------------------------
    def positions(self, start: int, stop: int | None, B: int, T: int, device) -> torch.Tensor:
        """``(B, T, 1)`` float mask of the positions ``start <= p < stop`` (BOS excluded)."""
        pos = self.offset + torch.arange(T, device=device)
        keep = pos >= start
        if stop is not None:
            keep &= pos < stop
        keep = keep.expand(B, T)
        if self.bos is not None and self.tokens is not None and self.tokens.shape == (B, T):
            keep = keep & (self.tokens.to(device) != self.bos)
        return keep[..., None].float()

    def edit(self, x: torch.Tensor) -> torch.Tensor:
        """The edited site's new activation for ``x`` ``(B, T, D)``: for a transcoder the
        site it writes, with codes of what it read earlier in this forward pass."""
        sae, (B, T, D) = self.dictionary, x.shape
        source = x if self.target is None else self._source
        if source is None or source.shape[:2] != (B, T):
            raise InterventionError(f"The transcoder's input site {self.site.name!r} did not run "
                                    f"before its target {self.target.name!r} in this pass.")
        self._source = None
        for where, width, wide, verb in ((self.site, source.shape[-1], sae.d_in, "reads"),
                                         (self.target or self.site, D, self.d_out, "writes")):
            if width != wide:
                raise InterventionError(f"Site {where.name!r} is {width} wide here but the "
                                        f"dictionary {verb} {wide}: wrong model or site.")
        xf, src = x.float(), source.float()
        flat = src.reshape(B * T, -1)
        need_codes = self.record or not self.error_term or any(
            isinstance(e, LatentEdit) and e.kind != "add" for e in self.edits)
        f = x_hat = None
        if need_codes:
            with torch.no_grad():
                f, x_hat = sae.encode_and_reconstruct(flat)
            f, x_hat = f.view(B, T, -1), x_hat.view(B, T, D)
        delta = torch.zeros_like(xf)
        for e in self.edits:
            delta = delta + self._delta(e, xf, src, f) * self.positions(e.start, e.stop, B, T,
                                                                        x.device)
        if self.error_term:
            out = xf + delta  # == x_hat(f') + (x - x_hat(f)): see the module docstring
        else:
            clean = self.positions(0, None, B, T, x.device) == 0  # BOS when kept clean
            out = torch.where(clean, xf, x_hat + delta)
        if self.record:
            self.codes, self.inputs = f, src.detach()
            self.leaf = torch.zeros_like(xf, requires_grad=True)
            out = out + self.leaf
        return out.to(x.dtype)

    def _delta(self, e: Edit, x: torch.Tensor, src: torch.Tensor,
               f: torch.Tensor | None) -> torch.Tensor:
        """``x_hat(f') - x_hat(f)`` ``(B, T, D)`` for one edit at every position (``src``: what
        the dictionary read, ``x`` itself unless it is a transcoder)."""
        value = _rows(e.value, x)
        if isinstance(e, DirectionEdit):
            return value * e.direction.to(x.device)
        idx = torch.tensor(e.latents, device=x.device)
        if e.kind == "add":
            dcode = value.expand(*x.shape[:2], len(idx))
        else:
            cur = f[..., idx]  # (B, T, L)
            new = {"ablate": torch.zeros_like(cur), "clamp": value.expand_as(cur),
                   "scale": cur * value}[e.kind]
            dcode = new - cur
        return decoder_output(self.dictionary, src, dcode, idx)


def site_width(model: Model, site: Site) -> int | None:
    """The width of a site from its module's weights, without running the model: a block's or
    a norm's hidden size for outputs, a linear layer's ``in_features`` for inputs; None when
    it cannot be read off (the splice then checks the width on the first forward pass)."""
    module = hf_model(model).get_submodule(site.module)
    if site.io == "input":
        return getattr(module, "in_features", None)
    out = getattr(module, "out_features", None)
    if out is not None:
        return out
    if site.layer is not None or site.module.endswith(("embed_tokens", "embed_in", "drop")):
        config = hf_model(model).config
        return getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    return None


def _rows(value: Coefficient, x: torch.Tensor) -> torch.Tensor:
    """A coefficient as ``(B or 1, 1, 1)``: one number, or one per batch row."""
    v = torch.as_tensor(value, dtype=torch.float32, device=x.device).reshape(-1, 1, 1)
    if v.shape[0] not in (1, x.shape[0]):
        raise InterventionError(f"{v.shape[0]} coefficients for a batch of {x.shape[0]} rows; "
                                f"give one, or one per row.")
    return v


def decoder_output(dictionary: Dictionary, x: torch.Tensor, dcode: torch.Tensor,
                   latents: torch.Tensor | None = None) -> torch.Tensor:
    """What a change of codes ``dcode`` ``(B, T, L)`` of ``latents`` (all when None) adds to the
    reconstruction of ``x`` ``(B, T, D)``: ``dcode @ W_dec[latents]``, times the input's
    ``sigma`` for OpenAI's normalised TopK (whose dictionary part is in normalised units)."""
    W = dictionary.W_dec if latents is None else dictionary.W_dec[latents]  # (L, D)
    out = dcode @ W.float()
    if hasattr(dictionary, "input_stats"):
        out = out * dictionary.input_stats(x)[1]
    return out


def splice_sites(dictionary: Dictionary, site: str | None = None) -> tuple[str, str | None]:
    """``(reads, writes)``: the site a dictionary reads (``site`` if given, else its metadata's)
    and, for a transcoder (``metadata["target_site"]`` differs from its site), the site it writes
    and its edits land on; ``None`` for a dictionary that writes where it reads."""
    meta = getattr(dictionary, "metadata", None) or {}
    reads, target = dictionary_site(dictionary, site), meta.get("target_site")
    if not target or target == (meta.get("site") or reads):
        return reads, None
    return reads, target


def edited_logits(model: Model, tokens: torch.Tensor, splice: Splice | None = None) -> torch.Tensor:
    """``(B, T, V)`` float logits of ``tokens`` ``(B, T)``, clean or with ``splice`` on."""
    check_length(model, tokens.shape[-1], "Each row of the text")
    hf = hf_model(model)
    device = next(hf.parameters()).device
    with torch.no_grad():
        if splice is None:
            return hf(input_ids=tokens.to(device)).logits.float()
        with splice:
            return hf(input_ids=tokens.to(device)).logits.float()
