"""The command line's parameter parsing: ``-p NAME=VALUE`` (no notebook runs here)."""

from __future__ import annotations

import pytest

import sae_nb
from sae_nb.__main__ import main
from sae_nb.pipeline import PipelineError, parse_parameter


@pytest.mark.parametrize("text, problem", [
    ("sites=['resid_out_layer9'", "was never closed"),
    ("sites=['resid_out_layer9', 'mlp_out_layer2'", "was never closed"),
    ("corpus='sotu", "unterminated string"),
    ("sites=resid_out_layer9]", "unmatched ']'"),
    ("options={'a': 1", "was never closed"),
])
def test_a_malformed_literal_is_an_error_naming_the_parameter(text, problem):
    with pytest.raises(PipelineError) as err:
        parse_parameter(text)
    message = str(err.value)
    name = text.partition("=")[0]
    assert f"-p {name}=" in message and problem in message
    assert "quote" in message  # the fix for a value meant as a string


@pytest.mark.parametrize("text, expected", [
    ("corpus=sotu", ("corpus", "sotu")),  # a bare word is still a string
    ("corpus=data/my file.csv", ("corpus", "data/my file.csv")),
    ("corpus=2024_speeches.csv", ("corpus", "2024_speeches.csv")),
    ("n_tokens=abc", ("n_tokens", "abc")),  # a string; ExtractConfig refuses it by name
    ("sites=['resid_out_layer9']", ("sites", ["resid_out_layer9"])),
    ("n_tokens=1e3", ("n_tokens", 1000.0)),
])
def test_well_formed_values(text, expected):
    assert parse_parameter(text) == expected


def test_n_tokens_1e3_through_the_command_line_reaches_extraction_as_1000():
    name, value = parse_parameter("n_tokens=1e3")
    assert sae_nb.ExtractConfig(**{name: value}).n_tokens == 1000
    with pytest.raises(sae_nb.ExtractionError, match="n_tokens='abc'"):
        sae_nb.ExtractConfig(**dict([parse_parameter("n_tokens=abc")]))


def test_cli_reports_a_malformed_literal_before_running_anything(tmp_path, capsys):
    code = main(["run", "--run", str(tmp_path / "run"), "-p", "sites=['resid_out_layer9'"])
    err = capsys.readouterr().err
    assert code == 1 and "sites" in err and "was never closed" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()
