"""Command line: ``run`` (the main job), ``setup``, ``sweep`` (one notebook over a grid), and
the ``extract``, ``train`` and ``transcoders`` jobs.

``extract`` and ``train`` take notebooks 01 and 02's parameters as options (``--n-tokens`` or
``--n_tokens``) or from a JSON/YAML file (``--config``); ``torchrun`` launches them on several
processes (see :mod:`sae_nb.running.jobs`). Their options and ``sweep``'s are built from
dataclasses (:class:`~sae_nb.running.jobs.ExtractJob`, :class:`~sae_nb.running.jobs.TrainJob`,
:class:`~sae_nb.running.sweep.SweepOptions`), as sparsify's and simple_parsing's are: a field's
type gives the option's kind, and its docstring (the string under the field, read by
:func:`sae_nb.running.options.field_docs`) gives the help, so the help is written once,
beside the field.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

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
from sae_nb.running.options import add_options, description, given
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
  python -m sae_nb transcoders --n-tokens 300000 --d-sae 1536 --k 16
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
                     "data parallel)",
            "transcoders": "notebook 10's first step as a job: a transcoder at every layer from "
                           "one streamed pass, evaluated and saved as one set"}
JOB_NOTE = ("Every option may also be spelled with underscores (--batch_size); a --config file "
            "(JSON or YAML) may set any of them, and the options given override it.")
JOB_USAGE = "%(prog)s [-h] [--config FILE] [--no-progress] [--OPTION VALUE ...]"


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
        elif not pd.isna(row["error"]):  # done, but a file of its metrics is damaged
            where = f", but {row['error']}"
        print(f"{row['combination']}: {row['status']}{where}")
    failed = int((table["status"] != "done").sum())
    damaged = int(((table["status"] == "done") & table["error"].notna()).sum())
    print(f"{len(table) - failed} of {len(table)} combination(s) done"
          f"{f' ({damaged} with unreadable metrics)' if damaged else ''} in "
          f"{time.perf_counter() - start:.0f} s; table in {sweep.sweep_dir / METRICS_TABLE}")
    return 1 if failed or damaged else 0


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
        config_file = getattr(args, "config", None)
        config = jobs.read_config_file(config_file) if config_file else {}
        params = jobs.job_parameters(args.command, config, options, config_file)
        jobs.check_folders(args.command, params)
        if args.command == "extract":
            stores = jobs.extract_job(params, progress)
            for site, store in stores.items() if rank_and_world()[0] == 0 else ():
                print(f"{site}: {len(store):,} rows in {store.path}")
        elif args.command == "transcoders":
            tset = jobs.transcoders_job(params, progress)
            table = pd.DataFrame(tset.metadata["per_layer"]).set_index("layer")
            print(table.round(4).to_string())
            print(f"Saved {len(tset)} transcoders in {tset.metadata['path']}")
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
