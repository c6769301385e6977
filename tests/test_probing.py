"""Probing: planted labels are found, shuffled ones are not, bad inputs raise clear errors."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pandas as pd
import pytest
import torch

from sae_nb.activations.corpora import CorpusError
from sae_nb.dictionaries.architectures import TopKSAE
from sae_nb.texts import probing
from sae_nb.views.plotting import layer_sweep_figure, probe_accuracy_figure


def planted(n=800, d=16, f=64, seed=0):
    """Raw features with labels along a known direction, and codes with latent 7 planted."""
    rng = np.random.default_rng(seed)
    raw = rng.normal(size=(n, d))
    labels = np.where(raw @ np.eye(d)[3] > 0, "pos", "neg")
    codes = np.abs(rng.normal(size=(n, f))) * (rng.random((n, f)) < 0.1)
    codes[:, 7] = (labels == "pos") * (1.0 + rng.random(n))
    return raw, codes, labels


def test_planted_direction_is_found_and_shuffled_labels_are_not():
    raw, codes, labels = planted()
    train, test = probing.split_labeled(labels, 0.25, seed=0)
    table, probes = probing.run_probes(raw, codes, labels, train, test, k_values=(1, 2, 5))
    acc = table.set_index("probe")["accuracy"]
    assert acc["raw"] >= 0.95 and acc["all latents"] >= 0.95 and acc["top 1 latents"] >= 0.95
    assert list(probes["top 1 latents"].columns) == [7]
    assert table["majority_baseline"].between(0.4, 0.6).all()

    shuffled = np.random.default_rng(1).permutation(labels)
    rnd, _ = probing.run_probes(raw, codes, shuffled, train, test, k_values=(1,))
    assert rnd.set_index("probe").loc["raw", "accuracy"] < 0.7

    fig = probe_accuracy_figure(table)
    assert list(fig.data[0].x) == [1, 2, 5]
    assert len(fig.layout.shapes) == 3


def test_multiclass_auc_and_class_latents():
    rng = np.random.default_rng(0)
    labels = np.array(["a", "b", "c"] * 60)
    codes = np.abs(rng.normal(size=(180, 20))) * 0.1
    for i, c in enumerate("abc"):
        codes[labels == c, i] += 2.0
    train, test = probing.split_labeled(labels, 0.3, seed=0)
    table, probes = probing.run_probes(codes, codes, labels, train, test, k_values=(3,))
    assert (table["roc_auc"] > 0.95).all()
    assert set(probes["top 3 latents"].columns) == {0, 1, 2}
    texts = [f"t{i}" for i in range(len(test))]
    cl = probing.class_latents(probes["top 3 latents"], codes[train], labels[train], codes[test],
                               labels[test], texts, top=1)
    assert dict(zip(cl["class"], cl["latent"])) == {"a": 0, "b": 1, "c": 2}
    assert (cl["weight"] > 0).all() and (cl["mean_difference"] > 1.5).all()
    assert cl["firing_rate"].between(0, 1).all() and all(len(t) == 3 for t in cl["top_texts"])
    # The in-class firing rate is read on the held-out rows of that class.
    a_test = codes[test][labels[test] == "a", 0]
    assert cl.set_index("class").loc["a", "firing_rate_in_class"] == pytest.approx(
        (a_test > 0).mean())


def test_binary_probe_weights_point_to_their_class_and_standardized_ranking():
    raw, codes, labels = planted()
    # Latent 9: large and dense, its class means differ by ~6 against a spread of 40 (noise);
    # latent 7 (planted) differs by ~1.5 against a spread of ~0.9.
    rng = np.random.default_rng(3)
    codes[:, 9] = 200 + rng.normal(scale=40, size=len(codes)) + 6 * (labels == "neg")
    assert probing.top_latents(codes, labels, 1, standardize=False)[0] == 9
    assert probing.top_latents(codes, labels, 1)[0] == 7
    train, test = probing.split_labeled(labels, 0.25, seed=0)
    _, probes = probing.run_probes(raw, codes, labels, train, test, k_values=(2,))
    weights = probing.probe_weights(probes["top 2 latents"])
    assert list(weights.columns) == ["neg", "pos"]
    np.testing.assert_allclose(weights["neg"], -weights["pos"])
    assert weights.loc[7, "pos"] > 0  # latent 7 fires on "pos" rows only
    texts = [f"t{i}" for i in test]
    cl = probing.class_latents(probes["top 2 latents"], codes[train], labels[train], codes[test],
                               labels[test], texts, top=2)
    pos = cl[cl["class"] == "pos"].iloc[0]
    assert pos["latent"] == 7 and pos["firing_rate_in_class"] == 1.0
    best = test[np.argmax(codes[test, 7])]
    assert pos["top_texts"][0] == f"t{best}"


def test_bad_labeled_inputs(tmp_path):
    df = pd.DataFrame({"sentence": ["x", "y", "z"], "label": ["a", "a", "a"]})
    with pytest.raises(probing.LabelError, match=r"holds 1 class\(es\) \(\{'a': 3\} rows"):
        probing.check_labeled(df, "sentence", "label")
    with pytest.raises(probing.LabelError, match="No label column 'sentiment'"):
        probing.check_labeled(df, "sentence", "sentiment")
    csv = tmp_path / "l.csv"
    pd.DataFrame({"text": ["x", "y", "z"], "label": ["a", None, "b"]}).to_csv(csv, index=False)
    with pytest.raises(CorpusError, match=r"1 row\(s\) have no label at file line\(s\) 3\."):
        probing.load_labeled(csv)
    with pytest.raises(probing.LabelError, match="Too few rows per class"):
        probing.split_labeled(["a"] * 10 + ["b"] * 2)
    with pytest.raises(CorpusError, match="movie_reviews"):
        probing.load_labeled(tmp_path / "absent.csv")
    ok = tmp_path / "ok.csv"
    pd.DataFrame({"s": list("abcdef"), "y": [1, 2, 1, 2, 1, 2]}).to_csv(ok, index=False)
    out = probing.load_labeled(ok, text_column="s", label_column="y")
    assert list(out.columns) == ["text", "label"] and set(out["label"]) == {"1", "2"}
    assert probing.subsample(out, 4, seed=0)["label"].value_counts().tolist() == [2, 2]


def _tar_with(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_vader_parser_on_a_fake_sdist(tmp_path):
    truth = "1\t2.5\tA fine film \xe9\n2\t-1.2\tDull\n3\t0.0\tneutral\n4\t0.3\tOk\n"
    inner = _tar_with({probing.MOVIE_FILE: truth.encode("latin-1")})
    (tmp_path / probing.VADER_SDIST).write_bytes(_tar_with({probing.VADER_INNER: inner}))
    df = probing.parse_vader(tmp_path / probing.VADER_SDIST)
    assert df["text"].tolist() == ["A fine film \xe9", "Dull", "Ok"]
    assert df["label"].tolist() == ["positive", "negative", "positive"]
    loaded = probing.load_labeled("movie_reviews", cache_dir=tmp_path)  # no download: cached
    assert loaded["label"].tolist() == df["label"].tolist()
    assert (tmp_path / "movie_reviews.csv").exists()


def test_vader_cache_is_never_left_half_written(tmp_path, monkeypatch):
    """A kill while the parsed snippets are cached must not leave a partial movie_reviews.csv,
    which the next call would read as the whole data set. The 'kill' is a text whose str()
    raises in pandas' second 33,333-row chunk, after the first chunk reached the file."""
    class Killed(Exception):
        pass

    class Boom:
        def __str__(self):
            raise Killed

    n = 40_000
    rows = pd.DataFrame({"text": [f"snippet {i}" for i in range(n)], "rating": 1.0,
                         "label": ["positive", "negative"] * (n // 2)})
    cut = rows.astype({"text": object})
    cut.loc[n - 1, "text"] = Boom()
    monkeypatch.setattr(probing, "fetch_vader", lambda cache_dir: tmp_path / probing.VADER_SDIST)
    monkeypatch.setattr(probing, "parse_vader", lambda sdist: cut)
    with pytest.raises(Killed):
        probing.load_labeled("movie_reviews", cache_dir=tmp_path)
    assert not (tmp_path / "movie_reviews.csv").exists()
    monkeypatch.setattr(probing, "parse_vader", lambda sdist: rows)
    assert len(probing.load_labeled("movie_reviews", cache_dir=tmp_path)) == n
    assert not list(tmp_path.glob("*.tmp"))


def test_features_on_the_tiny_model_are_cached(llama, tmp_path):
    d = llama.config.hidden_size if hasattr(llama, "config") else 32
    dictionary = TopKSAE(d, 64, k=4)
    torch.nn.init.normal_(dictionary.W_enc)
    dictionary.metadata = {"site": "resid_out_layer1"}
    texts = ["good film", "bad film", "a fine day", "dull and slow"]
    raw, codes = probing.probe_features(llama, dictionary, texts, run_dir=tmp_path)
    (cache,) = (tmp_path / "probing").glob("features_*.npz")
    assert raw.shape == (4, d) and codes.shape == (4, 64)
    # Per-token codes (k = 4 each) pooled over a sentence: at most 4 per byte token are active.
    n_tokens = [len(llama.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert (((codes > 0).sum(1) <= 4 * np.array(n_tokens)) & ((codes > 0).sum(1) >= 4)).all()
    stamp = cache.stat().st_mtime_ns
    raw2, codes2 = probing.probe_features(llama, dictionary, texts, cache=cache)  # from cache
    assert cache.stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(raw, raw2)
    np.testing.assert_array_equal(codes, codes2)
    labels = ["p", "n"] * 8
    sweep_cache = tmp_path / "sweep.npz"
    sweep = probing.layer_sweep(llama, texts * 4, labels, np.arange(8), np.arange(8, 16),
                                ["resid_out_layer2", "resid_out_layer0"], cache=sweep_cache)
    stamp = sweep_cache.stat().st_mtime_ns
    again = probing.layer_sweep(llama, texts * 4, labels, np.arange(8), np.arange(8, 16),
                                ["resid_out_layer2", "resid_out_layer0"], cache=sweep_cache)
    pd.testing.assert_frame_equal(sweep, again)
    assert sweep_cache.stat().st_mtime_ns == stamp  # read from the cache, not rewritten
    assert sweep["site"].tolist() == ["resid_out_layer2", "resid_out_layer0"]
    every = probing.layer_sweep(llama, texts * 4, labels, np.arange(8), np.arange(8, 16),
                                "resid_out")
    assert every["site"].tolist() == [f"resid_out_layer{i}" for i in range(3)]
    # The same site gives the same probe whether swept alone or with others.
    pd.testing.assert_frame_equal(every.iloc[[2, 0]].reset_index(drop=True), sweep)
    with pytest.raises(ValueError, match="resid_out"):
        probing.sweep_sites(llama, "resid")
    fig = layer_sweep_figure(every)
    assert list(fig.data[0].x) == [0, 1, 2]  # one kind of site: drawn at its layer number
    assert list(fig.data[0].text) == every["site"].tolist()
    assert list(fig.data[0].y) == every["accuracy"].tolist()
    assert fig.layout.shapes[0].y0 == every["majority_baseline"].iloc[0]


def test_planted_labels_on_tiny_model_activations(llama):
    """Labels planted along a direction of real (tiny-model) pooled activations are recovered;
    shuffled they are not; a latent planted along that direction is the one a k=1 probe picks."""
    from conftest import WORDS

    from sae_nb.dictionaries.architectures import ReLUSAE

    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=rng.integers(4, 12))) for _ in range(240)]
    d = 32
    dictionary = ReLUSAE(d, 64)
    with torch.no_grad():
        dictionary.W_enc.normal_(0, 0.05)
        dictionary.b_enc.fill_(-0.2)
        dictionary.b_dec.zero_()
    dictionary.metadata = {"site": "resid_out_layer1"}
    raw, _ = probing.probe_features(llama, dictionary, texts)
    direction = np.linalg.svd(raw - raw.mean(0), full_matrices=False)[2][0]  # (D,) top PC
    proj = raw @ direction
    # Keep a margin around the boundary (the middle fifth goes), as planted-label tests do.
    keep = np.abs(proj - np.median(proj)) > 0.1 * np.ptp(proj)
    texts, raw, proj = [t for t, k in zip(texts, keep) if k], raw[keep], proj[keep]
    labels = np.where(proj > np.median(proj), "up", "down")
    train, test = probing.split_labeled(labels, 0.25, seed=0)
    table, _ = probing.run_probes(raw, raw, labels, train, test, k_values=())
    assert table.set_index("probe").loc["raw", "accuracy"] >= 0.95
    shuffled = np.random.default_rng(1).permutation(labels)
    rnd, _ = probing.run_probes(raw, raw, shuffled, train, test, k_values=())
    assert rnd.set_index("probe").loc["raw", "accuracy"] < 0.7

    # Latent 7 reads that direction; label the texts by its pooled code (a margin kept again).
    with torch.no_grad():
        dictionary.W_enc[:, 7] = torch.from_numpy(direction).float() * 4
        dictionary.b_enc[7] = -float(np.median(proj)) * 4
    raw, codes = probing.probe_features(llama, dictionary, texts)
    code = codes[:, 7]
    keep = np.abs(code - np.median(code)) > 0.1 * np.ptp(code)
    raw, codes, code = raw[keep], codes[keep], code[keep]
    labels = np.where(code > np.median(code), "up", "down")
    train, test = probing.split_labeled(labels, 0.25, seed=0)
    table, probes = probing.run_probes(raw, codes, labels, train, test, k_values=(1, 2))
    assert list(probes["top 1 latents"].columns) == [7]
    assert table.set_index("probe").loc["top 1 latents", "accuracy"] >= 0.95


# ---------------------------------------------------------------- caches keyed by content


def direct_pooled(model, texts, layer, dictionary=None):
    """Mean over each text's non-BOS tokens of the layer's output (encoded first when a
    dictionary is given), one text per forward pass (no padding), read by a plain forward
    hook on the transformers module: independent of sae_nb's extraction."""
    from sae_nb.activations.models import hf_model

    hf, tok = hf_model(model), model.tokenizer
    rows = []
    for text in texts:
        ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
        got = []
        hook = hf.model.layers[layer].register_forward_hook(
            lambda m, i, o, got=got: got.append(o[0] if isinstance(o, tuple) else o))
        with torch.no_grad():
            hf(torch.tensor([ids]))
        hook.remove()
        x = got[0][0, 1:].float()  # (T-1, D), BOS left out
        if dictionary is not None:
            with torch.no_grad():
                x = dictionary.encode(x)
        rows.append(x.mean(0))
    return torch.stack(rows).numpy()


def twin_llama(llama, seed=7):
    """A second tiny llama with the same name and config as ``llama`` but other weights."""
    import copy

    from transformers import AutoModelForCausalLM

    import sae_nb
    from sae_nb.activations.models import hf_model

    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(copy.deepcopy(hf_model(llama).config))
    twin = sae_nb.load_model(hf, device="cpu", tokenizer=llama.tokenizer)
    assert hf_model(twin).config.to_json_string() == hf_model(llama).config.to_json_string()
    return twin


def test_features_cache_is_keyed_by_the_dictionary(llama, tmp_path):
    texts = ["good film", "bad film", "a fine day", "dull and slow"]
    first, second = TopKSAE(32, 64, k=4), TopKSAE(32, 64, k=4)  # other random weights
    for d in (first, second):
        d.metadata = {"site": "resid_out_layer1"}
    cache = tmp_path / "features.npz"
    _, codes1 = probing.probe_features(llama, first, texts, cache=cache)
    np.testing.assert_allclose(codes1, direct_pooled(llama, texts, 1, first), atol=1e-5)
    _, codes2 = probing.probe_features(llama, second, texts, cache=cache)  # same site and texts
    np.testing.assert_allclose(codes2, direct_pooled(llama, texts, 1, second), atol=1e-5)
    # The model is part of the key too: a twin with the same name but other weights.
    twin = twin_llama(llama)
    raw3, codes3 = probing.probe_features(twin, second, texts, cache=cache)
    np.testing.assert_allclose(raw3, direct_pooled(twin, texts, 1), atol=1e-5)
    np.testing.assert_allclose(codes3, direct_pooled(twin, texts, 1, second), atol=1e-5)
    # Under a run folder each configuration has its own file, so switching back is a read.
    for d in (first, second, first):
        probing.probe_features(llama, d, texts, run_dir=tmp_path / "run")
    assert len(list((tmp_path / "run" / "probing").glob("features_*.npz"))) == 2
    _, again = probing.probe_features(llama, first, texts, run_dir=tmp_path / "run")
    np.testing.assert_allclose(again, codes1, atol=1e-6)


def test_sweep_cache_is_keyed_by_the_model(llama, tmp_path):
    texts = ["good film", "bad film", "a fine day", "dull and slow"]
    sites = ["resid_out_layer1", "resid_out_layer0"]
    cache = tmp_path / "sweep.npz"
    twin = twin_llama(llama)
    for model in (llama, twin):
        acts = probing.sweep_activations(model, texts, sites, cache=cache)
        for layer, site in ((1, sites[0]), (0, sites[1])):
            np.testing.assert_allclose(acts[site], direct_pooled(model, texts, layer),
                                       atol=1e-5)
    for model in (llama, twin):
        probing.sweep_activations(model, texts, sites, run_dir=tmp_path / "run")
    assert len(list((tmp_path / "run" / "probing").glob("sweep_*.npz"))) == 2


def test_empty_texts_and_too_few_rows_or_classes_name_the_counts(llama):
    from sae_nb.activations.extract import pooled_activations

    with pytest.raises(CorpusError, match="no texts"):
        pooled_activations(llama, [], ["resid_out_layer1"])
    dictionary = TopKSAE(32, 64, k=4)
    with pytest.raises(CorpusError, match="no texts"):
        probing.probe_features(llama, dictionary, [], "resid_out_layer1")
    with pytest.raises(probing.LabelError, match=r"one class.*\{'a': 10\}"):
        probing.split_labeled(["a"] * 10)
    df = pd.DataFrame({"text": list("abcdef"), "label": list("aaaaab")})
    with pytest.raises(probing.LabelError, match=r"n=1.*\{'a': 5, 'b': 1\}"):
        probing.subsample(df, 1)
    X, y = np.random.default_rng(0).normal(size=(8, 3)), np.array(list("aaaabbbb"))
    with pytest.raises(probing.LabelError, match=r"train split.*\{'a': 4\}"):
        probing.fit_probe(X[:4], y[:4], X[4:], y[4:])
    with pytest.raises(probing.LabelError, match=r"train split.*\{'a': 3, 'b': 1\}"):
        probing.fit_probe(X[1:5], y[1:5], X[5:], y[5:])
    with pytest.raises(probing.LabelError, match="test split is empty"):
        probing.fit_probe(X, y, X[:0], y[:0])
