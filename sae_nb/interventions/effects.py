"""What an edit does to the model's output: next-token changes, side effects, generations.

For an edit made with :mod:`sae_nb.interventions.splice` (the dictionary spliced in with its
error term):

- :func:`logit_changes`: the next-token tokens the edit promotes and suppresses most after a
  prompt, ranked by the change in probability (with the change in log-probability, and in the
  raw logit).
- :func:`side_effects`: on neutral text (held-out corpus contexts, :func:`neutral_tokens`),
  the cross-entropy of the clean and edited model and the mean KL divergence
  ``KL(clean || edited)``, SAELens's order (the edited model judged by how much probability it
  moves away from the clean one). Both average over the same next-token predictions, those
  at positions ``0..T-2`` (as :func:`sae_nb.training.evaluate.ce_metrics` does).
- :func:`generate` and :func:`compare_generations`: continuations, greedy (temperature 0) or
  sampled with a seed (a positive, finite temperature), with the edit applied at every step (a
  manual loop over the KV cache; the edit's positions are absolute, so ``start=`` counts prompt
  and generated tokens alike). Prompt and continuation must fit the model's positions.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sae_nb.activations.corpora import load_corpus, pack_contexts, token_strings
from sae_nb.activations.models import Model, hf_model, max_positions, model_name
from sae_nb.dictionaries.architectures import Dictionary
from sae_nb.interventions.splice import (
    Edit,
    InterventionError,
    Splice,
    check_length,
    edited_logits,
    prompt_tokens,
)
from sae_nb.util.checks import real_number


def logit_changes(model: Model, dictionary: Dictionary, prompt: str, edits: Sequence[Edit],
                  k: int = 10, site: str | None = None) -> pd.DataFrame:
    """The ``k`` next tokens the edit promotes most and the ``k`` it suppresses most after
    ``prompt``, ranked by the probability they gain or lose (``p_change``; a change of
    log-probability ranks tokens nobody would sample first): clean and edited probability,
    change in log-probability and in logit."""
    ids = prompt_tokens(model, prompt)
    clean = edited_logits(model, ids)[0, -1]  # (V,)
    edited = edited_logits(model, ids, Splice(model, dictionary, edits, site))[0, -1]
    return change_table(model.tokenizer, clean, edited, k)


def change_table(tokenizer, clean: torch.Tensor, edited: torch.Tensor, k: int = 10) -> pd.DataFrame:
    """:func:`logit_changes`'s table from the clean and edited next-token logits ``(V,)``: changes
    of probability and log-probability only, which a shift of every logit leaves alone (a raw
    logit change does not)."""
    clean, edited = clean.float(), edited.float()
    lp_clean, lp_edit = torch.log_softmax(clean, -1), torch.log_softmax(edited, -1)
    change = lp_edit.exp() - lp_clean.exp()
    rows = []
    for kind, order in (("promoted", change.argsort(descending=True)[:k]),
                        ("suppressed", change.argsort()[:k])):
        names = token_strings(tokenizer, order.cpu().numpy())
        for rank, (t, name) in enumerate(zip(order.tolist(), names), 1):
            rows.append({"effect": kind, "rank": rank, "token": name, "token_id": t,
                         "p_change": float(change[t]),
                         "p_clean": float(lp_clean[t].exp()), "p_edited": float(lp_edit[t].exp()),
                         "logprob_change": float(lp_edit[t] - lp_clean[t])})
    return pd.DataFrame(rows)


def neutral_tokens(model: Model, corpus: str = "sotu", n_contexts: int = 8, ctx_len: int = 64,
                   seed: int = 1) -> torch.Tensor:
    """``(n_contexts, ctx_len)`` token contexts of ``corpus`` (BOS first), shuffled by ``seed``
    (1, as :func:`sae_nb.training.evaluate.fit_check` uses: other documents than extraction's
    seed 0)."""
    ctx = pack_contexts(load_corpus(corpus), model.tokenizer, ctx_len, n_contexts, seed=seed)
    return torch.from_numpy(ctx.tokens.astype(np.int64))


def clean_log_probs(model: Model, tokens: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """``(N, T, V)`` next-token log-probabilities of the clean model (reused across edits)."""
    return torch.cat([torch.log_softmax(edited_logits(model, tokens[lo : lo + batch_size]), -1)
                      for lo in range(0, len(tokens), batch_size)])


def side_effects(model: Model, dictionary: Dictionary, edits: Sequence[Edit], tokens: torch.Tensor,
                 clean: torch.Tensor | None = None, batch_size: int = 8,
                 site: str | None = None) -> dict:
    """Mean next-token CE of the clean and the edited model on ``tokens`` ``(N, T)``, the
    increase, and the mean ``KL(clean || edited)`` (nats), both over the same ``N * (T - 1)``
    next-token predictions (positions ``0..T-2``; a position kept clean before any edited one,
    such as the first BOS, counts as 0 in both). ``clean``: the clean log-probabilities from
    :func:`clean_log_probs`, when several edits share the text."""
    if len(tokens) == 0 or tokens.shape[1] < 2:
        raise InterventionError(f"Neutral text of shape {tuple(tokens.shape)}; give at least one "
                                f"context of two or more tokens.")
    check_length(model, tokens.shape[1], "Each context of the neutral text")
    splice = Splice(model, dictionary, edits, site)
    sums = {"ce_clean": 0.0, "ce_edited": 0.0, "kl": 0.0}
    for lo in range(0, len(tokens), batch_size):
        t = tokens[lo : lo + batch_size]
        lp_clean = (clean[lo : lo + batch_size] if clean is not None else
                    torch.log_softmax(edited_logits(model, t), -1)).to(t.device)
        lp_edit = torch.log_softmax(edited_logits(model, t, splice), -1).to(t.device)
        target = t[:, 1:, None]
        sums["ce_clean"] -= float(lp_clean[:, :-1].gather(-1, target).sum())
        sums["ce_edited"] -= float(lp_edit[:, :-1].gather(-1, target).sum())
        # kl_div(log q, log p) = sum_v p (log p - log q) = KL(clean || edited), at the
        # positions whose next token CE scores (the last position predicts none)
        sums["kl"] += float(F.kl_div(lp_edit[:, :-1], lp_clean[:, :-1], log_target=True,
                                     reduction="sum"))
    n_next = tokens.shape[0] * (tokens.shape[1] - 1)
    out = {"ce_clean": sums["ce_clean"] / n_next, "ce_edited": sums["ce_edited"] / n_next,
           "kl": sums["kl"] / n_next}
    out["ce_increase"] = out["ce_edited"] - out["ce_clean"]
    return out


def batch_rows(edits: Sequence[Edit]) -> int:
    """How many batch rows the edits' coefficients ask for (1 unless one gives one per row)."""
    sizes = {len(e.value) for e in edits if isinstance(e.value, tuple)}
    if len(sizes) > 1:
        raise InterventionError(f"Edits give {sorted(sizes)} coefficients each; give the same "
                                f"number (one per batch row) to every edit.")
    return sizes.pop() if sizes else 1


