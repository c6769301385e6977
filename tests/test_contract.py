"""One contract for every dictionary class
(``sae_nb.dictionaries.architectures.DICTIONARY_CLASSES``).

``reconstruct(x) == forward(x)`` is the reconstruction; ``encode(x)`` the codes. Each consumer
is checked against those two, computed here by hand: the reconstruction metrics, the spliced
cross-entropy (a plain torch hook, not nnsight), the fit check, the feature statistics and the
latent contexts (brute-force encoding of the whole store), the text box, and the sparse and
folded-bias encode paths. Weights are random and nonzero; d_in is the tiny model's width.

Every other consumer of codes or decoder rows is checked the same way, in the input's units:
a latent's direction is what decoding its one-hot code adds (for a NormalizedTopKSAE,
``decode(f, mu, sigma)``): per-row reconstruction pieces, co-firing counts, decoder
similarity, logit effects, pooled text codes, rule counts, the recovery scores of a true
dictionary of every class on a lab, and token-property absorption planted in every class (a
NormalizedTopKSAE's inputs at sigma ~17).
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from conftest import ArrayStore, make_tokenizer

from sae_nb.activations.store import INDEX_DTYPE, ActivationStore, StoreWriter
from sae_nb.comparison import tasks
from sae_nb.comparison.recovery import input_unit_codes, recovery_intervals, score_recovery
from sae_nb.comparison.synthetic import make_lab
from sae_nb.comparison.uncertainty import per_row_reconstruction
from sae_nb.dictionaries.architectures import (
    DICTIONARY_CLASSES,
    Dictionary,
    NormalizedTopKSAE,
    TopKSAE,
)
from sae_nb.explanations.rules import count_store
from sae_nb.latents.contexts import latent_contexts, text_activations
from sae_nb.latents.families import co_firing, decoder_similarity
from sae_nb.latents.logit_effects import logit_effects
from sae_nb.latents.stats import feature_stats
from sae_nb.texts.codes import pooled_token_codes, sentence_codes
from sae_nb.texts.probing import split_labeled
from sae_nb.training.evaluate import ce_metrics, fit_check, reconstruction_metrics
from sae_nb.training.sparse_ops import topk_sae_forward

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


@pytest.fixture(params=DICTIONARY_CLASSES, ids=lambda c: c.__name__)
def dictionary_class(request) -> type[Dictionary]:
    return request.param


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
    acts = site_acts(llama, text)  # (T, D) after BOS
    names, codes = text_activations(llama, dictionary, text, site=SITE)
    assert len(names) == len(acts) == len(llama.tokenizer(text, add_special_tokens=False)[
        "input_ids"])
    torch.testing.assert_close(codes, dictionary.encode(acts), rtol=1e-5, atol=1e-6)


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
        _, _, values, indices = topk_sae_forward(x, dictionary.W_enc, dictionary.b_enc,
                                                 dictionary.b_dec, dictionary.W_dec,
                                                 dictionary.b_dec, K)
        dense = torch.zeros_like(f).scatter_(1, indices, values)
        torch.testing.assert_close(dense, f, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- consumers in input units
#
# A latent's share of a reconstruction, in the input's units, by brute force from the
# class's own decode of one-hot codes: for NormalizedTopKSAE decode(f, mu, sigma) (decode(f)
# alone is in normalised units), for every other class decode(f).


def decode_in_input_units(dictionary: Dictionary, f: torch.Tensor, x: torch.Tensor):
    if isinstance(dictionary, NormalizedTopKSAE):
        return dictionary.decode(f, *dictionary.input_stats(x))
    return dictionary.decode(f)


PLANT_D, PLANT_BG = 24, 10  # input width; background latents (decoders away from the property)


def planted(cls: type[Dictionary], seed: int = 0):
    """A dictionary of ``cls`` whose codes are planted ones and its inputs: tokens with a
    property carried by a parent latent (0, decoder q0); on ``child`` tokens (30% of them) a
    child latent (1, decoder (q0 + q1) / sqrt 2) fires instead and the parent is silent;
    background latents fire on every kind of token. Decoder rows are orthogonal to the
    all-ones vector and the encoder is their pseudo-inverse, so each latent reads its own
    code back (minus a threshold of 0.3 that keeps the noise silent). A NormalizedTopKSAE
    reads ``x = s * z + m`` with ``z`` the planted sum, ``s`` 10-30 and ``m`` -5-5: its
    normalisation undoes ``s`` and ``m``, and its inputs' sigma is about 17."""
    rng = np.random.default_rng(seed)
    n, F = 4000, 2 + PLANT_BG
    basis = np.linalg.qr(np.column_stack([np.ones(PLANT_D),
                                          rng.standard_normal((PLANT_D, PLANT_D - 1))]))[0]
    q = basis[:, 1:].T  # (D - 1, D) orthonormal rows, each orthogonal to the ones vector
    W = np.zeros((F, PLANT_D))
    W[0], W[1] = q[0], (q[0] + q[1]) / np.sqrt(2)
    bg = rng.standard_normal((PLANT_BG, PLANT_D - 3)) @ q[2:]
    W[2:] = bg / np.linalg.norm(bg, axis=1, keepdims=True)
    has = rng.random(n) < 0.4
    child = has & (rng.random(n) < 0.3)
    codes = np.zeros((n, F))
    codes[has & ~child, 0] = rng.uniform(2, 4, (has & ~child).sum())
    codes[child, 1] = rng.uniform(2, 4, child.sum()) * np.sqrt(2)
    codes[:, 2:] = (rng.random((n, PLANT_BG)) < 0.2) * rng.uniform(1, 2, (n, PLANT_BG))
    noise = rng.normal(size=(n, PLANT_D)) * 0.03
    normalised = cls is NormalizedTopKSAE
    b_dec = np.zeros(PLANT_D) if normalised else rng.normal(size=PLANT_D)
    acts = codes @ W + b_dec + noise - noise.mean(1, keepdims=True)
    if normalised:
        acts = rng.uniform(10, 30, (n, 1)) * acts + rng.uniform(-5, 5, (n, 1))
    kw = {"k": F} if issubclass(cls, TopKSAE) or cls.__name__ == "BatchTopKSAE" else {}
    d = cls(PLANT_D, F, **kw)
    params = dict(d.named_parameters())
    with torch.no_grad():
        for p in params.values():
            p.zero_()
        d.W_dec.copy_(torch.from_numpy(W))
        d.W_enc.copy_(torch.from_numpy(np.linalg.pinv(W)))
        d.b_dec.copy_(torch.from_numpy(b_dec))
        if "threshold" in params:
            d.threshold.fill_(0.3)
        elif "b_gate" in params:
            d.b_gate.fill_(-0.3)
        else:
            d.b_enc.fill_(-0.3)
        if "W_skip" in params:  # a small skip term: the latents account for the rest
            d.W_skip.copy_(torch.from_numpy(rng.normal(size=(PLANT_D, PLANT_D)) * 1e-3))
    return d.double().eval(), acts, has, child


