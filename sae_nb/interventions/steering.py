"""Steering sweeps: a target measure against its side effects, per method and coefficient.

A *method* turns a coefficient into edits (:mod:`sae_nb.interventions.splice`): steering a latent
(along its decoder row ``W_dec[i]``), or a raw direction (a probe's weights, a difference of
class means). Every method adds a vector of norm ``coefficient * scale`` at every position
but BOS, with ``scale`` the median token norm at the site (:func:`site_scale`), so coefficients
mean the same for every method and every model. The site is the one the edits land on: the
dictionary's, or for a transcoder the site it writes, where its raw directions are read too.
:func:`steering_sweep` generates from neutral prompts at each coefficient (all coefficients of
a prompt in one batch), scores the continuations with a target function, and measures the KL
to the clean model and the CE increase on neutral corpus text
(:func:`sae_nb.interventions.effects.side_effects`).

The default experiment (notebook 07) steers sentiment: the latent notebook 04's sparse probe
names for the positive class, the raw probe's direction and the difference of class means at
the site the edits land on, scored by a raw probe at the layer where sentiment reads best
(:func:`sentiment_setup`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from sae_nb.activations.extract import pooled_activations, resolve_sites, run_sites
from sae_nb.activations.models import Model
from sae_nb.dictionaries.architectures import Dictionary
from sae_nb.interventions.effects import clean_log_probs, generate, side_effects
from sae_nb.interventions.splice import (
    Edit,
    InterventionError,
    latent_index,
    splice_sites,
    steer_direction,
)
from sae_nb.texts.probing import (
    class_latents,
    fit_probe,
    layer_sweep,
    load_labeled,
    probe_features,
    run_probes,
    split_labeled,
    subsample,
    sweep_activations,
)
from sae_nb.util.checks import real_number


@dataclass
class SteeringMethod:
    """A name and a map from a coefficient (or one per batch row) to edits."""

    name: str
    edits: Callable[[float | tuple[float, ...]], list[Edit]]


def _scaled(c, factor: float):
    return tuple(v * factor for v in c) if isinstance(c, tuple) else c * factor


def _check_scale(scale: float) -> None:
    real_number("scale", scale, 0.0, strict=True, error=InterventionError,
                example="the site's median token norm (site_scale) or scale=1.0")


def latent_method(dictionary: Dictionary, latent: int, scale: float = 1.0,
                  name: str | None = None) -> SteeringMethod:
    """Steer latent ``latent`` by a vector of norm ``c * scale`` along its decoder row.

    Where the reconstruction is ``f @ W_dec + b_dec`` (plus terms of ``x`` alone) that is
    ``f_i += c * scale / |W_dec[i]|``. OpenAI's normalised TopK reconstructs
    ``(f @ W_dec + b_dec) * sigma(x) + mu(x)``, so a code change ``d`` moves the site by
    ``d * sigma(x) * W_dec[i]`` and the same vector needs ``d = c * scale / (|W_dec[i]|
    sigma(x))``, one per position. Either way the site gets ``c * scale * W_dec[i] /
    |W_dec[i]|``, which is what the method adds (a direction edit along the row)."""
    i = latent_index(latent)
    if not 0 <= i < dictionary.d_sae:
        raise InterventionError(f"Latent {i} out of range: this dictionary has latents "
                                f"0..{dictionary.d_sae - 1}.")
    _check_scale(scale)
    row = dictionary.W_dec[i].detach().float().cpu()  # (D,) in the site's units, up to sigma
    if not float(row.norm()) > 0:
        raise InterventionError(f"Latent {i}'s decoder row is zero (a dead latent): it has no "
                                f"direction to steer along; pick another latent.")
    label = name or f"latent {i}"
    return SteeringMethod(label, lambda c: [steer_direction(row, _scaled(c, scale), name=label)])


def direction_method(direction, name: str, scale: float = 1.0) -> SteeringMethod:
    """Steer along a raw direction ``(D,)``: a vector of norm ``c * scale``."""
    _check_scale(scale)
    steer_direction(direction, 1.0, name=name)  # checks it now: nonzero, finite
    return SteeringMethod(name, lambda c: [steer_direction(direction, _scaled(c, scale),
                                                           name=name)])


def random_direction_method(d: int, scale: float = 1.0, seed: int = 0,
                            name: str = "random direction") -> SteeringMethod:
    """The control: steer along a seeded random direction of the same norm as the others, so a
    method's KL and shift can be read against what any push of that size does."""
    g = torch.Generator().manual_seed(int(seed))
    return direction_method(torch.randn(int(d), generator=g).numpy(), name, scale)


