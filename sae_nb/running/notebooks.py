"""Run the numbered notebooks headless with papermill: the project's main job.

Every ``notebooks/NN_*.ipynb`` runs in number order, with the notebooks folder as working
directory, in a ``python3`` kernel of the current interpreter. Each gets
``run_dir=<absolute path of outputs/<run>>`` and the overrides a user passes, restricted to the
parameters that notebook declares, and its executed copy lands in ``outputs/<run>/``.
``SMOKE_PARAMETERS`` holds the small values that CI and ``--smoke`` use: the same code,
smaller numbers.
"""

from __future__ import annotations

import ast
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sae_nb.running.run_dir import finish_progress_bars, writable_folder
from sae_nb.util.errors import SaeNbError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
OUTPUTS_DIR = REPO_ROOT / "outputs"
DEFAULT_RUN = "default"
KERNEL_NAME = "python3"  # ipykernel's own spec: jupyter_client launches it with sys.executable
NOTEBOOK_RE = re.compile(r"^(\d+)_\w+\.ipynb$")

# Small values for CI and `python -m sae_nb run --smoke`, per notebook stem. Every notebook
# needs an entry (tests/test_notebooks.py fails otherwise), and every name must be a parameter
# of its notebook.
SMOKE_PARAMETERS: dict[str, dict[str, Any]] = {
    "01_extract": {"n_tokens": 2048, "ctx_len": 64, "batch_size": 8},
    # 01's smoke stores hold 2016 rows in 32 contexts: 16 steps of 256 rows, 9 contexts held out.
    "02_train": {"expansion": 2, "k": 8, "total_tokens": 4096, "batch_size": 256,
                 "heldout_tokens": 512, "ce_contexts": 2, "checkpoint_every": 4},
    "03_load_pretrained": {"fit_tokens": 256, "n_latents": 5},
    # 04 fetches the VADER sdist from PyPI once (cached in data/cache/), then probes 60 snippets.
    "04_probe": {"n_sentences": 60, "sweep_sites": ["resid_out_layer2"]},
    # 05 clusters the 44 sentences at the silhouette's k and groups 200 latents of 01's store.
    "05_cluster": {"n_clusters": 0, "k_max": 6, "chunk_rows": 512, "min_fires": 3,
                   "max_latents": 200},
    # 06 reads 01's resid_out_layer6 store (2016 rows) with the shipped dictionary.
    "06_visualize": {"n_top": 5, "n_latents_dashboard": 3},
    # 07 reuses 04's smoke probes (60 snippets, layer 2) and steers 2 prompts by 6 tokens.
    "07_intervene": {"n_sentences": 60, "sweep_sites": ["resid_out_layer2"],
                     "coefficients": [1.0], "prompts": ["The film was", "The new album sounds"],
                     "max_new_tokens": 6, "neutral_contexts": 2, "neutral_ctx_len": 32,
                     "n_check": 4},
    # 08 reuses 06's smoke statistics (n_top 5), explains 2 sampled latents with the embedded
    # model, scores each explanation on 3 firing and 3 silent contexts, embeds 2 per latent.
    "08_explain": {"n_top": 5, "n_llm_latents": 2, "n_score_contexts": 3,
                   "n_latents_dashboard": 2, "meaning_contexts": 2},
    # 09 trains 3 architectures x 2 k x 2 seeds on a 64-feature lab and on 01's smoke store
    # (8 steps of 256 rows each), CE recovered on 2 held-out contexts.
    "09_compare": {"lab_ks": [2, 4], "lab_features": 64, "lab_d": 16, "lab_rows": 4096,
                   "lab_heldout": 1024, "lab_d_sae": 64, "lab_tokens": 4096, "ks": [8, 16],
                   "d_sae": 256, "total_tokens": 2048, "batch_size": 256,
                   "heldout_tokens": 512, "ce_contexts": 2, "n_resamples": 20,
                   "task_tokens": 1000},
    # 10 trains 30 transcoders of 256 latents on 2 steps of 4096 rows (the embedded model's
    # 30 layers), then one graph capped at 200 features, contexts from 512 tokens.
    "10_circuits": {"n_tokens": 8448, "d_sae": 256, "k": 8, "heldout_tokens": 512,
                    "prompts": ["In 1776, the Declaration of"], "max_feature_nodes": 200,
                    "n_supernode": 3, "context_tokens": 512, "steer_tokens": 4},
}


# A -p value starting or ending with one of these is meant as a literal and must parse as one.
LITERAL_OPENERS, LITERAL_CLOSERS = "[({'\"", "])}'\""


