"""Interventions a hostile user can break: non-finite coefficients and temperatures, latent
indices that are not integers, prompts longer than the model's positions, positions and counts
out of range, transcoders given an explicit site, and the norm a steered latent adds for
OpenAI's normalised TopK. Expected values come from hooks written here, closed forms and the
model's config, never from the function under test."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import D_MODEL
from test_intervene import PROMPT, clean_logits, topk, transcoder

from sae_nb.activations.extract import pooled_activations
from sae_nb.activations.models import hf_model
from sae_nb.dictionaries.architectures import NormalizedTopKSAE, TopKSAE
from sae_nb.interventions.attribution import ablation_check, attribute, per_latent_ablations
from sae_nb.interventions.effects import generate, logit_changes, sample_tokens, side_effects
from sae_nb.interventions.splice import (
    InterventionError,
    LatentEdit,
    Splice,
    ablate,
    clamp,
    edited_logits,
    prompt_tokens,
    scale,
    steer_direction,
    steer_latent,
)
from sae_nb.interventions.steering import (
    direction_method,
    latent_method,
    sentiment_methods,
    sentiment_setup,
    site_scale,
    steering_sweep,
)
from sae_nb.texts.probing import load_labeled, split_labeled, subsample

NAN, INF = float("nan"), float("inf")


# -- non-finite coefficients and temperatures ----------------------------------------------


@pytest.mark.parametrize("bad", [NAN, INF, -INF, [0.0, NAN], [1.0, INF, 2.0],
                                 np.array([0.0, np.nan]), torch.tensor([np.inf])],
                         ids=["nan", "inf", "-inf", "row-nan", "row-inf", "numpy", "torch"])
def test_non_finite_coefficients_are_refused_by_value(bad):
    for make in (lambda v: steer_latent(3, v), lambda v: clamp(3, v), lambda v: scale(3, v),
                 lambda v: steer_direction(torch.ones(D_MODEL), v)):
        with pytest.raises(InterventionError, match=r"(nan|inf).*finite"):
            make(bad)
    sae = topk()
    with pytest.raises(InterventionError, match=r"(nan|inf).*finite"):
        values = np.asarray(bad, dtype=float)
        latent_method(sae, 3, 2.0).edits(float(values) if values.ndim == 0
                                          else tuple(values.tolist()))


def test_a_hand_made_non_finite_edit_is_refused_by_the_splice(llama):
    with pytest.raises(InterventionError, match=r"nan.*finite"):
        Splice(llama, topk(), [LatentEdit("add", (3,), NAN)])
    with pytest.raises(InterventionError, match=r"inf.*finite"):
        Splice(llama, topk(), [LatentEdit("clamp", (3,), (1.0, INF))])


def test_non_finite_or_non_positive_scales_are_refused():
    sae = topk()
    for bad in (NAN, INF, 0.0, -1.0):
        with pytest.raises(InterventionError, match=f"scale={bad}"):
            latent_method(sae, 3, bad)
        with pytest.raises(InterventionError, match=f"scale={bad}"):
            direction_method(torch.ones(D_MODEL), "ones", bad)
    (edit,) = latent_method(sae, 3, np.float32(2.0)).edits(0.5)  # numpy numbers are numbers
    assert edit.value == pytest.approx(1.0)


def test_a_sweep_over_a_non_finite_coefficient_is_refused(llama):
    sae = topk()
    with pytest.raises(InterventionError, match=r"nan.*finite"):
        steering_sweep(llama, sae, [latent_method(sae, 1)], [1.0, NAN], ["a"],
                       prompt_tokens(llama, PROMPT), lambda t: np.zeros(len(t)))


@pytest.mark.parametrize("temperature", [NAN, -1.0, INF])
def test_nan_negative_or_infinite_temperature_is_refused(llama, temperature):
    with pytest.raises(InterventionError, match=f"temperature={temperature}"):
        generate(llama, PROMPT, max_new_tokens=2, temperature=temperature)
    with pytest.raises(InterventionError, match=f"temperature={temperature}"):
        sample_tokens(llama, prompt_tokens(llama, PROMPT), 2, temperature=temperature)
    assert len(generate(llama, PROMPT, max_new_tokens=2, temperature=np.float32(0.5))) == 1


# -- latent indices ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["12", [1850.7], 3.0, True, [True, 2], np.float64(2.0),
                                 np.bool_(True), torch.tensor(1.5), torch.tensor(True),
                                 [[1, 2]], [], "a", None],
                         ids=["str", "float-list", "float", "bool", "bool-list", "np-float",
                              "np-bool", "torch-float", "torch-bool", "nested", "empty",
                              "letter", "none"])
def test_latent_indices_must_be_integers(bad):
    for make in (ablate, lambda i: clamp(i, 1.0), lambda i: scale(i, 2.0),
                 lambda i: steer_latent(i, 1.0)):
        with pytest.raises(InterventionError, match="[Ll]atent"):
            make(bad)


def test_integer_latent_indices_of_every_kind_are_taken():
    for given, expected in ((5, (5,)), (np.int64(5), (5,)), (torch.tensor(5), (5,)),
                            ([np.int32(1), 2], (1, 2)), (np.array([3, 4]), (3, 4)),
                            (torch.tensor([6, 7]), (6, 7)), (range(3), (0, 1, 2)),
                            ((8,), (8,))):
        edit = steer_latent(given, 1.0)
        assert edit.latents == expected and all(type(i) is int for i in edit.latents), given


def test_latent_method_takes_integers_only_and_names_a_latent_out_of_range(llama):
    sae = topk()  # 64 latents
    for bad in (1.7, "3", True):
        with pytest.raises(InterventionError, match="[Ll]atent"):
            latent_method(sae, bad)
    assert latent_method(sae, np.int64(3)).name == "latent 3"
    with pytest.raises(InterventionError, match=r"64.*0\.\.63"):
        latent_method(sae, 64)
    with pytest.raises(InterventionError, match=r"\[64, -1\].*0\.\.63"):
        Splice(llama, sae, [steer_latent([1, 64, -1], 1.0)])


# -- prompts longer than the model's positions ------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_prompt_longer_than_the_models_positions_is_refused_everywhere(models, family):
    model = models[family]
    limit = hf_model(model).config.max_position_embeddings  # 256 for every tiny model
    sae = topk()
    long = "a" * limit  # byte tokens: limit + 1 with BOS
    pattern = rf"{limit + 1} tokens.*{limit} positions"
    calls = {
        "prompt_tokens": lambda: prompt_tokens(model, long),
        "logit_changes": lambda: logit_changes(model, sae, long, [steer_latent(1, 1.0)]),
        "attribute": lambda: attribute(model, sae, long, "e"),
        "attribute(ids)": lambda: attribute(model, sae, torch.full((limit + 1,), 97), "e"),
        "generate": lambda: generate(model, long, max_new_tokens=1),
        "edited_logits": lambda: edited_logits(model, torch.full((1, limit + 1), 97)),
        "side_effects": lambda: side_effects(model, sae, [], torch.full((2, limit + 1), 97)),
        "ablation_check": lambda: ablation_check(model, sae, long, "e", n=2),
    }
    wrong = []  # every call is tried, so a failure lists each one that goes wrong
    for name, call in calls.items():
        try:
            call()
        except InterventionError as err:
            if not re.search(pattern, str(err)):
                wrong.append(f"{name}: {err}")
        except Exception as err:  # noqa: BLE001 - the failure names the call and the error
            wrong.append(f"{name}: {type(err).__name__}: {err}")
        else:
            wrong.append(f"{name} ran without a word")
    assert not wrong, wrong
    fits = prompt_tokens(model, "a" * (limit - 1))  # exactly the model's positions
    assert fits.shape == (1, limit)
    assert edited_logits(model, fits).shape[:2] == (1, limit)


def test_generation_past_the_models_positions_is_refused(llama):
    limit = hf_model(llama).config.max_position_embeddings
    prompt = "a" * (limit - 11)  # limit - 10 tokens with BOS
    assert len(generate(llama, prompt, max_new_tokens=11)) == 1  # the 11th is never fed back
    with pytest.raises(InterventionError, match=r"max_new_tokens=12.*max_new_tokens=11"):
        generate(llama, prompt, max_new_tokens=12)


# -- the norm a steered latent adds (OpenAI's normalised TopK divides by sigma) -----------------


def site_output(model, ids, splice=None):
    """``(T, D)`` the output of layer 1 (the dictionaries' site) as the next layer sees it:
    a hook registered after the splice's sees its replacement."""
    seen = {}
    block = hf_model(model).model.layers[1]

    def keep(module, args, output):
        seen["x"] = (output[0] if isinstance(output, tuple) else output).detach()

    with torch.no_grad():
        if splice is None:
            h = block.register_forward_hook(keep)
            try:
                hf_model(model)(input_ids=ids)
            finally:
                h.remove()
        else:
            with splice:
                h = block.register_forward_hook(keep)
                try:
                    hf_model(model)(input_ids=ids)
                finally:
                    h.remove()
    return seen["x"][0].float()


@pytest.mark.parametrize("cls", [TopKSAE, NormalizedTopKSAE])
def test_a_steered_latent_adds_a_vector_of_norm_c_times_scale(llama, cls):
    """latent_method promises a vector of norm ``c * scale`` along the latent's decoder row at
    every position but BOS. For OpenAI's normalised TopK the reconstruction is
    ``(f @ W_dec + b_dec) * sigma(x) + mu(x)``, so a code change ``d`` moves the site by
    ``d * sigma(x) * W_dec[i]``: the code change must be ``c * scale / (|W_dec[i]| sigma(x))``."""
    sae, i, c, s = topk(cls=cls), 5, 1.5, 2.0
    ids = prompt_tokens(llama, PROMPT)
    clean = site_output(llama, ids)
    sigma = clean[1:].std(dim=-1)
    assert (sigma - 1).abs().min() > 0.1  # the toy's sigma is far from 1: a missed sigma shows
    edited = site_output(llama, ids, Splice(llama, sae, latent_method(sae, i, s).edits(c)))
    change = edited - clean  # (T, D)
    assert torch.equal(change[0], torch.zeros(D_MODEL))  # BOS kept clean
    norms = change[1:].norm(dim=-1)
    assert norms.tolist() == pytest.approx([c * s] * len(norms), rel=1e-4)
    row = sae.W_dec[i].detach()
    cosine = change[1:] @ row / (norms * row.norm())
    assert cosine.tolist() == pytest.approx([1.0] * len(norms), abs=1e-5)
    rows = latent_method(sae, i, s).edits((0.0, c))  # per-row coefficients: the same vector
    batch = Splice(llama, sae, rows)
    two = edited_logits(llama, ids.repeat(2, 1), batch)
    one = edited_logits(llama, ids, Splice(llama, sae, latent_method(sae, i, s).edits(c)))
    assert torch.allclose(two[1], one[0], atol=1e-5) and torch.allclose(
        two[0], clean_logits(llama, ids)[0], atol=1e-5)


# -- counts and positions out of range --------------------------------------------------------


def test_ablation_check_needs_a_positive_count(llama):
    sae = topk()
    for bad in (-1, 0, 2.5, True):
        with pytest.raises(InterventionError, match=rf"n={bad}.*n=20"):
            ablation_check(llama, sae, PROMPT, "e", n=bad)


def test_a_target_position_out_of_range_is_named_with_the_range(llama):
    sae = topk()
    T = prompt_tokens(llama, PROMPT).shape[1]
    for bad in (100, T, -T - 1, 1.5):
        pattern = rf"position={bad}.*{T} tokens.*-{T}\.\.{T - 1}"
        with pytest.raises(InterventionError, match=pattern):
            attribute(llama, sae, PROMPT, "e", position=bad)
        with pytest.raises(InterventionError, match=pattern):
            ablation_check(llama, sae, PROMPT, "e", n=2, position=bad)
        with pytest.raises(InterventionError, match=pattern):
            per_latent_ablations(llama, sae, PROMPT, "e", [1], position=bad)
    first = attribute(llama, sae, PROMPT, "e", position=-T)  # the bounds themselves are fine
    last = attribute(llama, sae, PROMPT, "e", position=T - 1)
    logits = clean_logits(llama, prompt_tokens(llama, PROMPT))[0]
    (e,) = llama.tokenizer("e", add_special_tokens=False)["input_ids"]
    assert first.target == pytest.approx(float(logits[0, e]), rel=1e-5)
    assert last.target == pytest.approx(float(logits[-1, e]), rel=1e-5)


# -- transcoders: an explicit site, and the sentiment experiment's sites ---------------------


def test_a_transcoder_with_an_explicit_site_edits_the_site_it_writes(llama):
    """``site=`` names the site a dictionary reads; a transcoder still writes its target."""
    ids = prompt_tokens(llama, PROMPT)
    tc = transcoder()  # reads mlp_in_layer1, writes mlp_out_layer1
    edits = [steer_latent(5, 2.0)]
    expected = edited_logits(llama, ids, Splice(llama, tc, edits))
    for site in ("mlp_in_layer1", "model.layers.1.mlp:input"):
        splice = Splice(llama, tc, edits, site=site)
        assert splice.target is not None and splice.target.name == "mlp_out_layer1"
        assert torch.allclose(edited_logits(llama, ids, splice), expected, atol=1e-6, rtol=0)
    for site in ("mlp_out_layer1", "resid_out_layer1"):
        with pytest.raises(InterventionError,
                           match=rf"reads 'mlp_in_layer1' and writes 'mlp_out_layer1'.*{site}"):
            Splice(llama, tc, edits, site=site)
    fx = side_effects(llama, tc, edits, ids, site="mlp_in_layer1")
    assert fx == side_effects(llama, tc, edits, ids)


def labeled_csv(folder):
    """A tiny labeled CSV: 'positive' texts in the letters a-m, 'negative' ones in n-z."""
    rng = np.random.default_rng(1)
    letters = {"positive": list("abcdefghijklm"), "negative": list("nopqrstuvwxyz")}
    rows = [(" ".join("".join(rng.choice(letters[lab], 5)) for _ in range(4)), lab)
            for lab in ["positive", "negative"] * 40]
    path = folder / "labeled.csv"
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(path, index=False)
    return path


def test_sentiment_setup_with_a_transcoder_steers_in_the_space_it_writes(llama, tmp_path):
    """A transcoder's edits land on the MLP's output: the raw directions, the site scale and
    the random control must be of that site, not of the MLP's input it reads."""
    csv = labeled_csv(tmp_path)
    tc = transcoder()
    setup = sentiment_setup(llama, tc, str(csv), n_sentences=80, explain_k=5,
                            sweep_sites=["resid_out_layer0"], run_dir=tmp_path)
    data = subsample(load_labeled(str(csv)), 80, seed=0)  # the rows sentiment_setup reads
    texts, y = data["text"].tolist(), data["label"].to_numpy().astype(str)
    train, _ = split_labeled(y, seed=0)
    pos = y[train] == "positive"

    def difference_of_means(site):
        acts = pooled_activations(llama, texts, [site])[site].numpy()[train]
        return acts[pos].mean(0) - acts[~pos].mean(0)

    written, read = difference_of_means("mlp_out_layer1"), difference_of_means("mlp_in_layer1")
    assert np.abs(written - read).max() > 1e-2  # the two sites differ
    assert setup.directions["difference of means"] == pytest.approx(written, rel=1e-4, abs=1e-6)
    assert len(setup.directions["probe direction"]) == D_MODEL
    ids = prompt_tokens(llama, PROMPT)
    seen = {}
    mlp = hf_model(llama).model.layers[1].mlp
    h = mlp.register_forward_hook(lambda m, a, o: seen.setdefault("y", o))
    try:
        clean_logits(llama, ids)
    finally:
        h.remove()
    expected = float(seen["y"][0, 1:].float().norm(dim=-1).median())
    assert site_scale(llama, tc, ids) == pytest.approx(expected, rel=1e-5)
    methods = sentiment_methods(tc, setup, 1.0)
    splice = Splice(llama, tc, [e for m in methods for e in m.edits(1.0)])
    assert splice.target is not None and splice.target.name == "mlp_out_layer1"
