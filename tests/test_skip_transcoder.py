"""Skip transcoders: TopK with a linear skip term, trained, folded, saved and loaded."""

from __future__ import annotations

import copy

import pytest
import torch

from sae_nb.dictionaries.architectures import SkipTopKSAE, TopKSAE
from sae_nb.dictionaries.saving import DictionaryFormatError, load_sae_nb, save_dictionary
from sae_nb.training.objectives import topk_step
from sae_nb.training.trainer import TrainingError, train_dictionary

D, F, K = 12, 48, 3


def test_the_skip_step_equals_dense_autograd():
    """The training step of a skip transcoder (fused sparse TopK plus the skip product) against
    the formula written out densely: the loss and every parameter's gradient, W_skip's too."""
    torch.manual_seed(0)
    sae = SkipTopKSAE(D, F, k=K, apply_b_dec_to_input=False).double()
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p))
    x, y = torch.randn(20, D, dtype=torch.double), torch.randn(20, D, dtype=torch.double)
    ref = copy.deepcopy(sae)

    step = topk_step(sae, x, y, dead=None, k_aux=0, auxk_alpha=0.0)
    step.loss.backward()

    pre = x @ ref.W_enc + ref.b_enc
    v, i = pre.topk(K, -1)
    f = torch.zeros_like(pre).scatter(-1, i, torch.relu(v))
    y_hat = f @ ref.W_dec + ref.b_dec + x @ ref.W_skip.T
    loss = (y - y_hat).pow(2).sum(-1).mean()
    loss.backward()
    torch.testing.assert_close(step.loss, loss)
    for name, p in sae.named_parameters():
        expected = dict(ref.named_parameters())[name].grad
        assert expected.abs().max() > 0, name
        torch.testing.assert_close(p.grad, expected, msg=name)


def test_folding_the_training_scale_keeps_the_map():
    """Trained on ``x * s_in -> y * s_out``, folded, the dictionary maps ``x`` to ``y``: its
    reconstruction of ``x`` is the unfolded one of ``x * s_in`` divided by ``s_out``."""
    torch.manual_seed(1)
    sae = SkipTopKSAE(D, F, k=K, apply_b_dec_to_input=False)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p))
    folded = copy.deepcopy(sae)
    s_in, s_out = 0.25, 3.0
    folded.fold_scale(s_in, s_out)
    x = torch.randn(30, D)
    with torch.no_grad():
        torch.testing.assert_close(folded.reconstruct(x), sae.reconstruct(x * s_in) / s_out)
        torch.testing.assert_close(folded.encode(x), sae.encode(x * s_in))


def linear_plus_sparse(n: int, seed: int):
    """Targets that are one dense linear map of the input plus a few sparse nonlinear parts
    (the same map for every ``seed``; the seed draws the inputs)."""
    g = torch.Generator().manual_seed(100)
    A, dirs = torch.randn(D, D, generator=g) / D**0.5, torch.randn(6, D, generator=g)
    x = torch.randn(n, D, generator=torch.Generator().manual_seed(seed))
    return x, x @ A.T + torch.relu(x[:, :6] - 1.0) @ dirs


def fvu(y, y_hat) -> float:
    return float((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


def test_a_skip_transcoder_learns_the_linear_part_a_plain_one_cannot():
    """A dense linear map needs every direction at once: k = 3 latents cannot carry it, the skip
    term can. Trained on identical batches, the skip transcoder's held-out FVU is far lower."""
    x, y = linear_plus_sparse(4096, 0)
    x_test, y_test = linear_plus_sparse(1024, 1)
    found = {}
    for skip in (False, True):
        result = train_dictionary(((a, b) for _ in range(30) for a, b in
                                   zip(x.split(256), y.split(256))),
                                  architecture="topk", d_sae=F, k=K, total_tokens=4096 * 30,
                                  lr=3e-3, skip_connection=skip, progress=False)
        assert isinstance(result.dictionary, SkipTopKSAE) == skip
        with torch.no_grad():
            found[skip] = fvu(y_test, result.dictionary.reconstruct(x_test))
    assert found[True] < 0.03 < 0.1 < found[False], found


def test_a_saved_skip_transcoder_loads_back_and_a_missing_skip_is_refused(tmp_path):
    torch.manual_seed(2)
    sae = SkipTopKSAE(D, F, k=K, apply_b_dec_to_input=False)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p))
    save_dictionary(sae, tmp_path / "tc", model="m", site="mlp_in_layer0",
                    target_site="mlp_out_layer0")
    back = load_sae_nb(tmp_path / "tc")
    assert isinstance(back, SkipTopKSAE) and back.metadata["target_site"] == "mlp_out_layer0"
    x = torch.randn(9, D)
    with torch.no_grad():
        torch.testing.assert_close(back.reconstruct(x), sae.reconstruct(x))
    # A plain TopK's weights saved under the skip architecture's name: W_skip is missing.
    plain = TopKSAE(D, F, k=K)
    save_dictionary(plain, tmp_path / "plain", model="m", site="resid_out_layer0")
    meta = tmp_path / "plain" / "sae_nb.json"
    meta.write_text(meta.read_text().replace('"architecture": "topk"',
                                             '"architecture": "topk_skip"'))
    with pytest.raises(DictionaryFormatError, match="W_skip"):
        load_sae_nb(tmp_path / "plain")


def test_a_skip_connection_on_another_architecture_is_refused():
    with pytest.raises(TrainingError, match="skip_connection=True needs architecture='topk'"):
        train_dictionary([torch.randn(8, D)], architecture="batchtopk", k=K, d_sae=F,
                         skip_connection=True, progress=False)
