"""One contract for every dictionary class
(``sae_nb.dictionaries.architectures.DICTIONARY_CLASSES``).

``reconstruct(x) == forward(x)`` is the reconstruction; ``encode(x)`` the codes. Each consumer
is checked against those two, computed here by hand: the reconstruction metrics, the spliced
cross-entropy (a plain torch hook, not nnsight), the fit check, the feature statistics and the
latent contexts (brute-force encoding of the whole store), the text box, and the sparse and
folded-bias encode paths. Weights are random and nonzero; d_in is the tiny model's width.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from sae_nb.activations.store import INDEX_DTYPE, ActivationStore, StoreWriter
from sae_nb.dictionaries.architectures import DICTIONARY_CLASSES, Dictionary, TopKSAE
from sae_nb.latents.contexts import latent_contexts, text_activations
from sae_nb.latents.stats import feature_stats
from sae_nb.training.evaluate import ce_metrics, fit_check, reconstruction_metrics
from sae_nb.training.sparse_ops import topk_encode

D, F, K = 32, 64, 4  # D: the tiny llama's d_model
SITE = "resid_out_layer1"
CTX, N_CTX = 16, 20  # store: 20 contexts of 15 stored rows (BOS not stored)


def build(cls: type[Dictionary], seed: int = 0) -> Dictionary:
    kw = {"k": K} if hasattr(cls, "sparse_encode") or cls.__name__ == "BatchTopKSAE" else {}
    d = cls(D, F, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        if hasattr(d, "threshold"):
            d.threshold.copy_(torch.rand(F, generator=g) * 0.3 + 0.05)
    d.metadata = {"model": "tiny", "site": SITE}
    return d.eval()


@pytest.fixture(params=DICTIONARY_CLASSES, ids=lambda c: c.__name__)
def dictionary(request) -> Dictionary:
    return build(request.param)


def test_the_registry_holds_every_dictionary_class():
    import sae_nb.dictionaries.architectures as module

    classes = {c for c in vars(module).values()
               if isinstance(c, type) and issubclass(c, Dictionary) and c is not Dictionary}
    assert classes == set(DICTIONARY_CLASSES)


def hand_fvu(x, x_hat):
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


@torch.no_grad()
def test_reconstruct_is_forward_and_metrics_use_it(dictionary):
    x = torch.randn(200, D) * 2 + 0.5
    x_hat, f = dictionary(x), dictionary.encode(x)
    assert (f != 0).any() and (f == 0).any()
    torch.testing.assert_close(dictionary.reconstruct(x), x_hat)
    f2, x_hat2 = dictionary.encode_and_reconstruct(x)
    torch.testing.assert_close(f2, f)
    torch.testing.assert_close(x_hat2, x_hat)
    row, density = reconstruction_metrics(dictionary, x, batch_size=64)
    assert row["mse"] == pytest.approx(float((x - x_hat).pow(2).sum(1).mean()), rel=1e-5)
    assert row["fvu"] == pytest.approx(hand_fvu(x, x_hat), rel=1e-5)
    assert row["l0"] == pytest.approx(float((f != 0).sum(1).float().mean()), rel=1e-6)
    np.testing.assert_allclose(density, (f != 0).float().mean(0).numpy(), rtol=1e-6)


@torch.no_grad()
def test_the_splice_puts_forward_in_the_model(dictionary, llama):
    bos = llama.tokenizer.bos_token_id
    tokens = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    tokens[:, 0] = bos
    tokens[1, 6] = bos  # a document separator inside a context
    hf = llama._module
    handle = hf.model.layers[1].register_forward_hook(
        lambda m, a, out: (dictionary(out[0]),) + tuple(out[1:]) if isinstance(out, tuple)
        else dictionary(out))
    try:
        logits = hf(input_ids=tokens).logits
    finally:
        handle.remove()
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    expected = float(-logp.gather(-1, tokens[:, 1:, None]).mean())
    m = ce_metrics(dictionary, llama, SITE, tokens, bos_token_id=None)
    assert m["ce_spliced"] == pytest.approx(expected, rel=1e-5)


@torch.no_grad()
def test_fit_check_fvu_is_forwards(dictionary, llama, corpus_dir):
    seen = []
    encode = dictionary.encode
    dictionary.encode = lambda x: (seen.append(x.clone()), encode(x))[1]  # what it was fed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: FVU > 1 warns
        row = fit_check(dictionary, llama, corpus=str(corpus_dir), n_tokens=128, ctx_len=32)
    del dictionary.encode
    (x,) = seen
    assert row["tokens"].item() == len(x) > 0
    assert row["fvu"].item() == pytest.approx(hand_fvu(x, dictionary(x)), rel=1e-5)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ActivationStore:
    rng = np.random.default_rng(0)
    n = N_CTX * (CTX - 1)
    header = {"model": "tiny", "site": SITE, "module": "model.layers.1", "io": "output", "d": D,
              "dtype": "float32", "tokenizer": "bytes", "mode": "tokens", "pool": None,
              "ctx_len": CTX, "corpus": "docs", "text_column": None, "seed": 0,
              "prepend_bos": True, "exclude_bos": True, "bos_token_id": 256}
    writer = StoreWriter(tmp_path_factory.mktemp("contract_store"), header)
    index = np.zeros(n, dtype=INDEX_DTYPE)
    index["context"] = np.repeat(np.arange(N_CTX), CTX - 1)
    index["offset"] = np.tile(np.arange(1, CTX), N_CTX)
    index["doc"], index["pos"] = index["context"], index["offset"]
    index["token"] = rng.integers(32, 127, size=n)
    writer.write_shard((rng.standard_normal((n, D)) * 2).astype(np.float32), index,
                       units_end=N_CTX)
    writer.finish(n_units_total=N_CTX)
    return ActivationStore(writer.path)


@torch.no_grad()
def test_feature_statistics_and_latent_contexts_match_brute_force(dictionary, store, llama):
    codes = dictionary.encode(torch.from_numpy(store[:]))  # (N, F): the reference
    stats = feature_stats(store, dictionary, n_top=5, n_quantiles=2, per_quantile=2, n_bins=4,
                          batch_size=128, progress=False)
    fires = codes > 0
    np.testing.assert_allclose(stats.density, fires.double().mean(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(stats.max_act, codes.max(0).values.numpy(), rtol=1e-5)
    mean = (codes.sum(0) / fires.sum(0).clamp_min(1)).numpy()
    np.testing.assert_allclose(stats.mean_act, mean, rtol=1e-5, atol=1e-6)
    top = codes.topk(5, dim=0).values.T.numpy()  # (F, 5)
    np.testing.assert_allclose(stats.top_values, np.where(top > 0, top, 0), rtol=1e-5)
    latent = int(fires.sum(0).argmax())
    rows = stats.top_rows[latent][stats.top_rows[latent] >= 0]
    for with_stats in (None, stats):  # with stats a plain TopK reads one encoder column
        for ctx in latent_contexts(store, dictionary, latent, rows, llama.tokenizer,
                                   before=4, after=2, stats=with_stats):
            window = ctx["row"] - ctx["center"] + np.arange(len(ctx["acts"]))
            np.testing.assert_allclose(ctx["acts"], codes[window, latent].numpy(), rtol=1e-5,
                                       atol=1e-6)


@torch.no_grad()
def test_text_activations_are_the_codes_of_the_sites_activations(dictionary, llama):
    text = "the state of the union"
    tok = llama.tokenizer
    ids = torch.tensor([[tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]])
    acts = []
    handle = llama._module.model.layers[1].register_forward_hook(
        lambda m, a, out: acts.append(out[0] if isinstance(out, tuple) else out))
    try:
        llama._module(input_ids=ids)
    finally:
        handle.remove()
    names, codes = text_activations(llama, dictionary, text, site=SITE)
    assert len(names) == ids.shape[1] - 1
    torch.testing.assert_close(codes, dictionary.encode(acts[0][0, 1:]), rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_sparse_and_folded_encode_paths_equal_encode(dictionary):
    x = torch.randn(50, D) * 2
    f = dictionary.encode(x)
    if hasattr(dictionary, "sparse_encode"):
        torch.testing.assert_close(dictionary.sparse_encode(x).dense(F), f)
    folded = dictionary.folded_encoder()
    if folded is not None:
        W, b = folded
        torch.testing.assert_close(x @ W + b, dictionary.pre_acts(x), rtol=1e-5, atol=1e-5)
        w7, b7 = dictionary.folded_encoder(7)
        torch.testing.assert_close(x @ w7 + b7, dictionary.pre_acts(x)[:, 7], rtol=1e-5,
                                   atol=1e-5)
    if type(dictionary) is TopKSAE:  # the training op
        values, indices, _, _ = topk_encode(x, dictionary.W_enc, dictionary.b_enc,
                                            dictionary.b_dec, K)
        dense = torch.zeros_like(f).scatter_(1, indices, values)
        torch.testing.assert_close(dense, f, rtol=1e-5, atol=1e-6)
