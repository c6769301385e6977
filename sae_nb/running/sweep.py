"""Run one notebook over a grid of parameters with papermill: ``python -m sae_nb sweep``.

Each ``-p name=[a, b]`` is an axis of the grid (a scalar ``-p`` is fixed for every run; to fix a
list-valued parameter, wrap it: ``-p "sites=[['resid_out_layer2']]"``). Every combination runs
in its own folder under the sweep folder, named by its swept values (``k=16,architecture=topk``),
as a separate process (``python -m sae_nb.running.sweep``) whose kernel gets
``OMP_NUM_THREADS`` and its peers set to ``cores // jobs`` (at least 1), so ``jobs`` runs at
once do not oversubscribe the cores.

Sharing inputs: a combination's folder is its notebook's ``run_dir``; the entries named in
``link`` (by default ``activations``, notebook 01's stores) of a prepared base run are linked
into it (symlinks), so notebook 02 reads the base run's stores and writes its checkpoints and
dictionary into the combination's own folder. Nothing else of the base run is visible.

``sweep.json`` in the sweep folder records each combination's parameters and status (``done``,
or ``failed`` with the cell number and error), written atomically after every change; a rerun
skips combinations already done and retries the others. ``sweep_metrics.csv`` gathers one row
per combination: its status, its parameters and the metrics its run recorded (the ``metrics``
of every saved dictionary's ``sae_nb.json``, and any flat ``metrics.json``).

:class:`SweepOptions` holds ``python -m sae_nb sweep``'s options; its field docstrings are their
help.
"""

from __future__ import annotations

import ast
import itertools
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from sae_nb.running.notebooks import (
    NOTEBOOKS_DIR,
    OUTPUTS_DIR,
    SMOKE_PARAMETERS,
    PipelineError,
    failed_cell,
    find_notebooks,
    notebook_parameters,
    parse_parameter,
    run_notebook,
    select_notebooks,
)
from sae_nb.running.run_dir import writable_folder
from sae_nb.util.checks import whole_number
from sae_nb.util.io import LockHeld, atomic_write_json, atomic_write_text, hold_lock, write_table

log = logging.getLogger(__name__)

MANIFEST = "sweep.json"
METRICS_TABLE = "sweep_metrics.csv"
PARETO_FIGURE = "pareto.html"  # L0 against FVU and CE recovered, when k or architecture is swept
LOCK_NAME = "sweep.lock"  # held while a sweep runs into the folder: one writer of sweep.json
LOG_NAME = "sweep.log"  # each combination's worker output, in its folder
# A kernel that died before replying (a port taken by a kernel started at the same moment) is
# started again, this many times in all.
START_ATTEMPTS = 3
KERNEL_START_SIGNS = ("Kernel died before replying to kernel_info", "Address already in use")
DEFAULT_LINKS = ("activations",)
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")
SAFE_NAME = re.compile(r"[^A-Za-z0-9_.,=+-]")


class SweepError(PipelineError):
    """A sweep was asked for something it cannot do (bad grid, unknown parameter, clashing
    folder); raised before any combination runs."""


@dataclass
class SweepOptions:
    """What ``python -m sae_nb sweep`` runs: one notebook, over a grid, into a sweep folder."""

    only: str = field(metadata={"metavar": "NN"})
    """The notebook to sweep, by number (02) or stem (02_train)."""
    parameter: list[str] = field(default_factory=list,
                                 metadata={"flags": ("-p",), "metavar": "NAME=VALUE"})
    """A notebook parameter: a list value (k=[16,32]) is an axis, anything else is fixed.

    Repeatable. To fix a list-valued parameter, wrap it: -p "sites=[['resid_out_layer2']]"."""
    run: str | None = None
    """The sweep folder: outputs/RUN or an absolute path; None for sweeps/<notebook stem>."""
    base_run: str | None = None
    """The run to link entries from (see link); None: the main job's run, if it exists.

    A run name under outputs or a path, usually one notebook 01 wrote its activations into; None
    takes the main job's run (outputs/default) when that folder exists, else links nothing."""
    link: tuple[str, ...] = DEFAULT_LINKS
    """The entries of the base run to link into each combination's folder."""
    jobs: int = 1
    """Combinations run at once; each kernel gets cores // N threads."""
    smoke: bool = False
    """Start from the small CI parameters (sae_nb.running.notebooks.SMOKE_PARAMETERS)."""
    outputs: str = str(OUTPUTS_DIR)
    """The root of the run folders."""
    notebooks: str = str(NOTEBOOKS_DIR)
    """The folder of the numbered notebooks."""

    def __post_init__(self):
        self.jobs = whole_number("jobs", self.jobs, 1, SweepError)


