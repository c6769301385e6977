"""Dictionaries and the trainer at toy sizes: interface, sparsity, resume, files, bad input."""

from __future__ import annotations

import itertools
import re

import pytest
import torch

from sae_nb.dictionaries.architectures import (
    BatchTopKSAE,
    JumpReLUSAE,
    ReLUSAE,
    TopKSAE,
    build_dictionary,
)
from sae_nb.dictionaries.saving import DictionaryFormatError, load_sae_nb, save_dictionary
from sae_nb.training import sparse_ops
from sae_nb.training.sparse_ops import topk_sae_forward
from sae_nb.training.trainer import TrainingError, geometric_median, train_dictionary

D, F, K = 16, 64, 4
ARCHS = ["standard", "topk", "batchtopk", "jumprelu"]


def data(n=2048, d=D, seed=0, density=0.08) -> torch.Tensor:
    """Sparse combinations of a few hidden directions plus an offset: SAE-shaped data."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(48, d, generator=g)
    codes = torch.rand(n, 48, generator=g) * (torch.rand(n, 48, generator=g) < density)
    return codes @ dirs + 3.0


def batches(x, batch=128, epochs=50):
    for _ in range(epochs):
        yield from x.split(batch)


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_is_decode_of_encode(arch):
    sae = build_dictionary(arch, D, F, k=K)
    torch.nn.init.normal_(sae.b_enc, std=0.5)
    x = torch.randn(32, D)
    assert sae(x).shape == (32, D) and sae.encode(x).shape == (32, F)
    torch.testing.assert_close(sae(x), sae.decode(sae.encode(x)))
    assert (sae.d_in, sae.d_sae) == (D, F)


def test_topk_has_exactly_k_actives():
    sae = TopKSAE(D, F, k=K)
    with torch.no_grad():
        sae.b_enc.fill_(100.0)  # every pre-activation positive, so ReLU zeroes none
    f = sae.encode(torch.randn(50, D))
    assert ((f != 0).sum(1) == K).all()
    code = sae.sparse_encode(torch.randn(7, D))
    assert code.values.shape == (7, K)


@pytest.mark.parametrize("transcoder", [False, True])
@pytest.mark.parametrize("n_dead,dead_every", [(0, 3), (3, 3), (3, 11), ("all", 11)],
                         ids=["no_auxk", "many_dead", "few_dead", "every_dead_kept"])
@pytest.mark.parametrize("width", [F, 512], ids=["narrow", "wide"])
@pytest.mark.parametrize("dense_aux", [False, True], ids=["aux_gathers", "aux_dense"])
@pytest.mark.parametrize("screen", [False, True], ids=["fp", "screened"])
def test_sparse_ops_match_dense_autograd(transcoder, n_dead, dead_every, width, dense_aux,
                                         screen, monkeypatch):
    """The fused training forward (one sort in its backward) against plain dense autograd:
    the loss and every parameter's gradient, with and without AuxK, for an SAE (b_dec taken
    off the input) and a transcoder (another target, input taken as it is); at a width where
    the row top-k ranks candidate groups (wide) and where it is torch's (narrow); AuxK as
    gathers of its codes' decoder rows or as dense products over the dead columns; the
    latents ranked in the input's precision or screened in bfloat16 first."""
    monkeypatch.setattr(sparse_ops, "DENSE_AUX_SHARE", 0.0 if dense_aux else float("inf"))
    torch.manual_seed(1)
    x = torch.randn(24, D, dtype=torch.double)
    y = torch.randn(24, D, dtype=torch.double) if transcoder else x
    params = [torch.randn(D, width, dtype=torch.double, requires_grad=True),
              torch.randn(width, dtype=torch.double, requires_grad=True),
              torch.randn(width, D, dtype=torch.double, requires_grad=True),
              torch.randn(D, dtype=torch.double, requires_grad=True)]
    dead = torch.zeros(width, dtype=torch.bool)
    dead[::dead_every] = True  # a third of the latents (ranked in place) or a few (gathered)
    if n_dead == "all":  # AuxK keeps every dead latent (k_aux as large as their count)
        n_dead = int(dead.sum())

    def b_in(b_dec):
        return torch.zeros_like(b_dec) if transcoder else b_dec

    def fast(W_enc, b_enc, W_dec, b_dec):
        x_hat, aux_hat, _, _ = topk_sae_forward(x, W_enc, b_enc, b_in(b_dec), W_dec, b_dec, K,
                                                dead if n_dead else None, n_dead, screen)
        err = y - x_hat
        loss = err.pow(2).sum()
        return loss + (aux_hat - err.detach()).pow(2).sum() if n_dead else loss

    def dense(W_enc, b_enc, W_dec, b_dec):
        pre = (x - b_in(b_dec)) @ W_enc + b_enc
        v, i = pre.topk(K, -1)
        f = torch.zeros_like(pre).scatter(-1, i, torch.relu(v))
        err = y - (f @ W_dec + b_dec)
        if not n_dead:
            return err.pow(2).sum()
        av, ai = pre.masked_fill(~dead, float("-inf")).topk(n_dead, -1)
        aux = torch.zeros_like(pre).scatter(-1, ai, torch.relu(av)) @ W_dec
        return err.pow(2).sum() + (aux - err.detach()).pow(2).sum()

    fast_loss, dense_loss = fast(*params), dense(*params)
    torch.testing.assert_close(fast_loss, dense_loss)
    for name, g_fast, g_dense in zip(("W_enc", "b_enc", "W_dec", "b_dec"),
                                     torch.autograd.grad(fast_loss, params),
                                     torch.autograd.grad(dense_loss, params)):
        assert g_dense.abs().max() > 0, name  # every gradient is exercised
        torch.testing.assert_close(g_fast, g_dense, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_training_reduces_error_and_keeps_constraints(arch):
    x = data()
    res = train_dictionary(batches(x), architecture=arch, d_sae=F, k=K, total_tokens=128 * 150,
                           lr=3e-3, l1_coefficient=0.05, l0_coefficient=1e-3, progress=False,
                           log_every=5)
    sae = res.dictionary
    log = res.log
    assert log["fvu"].iloc[-1] < 0.5 * log["fvu"].iloc[0], log[["step", "fvu"]]
    with torch.no_grad():
        fvu = float((x - sae(x)).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert fvu < 0.6
    if arch in ("topk", "batchtopk", "standard", "jumprelu"):  # JumpReLU as dictionary_learning
        # The trained rows are unit norm; folding the input scale divides them all by one factor.
        norms = sae.W_dec.norm(dim=1)
        torch.testing.assert_close(norms, norms.mean().expand_as(norms), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(norms.mean(), torch.tensor(res.scale[1]).reciprocal(),
                                   rtol=1e-4, atol=0)
    if arch == "batchtopk":
        assert float(sae.threshold[0]) > 0  # the inference threshold was estimated
        assert 0.25 * K < float((sae.encode(x) > 0).sum(1).float().mean()) < 4 * K


def test_scale_folding_keeps_codes_and_units():
    sae = ReLUSAE(D, F)
    torch.nn.init.normal_(sae.b_enc, std=0.1)
    torch.nn.init.normal_(sae.b_dec)
    x, s = torch.randn(9, D) * 5, 0.2
    codes, recon = sae.encode(x * s), sae(x * s) / s
    sae.fold_scale(s)
    torch.testing.assert_close(sae.encode(x), codes)
    torch.testing.assert_close(sae(x), recon)


def test_entropy_and_april_variants_train():
    x = data()
    for opts in ({"sparsity_penalty": "entropy"}, {"l1_weighted_by_decoder_norm": True}):
        res = train_dictionary(batches(x), architecture="standard", d_sae=F, total_tokens=128 * 60,
                               lr=3e-3, l1_coefficient=0.02, progress=False, **opts)
        assert res.log["fvu"].iloc[-1] < res.log["fvu"].iloc[0]


@pytest.mark.slow  # over 3 s
def test_transcoder_learns_a_map_between_sites():
    x = data(seed=3)
    W = torch.randn(D, D) / D**0.5
    y = torch.relu(x @ W)
    pairs = ((a, b) for _ in range(200) for a, b in zip(x.split(128), y.split(128)))
    res = train_dictionary(pairs, architecture="topk", d_sae=F, k=8, total_tokens=128 * 600,
                           lr=3e-3, progress=False)
    sae = res.dictionary
    assert not sae.apply_b_dec_to_input
    with torch.no_grad():
        fvu = float((y - sae(x)).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert fvu < 0.35


def test_geometric_median_resists_outliers():
    pts = torch.cat([torch.randn(200, 3) * 0.1 + 1.0, torch.full((20, 3), 100.0)])
    assert (geometric_median(pts) - 1.0).abs().max() < 0.2
    assert (pts.mean(0) - 1.0).abs().max() > 5


class Crash(Exception):
    """A run killed mid-training."""


def crashing(x, at: int):
    """``batches(x)``, raising :class:`Crash` in place of batch ``at``."""
    for i, b in enumerate(batches(x)):
        if i == at:
            raise Crash
        yield b


@pytest.mark.parametrize("arch", ARCHS)
def test_resume_is_bit_identical(tmp_path, arch):
    x = data()
    common = dict(architecture=arch, d_sae=F, k=K, total_tokens=128 * 40, lr=3e-3,
                  progress=False, checkpoint_every=10, log_every=1, dead_window_tokens=128 * 3)
    full = train_dictionary(batches(x), checkpoint_dir=str(tmp_path / "full"), **common)

    with pytest.raises(Crash):
        train_dictionary(crashing(x, 25), checkpoint_dir=str(tmp_path / "cut"), **common)
    resumed = train_dictionary(batches(x), checkpoint_dir=str(tmp_path / "cut"), **common)
    for key, value in full.dictionary.state_dict().items():
        assert torch.equal(value, resumed.dictionary.state_dict()[key]), key
    assert full.log.equals(resumed.log)


def test_save_round_trip(tmp_path):
    for arch in ARCHS:
        sae = build_dictionary(arch, D, F, k=K)
        torch.nn.init.normal_(sae.b_enc, std=0.3)
        torch.nn.init.normal_(sae.b_dec, std=0.3)
        if isinstance(sae, JumpReLUSAE):
            with torch.no_grad():
                sae.threshold.fill_(0.1)
        path = save_dictionary(sae, tmp_path / arch, model="tiny", site="resid_out_layer1",
                               density=torch.rand(F).numpy(), metrics={"fvu": 0.1})
        loaded = load_sae_nb(path)
        assert type(loaded) is type(sae)
        x = torch.randn(11, D)
        torch.testing.assert_close(loaded(x), sae(x))
        assert loaded.metadata["site"] == "resid_out_layer1"


def test_saved_file_contradicting_its_config_is_refused(tmp_path):
    import json

    path = save_dictionary(TopKSAE(D, F, k=K), tmp_path / "d", model="m", site="embed")
    cfg = json.loads((path / "cfg.json").read_text())
    cfg["d_sae"] = F * 2
    (path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(DictionaryFormatError, match="implies"):
        load_sae_nb(path)


def test_bad_inputs_have_clear_errors():
    x = data()
    with pytest.raises(TrainingError, match="empty"):
        train_dictionary(iter([]), progress=False)
    with pytest.raises(TrainingError, match="d_in=32"):
        train_dictionary(batches(x), d_in=32, progress=False)
    with pytest.raises(TrainingError, match="k=100"):
        train_dictionary(batches(x), architecture="topk", d_sae=F, k=100, progress=False)
    with pytest.raises(TrainingError, match="Unknown architecture 'gated_sparse'"):
        train_dictionary(batches(x), architecture="gated_sparse", progress=False)
    bad = x[:128].clone()
    bad[5, 3] = float("nan")
    stream = itertools.chain(x[:256].split(128), [bad], x.split(128))
    with pytest.raises(TrainingError, match="Batch 2 holds NaN"):
        train_dictionary(stream, d_sae=F, k=K, total_tokens=128 * 10, progress=False)
    with pytest.raises(TrainingError, match="shape"):
        train_dictionary(itertools.chain([x[:128]], [x[:128, :8]]), d_sae=F, k=K,
                         total_tokens=128 * 10, progress=False)
    with pytest.raises(ValueError, match="k=0"):
        build_dictionary("topk", D, F, k=0)
    assert isinstance(build_dictionary("batchtopk", D, F, k=2), BatchTopKSAE)


def test_transcoder_from_two_stores_of_one_extraction(llama, corpus_dir, tmp_path):
    import sae_nb
    from sae_nb.activations.store import StoreError, paired_batches

    stores = sae_nb.extract_activations(llama, tmp_path, sites=["mlp_in_layer1", "mlp_out_layer1"],
                                        corpus=str(corpus_dir), n_tokens=512, ctx_len=32,
                                        dtype="float32", progress=False)
    x_store, y_store = stores["mlp_in_layer1"], stores["mlp_out_layer1"]
    (x, y), = itertools.islice(paired_batches(x_store, y_store, 64, seed=3), 1)
    mlp = sae_nb.activations.models.hf_model(llama).model.layers[1].mlp
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), y, rtol=1e-4, atol=1e-4)  # y really is MLP(x)
    res = train_dictionary(paired_batches(x_store, y_store, 64, epochs=None), architecture="topk",
                           d_sae=64, k=8, total_tokens=64 * 30, progress=False)
    assert not res.dictionary.apply_b_dec_to_input
    assert res.log["fvu"].iloc[-1] < res.log["fvu"].iloc[0]
    other = sae_nb.extract_activations(llama, tmp_path / "other", sites=["mlp_out_layer1"],
                                       corpus=str(corpus_dir), n_tokens=256, ctx_len=32,
                                       progress=False)["mlp_out_layer1"]
    with pytest.raises(StoreError, match="same tokens"):
        next(paired_batches(x_store, other, 64))


def test_resuming_with_other_settings_is_refused(tmp_path):
    x = data()
    common = dict(architecture="topk", d_sae=F, total_tokens=128 * 10, progress=False,
                  checkpoint_dir=str(tmp_path))
    train_dictionary(batches(x), k=K, **common)
    with pytest.raises(TrainingError, match="k=4 .checkpoint. vs 8 .now."):
        train_dictionary(batches(x), k=8, **common)


def test_a_checkpoint_resumes_under_another_encoder_precision(tmp_path, monkeypatch):
    """The encoder's precision changes no code (each keeps float32's top k), so a run cut
    short under float32 (every run before "auto" was the default) resumes under the new
    default and under bfloat16, and ends as the uncut float32 run does, to float rounding."""
    x = data()
    common = dict(architecture="topk", d_sae=F, k=K, total_tokens=128 * 20, seed=0,
                  progress=False, checkpoint_every=5)
    whole = train_dictionary(batches(x), encoder_precision="float32", **common).dictionary

    from sae_nb.training import trainer

    steps, step = [], trainer._train_step
    monkeypatch.setattr(trainer, "_train_step", lambda *a, **kw: steps.append(1) or step(*a, **kw))
    for precision in ("auto", "bfloat16"):
        folder = str(tmp_path / precision)
        with pytest.raises(Crash):
            train_dictionary(crashing(x, 12), encoder_precision="float32", checkpoint_dir=folder,
                             **common)
        steps.clear()
        resumed = train_dictionary(batches(x), encoder_precision=precision,
                                   checkpoint_dir=folder, **common)
        assert len(steps) == 10 and resumed.log["step"].iloc[-1] == 20  # from step 10 on
        torch.testing.assert_close(resumed.dictionary.W_dec, whole.W_dec, rtol=1e-3,
                                   atol=1e-4)


def saelens_jumprelu_encode(sae, x):
    """SAELens's JumpReLU encode, written out: ``relu(pre) * (pre > threshold)``."""
    pre = (x - sae.b_dec * sae.apply_b_dec_to_input) @ sae.W_enc + sae.b_enc
    return torch.relu(pre) * (pre > sae.threshold)


def test_jumprelu_thresholds_stay_positive_when_pushed_hard():
    # A large learning rate with no L0 pull: Adam takes full-size steps down on every threshold
    # whose pre-activations fall in the kernel window, far below zero in one step.
    res = train_dictionary(batches(data()), architecture="jumprelu", d_sae=F,
                           total_tokens=128 * 100, lr=0.05, l0_coefficient=0.0,
                           jumprelu_bandwidth=0.05, progress=False)
    t = res.dictionary.threshold
    assert (t > 0).all(), f"{int((t <= 0).sum())} thresholds <= 0, min {float(t.min()):.4g}"


def test_jumprelu_l0_coefficient_still_controls_sparsity():
    # Keeping thresholds positive must not freeze them: a 100x larger L0 weight is sparser.
    l0 = {}
    for coef in (1e-3, 1e-1):
        res = train_dictionary(batches(data()), architecture="jumprelu", d_sae=F,
                               total_tokens=128 * 300, lr=3e-3, l0_coefficient=coef,
                               progress=False, log_every=50)
        l0[coef] = float((res.dictionary.encode(data()) > 0).sum(1).float().mean())
    assert l0[1e-1] < 0.5 * l0[1e-3], l0


@pytest.mark.parametrize("cls", [JumpReLUSAE, BatchTopKSAE])
def test_jumprelu_encode_equals_saelens_for_any_threshold(cls, tmp_path):
    torch.manual_seed(0)
    sae = cls(D, F) if cls is JumpReLUSAE else cls(D, F, k=K)
    with torch.no_grad():
        torch.nn.init.normal_(sae.b_enc, std=0.5)
        torch.nn.init.normal_(sae.b_dec, std=0.3)
        sae.threshold.copy_(torch.linspace(-0.6, 0.6, F))  # negative, zero-ish and positive
        sae.threshold[F // 2] = 0.0
    x = torch.randn(200, D)
    want = saelens_jumprelu_encode(sae, x)
    assert (want == 0).any() and (want > 0).any()
    torch.testing.assert_close(sae.encode(x), want, rtol=0, atol=0)
    torch.testing.assert_close(sae(x), want @ sae.W_dec + sae.b_dec)
    path = save_dictionary(sae, tmp_path / "neg", model="tiny", site="resid_out_layer1")
    loaded = load_sae_nb(path)
    torch.testing.assert_close(loaded.encode(x), want, rtol=0, atol=0)


def test_transcoder_resamples_dead_latents_along_the_target_residual():
    # x = c u and y = c v with u, v orthogonal: the target residual y - x_hat lies along v (x_hat
    # lives in y's space), while x - x_hat has a large component along u. Latents whose encoder
    # column points away from u never fire; with resample_every equal to the whole run they are
    # resampled exactly once, at the last step, and are the only ones whose b_enc is still 0.
    # A strong L1 silences the others, so x_hat is b_dec (in y's span) and y - x_hat is along v.
    g = torch.Generator().manual_seed(5)
    u, v = torch.eye(D)[0], torch.eye(D)[1]
    c = 0.5 + 1.5 * torch.rand(1024, 1, generator=g)
    x, y = c * u, c * v
    steps = 100
    pairs = ((a, b) for _ in range(100) for a, b in zip(x.split(128), y.split(128)))
    res = train_dictionary(pairs, architecture="standard", d_sae=F, total_tokens=128 * steps,
                           lr=3e-2, l1_coefficient=10.0, resample_every=steps, progress=False)
    sae = res.dictionary
    resampled = sae.b_enc == 0
    assert 5 < int(resampled.sum()) < F
    dec = sae.W_dec[resampled]
    dec = dec / dec.norm(dim=1, keepdim=True)
    along_v = (dec @ v).abs()
    assert (along_v > 0.99).all(), f"decoder rows' |cos| with the target residual: {along_v}"
    enc = sae.W_enc[:, resampled].T
    along_u = (enc / enc.norm(dim=1, keepdim=True) @ u).abs()
    assert (along_u > 0.99).all(), f"encoder columns' |cos| with the input: {along_u}"


def test_jumprelu_straight_through_gradients_equal_the_closed_form():
    """Rajamanoharan et al. 2024, rectangle kernel K(u) = 1 if |u| < 1/2 else 0, bandwidth eps:
    d/dt [pre * H(pre - t)] = -(t / eps) K((pre - t) / eps), d/dt H(pre - t) = -(1/eps) K(...),
    d/dpre [pre * H(pre - t)] = H(pre - t). Checked on the whole jumprelu_step loss."""
    from sae_nb.training.objectives import jumprelu_step

    eps, l0_coef = 0.2, 0.3
    t = [0.5, 0.1]  # the window is |pre - t| < 0.1
    # Hand-chosen pre-activations per latent: inside the window below and above t, at t, just
    # inside and just outside its edges, far away.
    pre = torch.tensor([[0.45, 0.05], [0.55, 0.12], [0.59, 0.21], [0.61, -0.5],
                        [0.39, 0.1], [0.5, -0.01], [1.0, 0.19], [-1.0, 0.3]], dtype=torch.double)
    B = len(pre)
    sae = JumpReLUSAE(2, 2, dtype=torch.double, apply_b_dec_to_input=False)
    with torch.no_grad():  # pre_acts(x) = x: identity encoder, no biases
        sae.W_enc.copy_(torch.eye(2))
        sae.threshold.copy_(torch.tensor(t))
        sae.W_dec.copy_(torch.tensor([[1.0, 2.0], [-0.5, 1.5]]))
        sae.b_dec.copy_(torch.tensor([0.1, -0.2]))
    y = torch.tensor([[0.3, -0.1]] * B, dtype=torch.double) + torch.linspace(0, 1, B)[:, None]
    x = pre.clone().requires_grad_(True)
    jumprelu_step(sae, x, y, l0_coef, eps).loss.backward()

    # The closed form, element by element.
    f = [[p if p > t[j] else 0.0 for j, p in enumerate(row)] for row in pre.tolist()]
    W_dec, b_dec = sae.W_dec.detach().tolist(), sae.b_dec.detach().tolist()
    want_t, want_pre = [0.0, 0.0], [[0.0, 0.0] for _ in range(B)]
    for i in range(B):
        x_hat = [b_dec[d] + sum(f[i][j] * W_dec[j][d] for j in range(2)) for d in range(2)]
        for j in range(2):
            # d mse / d f_ij, mse = sum_i |y_i - x_hat_i|^2 / B
            dmse_df = sum(-2 / B * (float(y[i, d]) - x_hat[d]) * W_dec[j][d] for d in range(2))
            p = float(pre[i, j])
            K = 1.0 if abs((p - t[j]) / eps) < 0.5 else 0.0
            want_t[j] += dmse_df * -(t[j] / eps) * K + l0_coef / B * -(1 / eps) * K
            want_pre[i][j] = dmse_df * (1.0 if p > t[j] else 0.0)
    assert sum(1 for row in pre.tolist() for j, p in enumerate(row) if abs(p - t[j]) < eps / 2) == 8
    torch.testing.assert_close(sae.threshold.grad, torch.tensor(want_t, dtype=torch.double))
    torch.testing.assert_close(x.grad, torch.tensor(want_pre, dtype=torch.double))  # W_enc = I


def forced_dead_topk(monkeypatch, latents, auxk_alpha):
    """Train a TopK dictionary whose ``latents`` start dead: their encoder columns shrunk 10^4x,
    so their pre-activations stay below the top k on rows where k live latents are positive
    (dense data: nearly all rows), yet are positive on some rows, as AuxK needs (it trains the
    dead latents' largest ReLU'd pre-activations)."""
    import sae_nb.training.trainer as train_module

    real_init = train_module._init

    def init_with_dead(*args):
        sae, s_in, s_out = real_init(*args)
        with torch.no_grad():
            sae.W_enc[:, latents] *= 1e-4
        return sae, s_in, s_out

    monkeypatch.setattr(train_module, "_init", init_with_dead)
    x = data(density=0.25)
    res = train_dictionary(batches(x, epochs=200), architecture="topk", d_sae=F, k=K,
                           total_tokens=128 * 150, lr=3e-3, dead_window_tokens=128 * 5,
                           auxk_alpha=auxk_alpha, k_aux=8, progress=False, log_every=50,
                           grad_clip_norm=None)  # AuxK alone, as in Gao et al.
    with torch.no_grad():
        fires = (res.dictionary.encode(x) > 0).sum(0)  # (F,) rows where each latent fires
    return fires, res.log


def test_auxk_revives_latents_forced_dead(monkeypatch):
    forced = list(range(0, F, 4))  # 16 of 64
    fires_off, log_off = forced_dead_topk(monkeypatch, forced, auxk_alpha=0.0)
    fires_on, log_on = forced_dead_topk(monkeypatch, forced, auxk_alpha=1 / 32)
    # Without AuxK only the main loss could give them a gradient, and it never sees them: they
    # stay dead (one may slip in on a rare row where fewer than k live latents are positive).
    assert int((fires_off[forced] > 0).sum()) <= 2, fires_off[forced]
    # With AuxK most of them come back and fire on a fair share of the 2048 rows.
    assert int((fires_on[forced] > 20).sum()) >= 12, (fires_on[forced], log_on)
    assert log_on["dead_frac"].iloc[-1] < log_off["dead_frac"].iloc[-1]


def test_dead_latent_window_counts_tokens_since_each_latent_fired(monkeypatch):
    """``dead_window_tokens``: a latent is dead once the batches since it last fired hold at
    least that many tokens. Identity weights and one-hot rows make latent j fire exactly on the
    rows e_j (TopK with k=1); batches of 4 and 6 rows alternate, and the window (10 tokens) is a
    multiple of neither, so counting steps instead of tokens would show."""
    import sae_nb.training.trainer as train_module

    real_init = train_module._init

    def identity_init(*args):
        sae, s_in, s_out = real_init(*args)
        with torch.no_grad():
            sae.W_enc.copy_(torch.eye(D))
            sae.W_dec.copy_(torch.eye(D))
            sae.b_enc.zero_()
        return sae, s_in, s_out

    monkeypatch.setattr(train_module, "_init", identity_init)
    schedule = [[0, 1, 2, 0], [0, 3, 0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0, 0, 0],
                [0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [2, 0, 0, 0], [0, 0, 0, 0, 0, 0],
                [0, 0, 0, 0], [0, 4, 0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0, 0, 0]]
    stream = [torch.eye(D)[rows] for rows in schedule]
    window = 10
    res = train_dictionary(iter(stream), architecture="topk", d_sae=D, k=1, lr=1e-30,
                           total_tokens=4 * len(schedule), dead_window_tokens=window,
                           b_dec_init="zeros", normalize_activations=False, progress=False,
                           log_every=1)
    assert len(res.log) == len(schedule)
    # Brute force: before step s, the tokens in the batches after the last one where j fired.
    want = []
    for s in range(len(schedule)):
        dead = 0
        for j in range(D):
            fired_at = [t for t in range(s) if j in schedule[t]]
            since = sum(len(schedule[t]) for t in range(fired_at[-1] + 1 if fired_at else 0, s))
            dead += since >= window
        want.append(dead)
    got = (res.log["dead_frac"] * D).round().astype(int).tolist()
    assert got == want, f"dead latents per step: {got}, want {want}"


def test_resume_from_a_checkpoint_that_counted_steps_since_firing(tmp_path):
    # Checkpoints written before the window counted tokens held steps since firing under
    # "since_fired"; resuming one must count the same dead latents as an uninterrupted run.
    x = data()
    common = dict(architecture="topk", d_sae=F, k=1, total_tokens=128 * 30, lr=3e-3,
                  progress=False, log_every=1, dead_window_tokens=128 * 2)
    full = train_dictionary(batches(x), **common)
    assert full.log["dead_frac"].iloc[10:].max() > 0  # some latents are dead after the cut
    cut = tmp_path / "cut"

    def crashing():
        for i, b in enumerate(batches(x)):
            if i == 15:
                raise KeyboardInterrupt
            yield b

    with pytest.raises(KeyboardInterrupt):
        train_dictionary(crashing(), checkpoint_dir=str(cut), checkpoint_every=10, **common)
    ckpt = cut / "checkpoint.pt"
    payload = torch.load(ckpt, weights_only=True)
    assert payload["tokens_since_fired"].max() > 0
    payload["since_fired"] = payload.pop("tokens_since_fired") // 128  # the old format
    torch.save(payload, ckpt)
    resumed = train_dictionary(batches(x), checkpoint_dir=str(cut), checkpoint_every=10, **common)
    assert full.log["dead_frac"].tolist() == resumed.log["dead_frac"].tolist()
    for key, value in full.dictionary.state_dict().items():
        assert torch.equal(value, resumed.dictionary.state_dict()[key]), key


def test_degenerate_sizes_and_empty_batches_are_refused():
    """expansion=0, a zero or negative width and empty batches once gave ZeroDivisionError."""
    x = data()
    for bad in ({"expansion": 0}, {"expansion": -2}, {"d_sae": 0}, {"expansion": 2.5}):
        name = next(iter(bad))
        with pytest.raises(TrainingError, match=f"{name}={bad[name]}"):
            train_dictionary(batches(x), progress=False, **bad)
    with pytest.raises(TrainingError, match="Batch 0 has no rows"):
        train_dictionary(iter([x[:0]]), d_sae=F, k=K, progress=False)
    with pytest.raises(TrainingError, match="Batch 1 has no rows"):
        train_dictionary(iter([x[:128], x[:0], x[:128]]), d_sae=F, k=K, total_tokens=128 * 3,
                         progress=False)


def test_settings_from_notebook_parameters_are_checked_by_name():
    """`-p total_tokens=1e6` is a whole number; quoted numbers, negative rates and fractional
    counts are refused by name (they once surfaced as TypeError or torch's ValueError)."""
    from sae_nb import TrainConfig

    assert TrainConfig(total_tokens=1e6, k=32.0).total_tokens == 1_000_000
    assert isinstance(TrainConfig(k=32.0).k, int)
    for bad, message in (({"total_tokens": "abc"}, "total_tokens='abc' is not a whole number"),
                         ({"k": 2.5}, "k=2.5 is not a whole number"),
                         ({"lr": -1.0}, "lr=-1.0 must be above 0"),
                         ({"lr": "fast"}, "lr='fast' is not a number"),
                         ({"l1_coefficient": -0.1}, "l1_coefficient=-0.1 must be at least 0"),
                         ({"seed": -1}, "seed=-1 must be at least 0")):
        with pytest.raises(TrainingError, match=re.escape(message)):
            TrainConfig(**bad)


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_norm_reaching_adam_is_clipped_and_the_log_keeps_the_norm_before(
        arch, monkeypatch):
    """Per step, the gradient's norm before clipping and the one Adam receives, both computed
    here from the gradients (float64): steps above the cap reach Adam at the cap, the others
    unchanged, and the log's grad_norm is the norm before."""
    before, seen = [], []

    def norm(params) -> float:
        return float(torch.cat([p.grad.double().flatten() for p in params if p.grad is not None])
                     .norm())

    clip, step = torch.nn.utils.clip_grad_norm_, torch.optim.Adam.step

    def clip_spy(parameters, *a, **kw):
        parameters = list(parameters)
        before.append(norm(parameters))
        return clip(parameters, *a, **kw)

    def adam_spy(self, *a, **kw):
        seen.append(norm(p for group in self.param_groups for p in group["params"]))
        return step(self, *a, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_spy)
    monkeypatch.setattr(torch.optim.Adam, "step", adam_spy)
    x = data()
    run = dict(architecture=arch, d_sae=F, k=K, total_tokens=128 * 12, seed=0, progress=False,
               log_every=1)
    free = train_dictionary(batches(x), grad_clip_norm=None, **run)
    assert before == []  # grad_clip_norm=None never clips
    unclipped, seen[:] = list(seen), []
    cap = sorted(unclipped)[len(unclipped) // 2]  # the median: some steps above it, some below
    clipped = train_dictionary(batches(x), grad_clip_norm=cap, **run)
    assert len(before) == len(seen) == 12
    # Same start and first batch, so the first gradient is the same before clipping.
    assert before[0] == pytest.approx(unclipped[0], rel=1e-5)
    above = [b > cap for b in before]
    assert any(above) and not all(above), (before, cap)  # both branches are exercised
    for i, (b, s) in enumerate(zip(before, seen)):
        assert s == pytest.approx(min(b, cap), rel=1e-4), f"step {i}: {b} before, cap {cap}"
    assert clipped.log["grad_norm"].tolist() == pytest.approx(before, rel=1e-5)
    assert free.log["grad_norm"].isna().all()
    with pytest.raises(TrainingError, match="grad_clip_norm"):
        train_dictionary(batches(x), grad_clip_norm=0.0, **run)


def test_auxk_alpha_zero_skips_the_auxiliary_top_k(monkeypatch):
    """With auxk_alpha=0 the AuxK term weighs nothing, so the step never ranks the dead latents:
    the training forward is called without them, even once latents are dead."""
    import sae_nb.training.objectives as objectives

    seen = []
    real = objectives.topk_sae_forward

    def spy(*args):
        seen.append(args[7] is not None)
        return real(*args)

    monkeypatch.setattr(objectives, "topk_sae_forward", spy)
    x = data()
    kw = dict(architecture="topk", d_sae=F, k=K, total_tokens=128 * 20, progress=False,
              dead_window_tokens=128)
    train_dictionary(batches(x), auxk_alpha=1 / 32, **kw)
    assert any(seen), "no latent went dead: the test needs dead latents"
    seen.clear()
    train_dictionary(batches(x), auxk_alpha=0.0, **kw)
    assert seen and not any(seen)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_adam_updates_the_latent_major_encoder_as_adam_written_out(arch, monkeypatch):
    """TopK and BatchTopK keep ``W_enc`` (D, F) as the transpose of an (F, D) matrix, and the
    fused Adam step sees it transposed back (contiguous). Each step's update of every parameter
    is Adam's, written out here in float64 from the gradient and rate that reach the step; the
    layouts are the same after every step, and inside the step every tensor is contiguous."""
    seen = []
    step = torch.optim.Adam.step

    def adam_spy(self, *a, **kw):
        params = [p for group in self.param_groups for p in group["params"]
                  if p.grad is not None]
        assert all(p.is_contiguous() and p.grad.is_contiguous() for p in params)
        assert all(v.is_contiguous() for s in self.state.values() for v in s.values())
        before = [(p.detach().double().clone(), p.grad.double().clone()) for p in params]
        out = step(self, *a, **kw)
        seen.append((before, [p.detach().double().clone() for p in params],
                     self.param_groups[0]["lr"], self.param_groups[0]["betas"]))
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", adam_spy)
    result = train_dictionary(batches(data()), architecture=arch, d_sae=F, k=K,
                              total_tokens=128 * 5, seed=0, progress=False)
    assert len(seen) == 5
    m = v = None
    for t, (before, after, lr, (b1, b2)) in enumerate(seen, 1):
        if m is None:
            m = [torch.zeros_like(p) for p, _ in before]
            v = [torch.zeros_like(p) for p, _ in before]
        for i, ((p, g), p_new) in enumerate(zip(before, after)):
            assert p.shape == p_new.shape  # each parameter in its own shape, transposed back
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            update = lr * (m[i] / (1 - b1 ** t)) / ((v[i] / (1 - b2 ** t)).sqrt() + 1e-8)
            # atol: the float32 parameter's rounding (steps are ~1e-2 here)
            torch.testing.assert_close(p - p_new, update, rtol=1e-4, atol=1e-7,
                                       msg=lambda m, t=t, i=i: f"step {t}, parameter {i}: {m}")
    assert result.dictionary.W_enc.is_contiguous()  # the usual layout once trained


def test_the_encoder_keeps_its_layout_across_steps():
    from sae_nb.training.trainer import TrainConfig, Training

    x = data()[:128]
    run = Training(x, x, TrainConfig(architecture="topk", d_sae=F, k=K, total_tokens=128 * 3),
                   progress=False)
    for _ in range(3):
        run.step(x)
        p = run.sae.W_enc
        assert p.shape == (D, F) and p.stride() == (1, D) and p.grad.stride() == (1, D)
        state = run.opt.state[p]
        assert state["exp_avg"].stride() == state["exp_avg_sq"].stride() == (1, D)


def test_bfloat16_screen_trains_as_float32_does():
    """encoder_precision="bfloat16" and "auto" against float32 on the same batches: the same
    held-out FVU to 0.5% (the screen keeps float32's top k, so the runs differ only in float
    rounding); "bfloat16" is refused for other architectures, "auto" is not, and unknown
    precisions are refused."""
    x = data()
    common = dict(architecture="topk", d_sae=F, k=K, total_tokens=128 * 60, seed=0,
                  progress=False)
    fvu = {}
    for precision in ("float32", "bfloat16", "auto"):
        sae = train_dictionary(batches(x), encoder_precision=precision, **common).dictionary
        with torch.no_grad():
            fvu[precision] = float((x - sae(x)).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert fvu["float32"] < 0.5
    assert fvu["bfloat16"] == pytest.approx(fvu["float32"], rel=0.005), fvu
    assert fvu["auto"] == pytest.approx(fvu["float32"], rel=0.005), fvu
    with pytest.raises(TrainingError, match="encoder_precision='bfloat16' is for "
                                            "architecture='topk'"):
        train_dictionary(batches(x), architecture="batchtopk", encoder_precision="bfloat16",
                         progress=False)
    train_dictionary(batches(x), architecture="batchtopk", total_tokens=256, progress=False)
    with pytest.raises(TrainingError, match="Unknown encoder_precision 'fp8'"):
        train_dictionary(batches(x), encoder_precision="fp8", progress=False)


@pytest.mark.parametrize("case", ["mse_only", "auxk", "auxk_given_variance", "zero_variance"])
def test_topk_loss_and_its_gradient_equal_autograd_of_the_formula(case):
    """TopK's fused loss against autograd of Gao et al.'s terms written out (float64): the MSE
    summed over D and averaged over rows, plus alpha times AuxK's MSE on the detached residual
    over the residual's variance, zeroed where that ratio is not finite."""
    from sae_nb.training.objectives import _TopKLoss

    torch.manual_seed(0)
    B, d, alpha = 32, 8, 1 / 32
    y = torch.randn(B, d, dtype=torch.double)
    x_hat = torch.randn(B, d, dtype=torch.double, requires_grad=True)
    aux_hat = None if case == "mse_only" else torch.randn(B, d, dtype=torch.double,
                                                          requires_grad=True)
    if case == "zero_variance":  # every residual row the same: variance 0, clamped at 1e-8
        with torch.no_grad():
            x_hat.copy_(y - torch.randn(1, d, dtype=torch.double))
    given = torch.tensor(0.7, dtype=torch.double) if case == "auxk_given_variance" else None

    def written_out():
        err = y - x_hat
        loss = err.pow(2).sum(-1).mean()
        if aux_hat is not None:
            residual = err.detach()
            var = (residual - residual.mean(0)).pow(2).sum(-1).mean() if given is None else given
            ratio = (residual - aux_hat).pow(2).sum(-1).mean() / var.clamp_min(1e-8)
            loss = loss + alpha * torch.nan_to_num(ratio)
        return loss, err.pow(2).sum()

    inputs = [t for t in (x_hat, aux_hat) if t is not None]
    loss, err_sq = _TopKLoss.apply(x_hat, aux_hat, y, alpha, given)
    ref_loss, ref_err_sq = written_out()
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(err_sq, ref_err_sq.detach())
    for name, got, want in zip(("x_hat", "aux_hat"), torch.autograd.grad(loss, inputs),
                               torch.autograd.grad(ref_loss, inputs)):
        if not (case == "zero_variance" and name == "aux_hat"):
            assert want.abs().max() > 0, name
        torch.testing.assert_close(got, want, msg=name)
