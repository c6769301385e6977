"""Feature statistics, latent contexts, logit effects and text activations against brute force.

The store holds small integers and the dictionaries multiples of 1/8 (plus a distinct
multiple of 1/4096 per latent in ``b_enc``), so every pre-activation is exact in float32 whatever
order a matmul sums in: the brute force below (numpy, float64, the whole ``(N, F)`` matrix)
sees the very same numbers, ties between rows included, and within a row no two latents tie,
so TopK's choice is unambiguous.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import make_tokenizer

from sae_nb.activations.models import hf_model
from sae_nb.activations.store import INDEX_DTYPE, ActivationStore, StoreWriter
from sae_nb.dictionaries.architectures import JumpReLUSAE, ReLUSAE, TopKSAE
from sae_nb.latents import contexts
from sae_nb.latents import stats as features
from sae_nb.latents.contexts import latent_contexts, text_activations
from sae_nb.latents.logit_effects import residual_scale
from sae_nb.latents.stats import (
    FeatureStats,
    FeatureStatsError,
    feature_stats,
    logit_effects,
    stats_folder,
)

D, F, K = 8, 24, 4
CTX = 16  # context length; 15 rows per context (BOS is not stored)
SHARD_CONTEXTS = [40, 7, 61, 25, 67]  # uneven shards: 200 contexts, 3000 rows
N_TOP, N_Q, PER_Q, N_BINS = 8, 4, 3, 10


def store_header() -> dict:
    return {"model": "tiny", "site": "resid_out_layer1", "module": "model.layers.1",
            "io": "output", "d": D, "dtype": "float32", "tokenizer": "bytes", "mode": "tokens",
            "pool": None, "ctx_len": CTX, "corpus": "docs", "text_column": None, "seed": 0,
            "prepend_bos": True, "exclude_bos": True, "bos_token_id": 256}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ActivationStore:
    rng = np.random.default_rng(0)
    n_all = sum(SHARD_CONTEXTS) * (CTX - 1)
    acts_all = rng.integers(-3, 4, size=(n_all, D)).astype(np.float32)
    acts_all[[100, 101, 2000], :4] = 3  # a rare latent fires here (latent 1 of relu_dict)
    writer = StoreWriter(tmp_path_factory.mktemp("store"), store_header())
    done = 0
    for n_ctx in SHARD_CONTEXTS:
        lo, n = done * (CTX - 1), n_ctx * (CTX - 1)
        index = np.zeros(n, dtype=INDEX_DTYPE)
        index["context"] = np.repeat(np.arange(done, done + n_ctx), CTX - 1)
        index["offset"] = np.tile(np.arange(1, CTX), n_ctx)
        index["doc"], index["pos"] = index["context"] // 3, index["offset"]
        index["token"] = rng.integers(32, 127, size=n)  # printable bytes
        writer.write_shard(acts_all[lo : lo + n], index, units_end=done + n_ctx)
        done += n_ctx
    writer.finish(n_units_total=done)
    return ActivationStore(writer.path)


def exact_weights(dictionary, seed: int):
    """Multiples of 1/8, and a distinct j/4096 per latent in b_enc (no within-row ties)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        dictionary.W_enc.copy_(torch.randint(-8, 9, (D, F), generator=g) / 8)
        dictionary.W_dec.copy_(torch.randint(-8, 9, (F, D), generator=g) / 8)
        dictionary.b_dec.copy_(torch.randint(-4, 5, (D,), generator=g) / 8)
        dictionary.b_enc.copy_(torch.randint(-16, 5, (F,), generator=g) / 8
                               + torch.arange(F) / 4096)
        dictionary.W_enc[:, 0] = 0  # latent 0 never fires
        dictionary.b_enc[0] = -100
    dictionary.metadata = {"model": "tiny", "site": "resid_out_layer1"}
    return dictionary


@pytest.fixture(scope="module")
def topk_dict():
    return exact_weights(TopKSAE(D, F, k=K), seed=1)


@pytest.fixture(scope="module")
def relu_dict():
    dictionary = exact_weights(ReLUSAE(D, F), seed=2)
    with torch.no_grad():  # latent 1 fires only where x[0:4] are all 3: a handful of rows
        dictionary.W_enc[:, 1] = torch.tensor([1.0] * 4 + [0.0] * (D - 4))
        dictionary.b_enc[1] = -11.5 + 1 / 4096
    return dictionary


