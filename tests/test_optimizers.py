"""The trainer's optimisers against reference steps written out by hand, and the trainer
resuming each of them exactly."""

from __future__ import annotations

import pytest
import torch

from sae_nb.training.optimizers import ScheduleFreeSignSGD
from sae_nb.training.trainer import TrainConfig, TrainingError, check_resumable, train_dictionary


def reference_schedule_free_sign(w0, grads_at, lrs, beta):
    """Defazio et al.'s schedule-free iteration with a sign step, kept as its three sequences
    explicitly (x the average, z the descent, y where the gradient is taken), float64:

        z <- z - lr sign(g(y));  c = lr_max^2 / sum lr_max^2;  x <- (1-c) x + c z;
        y <- beta x + (1-beta) z."""
    x, z, y = w0.clone(), w0.clone(), w0.clone()
    weight_sum, lr_max, ys = 0.0, 0.0, []
    for lr in lrs:
        g = grads_at(y)
        z = z - lr * torch.sign(g)
        lr_max = max(lr_max, lr)
        weight_sum += lr_max**2
        c = lr_max**2 / weight_sum
        x = (1 - c) * x + c * z
        y = beta * x + (1 - beta) * z
        ys.append(y.clone())
    return x, ys


def test_schedule_free_sign_sgd_matches_the_three_sequences():
    torch.manual_seed(0)
    w0 = torch.randn(7, 5, dtype=torch.double)
    target = torch.randn(7, 5, dtype=torch.double)
    grads_at = lambda w: (w - target) ** 3 + 0.1 * torch.sin(3 * w)  # noqa: E731
    lrs = [0.01 * min(1, (t + 1) / 4) for t in range(12)] + [0.02, 0.005, 0.005]  # warm-up, jumps
    p = torch.nn.Parameter(w0.clone())
    opt = ScheduleFreeSignSGD([p], lr=lrs[0], momentum=0.9)
    x_ref, ys = reference_schedule_free_sign(w0, grads_at, lrs, 0.9)
    for lr, y in zip(lrs, ys):
        opt.param_groups[0]["lr"] = lr
        p.grad = grads_at(p.detach())
        opt.step()
        torch.testing.assert_close(p.detach(), y, rtol=0, atol=1e-12)
    opt.averaged()
    torch.testing.assert_close(p.detach(), x_ref, rtol=0, atol=1e-12)
    assert (x_ref - ys[-1]).abs().max() > 1e-3  # the average is not the last point


def test_schedule_free_sign_sgd_refuses_bad_settings():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="momentum=1"):
        ScheduleFreeSignSGD([p], lr=0.1, momentum=1)
    with pytest.raises(ValueError, match="lr=0"):
        ScheduleFreeSignSGD([p], lr=0)
    with pytest.raises(TrainingError, match="Unknown optimizer 'sgd'"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(TrainingError, match="momentum=1.5"):
        TrainConfig(momentum=1.5)


def data(n=96 * 20, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g)


def test_trainer_sign_step_is_the_reference_on_a_relu_sae():
    """One trainer run with signsgd_schedulefree against the reference iteration driven by the
    same loss, by hand: the ReLU SAE's gradients at y (with the decoder's parallel gradient
    projected out and its rows renormalised, as the trainer does), then x at the end."""
    x = data()
    cfg = dict(architecture="standard", d_sae=32, l1_coefficient=0.01, total_tokens=96 * 6,
               optimizer="signsgd_schedulefree", lr=0.01, normalize_activations=False,
               b_dec_init="zeros", seed=3, grad_clip_norm=None)
    result = train_dictionary((x[i:i + 96] for i in range(0, len(x), 96)), progress=False, **cfg)

    from sae_nb.dictionaries.architectures import ReLUSAE

    torch.manual_seed(3)
    sae = ReLUSAE(16, 32)  # the trainer's initialisation under the same seed
    names = [n for n, _ in sae.named_parameters()]
    params = {n: p.detach().clone() for n, p in sae.named_parameters()}
    xs, zs = dict(params), dict(params)
    ys, weight_sum = dict(params), 0.0
    for t in range(6):
        batch = x[t * 96:(t + 1) * 96]
        w = {n: ys[n].clone().requires_grad_() for n in names}
        f = torch.relu((batch - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
        loss = (batch - (f @ w["W_dec"] + w["b_dec"])).pow(2).sum(1).mean() + 0.01 * f.sum(1).mean()
        grads = dict(zip(names, torch.autograd.grad(loss, [w[n] for n in names])))
        d = ys["W_dec"]
        grads["W_dec"] = grads["W_dec"] - (grads["W_dec"] * d).sum(1, keepdim=True) * d
        weight_sum += 0.01**2
        c = 0.01**2 / weight_sum
        for n in names:
            # x from the (renormalised) y, as the parameters carry it between steps
            xs[n] = (ys[n] - 0.05 * zs[n]) / 0.95
            zs[n] = zs[n] - 0.01 * torch.sign(grads[n])
            xs[n] = (1 - c) * xs[n] + c * zs[n]
            ys[n] = 0.95 * xs[n] + 0.05 * zs[n]
        ys["W_dec"] = ys["W_dec"] / ys["W_dec"].norm(dim=1, keepdim=True)
    final = {n: (ys[n] - 0.05 * zs[n]) / 0.95 for n in names}
    got = dict(result.dictionary.named_parameters())
    for n in names:
        torch.testing.assert_close(got[n].detach(), final[n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("optimizer", ["adam", "signsgd_schedulefree"])
def test_each_optimizer_resumes_bit_identically(tmp_path, optimizer, monkeypatch):
    x = data(n=64 * 30)
    batches = lambda: (x[i:i + 64] for i in range(0, len(x), 64))  # noqa: E731
    cfg = dict(architecture="topk", d_sae=48, k=4, total_tokens=64 * 30, optimizer=optimizer,
               progress=False, seed=1)
    whole = train_dictionary(batches(), **cfg)
    ckpt = str(tmp_path / "ckpt")
    import sae_nb.training.trainer as trainer

    real, calls = trainer._train_step, []

    def crash(*args, **kw):
        calls.append(1)
        if len(calls) == 17:
            raise KeyboardInterrupt
        return real(*args, **kw)

    with monkeypatch.context() as m:
        m.setattr(trainer, "_train_step", crash)
        with pytest.raises(KeyboardInterrupt):
            train_dictionary(batches(), checkpoint_dir=ckpt, checkpoint_every=5, **cfg)
    resumed = train_dictionary(batches(), checkpoint_dir=ckpt, checkpoint_every=5, **cfg)
    for key, value in whole.dictionary.state_dict().items():
        assert torch.equal(resumed.dictionary.state_dict()[key], value), key


def test_checkpoints_from_before_the_optimizer_setting():
    """A checkpoint written before ``optimizer`` existed was trained with Adam: it resumes
    under optimizer='adam' and is refused, by name, under the sign step."""
    old = {k: v for k, v in TrainConfig().__dict__.items() if k not in ("optimizer", "momentum")}
    from sae_nb.util.io import jsonable

    old = jsonable(old)
    check_resumable("ckpt.pt", old, TrainConfig(optimizer="adam"))
    with pytest.raises(TrainingError, match="optimizer='adam' \\(checkpoint\\) vs "
                                            "'signsgd_schedulefree' \\(now\\)"):
        check_resumable("ckpt.pt", old, TrainConfig(optimizer="signsgd_schedulefree"))
