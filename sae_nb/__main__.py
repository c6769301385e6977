"""Command line: ``run`` (the main job), ``setup``, ``sweep`` (one notebook over a grid), and
the ``extract`` and ``train`` jobs.

``extract`` and ``train`` take notebooks 01 and 02's parameters as options (``--n-tokens`` or
``--n_tokens``) or from a JSON/YAML file (``--config``); ``torchrun`` launches them on several
processes (see :mod:`sae_nb.running.jobs`). Their options and ``sweep``'s are built from
dataclasses (:class:`~sae_nb.running.jobs.ExtractJob`, :class:`~sae_nb.running.jobs.TrainJob`,
:class:`~sae_nb.running.sweep.SweepOptions`), as sparsify's and simple_parsing's are: a field's
type gives the option's kind, and its docstring (the string under the field, read by
:func:`field_docs`) gives the help, so the help is written once, beside the field.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import logging
import re
import sys
import textwrap
import time
import types
import typing
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from sae_nb.activations.corpora import CorpusError
from sae_nb.activations.extract import ExtractionError
from sae_nb.activations.models import ModelLoadError, ensure_default_model
from sae_nb.activations.shards import rank_and_world
from sae_nb.activations.sites import SiteError
from sae_nb.activations.store import StoreError
from sae_nb.dictionaries.saving import DictionaryFormatError
from sae_nb.running import jobs
from sae_nb.running import notebooks as pipeline
from sae_nb.running.sweep import METRICS_TABLE, SweepOptions, parse_grid, run_sweep
from sae_nb.training.evaluate import EvaluationError
from sae_nb.training.trainer import TrainingError

USAGE_EXAMPLES = """examples:
  python -m sae_nb setup                       fetch and convert the default model once
  python -m sae_nb run                         every notebook into outputs/default/
  python -m sae_nb run --run big -p n_tokens=1_000_000
  python -m sae_nb run --only 01 -p "sites=['resid_out_layer9']"
  python -m sae_nb run --smoke --run /tmp/smoke   the CI parameters, into an absolute folder
  python -m sae_nb extract --sites resid_out_layer6 --n-tokens 1e6 --run-dir outputs/big
  python -m sae_nb train --site resid_out_layer6 --k 64 --run-dir outputs/big
  python -m sae_nb sweep --only 02 -p "k=[16,32,64]" -p "architecture=['topk','batchtopk']"
  torchrun --nproc_per_node 2 -m sae_nb extract --config job.yaml
  torchrun --nproc_per_node 2 -m sae_nb train --config job.yaml --batch-size 8192
"""
SWEEP_EXAMPLES = """examples:
  python -m sae_nb sweep --only 02 -p "k=[16,32,64]" -p "architecture=['topk','batchtopk']"
  python -m sae_nb sweep --only 02 --smoke --base-run smoke --run sweeps/k -p "k=[4,8]" --jobs 2
  python -m sae_nb sweep --only 02 -p "k=[16,32]" -p "sites=[['resid_out_layer2']]"
                                   (a list-valued parameter is fixed by wrapping it in a list)