@pytest.fixture(scope="module")
def jump_dict():
    dictionary = exact_weights(JumpReLUSAE(D, F), seed=3)
    with torch.no_grad():
        dictionary.threshold.copy_(torch.randint(0, 9, (F,)) / 4)  # 0 .. 2
    return dictionary


@pytest.fixture
def dictionaries(topk_dict, relu_dict, jump_dict) -> dict:
    return {"topk": topk_dict, "relu": relu_dict, "jumprelu": jump_dict}


def dense_codes(store, dictionary) -> np.ndarray:
    """The whole (N, F) code matrix, computed independently in float64."""
    x = store[:].astype(np.float64)
    W = dictionary.W_enc.detach().double().numpy()
    b_dec, b_enc = (t.detach().double().numpy() for t in (dictionary.b_dec, dictionary.b_enc))
    pre = (x - b_dec) @ W + b_enc
    if isinstance(dictionary, TopKSAE):
        keep = np.argsort(-pre, axis=1)[:, : dictionary.k]
        mask = np.zeros_like(pre, dtype=bool)
        np.put_along_axis(mask, keep, True, axis=1)
        pre = np.where(mask, pre, 0.0)
    if isinstance(dictionary, JumpReLUSAE):
        pre = np.where(pre > dictionary.threshold.detach().double().numpy(), pre, 0.0)
    return np.maximum(pre, 0.0)


def in_interval(v: np.ndarray, edges: np.ndarray, q: int) -> np.ndarray:
    """np.histogram's rule: [e_q, e_{q+1}), the last interval closed."""
    last = q == len(edges) - 2
    return (v >= edges[q]) & ((v <= edges[q + 1]) if last else (v < edges[q + 1]))


class SubclassTopK(TopKSAE):
    """Same maths as TopKSAE, but not the class itself: takes the ``sparse_encode`` path."""


@pytest.mark.parametrize("kind", ["topk", "relu", "jumprelu", "topk_subclass"])
def test_stats_equal_brute_force(store, dictionaries, topk_dict, kind):
    dictionary = dictionaries.get(kind)
    if kind == "topk_subclass":
        dictionary = SubclassTopK(D, F, k=K)
        dictionary.load_state_dict(topk_dict.state_dict())
    codes = dense_codes(store, dictionary)  # (N, F)
    s = feature_stats(store, dictionary, n_top=N_TOP, n_quantiles=N_Q, per_quantile=PER_Q,
                      n_bins=N_BINS, batch_size=700, progress=False)
    fired = codes > 0
    count = fired.sum(0)
    assert count[0] == 0 and (count > 0).sum() > F // 2
    if kind == "relu":
        assert 3 <= count[1] < N_TOP  # padding of the top rows is exercised
    assert s.n_tokens == len(store) and s.d_sae == F and s.site == "resid_out_layer1"
    np.testing.assert_allclose(s.density, count / len(store), rtol=1e-12)
    mean = np.where(count > 0, codes.sum(0) / np.maximum(count, 1), 0.0)
    np.testing.assert_allclose(s.mean_act, mean, rtol=1e-9)
    np.testing.assert_array_equal(s.max_act, codes.max(0).astype(np.float32))
    rows = np.arange(len(store))
    for f in range(F):
        order = np.lexsort((rows, -codes[:, f]))[: min(N_TOP, count[f])]  # ties: earlier row
        n = len(order)
        np.testing.assert_array_equal(s.top_rows[f, :n], order)
        np.testing.assert_array_equal(s.top_values[f, :n], codes[order, f].astype(np.float32))
        assert (s.top_rows[f, n:] == -1).all() and (s.top_values[f, n:] == 0).all()
        v = codes[fired[:, f], f]
        if count[f]:
            expected = np.histogram(v, bins=s.hist_edges[f])[0]
            np.testing.assert_array_equal(s.hist_counts[f], expected)
        else:
            assert s.hist_counts[f].sum() == 0
        check_samples(s, f, codes[:, f])
    assert s.hist_counts.sum() == fired.sum()
    # ties among the top rows really happen here, so the tie rule above was exercised
    assert any(len(set(s.top_values[f][s.top_rows[f] >= 0])) < (s.top_rows[f] >= 0).sum()
               for f in range(F))


