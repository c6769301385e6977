"""The training step's row top-k (``sparse_ops.row_topk``) against a brute-force ranking: every
row sorted whole, on data that stresses its bound (ties at the cut, masked columns, one group
holding a row's whole top k, NaN, widths that do not split into groups)."""

from __future__ import annotations

import pytest
import torch

from sae_nb.training.sparse_ops import row_topk

# Each test once with the compiled kernels and once with torch's ops (conftest's kernel_path).
pytestmark = pytest.mark.usefixtures("kernel_path")


def brute_force(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's k largest values, descending: the whole row sorted (NaN first, as torch's top-k
    ranks it largest)."""
    key = torch.where(pre.isnan(), torch.full_like(pre, float("inf")), pre)
    order = key.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return pre.gather(1, order)


def check(pre: torch.Tensor, k: int) -> None:
    values, idx = row_topk(pre.clone(), k)
    assert values.shape == idx.shape == (pre.shape[0], k)
    # Each index points at its value, no column twice in a row, and the values are the top k.
    torch.testing.assert_close(pre.gather(1, idx), values, equal_nan=True)
    assert (idx.sort(1).values.diff(dim=1) > 0).all()
    torch.testing.assert_close(values.sort(1, descending=True).values, brute_force(pre, k),
                               equal_nan=True)


def spiky(B: int, F: int, seed: int) -> torch.Tensor:
    """SAE-like pre-activations: mostly noise, a few large entries per row."""
    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(B, F, generator=g)
    hot = torch.rand(B, F, generator=g) < 0.01
    return pre + hot * torch.rand(B, F, generator=g) * 20


@pytest.mark.parametrize("F,k", [(4608, 32), (1536, 16), (512, 4), (4096, 64)])
def test_equals_a_whole_sort_on_real_shapes(F, k, monkeypatch, kernel_path):
    widths = []  # the widths torch's top-k ranks: the fast path never ranks a whole row
    real = torch.Tensor.topk

    def spy(self, *args, **kwargs):
        widths.append(self.shape[-1])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "topk", spy)
    check(spiky(257, F, seed=F + k), k)
    check(torch.randn(131, F, generator=torch.Generator().manual_seed(k)), k)
    if kernel_path == "kernels":
        assert not widths  # every row ranked in C
    else:
        assert widths and max(widths) < F // 4


def test_ties_at_the_cut_and_a_top_k_inside_one_group():
    F, k = 1024, 8
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(64, F, generator=g).round()  # many equal values everywhere
    check(pre, k)
    # Row 0's top k all in one strided group (columns c, c + F/8, ...): the group maxima bound
    # must still admit every one of them.
    pre = torch.randn(64, F, generator=g)
    pre[0, 5 + (F // 8) * torch.arange(8)] = 50.0 + torch.arange(8.0)
    check(pre, k)
    # Rows whose whole top is tied with far more entries than k fall back, still exact.
    pre[1] = 1.0
    check(pre, k)


def test_masked_columns_nan_and_odd_widths():
    F, k = 2048, 16
    pre = spiky(96, F, seed=3)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[::3] = True
    check(pre.masked_fill(~dead, float("-inf")), k)  # AuxK's ranking among dead latents
    few = torch.zeros(F, dtype=torch.bool)
    few[:20] = True  # fewer candidates than groups: -inf at the bound
    check(pre.masked_fill(~few, float("-inf")), k)
    with_nan = pre.clone()
    with_nan[7, 100] = float("nan")
    check(with_nan, k)
    check(spiky(33, F + 4, seed=4), k)  # not a multiple of 8: torch's own top-k
