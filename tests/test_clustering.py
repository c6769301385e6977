"""Text clusters and latent families: planted structure is found, the streaming co-firing
pass counts what a brute-force pass counts, and bad inputs fail with messages that say why."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_tokenizer
from sklearn.metrics import adjusted_rand_score

from sae_nb.activations.corpora import CorpusError
from sae_nb.activations.store import INDEX_DTYPE, ActivationStore, StoreWriter
from sae_nb.dictionaries.architectures import build_dictionary
from sae_nb.latents import families
from sae_nb.texts import clustering
from sae_nb.views import plotting

N_PER, K, F = 30, 4, 64  # planted clusters: rows per cluster, clusters, latents
LETTERS = "abcdefghijklmnopqrstuvwxyz"  # row r of the tiny store holds the token LETTERS[r % 26]


def planted_codes(seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Sparse non-negative codes: each cluster fires its own 5 latents strongly, plus a few
    random latents weakly, as pooled SAE codes do."""
    rng = np.random.default_rng(seed)
    own = [np.arange(5) + 5 * c for c in range(K)]  # disjoint sets: latents 0-19
    truth = np.repeat(np.arange(K), N_PER)
    codes = np.zeros((len(truth), F))
    for i, c in enumerate(truth):
        codes[i, own[c]] = rng.uniform(1.0, 2.0, 5)
        noise = rng.choice(F, 4, replace=False)
        codes[i, noise] += rng.uniform(0.0, 0.4, 4)
    order = rng.permutation(len(truth))  # clusters interleaved, not in blocks
    return codes[order], truth[order], own


# ---------------------------------------------------------------- text clusters


@pytest.mark.parametrize("scale", ["standardize", "l2", "none"])
def test_planted_clusters_are_recovered(scale):
    codes, truth, _ = planted_codes()
    found = clustering.kmeans(codes, K, seed=0, scale=scale)
    assert adjusted_rand_score(truth, found.labels) >= 0.9
    assert found.labels.shape == truth.shape and found.n_clusters == K


@pytest.mark.parametrize("scale", ["l2", "none"])
def test_silhouette_sweep_suggests_the_planted_number(scale):
    codes, _, _ = planted_codes(seed=1)
    table, best = clustering.silhouette_sweep(codes, range(2, 9), seed=0, scale=scale)
    assert table["k"].tolist() == list(range(2, 9))
    assert best == K == table.loc[table["silhouette"].idxmax(), "k"]
    assert table["silhouette"].between(-1, 1).all()
    assert table["inertia"].is_monotonic_decreasing  # more clusters never fit worse here


def test_distinguishing_latents_and_nearest_texts_describe_each_cluster():
    codes, truth, own = planted_codes(seed=2)
    texts = [f"text {i} of topic {c}" for i, c in enumerate(truth)]
    found = clustering.kmeans(codes, K)
    latents = clustering.distinguishing_latents(codes, found.labels, top=3)
    nearest = clustering.nearest_texts(found, texts, n=2)
    for c in range(K):
        planted = truth[found.labels == c][0]  # the planted cluster this one recovered
        assert set(latents.loc[latents["cluster"] == c, "latent"]) <= set(own[planted])
        mine = nearest[nearest["cluster"] == c]
        assert len(mine) == 2 and mine["distance"].is_monotonic_increasing
        assert all(t.endswith(f"topic {planted}") for t in mine["text"])
    row = latents.iloc[0]
    assert row["difference"] == pytest.approx(row["mean_in"] - row["mean_out"])


def test_sizes_and_agreement():
    codes, truth, _ = planted_codes()
    found = clustering.kmeans(codes, K)
    sizes = clustering.cluster_sizes(found.labels, names=truth.astype(str))
    assert sizes["size"].sum() == len(truth) and (sizes["top_label_share"] == 1.0).all()
    shuffled = np.random.default_rng(0).permutation(found.labels)
    table = clustering.agreement(truth, {"codes": found.labels, "shuffled": shuffled})
    ari = dict(zip(table["clustering"] + "/" + table["against"], table["ari"]))
    assert ari["codes/labels"] == pytest.approx(1.0)
    assert abs(ari["shuffled/labels"]) < 0.1
    assert ari["codes/shuffled"] == pytest.approx(adjusted_rand_score(found.labels, shuffled))
    assert len(clustering.agreement(None, {"a": truth, "b": truth})) == 1  # no labels: pairs only


