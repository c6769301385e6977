"""The steering session (sae_nb.interventions.session) on the tiny llama: its texts against
independent generations made with hand-written edits, its cache, its divergence points, and an
ablation's measured effect against a separate forward pass."""

from __future__ import annotations

import pytest
import torch
from test_intervene import PROMPT, topk

from sae_nb.interventions.attribution import ablation_effect, attribute, target_function
from sae_nb.interventions.effects import generate, logit_changes
from sae_nb.interventions.session import Sampling, SteeringSession, divergence
from sae_nb.interventions.splice import InterventionError, ablate, edited_logits, steer_direction

SCALE = 5.0


def by_hand(sae, strengths) -> list:
    """Each latent steered by ``strength * SCALE`` along its decoder row, written out."""
    return [steer_direction(sae.W_dec[i].detach(), c * SCALE) for i, c in strengths]


def test_several_latents_and_samples_equal_separate_generations(llama):
    sae = topk()
    session = SteeringSession(llama, sae, SCALE)
    sampling = Sampling(temperature=0.9, seed=7, samples=3, max_new_tokens=6)
    strengths = [(3, 0.8), (11, -0.6)]
    steered = session.steered(PROMPT, strengths, sampling)
    clean = session.clean(PROMPT, sampling)
    assert len(steered.texts) == len(clean.texts) == 3
    for j, seed in enumerate((7, 8, 9)):  # sample j is seed 7 + j, one row alone
        assert clean.texts[j] == generate(llama, PROMPT, max_new_tokens=6, temperature=0.9,
                                          seed=seed)[0]
        assert steered.texts[j] == generate(llama, PROMPT, sae, by_hand(sae, strengths),
                                            max_new_tokens=6, temperature=0.9, seed=seed)[0]
    assert len(set(clean.texts)) > 1  # the samples differ
    one = generate(llama, PROMPT, sae, by_hand(sae, strengths[:1]), max_new_tokens=6,
                   temperature=0.9, seed=7)[0]
    assert steered.texts[0] != one  # the second latent is steered too


def test_the_clean_run_is_cached_per_prompt_and_sampling(llama):
    session = SteeringSession(llama, topk(), SCALE)
    sampling = Sampling(temperature=0.5, seed=1, samples=2, max_new_tokens=4)
    session.steered(PROMPT, [(3, 0.5)], sampling)
    session.clean(PROMPT, sampling)
    assert session.computed == ["steered", "clean"]
    session.computed.clear()
    session.steered(PROMPT, [(3, 0.7)], sampling)  # a new strength: only the steered run
    session.clean(PROMPT, sampling)
    assert session.computed == ["steered"]
    session.clean(PROMPT, Sampling(temperature=0.5, seed=2, samples=2, max_new_tokens=4))
    assert session.computed == ["steered", "clean"]  # another seed is another clean run
    assert session.steered(PROMPT, [(3, 0.0)], sampling) is session.clean(PROMPT, sampling)


def test_greedy_sampling_gives_one_text():
    assert Sampling(temperature=0.0, samples=3).seeds == [0]
    assert Sampling(temperature=0.5, seed=4, samples=3).seeds == [4, 5, 6]


def test_divergence_is_the_first_differing_token():
    assert divergence([1, 2, 3], [1, 2, 3]) is None
    assert divergence([1, 2, 3], [1, 5, 3]) == 1
    assert divergence([1, 2, 3], [9, 2, 3]) == 0
    assert divergence([1, 2], [1, 2, 3]) == 2


def test_logit_changes_from_the_first_step_equal_the_forward_pass(llama):
    sae = topk()
    session = SteeringSession(llama, sae, SCALE)
    sampling = Sampling(max_new_tokens=3)
    steered = session.steered(PROMPT, [(3, 1.0), (5, 0.5)], sampling)
    table = session.logit_changes(PROMPT, steered, sampling, k=5)
    ref = logit_changes(llama, sae, PROMPT, by_hand(sae, [(3, 1.0), (5, 0.5)]), k=5)
    assert table["token_id"].tolist() == ref["token_id"].tolist()
    assert table["p_change"].to_numpy() == pytest.approx(ref["p_change"].to_numpy(), abs=1e-5)


def test_ablation_measures_against_a_separate_forward_pass_without_steering(llama):
    sae = topk()
    session = SteeringSession(llama, sae, SCALE)
    sampling = Sampling(max_new_tokens=5)
    att, target = session.attribution(PROMPT)
    ids = att.tokens[None]
    clean_logits = edited_logits(llama, ids)[0, -1]
    assert list(target) == clean_logits.topk(2).indices.tolist()
    top = att.top(llama.tokenizer, 1).iloc[0]
    latent, position = int(top.latent), int(top.position)
    result = session.ablation(PROMPT, latent, position, sampling)
    fn, _ = target_function(llama, target)
    measured = ablation_effect(llama, sae, ids, fn, latent, position, float(fn(clean_logits)))
    assert result["measured"] == pytest.approx(measured, abs=1e-4)
    ref = attribute(llama, sae, PROMPT, target)
    assert result["predicted"] == pytest.approx(float(ref.scores[position, latent]), rel=1e-5)
    text = generate(llama, PROMPT, sae, [ablate(latent, position, position + 1)],
                    max_new_tokens=5)[0]
    assert result["continuations"].texts == [text]
    with pytest.raises(InterventionError, match="position=99"):
        session.ablation(PROMPT, latent, 99, sampling)


def test_a_latent_listed_twice_is_refused_by_name(llama):
    session = SteeringSession(llama, topk(), SCALE)
    with pytest.raises(InterventionError, match="Latent 3 is listed twice"):
        session.steered(PROMPT, [(3, 0.5), (3, 0.2)], Sampling(max_new_tokens=2))
    with pytest.raises(InterventionError, match="samples"):
        Sampling(samples=0)


def test_sampling_with_seeds_per_row_is_each_rows_own_seed(llama):
    rows = generate(llama, PROMPT, max_new_tokens=5, temperature=1.0, seeds=[3, 4])
    assert rows == [generate(llama, PROMPT, max_new_tokens=5, temperature=1.0, seed=s)[0]
                    for s in (3, 4)]
    assert torch.is_tensor(SteeringSession(llama, topk(), SCALE).clean(
        PROMPT, Sampling(max_new_tokens=2)).first_logits)