def test_absorption_table_reads_a_planted_absorption(dictionary_class):
    d, acts, has, child = planted(dictionary_class)
    if dictionary_class is NormalizedTopKSAE:
        sigma = (acts - acts.mean(1, keepdims=True)).std(1, ddof=1)
        assert np.median(sigma) > 10  # real residual streams have sigma ~18 (GPT-2 small)
    tok = make_tokenizer()
    rng = np.random.default_rng(1)
    chars = np.where(has, rng.choice(list("ABC"), len(has)), rng.choice(list("xyz7"), len(has)))
    store = ArrayStore(acts, np.array([tok.convert_tokens_to_ids(c) for c in chars]))
    props = {"capitalised": tasks.PROPERTIES["capitalised"]}
    row = tasks.absorption_table(store, d, tok, props, n_tokens=len(acts)).iloc[0]
    # Every row is sampled; the split is split_labeled's. A child token is absorbed whole (its
    # parent silent, the child carrying the probe's projection: fraction 1), every other token
    # with the property not at all (the parent carries it: fraction 0).
    _, test = split_labeled(has, 0.25, 0)
    expected = child[test][has[test]].mean()
    assert 0.25 < expected < 0.4
    assert row["probe_accuracy"] == 1.0 and row["main_latents"] == "0"
    assert row["true_positives"] == has[test].sum()
    assert row["main_silent"] == pytest.approx(expected, abs=1e-12)
    assert row["full_absorption"] == pytest.approx(expected, abs=1e-12)
    assert row["absorption_fraction"] == pytest.approx(expected, abs=1e-12)