def check_samples(s: FeatureStats, f: int, col: np.ndarray) -> None:
    """Each sample lies in its interval and is a row where the latent has that value; each
    interval holds min(per_quantile, rows in it) distinct samples."""
    edges = s.quantile_bounds[f]
    np.testing.assert_allclose(edges, np.linspace(0, s.max_act[f], N_Q + 1), rtol=1e-12)
    for q in range(N_Q):
        rows = s.quantile_rows[f, q]
        values = s.quantile_values[f, q]
        real = rows >= 0
        in_q = (col > 0) & in_interval(col, edges, q)
        assert real.sum() == min(PER_Q, in_q.sum())
        assert (rows[~real] == -1).all() and (values[~real] == 0).all()
        assert len(set(rows[real])) == real.sum()
        assert in_q[rows[real]].all()
        np.testing.assert_array_equal(values[real], col[rows[real]].astype(np.float32))


def test_stats_do_not_depend_on_chunking_or_second_pass(store, relu_dict, monkeypatch):
    a = feature_stats(store, relu_dict, batch_size=4096, progress=False)
    monkeypatch.setattr(features, "MAX_KEPT_NONZEROS", 0)  # the second pass re-encodes
    b = feature_stats(store, relu_dict, batch_size=333, progress=False)
    for name in features._ARRAYS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    c = feature_stats(store, relu_dict, batch_size=333, progress=False, seed=5)
    assert not np.array_equal(a.quantile_rows, c.quantile_rows)  # the seed does sample


def test_table_and_save_load_round_trip(store, topk_dict, tmp_path):
    s = feature_stats(store, topk_dict, n_top=N_TOP, progress=False)
    table = s.table()
    assert list(table.columns) == ["latent", "density", "mean_act", "max_act"]
    assert len(table) == F and (table["max_act"].to_numpy() == s.max_act).all()
    s.save(tmp_path)
    back = FeatureStats.load(tmp_path)
    for name in features._ARRAYS + ("row_bounds",):
        np.testing.assert_array_equal(getattr(s, name), getattr(back, name))
    assert (back.model, back.site, back.d_sae, back.n_tokens) == (s.model, s.site, F, len(store))
    assert json.loads((tmp_path / features.SUMMARY_FILE).read_text())["identity"] == s.identity
    assert not list(tmp_path.glob("*.tmp"))


def test_cache_is_reused_and_invalidated(store, topk_dict, tmp_path, monkeypatch):
    calls = []
    real = features._compute
    monkeypatch.setattr(features, "_compute", lambda *a, **k: calls.append(1) or real(*a, **k))
    folder = stats_folder(tmp_path, "topk/x")
    assert folder == tmp_path / "features" / "topk_x"
    first = feature_stats(store, topk_dict, cache=folder, progress=False)
    again = feature_stats(store, topk_dict, cache=folder, progress=False)
    assert len(calls) == 1
    np.testing.assert_array_equal(first.top_rows, again.top_rows)
    feature_stats(store, topk_dict, n_top=3, cache=folder, progress=False)  # other settings
    assert len(calls) == 2
    other = TopKSAE(D, F, k=K)
    other.load_state_dict(topk_dict.state_dict())
    with torch.no_grad():
        other.b_enc[5] += 1.0
    feature_stats(store, other, n_top=3, cache=folder, progress=False)  # other dictionary
    assert len(calls) == 3
    (folder / features.STATS_FILE).write_bytes(b"not a zip file")
    with pytest.raises(FeatureStatsError, match="damaged"):
        FeatureStats.load(folder)
    with pytest.warns(UserWarning, match="Recomputing"):
        feature_stats(store, other, n_top=3, cache=folder, progress=False)
    assert len(calls) == 4
    FeatureStats.load(folder)  # rewritten whole


def test_width_mismatch_names_both_widths(store):
    with pytest.raises(ValueError, match=r"8-wide.*d_in=16"):
        feature_stats(store, TopKSAE(16, F, k=K), progress=False)


