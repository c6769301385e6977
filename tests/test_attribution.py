"""Attribution (sae_nb.interventions.attribution) against finite edits: activation x gradient is the
first-order change of the target, so a small scaling of one latent at one position, measured
with two forward passes, must agree with it."""

from __future__ import annotations

import pytest
import torch
from conftest import D_MODEL
from test_intervene import PROMPT, SITE, codes_at_site, topk

from sae_nb.dictionaries.architectures import NormalizedTopKSAE, ReLUSAE
from sae_nb.interventions.attribution import (
    ablation_check,
    agreement,
    attribute,
    per_latent_ablations,
    target_function,
)
from sae_nb.interventions.splice import (
    InterventionError,
    Splice,
    edited_logits,
    prompt_tokens,
    scale,
)


def relu_sae():
    """A dense ReLU dictionary: many latents active at each position."""
    torch.manual_seed(4)
    sae = ReLUSAE(D_MODEL, 48)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2)
    sae.metadata = {"site": SITE}
    return sae


def relu_transcoder():
    """A ReLU transcoder: reads the MLP's input of layer 1, writes its output."""
    sae = relu_sae()
    sae.metadata = {"site": "mlp_in_layer1", "target_site": "mlp_out_layer1"}
    return sae


@pytest.mark.parametrize("make", [relu_sae, lambda: topk(cls=NormalizedTopKSAE),
                                  relu_transcoder],
                         ids=["relu", "normalized_topk", "transcoder"])
def test_attribution_is_the_first_order_change_of_a_finite_edit(llama, make):
    sae = make()
    ids = prompt_tokens(llama, PROMPT)
    target = (ord("e") - 0, ord("a"))  # byte tokens: the logit difference 'e' - 'a'
    fn, _ = target_function(llama, target)
    att = attribute(llama, sae, PROMPT, target)
    assert att.target == pytest.approx(float(fn(edited_logits(llama, ids)[0, -1])), rel=1e-5)
    scores = att.scores
    checked = 0  # pairs where a latent fired and its finite edit moved the target
    for flat in scores.abs().flatten().topk(6).indices.tolist():
        p, i = divmod(flat, scores.shape[1])
        eps = 1e-2

        def measure(factor, i=i, p=p):
            out = edited_logits(llama, ids, Splice(llama, sae, [scale(i, factor, p, p + 1)]))
            return float(fn(out[0, -1].double()))

        # scaling f by (1 +- eps) moves the target by +- eps * f * dm/df to first order
        slope = (measure(1 + eps) - measure(1 - eps)) / (2 * eps)
        assert float(scores[p, i]) == pytest.approx(slope, rel=0.05), (p, i)
        checked += int(float(att.codes[p, i]) != 0 and abs(slope) > 1e-4)
    assert checked == 6  # six real attributions checked, none a zero padding the top 6


def test_bos_and_silent_latents_get_no_attribution(llama):
    """Against the codes read by a hook of our own: BOS, which has codes the splice keeps
    out, and the latents the dictionary leaves silent get no attribution, though the gradient
    there is not zero; every latent that fires gets one."""
    sae = topk()
    ids = prompt_tokens(llama, PROMPT)
    att = attribute(llama, sae, PROMPT, "e")
    _, f = codes_at_site(llama, sae, ids)
    f = f.detach()
    assert att.codes.shape == f.shape == (ids.shape[1], sae.d_sae)
    assert (f[0] != 0).any() and (att.scores[0] == 0).all()  # BOS kept clean
    assert torch.allclose(att.codes[1:], f[1:], atol=1e-5)
    silent = f[1:] == 0
    assert (att.grads[1:][silent] != 0).all()  # a gradient there, yet...
    assert (att.scores[1:][silent] == 0).all()  # ...no attribution to a silent latent
    assert (att.scores[1:][~silent] != 0).all()


def test_ablation_check_and_per_latent_ablations(llama):
    sae = relu_sae()
    table = ablation_check(llama, sae, PROMPT, ("e", "a"), n=8)
    assert len(table) == 8
    stats = agreement(table)
    assert stats["pearson_r"] > 0.9 and stats["same_sign"] >= 0.75, stats
    att = attribute(llama, sae, PROMPT, ("e", "a"))
    latents = att.per_latent().abs().topk(3).indices.tolist()
    naive = per_latent_ablations(llama, sae, PROMPT, ("e", "a"), latents)
    assert naive == pytest.approx(att.per_latent()[latents].numpy(), rel=0.5, abs=0.05)


def test_bad_targets(llama):
    sae = topk()
    with pytest.raises(InterventionError, match="2 tokens"):
        attribute(llama, sae, PROMPT, "ab")
    with pytest.raises(InterventionError, match="out of range"):
        attribute(llama, sae, PROMPT, 10**6)
    with pytest.raises(InterventionError, match="pair"):
        attribute(llama, sae, PROMPT, ("a", "b", "c"))


def test_attribution_scatter_figure():
    import pandas as pd

    from sae_nb.views.plotting import attribution_scatter_figure
    table = pd.DataFrame({"position": [3, 5], "token": ["a", "b"], "latent": [7, 9],
                          "attribution": [0.5, -0.2], "ablation_effect": [0.4, -0.1]})
    fig = attribution_scatter_figure(table)
    assert list(fig.data[1].x) == [0.5, -0.2] and list(fig.data[1].y) == [0.4, -0.1]
    assert list(fig.data[0].x) == [-0.2, 0.5]  # the diagonal spans both axes' data