"""
SWEEP_HELP = ("run one notebook over a grid of parameters (papermill), one folder per "
              "combination; a rerun skips the finished ones")
JOB_HELP = {"extract": "notebook 01 as a job: activations into stores (torchrun: one part "
                       "per process)",
            "train": "notebook 02 as a job: train, evaluate and save a dictionary (torchrun: "
                     "data parallel)"}
JOB_NOTE = ("Every option may also be spelled with underscores (--batch_size); a --config file "
            "(JSON or YAML) may set any of them, and the options given override it.")
JOB_USAGE = "%(prog)s [-h] [--config FILE] [--no-progress] [--OPTION VALUE ...]"


@dataclasses.dataclass(frozen=True)
class Option:
    """A command-line option made from a dataclass field."""

    name: str
    default: Any  # dataclasses.MISSING when the option is required
    help: str  # the first line of the field's docstring
    kind: str  # "text", "literal" (a Python literal, else text), "bool" or "list"
    item: str = "text"  # a list's items: "text" or "literal"
    nargs: int | str = "+"  # a list's length: "+", or a fixed-length tuple's
    choices: tuple = ()  # the values of a Literal type, shown as the option's metavar
    nullable: bool = False  # a text option whose type allows None reads the word None as None
    owner: type | None = None  # the class that declares (or redeclares) the field
    flags: tuple[str, ...] = ()  # other spellings, from the field's metadata ("flags")
    metavar: str | None = None  # from the field's metadata ("metavar"), else N for int, X for float


def field_docs(cls: type) -> dict[str, str]:
    """The docstring of each field of the dataclass ``cls``: the string literal right under the
    field's annotation in the class body, read from the source with ``ast``. Inherited fields
    keep their base class's docstring (the MRO is walked from the base down); a subclass that
    documents a field again replaces it. A class without source gives no docstrings."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # defined in an interactive session: nothing to read
            continue
        body = ast.parse(source).body[0].body
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def type_kind(annotation: Any) -> dict[str, Any]:
    """How an option of type ``annotation`` reads its value: the ``kind``, ``nullable`` and,
    where they differ from :class:`Option`'s defaults, ``item``, ``nargs``, ``choices`` and
    ``metavar``."""
    found: dict[str, Any] = {"nullable": False}
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # X | None
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        found["nullable"] = len(members) < len(typing.get_args(annotation))
        annotation = members[0] if len(members) == 1 else Any
    origin = typing.get_origin(annotation) or annotation
    if annotation is bool:
        return {**found, "kind": "bool"}
    if origin in (list, tuple):  # list[str], tuple[str, ...], tuple[float, float]
        members = typing.get_args(annotation)
        inner = type_kind(members[0] if members else Any)
        fixed = origin is tuple and members and Ellipsis not in members
        return {**found, "kind": "list", "item": "text" if inner["kind"] == "text" else "literal",
                "nargs": len(members) if fixed else "+", "choices": inner.get("choices", ()),
                "metavar": inner.get("metavar")}
    if origin is Literal:
        values = typing.get_args(annotation)
        text = all(isinstance(v, str) for v in values)
        return {**found, "kind": "text" if text else "literal", "choices": values}
    return {**found, "kind": "text" if annotation is str else "literal",
            "metavar": {int: "N", float: "X"}.get(annotation)}


def declared_in(cls: type, name: str) -> type:
    """The class of ``cls``'s MRO whose body declares (or redeclares) the field ``name``."""
    return next(k for k in cls.__mro__ if name in vars(k).get("__annotations__", {}))


def dataclass_options(cls: type) -> list[Option]:
    """An :class:`Option` for each field of the dataclass ``cls`` given at construction, in
    field order: its default, its docstring's first line, and its kind from its type."""
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    options = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = f.default
        if default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        metadata = {k: f.metadata[k] for k in ("flags", "metavar") if k in f.metadata}
        options.append(Option(f.name, default, docs.get(f.name, "").partition("\n")[0],
                              owner=declared_in(cls, f.name),
                              **{**type_kind(hints[f.name]), **metadata}))
    return options


def literal(text: str):
    """A Python literal when the text is one (``1e6``, ``None``, ``0.5``), else the text."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def boolean(text: str) -> bool:
    """``true``/``false`` (or ``1``/``0``, ``yes``/``no``, any case) as a bool."""
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    if text.lower() not in value:
        raise argparse.ArgumentTypeError(f"{text!r} is not true or false")
    return value[text.lower()]


def text_or_none(text: str) -> str | None:
    """The text, or None for the word ``None``."""
    return None if text == "None" else text


def description(summary: str, *more: str) -> str:
    """A subcommand's help as its description: a sentence, wrapped by hand (the raw formatter
    that keeps the examples' layout does not wrap)."""
    text = " ".join([f"{summary[0].upper()}{summary[1:]}.", *more])
    return textwrap.fill(text, width=96)