@pytest.mark.parametrize("kind", ["topk", "relu", "jumprelu", "topk_stats",
                                  "topk_stats_all_unsure"])
def test_latent_contexts_equal_direct_encoding(store, dictionaries, kind, monkeypatch):
    """Without stats (full encode), with a TopK's row bounds (one encoder column), and with every
    row too close to call (the full-encode fallback), the windows hold the brute-force codes."""
    dictionary = dictionaries[kind.split("_")[0]]
    stats = feature_stats(store, dictionary, progress=False) if "stats" in kind else None
    if kind == "topk_stats":
        monkeypatch.setattr(contexts, "_full_encode", None)  # the fast path must decide alone
    if kind == "topk_stats_all_unsure":
        monkeypatch.setattr(contexts, "BOUNDARY_TOL", 1e9)
    tok = make_tokenizer()
    codes = dense_codes(store, dictionary)
    index = store.index()
    rows = np.array([0, 1, 14, 15, 16, 600, 2999, -1, 1234])  # context edges, store edges, pad
    for latent in range(F):
        out = latent_contexts(store, dictionary, latent, rows, tok, before=5, after=3, stats=stats)
        assert [c["row"] for c in out] == [r for r in rows if r >= 0]
        for c in out:
            r = c["row"]
            ctx = index["context"][r]
            window = [w for w in range(r - 5, r + 4)
                      if 0 <= w < len(store) and index["context"][w] == ctx]
            assert window[c["center"]] == r and len(c["tokens"]) == len(window) == len(c["acts"])
            np.testing.assert_array_equal(c["acts"], codes[window, latent])
            assert c["value"] == codes[r, latent]
            assert c["tokens"] == [tok.decode([t]) for t in index["token"][window]]
            assert c["token_ids"] == index["token"][window].tolist()
        assert [len(c["tokens"]) for c in out[:5]] == [4, 5, 6, 4, 5]  # clipped at context edges


def test_row_bounds_are_the_kth_and_next_pre_activations(store, topk_dict, relu_dict):
    x = store[:].astype(np.float64)
    W, b_dec, b_enc = (t.detach().double().numpy()
                       for t in (topk_dict.W_enc, topk_dict.b_dec, topk_dict.b_enc))
    pre = (x - b_dec) @ W + b_enc
    ordered = -np.sort(-pre, axis=1)
    s = feature_stats(store, topk_dict, progress=False)
    np.testing.assert_array_equal(s.row_bounds, ordered[:, [K - 1, K]].astype(np.float32))
    assert feature_stats(store, relu_dict, progress=False).row_bounds is None


def test_latent_contexts_refuses_stats_of_another_dictionary(store, topk_dict):
    other = TopKSAE(D, F, k=K)
    other.load_state_dict(topk_dict.state_dict())
    stats = feature_stats(store, other, progress=False)
    latent_contexts(store, other, 3, [5], make_tokenizer(), stats=stats)
    with torch.no_grad():
        other.W_enc[0, 3] += 0.5  # in place: the remembered hash must notice
    with pytest.raises(ValueError, match="another dictionary"):
        latent_contexts(store, other, 3, [5], make_tokenizer(), stats=stats)


def test_latent_contexts_rejects_bad_latent(store, topk_dict):
    with pytest.raises(IndexError, match="latent=24"):
        latent_contexts(store, topk_dict, F, [0], make_tokenizer())


def final_norm_and_unembed(model, family: str):
    """Written out per family, independently of sae_nb's lookup."""
    hf = hf_model(model)
    if family == "llama":
        return hf.model.norm, hf.lm_head.weight
    if family == "gpt2":
        return hf.transformer.ln_f, hf.lm_head.weight
    return hf.gpt_neox.final_layer_norm, hf.lm_head.weight  # transformers 5: lm_head


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_logit_effects_equal_direct_product(models, family, tmp_path):
    model = models[family]
    norm, unembed = final_norm_and_unembed(model, family)
    saved = norm.weight.detach().clone()  # the models are shared by the whole session
    try:
        with torch.no_grad():  # a non-trivial gain, so that multiplying by it matters
            norm.weight.copy_(torch.linspace(0.5, 2.0, norm.weight.numel()))
        check_logit_effects(model, norm, unembed, tmp_path)
    finally:
        with torch.no_grad():
            norm.weight.copy_(saved)


