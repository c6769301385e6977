"""The steering session (sae_nb.interventions.session) on the tiny llama: its texts against
independent generations made with hand-written edits, its cache, its divergence points, and an
ablation's measured effect against a separate forward pass; in bfloat16, against hand-written
bfloat16 decodes of a model built independently of the session's copy."""

from __future__ import annotations

import pytest
import torch
from test_intervene import PROMPT, topk

from sae_nb.activations.models import hf_model
from sae_nb.interventions.attribution import ablation_effect, attribute, target_function
from sae_nb.interventions.effects import generate, logit_changes
from sae_nb.interventions.session import Sampling, SteeringSession, divergence
from sae_nb.interventions.splice import (
    InterventionError,
    ablate,
    edited_logits,
    prompt_tokens,
    steer_direction,
)

SCALE = 5.0


def by_hand(sae, strengths) -> list:
    """Each latent steered by ``strength * SCALE`` along its decoder row, written out."""
    return [steer_direction(sae.W_dec[i].detach(), c * SCALE) for i, c in strengths]


def bf16_model(model) -> torch.nn.Module:
    """A fresh model of ``model``'s class and config with its parameters rounded to bfloat16
    (buffers such as the rotary frequencies kept float32), not a copy of the session's."""
    hf = hf_model(model)
    ref = type(hf)(hf.config).eval()
    for p in ref.parameters():
        p.data = p.data.to(torch.bfloat16)
    ref.load_state_dict(hf.state_dict())  # rounds each float32 weight into its bf16 parameter
    return ref


@torch.no_grad()
def bf16_greedy(ref, ids: torch.Tensor, n: int, bump: torch.Tensor | None = None) -> list[int]:
    """``n`` greedy tokens after ``ids`` ``(1, T)`` with a KV cache; ``bump`` ``(D,)``, when
    given, added in float32 to layer 1's output at every position but the prompt's first (BOS)
    by a plain forward hook, and the sum cast back to bfloat16."""
    def add(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        extra = bump.expand(out.shape[1], -1).clone()
        if out.shape[1] > 1:  # the prompt: BOS stays clean
            extra[0] = 0
        new = (out.float() + extra).to(out.dtype)
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

    h = ref.model.layers[1].register_forward_hook(add) if bump is not None else None
    try:
        out, tokens = ref(input_ids=ids, use_cache=True), []
        for _ in range(n):
            token = out.logits[:, -1].float().argmax(-1, keepdim=True)
            tokens.append(int(token))
            out = ref(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
    finally:
        if h is not None:
            h.remove()
    return tokens


def test_bfloat16_runs_equal_hand_written_bf16_decodes(llama):
    sae = topk()
    session = SteeringSession(llama, sae, SCALE, precision="bfloat16")
    sampling, strengths = Sampling(max_new_tokens=8), [(3, 0.8), (11, -0.6)]
    clean, steered = session.clean(PROMPT, sampling), session.steered(PROMPT, strengths, sampling)
    ref, ids = bf16_model(llama), prompt_tokens(llama, PROMPT)
    assert clean.tokens == [bf16_greedy(ref, ids, 8)]
    bump = sum(c * SCALE * sae.W_dec[i].detach() / sae.W_dec[i].detach().norm()
               for i, c in strengths)
    assert steered.tokens == [bf16_greedy(ref, ids, 8, bump)]
    assert steered.tokens != clean.tokens
    # the copy is bfloat16, the model itself untouched and float32
    assert {p.dtype for p in session.decoder().parameters()} == {torch.bfloat16}
    assert {p.dtype for p in hf_model(llama).parameters()} == {torch.float32}
    with torch.no_grad():  # bf16 decoding really differs from float32 here
        first32 = hf_model(llama)(input_ids=ids).logits[0, -1]
        first16 = ref(input_ids=ids).logits[0, -1].float()
    assert (first32 - first16).abs().max() > 1e-3
    # the next-token logits stay float32: the model's own forward pass
    assert torch.allclose(clean.first_logits, first32, atol=1e-5, rtol=0)


def test_float32_is_the_default_and_a_bad_precision_is_refused_by_name(llama):
    session = SteeringSession(llama, topk(), SCALE)
    assert session.precision == "float32" and session.decoder() is hf_model(llama)
    for bad in ("float16", ["bfloat16"]):
        with pytest.raises(InterventionError, match=r"precision=.*16.*give precision="):
            SteeringSession(llama, topk(), SCALE, precision=bad)


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


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_logit_changes_from_the_first_step_equal_the_forward_pass(llama, precision):
    sae = topk()
    session = SteeringSession(llama, sae, SCALE, precision=precision)
    sampling = Sampling(max_new_tokens=3)
    steered = session.steered(PROMPT, [(3, 1.0), (5, 0.5)], sampling)
    table = session.logit_changes(PROMPT, steered, sampling, k=5)
    ref = logit_changes(llama, sae, PROMPT, by_hand(sae, [(3, 1.0), (5, 0.5)]), k=5)
    assert table["token_id"].tolist() == ref["token_id"].tolist()
    assert table["p_change"].to_numpy() == pytest.approx(ref["p_change"].to_numpy(), abs=1e-5)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_ablation_measures_against_a_separate_forward_pass_without_steering(llama, precision):
    sae = topk()
    session = SteeringSession(llama, sae, SCALE, precision=precision)
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
    if precision == "float32":  # bfloat16 texts: test_bfloat16_runs_equal_hand_written_...
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
