"""The command line's options are built from dataclass fields: each option's help is the first
line of its field's docstring, every configuration field has one, and a planted dataclass gives
the options its fields' types and docstrings say.

The expected help is read from the source files with a regular expression, not with the
``ast`` reader the command line uses, so a reader that loses or misplaces a docstring fails here.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from sae_nb.__main__ import build_parser
from sae_nb.activations.extract import ExtractConfig
from sae_nb.running.jobs import ExtractJob, TrainJob, job_parameters
from sae_nb.running.options import (
    add_options,
    dataclass_options,
    expected_value,
    field_docs,
    given,
    value_fits,
)
from sae_nb.running.sweep import SweepOptions
from sae_nb.training.trainer import TrainConfig

PACKAGE = Path(__file__).resolve().parent.parent / "sae_nb"
SOURCES = {ExtractConfig: "activations/extract.py", TrainConfig: "training/trainer.py",
           ExtractJob: "running/jobs.py", TrainJob: "running/jobs.py",
           SweepOptions: "running/sweep.py"}
# Each subcommand's dataclass and the classes its fields come from, most derived first.
COMMANDS = {"extract": [ExtractJob, ExtractConfig], "train": [TrainJob, TrainConfig],
            "sweep": [SweepOptions]}
# A field (its annotation may continue on more-indented lines), then a docstring's first line.
FIELD_DOC = re.compile(r'^    (\w+): [^\n]*(?:\n {5,}[^\n]*)*\n    """([^\n]*?)(?:"""|$)', re.M)


def docstring_lines(cls: type) -> dict[str, str]:
    """Field name -> first line of its docstring, from the class's block in its source file."""
    text = (PACKAGE / SOURCES[cls]).read_text()
    block = re.search(rf"^class {cls.__name__}\b.*?\n(.*?)(?=^\S|\Z)", text, re.M | re.S)
    assert block, f"class {cls.__name__} not found in {SOURCES[cls]}"
    return dict(FIELD_DOC.findall(block.group(1)))


def subcommand(name: str) -> argparse.ArgumentParser:
    commands = next(a for a in build_parser()._actions
                    if isinstance(a, argparse._SubParsersAction))
    return commands.choices[name]


@pytest.mark.parametrize("cls", [ExtractConfig, TrainConfig])
def test_every_config_field_has_a_docstring(cls):
    documented = docstring_lines(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not documented.get(f.name, "").strip()]
    assert not missing, f"{cls.__name__} fields without a docstring under them: {missing}"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_help_is_its_field_docstrings_first_paragraph(command):
    cls, *_ = chain = COMMANDS[command]
    expected: dict[str, str] = {}
    for klass in chain:  # the most derived class that documents a field wins
        for name, line in docstring_lines(klass).items():
            expected.setdefault(name, line)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    shown = {a.dest: a for a in subcommand(command)._actions
             if a.help != argparse.SUPPRESS and a.dest in names}
    assert sorted(shown) == sorted(names), "every field given at construction is an option"
    for name in names:
        assert expected.get(name), f"{cls.__name__}.{name} has no docstring"
        text = shown[name].help.replace("%%", "%")  # argparse's escape
        assert text.startswith(expected[name] + " "), (name, text)  # lines after it join it
        assert text.endswith(")") and ("(default: " in text or "(required)" in text), text
    help_text = subcommand(command).format_help()
    assert "(default: " in help_text and "Traceback" not in help_text


def test_an_options_help_holds_its_whole_first_paragraph_not_its_first_line():
    """A docstring wrapped over lines is shown whole (it was cut at the first line break, mid
    sentence: "A rerun with the same")."""
    shown = {a.dest: " ".join(a.help.split()) for a in subcommand("transcoders")._actions}
    assert shown["folder"].startswith(
        "The set's folder; empty for RUN_DIR/transcoders/<d_sae>_k<k>_<n_tokens>, e.g. "
        "1536_k16_200k. A rerun with the same settings reuses the set there; a killed run "
        "resumes from its checkpoint. (default")


def test_field_docs_reads_the_same_docstrings_as_the_source():
    for cls in (ExtractConfig, TrainConfig, ExtractJob, TrainJob, SweepOptions):
        read = {k: v.splitlines()[0] for k, v in field_docs(cls).items()
                if k in docstring_lines(cls)}
        assert read == docstring_lines(cls), cls.__name__


@dataclass
class PlantedBase:
    """A base with options."""

    inherited_count: int = 3
    """Inherited from the base.

    A second paragraph, not shown in the help."""
    words: str = "base"
    """The base's words."""


@dataclass
class Planted(PlantedBase):
    """A planted options class. Its fields cover every kind."""

    documented: tuple[str, ...] = ("a", "b")
    """A documented list of words."""
    undocumented: bool = False
    choice: Literal["p", "q"] = "p"
    """One of two letters."""
    maybe: str | None = None
    """Text, or the word None."""
    pair: tuple[float, float] = (0.5, 1.0)
    """Two numbers, 5% apart."""
    words: str = "sub"
    """The subclass's words replace the base's."""
    hidden: dict = field(default_factory=dict, init=False)
    """Set by the code, not an option."""


def test_a_planted_dataclass_gives_the_expected_options():
    assert field_docs(Planted) == {
        "inherited_count": "Inherited from the base.\n\nA second paragraph, not shown in the help.",
        "words": "The subclass's words replace the base's.",
        "documented": "A documented list of words.", "choice": "One of two letters.",
        "maybe": "Text, or the word None.", "pair": "Two numbers, 5% apart.",
        "hidden": "Set by the code, not an option."}
    options = {o.name: o for o in dataclass_options(Planted)}
    assert list(options) == ["inherited_count", "words", "documented", "undocumented", "choice",
                             "maybe", "pair"]  # field order; hidden is not given at init
    expected = {  # name: (help, kind, declared in, default)
        "inherited_count": ("Inherited from the base.", "literal", PlantedBase, 3),
        "words": ("The subclass's words replace the base's.", "text", Planted, "sub"),
        "documented": ("A documented list of words.", "list", Planted, ("a", "b")),
        "undocumented": ("", "bool", Planted, False),
        "choice": ("One of two letters.", "text", Planted, "p"),
        "maybe": ("Text, or the word None.", "text", Planted, None),
        "pair": ("Two numbers, 5% apart.", "list", Planted, (0.5, 1.0)),
    }
    for name, (help_, kind, owner, default) in expected.items():
        o = options[name]
        assert (o.help, o.kind, o.owner, o.default) == (help_, kind, owner, default), name
    assert options["choice"].choices == ("p", "q") and options["maybe"].nullable
    assert options["pair"].nargs == 2 and options["pair"].item == "literal"
    assert options["documented"].nargs == "+" and options["documented"].item == "text"

    parser = argparse.ArgumentParser(argument_default=argparse.SUPPRESS, allow_abbrev=False)
    add_options(parser, Planted, underscores=True)
    args = parser.parse_args(["--inherited_count", "1e3", "--documented", "x", "--documented",
                              "y", "--undocumented", "--maybe", "None", "--pair", "0.1", "2",
                              "--words", "7"])
    assert given(args, Planted) == {"inherited_count": 1000.0, "documented": ["x", "y"],
                                    "undocumented": True, "maybe": None, "pair": [0.1, 2],
                                    "words": "7"}
    assert given(parser.parse_args(["--undocumented", "false", "--inherited-count", "2"]),
                 Planted) == {"undocumented": False, "inherited_count": 2}
    shown = parser.format_help()
    assert "A planted options class (Planted):" in shown and "A base with options " \
        "(PlantedBase):" in shown
    assert shown.index("(Planted):") < shown.index("(PlantedBase):")  # most derived first
    # In its group, a redeclared field takes its place in the redeclaring class's body.
    assert shown.index("--pair") < shown.index("--words") < shown.index("(PlantedBase):")
    assert "--inherited-count N" in shown and "--inherited_count" not in shown  # hidden alias
    assert "--choice {p,q}" in shown and "--pair X X" in shown
    assert "5% apart. (default: 0.5 1.0)" in " ".join(shown.split())
    assert "second paragraph" not in shown and "hidden" not in shown


def test_every_train_config_field_is_a_train_option_reaching_the_job():
    args = subcommand("train").parse_args(["--warmup_steps", "3", "--adam-betas", "0.8", "0.9",
                                          "--grad-clip-norm", "None", "--site", "x"])
    options = given(args, TrainJob)
    assert options == {"warmup_steps": 3, "adam_betas": [0.8, 0.9], "grad_clip_norm": None,
                       "site": "x"}
    params = job_parameters("train", {"k": 8}, options)
    assert params["warmup_steps"] == 3 and params["k"] == 8 and params["total_tokens"] == 400_000
    assert "metadata" not in params  # set by the job, not a parameter
    with pytest.raises(SystemExit):
        subcommand("train").parse_args(["--adam-betas", "0.8"])  # two numbers


@pytest.mark.parametrize("annotation, fitting, not_fitting, words", [
    (bool, [True, False], ["no", "false", 1, 0, None], "true or false"),
    (int, [3, 0, 1e6], ["3", "1e6", 2.5, True, [3], None], "a whole number"),
    (float | None, [0.5, 2, None], ["0.5", False, [0.5]], "a number or null"),
    (str, ["x", ""], [["a", "b"], 5, None, True], "a text"),
    (str | None, ["x", None], [5], "a text or null"),
    (tuple[str, ...], [["a"], ("a", "b"), "a"], [5, [1], None, {"a": 1}], "a list of texts"),
    (tuple[int, ...] | None, [[8, 16], None], ["8,16", [8.5], [True]],
     "a list of whole numbers or null"),
    (tuple[float, float], [[0.9, 0.99], (1, 2)], [[0.9], [0.9, 0.9, 0.9], [0.9, "x"], 0.9],
     "a list of 2 numbers"),
    # a Literal's type only: its values are the configuration's to check, with their meaning
    (Literal["p", "q"], ["p", "r"], [1, None, ["p"]], "one of 'p', 'q'"),
    (dict, [{}, {"a": 1}], [], "a value"),
])
def test_value_fits_a_fields_type_and_says_it_in_words(annotation, fitting, not_fitting, words):
    assert [v for v in fitting if not value_fits(v, annotation)] == []
    assert [v for v in not_fitting if value_fits(v, annotation)] == []
    assert expected_value(annotation) == words
