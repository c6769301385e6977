"""Atomic writers and file names (sae_nb.util.io)."""

from __future__ import annotations

import pandas as pd
import pytest

from sae_nb.util.io import atomic_open, folder_name, write_table


def test_write_table_makes_folders_and_leaves_no_temporary(tmp_path):
    table = pd.DataFrame({"text": ["a, quoted \"one\"", "b"], "score": [0.5, -1.25]})
    path = write_table(table, tmp_path / "probing" / "results.csv")
    assert path.read_text().splitlines()[0] == "text,score"
    pd.testing.assert_frame_equal(pd.read_csv(path), table)
    assert [p.name for p in path.parent.iterdir()] == ["results.csv"]


def test_an_interrupted_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("old\n")
    with pytest.raises(RuntimeError):
        with atomic_open(path, "w") as f:
            f.write("new, half")
            raise RuntimeError("killed")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def test_folder_name_keeps_safe_characters_only():
    assert folder_name("model.layers.3.mlp:input") == "model.layers.3.mlp_input"
    assert folder_name("EleutherAI/pythia-70m") == "EleutherAI_pythia-70m"


def test_atomic_folder_swaps_in_whole_or_leaves_the_old(tmp_path):
    from sae_nb.util.io import atomic_folder

    path = tmp_path / "dictionary"
    with atomic_folder(path) as tmp:
        (tmp / "a.txt").write_text("first")
    assert sorted(p.name for p in path.iterdir()) == ["a.txt"]
    with pytest.raises(RuntimeError):
        with atomic_folder(path) as tmp:
            (tmp / "a.txt").write_text("second, half")
            raise RuntimeError("killed")
    assert (path / "a.txt").read_text() == "first"
    with atomic_folder(path) as tmp:
        (tmp / "b.txt").write_text("third")
    assert sorted(p.name for p in path.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dictionary"]
