"""Effects of an edit (sae_nb.interventions.effects) on the tiny models: checked against
transformers' own generate, generation without a KV cache, the nnsight splice of
sae_nb.training.evaluate and the KL formula written out."""

from __future__ import annotations

import pytest
import torch
from conftest import D_MODEL
from test_intervene import PROMPT, SITE, topk

from sae_nb.activations.models import hf_model
from sae_nb.interventions.effects import (
    change_table,
    compare_generations,
    generate,
    logit_changes,
    sample_tokens,
    side_effects,
)
from sae_nb.interventions.splice import (
    InterventionError,
    Splice,
    edited_logits,
    prompt_tokens,
    steer_direction,
    steer_latent,
)
from sae_nb.training.evaluate import splice_loss


def test_greedy_generation_equals_transformers_generate(model):
    ids = prompt_tokens(model, PROMPT)
    hf = hf_model(model)
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                          do_sample=False, pad_token_id=int(ids[0, 0]))[:, ids.shape[1]:]
    assert torch.equal(sample_tokens(model, ids, 8), ref)


def test_edited_generation_equals_recomputing_without_a_cache(llama):
    """The edit from absolute position start on, applied step by step over the KV cache, gives
    the tokens a full forward pass per step (no cache) gives."""
    ids = prompt_tokens(llama, PROMPT)
    sae = topk()
    start = ids.shape[1] + 2  # edits only the third generated position on
    edits = [steer_direction(torch.randn(D_MODEL), 6.0, start=start)]
    splice = Splice(llama, sae, edits)
    with splice:
        cached = sample_tokens(llama, ids, 6)
    seq = ids
    for _ in range(6):
        logits = edited_logits(llama, seq, Splice(llama, sae, edits))
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(cached, seq[:, ids.shape[1]:])
    clean = sample_tokens(llama, ids, 6)
    assert torch.equal(cached[:, :3], clean[:, :3])  # tokens before start are untouched


def test_sampled_generation_is_reproducible_with_a_seed(llama):
    sae = topk()
    edits = [steer_latent(5, [0.0, 4.0])]
    a = generate(llama, PROMPT, sae, edits, max_new_tokens=12, temperature=1.0, seed=7)
    b = generate(llama, PROMPT, sae, edits, max_new_tokens=12, temperature=1.0, seed=7)
    c = generate(llama, PROMPT, sae, edits, max_new_tokens=12, temperature=1.0, seed=8)
    assert a == b and len(a) == 2
    assert a != c
    clean = generate(llama, PROMPT, max_new_tokens=12, temperature=1.0, seed=7)
    assert a[0] == clean[0]  # coefficient 0 in row 0: the clean continuation


def test_side_effects_against_the_evaluation_splice_and_the_kl_formula(llama):
    tokens = torch.stack([prompt_tokens(llama, PROMPT)[0],
                          prompt_tokens(llama, PROMPT[::-1])[0]])
    sae = topk()
    none = side_effects(llama, sae, [], tokens)
    ce, _ = splice_loss(llama, SITE, tokens, None)  # the clean CE through nnsight
    assert none["ce_clean"] == pytest.approx(float(ce.mean()), rel=1e-5)
    assert none["kl"] == pytest.approx(0.0, abs=1e-7)
    assert none["ce_increase"] == pytest.approx(0, abs=1e-6)
    edits = [steer_latent(9, 3.0)]
    got = side_effects(llama, sae, edits, tokens)
    p = torch.softmax(edited_logits(llama, tokens), -1).double()
    q = torch.softmax(edited_logits(llama, tokens, Splice(llama, sae, edits)), -1).double()
    # KL(clean || edited) over the predictions CE scores: positions 0..T-2
    kl = float((p * (p.log() - q.log())).sum(-1)[:, :-1].mean())
    assert got["kl"] == pytest.approx(kl, rel=1e-4)
    reverse = float((q * (q.log() - p.log())).sum(-1)[:, :-1].mean())
    assert abs(kl - reverse) > 1e-4 * kl  # the two orders differ here, so the order is tested
    ce_edit = -q[:, :-1].log().gather(-1, tokens[:, 1:, None]).mean()
    assert got["ce_edited"] == pytest.approx(float(ce_edit), rel=1e-5)