def site_scale(model: Model, dictionary: Dictionary, tokens: torch.Tensor,
               site: str | None = None) -> float:
    """The median norm of the token activations on ``tokens`` (BOS left out) at the site the
    edits land on: the dictionary's, or the site a transcoder writes."""
    reads, writes = splice_sites(dictionary, site)
    (s,) = resolve_sites(model, [writes or reads])
    x = run_sites(model, [s], tokens, torch.ones_like(tokens))[0][:, 1:]
    return float(x.float().norm(dim=-1).median())


@dataclass
class SweepResult:
    table: pd.DataFrame  # one row per method and coefficient
    generations: pd.DataFrame  # one row per method, coefficient and prompt
    clean: pd.DataFrame = field(default_factory=pd.DataFrame)  # the clean continuations


def steering_sweep(model: Model, dictionary: Dictionary, methods: Sequence[SteeringMethod],
                   coefficients: Sequence[float], prompts: Sequence[str], neutral: torch.Tensor,
                   score: Callable[[list[str]], np.ndarray], max_new_tokens: int = 24,
                   temperature: float = 0.0, seed: int = 0, progress: bool = True) -> SweepResult:
    """For every method and coefficient: the mean target score of the continuations of
    ``prompts`` and its shift from the clean continuations, the KL to the clean model and the
    CE increase on ``neutral`` token contexts. A progress bar (with its estimate of the time
    left) counts the generations and side-effect passes unless ``progress`` is False."""
    coefficients = [float(c) for c in coefficients]
    if not coefficients:
        raise InterventionError("The coefficient grid is empty; give some, e.g. [0.5, 1, 2].")
    if not prompts or not methods:
        raise InterventionError(f"{len(prompts)} prompts and {len(methods)} methods; give at "
                                f"least one of each.")
    gen = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    steps = len(prompts) + len(methods) * (len(prompts) + len(coefficients))
    with tqdm(total=steps, desc="steering sweep", unit="pass", disable=not progress) as bar:
        clean_texts = []
        for p in prompts:
            clean_texts.append(generate(model, p, **gen)[0])
            bar.update()
        clean_lp = clean_log_probs(model, neutral)
        rows, texts = [], []
        for method in methods:
            bar.set_postfix_str(method.name)
            for prompt in prompts:
                outs = generate(model, prompt, dictionary, method.edits(tuple(coefficients)),
                                **gen)
                texts += [{"method": method.name, "coefficient": c, "prompt": prompt,
                           "continuation": t} for c, t in zip(coefficients, outs)]
                bar.update()
            for c in coefficients:
                rows.append({"method": method.name, "coefficient": c, **side_effects(
                    model, dictionary, method.edits(c), neutral, clean_lp)})
                bar.update()
    clean_scores = np.asarray(score(clean_texts), dtype=float)
    baseline = float(clean_scores.mean())
    generations = pd.DataFrame(texts)
    generations["score"] = np.asarray(score(generations["continuation"].tolist()), dtype=float)
    # paired by prompt: each continuation against the same prompt's clean one
    generations["shift"] = generations["score"] - generations["prompt"].map(
        dict(zip(prompts, clean_scores)))
    per = generations.groupby(["method", "coefficient"], as_index=False).agg(
        score=("score", "mean"), shift_se=("shift", "sem"))
    table = pd.DataFrame(rows).merge(per, on=["method", "coefficient"])
    table["shift"] = table["score"] - baseline
    table["shift_per_kl"] = table["shift"] / table["kl"].where(table["kl"] > 0)
    table = table[["method", "coefficient", "score", "shift", "shift_se", "kl", "ce_increase",
                   "shift_per_kl", "ce_clean", "ce_edited"]]
    clean = pd.DataFrame({"prompt": list(prompts), "continuation": clean_texts,
                          "score": clean_scores})
    return SweepResult(table, generations, clean)