def sample_tokens(model: Model, ids: torch.Tensor, max_new_tokens: int,
                  temperature: float = 0.0, seed: int = 0,
                  seeds: Sequence[int] | None = None) -> torch.Tensor:
    """``(B, max_new_tokens)`` tokens after ``ids`` ``(B, T)``, one cached step per token:
    greedy for ``temperature`` 0, else sampled from ``softmax(logits / temperature)``. Each row
    draws from its own generator seeded by ``seed`` (or row ``b`` by ``seeds[b]``; Gumbel-max),
    so a row's text depends on its seed and its own logits only: the same seed gives the same
    text, and rows that differ only in a steering coefficient share their random numbers
    (coefficient 0 is the clean text)."""
    return sample_with_logits(model, ids, max_new_tokens, temperature, seed, seeds)[0]


@torch.no_grad()
def sample_with_logits(model: Model, ids: torch.Tensor, max_new_tokens: int,
                       temperature: float = 0.0, seed: int = 0,
                       seeds: Sequence[int] | None = None,
                       hf: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample_tokens`'s tokens and the first step's logits ``(B, V)``, as float32: the
    next-token logits after the prompt, under whatever splice is on (so a steered run gives the
    edited next-token distribution without another forward pass). ``hf``: the transformers
    module that decodes, a copy of the model's (e.g. in bfloat16); the model's own by default."""
    if max_new_tokens < 1:
        raise InterventionError(f"max_new_tokens={max_new_tokens}; generate at least 1 token.")
    check_temperature(temperature)
    check_length(model, ids.shape[1])
    limit, need = max_positions(model), ids.shape[1] + max_new_tokens - 1  # the last is not fed
    if limit is not None and need > limit:
        raise InterventionError(f"The prompt's {ids.shape[1]} tokens and max_new_tokens="
                                f"{max_new_tokens} need {need} positions but model "
                                f"{model_name(model)!r} has {limit}; give max_new_tokens="
                                f"{limit - ids.shape[1] + 1} or fewer, or shorten the prompt.")
    seeds = [int(seed)] * len(ids) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != len(ids):
        raise InterventionError(f"{len(seeds)} seeds for {len(ids)} rows; give one seed per row.")
    hf = hf if hf is not None else hf_model(model)
    device = next(hf.parameters()).device
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    out = hf(input_ids=ids.to(device), use_cache=True)
    first = out.logits[:, -1].float().cpu()  # (B, V)
    new = []
    for step in range(max_new_tokens):
        logits = out.logits[:, -1].float()  # (B, V)
        if temperature > 0:
            u = torch.stack([torch.rand(logits.shape[1], generator=g, device=device)
                             for g in generators])  # (B, V)
            gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)))
            token = (logits / temperature + gumbel).argmax(-1, keepdim=True)  # (B, 1)
        else:
            token = logits.argmax(-1, keepdim=True)
        new.append(token)
        if step + 1 < max_new_tokens:
            out = hf(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
    return torch.cat(new, 1).cpu(), first


def check_temperature(temperature: float) -> None:
    """0 decodes greedily, a positive finite number samples; anything else is refused (a NaN
    or a negative temperature would decode greedily without a word)."""
    real_number("temperature", temperature, 0.0, error=InterventionError,
                example="temperature=0 to decode greedily, or 0.7 to sample")


def generate(model: Model, prompt: str, dictionary: Dictionary | None = None,
             edits: Sequence[Edit] = (), max_new_tokens: int = 20, temperature: float = 0.0,
             seed: int = 0, site: str | None = None, rows: int | None = None,
             seeds: Sequence[int] | None = None) -> list[str]:
    """Continuations of ``prompt``, one per batch row (one per coefficient when an edit gives
    one per row, one per seed with ``seeds``), clean without ``dictionary`` or with its edits
    applied at every step."""
    check_temperature(temperature)
    ids = prompt_tokens(model, prompt)
    rows = rows or (len(seeds) if seeds is not None else batch_rows(edits))
    splice = Splice(model, dictionary, edits, site) if dictionary is not None else None
    with splice if splice is not None else contextlib.nullcontext():
        new = sample_tokens(model, ids.repeat(rows, 1), max_new_tokens, temperature, seed, seeds)
    return model.tokenizer.batch_decode(new)


def compare_generations(model: Model, dictionary: Dictionary, prompts: Sequence[str],
                        edits: Sequence[Edit], max_new_tokens: int = 20,
                        temperature: float = 0.0, seed: int = 0,
                        progress: bool = True) -> pd.DataFrame:
    """Clean and edited continuations side by side, one row per prompt (a progress bar over the
    prompts unless ``progress`` is False)."""
    if not prompts:
        raise InterventionError("No prompts; give at least one.")
    rows = []
    for prompt in tqdm(prompts, desc="generations", unit="prompt", disable=not progress):
        clean = generate(model, prompt, None, (), max_new_tokens, temperature, seed)[0]
        edited = generate(model, prompt, dictionary, edits, max_new_tokens, temperature, seed,
                          rows=1)[0]
        rows.append({"prompt": prompt, "clean": clean, "edited": edited})
    return pd.DataFrame(rows)


def time_per_token(model: Model, prompt: str, dictionary: Dictionary | None = None,
                   edits: Sequence[Edit] = (), max_new_tokens: int = 32,
                   repeats: int = 3) -> float:
    """Seconds per generated token (greedy, best of ``repeats``), clean or with the edits."""
    ids = prompt_tokens(model, prompt)
    splice = Splice(model, dictionary, edits) if dictionary is not None else None
    best = float("inf")
    for _ in range(repeats):
        with splice if splice is not None else contextlib.nullcontext():
            t0 = time.perf_counter()
            sample_tokens(model, ids, max_new_tokens)
            best = min(best, time.perf_counter() - t0)
    return best / max_new_tokens