def true_dictionary(cls: type[Dictionary], directions: np.ndarray, b_dec: np.ndarray):
    """A dictionary of ``cls`` that reads and writes the lab's orthonormal ``directions``
    exactly: encoder their transpose, no threshold, no skip term."""
    F, D_ = directions.shape
    kw = {"k": F} if issubclass(cls, TopKSAE) or cls.__name__ == "BatchTopKSAE" else {}
    d = cls(D_, F, **kw)
    with torch.no_grad():
        for p in d.parameters():
            p.zero_()
        d.W_dec.copy_(torch.from_numpy(directions))
        d.W_enc.copy_(torch.from_numpy(directions).T)
        d.b_dec.copy_(torch.from_numpy(b_dec))
    return d.double().eval()


def test_score_recovery_of_the_true_dictionary_in_input_units(dictionary_class):
    # Lab features of magnitude ~500 along directions orthogonal to the all-ones vector, on a
    # bias along it: every class reads the codes back exactly (a NormalizedTopKSAE in units
    # of each row's sigma, which its normalisation removes). Scored in the input's units, the
    # true dictionary of every class recovers everything: MCC, F1 and shrinkage 1, no
    # absorption (its parent latents fire whenever their features do).
    lab = make_lab(rows=2000, n_features=12, d=16, superposition=False, mean_l0=3.0,
                   n_parents=2, children_per_parent=2, magnitude_mean=500.0, seed=3)
    rng = np.random.default_rng(3)
    basis = np.linalg.qr(np.column_stack([np.ones(16), rng.standard_normal((16, 15))]))[0]
    directions, bias = basis[:, 1:13].T.copy(), np.full(16, 5.0)
    acts = lab.codes @ directions + bias
    lab = dataclasses.replace(lab, acts=acts, directions=directions, bias=bias)
    normalised = dictionary_class is NormalizedTopKSAE
    d = true_dictionary(dictionary_class, directions, np.zeros(16) if normalised else bias)
    s = score_recovery(d, lab).summary
    for key in ("mcc", "hungarian_cos", "precision", "recall", "f1", "shrinkage"):
        assert s[key] == pytest.approx(1.0, abs=1e-6), key
    assert s["absorption"] == 0.0 and s["fvu"] < 1e-10
    iv = recovery_intervals(d, lab, n_resamples=3).set_index("metric")["estimate"]
    for key in ("mcc", "f1", "shrinkage", "absorption"):
        assert iv[key] == pytest.approx(s[key], abs=1e-9), key


