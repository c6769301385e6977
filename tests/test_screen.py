"""The certified bfloat16 screen of TopK's encoder (``sparse_ops.screened_topk``) and the
compiled kernels behind it (``sae_nb/training/kernels.c``), each against float64 written out."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from sae_nb.training import kernels, sparse_ops
from sae_nb.training.objectives import screens
from sae_nb.training.sparse_ops import SCREEN_ROUNDING, screen_slack, screened_topk


def case(name: str, B=512, d=64, width=1024, seed=0):
    """``(x, W_enc (d, width), b_enc, b_dec)`` for the named case."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g)
    W = torch.randn(d, width, generator=g) / d ** 0.5
    b_enc = torch.randn(width, generator=g) * 0.1
    b_dec = torch.randn(d, generator=g) * 0.1
    if name == "near_ties":  # 40 columns within 1e-4 of each other, at every row's top
        W[:, :40] = W[:, :1] + 1e-4 * torch.randn(d, 40, generator=g)
        b_enc[:40] = 8.0
    elif name == "exact_ties":  # 40 equal columns at every row's top: any k of them will do
        W[:, :40] = W[:, :1]
        b_enc[:40] = 8.0
    elif name == "offset":  # a large shared offset, taken off by b_dec (a residual stream's)
        offset = 40 * torch.randn(d, generator=g)
        x, b_dec = x + offset, offset + 0.1 * torch.randn(d, generator=g)
    elif name == "scales":  # columns of norms from 1e-3 to 1e3
        W *= 10 ** (6 * torch.rand(width, generator=g) - 3)
    elif name.startswith("hidden"):
        # 200 (or 40) columns within 0.003 of each other at 0.05, far below the product's
        # scale (|x| |w| = 8): bfloat16's rounding (~0.003) scrambles their order, while its
        # output rounding (~0.0002) does not cover that; the other columns near 0. With 40,
        # all are candidates, more than the screen's first k + 8 recomputed.
        n = 40 if name == "hidden_few" else 200
        q = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
        x = x - (x @ q)[:, None] * q + 0.05 * q
        r = torch.randn(d, n, generator=g)
        r = torch.nn.functional.normalize(r - q[:, None] * (q @ r), dim=0)
        W = 1e-4 * W
        W[:, :n] = q[:, None] + 0.003 * r
        b_enc, b_dec = torch.zeros(width), torch.zeros(d)
    elif name == "narrow":  # fewer columns than the candidates a row takes
        W, b_enc = W[:, :40], b_enc[:40]
    # the trainer's layout: W_enc stored latent-major
    return x, W.t().contiguous().t(), b_enc, b_dec


def reference(x, W, b_enc, b_dec):
    return (x.double() - b_dec.double()) @ W.double() + b_enc.double()


@pytest.mark.parametrize("name", ["spread", "near_ties", "exact_ties", "hidden",
                                  "hidden_few", "offset", "scales", "narrow"])
def test_the_screen_keeps_the_float64_top_k(name, kernel_path, monkeypatch):
    """Every row's kept k against the float64 top k: the values are the columns' own
    pre-activations to float32 precision, no column twice, and none kept below the float64
    k-th value by more than float32's rounding (where values tie, either is the top k). The
    certificate does the work, not the float32 rows it falls back on: most rows are certified
    wherever the values are not tied."""
    monkeypatch.setattr(sparse_ops, "SCREEN_STATS", {"rows": 0, "certified": 0, "dots": 0})
    x, W, b_enc, b_dec = case(name)
    k = 16
    values, idx = screened_topk(x, W, b_enc, b_dec, k)
    pre = reference(x, W, b_enc, b_dec)
    scale = ((x - b_dec).double().norm(dim=1, keepdim=True) * W.double().norm(dim=0)).amax(1)
    torch.testing.assert_close(values.double(), pre.gather(1, idx), rtol=1e-5, atol=1e-6)
    assert (idx.sort(1).values.diff(dim=1) > 0).all()  # k distinct columns
    true_kth = pre.topk(k, 1).values[:, -1]
    kept_kth = pre.gather(1, idx).min(1).values
    assert ((true_kth - kept_kth) <= 1e-6 * scale).all(), float((true_kth - kept_kth).max())
    if name in ("near_ties", "exact_ties"):
        assert (idx < 40).all()
    if name.startswith("hidden"):
        assert (idx < (40 if name == "hidden_few" else 200)).all()
    stats = sparse_ops.SCREEN_STATS
    assert stats["rows"] == len(x)
    if name in ("spread", "hidden_few", "offset", "scales", "narrow"):
        assert stats["certified"] >= 0.9 * len(x), stats
    if name == "narrow":
        assert stats["certified"] == len(x)  # every column recomputed: nothing left out


