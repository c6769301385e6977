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


def test_changed_file_reads_a_file_only_when_its_stamp_says_it_may_have_changed(tmp_path,
                                                                               monkeypatch):
    import hashlib
    import os

    from sae_nb.util import io

    path = tmp_path / "f.bin"
    path.write_bytes(b"abcdefgh")
    digest = hashlib.sha256(b"abcdefgh").hexdigest()
    stamp = io.file_stamp(path)
    assert stamp == {"size": 8, "mtime_ns": os.stat(path).st_mtime_ns}
    hashed = []
    real = io.file_sha256
    monkeypatch.setattr(io, "file_sha256", lambda p: hashed.append(p) or real(p))
    later = stamp["mtime_ns"] + 1
    assert io.changed_file(path, digest, stamp, later) == (None, None) and hashed == []
    assert io.changed_file(path, digest, stamp, stamp["mtime_ns"]) == (None, None)  # same tick
    assert len(hashed) == 1
    os.utime(path, ns=(0, stamp["mtime_ns"] + 5))  # a copy: new mtime, same bytes
    moved = {"size": 8, "mtime_ns": stamp["mtime_ns"] + 5}
    assert io.changed_file(path, digest, stamp, later) == (None, moved) and len(hashed) == 2
    path.write_bytes(b"abcdefgX")
    problem, _ = io.changed_file(path, digest, stamp, later)
    assert problem.startswith("has changed") and "checksum" in problem and len(hashed) == 3
    path.write_bytes(b"abc")
    problem, _ = io.changed_file(path, digest, stamp, later)
    assert "holds 3 bytes, 8 were written" in problem and len(hashed) == 3  # no read needed
    other = {**io.file_stamp(path), "sha256": "0" * 64}  # a stamp of other bytes vouches nothing
    problem, _ = io.changed_file(path, digest, other, later + 10**12)
    assert problem.startswith("has changed") and len(hashed) == 4
    path.unlink()
    assert io.changed_file(path, digest, stamp, later) == ("is missing", None)