@torch.no_grad()
def test_input_unit_codes_are_the_one_hot_decodes(dictionary):
    # Latent j's share of reconstruct(x) is codes[:, j] * W_dec[j]: by brute force, decoding
    # one-hot codes and the zero code in the input's units, their difference per unit of code.
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(5)) * 7 + 2
    f, codes, base = input_unit_codes(dictionary, x)
    torch.testing.assert_close(f, dictionary.encode(x))
    zero = torch.zeros(len(x), F)
    base_bf = decode_in_input_units(dictionary, zero, x)
    if hasattr(dictionary, "W_skip"):
        base_bf = base_bf + x @ dictionary.W_skip.T
    torch.testing.assert_close(base, base_bf, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(base + codes @ dictionary.W_dec, dictionary.reconstruct(x),
                               rtol=1e-4, atol=1e-4)
    for j in (0, 7, 63):
        one = zero.clone()
        one[:, j] = 1.0
        unit = decode_in_input_units(dictionary, one, x) - decode_in_input_units(dictionary,
                                                                                 zero, x)
        torch.testing.assert_close(codes[:, j:j + 1] * dictionary.W_dec[j],
                                   f[:, j:j + 1] * unit, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_per_row_reconstruction_is_forwards_in_any_dtype(dictionary):
    x = torch.randn(40, D, generator=torch.Generator().manual_seed(2)) * 3 + 1
    for d in (dictionary, build(type(dictionary)).double()):  # a float64 dictionary too
        rows = per_row_reconstruction(d, x.numpy(), batch_size=16)
        x_hat, f = d(x.to(d.W_dec.dtype)).double(), d.encode(x.to(d.W_dec.dtype))
        np.testing.assert_allclose(rows["err"], (x.double() - x_hat).pow(2).sum(1).numpy(),
                                   rtol=1e-5)
        np.testing.assert_allclose(rows["dev"], (x.double() - x.double().mean(0)).pow(2).sum(1),
                                   rtol=1e-9)
        np.testing.assert_array_equal(rows["l0"], (f != 0).sum(1).numpy())


def brute_codes(dictionary: Dictionary, store: ActivationStore) -> torch.Tensor:
    return dictionary.encode(torch.from_numpy(store[:]))  # (N, F)


@torch.no_grad()
def test_co_firing_counts_and_tops_are_the_codes(dictionary, store):
    codes = brute_codes(dictionary, store)
    fired = (codes > 0).long()
    found = co_firing(dictionary, store, chunk_rows=64, n_top=3)
    np.testing.assert_array_equal(found.counts, (fired.T @ fired).numpy())
    np.testing.assert_array_equal(found.fires, fired.sum(0).numpy())
    top = codes.topk(3, dim=0).values.T  # (F, 3)
    np.testing.assert_allclose(found.top_values, top.clamp_min(0).numpy(), rtol=1e-5, atol=1e-6)


def input_space_directions(dictionary: Dictionary, latents) -> torch.Tensor:
    """``(M, D)`` what one unit of each latent adds to the reconstruction of a row, by decoding
    one-hot codes and the zero code (in the input's units; any row of input will do: the
    direction does not depend on it)."""
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(9)) * 3
    zero = torch.zeros(1, F)
    out = []
    for j in latents:
        one = zero.clone()
        one[0, j] = 1.0
        out.append((decode_in_input_units(dictionary, one, x)
                    - decode_in_input_units(dictionary, zero, x))[0])
    return torch.stack(out)


@torch.no_grad()
def test_decoder_similarity_is_the_cosine_of_decoded_directions(dictionary):
    latents = [0, 5, 9, 40]
    u = input_space_directions(dictionary, latents).double()
    u = u / u.norm(dim=1, keepdim=True)
    np.testing.assert_allclose(decoder_similarity(dictionary, latents), (u @ u.T).numpy(),
                               rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_logit_effects_rank_the_decoded_directions_through_the_model(dictionary, llama):
    # By brute force: each latent's decoded direction through the model's own final norm and
    # unembedding. The norm's positive per-direction scale (RMSNorm's 1/rms) changes no ranking
    # and multiplies a latent's values alike.
    hf = llama._module
    u = input_space_directions(dictionary, range(F))  # (F, D)
    logits = hf.model.norm(u) @ hf.get_output_embeddings().weight.detach().T  # (F, V)
    found = logit_effects(llama, dictionary, k=5)
    np.testing.assert_array_equal(found.top_ids, logits.topk(5, dim=1).indices.numpy())
    np.testing.assert_array_equal(found.bottom_ids,
                                  logits.topk(5, dim=1, largest=False).indices.numpy())
    ratio = found.top_values / logits.topk(5, dim=1).values.numpy()  # (F, 5)
    assert (ratio > 0).all()
    np.testing.assert_allclose(ratio, ratio[:, :1].repeat(5, 1), rtol=1e-4)


def site_acts(llama, text: str) -> torch.Tensor:
    """``(T, D)`` the site's activations of ``text`` after BOS, by a plain hook."""
    tok = llama.tokenizer
    ids = torch.tensor([[tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]])
    acts = []
    handle = llama._module.model.layers[1].register_forward_hook(
        lambda m, a, out: acts.append(out[0] if isinstance(out, tuple) else out))
    try:
        llama._module(input_ids=ids)
    finally:
        handle.remove()
    return acts[0][0, 1:]


@torch.no_grad()
def test_text_codes_pool_and_encode_the_sites_activations(dictionary, llama):
    texts = ["the state of the union", "we must trade", "a free and public economy for all"]
    per_text = [site_acts(llama, t) for t in texts]
    pooled = pooled_token_codes(llama, dictionary, texts, site=SITE)
    want = torch.stack([dictionary.encode(a).mean(0) for a in per_text])
    torch.testing.assert_close(pooled.codes, want, rtol=1e-4, atol=1e-5)
    sentences = sentence_codes(llama, dictionary, texts, site=SITE)
    want = dictionary.encode(torch.stack([a.mean(0) for a in per_text]))
    torch.testing.assert_close(sentences.codes, want, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_rule_counts_fire_where_the_codes_are_positive(dictionary, store):
    codes = brute_codes(dictionary, store)
    boundary = 7 * (CTX - 1)  # the first 7 contexts train, the rest are held out
    counts = count_store(store, dictionary, boundary, batch_size=64, progress=False)
    fired = (codes > 0).long()
    np.testing.assert_array_equal(counts.train.fired, fired[:boundary].sum(0).numpy())
    np.testing.assert_array_equal(counts.heldout.fired, fired[boundary:].sum(0).numpy())
    assert counts.train.triple_counts.sum() == fired[:boundary].sum()
