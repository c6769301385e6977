"""Steering sweeps (sae_nb.interventions.steering) on the tiny models, with a target computed by
hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import D_MODEL
from test_intervene import PROMPT, topk

from sae_nb.interventions.effects import generate, side_effects
from sae_nb.interventions.splice import InterventionError, prompt_tokens
from sae_nb.interventions.steering import (
    direction_method,
    latent_method,
    probe_direction,
    random_direction_method,
    sentiment_methods,
    sentiment_setup,
    site_scale,
    steering_sweep,
    verdict,
)


def share_of_e(texts):
    """A target computed without the model: the share of the letter 'e' in each text."""
    return np.array([t.count("e") / max(1, len(t)) for t in texts])


def test_sweep_rows_match_separate_runs(llama):
    sae = topk()
    neutral = torch.stack([prompt_tokens(llama, PROMPT)[0], prompt_tokens(llama, PROMPT[::-1])[0]])
    methods = [latent_method(sae, 7, scale=2.0),
               direction_method(torch.randn(D_MODEL).numpy(), "random", scale=2.0)]
    coefs = [0.0, 1.0, 3.0]
    prompts = ["The nation", "Peace and law"]
    res = steering_sweep(llama, sae, methods, coefs, prompts, neutral, share_of_e,
                         max_new_tokens=6)
    assert len(res.table) == 6 and len(res.generations) == 12
    for m in methods:
        for c in coefs:
            row = res.table[(res.table.method == m.name) & (res.table.coefficient == c)].iloc[0]
            alone = [generate(llama, p, sae, m.edits(c), max_new_tokens=6)[0] for p in prompts]
            clean = [generate(llama, p, max_new_tokens=6)[0] for p in prompts]
            assert row.score == pytest.approx(share_of_e(alone).mean())
            assert row["shift"] == pytest.approx(share_of_e(alone).mean()
                                                 - share_of_e(clean).mean())
            paired = share_of_e(alone) - share_of_e(clean)  # the same prompt steered and clean
            assert row.shift_se == pytest.approx(paired.std(ddof=1) / np.sqrt(len(prompts)))
            fx = side_effects(llama, sae, m.edits(c), neutral)
            assert row.kl == pytest.approx(fx["kl"], rel=1e-5, abs=1e-9)
            assert row.ce_increase == pytest.approx(fx["ce_increase"], rel=1e-5, abs=1e-7)
        zero = res.table[(res.table.method == m.name) & (res.table.coefficient == 0)].iloc[0]
        assert zero.kl == pytest.approx(0, abs=1e-7) and zero["shift"] == 0
    beyond = (res.table["shift"] > 2 * res.table["shift_se"]) & (res.table["kl"] > 0)
    text = verdict(res.table, "the share of e")
    assert ("per nat" in text) == bool(beyond.any()), text


def test_latent_method_is_its_decoder_direction_at_equal_norm(llama):
    sae = topk()
    neutral = prompt_tokens(llama, PROMPT)
    a = side_effects(llama, sae, latent_method(sae, 5, scale=3.0).edits(2.0), neutral)
    b = side_effects(llama, sae, direction_method(sae.W_dec[5].detach(), "row", 3.0).edits(2.0),
                     neutral)
    assert a["kl"] == pytest.approx(b["kl"], rel=1e-4) and a["kl"] > 1e-4


def test_site_scale_is_the_median_token_norm(llama):
    sae = topk()
    ids = prompt_tokens(llama, PROMPT)
    from sae_nb.activations.models import hf_model
    seen = {}
    h = hf_model(llama).model.layers[1].register_forward_hook(
        lambda m, a, o: seen.setdefault("x", o))
    try:
        with torch.no_grad():
            hf_model(llama)(input_ids=ids)
    finally:
        h.remove()
    x = seen["x"][0] if isinstance(seen["x"], tuple) else seen["x"]
    assert site_scale(llama, sae, ids) == pytest.approx(float(x[0, 1:].norm(dim=-1).median()),
                                                        rel=1e-5)


def test_probe_direction_recovers_the_separating_direction():
    from sae_nb.texts.probing import fit_probe
    rng = np.random.default_rng(0)
    w = rng.normal(size=8)
    X = rng.normal(size=(400, 8)) * np.arange(1, 9)  # unequal scales: the scaler matters
    y = np.where(X @ w > 0, "positive", "negative")
    probe = fit_probe(X[:300], y[:300], X[300:], y[300:])
    d = probe_direction(probe, "positive")
    assert d @ w / np.linalg.norm(d) / np.linalg.norm(w) > 0.9
    assert probe_direction(probe, "negative") @ w < 0


def test_bad_sweeps(llama):
    sae = topk()
    neutral = prompt_tokens(llama, PROMPT)
    m = [latent_method(sae, 1)]
    with pytest.raises(InterventionError, match="grid is empty"):
        steering_sweep(llama, sae, m, [], ["a"], neutral, share_of_e)
    with pytest.raises(InterventionError, match="0 prompts"):
        steering_sweep(llama, sae, m, [1.0], [], neutral, share_of_e)
    with pytest.raises(InterventionError, match="out of range"):
        latent_method(sae, 64)


def test_sentiment_setup_on_a_labeled_csv(llama, tmp_path):
    """The whole experiment's plumbing on a tiny labeled CSV: 'positive' texts are written
    with the letters a-m, 'negative' ones with n-z."""
    rng = np.random.default_rng(1)
    letters = {"positive": list("abcdefghijklm"), "negative": list("nopqrstuvwxyz")}
    rows = [(" ".join("".join(rng.choice(letters[lab], 5)) for _ in range(4)), lab)
            for lab in ["positive", "negative"] * 40]
    csv = tmp_path / "labeled.csv"
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(csv, index=False)
    sae = topk()
    setup = sentiment_setup(llama, sae, str(csv), n_sentences=80, explain_k=5,
                            sweep_sites=["resid_out_layer0", "resid_out_layer2"], run_dir=tmp_path)
    assert setup.score_site in ("resid_out_layer0", "resid_out_layer2")
    assert setup.sweep["accuracy"].max() > 0.9  # word halves are easy to tell apart
    pos = setup.score([r[0] for r in rows[:10:2]])
    neg = setup.score([r[0] for r in rows[1:10:2]])
    assert pos.mean() > 0.5 > neg.mean()
    methods = sentiment_methods(sae, setup, scale=1.0)
    assert [m.name for m in methods] == [f"latent {setup.latent}", "probe direction",
                                         "difference of means", "random direction"]
    with pytest.raises(InterventionError, match="No class 'happy'"):
        sentiment_setup(llama, sae, str(csv), n_sentences=80, positive="happy")


def test_verdict_names_no_method_whose_shift_is_within_noise():
    # b has the best shift per nat but its shift is within two standard errors of zero
    table = pd.DataFrame({"method": ["a", "a", "b", "random direction"],
                          "coefficient": [0.1, 0.2, 0.1, 0.1], "shift": [0.05, 0.30, 0.20, 0.01],
                          "shift_se": [0.04, 0.05, 0.15, 0.02], "kl": [0.1, 0.5, 0.1, 0.2],
                          "ce_increase": [0.1, 0.4, 0.1, 0.2]})
    table["shift_per_kl"] = table["shift"] / table["kl"]
    text = verdict(table, "sentiment", n_prompts=8)
    assert text.startswith("Per unit of KL on neutral text, a moves sentiment furthest")
    assert "+0.600 per nat" in text  # a at 0.2: 0.30 / 0.5; a at 0.1 is within noise
    assert "b: no coefficient moved sentiment beyond noise" in text
    assert "random direction" in text and "control" in text
    quiet = table.assign(shift=[0.01, 0.02, 0.03, 0.0])
    assert verdict(quiet, "sentiment", n_prompts=8).startswith(
        "No method moved sentiment beyond noise (two standard errors over 8 prompts)")


def test_random_direction_method_is_seeded_with_the_norm_of_the_others():
    a, b, c = (random_direction_method(D_MODEL, scale=2.0, seed=s).edits(0.5)[0]
               for s in (3, 3, 4))
    assert torch.equal(a.direction, b.direction) and not torch.equal(a.direction, c.direction)
    assert float((a.direction * a.value).norm()) == pytest.approx(1.0, rel=1e-5)  # 0.5 x 2.0
    assert a.name == "random direction"


def test_steering_figure_draws_a_curve_per_method():
    from sae_nb.views.plotting import steering_figure
    table = pd.DataFrame({"method": ["a", "a", "b", "b"], "coefficient": [2.0, 1.0, 1.0, 2.0],
                          "shift": [0.4, 0.1, 0.2, 0.3], "kl": [0.5, 0.2, 0.1, 0.3],
                          "ce_increase": [0.6, 0.3, 0.2, 0.4]})
    fig = steering_figure(table)
    assert [t.name for t in fig.data] == ["a", "a", "b", "b"]
    assert list(fig.data[0].x) == [0.2, 0.5] and list(fig.data[0].y) == [0.1, 0.4]  # by coefficient
    assert list(fig.data[1].x) == [0.3, 0.6]  # CE increase on the right
    assert fig.data[0].error_y.array is None
    fig = steering_figure(table.assign(shift_se=[0.05, 0.01, 0.02, 0.03]))
    assert list(fig.data[0].error_y.array) == [0.02, 0.1]  # two standard errors, by coefficient


def test_the_sweep_shows_a_progress_bar_with_an_estimate(llama, capsys):
    sae = topk()
    neutral = prompt_tokens(llama, PROMPT)
    steering_sweep(llama, sae, [latent_method(sae, 7, scale=2.0)], [0.5, 1.0], ["The nation"],
                   neutral, share_of_e, max_new_tokens=2)
    err = capsys.readouterr().err
    # 1 clean generation, then per method 1 steered generation and 2 side-effect passes
    assert "steering sweep: 100%" in err and "4/4" in err and "<00:00" in err
    steering_sweep(llama, sae, [latent_method(sae, 7, scale=2.0)], [0.5], ["The nation"],
                   neutral, share_of_e, max_new_tokens=2, progress=False)
    assert "steering sweep" not in capsys.readouterr().err
