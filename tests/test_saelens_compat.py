"""Dictionaries saved by ``save_dictionary`` load unchanged in SAELens and compute the same thing.

Skipped unless ``sae_lens`` is importable (it is not in requirements.txt, so this skips in the
project venv and in CI). To run it, use a separate venv with sae-lens, e.g.::

    python -m venv /tmp/saelens-venv
    /tmp/saelens-venv/bin/pip install torch==2.13.0 sae-lens pytest
    /tmp/saelens-venv/bin/pip install --no-deps -e .
    /tmp/saelens-venv/bin/python -m pytest tests/test_saelens_compat.py -q

Checked with sae-lens 6.54.12. For every architecture (BatchTopK is saved as a JumpReLU with one
constant threshold) and with and without ``apply_b_dec_to_input``, the folder is read by
``sae_lens.SAE.load_from_disk`` alone, and we compare the loaded class, every weight, the
metadata, and ``encode``/``decode``/forward against our dictionary on inputs chosen so that the
thresholds, the top-k and the ReLU after the top-k all decide some activations.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

sae_lens = pytest.importorskip("sae_lens")

from sae_nb.dictionary import JumpReLUSAE, TopKSAE, build_dictionary  # noqa: E402
from sae_nb.saving import save_dictionary  # noqa: E402

D, F, K = 16, 64, 8
ATOL = 1e-5
SAELENS_CLASS = {"standard": "StandardSAE", "topk": "TopKSAE", "batchtopk": "JumpReLUSAE",
                 "jumprelu": "JumpReLUSAE"}


def make_dictionary(arch: str, apply_b_dec: bool, gen: torch.Generator):
    """A toy dictionary with random weights, nonzero biases and (for JumpReLU) thresholds.

    ``b_enc`` is mostly negative with 3 positive entries, so the input row ``x0`` whose
    pre-activations equal ``b_enc`` has fewer than k positive ones (TopK must ReLU its top k)."""
    sae = build_dictionary(arch, D, F, k=K if arch in ("topk", "batchtopk") else None,
                           apply_b_dec_to_input=apply_b_dec)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D, F, generator=gen) / D ** 0.5)
        sae.W_dec.copy_(torch.randn(F, D, generator=gen) / D ** 0.5)
        b_enc = -torch.rand(F, generator=gen) * 0.5 - 0.05
        b_enc[:3] = torch.rand(3, generator=gen) + 0.1
        sae.b_enc.copy_(b_enc)
        sae.b_dec.copy_(torch.randn(D, generator=gen))
        if isinstance(sae, JumpReLUSAE):
            if arch == "batchtopk":  # BatchTopK's inference threshold: one constant value
                sae.threshold.fill_(0.3)
            else:
                sae.threshold.copy_(torch.rand(F, generator=gen) * 0.6 + 0.05)
    return sae.eval()


def load_quietly(folder):
    """``SAE.load_from_disk`` with every warning recorded."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = sae_lens.SAE.load_from_disk(str(folder), device="cpu")
    return loaded, caught


@pytest.mark.parametrize("apply_b_dec", [True, False], ids=["b_dec_in", "no_b_dec_in"])
@pytest.mark.parametrize("arch", ["standard", "topk", "batchtopk", "jumprelu"])
def test_saelens_loads_our_dictionary_and_agrees(tmp_path, caplog, arch, apply_b_dec):
    gen = torch.Generator().manual_seed(1234)
    ours = make_dictionary(arch, apply_b_dec, gen)
    folder = save_dictionary(ours, tmp_path / arch, model="EleutherAI/pythia-70m",
                             site="resid_out_layer3", context_size=128, dataset="sotu",
                             density=torch.rand(F, generator=gen).numpy())

    with caplog.at_level(logging.DEBUG):
        theirs, caught = load_quietly(folder)
    ours_warnings = [f"{w.category.__name__}: {w.message}" for w in caught
                     if "sae_lens" in (w.filename or "")]
    assert not ours_warnings, ours_warnings
    saelens_logs = [r.getMessage() for r in caplog.records
                    if r.name.startswith("sae_lens") and r.levelno >= logging.WARNING]
    assert not saelens_logs, saelens_logs

    # The class SAELens picks, its config, and the metadata it keeps.
    assert type(theirs).__name__ == SAELENS_CLASS[arch]
    assert (theirs.cfg.d_in, theirs.cfg.d_sae) == (D, F)
    assert theirs.cfg.apply_b_dec_to_input is apply_b_dec
    assert theirs.cfg.normalize_activations == "none"
    if isinstance(ours, TopKSAE):
        assert theirs.cfg.k == K
        assert theirs.cfg.rescale_acts_by_decoder_norm is False
    meta = theirs.cfg.metadata
    assert meta.model_name == "EleutherAI/pythia-70m"
    assert meta.hook_name == "blocks.3.hook_resid_post"
    assert meta.context_size == 128
    assert meta.dataset_path == "sotu"
    assert meta.sae_nb_site == "resid_out_layer3"

    # Every weight arrives unchanged (the same names, shapes and float32 values).
    theirs_sd = theirs.state_dict()
    for key, value in ours.state_dict().items():
        assert key in theirs_sd, key
        assert theirs_sd[key].dtype == torch.float32, key
        assert torch.equal(theirs_sd[key], value), key

    # Same encode, decode and forward. x0 makes pre-activations equal b_enc (see above).
    x0 = ours.b_dec.detach() if apply_b_dec else torch.zeros(D)
    x = torch.cat([x0[None], 2 * torch.randn(63, D, generator=gen)])
    with torch.no_grad():
        f_ours, f_theirs = ours.encode(x), theirs.encode(x)
        torch.testing.assert_close(f_theirs, f_ours, atol=ATOL, rtol=0)
        torch.testing.assert_close(theirs.decode(f_ours), ours.decode(f_ours), atol=ATOL, rtol=0)
        torch.testing.assert_close(theirs(x), ours(x), atol=ATOL, rtol=0)

        # The inputs exercise what distinguishes each architecture from a plain ReLU.
        pre = ours.pre_acts(x)
        relu = torch.relu(pre)
        if arch == "standard":
            assert (pre < 0).any() and (pre > 0).any()
        else:
            assert not torch.equal(f_ours, relu)  # thresholds / top-k removed some positives
        if isinstance(ours, JumpReLUSAE):
            between = (pre > 0) & (pre <= ours.threshold)
            assert between.any(), "no pre-activation between 0 and its threshold"
        if isinstance(ours, TopKSAE):
            assert ((f_ours > 0).sum(1) == K).any()
            assert (f_ours[0] > 0).sum() == 3  # fewer than k positives: the ReLU after top-k