def first_sentence(doc: str | None) -> str:
    """A docstring's first sentence, on one line."""
    return re.split(r"(?<=\.)\s", " ".join((doc or "").split()), maxsplit=1)[0]


def option_help(option: Option) -> str:
    """The field's docstring's first line and the default as one would type it (a list's items
    apart, a text quoted), escaped for argparse's % format."""
    value = option.default
    if value is dataclasses.MISSING:
        shown = "required"
    elif isinstance(value, (list, tuple)):
        shown = "default: " + (" ".join(map(str, value)) or "none")
    else:
        shown = f"default: {value!r}"
    return f"{option.help} ({shown})".lstrip().replace("%", "%%")


def argument_settings(option: Option) -> dict[str, Any]:
    """``add_argument``'s type, nargs, action and metavar for ``option``'s kind."""
    if option.kind == "bool":
        return dict(type=boolean, nargs="?", const=True, metavar="true|false")
    read = {"text": text_or_none if option.nullable else str, "literal": literal}
    metavar = option.metavar or ("{" + ",".join(map(str, option.choices)) + "}"
                                 if option.choices else None)
    if option.kind == "list":  # --sites a b, or --sites a --sites b
        return dict(type=read[option.item], nargs=option.nargs, action="extend",
                    metavar=metavar)
    return dict(type=read[option.kind], metavar=metavar)


def add_options(parser: argparse.ArgumentParser, cls: type,
                underscores: bool = False) -> list[Option]:
    """An option per field of the dataclass ``cls`` (see :func:`dataclass_options`), spelled
    ``--name-with-dashes`` (and, with ``underscores``, ``--name_with_underscores``, not shown
    in the help). When several classes of the MRO declare fields, each gets its own group in
    the help, the most derived first, its fields in the order it declares them."""
    options = dataclass_options(cls)
    owners = sorted({o.owner for o in options}, key=cls.__mro__.index)
    groups = {owner: parser.add_argument_group(
        f"{first_sentence(owner.__doc__).rstrip('.')} ({owner.__name__})")
        if len(owners) > 1 else parser for owner in owners}
    def place(o: Option) -> tuple[int, int]:  # the owner's group, then its declaration order
        return owners.index(o.owner), list(vars(o.owner)["__annotations__"]).index(o.name)

    for option in sorted(options, key=place):
        settings = argument_settings(option)
        groups[option.owner].add_argument(
            *option.flags, "--" + option.name.replace("_", "-"), dest=option.name,
            help=option_help(option), required=option.default is dataclasses.MISSING,
            **settings)
        if underscores and "_" in option.name:
            groups[option.owner].add_argument("--" + option.name, dest=option.name,
                                              help=argparse.SUPPRESS, **settings)
    return options


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The options of ``cls`` given on the command line (the others are left out)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if f.init and hasattr(args, f.name)}