def test_kl_and_ce_average_over_the_same_predictions(llama):
    """CE scores the next-token predictions made at positions 0..T-2; KL must average over the
    same ones. An edit at the last position only changes a prediction CE never scores, so both
    are zero; an edit from position 5 on gives the per-position KL summed over 0..T-2 divided
    by their count (positions before 5, BOS among them, count as 0 in both)."""
    tokens = torch.stack([prompt_tokens(llama, PROMPT)[0],
                          prompt_tokens(llama, PROMPT[::-1])[0]])
    sae, T = topk(), tokens.shape[1]
    last = side_effects(llama, sae, [steer_direction(torch.randn(D_MODEL), 8.0, start=T - 1)],
                        tokens)
    assert last["ce_increase"] == pytest.approx(0, abs=1e-6)
    assert last["kl"] == pytest.approx(0, abs=1e-7)
    edits = [steer_direction(torch.randn(D_MODEL), 8.0, start=5)]
    got = side_effects(llama, sae, edits, tokens)
    p = torch.log_softmax(edited_logits(llama, tokens), -1).double()
    q = torch.log_softmax(edited_logits(llama, tokens, Splice(llama, sae, edits)), -1).double()
    per_position = (p.exp() * (p - q)).sum(-1)  # (N, T)
    assert per_position[:, :5].abs().max() < 1e-6 and per_position[:, -1].min() > 1e-4
    assert got["kl"] == pytest.approx(float(per_position[:, :-1].sum()) / (2 * (T - 1)),
                                      rel=1e-4)
    ce = -(q - p)[:, :-1].gather(-1, tokens[:, 1:, None]).sum() / (2 * (T - 1))
    assert got["ce_increase"] == pytest.approx(float(ce), rel=1e-4)


def test_logit_changes_rank_the_change_in_probability(llama):
    sae = topk()
    edits = [steer_latent(9, 4.0)]
    table = logit_changes(llama, sae, PROMPT, edits, k=5)
    ids = prompt_tokens(llama, PROMPT)
    lp_edit = torch.log_softmax(edited_logits(llama, ids, Splice(llama, sae, edits))[0, -1], -1)
    lp_clean = torch.log_softmax(edited_logits(llama, ids)[0, -1], -1)
    gain = lp_edit.exp() - lp_clean.exp()
    promoted = table[table.effect == "promoted"]
    assert promoted.token_id.tolist() == gain.topk(5).indices.tolist()
    top = gain.topk(5).indices
    assert promoted.logprob_change.tolist() == pytest.approx((lp_edit - lp_clean)[top].tolist(),
                                                             abs=1e-5)
    assert (promoted.p_edited - promoted.p_clean).tolist() == pytest.approx(gain[top].tolist(),
                                                                            abs=1e-6)
    suppressed = table[table.effect == "suppressed"]
    assert suppressed.token_id.tolist() == (-gain).topk(5).indices.tolist()
    assert suppressed.logprob_change.max() < 0 < promoted.logprob_change.min()
    # the ranking criterion is a column of the table: the change in probability
    assert promoted.p_change.tolist() == pytest.approx(gain[top].tolist(), abs=1e-6)
    assert suppressed.p_change.tolist() == pytest.approx(
        gain[(-gain).topk(5).indices].tolist(), abs=1e-6)


def test_compare_generations_shows_a_progress_bar(llama, capsys):
    sae = topk()
    compare_generations(llama, sae, [PROMPT, "Peace"], [steer_latent(9, 4.0)], max_new_tokens=2)
    err = capsys.readouterr().err
    assert "generations: 100%" in err and "2/2" in err


def test_bad_generation_inputs(llama):
    sae = topk()
    with pytest.raises(InterventionError, match="No prompts"):
        compare_generations(llama, sae, [], [])
    with pytest.raises(InterventionError, match="max_new_tokens=0"):
        generate(llama, PROMPT, max_new_tokens=0)
    with pytest.raises(InterventionError, match=r"\[2, 3\] coefficients"):
        generate(llama, PROMPT, sae, [steer_latent(1, [1, 2]), steer_latent(2, [1, 2, 3])])
    with pytest.raises(InterventionError, match="empty"):
        generate(llama, "", sae, [])


def test_sampling_draws_from_the_softmax(llama):
    """Over 250 seeds the first sampled token's frequencies match softmax(logits / T)."""
    ids = prompt_tokens(llama, PROMPT)
    p = torch.softmax(edited_logits(llama, ids)[0, -1] / 0.7, -1)
    draws = torch.cat([sample_tokens(llama, ids, 1, temperature=0.7, seed=s)[0]
                       for s in range(250)])
    freq = torch.bincount(draws, minlength=len(p)).float() / 250
    top = p.topk(3).indices
    sigma = (p[top] * (1 - p[top]) / 250).sqrt()
    assert ((freq[top] - p[top]).abs() < 4 * sigma + 1e-3).all(), (freq[top], p[top])


def test_a_shift_of_every_logit_changes_nothing_in_the_table(llama):
    """Softmax ignores a common shift: a table column that moved with it would call a token
    promoted (or suppressed) that no edit touched."""
    clean = torch.randn(len(llama.tokenizer), generator=torch.Generator().manual_seed(0))
    table = change_table(llama.tokenizer, clean, clean + 5.0, k=3)
    changes = [c for c in table.columns if c.endswith("_change")]
    assert changes == ["p_change", "logprob_change"]
    assert table[changes].abs().max().max() < 1e-5