def parse_grid(texts: Iterable[str]) -> tuple[dict[str, list], dict[str, Any]]:
    """``(axes, fixed)`` from ``-p`` texts: a list value is an axis to sweep, anything else is
    fixed. Raises :class:`SweepError` naming a malformed value, a repeated name or an empty
    list."""
    axes: dict[str, list] = {}
    fixed: dict[str, Any] = {}
    for text in texts:
        try:
            name, value = parse_parameter(text)
        except PipelineError as err:
            raise SweepError(str(err)) from None
        if name in axes or name in fixed:
            raise SweepError(f"-p {text!r}: {name} is given twice; give one list of its values, "
                             f"e.g. -p \"{name}=[1, 2]\".")
        if isinstance(value, list):
            if not value:
                raise SweepError(f"-p {text!r}: an empty list sweeps nothing; give its values, "
                                 f"e.g. -p \"{name}=[16, 32]\".")
            axes[name] = value
        else:
            fixed[name] = value
    if "run_dir" in axes or "run_dir" in fixed:
        raise SweepError("run_dir is set by the sweep (each combination's folder); choose the "
                         "sweep folder with --run and the shared inputs with --base-run.")
    return axes, fixed


def combinations(axes: Mapping[str, list]) -> list[dict[str, Any]]:
    """The cartesian product of the axes, in the order given (the last axis varies fastest)."""
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*axes.values())]


def value_text(value: Any) -> str:
    """A value as written in a combination's name: strings bare, the rest as Python writes them."""
    return value if isinstance(value, str) else repr(value)


def combination_name(combination: Mapping[str, Any]) -> str:
    """A stable, readable folder name: ``k=16,architecture=topk`` (characters outside
    ``[A-Za-z0-9_.,=+-]`` become ``_``); ``single`` when nothing is swept."""
    if not combination:
        return "single"
    return SAFE_NAME.sub("_", ",".join(f"{k}={value_text(v)}" for k, v in combination.items()))


def job_threads(jobs: int, cores: int | None = None) -> int:
    """Threads per run when ``jobs`` run at once: the usable cores divided among them, at
    least 1."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, jobs))


def thread_environment(threads: int, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default ``os.environ``) with the BLAS/OpenMP thread variables set to
    ``threads``; torch sizes its intra-op pool from ``OMP_NUM_THREADS``."""
    env = dict(os.environ if base is None else base)
    env.update({name: str(threads) for name in THREAD_VARIABLES})
    return env


def link_base(folder: Path, base: Path | None, names: Iterable[str]) -> list[str]:
    """Symlink ``base/NAME`` into ``folder`` for each name ``base`` holds; returns those linked.
    An existing link to the same target stays; anything else already there is an error."""
    linked = []
    for name in names if base is not None else ():
        target, here = (base / name).resolve(), folder / name
        if not target.exists():
            continue
        if here.is_symlink() and here.resolve() == target:
            linked.append(name)
            continue
        if here.exists() or here.is_symlink():
            raise SweepError(f"{here} exists and is not a link to {target}; remove it or sweep "
                             f"into another --run folder.")
        here.symlink_to(target, target_is_directory=target.is_dir())
        linked.append(name)
    return linked


def read_manifest(sweep_dir: str | Path) -> dict[str, Any]:
    """The sweep's record, ``sweep.json``; {} when there is none yet. A file that is not one
    (cut short, not JSON, its combinations a list) is a :class:`SweepError` naming it: guessing
    would rerun, or skip, the wrong combinations."""
    path = Path(sweep_dir) / MANIFEST
    if not path.exists():
        return {}
    fix = ("restore it, or remove it to run every combination again (each into its folder, "
           "where the earlier run's files stay)")
    try:
        manifest = json.loads(path.read_bytes())  # bytes: a decoding error is a ValueError too
    except (OSError, ValueError) as err:
        raise SweepError(f"The sweep record {path} cannot be read ({err}); {fix}.") from None
    problem = manifest_problem(manifest)
    if problem:
        raise SweepError(f"The sweep record {path} is damaged: {problem}; {fix}.")
    return manifest


