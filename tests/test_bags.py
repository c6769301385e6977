"""Pooled codes as bags: TF-IDF and LSA against hand computations, dense-latent dropping at
its threshold, and planted bags where a dense always-on feature defeats plain unit rows."""

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from sae_nb.texts import bags
from sae_nb.texts.clustering import ClusteringError, scale_rows

CODES = np.array([[1.0, 0.0, 2.0, 4.0],
                  [0.0, 3.0, 0.0, 1.0],
                  [1.0, 1.0, 0.0, 2.0]])


def test_tfidf_equals_hand_computation():
    # df = [2, 2, 1, 3] over N = 3 rows: idf = log(4/3), log(4/3), log(4/2), log(4/4) = 0
    a, b = np.log(4 / 3), np.log(2)
    hand = np.array([[1 * a, 0, 2 * b, 0], [0, 3 * a, 0, 0], [1 * a, 1 * a, 0, 0]])
    hand /= np.linalg.norm(hand, axis=1, keepdims=True)
    np.testing.assert_allclose(bags.inverse_document_frequency(CODES), [a, a, b, 0.0])
    # idf: binary firing times the idf, unit rows; clustering's "idf" scale is the same
    hand_idf = np.array([[a, 0, b, 0], [0, a, 0, 0], [a, a, 0, 0]])
    hand_idf /= np.linalg.norm(hand_idf, axis=1, keepdims=True)
    np.testing.assert_allclose(bags.treat(CODES, "idf"), hand_idf)
    np.testing.assert_allclose(scale_rows(CODES, "idf"), hand_idf)
    np.testing.assert_allclose(bags.treat(CODES, "tfidf"), hand)


def test_binary_is_unit_rows_of_firing():
    hand = np.array([[1, 0, 1, 1], [0, 1, 0, 1], [1, 1, 0, 1]]) / np.sqrt([[3], [2], [3]])
    np.testing.assert_allclose(bags.treat(CODES, "binary"), hand)


@pytest.mark.parametrize("lsa,weighting", [("lsa", "tfidf"), ("lsa_idf", "idf")])
def test_lsa_equals_svd_of_tfidf_by_hand(lsa, weighting):
    rng = np.random.default_rng(0)
    codes = np.maximum(rng.normal(size=(12, 7)), 0)
    tfidf = bags.treat(codes, weighting)
    _, _, vt = np.linalg.svd(tfidf, full_matrices=False)
    hand = tfidf @ vt[:3].T
    hand /= np.linalg.norm(hand, axis=1, keepdims=True)
    got = bags.treat(codes, lsa, n_components=3)
    assert got.shape == (12, 3)
    if lsa == "lsa_idf":  # clustering's scale is the same treatment, at its 20 components
        np.testing.assert_allclose(np.abs(scale_rows(codes, "lsa_idf")),
                                   np.abs(bags.treat(codes, lsa, n_components=20)), atol=1e-8)
    # components are defined up to sign: compare each column up to its sign
    signs = np.sign((got * hand).sum(0))
    np.testing.assert_allclose(got * signs, hand, atol=1e-8)


def test_drop_dense_drops_exactly_those_above_threshold():
    # densities over the 4 rows: 1.0, 0.5, 0.75, 0.25, 0.0
    codes = np.array([[1, 1, 1, 1, 0], [2, 1, 1, 0, 0], [3, 0, 1, 0, 0], [1, 0, 0, 0, 0.0]])
    np.testing.assert_allclose(bags.firing_density(codes), [1.0, 0.5, 0.75, 0.25, 0.0])
    fitted = bags.BagTransform("drop_dense", threshold=0.5).fit(codes)
    np.testing.assert_array_equal(fitted.keep, [1, 3, 4])  # 0.5 itself is not above 0.5
    np.testing.assert_allclose(fitted.transform(codes), bags.l2_rows(codes[:, [1, 3, 4]]))
    # densities given from elsewhere (a store's tokens) decide instead of the rows
    given = bags.BagTransform("drop_dense", threshold=0.1, density=[0, 0.2, 0, 0, 0]).fit(codes)
    np.testing.assert_array_equal(given.keep, [0, 2, 3, 4])


def test_lsa_idf_with_no_idf_weight_left():
    everywhere = np.ones((6, 4))
    with pytest.raises(ClusteringError, match="every idf weight is 0"):
        bags.treat(everywhere, "lsa_idf")
    with pytest.warns(UserWarning, match="every idf weight is 0"):
        np.testing.assert_allclose(scale_rows(everywhere, "lsa_idf"), 0.5)


def test_bad_treatment_and_threshold_are_named():
    with pytest.raises(ClusteringError, match="tf-idf"):
        bags.treat(CODES, "tf-idf")
    with pytest.raises(ClusteringError, match="threshold=2"):
        bags.treat(CODES, "drop_dense", threshold=2)


def planted_bags(seed=0, n=400, per=6, domains=4):
    """Domains told apart only by which sparse features appear (3 of the domain's 6, values
    0.5-1.5), beside one dense feature on in every text with a value of 5-50."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, domains, n)
    X = np.zeros((n, domains * per + 1))
    for i in range(n):
        X[i, rng.choice(per, 3, replace=False) + y[i] * per] = rng.uniform(0.5, 1.5, 3)
    X[:, -1] = rng.uniform(5, 50, n)
    return X, y


@pytest.mark.parametrize("seed", [0, 1])
def test_dense_feature_defeats_unit_rows_and_bag_treatments_recover(seed):
    X, y = planted_bags(seed)
    ari = {t: adjusted_rand_score(y, bags.spherical_kmeans(bags.treat(X, t, threshold=0.9,
                                                                      n_components=8), 4))
           for t in bags.TREATMENTS}
    assert ari["l2"] < 0.3, ari
    for t in ("tfidf", "binary", "idf", "drop_dense"):
        assert ari[t] >= 0.9, ari


def test_treatment_table_on_planted_bags():
    X, y = planted_bags(0, n=240)
    rng = np.random.default_rng(1)
    raw = rng.normal(size=(240, 5))  # a raw representation that knows nothing
    train, test = np.arange(180), np.arange(180, 240)
    table = bags.treatment_table(raw, X, y, train, test, treatments=("l2", "binary"),
                                 k_values=(1, 5), n_components=8)
    assert list(table["treatment"]) == ["as is", "l2", "binary"]
    assert table.set_index("treatment").loc["l2", "ari"] < 0.3
    binary = table.set_index("treatment").loc["binary"]
    assert binary["ari"] >= 0.9 and binary["all"] >= 0.9
    assert table.set_index("treatment").loc["as is", "ari"] < 0.1
    assert np.isnan(table.set_index("treatment").loc["as is", "top 5"])  # only 5 raw columns
