"""Optimisers the trainer offers besides torch's Adam.

:class:`ScheduleFreeSignSGD` is sign descent (each weight moves by ``lr`` against the sign of its
gradient, Bernstein et al. 2018) under schedule-free averaging (Defazio et al. 2024): the
descent runs on a sequence ``z``, the weights returned are a running average ``x`` of ``z``,
and the gradient is taken at ``y``, a point between them. This is the default step of
EleutherAI's sparsify; here it is written from the papers' update rules.

While training, the parameters hold ``y`` (what the forward pass reads); :meth:`averaged`
writes ``x`` into them, the weights to keep.
"""

from __future__ import annotations

import torch


class ScheduleFreeSignSGD(torch.optim.Optimizer):
    """Schedule-free sign descent with interpolation ``momentum`` (beta).

    Per step ``t``, with ``g`` the gradient at ``y_t``, ``lr_max`` the largest learning rate so
    far and ``c_t = lr_max^2 / sum_{s<=t} lr_max_s^2`` (a uniform average under a constant lr,
    warm-up steps weighed less)::

        z_{t+1} = z_t - lr * sign(g)
        x_{t+1} = (1 - c_t) x_t + c_t z_{t+1}
        y_{t+1} = beta x_{t+1} + (1 - beta) z_{t+1}

    starting from ``x_0 = y_0 = z_0``, the parameters' initial values. The state holds ``z``;
    ``x`` is recovered from the parameters as ``(y - (1 - beta) z) / beta`` (so a change made
    to the parameters between steps, e.g. renormalised decoder rows, carries into ``x``).
    """

    def __init__(self, params, lr: float, momentum: float = 0.95):
        if not lr > 0:
            raise ValueError(f"lr={lr!r}; use a positive learning rate.")
        if not 0 < momentum < 1:
            raise ValueError(f"momentum={momentum!r}; use a value in (0, 1), e.g. 0.95.")
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("ScheduleFreeSignSGD takes no closure.")
        for group in self.param_groups:
            lr, beta = group["lr"], group["momentum"]
            group["lr_max"] = lr_max = max(lr, group.get("lr_max", 0.0))
            group["weight_sum"] = group.get("weight_sum", 0.0) + lr_max**2
            c = lr_max**2 / group["weight_sum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "z" not in state:
                    state["z"] = p.detach().clone()
                z = state["z"]
                p.sub_(z, alpha=1 - beta).div_(beta)  # p: x_t
                z.add_(p.grad.sign(), alpha=-lr)  # z_{t+1}
                p.lerp_(z, c)  # x_{t+1}
                p.lerp_(z, 1 - beta)  # y_{t+1}

    @torch.no_grad()
    def averaged(self) -> None:
        """Write the averaged weights ``x`` into the parameters (the end of training)."""
        for group in self.param_groups:
            beta = group["momentum"]
            for p in group["params"]:
                z = self.state[p].get("z")
                if z is not None:
                    p.sub_(z, alpha=1 - beta).div_(beta)
                    del self.state[p]["z"]  # the parameters are no longer y