def manifest_problem(manifest: Any) -> str | None:
    """What makes ``manifest`` not a sweep record, in words; None when it is one."""
    if not isinstance(manifest, dict):
        return f"it holds a {type(manifest).__name__}, not an object"
    if not isinstance(manifest.get("notebook", ""), str):
        return f"its notebook is {manifest['notebook']!r}, not a notebook's file name"
    entries = manifest.get("combinations", {})
    if not isinstance(entries, dict):
        return (f"its combinations are a {type(entries).__name__}, not an object of records "
                f"keyed by combination name")
    bad = next((name for name, entry in entries.items() if not isinstance(entry, dict)), None)
    if bad is not None:
        return f"the entry of combination {bad!r} is {entries[bad]!r}, not a record"
    return None


class Sweep:
    """One notebook over a grid, into ``sweep_dir``; :meth:`run` runs what is not done yet."""

    def __init__(self, notebook: str | Path, sweep_dir: str | Path, axes: Mapping[str, list],
                 fixed: Mapping[str, Any] | None = None, smoke: bool = False,
                 base_run: str | Path | None = None, link: Iterable[str] = DEFAULT_LINKS):
        self.notebook = Path(notebook).resolve()
        self.sweep_dir = Path(sweep_dir).resolve()
        self.axes, self.fixed = dict(axes), dict(fixed or {})
        self.base_run = Path(base_run).resolve() if base_run else None
        self.link = list(link)
        declared = notebook_parameters(self.notebook)
        unknown = [k for k in [*self.axes, *self.fixed] if k not in declared]
        if unknown:
            raise SweepError(f"{self.notebook.name} declares no parameter {unknown}; its "
                             f"parameters are: {', '.join(declared)}.")
        if smoke and self.notebook.stem not in SMOKE_PARAMETERS:
            raise SweepError(f"--smoke: {self.notebook.stem} has no entry in "
                             f"sae_nb.running.notebooks.SMOKE_PARAMETERS.")
        self.defaults = dict(SMOKE_PARAMETERS[self.notebook.stem]) if smoke else {}
        self.combinations = {combination_name(c): c for c in combinations(self.axes)}
        if len(self.combinations) != len(combinations(self.axes)):
            raise SweepError("Two combinations share a folder name (values that differ only in "
                             "characters outside [A-Za-z0-9_.,=+-]); give distinct values.")
        self._lock = threading.Lock()
        self.manifest = read_manifest(self.sweep_dir)
        self.manifest.setdefault("notebook", self.notebook.name)
        self.manifest.setdefault("combinations", {})
        if self.manifest["notebook"] != self.notebook.name:
            raise SweepError(f"{self.sweep_dir} holds a sweep of {self.manifest['notebook']}; "
                             f"sweep {self.notebook.name} into another --run folder.")

    def parameters(self, name: str) -> dict[str, Any]:
        """What the combination's notebook receives: smoke values, then fixed, then swept."""
        return {**self.defaults, **self.fixed, **self.combinations[name]}

    def is_done(self, name: str) -> bool:
        entry = self.manifest["combinations"].get(name)
        if not entry or entry.get("status") != "done":
            return False
        if entry.get("parameters") != {k: repr(v) for k, v in self.parameters(name).items()}:
            raise SweepError(f"{self.sweep_dir / name} was run with other parameters "
                             f"({entry.get('parameters')}); sweep into another --run folder or "
                             f"remove that combination's folder and its entry in {MANIFEST}.")
        return True

    def _record(self, name: str, **entry: Any) -> None:
        with self._lock:
            record = self.manifest["combinations"].setdefault(name, {})
            record.update(entry)
            atomic_write_json(self.sweep_dir / MANIFEST, self.manifest)

    def run(self, jobs: int = 1, threads: int | None = None) -> dict[str, dict[str, Any]]:
        """Run every combination not yet done, ``jobs`` at once, each kernel on ``threads``
        threads (default :func:`job_threads`); returns the manifest's entries by name. A
        failure is recorded and the others go on."""
        if jobs < 1:
            raise SweepError(f"--jobs {jobs}: give at least 1.")
        threads = threads or job_threads(jobs)
        writable_folder(self.sweep_dir, "The sweep folder", SweepError,
                        fix="choose another with --run (a name under --outputs, or a path)")
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock = hold_lock(self.sweep_dir / LOCK_NAME)
        except LockHeld as held:
            raise SweepError(f"Another sweep is running into {self.sweep_dir} ({held.holder}); "
                             f"wait for it or sweep into another --run folder.") from None
        try:
            todo = [n for n in self.combinations if not self.is_done(n)]
            for name in self.combinations:
                if name not in todo:
                    log.info("%s: done before, skipped", name)
            with ThreadPoolExecutor(max_workers=jobs) as pool:
                list(pool.map(lambda n: self.run_one(n, threads), todo))
        finally:
            if lock is not None:
                lock.close()
        return {n: self.manifest["combinations"][n] for n in self.combinations}

    def run_one(self, name: str, threads: int) -> dict[str, Any]:
        """Run one combination in its own process and record how it ended."""
        folder = self.sweep_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        link_base(folder, self.base_run, self.link)
        params = self.parameters(name)
        self._record(name, parameters={k: repr(v) for k, v in params.items()}, status="running",
                     started=time.time(), finished=None, cell=None, error=None, threads=threads)
        command = [sys.executable, "-m", "sae_nb.running.sweep", str(self.notebook), str(folder),
                   repr(params)]
        log.info("%s: running on %d thread(s)", name, threads)
        for attempt in range(1, START_ATTEMPTS + 1):
            with open(folder / LOG_NAME, "w") as out:
                code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT,
                                      env=thread_environment(threads)).returncode
            if code == 0 or not kernel_start_failed(folder / LOG_NAME):
                break
            log.warning("%s: its kernel failed to start (attempt %d of %d); starting it again",
                        name, attempt, START_ATTEMPTS)
        ended = {"finished": time.time(), "status": "done" if code == 0 else "failed"}
        if code != 0:
            where = failed_cell(folder / self.notebook.name)
            if where:
                ended.update(cell=where["cell"], error=where["error"])
            else:  # the kernel died, or the notebook never started
                tail = (folder / LOG_NAME).read_text(errors="replace").strip().splitlines()[-3:]
                ended.update(error=f"exit code {code}: " + " | ".join(tail))
        self._record(name, **ended)
        entry = self.manifest["combinations"][name]
        if code == 0:
            log.info("%s: done", name)
        else:
            log.warning("%s: failed in cell %s: %s", name, entry.get("cell"), entry.get("error"))
        return entry

    def gather(self) -> pd.DataFrame:
        """One row per combination: name, status, cell, error, its parameters (as given to the
        sweep) and its recorded metrics; written to ``sweep_metrics.csv``."""
        rows = []
        for name, combo in self.combinations.items():
            entry = self.manifest["combinations"].get(name, {})
            row = {"combination": name, "status": entry.get("status", "pending"),
                   "cell": entry.get("cell"), "error": entry.get("error"),
                   **{k: value_text(v) if isinstance(v, (list, tuple, dict)) else v
                      for k, v in {**self.fixed, **combo}.items()}}
            try:
                row.update(recorded_metrics(self.sweep_dir / name))
            except SweepError as err:  # one damaged file: its row says so, the table is written
                problem = (f"{err}; restore it, or rerun the combination: remove "
                           f"{self.sweep_dir / name} and its entry in {MANIFEST}")
                row["error"] = f"{row['error']}; {problem}" if row["error"] else problem
                log.warning("%s: %s", name, problem)
            rows.append(row)
        table = pd.DataFrame(rows)
        table["cell"] = table["cell"].astype("Int64")  # 5, not 5.0, beside the empty ones
        write_table(table, self.sweep_dir / METRICS_TABLE)
        if {"k", "architecture"} & set(self.axes):  # the Pareto figure beside the table
            sweep_pareto(table, self.sweep_dir / PARETO_FIGURE)
        return table