def verdict(table: pd.DataFrame, target: str = "sentiment", n_prompts: int | None = None,
            control: str = "random direction") -> str:
    """One paragraph naming the method that moves the target furthest per unit of KL, with the
    measured figures of every method.

    Only coefficients whose shift is beyond noise count: more than two standard errors
    (``shift_se``, over the prompts, paired with their clean continuations) above zero. A method
    with none is said to be within noise; the ``control`` (a random direction) is reported
    beside the others, as the size of shift any push of that norm gives."""
    se = table["shift_se"] if "shift_se" in table else pd.Series(0.0, index=table.index)
    over = f" over {n_prompts} prompts" if n_prompts else ""
    beyond = table[(table["kl"] > 0) & (table["shift"] > 2 * se.fillna(np.inf))]
    methods = [m for m in dict.fromkeys(table["method"]) if m != control]
    real = beyond[beyond["method"] != control].dropna(subset=["shift_per_kl"])
    if real.empty:
        return (f"No method moved {target} beyond noise (two standard errors{over}) at any "
                f"coefficient of the grid; the largest shift was {table['shift'].max():+.3f}.")
    best = real.loc[real.groupby("method")["shift_per_kl"].idxmax()]
    best = best.sort_values("shift_per_kl", ascending=False)
    top = best.iloc[0]
    parts = [f"{r.method}: shift {r.shift:+.3f} +- {r.shift_se:.3f} at coefficient "
             f"{r.coefficient:g} with KL {r.kl:.3f} nats ({r.shift_per_kl:+.3f} per nat), "
             f"CE +{r.ce_increase:.3f}" for r in best.itertuples()]
    parts += [f"{m}: no coefficient moved {target} beyond noise"
              for m in methods if m not in set(best["method"])]
    furthest = real.loc[real["shift"].idxmax()]
    text = (f"Per unit of KL on neutral text, {top.method} moves {target} furthest "
            f"({top.shift_per_kl:+.3f} per nat; shifts count when beyond two standard "
            f"errors{over}). " + "; ".join(parts) + f". The largest shift: {furthest.method} "
            f"at coefficient {furthest.coefficient:g} ({furthest['shift']:+.3f}, KL "
            f"{furthest.kl:.3f}).")
    ctrl = table[table["method"] == control]
    if not ctrl.empty:
        c = ctrl.loc[ctrl["shift"].abs().idxmax()]
        text += (f" The control, a {control} of the same norm, shifts {target} by at most "
                 f"{c['shift']:+.3f} (coefficient {c.coefficient:g}, KL {c.kl:.3f}).")
    return text


# ---------------------------------------------------------------- the sentiment experiment


@dataclass
class SentimentSetup:
    """What the sentiment experiment steers with and scores by."""

    latent: int  # the positive class's top latent of the sparse probe
    directions: dict[str, np.ndarray]  # raw directions where the edits land (a transcoder's target)
    score_site: str  # where the raw probe scores continuations (the sweep's best)
    score: Callable[[list[str]], np.ndarray]  # P(positive) of each text
    latents: pd.DataFrame  # notebook 04's class_latents table
    sweep: pd.DataFrame  # the raw probe's accuracy at each swept site