@pytest.mark.parametrize("n", [5, 40])
def test_projections(n):
    codes, _, _ = planted_codes()
    xy = clustering.project_2d(codes[:n], "pca")
    assert xy.shape == (n, 2)
    tsne = clustering.project_2d(codes[:n], "tsne", perplexity=30)  # perplexity lowered for n=5
    assert tsne.shape == (n, 2) and np.isfinite(tsne).all()
    assert np.var(xy[:, 0]) >= np.var(xy[:, 1]) > 0  # PCA: the first axis spreads most


def test_bad_inputs_name_the_problem():
    codes, _, _ = planted_codes()
    with pytest.raises(clustering.ClusteringError, match=r"n_clusters=200 but there are 120 rows"):
        clustering.kmeans(codes, 200)
    with pytest.raises(clustering.ClusteringError, match=r"shape \(0, 64\)"):
        clustering.kmeans(np.zeros((0, F)), 2)
    with pytest.raises(clustering.ClusteringError, match="shape"):
        clustering.silhouette_sweep([], range(2, 5))
    with pytest.raises(clustering.ClusteringError, match="2 <= k < N"):
        clustering.silhouette_sweep(codes[:3], range(4, 8))
    with pytest.raises(clustering.ClusteringError, match="Unknown projection 'umap'"):
        clustering.project_2d(codes, "umap")
    with pytest.raises(clustering.ClusteringError, match="Unknown scale 'zscore'"):
        clustering.kmeans(codes, 2, scale="zscore")


def test_load_texts(tmp_path: Path):
    path = tmp_path / "t.csv"
    pd.DataFrame({"sentence": ["a b", "c"], "topic": ["x", "y"]}).to_csv(path, index=False)
    df = clustering.load_texts(path, "sentence", "topic")
    assert df["text"].tolist() == ["a b", "c"] and df["label"].tolist() == ["x", "y"]
    assert clustering.load_texts(path, "sentence", "")["label"].isna().all()
    with pytest.raises(CorpusError, match=r"no column 'topik'.*\['sentence', 'topic'\]"):
        clustering.load_texts(path, "sentence", "topik")


# ---------------------------------------------------------------- the streaming pass