def test_rows_with_nan_or_inf_rank_as_float32_does(kernel_path):
    """A row holding NaN or inf is never certified: it gets the float32 product, ranked by
    torch's top-k, as the float32 path ranks it; the other rows stay exact."""
    x, W, b_enc, b_dec = case("spread", B=64)
    x[3, 5] = float("nan")
    x[7, 2] = float("inf")
    values, idx = screened_topk(x, W, b_enc, b_dec, 8)
    dense = torch.addmm(b_enc, x - b_dec, W)
    for r in (3, 7):
        want_v, _ = dense[r].topk(8)
        assert torch.equal(values[r].sort().values.isnan(), want_v.sort().values.isnan())
    ok = torch.ones(64, dtype=torch.bool)
    ok[[3, 7]] = False
    pre = reference(x[ok], W, b_enc, b_dec)
    torch.testing.assert_close(values[ok].double(), pre.gather(1, idx[ok]), rtol=1e-5,
                               atol=1e-6)
    assert ((pre.topk(8, 1).values[:, -1] - pre.gather(1, idx[ok]).min(1).values)
            <= 1e-5).all()


@pytest.mark.parametrize("name", ["spread", "offset", "scales"])
def test_the_slack_bounds_the_bfloat16_products_error(name):
    """The bound the certificate rests on, against float64 written out: torch's bfloat16
    product (the one the screen runs, here at the trainer's width and depth) is within each
    row's slack plus the output's rounding of the exact product, for every entry."""
    x, W, b_enc, b_dec = case(name, B=256, d=576, width=2048, seed=3)
    xc = x - b_dec
    xb, Wb = xc.to(torch.bfloat16), W.t().contiguous().to(torch.bfloat16)
    screen = torch.mm(xb, Wb.t()).double()
    exact = xc.double() @ W.double()
    r = Wb.double()
    slack = screen_slack(xc.double().norm(dim=1), (xb.double() - xc.double()).norm(dim=1),
                         xb.double().norm(dim=1), W.double().norm(dim=0).max(),
                         (r - W.t().double()).norm(dim=1).max(), r.norm(dim=1).max(),
                         b_enc.abs().max().double(), xc.shape[1])
    allowed = slack[:, None] + SCREEN_ROUNDING * screen.abs()
    ratio = ((screen - exact).abs() / allowed).max()
    assert ratio < 1, float(ratio)
    # a tenth of it would be broken: the bound is not vacuous
    assert ((screen - exact).abs() > 0.1 * allowed).any()