def check_logit_effects(model, norm, unembed, tmp_path) -> None:
    layer_norm = isinstance(norm, torch.nn.LayerNorm)
    dictionary = TopKSAE(32, 40, k=4)
    effects = logit_effects(model, dictionary, k=5, batch=16)
    W = dictionary.W_dec.detach().double()  # (F, D)
    if layer_norm:  # LayerNorm centres its input
        W = W - W.mean(1, keepdim=True)
    full = ((W * norm.weight.detach().double()) @ unembed.detach().double().T).numpy()  # (F, V)
    top = np.argsort(-full, axis=1)[:, :5]
    bottom = np.argsort(full, axis=1)[:, :5]
    np.testing.assert_array_equal(effects.top_ids, top)
    np.testing.assert_array_equal(effects.bottom_ids, bottom)
    close = dict(rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(effects.top_values, np.take_along_axis(full, top, 1), **close)
    np.testing.assert_allclose(effects.bottom_values, np.take_along_axis(full, bottom, 1), **close)
    table = effects.tokens(model.tokenizer, 3, activation=0.5)
    assert list(table.columns) == ["promoted", "promoted_id", "promoted_value", "promoted_piece",
                                   "suppressed", "suppressed_id", "suppressed_value",
                                   "suppressed_piece"]
    assert sorted(table["promoted_id"]) == sorted(top[3])  # the same tokens, words first
    assert not np.diff(table["promoted_piece"].astype(int)).tolist().count(-1)
    np.testing.assert_allclose(table["promoted_value"],
                               full[3, table["promoted_id"]] * 0.5 / effects.scale, rtol=1e-4)
    assert effects.scale == pytest.approx(residual_scale(model))
    for label, i in zip(table["promoted"], table["promoted_id"]):
        text = model.tokenizer.decode([int(i)])
        if "\ufffd" in text:  # a byte of a longer character (byte tokens): shown as its byte
            assert re.fullmatch(r"\\x[89a-f][0-9a-f]", label), label
        else:
            assert label == text
    first = logit_effects(model, dictionary, k=5, cache=tmp_path)
    np.testing.assert_array_equal(first.top_ids, top)
    with torch.no_grad():
        norm.weight.fill_(1.0)  # the model changed, but its name did not: the cache answers
    cached = logit_effects(model, dictionary, k=5, cache=tmp_path)
    np.testing.assert_array_equal(cached.top_ids, top)
    other = TopKSAE(32, 40, k=4)  # another decoder: recomputed
    again = logit_effects(model, other, k=5, cache=tmp_path)
    assert not np.array_equal(again.top_ids, top)


@pytest.mark.parametrize("damage", ["truncate", "random", "empty"])
def test_a_damaged_logit_effects_cache_is_recomputed_with_a_warning(llama, tmp_path, caplog,
                                                                    damage):
    dictionary = TopKSAE(32, 40, k=4)
    first = logit_effects(llama, dictionary, k=5, cache=tmp_path)
    path = tmp_path / "logit_effects.npz"
    data = path.read_bytes()
    damaged = {"truncate": data[: len(data) // 2],
               "random": np.random.default_rng(0).bytes(len(data)), "empty": b""}[damage]
    path.write_bytes(damaged)
    with caplog.at_level("WARNING"):
        again = logit_effects(llama, dictionary, k=5, cache=tmp_path)
    np.testing.assert_array_equal(again.top_ids, first.top_ids)
    np.testing.assert_array_equal(again.bottom_values, first.bottom_values)
    assert any("logit_effects.npz" in r.getMessage() and "recomput" in r.getMessage()
               for r in caplog.records if r.levelname == "WARNING")
    assert path.read_bytes() != damaged  # saved again


def test_logit_effects_width_mismatch(llama):
    with pytest.raises(ValueError, match=r"d_in=16.*d_model=32"):
        logit_effects(llama, TopKSAE(16, 40, k=4))


def test_text_activations_equal_direct_encoding(llama):
    dictionary = TopKSAE(32, 40, k=4)
    text = "The state of the union is strong."
    tokens, codes = text_activations(llama, dictionary, text, site="resid_out_layer1")
    tok = llama.tokenizer
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        hidden = hf_model(llama)(torch.tensor([ids]), output_hidden_states=True).hidden_states
    acts = hidden[2][0, 1:]  # output of layer 1, BOS dropped
    assert tokens == [tok.decode([i]) for i in ids[1:]] and "".join(tokens) == text
    assert codes.shape == (len(ids) - 1, 40)
    torch.testing.assert_close(codes, dictionary.encode(acts), rtol=1e-4, atol=1e-5)


def test_binning_matches_numpy_histogram_at_the_edges():
    """Values on and next to every edge (where ``v / max * n`` rounds either way) land in the
    bin np.histogram gives them."""
    rng = np.random.default_rng(3)
    max_act = (rng.random(50) * 7).astype(np.float32)
    edges = features._edges(max_act, 10)
    for f in range(50):
        e = edges[f]
        v = np.concatenate([e[1:], np.nextafter(e[1:], 0), np.nextafter(e[1:-1], np.inf)])
        v = v[(v > 0) & (v <= e[-1])]
        got = np.bincount(features._bin(np.full(len(v), f), v, edges), minlength=10)
        np.testing.assert_array_equal(got, np.histogram(v, bins=e)[0])


def test_stats_and_contexts_on_an_extracted_store(llama, corpus_dir, tmp_path):
    """The real path: float16 activations of a tiny model, a random TopK; compared with a dense
    ``encode`` of the whole store (up to float rounding, so near-ties may swap: values are
    compared in order, rows by their own values)."""
    import sae_nb

    stores = sae_nb.extract_activations(llama, tmp_path, sites=["resid_out_layer1"],
                                        corpus=str(corpus_dir), n_tokens=1500, ctx_len=32,
                                        batch_size=8, shard_rows=200, progress=False)
    store = stores["resid_out_layer1"]
    dictionary = TopKSAE(32, 64, k=6)
    with torch.no_grad():
        dictionary.b_enc.normal_(0, 0.5)
        dictionary.b_dec.normal_(0, 0.5)
    codes = dictionary.encode(torch.from_numpy(store[:])).detach().numpy()  # (N, F)
    s = feature_stats(store, dictionary, n_top=10, batch_size=256, progress=False)
    count = (codes > 0).sum(0)
    np.testing.assert_allclose(s.density * len(store), count, atol=2)  # rounding at relu(0)
    np.testing.assert_allclose(s.max_act, codes.max(0), rtol=1e-5, atol=1e-6)
    for f in range(64):
        n = min(10, count[f])
        close = dict(rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s.top_values[f, :n], -np.sort(-codes[:, f])[:n], **close)
        np.testing.assert_allclose(codes[s.top_rows[f, :n], f], s.top_values[f, :n], **close)
    rows = np.unique(np.concatenate([s.top_rows[:, :3].reshape(-1), [0, len(store) - 1]]))
    rows = rows[rows >= 0]
    for latent in (0, 7, 63):
        out = latent_contexts(store, dictionary, latent, rows, llama.tokenizer, stats=s)
        for c in out:
            lo = c["row"] - c["center"]
            np.testing.assert_allclose(c["acts"], codes[lo : lo + len(c["acts"]), latent],
                                       rtol=1e-5, atol=1e-6)
            assert "".join(c["tokens"]) == llama.tokenizer.decode(c["token_ids"])


def test_interval_samples_are_uniform():
    """The hashed keys pick each of 10 candidate rows about equally often over 3000 seeds
    (chi-square, 9 degrees of freedom, p ~ 1e-6 at 45), and they lie in [0, 1)."""
    rows = np.arange(1000, 1010)
    picks = np.zeros(10)
    for seed in range(3000):
        keys = features._sample_keys(rows, np.full(10, 7), seed)
        assert (keys >= 0).all() and (keys < 1).all()
        picks[np.argmin(keys)] += 1
    expected = 3000 / 10
    assert ((picks - expected) ** 2 / expected).sum() < 45
    keys = features._sample_keys(np.arange(100_000), np.full(100_000, 3), 0)
    assert abs(keys.mean() - 0.5) < 0.005 and len(np.unique(keys)) == 100_000