def add_job_parser(commands, job: str) -> None:
    """A subcommand whose options are the job's parameters, the fields of its dataclass
    (:data:`sae_nb.running.jobs.JOBS`); options not given are left out, so a --config file's
    values stand."""
    parser = commands.add_parser(job, help=JOB_HELP[job],
                                 description=description(JOB_HELP[job], JOB_NOTE),
                                 usage=JOB_USAGE, allow_abbrev=False,
                                 argument_default=argparse.SUPPRESS, epilog=USAGE_EXAMPLES,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE", help="parameters from a JSON or YAML file; "
                        "options given here override it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_options(parser, jobs.JOBS[job], underscores=True)


def add_sweep_parser(commands) -> None:
    """``sweep``: one notebook over the cartesian product of list-valued -p options; its options
    are :class:`~sae_nb.running.sweep.SweepOptions`'s fields."""
    sweep = commands.add_parser("sweep", help=SWEEP_HELP, description=description(SWEEP_HELP),
                                argument_default=argparse.SUPPRESS, epilog=SWEEP_EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(sweep, SweepOptions)


def run_sweep_command(args: argparse.Namespace) -> int:
    """``sweep``: print each combination's status and the table's path; 1 if any failed."""
    start = time.perf_counter()
    try:
        options = SweepOptions(**given(args, SweepOptions))
        base_run = options.base_run
        if base_run is None and (Path(options.outputs) / pipeline.DEFAULT_RUN).is_dir():
            base_run = pipeline.DEFAULT_RUN
        axes, fixed = parse_grid(options.parameter)
        sweep, table = run_sweep(options.only, axes, fixed, run=options.run, jobs=options.jobs,
                                 smoke=options.smoke, base_run=base_run, link=options.link,
                                 outputs_root=options.outputs,
                                 notebooks_dir=options.notebooks)
    except pipeline.PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for row in table.to_dict("records"):
        where = ""
        if row["status"] == "failed":
            where = ("" if pd.isna(row["cell"]) else f" in cell {row['cell']}") + \
                f": {row['error']}"
        print(f"{row['combination']}: {row['status']}{where}")
    failed = int((table["status"] != "done").sum())
    print(f"{len(table) - failed} of {len(table)} combination(s) done in "
          f"{time.perf_counter() - start:.0f} s; table in {sweep.sweep_dir / METRICS_TABLE}")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser: ``run``, ``setup``, ``sweep``, ``extract`` and ``train``."""
    parser = argparse.ArgumentParser(prog="python -m sae_nb", epilog=USAGE_EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the numbered notebooks headless (papermill)",
                              epilog=USAGE_EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--run", default=pipeline.DEFAULT_RUN, metavar="NAME",
                     help="run folder: outputs/NAME, or an absolute path (default: %(default)s)")
    run.add_argument("--only", nargs="+", metavar="NN",
                     help="run only these notebooks, by number (01) or stem (01_extract)")
    run.add_argument("-p", "--parameter", action="append", default=[], metavar="NAME=VALUE",
                     help="override a notebook parameter; VALUE is read as a Python literal "
                          "when it is one (repeatable)")
    run.add_argument("--smoke", action="store_true",
                     help="use the small CI parameters "
                          "(sae_nb.running.notebooks.SMOKE_PARAMETERS)")
    run.add_argument("--outputs", default=str(pipeline.OUTPUTS_DIR), metavar="DIR",
                     help="root of the run folders (default: the repository's outputs/)")
    commands.add_parser("setup", help="fetch and convert the default model once; print its folder")
    add_sweep_parser(commands)
    for job in jobs.JOBS:
        add_job_parser(commands, job)
    return parser


def run_job(args: argparse.Namespace) -> int:
    """``extract`` or ``train``: print what was written, or the error and return 1."""
    errors = (jobs.JobError, StoreError, ExtractionError, TrainingError, SiteError, CorpusError,
              ModelLoadError, EvaluationError, DictionaryFormatError, ValueError)
    options = given(args, jobs.JOBS[args.command])
    progress = not getattr(args, "no_progress", False)
    try:
        config = jobs.read_config_file(args.config) if getattr(args, "config", None) else {}
        params = jobs.job_parameters(args.command, config, options)
        if args.command == "extract":
            stores = jobs.extract_job(params, progress)
            for site, store in stores.items() if rank_and_world()[0] == 0 else ():
                print(f"{site}: {len(store):,} rows in {store.path}")
        else:
            folder = jobs.train_job(params, progress)
            if folder is not None:
                print(f"Saved {folder}")
    except errors as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if args.command in jobs.JOBS:
        return run_job(args)
    if args.command == "sweep":
        return run_sweep_command(args)
    if args.command == "setup":
        print(ensure_default_model())
        return 0
    start = time.perf_counter()
    try:
        overrides = dict(pipeline.parse_parameter(p) for p in args.parameter)
        outputs = pipeline.run_pipeline(args.run, args.only, overrides, smoke=args.smoke,
                                        outputs_root=args.outputs)
    except pipeline.PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"Ran {len(outputs)} notebook(s) in {time.perf_counter() - start:.0f} s; executed "
          f"copies in {outputs[0].parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