def tiny_store(path: Path, acts: np.ndarray, shard_rows: int = 70) -> ActivationStore:
    header = {"model": "toy", "site": "resid_out_layer1", "module": "m", "io": "output",
              "d": acts.shape[1], "dtype": "float32", "tokenizer": "bytes", "mode": "tokens",
              "pool": None, "ctx_len": 10, "corpus": "toy", "text_column": None, "seed": 0,
              "prepend_bos": True, "exclude_bos": True, "bos_token_id": 256}
    writer = StoreWriter(path, header)
    for lo in range(0, len(acts), shard_rows):
        rows = np.arange(lo, min(lo + shard_rows, len(acts)))
        index = np.zeros(len(rows), dtype=INDEX_DTYPE)
        ids = np.asarray(make_tokenizer().convert_tokens_to_ids(list(LETTERS)))
        index["token"] = ids[rows % 26]
        index["context"], index["offset"] = rows // 10, rows % 10
        writer.write_shard(acts[rows], index, units_end=int(rows[-1]) // 10 + 1)
    writer.finish()
    return ActivationStore(path)


@pytest.fixture
def store(tmp_path: Path) -> ActivationStore:
    acts = np.random.default_rng(3).normal(size=(300, 16)).astype(np.float32)
    return tiny_store(tmp_path / "store", acts)


@pytest.mark.parametrize("architecture, k", [("standard", None), ("topk", 4)])
def test_streaming_cofiring_equals_brute_force(store, architecture, k):
    sae = build_dictionary(architecture, 16, 32, k=k)
    with torch.no_grad():
        sae.b_enc.fill_(-0.5)  # ReLU: about a third of the latents fire per row, not half
        codes = sae.encode(torch.from_numpy(store[:])).numpy()  # (300, 32): brute force
    fired = (codes > 0).astype(np.int64)
    result = families.co_firing(sae, store, chunk_rows=64, n_top=4)  # 64 divides neither 70 nor 300
    assert result.rows == 300
    assert np.array_equal(result.counts, fired.T @ fired)
    assert np.array_equal(result.fires, fired.sum(0))
    assert 0 < fired.mean() < 0.5  # a real mix of firing and silent
    expected = -np.sort(-codes, axis=0)[:4].T  # (32, 4) largest codes per latent
    assert np.allclose(result.top_values, np.maximum(expected, 0), atol=1e-6)
    got = np.where(result.top_rows >= 0, codes[result.top_rows, np.arange(32)[:, None]], 0)
    assert np.allclose(got, result.top_values, atol=1e-6)
    assert np.array_equal(result.top_rows < 0, expected <= 0)  # padding where it fired less
    partial = families.co_firing(sae, store, chunk_rows=64, max_rows=100)
    assert np.array_equal(partial.counts, fired[:100].T @ fired[:100])


def test_cofiring_refuses_a_dictionary_of_another_width(store):
    sae = build_dictionary("topk", 8, 32, k=4)
    sae.metadata = {"site": "resid_out_layer6"}
    with pytest.raises(families.FamilyError, match=r"reads 8-wide .* holds 16-wide rows") as err:
        families.co_firing(sae, store)
    assert "resid_out_layer6" in str(err.value)


def test_cofiring_refuses_an_empty_store(tmp_path: Path):
    empty = tiny_store(tmp_path / "empty", np.zeros((0, 16), dtype=np.float32))
    with pytest.raises(families.FamilyError, match="has no rows; run notebook 01"):
        families.co_firing(build_dictionary("topk", 16, 32, k=4), empty)


def test_cofiring_refuses_counts_too_large_for_memory(store, monkeypatch):
    monkeypatch.setattr(families, "MAX_COUNT_BYTES", 32 * 32 * 4 - 1)
    with pytest.raises(families.FamilyError, match=r"d_sae=32: the \(32, 32\) pair counts"):
        families.co_firing(build_dictionary("topk", 16, 32, k=4), store)


def test_cofiring_similarity_is_jaccard(store):
    sae = build_dictionary("topk", 16, 32, k=4)
    result = families.co_firing(sae, store, chunk_rows=128)
    latents = families.select_latents(result, min_fires=5, max_latents=10)
    assert len(latents) == 10 and np.all(np.diff(latents) > 0)
    assert result.fires[latents].min() >= np.sort(result.fires)[-10]  # the 10 most active
    S = families.cofiring_similarity(result, latents)
    i, j = latents[0], latents[1]
    both = result.counts[i, j]
    assert S[0, 1] == pytest.approx(both / (result.fires[i] + result.fires[j] - both))
    assert np.allclose(np.diag(S), 1) and np.allclose(S, S.T) and (S >= 0).all()
    with pytest.raises(families.FamilyError, match="Lower min_fires"):
        families.select_latents(result, min_fires=10**6)


# ---------------------------------------------------------------- families


def test_duplicated_decoder_directions_form_one_family():
    sae = build_dictionary("topk", 64, 128, k=4)
    pairs = [(3, 90), (40, 41)]
    with torch.no_grad():
        for i, j in pairs:
            sae.W_dec[j] = 2.5 * sae.W_dec[i]  # same direction, another scale
    latents = np.arange(128)
    S = families.decoder_similarity(sae, latents)
    assert S[3, 90] == pytest.approx(1.0, abs=1e-5)
    found = families.find_families(S, latents, "decoder", threshold=0.5)
    for i, j in pairs:
        assert found.family[i] == found.family[j]
        assert set(found.members(int(found.family[i]))) == {i, j}
    assert found.family.max() == 128 - 2 - 1  # every other latent alone
    table = families.family_table(found)
    assert len(table) == 2 and table["size"].tolist() == [2, 2]
    assert table["mean_similarity"].tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    assert sorted(frozenset(m.split()) for m in table["members"]) == sorted(
        frozenset(map(str, p)) for p in pairs)


def test_find_families_by_number_and_its_errors():
    S = np.eye(6)
    S[:3, :3] = S[3:, 3:] = 0.9
    np.fill_diagonal(S, 1)
    found = families.find_families(S, np.arange(10, 16), n_families=2)
    assert sorted(map(tuple, (sorted(found.members(f)) for f in (0, 1)))) == [(10, 11, 12),
                                                                             (13, 14, 15)]
    with pytest.raises(families.FamilyError, match="n_families=7 but only 6 latents"):
        families.find_families(S, np.arange(6), n_families=7)
    with pytest.raises(families.FamilyError, match="2 or more latents"):
        families.find_families(np.ones((1, 1)), [0])


def test_tables_name_each_members_tokens(store):
    sae = build_dictionary("topk", 16, 32, k=4)
    result = families.co_firing(sae, store, chunk_rows=100, n_top=3)
    latents = families.select_latents(result, min_fires=1)
    found = families.find_families(families.cofiring_similarity(result, latents), latents,
                                   "cofiring", threshold=0.95)
    tokenizer = make_tokenizer()
    tokens = families.top_tokens(result, store, tokenizer, latents)
    latent = int(latents[0])
    rows = result.top_rows[latent]
    assert tokens[latent] == [repr(LETTERS[r % 26]) for r in rows[rows >= 0]]
    table = families.family_table(found, tokens, min_size=1)
    assert table["size"].sum() == len(latents)
    assert f"{latent}: {' '.join(tokens[latent][:3])}" in " | ".join(table["top_tokens"])
    lt = families.latent_table(result, [found], store, tokenizer, tokens)
    assert lt["latent"].tolist() == latents.tolist()
    assert lt["cofiring_family"].tolist() == found.family.tolist()
    top_row = int(result.top_rows[latent, 0])
    assert lt.loc[0, "top_context"].endswith(f"[[{LETTERS[top_row % 26]}]]")


# ---------------------------------------------------------------- figures


def test_cluster_map_figure_has_one_point_per_text_and_a_label_view():
    codes, truth, _ = planted_codes()
    texts = [f"sentence number {i}" for i in range(len(truth))]
    found = clustering.kmeans(codes, 3)
    table = clustering.text_cluster_table(texts, truth.astype(str), found,
                                          clustering.project_2d(codes))
    fig = plotting.cluster_map_figure(table)
    assert len(fig.data) == 3 + K
    by_cluster = [t for t in fig.data if t.visible]
    assert len(by_cluster) == 3 and sum(len(t.x) for t in by_cluster) == len(texts)
    assert sum(len(t.x) for t in fig.data if not t.visible) == len(texts)
    first = by_cluster[0]
    i = texts.index(first.text[0].split("<br>")[0])
    assert (first.x[0], first.y[0]) == (table.loc[i, "x"], table.loc[i, "y"])
    assert f"label {truth[i]}" in first.text[0]
    assert len(fig.layout.updatemenus[0].buttons) == 2
    plain = plotting.cluster_map_figure(table.assign(label=None))
    assert len(plain.data) == 3 and not plain.layout.updatemenus


def test_family_figures_show_the_chosen_blocks():
    S = np.full((6, 6), 0.1)
    S[:4, :4] = 0.8
    np.fill_diagonal(S, 1)
    found = families.find_families(S, np.arange(20, 26), "decoder", threshold=0.5)
    fig = plotting.family_heatmap_figure(found, {20: ["'a'"]})
    z = np.asarray(fig.data[0].z)
    assert z.shape == (4, 4) and np.allclose(z[~np.eye(4, dtype=bool)], 0.8)
    assert {x.split(" ")[0] for x in fig.data[0].x} == {"20", "21", "22", "23"}
    assert "'a'" in str(fig.data[0].text)
    sweep = pd.DataFrame({"k": [2, 3, 4], "silhouette": [0.1, 0.5, 0.2]})
    sil = plotting.silhouette_figure(sweep, 3)
    assert list(sil.data[0].y) == [0.1, 0.5, 0.2] and sil.layout.shapes[0].x0 == 3
