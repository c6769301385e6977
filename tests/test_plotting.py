"""Plotting reads samples through the store and returns figures whose data match the store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest

from sae_nb.activations.store import INDEX_DTYPE, ActivationStore, StoreWriter
from sae_nb.views import plotting


def toy_store(path: Path, site: str, acts: np.ndarray, shard_rows: int = 100) -> ActivationStore:
    header = {"model": "toy", "site": site, "module": "m", "io": "output", "d": acts.shape[1],
              "dtype": "float32", "tokenizer": "toy", "mode": "tokens", "pool": None,
              "ctx_len": 10, "corpus": "toy", "text_column": None, "seed": 0,
              "prepend_bos": False, "exclude_bos": False, "bos_token_id": 0}
    writer = StoreWriter(path / site, header)
    for lo in range(0, len(acts), shard_rows):  # several shards, so sampling crosses them
        rows = np.arange(lo, min(lo + shard_rows, len(acts)))
        index = np.zeros(len(rows), dtype=INDEX_DTYPE)
        index["context"], index["offset"] = rows // 10, rows % 10
        writer.write_shard(acts[rows], index, units_end=int(rows[-1]) // 10 + 1)
    writer.finish()
    return ActivationStore(path / site)


@pytest.fixture
def stores(tmp_path: Path) -> dict[str, ActivationStore]:
    rng = np.random.default_rng(0)
    acts_ND = rng.normal(size=(500, 8)).astype(np.float32)
    acts_ND[:, 3] *= 50  # one dimension with a huge spread, like a massive activation
    return {"a": toy_store(tmp_path, "a", acts_ND), "b": toy_store(tmp_path, "b", 2 * acts_ND)}


def test_sample_rows_is_sorted_unique_and_bounded(stores):
    rows = plotting.sample_rows(stores["a"], max_rows=120, seed=1)
    assert len(rows) == 120 and np.all(np.diff(rows) > 0) and rows.max() < 500
    assert np.array_equal(plotting.sample_rows(stores["a"], max_rows=10_000), np.arange(500))
    with pytest.raises(ValueError, match="max_rows"):
        plotting.sample_rows(stores["a"], max_rows=0)


def test_sample_norms_match_the_rows(stores, monkeypatch):
    monkeypatch.setattr(plotting, "CHUNK_ROWS", 7)  # many chunks
    rows, norms = plotting.sample_norms(stores["a"], max_rows=50, seed=2)
    np.testing.assert_allclose(norms, np.linalg.norm(stores["a"][rows], axis=1), rtol=1e-6)


def test_activation_norms_figure_has_one_normalized_trace_per_site(stores):
    fig = plotting.activation_norms_figure(stores, max_rows=300)
    assert isinstance(fig, go.Figure) and len(fig.data) == 2
    assert fig.data[0].name.startswith("a ") and fig.data[1].name.startswith("b ")
    for trace in fig.data:
        assert sum(trace.y) == pytest.approx(1.0)  # fractions of the sampled tokens
    assert fig.layout.xaxis.type == "log"


def test_top_dimensions_figure_ranks_the_wide_dimension_first(stores):
    fig = plotting.top_dimensions_figure(stores, top=4)
    assert len(fig.data) == 2 and all(len(t.x) == 4 for t in fig.data)
    assert fig.data[0].x[0] == "3" and fig.data[1].x[0] == "3"
    mean_D, std_D = plotting.dimension_stats(stores["a"])
    np.testing.assert_allclose(std_D, stores["a"][:].std(0), rtol=1e-4)
    np.testing.assert_allclose(mean_D, stores["a"][:].mean(0), atol=1e-4)