def recorded_metrics(folder: str | Path) -> dict[str, Any]:
    """The metrics a run recorded under ``folder`` (links not followed, so a base run's files
    are not counted): each saved dictionary's ``sae_nb.json`` ``metrics`` and each
    ``metrics.json`` object's scalar values. With several dictionaries, names are prefixed by
    the dictionary's folder name. A file that is not a JSON object (its ``metrics`` one) is a
    :class:`SweepError` naming it."""
    found: list[tuple[str, dict]] = []
    for root, _dirs, files in os.walk(folder):  # os.walk does not follow symlinks
        for file in sorted(files):
            path = Path(root) / file
            if file == "sae_nb.json":
                found.append((path.parent.name, json_object(path, "metrics")))
            elif file == "metrics.json":
                found.append((path.parent.name, json_object(path)))
    found.sort()
    metrics: dict[str, Any] = {}
    for source, values in found:
        for key, value in values.items():
            if isinstance(value, (int, float, str, bool)) or value is None:
                metrics[key if len(found) == 1 else f"{source}/{key}"] = value
    return metrics


def kernel_start_failed(log_file: Path) -> bool:
    """Whether a combination's log shows its kernel dying before it ran a cell. Kernels started
    at once by ``--jobs N`` can pick the same free TCP port (ZMQError: Address already in use);
    such a start is tried again rather than failing the combination."""
    text = log_file.read_text(errors="replace") if log_file.exists() else ""
    return any(sign in text for sign in KERNEL_START_SIGNS)


