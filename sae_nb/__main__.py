"""Command line: ``run`` (the main job), ``setup``, ``sweep`` (one notebook over a grid), and
the ``extract`` and ``train`` jobs.

``extract`` and ``train`` take notebooks 01 and 02's parameters as options (``--n_tokens`` or
``--n-tokens``) or from a JSON/YAML file (``--config``); ``torchrun`` launches them on several
processes (see :mod:`sae_nb.running.jobs`).
"""

from __future__ import annotations

import argparse
import ast
import logging
import sys
import time
from pathlib import Path

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
"""
JOB_HELP = {"extract": "notebook 01 as a job: activations into stores (torchrun: one part "
                       "per process)",
            "train": "notebook 02 as a job: train, evaluate and save a dictionary (torchrun: "
                     "data parallel)"}


def literal(text: str):
    """A Python literal when the text is one (``1e6``, ``None``, ``0.5``), else the text."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def boolean(text: str) -> bool:
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    if text.lower() not in value:
        raise argparse.ArgumentTypeError(f"{text!r} is not true or false")
    return value[text.lower()]


def add_job_parser(commands, job: str) -> None:
    """A subcommand whose options are the job's parameters, each under its notebook name and
    with dashes; options not given are left out, so a --config file's values stand."""
    from sae_nb.running.jobs import JOBS

    parser = commands.add_parser(job, help=JOB_HELP[job], allow_abbrev=False,
                                 argument_default=argparse.SUPPRESS, epilog=USAGE_EXAMPLES,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE", help="parameters from a JSON or YAML file; "
                        "options given here override it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    for name, option in JOBS[job].items():
        flags = sorted({f"--{name}", f"--{name.replace('_', '-')}"})
        kind = {"list": dict(nargs="+"),
                "bool": dict(type=boolean, nargs="?", const=True, metavar="true|false"),
                "text": dict(type=str), "literal": dict(type=literal)}[option.kind]
        parser.add_argument(*flags, dest=name, help=f"{option.help} (default: {option.default!r})",
                            **kind)


def add_sweep_parser(commands) -> None:
    """``sweep``: one notebook over the cartesian product of list-valued -p options."""
    from sae_nb.running import notebooks as pipeline

    sweep = commands.add_parser(
        "sweep", help="run one notebook over a grid of parameters (papermill), one folder per "
                      "combination; a rerun skips the finished ones",
        epilog=SWEEP_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep.add_argument("--only", required=True, metavar="NN",
                       help="the notebook to sweep, by number (02) or stem (02_train)")
    sweep.add_argument("-p", "--parameter", action="append", default=[], metavar="NAME=VALUE",
                       help="a list value (k=[16,32]) is swept, anything else fixed; wrap a "
                            "list-valued parameter to fix it: \"sites=[['a']]\" (repeatable)")
    sweep.add_argument("--run", metavar="NAME", help="sweep folder: outputs/NAME or an absolute "
                       "path (default: sweeps/<notebook stem>)")
    sweep.add_argument("--base-run", metavar="NAME",
                       help="run whose --link entries each combination's folder links to, e.g. "
                            f"notebook 01's activations (default: {pipeline.DEFAULT_RUN}, when "
                            f"that folder exists)")
    sweep.add_argument("--link", nargs="+", default=["activations"], metavar="ENTRY",
                       help="entries of the base run to link (default: activations)")
    sweep.add_argument("--jobs", type=int, default=1, metavar="N",
                       help="combinations at once; each gets cores // N threads (default: 1)")
    sweep.add_argument("--smoke", action="store_true",
                       help="start from the small CI parameters (sae_nb.running.notebooks.SMOKE_PARAMETERS)")
    sweep.add_argument("--outputs", default=str(pipeline.OUTPUTS_DIR), metavar="DIR",
                       help="root of the run folders (default: the repository's outputs/)")
    sweep.add_argument("--notebooks", default=str(pipeline.NOTEBOOKS_DIR), metavar="DIR",
                       help="folder of the numbered notebooks (default: the repository's)")


def run_sweep_command(args: argparse.Namespace) -> int:
    """``sweep``: print each combination's status and the table's path; 1 if any failed."""
    import pandas as pd

    from sae_nb.running.notebooks import DEFAULT_RUN, PipelineError
    from sae_nb.running.sweep import METRICS_TABLE, parse_grid, run_sweep

    start = time.perf_counter()
    base_run = args.base_run
    if base_run is None and (Path(args.outputs) / DEFAULT_RUN).is_dir():
        base_run = DEFAULT_RUN
    try:
        axes, fixed = parse_grid(args.parameter)
        sweep, table = run_sweep(args.only, axes, fixed, run=args.run, jobs=args.jobs,
                                 smoke=args.smoke, base_run=base_run, link=args.link,
                                 outputs_root=args.outputs, notebooks_dir=args.notebooks)
    except PipelineError as err:
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
    from sae_nb.running import notebooks as pipeline

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
                     help="use the small CI parameters (sae_nb.running.notebooks.SMOKE_PARAMETERS)")
    run.add_argument("--outputs", default=str(pipeline.OUTPUTS_DIR), metavar="DIR",
                     help="root of the run folders (default: the repository's outputs/)")
    commands.add_parser("setup", help="fetch and convert the default model once; print its folder")
    add_sweep_parser(commands)
    for job in ("extract", "train"):
        add_job_parser(commands, job)
    return parser


def run_job(args: argparse.Namespace) -> int:
    """``extract`` or ``train``: print what was written, or the error and return 1."""
    from sae_nb.activations.corpora import CorpusError
    from sae_nb.activations.extract import ExtractionError
    from sae_nb.activations.models import ModelLoadError
    from sae_nb.activations.shards import rank_and_world
    from sae_nb.activations.sites import SiteError
    from sae_nb.activations.store import StoreError
    from sae_nb.dictionaries.saving import DictionaryFormatError
    from sae_nb.running import jobs
    from sae_nb.training.evaluate import EvaluationError
    from sae_nb.training.trainer import TrainingError

    errors = (jobs.JobError, StoreError, ExtractionError, TrainingError, SiteError, CorpusError,
              ModelLoadError, EvaluationError, DictionaryFormatError, ValueError)
    options = {k: v for k, v in vars(args).items() if k in jobs.JOBS[args.command]}
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
    if args.command in ("extract", "train"):
        return run_job(args)
    if args.command == "sweep":
        return run_sweep_command(args)
    if args.command == "setup":
        from sae_nb.activations.models import ensure_default_model

        print(ensure_default_model())
        return 0
    from sae_nb.running.notebooks import PipelineError, parse_parameter, run_pipeline

    start = time.perf_counter()
    try:
        overrides = dict(parse_parameter(p) for p in args.parameter)
        outputs = run_pipeline(args.run, args.only, overrides, smoke=args.smoke,
                               outputs_root=args.outputs)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"Ran {len(outputs)} notebook(s) in {time.perf_counter() - start:.0f} s; executed "
          f"copies in {outputs[0].parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
