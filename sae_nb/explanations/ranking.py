"""Explanations ranked honestly: each score against its own control, beyond its noise.

Scores of different kinds have different chance levels (a rule's F1 about 0, a detection or
embedding AUROC 0.5), so a raw score never ranks one explanation above another. Each
explanation is instead compared with its **control** (``"<method>:control"``: another latent's
explanation, scored the same way on the same latent), and the **margin** between them is
divided by its noise:

- an **AUROC** from ``n_positive`` firing and ``n_negative`` silent contexts varies by
  ``sqrt((n+ + n- + 1) / (12 n+ n-))`` when the explanation carries no information (the
  Mann-Whitney statistic's spread under the null; 0.13 for 10 + 10 contexts);
- a held-out **F1** varies as its counts do: a Poisson bootstrap of the true positives, false
  positives and false negatives (the rule's held-out precision and counts) gives its spread;
- a score without those counts takes the spread of its method's control scores over the
  latents (at least :data:`MIN_CONTROLS` of them), else its noise is unknown.

The margin's noise is the root sum of squares of the score's and the control's. The **effect**
``margin / noise`` compares like with like across kinds of score; an explanation is beyond
noise when its effect reaches ``min_effect`` (:data:`MIN_EFFECT`, 2: a chance explanation
gets there about 2% of the time). A latent none of whose explanations is beyond noise is
**unexplained**. Methods are compared on the mean margin over the latents they share, with a
bootstrap over those latents (:func:`bootstrap_interval`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

CONTROL = ":control"  # suffix of a control row's method
MIN_EFFECT = 2.0  # margins of at least this many noise units are beyond noise
MIN_CONTROLS = 5  # controls needed to take their spread as the noise of a score without counts
N_DRAWS = 400  # bootstrap draws of an F1's counts
N_BOOTSTRAP = 1000  # bootstrap draws over latents of a method's mean margin
NAMES = {"f1": "F1", "detection_auroc": "detection AUROC", "embedding_auroc": "embedding AUROC",
         "fuzzing_auroc": "fuzzing AUROC"}


def is_control(method) -> pd.Series | bool:
    """Whether a method name (or a Series of them) is a control's."""
    if isinstance(method, pd.Series):
        return method.str.endswith(CONTROL)
    return str(method).endswith(CONTROL)


def score_label(score_name: str) -> str:
    """A score's name for a reader: ``"f1"`` -> ``"F1"``, ``"detection_auroc"`` ->
    ``"detection AUROC"``."""
    return NAMES.get(score_name, score_name.replace("_auroc", " AUROC").replace("_", " "))


