"""One prompt steered again and again: the clean runs cached, the steered runs batched.

A :class:`SteeringSession` answers what the steering widget asks, as plain tensors and tables:
the clean continuations of a prompt (cached per prompt and :class:`Sampling`, so only the
steered run is computed when a strength changes), the continuations with several latents steered
at once (each along its decoder row by its own strength times ``scale``, as
:func:`sae_nb.interventions.steering.latent_method` steers one), the next-token changes (read off
the steered run's first step, no extra forward pass), the prompt's attribution (cached per
prompt) and the ablation of one attributed latent at one position, without any steering edit,
with its measured effect on the attribution's target beside the predicted one.

Several samples are rows of one batch, row ``j`` seeded by ``seed + j``; the clean and the steered
row ``j`` share their random numbers (Gumbel-max), so they are the same text until the edit
changes a token: :func:`divergence` finds that token.

``precision="bfloat16"`` decodes the continuations, clean and steered alike, with one bfloat16
copy of the model (made on first use, about half the model's float32 memory), so their
difference is the steering, not the precision; the splice hooks that copy and computes the
edit in float32. Decoding is memory-bound per token, so this is about 2.7x faster on a CPU with
bfloat16 instructions (AVX512-BF16, AMX) and may be slower on one without. The next-token
table, the attribution's target and the ablation's measured effect stay in the model's own
precision: they come from a separate forward pass of the prompt.
"""

from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from sae_nb.activations.models import Model, hf_model
from sae_nb.dictionaries.architectures import Dictionary
from sae_nb.interventions.attribution import Attribution, attribute
from sae_nb.interventions.effects import change_table, check_temperature, sample_with_logits
from sae_nb.interventions.splice import (
    Edit,
    InterventionError,
    Splice,
    ablate,
    edited_logits,
    latent_index,
    prompt_tokens,
)
from sae_nb.interventions.steering import latent_method
from sae_nb.util.checks import whole_number

PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16}
"""What a session decodes continuations with: the model as loaded (float32 unless loaded in
another dtype), or a bfloat16 copy of it."""


@dataclass(frozen=True)
class Sampling:
    """How continuations are drawn; a clean run is cached per prompt and ``Sampling``."""

    temperature: float = 0.0
    """0 decodes greedily (one text, whatever ``samples`` says); above 0 samples."""
    seed: int = 0
    """Row ``j`` of a batch draws with seed ``seed + j``."""
    samples: int = 1
    """Continuations per setting (when sampling)."""
    max_new_tokens: int = 20
    """Tokens generated per continuation."""

    def __post_init__(self):
        check_temperature(self.temperature)
        whole_number("samples", self.samples, 1, InterventionError, example="samples=3")
        whole_number("max_new_tokens", self.max_new_tokens, 1, InterventionError,
                     example="max_new_tokens=20")

    @property
    def seeds(self) -> list[int]:
        n = self.samples if self.temperature > 0 else 1  # greedy: every row would be the same
        return [int(self.seed) + j for j in range(n)]


@dataclass
class Continuations:
    """The continuations of one run: token ids and text per sample."""

    tokens: list[list[int]]
    texts: list[str]
    first_logits: torch.Tensor  # (V,) next-token logits after the prompt (row 0)


def divergence(clean: Sequence[int], other: Sequence[int]) -> int | None:
    """The index of the first token where ``other`` differs from ``clean``; None if equal."""
    for i, (a, b) in enumerate(zip(clean, other)):
        if a != b:
            return i
    return None if len(clean) == len(other) else min(len(clean), len(other))


def strengths_of(pairs) -> tuple[tuple[int, float], ...]:
    """``{latent: strength}`` or ``[(latent, strength), ...]`` as a tuple of pairs; a latent
    listed twice is refused."""
    items = list(pairs.items()) if isinstance(pairs, dict) else list(pairs)
    out, seen = [], set()
    for latent, strength in items:
        i = latent_index(latent)
        if i in seen:
            raise InterventionError(f"Latent {i} is listed twice; give each latent once, with "
                                    f"its strength.")
        seen.add(i)
        out.append((i, float(strength)))
    return tuple(out)