def json_object(path: Path, key: str | None = None) -> dict[str, Any]:
    """The JSON object in ``path`` (with ``key``, its value at ``key``: {} when absent or null);
    anything else is a :class:`SweepError` naming the file."""
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError) as err:
        raise SweepError(f"{path} cannot be read ({err})") from None
    if key is not None and isinstance(value, dict):
        value = value.get(key) or {}
        if not isinstance(value, dict):
            raise SweepError(f"{path}'s {key} are a {type(value).__name__}, not an object")
    elif not isinstance(value, dict):
        raise SweepError(f"{path} holds a {type(value).__name__}, not an object")
    return value


def run_sweep(only: str, axes: Mapping[str, list], fixed: Mapping[str, Any] | None = None,
              run: str | Path | None = None, jobs: int = 1, smoke: bool = False,
              base_run: str | Path | None = None, link: Iterable[str] = DEFAULT_LINKS,
              outputs_root: str | Path = OUTPUTS_DIR,
              notebooks_dir: str | Path = NOTEBOOKS_DIR) -> tuple[Sweep, pd.DataFrame]:
    """Sweep the notebook named ``only`` (``02`` or ``02_train``) into ``outputs_root/run``
    (default ``sweeps/<notebook stem>``; an absolute path is used as is), linking ``link`` from
    ``base_run`` (a run name under ``outputs_root`` or a path). Returns the sweep and its
    gathered table."""
    picked = select_notebooks(find_notebooks(notebooks_dir), [only])
    if len(picked) != 1:
        raise SweepError(f"--only {only!r} names {len(picked)} notebooks; a sweep runs one.")
    notebook = picked[0]
    sweep_dir = Path(outputs_root) / (run or f"sweeps/{notebook.stem}")
    base = Path(outputs_root) / base_run if base_run else None
    if base is not None and not base.is_dir():
        raise SweepError(f"--base-run {str(base_run)!r}: no folder {base}; run notebook 01 there "
                         f"first (python -m sae_nb run --only 01 --run NAME) or name another.")
    sweep = Sweep(notebook, sweep_dir, axes, fixed, smoke=smoke, base_run=base, link=link)
    sweep.run(jobs)
    return sweep, sweep.gather()


def worker(argv: list[str]) -> int:
    """``python -m sae_nb.running.sweep NOTEBOOK RUN_DIR PARAMETERS``: run one combination
    (parameters as a Python dict literal); exit 1 with the failure's message."""
    notebook, run_dir, params = argv
    try:
        run_notebook(notebook, run_dir, ast.literal_eval(params), progress=False)
    except PipelineError as err:
        print(err, file=sys.stderr)  # noqa: T201 - the worker's message, read into sweep.log
        return 1
    return 0


def sweep_pareto(table: pd.DataFrame, path) -> pd.DataFrame | None:
    """Draw the Pareto figure of a sweep's gathered table (``sweep_metrics.csv``) to ``path``
    (HTML): one trace per architecture (when swept or fixed), a point per k, seed intervals
    over the other swept values. Returns the summarized table drawn; None, writing nothing,
    when no finished run recorded ``l0`` and ``fvu``."""
    # Imported here: they take seconds to import and only a finished sweep's figure needs them.
    from sae_nb.comparison.grid import summarize_runs  # scipy
    from sae_nb.views.plotting import pareto_figure  # plotly

    done = table[table["status"] == "done"] if "status" in table.columns else table
    if not {"l0", "fvu"} <= set(done.columns) or done[["l0", "fvu"]].dropna().empty:
        return None
    done = done.dropna(subset=["l0", "fvu"]).copy()
    if "architecture" not in done.columns:
        done["architecture"] = "dictionary"
    if "k" not in done.columns:
        done["k"] = ""
    metrics = [m for m in ("l0", "fvu", "ce_loss_recovered") if m in done.columns]
    summary = summarize_runs(done, metrics)
    atomic_write_text(path, pareto_figure(summary).to_html(include_plotlyjs=True))
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sys.exit(worker(sys.argv[1:]))
