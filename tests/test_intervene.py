"""Splicing with the error term and latent edits (sae_nb.interventions.splice), on the tiny models.

Expected values come from elsewhere: the clean model run without any hook, a hand-written hook
that adds ``alpha * W_dec[i]``, the nnsight splice of sae_nb.training.evaluate, causality (an
edit from position p on leaves earlier logits alone)."""

from __future__ import annotations

import pytest
import torch
from conftest import D_MODEL, identity_like

from sae_nb.activations.models import hf_model
from sae_nb.activations.sites import SiteError
from sae_nb.dictionaries.architectures import NormalizedTopKSAE, ReLUSAE, TopKSAE
from sae_nb.interventions.splice import (
    InterventionError,
    Splice,
    ablate,
    clamp,
    edited_logits,
    prompt_tokens,
    scale,
    steer_direction,
    steer_latent,
)
from sae_nb.training.evaluate import splice_loss

SITE = "resid_out_layer1"
PROMPT = "The nation must work for peace and law."


def topk(d: int = D_MODEL, d_sae: int = 64, k: int = 4, cls=TopKSAE):
    torch.manual_seed(3)
    sae = cls(d, d_sae, k=k)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.3)
        sae.b_enc.normal_(0, 0.1)
    sae.metadata = {"site": SITE}
    return sae


def clean_logits(model, ids):
    with torch.no_grad():
        return hf_model(model)(input_ids=ids).logits.float()


def codes_at_site(model, sae, ids):
    acts = {}
    block = hf_model(model).get_submodule(Splice(model, sae).site.module)
    h = block.register_forward_hook(
        lambda m, a, o: acts.setdefault("x", o[0] if isinstance(o, tuple) else o))
    try:
        clean_logits(model, ids)
    finally:
        h.remove()
    return acts["x"], sae.encode(acts["x"][0].float())


def test_no_edit_reproduces_clean_logits(model):
    ids = prompt_tokens(model, PROMPT)
    sae = topk()
    clean = clean_logits(model, ids)
    for edits in ([], [scale([0, 5, 9], 1.0)], [steer_latent(7, 0.0)]):
        spliced = edited_logits(model, ids, Splice(model, sae, edits))
        assert torch.allclose(spliced, clean, atol=1e-5, rtol=0), edits


def test_steering_coefficient_zero_is_the_clean_run(llama):
    ids = prompt_tokens(llama, PROMPT)
    sae = topk()
    clean = clean_logits(llama, ids)
    v = torch.randn(D_MODEL)
    for edit in (steer_latent(3, 0.0), steer_direction(v, 0.0), steer_direction(v, [0.0, 0.0])):
        rows = ids.repeat(2, 1)
        out = edited_logits(llama, rows, Splice(llama, sae, [edit]))
        assert torch.allclose(out, clean.expand_as(out), atol=1e-5, rtol=0)
    moved = edited_logits(llama, ids, Splice(llama, sae, [steer_direction(v, 3.0)]))
    assert (moved - clean).abs().max() > 1e-2  # and a nonzero coefficient does move it


def test_ablating_a_silent_latent_changes_nothing(llama):
    ids = prompt_tokens(llama, PROMPT)
    sae = topk()
    _, f = codes_at_site(llama, sae, ids)
    fired = (f[1:] != 0).any(0)  # BOS stays clean, so its codes do not count
    silent, active = int((~fired).nonzero()[0]), int(fired.nonzero()[0])
    clean = clean_logits(llama, ids)
    out = edited_logits(llama, ids, Splice(llama, sae, [ablate(silent)]))
    assert torch.equal(out, clean)
    out = edited_logits(llama, ids, Splice(llama, sae, [ablate(active)]))
    assert (out - clean).abs().max() > 1e-3