class PipelineError(SaeNbError, RuntimeError):
    """A notebook failed or the job was asked for something that does not exist."""


def find_notebooks(notebooks_dir: str | Path = NOTEBOOKS_DIR) -> list[Path]:
    """The ``NN_name.ipynb`` notebooks of a folder, in number order."""
    found = [p for p in Path(notebooks_dir).glob("*.ipynb") if NOTEBOOK_RE.match(p.name)]
    return sorted(found, key=lambda p: (int(NOTEBOOK_RE.match(p.name).group(1)), p.name))


def select_notebooks(notebooks: list[Path], only: Iterable[str] | None) -> list[Path]:
    """Keep the notebooks named in ``only`` by number (``01``, ``1``) or stem (``01_extract``)."""
    if not only:
        return notebooks
    picked = []
    for want in only:
        match = [p for p in notebooks if want in (p.stem, p.stem.split("_")[0])
                 or (want.isdigit() and int(want) == int(p.stem.split("_")[0]))]
        if not match:
            raise PipelineError(f"--only {want!r} matches no notebook; choose from "
                                f"{[p.stem for p in notebooks]}.")
        picked += [p for p in match if p not in picked]
    return [p for p in notebooks if p in picked]  # number order, whatever order `only` had


def parse_parameter(text: str) -> tuple[str, Any]:
    """``"name=value"`` with value read as a Python literal when it is one, else as a string.

    A value that opens or closes like a literal (a bracket, brace, parenthesis or quote) must
    be one: ``sites=['resid_out_layer9'`` is an error, not the string it spells.
    """
    name, sep, value = text.partition("=")
    name, value = name.strip(), value.strip()
    if not sep or not name.isidentifier():
        raise PipelineError(f"Parameter {text!r} is not name=value (e.g. -p n_tokens=50_000).")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError) as err:
        if value[:1] in LITERAL_OPENERS or value[-1:] in LITERAL_CLOSERS:
            problem = err.msg if isinstance(err, SyntaxError) else str(err)
            raise PipelineError(f"-p {name}={value} is not a valid Python literal ({problem}). "
                                f"Check its brackets and quotes, e.g. -p \"{name}=['a', 'b']\"; "
                                f"to pass text, quote it: -p \"{name}='...'\".") from None
        return name, value  # a bare word or path: a string


def notebook_parameters(path: str | Path) -> dict[str, Any]:
    """The names a notebook declares in its ``parameters`` cell, with papermill's details."""
    # papermill takes seconds to import: loaded when a notebook is read, not for the constants
    import papermill

    papermill_log = logging.getLogger("papermill")
    level = papermill_log.level
    papermill_log.setLevel(logging.WARNING)  # inspecting logs "Input Notebook" at INFO: noise
    try:
        return papermill.inspect_notebook(str(path))
    except ValueError as err:  # papermill needs the kernelspec to pick the parameter syntax
        raise PipelineError(f"Cannot read the parameters of {Path(path).name}: {err} Open it in "
                            f"JupyterLab with the Python 3 kernel and save it.") from None
    finally:
        papermill_log.setLevel(level)


def run_notebook(path: str | Path, run_dir: str | Path, parameters: Mapping[str, Any] | None = None,
                 progress: bool = False) -> Path:
    """Execute one notebook into ``run_dir`` with ``run_dir`` and ``parameters`` injected.

    Parameters the notebook does not declare are left out. Returns the executed notebook's path;
    raises :class:`PipelineError` naming the notebook and the failing cell.
    """
    # papermill takes seconds to import: loaded when a notebook runs, not for the constants
    import papermill

    path, run_dir = Path(path).resolve(), Path(run_dir).resolve()
    writable_folder(run_dir, "The run folder", PipelineError,
                    fix="choose another (python -m sae_nb run --run NAME, or an absolute path)")
    run_dir.mkdir(parents=True, exist_ok=True)
    declared = notebook_parameters(path)
    given = {**(parameters or {}), "run_dir": str(run_dir)}
    if "run_dir" not in declared:
        log.warning("%s declares no run_dir parameter; what it writes lands outside %s.",
                    path.name, run_dir)
    skipped = sorted(set(given) - {"run_dir"} - set(declared))
    if skipped:
        log.info("%s does not declare %s; not passing them.", path.name, skipped)
    output = run_dir / path.name
    log.info("Running %s -> %s", path.name, output)
    try:
        papermill.execute_notebook(
            str(path), str(output), parameters={k: v for k, v in given.items() if k in declared},
            kernel_name=KERNEL_NAME, cwd=str(path.parent), progress_bar=progress,
        )
        finish_progress_bars(output)  # saved bars read how they ended, not 0%
    except papermill.PapermillExecutionError as err:
        raise PipelineError(_failure_message(path, output, err)) from None
    except RuntimeError as err:  # nbclient's DeadKernelError: out of memory, a crash, a kill
        raise PipelineError(f"Notebook {path.name} stopped: its kernel died "
                            f"({type(err).__name__}: {err}). The executed notebook, up to that "
                            f"point, is {output}") from err
    return output


