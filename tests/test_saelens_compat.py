"""Dictionaries saved by ``save_dictionary`` load unchanged in SAELens and compute the same thing.

SAELens lives in its own pinned environment (``.ci/requirements-saelens.txt``, sae-lens 6.54.12,
built by ``.ci/saelens-env``): it pulls about 1.9 GB the workbench does not need. Here we save
one dictionary per case and compute our outputs; ``tests/saelens_side.py``, run by that
environment's python, loads each folder with ``sae_lens.SAE.load_from_disk`` alone and writes
what SAELens holds and computes; then we compare the class SAELens picks, its config and
metadata, every weight, ``encode``, ``decode`` and forward, and that it warned about nothing.

Cases: every architecture we save (standard, topk, batchtopk saved as a JumpReLU with one
constant threshold, jumprelu), with and without ``apply_b_dec_to_input``; a JumpReLU file with
thresholds <= 0 (our encode must still equal SAELens's ``relu(pre) * (pre > t)``); a transcoder;
a Matryoshka BatchTopK trained by our trainer (saved, as BatchTopK is, as a JumpReLU).
The inputs make the thresholds, the top-k and the ReLU after the top-k all decide some
activations.

``.ci/run`` builds the environment and sets ``SAE_NB_SAELENS_PYTHON``; with ``CI=true`` and no
such variable this fails rather than skips. Elsewhere it skips unless you run::

    export SAE_NB_SAELENS_PYTHON="$(.ci/saelens-env)"
    pytest tests/test_saelens_compat.py
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_nb.dictionaries.architectures import JumpReLUSAE, TopKSAE, build_dictionary
from sae_nb.dictionaries.saving import save_dictionary
from sae_nb.training.trainer import train_dictionary

pytestmark = pytest.mark.slow  # starts SAELens in a second interpreter (about 15 s)

SIDE = Path(__file__).with_name("saelens_side.py")
D, F, K, B = 16, 64, 8, 64
ATOL = 1e-5
SAELENS_CLASS = {"standard": "StandardSAE", "topk": "TopKSAE", "batchtopk": "JumpReLUSAE",
                 "jumprelu": "JumpReLUSAE"}
# case -> (architecture, apply_b_dec_to_input, variant)
CASES = {f"{arch}-{'b_dec_in' if b_dec_in else 'no_b_dec_in'}": (arch, b_dec_in, None)
         for arch in SAELENS_CLASS for b_dec_in in (True, False)}
CASES["jumprelu-nonpositive_thresholds"] = ("jumprelu", True, "nonpositive_thresholds")
CASES["topk-transcoder"] = ("topk", True, "transcoder")
CASES["matryoshka_batchtopk-trained"] = ("batchtopk", True, "matryoshka")


def saelens_python() -> str:
    """The interpreter that has sae_lens: ``$SAE_NB_SAELENS_PYTHON``, else this one if it has it."""
    python = os.environ.get("SAE_NB_SAELENS_PYTHON")
    if python:
        if not os.access(python, os.X_OK):
            pytest.fail(f"SAE_NB_SAELENS_PYTHON={python!r} is not an executable; "
                        "rebuild it with .ci/saelens-env.")
        return python
    if importlib.util.find_spec("sae_lens") is not None:
        return sys.executable
    message = ("sae-lens is not installed here and SAE_NB_SAELENS_PYTHON is not set; build its "
               "environment with: export SAE_NB_SAELENS_PYTHON=\"$(.ci/saelens-env)\"")
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"CI must run the SAELens compatibility test: {message}")
    pytest.skip(message)


def make_dictionary(arch: str, apply_b_dec: bool, variant: str | None, gen: torch.Generator):
    """A toy dictionary with random weights, nonzero biases and (for JumpReLU) thresholds.

    ``b_enc`` is mostly negative with 3 positive entries, so the input row ``x0`` whose
    pre-activations equal ``b_enc`` has fewer than k positive ones (TopK must ReLU its top k)."""
    if variant == "matryoshka":
        return trained_matryoshka(gen)
    sae = build_dictionary(arch, D, F, k=K if arch in ("topk", "batchtopk") else None,
                           apply_b_dec_to_input=apply_b_dec)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D, F, generator=gen) / D ** 0.5)
        sae.W_dec.copy_(torch.randn(F, D, generator=gen) / D ** 0.5)
        b_enc = -torch.rand(F, generator=gen) * 0.5 - 0.05
        b_enc[:3] = torch.rand(3, generator=gen) + 0.1
        sae.b_enc.copy_(b_enc)
        sae.b_dec.copy_(torch.randn(D, generator=gen))
        if arch == "batchtopk":  # BatchTopK's inference threshold: one constant value
            sae.threshold.fill_(0.3)
        elif variant == "nonpositive_thresholds":  # a file from elsewhere: some t < 0, some 0
            sae.threshold.copy_(torch.rand(F, generator=gen) * 0.8 - 0.4)
            sae.threshold[:4] = 0.0
        elif arch == "jumprelu":
            sae.threshold.copy_(torch.rand(F, generator=gen) * 0.6 + 0.05)
    return sae.eval()


def trained_matryoshka(gen: torch.Generator):
    """A Matryoshka BatchTopK trained by our trainer (three nested prefixes), as a user saves
    it: the threshold is the one training estimated, the weights what the nested loss made."""
    codes = torch.rand(2048, 24, generator=gen) * (torch.rand(2048, 24, generator=gen) < 0.15)
    x = codes @ torch.randn(24, D, generator=gen) + 0.3
    result = train_dictionary((x[i:i + 128] for _ in range(10) for i in range(0, len(x), 128)),
                              architecture="matryoshka_batchtopk", d_sae=F, k=K,
                              matryoshka_widths=(16, 32, F), total_tokens=160 * 128,
                              progress=False, seed=0)
    assert result.dictionary.threshold.min() > 0  # training estimated a threshold
    return result.dictionary.eval()


@pytest.fixture(scope="module")
def saelens_run(tmp_path_factory):
    """Save every case, run SAELens on the folders in its interpreter; ``{case: (ours, x)}``."""
    python = saelens_python()
    root = tmp_path_factory.mktemp("saelens")
    ours = {}
    for i, (case, (arch, apply_b_dec, variant)) in enumerate(CASES.items()):
        gen = torch.Generator().manual_seed(1234 + i)
        sae = make_dictionary(arch, apply_b_dec, variant, gen)
        transcoder = variant == "transcoder"
        save_dictionary(sae, root / case / "sae", model="EleutherAI/pythia-70m",
                        site="resid_out_layer2" if transcoder else "resid_out_layer3",
                        target_site="resid_out_layer3" if transcoder else None,
                        context_size=128, dataset="sotu",
                        density=torch.rand(F, generator=gen).numpy())
        # x0 makes the pre-activations equal b_enc (see make_dictionary).
        x0 = sae.b_dec.detach() if apply_b_dec else torch.zeros(D)
        x = torch.cat([x0[None], 2 * torch.randn(B - 1, D, generator=gen)])  # (B, D)
        with torch.no_grad():
            f = sae.encode(x)  # (B, F)
        save_file({"x": x, "f": f}, root / case / "inputs.safetensors")
        ours[case] = (sae, x)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([python, str(SIDE), str(root)], capture_output=True, text=True,
                          env=env, timeout=600)
    if done.returncode != 0:
        pytest.fail(f"{python} {SIDE.name} exited {done.returncode}:\n{done.stderr[-4000:]}")
    return root, ours


@pytest.mark.parametrize("case", list(CASES))
def test_saelens_loads_our_dictionary_and_agrees(saelens_run, case):
    root, ours = saelens_run
    sae, x = ours[case]
    arch, apply_b_dec, variant = CASES[case]
    report = json.loads((root / case / "saelens.json").read_text())
    theirs = load_file(root / case / "saelens.safetensors")

    # Loaded without a warning or a logged complaint from SAELens.
    complaints = [f"{w['category']}: {w['message']}" for w in report["warnings"]
                  if "sae_lens" in (w["filename"] or "")]
    complaints += [f"{r['level']} {r['logger']}: {r['message']}" for r in report["logs"]
                   if r["level"] in ("WARNING", "ERROR", "CRITICAL")]
    assert not complaints, complaints

    # The class SAELens picks, its config, and the metadata it keeps.
    assert report["sae_lens_version"] == "6.54.12"
    assert report["class"] == SAELENS_CLASS[arch]
    cfg, meta = report["cfg"], report["metadata"]
    assert (cfg["d_in"], cfg["d_sae"]) == (D, F)
    assert cfg["apply_b_dec_to_input"] is apply_b_dec
    assert cfg["normalize_activations"] == "none"
    if isinstance(sae, TopKSAE):
        assert cfg["k"] == K
        assert cfg["rescale_acts_by_decoder_norm"] is False
    assert meta["model_name"] == "EleutherAI/pythia-70m"
    assert meta["context_size"] == 128
    assert meta["dataset_path"] == "sotu"
    if variant == "transcoder":
        assert (meta["hook_name"], meta["sae_nb_site"], meta["sae_nb_target_site"]) == (
            "blocks.2.hook_resid_post", "resid_out_layer2", "resid_out_layer3")
    else:
        assert (meta["hook_name"], meta["sae_nb_site"]) == (
            "blocks.3.hook_resid_post", "resid_out_layer3")

    # Every weight arrives unchanged: the file holds exactly our parameters, SAELens exactly the
    # file (the same names, shapes and float32 values).
    names = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] * isinstance(sae, JumpReLUSAE))
    saved = load_file(root / case / "sae" / "sae_weights.safetensors")
    assert sorted(saved) == sorted(names)
    their_state = {k.removeprefix("state."): v for k, v in theirs.items() if k.startswith("state.")}
    assert sorted(their_state) == sorted(names)
    for name in names:
        assert saved[name].dtype == their_state[name].dtype == torch.float32, name
        assert torch.equal(saved[name], getattr(sae, name).detach()), name
        assert torch.equal(their_state[name], saved[name]), name

    # Same encode, decode and forward (ours: forward and the reconstruction every metric uses).
    with torch.no_grad():
        f_ours = sae.encode(x)
        torch.testing.assert_close(theirs["encode"], f_ours, atol=ATOL, rtol=0)
        torch.testing.assert_close(theirs["decode"], sae.decode(f_ours), atol=ATOL, rtol=0)
        torch.testing.assert_close(theirs["forward"], sae(x), atol=ATOL, rtol=0)
        torch.testing.assert_close(theirs["forward"], sae.reconstruct(x), atol=ATOL, rtol=0)

        # The inputs exercise what distinguishes each architecture from a plain ReLU.
        pre = sae.pre_acts(x)  # (B, F)
        relu = torch.relu(pre)
        if arch == "standard":
            assert (pre < 0).any() and (pre > 0).any()
        else:
            assert not torch.equal(f_ours, relu)  # thresholds / top-k removed some positives
        if isinstance(sae, JumpReLUSAE):
            between = (pre > 0) & (pre <= sae.threshold)
            assert between.any(), "no pre-activation between 0 and its threshold"
        if variant == "nonpositive_thresholds":
            # Negative pre-activations above a negative threshold: SAELens's ReLU zeroes them.
            assert ((pre < 0) & (pre > sae.threshold)).any()
            assert (f_ours >= 0).all()
        if isinstance(sae, TopKSAE):
            assert ((f_ours > 0).sum(1) == K).any()
            assert (f_ours[0] > 0).sum() == 3  # fewer than k positives: the ReLU after top-k
