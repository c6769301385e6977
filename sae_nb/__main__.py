"""Command line: ``python -m sae_nb run`` (the main job) and ``python -m sae_nb setup``."""

from __future__ import annotations

import argparse
import logging
import sys
import time

USAGE_EXAMPLES = """examples:
  python -m sae_nb setup                       fetch and convert the default model once
  python -m sae_nb run                         every notebook into outputs/default/
  python -m sae_nb run --run big -p n_tokens=1_000_000
  python -m sae_nb run --only 01 -p "sites=['resid_out_layer9']"
  python -m sae_nb run --smoke --run /tmp/smoke   the CI parameters, into an absolute folder
"""


def build_parser() -> argparse.ArgumentParser:
    from . import pipeline

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
                     help="use the small CI parameters (sae_nb.pipeline.SMOKE_PARAMETERS)")
    run.add_argument("--outputs", default=str(pipeline.OUTPUTS_DIR), metavar="DIR",
                     help="root of the run folders (default: the repository's outputs/)")
    commands.add_parser("setup", help="fetch and convert the default model once; print its folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if args.command == "setup":
        from .models import ensure_default_model

        print(ensure_default_model())
        return 0
    from .pipeline import PipelineError, parse_parameter, run_pipeline

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