class SteeringSession:
    """Steer ``dictionary``'s latents in ``model``; strengths in units of ``scale`` (the median
    token norm at the site, :func:`sae_nb.interventions.steering.site_scale`). ``precision``:
    ``"float32"`` decodes with the model as loaded, ``"bfloat16"`` with a bfloat16 copy of it
    (faster on a CPU with bfloat16 instructions; see the module docstring)."""

    def __init__(self, model: Model, dictionary: Dictionary, scale: float, cache_size: int = 32,
                 precision: str = "float32"):
        if not isinstance(precision, str) or precision not in PRECISIONS:
            raise InterventionError(f"precision={precision!r} is not one of {list(PRECISIONS)}; "
                                    f"give precision='float32' (the model as loaded) or "
                                    f"precision='bfloat16' (continuations decoded by a bfloat16 "
                                    f"copy of the model).")
        self.model, self.dictionary, self.scale = model, dictionary, float(scale)
        self.cache_size, self.precision = cache_size, precision
        self._decoder: torch.nn.Module | None = None  # the bfloat16 copy, made on first use
        self._clean: OrderedDict = OrderedDict()  # (prompt, Sampling) -> Continuations
        self._steered: OrderedDict = OrderedDict()  # (prompt, strengths, Sampling) -> same
        self._attribution: OrderedDict = OrderedDict()  # prompt -> (Attribution, target)
        self.computed: list[str] = []  # what the last calls ran (not found in a cache)

    def _remember(self, cache: OrderedDict, key, value):
        cache[key] = value
        while len(cache) > self.cache_size:
            cache.popitem(last=False)
        return value

    def decoder(self) -> torch.nn.Module:
        """The transformers module that decodes continuations: the model's own, or for
        ``precision="bfloat16"`` its bfloat16 copy (parameters cast, buffers such as the rotary
        frequencies kept; made once, on first use, without a second float32 copy)."""
        hf, dtype = hf_model(self.model), PRECISIONS[self.precision]
        if dtype is None or next(hf.parameters()).dtype == dtype:
            return hf
        if self._decoder is None:
            # deepcopy with every parameter already cast: tied weights stay tied
            memo = {id(p): torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)
                    for p in hf.parameters()}
            self._decoder = copy.deepcopy(hf, memo).eval()
        return self._decoder

    def _run(self, prompt: str, edits: Sequence[Edit], sampling: Sampling) -> Continuations:
        ids = prompt_tokens(self.model, prompt)  # (1, T)
        seeds, hf = sampling.seeds, self.decoder()
        batch = ids.repeat(len(seeds), 1)
        splice = Splice(self.model, self.dictionary, edits, hf=hf) if edits else None
        with splice if splice is not None else contextlib.nullcontext():
            new, first = sample_with_logits(self.model, batch, sampling.max_new_tokens,
                                            sampling.temperature, 0, seeds, hf=hf)
        if hf is not hf_model(self.model):  # the next-token logits in the model's precision
            splice = Splice(self.model, self.dictionary, edits) if edits else None
            first = edited_logits(self.model, ids, splice)[:, -1].cpu()  # (1, V)
        return Continuations(new.tolist(), self.model.tokenizer.batch_decode(new), first[0])

    def clean(self, prompt: str, sampling: Sampling) -> Continuations:
        """The clean continuations (cached)."""
        key = (prompt, sampling)
        if key in self._clean:
            self._clean.move_to_end(key)
            return self._clean[key]
        self.computed.append("clean")
        return self._remember(self._clean, key, self._run(prompt, [], sampling))

    def edits(self, strengths) -> list[Edit]:
        """One direction edit per latent with a nonzero strength: ``strength * scale`` along its
        decoder row."""
        return [latent_method(self.dictionary, i, self.scale).edits(c)[0]
                for i, c in strengths_of(strengths) if c != 0]

    def steered(self, prompt: str, strengths, sampling: Sampling) -> Continuations:
        """The continuations with every latent of ``strengths`` steered at once (cached); the
        clean ones when every strength is 0."""
        pairs = strengths_of(strengths)
        edits = self.edits(pairs)
        if not edits:
            return self.clean(prompt, sampling)
        key = (prompt, pairs, sampling)
        if key in self._steered:
            self._steered.move_to_end(key)
            return self._steered[key]
        self.computed.append("steered")
        return self._remember(self._steered, key, self._run(prompt, edits, sampling))

    def logit_changes(self, prompt: str, edited: Continuations, sampling: Sampling,
                      k: int = 8) -> pd.DataFrame:
        """Next tokens promoted and suppressed after ``prompt`` by the edit of ``edited``
        (:func:`sae_nb.interventions.effects.change_table`), from the runs' first steps."""
        clean = self.clean(prompt, sampling)
        return change_table(self.model.tokenizer, clean.first_logits, edited.first_logits, k)

    def attribution(self, prompt: str) -> tuple[Attribution, tuple[int, int]]:
        """Activation x gradient of the clean model's top next token against its second, and
        that target pair of token ids (cached per prompt)."""
        if prompt in self._attribution:
            self._attribution.move_to_end(prompt)
            return self._attribution[prompt]
        self.computed.append("attribution")
        logits = self.clean(prompt, Sampling(max_new_tokens=1)).first_logits
        target = tuple(logits.topk(2).indices.tolist())
        att = attribute(self.model, self.dictionary, prompt, target)
        return self._remember(self._attribution, prompt, (att, target))

    def ablation(self, prompt: str, latent: int, position: int, sampling: Sampling) -> dict:
        """Ablate ``latent`` at ``position`` of the prompt, with no steering edit: the
        continuations, the next-token changes, and the effect on the attribution's target
        (``clean - ablated``, measured from the ablated run's first step) beside the attribution
        (the first-order prediction of that effect)."""
        latent = latent_index(latent)
        att, (a, b) = self.attribution(prompt)
        n = len(att.tokens)
        if not 0 <= position < n:
            raise InterventionError(f"position={position} is outside the prompt's {n} tokens; "
                                    f"give 0..{n - 1}.")
        self.computed.append("ablation")
        run = self._run(prompt, [ablate(latent, position, position + 1)], sampling)
        ablated = float(run.first_logits[a] - run.first_logits[b])
        return {"continuations": run, "changes": self.logit_changes(prompt, run, sampling, k=5),
                "predicted": float(att.scores[position, latent]),
                "measured": att.target - ablated, "target": att.target_name}