def test_the_kernels_round_to_bfloat16_as_torch_does():
    """``round_rows`` against torch: the same bfloat16 bits (round to nearest even; NaN stays
    NaN, inf inf), ``x - shift`` exactly, and the three norms to float32 precision."""
    if kernels.library() is None:
        pytest.skip("no C compiler here for the kernels")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(33, 70, generator=g) * 10 ** (4 * torch.rand(33, 70, generator=g) - 2)
    x[0, 0], x[1, 1], x[2, 2] = float("nan"), float("inf"), -float("inf")
    x[3, :] = torch.tensor(1.0 + 2.0 ** -8)  # a tie, rounded to the even neighbour, 1.0
    shift = torch.randn(70, generator=g)
    shifted, rounded, norm, err, rounded_norm = kernels.round_rows(x, shift)
    assert torch.equal(shifted.isnan(), (x - shift).isnan())
    fine = ~(x - shift).isnan()
    assert torch.equal(shifted[fine], (x - shift)[fine])
    want = (x - shift).to(torch.bfloat16)
    assert torch.equal(rounded.view(torch.int16)[fine], want.view(torch.int16)[fine])
    assert rounded[0, 0].isnan()
    _, plain, *_ = kernels.round_rows(x[3:4])
    assert (plain.float() == 1.0).all()
    rows = slice(4, None)  # finite rows
    xs = (x - shift)[rows].double()
    torch.testing.assert_close(norm[rows].double(), xs.norm(dim=1), rtol=1e-5, atol=0)
    torch.testing.assert_close(err[rows].double(), (want[rows].double() - xs).norm(dim=1),
                               rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(rounded_norm[rows].double(), want[rows].double().norm(dim=1),
                               rtol=1e-5, atol=0)
    assert norm[:3].isnan().all() or norm[:3].isinf().any()


def test_auto_screens_only_where_it_pays(monkeypatch):
    """``"auto"``: the screen on a CPU with AMX and the kernels, float32 elsewhere (no AMX,
    no kernels, not float32, not a CPU); the explicit settings as asked."""
    x = torch.zeros(4, 8)
    monkeypatch.setitem(kernels._loaded, "amx", True)
    if kernels.library() is not None:
        assert screens("auto", x)
    assert not screens("auto", x.double())
    assert screens("bfloat16", x) and not screens("float32", x)
    monkeypatch.setitem(kernels._loaded, "lib", None)
    assert not screens("auto", x)
    monkeypatch.setitem(kernels._loaded, "amx", False)
    assert not screens("auto", x) and screens("bfloat16", x)


def test_without_a_compiler_the_screen_runs_on_torch(tmp_path, monkeypatch):
    """No C compiler: a warning that names the fix, no library, and the screen still exact on
    torch's ops; ``SAE_NB_KERNELS=0`` turns the kernels off without a word."""
    monkeypatch.setenv("SAE_NB_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.delitem(kernels._loaded, "lib", raising=False)
    with pytest.warns(UserWarning, match="No C compiler .*apt-get install gcc"):
        assert kernels.library() is None
    x, W, b_enc, b_dec = case("spread", B=64)
    values, idx = screened_topk(x, W, b_enc, b_dec, 8)
    pre = reference(x, W, b_enc, b_dec)
    assert ((pre.topk(8, 1).values[:, -1] - pre.gather(1, idx).min(1).values) <= 1e-5).all()
    monkeypatch.delitem(kernels._loaded, "lib")
    monkeypatch.setenv("SAE_NB_KERNELS", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.library() is None


@pytest.mark.slow
def test_the_library_is_built_once_and_again_when_damaged(tmp_path, monkeypatch):
    """The compiled library is kept in the cache and loaded from there; a damaged file there
    is built again by the next process rather than failing its run."""
    if kernels.library() is None:
        pytest.skip("no C compiler here for the kernels")
    monkeypatch.setenv("SAE_NB_CACHE", str(tmp_path))
    monkeypatch.delitem(kernels._loaded, "lib")
    assert kernels.library() is not None
    built = list((tmp_path / "kernels").glob("*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.delitem(kernels._loaded, "lib")
    assert kernels.library() is not None
    assert built[0].stat().st_mtime_ns == stamp  # loaded, not built again
    built[0].unlink()  # (a new file: the loaded one stays mapped in this process)
    built[0].write_bytes(b"not a shared library")
    probe = ("import warnings; warnings.simplefilter('error'); "
             "from sae_nb.training import kernels; lib = kernels.library(); "
             "print(lib is not None and lib.sae_round_rows is not None)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env={**os.environ, "SAE_NB_CACHE": str(tmp_path)}, timeout=300)
    assert done.stdout.strip() == "True", done.stderr[-2000:]
    assert built[0].stat().st_size > 1000
    assert os.listdir(tmp_path / "kernels") == [built[0].name]  # no temporary file left


def test_an_unwritable_cache_names_the_fix(tmp_path, monkeypatch):
    """A cache folder that cannot be written (here: under a file) leaves the kernels off with
    a warning that names the folder and SAE_NB_CACHE, not an error."""
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler here for the kernels")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("SAE_NB_CACHE", str(blocker))
    monkeypatch.delitem(kernels._loaded, "lib", raising=False)
    with pytest.warns(UserWarning, match="cannot write .*a-file.*set SAE_NB_CACHE"):
        assert kernels.library() is None
