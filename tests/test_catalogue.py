"""The dictionary catalogue: every saved dictionary listed, broken ones with their error."""

from __future__ import annotations

import pytest

from sae_nb.dictionaries.architectures import ReLUSAE, TopKSAE
from sae_nb.dictionaries.catalogue import catalogue, find_dictionaries
from sae_nb.dictionaries.saving import save_dictionary


def test_catalogue_lists_saved_dictionaries_with_metrics(tmp_path):
    save_dictionary(TopKSAE(16, 64, k=4), tmp_path / "tiny" / "resid_out_layer1" / "topk_64_k4",
                    model="tiny", site="resid_out_layer1", metrics={"fvu": 0.25, "l0": 4.0})
    save_dictionary(ReLUSAE(16, 32), tmp_path / "tiny" / "mlp_out_layer0" / "relu_32",
                    model="tiny", site="mlp_out_layer0")
    (tmp_path / "tiny" / "embed" / "broken").mkdir(parents=True)
    (tmp_path / "tiny" / "embed" / "broken" / "cfg.json").write_text("{not json")
    (tmp_path / "tiny" / "resid_out_layer1" / "topk_64_k4" / "checkpoints").mkdir()
    assert len(find_dictionaries(tmp_path)) == 3
    df = catalogue(tmp_path).set_index("name")
    assert df.loc["topk_64_k4", ["model", "site", "d_in", "d_sae", "k"]].tolist() == [
        "tiny", "resid_out_layer1", 16, 64, 4]
    assert df.loc["topk_64_k4", "fvu"] == pytest.approx(0.25)
    assert df.loc["relu_32", "architecture"] == "ReLUSAE"
    assert "DictionaryFormatError" in df.loc["broken", "error"]  # listed, not raised
    assert "broken" in df.loc["broken", "error"]  # the message names the folder


def test_catalogue_of_a_missing_folder_says_so(tmp_path):
    """A mistyped folder once listed nothing, silently."""
    from sae_nb import DictionaryFormatError

    with pytest.raises(DictionaryFormatError, match="No folder .*absent"):
        catalogue(tmp_path / "absent")


def test_catalogue_defaults_to_the_shipped_dictionaries():
    df = catalogue()
    row = df[df["name"] == "topk_4608_k32"].iloc[0]
    assert (row["model"], row["site"], row["d_in"], row["d_sae"]) == (
        "smollm2-135m", "resid_out_layer6", 576, 4608)