def probe_direction(probe, positive: str) -> np.ndarray:
    """A two-class raw probe's weights in activation units (``coef / scaler.scale_``),
    pointing to ``positive``."""
    scaler, clf = probe.pipeline[0], probe.pipeline[-1]
    w = clf.coef_[0] / scaler.scale_
    return w if str(clf.classes_[1]) == positive else -w


def sentiment_setup(model: Model, dictionary: Dictionary, labeled: str = "movie_reviews",
                    n_sentences: int = 2000, positive: str = "positive",
                    sweep_sites="resid_out", explain_k: int = 20, seed: int = 0,
                    batch_size: int = 32, run_dir=None) -> SentimentSetup:
    """Notebook 04's probes on ``labeled`` (its features and sweep cached in
    ``run_dir/probing``): the positive latent, the raw probe's direction and the difference of
    class means at the site the edits land on (the dictionary's; for a transcoder the site it
    writes, not the one it reads), and a raw-probe scorer at the best swept site."""
    data = subsample(load_labeled(labeled), n_sentences, seed=seed)
    texts, y = data["text"].tolist(), data["label"].to_numpy().astype(str)
    if positive not in set(y):
        raise InterventionError(f"No class {positive!r} in the labels {sorted(set(y))}; pass "
                                f"positive=<one of them>.")
    train, test = split_labeled(y, seed=seed)
    raw, codes = probe_features(model, dictionary, texts, batch_size=batch_size, run_dir=run_dir)
    _, probes = run_probes(raw, codes, y, train, test, seed=seed)
    latents = class_latents(probes[f"top {explain_k} latents"], codes[train], y[train],
                            codes[test], y[test], [texts[i] for i in test])
    mine = latents[latents["class"] == positive]
    if mine.empty:
        raise InterventionError(f"The sparse probe names no latent for {positive!r}; raise "
                                f"n_sentences or explain_k.")
    pos = y[train] == positive
    _, writes = splice_sites(dictionary)
    if writes is not None:  # a transcoder: its edits land where it writes, so read there
        raw = sweep_activations(model, texts, [writes], batch_size=batch_size,
                                run_dir=run_dir)[writes]
        probes["raw"] = fit_probe(raw[train], y[train], raw[test], y[test], writes, seed=seed)
    directions = {"probe direction": probe_direction(probes["raw"], positive),
                  "difference of means": raw[train][pos].mean(0) - raw[train][~pos].mean(0)}
    sweep = layer_sweep(model, texts, y, train, test, sweep_sites, seed=seed,
                        batch_size=batch_size, run_dir=run_dir)
    best = str(sweep.loc[sweep["accuracy"].idxmax(), "site"])
    acts = sweep_activations(model, texts, list(sweep["site"]), run_dir=run_dir)[best]
    scorer = fit_probe(acts[train], y[train], acts[test], y[test], best, seed=seed).pipeline
    column = [str(c) for c in scorer.classes_].index(positive)

    def score(continuations: list[str]) -> np.ndarray:
        safe = [t if t.strip() else "." for t in continuations]  # an all-space text pools nothing
        X = pooled_activations(model, safe, [best], batch_size=batch_size)[best].numpy()
        return scorer.predict_proba(X)[:, column]

    return SentimentSetup(int(mine.iloc[0]["latent"]), directions, best, score, latents, sweep)


def sentiment_methods(dictionary: Dictionary, setup: SentimentSetup,
                      scale: float) -> list[SteeringMethod]:
    """The methods the notebook compares: the positive latent, the probe direction and the
    difference of class means, and a random direction as the control, each adding a vector of
    norm ``coefficient * scale``."""
    d = int(dictionary.W_dec.shape[1])  # the width of the site the edits land on
    return [latent_method(dictionary, setup.latent, scale),
            *(direction_method(v, name, scale) for name, v in setup.directions.items()),
            random_direction_method(d, scale)]