def auroc_noise(n_positive, n_negative) -> np.ndarray:
    """The spread of an AUROC over ``n_positive`` and ``n_negative`` contexts when the scores
    carry no information: ``sqrt((n+ + n- + 1) / (12 n+ n-))``; NaN without contexts."""
    p = np.asarray(n_positive, dtype=np.float64)
    n = np.asarray(n_negative, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((p > 0) & (n > 0), np.sqrt((p + n + 1) / (12 * p * n)), np.nan)


def f1_noise(true_positive, false_positive, false_negative, n_draws: int = N_DRAWS,
             seed: int = 0) -> np.ndarray:
    """The spread of an F1 ``2 tp / (2 tp + fp + fn)`` over held-out tokens resampled: each
    count drawn from a Poisson of its value (``n_draws`` times, seeded; an F1 of no counts is
    0), the sample standard deviation per row. NaN where a count is missing."""
    counts = [np.asarray(c, dtype=np.float64) for c in (true_positive, false_positive,
                                                        false_negative)]
    known = np.all([np.isfinite(c) & (c >= 0) for c in counts], axis=0)
    a, b, c = (np.where(known, x, 0.0) for x in counts)
    rng = np.random.default_rng(seed)
    out = np.full(a.shape, np.nan)
    for lo in range(0, a.size, 4096):  # rows in blocks keep the draws' memory small
        sl = slice(lo, lo + 4096)
        tp, fp, fn = (rng.poisson(x[sl], size=(n_draws, x[sl].size)) for x in (a, b, c))
        den = 2 * tp + fp + fn
        f1 = np.where(den > 0, 2 * tp / np.maximum(den, 1), 0.0)
        out[sl] = f1.std(0, ddof=1)
    return np.where(known, out, np.nan)


def score_noise(table: pd.DataFrame, seed: int = 0) -> pd.Series:
    """Each row's noise from its own counts (module docstring): AUROC rows with
    ``n_positive``/``n_negative``, F1 rows with ``precision``, ``n_fired_heldout`` and
    ``n_matched_heldout``; NaN for the others."""
    noise = pd.Series(np.nan, index=table.index)
    def numbers(rows: pd.Series, column: str) -> np.ndarray:
        return pd.to_numeric(table.loc[rows, column], errors="coerce").to_numpy(np.float64)

    if {"n_positive", "n_negative"} <= set(table.columns):
        auroc = table["score_name"].str.endswith("auroc")
        noise[auroc] = auroc_noise(numbers(auroc, "n_positive"), numbers(auroc, "n_negative"))
    if {"precision", "n_fired_heldout", "n_matched_heldout"} <= set(table.columns):
        f1 = table["score_name"] == "f1"
        fired, matched, precision = (numbers(f1, c) for c in (
            "n_fired_heldout", "n_matched_heldout", "precision"))
        tp = np.rint(precision * matched)
        noise[f1] = f1_noise(tp, matched - tp, fired - tp, seed=seed)
    return noise


def margins(table: pd.DataFrame, min_effect: float = MIN_EFFECT, seed: int = 0
            ) -> pd.DataFrame:
    """Every usable explanation of a checked table (not a control, no error, an explanation, a
    finite score) with its control on the same latent and score: columns ``latent``,
    ``explanation``, ``method``, ``score``, ``score_name``, ``control`` (NaN without one),
    ``margin``, ``noise``, ``effect`` (``margin / noise``) and ``beyond_noise``
    (``effect >= min_effect``)."""
    ok = (table["error"] == "") & np.isfinite(table["score"])
    noise = score_noise(table, seed)
    # noise[rows], not noise: assigning a whole Series to an empty frame adopts its index, and
    # a table with nothing usable would come back as rows of NaN.
    ctrl = table[ok & is_control(table["method"])]
    ctrl = ctrl.assign(noise=noise[ctrl.index])
    ctrl = ctrl.assign(method=ctrl["method"].str[: -len(CONTROL)])
    ctrl = ctrl.drop_duplicates(["latent", "method", "score_name"], keep="last")
    own = table[ok & ~is_control(table["method"]) & (table["explanation"].str.strip() != "")]
    own = own.assign(own_noise=noise[own.index])
    out = own.merge(ctrl[["latent", "method", "score_name", "score", "noise"]].rename(
        columns={"score": "control", "noise": "control_noise"}),
        on=["latent", "method", "score_name"], how="left")
    spread = ctrl.groupby(["method", "score_name"])["score"].agg(["std", "count"])
    spread = spread.loc[spread["count"] >= MIN_CONTROLS, "std"] * np.sqrt(2)
    fallback = pd.Series([spread.get((m, s), np.nan) for m, s in
                          zip(out["method"], out["score_name"])], index=out.index, dtype=float)
    noise = np.hypot(out["own_noise"], out["control_noise"]).fillna(fallback)
    margin = out["score"] - out["control"]
    with np.errstate(divide="ignore", invalid="ignore"):
        effect = margin / noise
    out = out.assign(margin=margin, noise=noise, effect=effect,
                     beyond_noise=(effect >= min_effect) & (margin > 0))
    return out[["latent", "explanation", "method", "score", "score_name", "control", "margin",
                "noise", "effect", "beyond_noise"]]


def bootstrap_interval(values, n_draws: int = N_BOOTSTRAP, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """The ``level`` percentile interval of the mean of ``values`` over a bootstrap of them
    (seeded); NaN for no values."""
    values = np.asarray(values, dtype=np.float64)
    if not values.size:
        return np.nan, np.nan
    rng = np.random.default_rng(seed)
    means = np.concatenate([values[rng.integers(0, values.size, (min(100, n_draws - i),
                                                                  values.size))].mean(1)
                            for i in range(0, n_draws, 100)])
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)