def test_steer_latent_adds_alpha_times_its_decoder_row(llama):
    """Against a hand-written hook adding alpha * W_dec[i] at every position but BOS."""
    ids = prompt_tokens(llama, PROMPT)
    sae, i, alpha = topk(), 11, 2.5
    block = hf_model(llama).model.layers[1]

    def add(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        bump = alpha * sae.W_dec[i].detach()
        out = out + torch.cat([torch.zeros_like(bump)[None], bump.expand(out.shape[1] - 1, -1)])
        return (out,) + tuple(output[1:]) if isinstance(output, tuple) else out

    h = block.register_forward_hook(add)
    try:
        expected = clean_logits(llama, ids)
    finally:
        h.remove()
    got = edited_logits(llama, ids, Splice(llama, sae, [steer_latent(i, alpha)]))
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    # the same as steering along the raw direction W_dec[i] by alpha * |W_dec[i]|
    norm = float(sae.W_dec[i].detach().norm())
    raw = edited_logits(llama, ids,
                        Splice(llama, sae, [steer_direction(sae.W_dec[i], alpha * norm)]))
    assert torch.allclose(raw, expected, atol=1e-5, rtol=0)


def test_clamp_from_a_position_on_leaves_earlier_positions_alone(llama):
    ids = prompt_tokens(llama, PROMPT)
    sae, start = topk(), 12
    _, f = codes_at_site(llama, sae, ids)
    latent = int(f[start:].abs().sum(0).argmax())
    clean = clean_logits(llama, ids)
    out = edited_logits(llama, ids, Splice(llama, sae, [clamp(latent, 0.0, start=start)]))
    assert torch.equal(out[:, :start], clean[:, :start])
    assert (out[:, start:] - clean[:, start:]).abs().max() > 1e-3


def test_per_row_coefficients_equal_separate_runs(llama):
    ids = prompt_tokens(llama, PROMPT)
    sae = topk()
    batch = edited_logits(llama, ids.repeat(3, 1), Splice(llama, sae, [scale(4, [0.0, 2.0, -1.0])]))
    for row, factor in enumerate((0.0, 2.0, -1.0)):
        one = edited_logits(llama, ids, Splice(llama, sae, [scale(4, factor)]))
        assert torch.allclose(batch[row], one[0], atol=1e-5, rtol=0)


def test_without_error_term_matches_the_evaluation_splice(llama):
    """error_term=False splices x_hat(f) as sae_nb.training.evaluate's nnsight splice does."""
    ids = prompt_tokens(llama, PROMPT)
    sae = topk()
    bos = int(ids[0, 0])
    _, logp = splice_loss(llama, SITE, ids, lambda a: sae.reconstruct(a.float()), bos_token_id=bos)
    out = edited_logits(llama, ids, Splice(llama, sae, [], error_term=False))
    assert torch.allclose(torch.log_softmax(out[:, :-1], -1), logp, atol=1e-4)
    assert not torch.allclose(out, clean_logits(llama, ids), atol=1e-3)


def test_perfect_dictionary_with_all_latents_ablated_zeroes_the_site(llama):
    """identity_like reconstructs exactly; ablating every latent without the error term leaves
    zero at the site, which a hook writing zeros reproduces."""
    ids = prompt_tokens(llama, PROMPT)
    sae = identity_like(D_MODEL, SITE)
    block = hf_model(llama).model.layers[1]

    def zero(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        keep = torch.zeros_like(out)
        keep[:, 0] = out[:, 0]  # BOS stays clean
        return keep

    h = block.register_forward_hook(zero)
    try:
        expected = clean_logits(llama, ids)
    finally:
        h.remove()
    got = edited_logits(llama, ids, Splice(llama, sae, [ablate(range(2 * D_MODEL))],
                                           error_term=False))
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)


def test_normalized_topk_steering_follows_its_reconstruction(llama):
    """For OpenAI's normalised TopK, x_hat(f') - x_hat(f) carries the input's sigma."""
    sae = topk(cls=NormalizedTopKSAE)
    x = torch.randn(1, 5, D_MODEL) * 3
    splice = Splice(llama, sae, [steer_latent(2, 1.5)])
    splice.tokens, splice.bos = None, None
    f, x_hat = sae.encode_and_reconstruct(x[0])
    f2 = f.clone()
    f2[:, 2] += 1.5
    expected = x[0] + (sae.decode(f2, *sae.input_stats(x[0])) - x_hat)
    assert torch.allclose(splice.edit(x)[0], expected, atol=1e-5)


def test_bad_inputs_get_clear_errors(llama):
    sae = topk()
    with pytest.raises(InterventionError, match=r"out of range.*0\.\.63"):
        Splice(llama, sae, [ablate(64)])
    with pytest.raises(InterventionError, match="empty"):
        prompt_tokens(llama, "  ")
    with pytest.raises(InterventionError, match="coefficients are empty"):
        steer_latent(3, [])
    with pytest.raises(InterventionError, match="norm"):
        steer_direction(torch.zeros(D_MODEL), 1.0)
    far = topk()
    far.metadata = {"site": "resid_out_layer9"}
    with pytest.raises(SiteError, match="out of range"):
        Splice(llama, far, [])
    wide = ReLUSAE(D_MODEL + 1, 8)
    wide.metadata = {"site": SITE}
    with pytest.raises(InterventionError, match="33"):
        Splice(llama, wide, [])
    with pytest.raises(InterventionError, match="direction.*entries"):
        Splice(llama, sae, [steer_direction(torch.ones(5), 1.0)])
    ids = prompt_tokens(llama, PROMPT).repeat(2, 1)
    with pytest.raises(InterventionError, match="3 coefficients for a batch of 2"):
        edited_logits(llama, ids, Splice(llama, sae, [steer_latent(1, [1.0, 2.0, 3.0])]))


def test_a_width_mismatch_at_an_input_site_is_named_on_the_first_pass(llama):
    """mlp_in's width is not read off the module; the splice checks it on the forward pass."""
    sae = ReLUSAE(D_MODEL, 8)  # the MLP's input is d_model wide: fits
    sae.metadata = {"site": "mlp_in_layer1"}
    ids = prompt_tokens(llama, PROMPT)
    assert edited_logits(llama, ids, Splice(llama, sae, [ablate(0)])).shape == \
        clean_logits(llama, ids).shape
    wide = ReLUSAE(D_MODEL * 2, 8)
    wide.metadata = {"site": "mlp_in_layer1"}
    with pytest.raises(InterventionError, match="is 32 wide here but the dictionary reads 64"):
        edited_logits(llama, ids, Splice(llama, wide, [ablate(0)]))


def transcoder():
    """A TopK transcoder: reads the MLP's input of layer 1, predicts its output."""
    sae = topk()
    sae.metadata = {"site": "mlp_in_layer1", "target_site": "mlp_out_layer1"}
    return sae


def test_a_transcoder_edits_the_mlp_output_from_codes_of_its_input(llama):
    """Against hand-written hooks: codes from the MLP's input, their change decoded into the
    MLP's output (BOS kept clean); with no edit the model is unchanged."""
    ids = prompt_tokens(llama, PROMPT)
    sae, mlp = transcoder(), hf_model(llama).model.layers[1].mlp
    clean = clean_logits(llama, ids)
    seen = {}
    h = mlp.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    try:
        clean_logits(llama, ids)
    finally:
        h.remove()
    f = sae.encode(seen["x"][0].float()).detach()  # (T, F)
    active = int((f[1:] != 0).any(0).nonzero()[0])

    def expected(change):  # change: (T, F) code change -> logits with it decoded into the output
        def add(module, args, output):
            return output + (change @ sae.W_dec.detach())[None]
        h = mlp.register_forward_hook(add)
        try:
            return clean_logits(llama, ids)
        finally:
            h.remove()

    assert torch.allclose(edited_logits(llama, ids, Splice(llama, sae, [])), clean,
                          atol=1e-5, rtol=0)
    change = torch.zeros_like(f)
    change[1:, active] = -f[1:, active]
    got = edited_logits(llama, ids, Splice(llama, sae, [ablate(active)]))
    assert torch.allclose(got, expected(change), atol=1e-5, rtol=0)
    assert (got - clean).abs().max() > 1e-3
    change = torch.zeros_like(f)
    change[1:, 5] = 2.0
    got = edited_logits(llama, ids, Splice(llama, sae, [steer_latent(5, 2.0)]))
    assert torch.allclose(got, expected(change), atol=1e-5, rtol=0)
    recon = sae.reconstruct(seen["x"][0].float()).detach()  # without the error term:
    replaced = edited_logits(llama, ids, Splice(llama, sae, [], error_term=False))
    h = mlp.register_forward_hook(  # the MLP's output is the transcoder's, BOS kept clean
        lambda m, a, out: torch.cat([out[:, :1], recon[None, 1:]], dim=1))
    try:
        assert torch.allclose(replaced, clean_logits(llama, ids), atol=1e-5, rtol=0)
    finally:
        h.remove()
    wide = TopKSAE(D_MODEL, 64, k=4)
    wide.metadata = {"site": "mlp_in_layer1", "target_site": "resid_out_layer1"}
    with torch.no_grad():
        wide.W_dec.data = torch.randn(64, D_MODEL)
    assert Splice(llama, wide, []).target.name == "resid_out_layer1"
    with pytest.raises(InterventionError, match="direction.*entries"):
        Splice(llama, sae, [steer_direction(torch.ones(D_MODEL + 3), 1.0)])