def run_pipeline(run: str | Path = DEFAULT_RUN, only: Iterable[str] | None = None,
                 parameters: Mapping[str, Any] | None = None, smoke: bool = False,
                 outputs_root: str | Path = OUTPUTS_DIR, notebooks_dir: str | Path = NOTEBOOKS_DIR,
                 progress: bool = True) -> list[Path]:
    """Run the notebooks in number order into ``outputs_root/run``; returns the executed copies.

    ``run`` may also be an absolute path. ``parameters`` override the notebooks' defaults (and
    the smoke values with ``smoke=True``); each notebook receives only those it declares, and a
    name that no selected notebook declares is an error, raised before anything runs.
    """
    notebooks = select_notebooks(find_notebooks(notebooks_dir), only)
    if not notebooks:
        raise PipelineError(f"No NN_name.ipynb notebooks in {str(notebooks_dir)!r}.")
    parameters = dict(parameters or {})
    if "run_dir" in parameters:
        raise PipelineError("run_dir is set by the pipeline; choose the folder with run= "
                            "(--run NAME, or an absolute path) instead of a run_dir parameter.")
    declared = {p.stem: notebook_parameters(p) for p in notebooks}
    unknown = [k for k in parameters if not any(k in names for names in declared.values())]
    if unknown:
        listing = "; ".join(f"{stem}: {', '.join(names)}" for stem, names in declared.items())
        raise PipelineError(f"Parameter(s) {unknown} are declared by none of the notebooks to "
                            f"run. Their parameters are: {listing}.")
    if smoke:
        missing = [p.stem for p in notebooks if p.stem not in SMOKE_PARAMETERS]
        if missing:
            raise PipelineError(f"--smoke: {missing} have no entry in "
                                f"sae_nb.running.notebooks.SMOKE_PARAMETERS; add one (it may be "
                                f"{{}}).")
    run_dir = (Path(outputs_root) / run).resolve()
    outputs = []
    for path in notebooks:
        given = {**(SMOKE_PARAMETERS[path.stem] if smoke else {}), **parameters}
        outputs.append(run_notebook(path, run_dir, given, progress=progress))
    log.info("Wrote %d executed notebook(s) to %s", len(outputs), run_dir)
    return outputs


def _failure_message(path: Path, output: Path, err) -> str:
    """Name the failing cell by its position in the notebook as committed (1-based)."""
    failed = failed_cell(output)
    where = (f"cell {failed['cell']}" if failed else
             f"cell index {err.cell_index} (executed copy)")
    source = (failed or {}).get("source") or err.source or ""
    lines = source.strip().splitlines()
    excerpt = "\n    ".join(lines[:6] + (["..."] if len(lines) > 6 else []))
    return (f"Notebook {path.name} failed in {where}:\n    {excerpt}\n"
            f"{err.ename}: {err.evalue}\n"
            f"The executed notebook, with the full traceback, is {output}")


def failed_cell(executed: str | Path) -> dict[str, Any] | None:
    """Where an executed notebook failed: ``{"cell", "source", "error"}`` with the cell's
    position in the notebook as committed (1-based, papermill's own cells not counted) and
    ``"ename: evalue"``; None when no cell holds an error (or the notebook cannot be read)."""
    # nbformat takes seconds to import (jsonschema's format checkers), and sae_nb.running.jobs
    # reads this module's constants in every notebook that trains: loaded to read a failure
    import nbformat

    try:
        nb = nbformat.read(str(executed), as_version=4)
    except Exception:  # never written, or cut short
        return None
    papermill_tags = {"injected-parameters", "papermill-error-cell-tag"}
    position = 0
    for cell in nb.cells:
        if papermill_tags & set(cell.get("metadata", {}).get("tags", [])):
            continue
        position += 1
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                return {"cell": position, "source": cell.source,
                        "error": f"{output.get('ename')}: {output.get('evalue')}"}
    return None
