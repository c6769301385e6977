"""``python -m sae_nb sweep``: a grid of papermill runs, each in its own folder, resumable, in
parallel on divided threads, failures recorded with their cell, metrics gathered in one table.

The mechanics run on a tiny notebook written here: it records its parameters, the thread
variables its kernel saw and its start and end times in ``metrics.json``, appends a line to a
shared counter file per execution, and fails in its third cell when ``k == 3``."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest

from sae_nb.__main__ import build_parser, main
from sae_nb.running.notebooks import PipelineError
from sae_nb.running.options import given
from sae_nb.running.sweep import (
    LOCK_NAME,
    MANIFEST,
    METRICS_TABLE,
    START_ATTEMPTS,
    Sweep,
    SweepOptions,
    combination_name,
    combinations,
    failed_cell,
    job_threads,
    parse_grid,
    recorded_metrics,
    sweep_pareto,
)
from sae_nb.util.io import hold_lock

PARAMETERS = 'k = 1\nmode = "a"\nsleep = 0.0\ncounter = ""\nrun_dir = ""\n'
BODY = [
    "import json, os, time\nstart = time.time()\ntime.sleep(sleep)",
    "with open(counter, 'a') as f:\n    f.write(f'{k},{mode}\\n')",
    "if k == 3:\n    raise ValueError('k three is refused')",
    "json.dump({'score': k * 10 + len(mode), 'omp': os.environ.get('OMP_NUM_THREADS'),\n"
    "           'mkl': os.environ.get('MKL_NUM_THREADS'), 'start': start, 'end': time.time()},\n"
    "          open(os.path.join(run_dir, 'metrics.json'), 'w'))",
]


def write_notebook(folder: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "language": "python",
                                 "display_name": "Python 3"}
    cell = nbformat.v4.new_code_cell(PARAMETERS)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# tiny"), cell,
                *[nbformat.v4.new_code_cell(src) for src in BODY]]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "01_tiny.ipynb"
    nbformat.write(nb, path)
    return path


def executions(counter: Path) -> list[str]:
    return counter.read_text().splitlines() if counter.exists() else []


# --- fast: the grid, names, threads, metrics, bad input --------------------------------------

def test_parse_grid_sweeps_lists_and_fixes_scalars():
    axes, fixed = parse_grid(["k=[16,32,64]", "architecture=['topk','batchtopk']", "lr=0.001",
                              "sites=[['a', 'b']]"])
    assert axes == {"k": [16, 32, 64], "architecture": ["topk", "batchtopk"],
                    "sites": [["a", "b"]]}
    assert fixed == {"lr": 0.001}
    grid = combinations(axes)
    assert len(grid) == 3 * 2 * 1
    assert grid[0] == {"k": 16, "architecture": "topk", "sites": ["a", "b"]}
    assert grid[1]["architecture"] == "batchtopk" and grid[2]["k"] == 32  # last axis fastest
    assert {tuple(sorted((k, str(v)) for k, v in g.items())) for g in grid} == {
        tuple(sorted([("k", str(k)), ("architecture", a), ("sites", "['a', 'b']")]))
        for k in (16, 32, 64) for a in ("topk", "batchtopk")}


def test_combination_names_are_readable_and_stable():
    assert combination_name({"k": 16, "architecture": "topk"}) == "k=16,architecture=topk"
    assert combination_name({"lr": 1e-3, "sites": ["a b"]}) == "lr=0.001,sites=__a_b__"
    assert combination_name({}) == "single"


@pytest.mark.parametrize("text, fragment", [
    ("k=[16,32", "k=[16,32"),  # an unclosed bracket names the value
    ("k", "'k'"),  # not name=value
    ("k=[]", "k=[]"),  # sweeps nothing
    ("run_dir=['/tmp']", "run_dir"),
])
def test_bad_parameter_syntax_is_a_clear_error(text, fragment):
    with pytest.raises(PipelineError, match=None) as err:
        parse_grid([text])
    assert fragment in str(err.value)


def test_bad_parameter_from_the_command_line_names_the_value(capsys):
    assert main(["sweep", "--only", "02", "-p", "k=[16,32"]) == 1
    err = capsys.readouterr().err
    assert "k=[16,32" in err and "not a valid Python literal" in err


def test_the_command_lines_options_are_sweep_options_fields(capsys):
    """-p repeated or given several values at once, the defaults SweepOptions' own; a bad
    --jobs is refused by name before anything runs; --only is required."""
    parser = build_parser()
    repeated = parser.parse_args(["sweep", "--only", "02", "-p", "k=[1,2]", "-p", "lr=0.1"])
    together = parser.parse_args(["sweep", "--only", "02", "-p", "k=[1,2]", "lr=0.1"])
    assert SweepOptions(**given(repeated, SweepOptions)) == \
        SweepOptions(**given(together, SweepOptions)) == SweepOptions("02", ["k=[1,2]", "lr=0.1"])
    assert SweepOptions("02").link == ("activations",) and SweepOptions("02").jobs == 1
    assert main(["sweep", "--only", "02", "--jobs", "0"]) == 1
    assert "jobs=0 must be at least 1" in capsys.readouterr().err
    assert main(["sweep", "--only", "02", "--jobs", "two"]) == 1
    assert "jobs='two' is not a whole number" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sweep", "-p", "k=[1,2]"])
    assert "--only" in capsys.readouterr().err


def test_repeated_name_is_an_error():
    with pytest.raises(PipelineError, match="given twice"):
        parse_grid(["k=[1]", "k=2"])


def test_job_threads_divide_the_cores():
    assert [job_threads(j, cores=16) for j in (1, 2, 3, 16, 32)] == [16, 8, 5, 1, 1]
    assert job_threads(1, cores=2) == 2 and job_threads(4, cores=2) == 1


def test_recorded_metrics_ignore_linked_folders(tmp_path):
    base = tmp_path / "base" / "activations"
    base.mkdir(parents=True)
    (base / "metrics.json").write_text(json.dumps({"leak": 1}))
    run = tmp_path / "run"
    (run / "dictionaries" / "m" / "s" / "topk_8").mkdir(parents=True)
    (run / "activations").symlink_to(base, target_is_directory=True)
    (run / "dictionaries" / "m" / "s" / "topk_8" / "sae_nb.json").write_text(
        json.dumps({"metrics": {"fvu": 0.25, "l0": 8.0, "hist": [1, 2]}, "model": "m"}))
    assert recorded_metrics(run) == {"fvu": 0.25, "l0": 8.0}


def test_failed_cell_counts_cells_as_committed(tmp_path):
    nb = nbformat.v4.new_notebook()
    injected = nbformat.v4.new_code_cell("k = 3")
    injected.metadata["tags"] = ["injected-parameters"]
    bad = nbformat.v4.new_code_cell("raise ValueError('no')")
    bad.outputs = [nbformat.v4.new_output("error", ename="ValueError", evalue="no",
                                          traceback=[])]
    nb.cells = [nbformat.v4.new_markdown_cell("x"), nbformat.v4.new_code_cell("k = 1"), injected,
                nbformat.v4.new_code_cell("pass"), bad]
    nbformat.write(nb, tmp_path / "x.ipynb")
    assert failed_cell(tmp_path / "x.ipynb") == {"cell": 4, "source": "raise ValueError('no')",
                                                  "error": "ValueError: no"}
    assert failed_cell(tmp_path / "absent.ipynb") is None


def test_a_second_sweep_into_a_busy_folder_is_refused(tmp_path):
    notebook = write_notebook(tmp_path / "notebooks")
    (tmp_path / "grid").mkdir()
    lock = hold_lock(tmp_path / "grid" / LOCK_NAME)
    try:
        with pytest.raises(PipelineError, match="Another sweep is running"):
            Sweep(notebook, tmp_path / "grid", {"k": [1, 2]}).run()
    finally:
        lock.close()
    assert not (tmp_path / "grid" / MANIFEST).exists()  # nothing ran


def test_a_kernel_that_fails_to_start_is_started_again_and_a_failing_cell_is_not(
        tmp_path, monkeypatch):
    """Kernels started at once can take the same TCP port and die before replying; the
    combination is run again (up to START_ATTEMPTS), while a notebook's own failure is not."""
    import sae_nb.running.sweep as sweep_module

    notebook = write_notebook(tmp_path / "notebooks")
    calls = []
    outcomes = {  # per combination: what each start writes to the log, and its exit code
        "k=1": [("zmq.error.ZMQError: Address already in use (addr='tcp://127.0.0.1:40403')\n"
                 "RuntimeError: Kernel died before replying to kernel_info", 1), ("", 0)],
        "k=2": [("ValueError: k two is refused", 1), ("", 0)],
        "k=3": [("Kernel died before replying to kernel_info", 1)] * 4,
    }

    def fake_run(command, stdout, stderr, env):
        name = Path(command[4]).name
        text, code = outcomes[name][sum(c == name for c in calls)]
        calls.append(name)
        stdout.write(text)
        return subprocess.CompletedProcess(command, code)

    monkeypatch.setattr(sweep_module.subprocess, "run", fake_run)
    entries = Sweep(notebook, tmp_path / "grid", {"k": [1, 2, 3]}).run()
    assert calls.count("k=1") == 2 and entries["k=1"]["status"] == "done"
    assert calls.count("k=2") == 1 and entries["k=2"]["status"] == "failed"
    assert calls.count("k=3") == START_ATTEMPTS == 3 and entries["k=3"]["status"] == "failed"
    assert "before replying to kernel_info" in entries["k=3"]["error"]


DAMAGED_MANIFESTS = {
    "truncated": b'{"notebook": "01_tiny.ipynb", "combinations": {"k=1": {"status": "do',
    "not JSON": b"\x00\xffgarbage",
    "a list": b"[1, 2]",
    "combinations as a list": b'{"notebook": "01_tiny.ipynb", "combinations": [{"k": 1}]}',
    "an entry not a record": b'{"notebook": "01_tiny.ipynb", "combinations": {"k=1": "done"}}',
    "a notebook not a name": b'{"notebook": 5, "combinations": {}}',
}


@pytest.mark.parametrize("kind", DAMAGED_MANIFESTS)
def test_a_damaged_sweep_json_is_an_error_naming_the_file_and_the_fix(tmp_path, capsys, kind):
    notebook = write_notebook(tmp_path / "notebooks")
    (tmp_path / "grid").mkdir()
    path = tmp_path / "grid" / MANIFEST
    path.write_bytes(DAMAGED_MANIFESTS[kind])
    with pytest.raises(PipelineError) as err:
        Sweep(notebook, tmp_path / "grid", {"k": [1, 2]})
    assert str(path) in str(err.value) and "remove it" in str(err.value)
    assert main(["sweep", "--only", "01", "--notebooks", str(notebook.parent), "--outputs",
                 str(tmp_path), "--run", "grid", "-p", "k=[1,2]"]) == 1
    shown = capsys.readouterr().err
    assert str(path) in shown and "Traceback" not in shown
    assert path.read_bytes() == DAMAGED_MANIFESTS[kind]  # left as it was, for the user to see


def test_a_garbage_sae_nb_json_in_a_finished_combination_is_recorded_in_its_row(tmp_path,
                                                                                capsys):
    """The table is still written; the damaged combination's row names the file and the fix,
    the others keep their metrics; the command line says so and exits 1."""
    notebook = write_notebook(tmp_path / "notebooks")
    grid = tmp_path / "grid"
    saved = grid / "k=1" / "dictionaries" / "topk_8"
    saved.mkdir(parents=True)
    (saved / "sae_nb.json").write_bytes(b"\x89PNG garbage")
    (grid / "k=2").mkdir()
    (grid / "k=2" / "metrics.json").write_text(json.dumps({"score": 21}))
    (grid / "k=3").mkdir()
    (grid / "k=3" / "metrics.json").write_text(json.dumps([1, 2]))  # JSON, not an object
    (grid / MANIFEST).write_text(json.dumps({"notebook": notebook.name, "combinations": {
        f"k={k}": {"status": "done", "cell": None, "error": None, "parameters": {"k": str(k)}}
        for k in (1, 2, 3)}}))
    table = Sweep(notebook, grid, {"k": [1, 2, 3]}).gather()
    written = pd.read_csv(grid / METRICS_TABLE)
    assert list(written["combination"]) == list(table["combination"]) == ["k=1", "k=2", "k=3"]
    errors = dict(zip(written["combination"], written["error"]))
    assert str(saved / "sae_nb.json") in errors["k=1"] and "rerun" in errors["k=1"]
    assert str(grid / "k=3" / "metrics.json") in errors["k=3"]
    assert pd.isna(errors["k=2"]) and list(written["score"])[1] == 21
    assert list(written["status"]) == ["done"] * 3
    # the command line: every combination done before, so nothing runs; the table is gathered
    (grid / METRICS_TABLE).unlink()
    assert main(["sweep", "--only", "01", "--notebooks", str(notebook.parent), "--outputs",
                 str(tmp_path), "--run", "grid", "-p", "k=[1,2,3]"]) == 1
    shown = capsys.readouterr().out.splitlines()
    assert shown[0].startswith("k=1: done, but ") and str(saved / "sae_nb.json") in shown[0]
    assert shown[1] == "k=2: done" and "3 of 3 combination(s) done (2 with unreadable" in shown[3]
    assert (grid / METRICS_TABLE).exists()


# --- slow: real papermill runs of the tiny notebook --------------------------------------------

@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """k in 1..3 x mode in a, bb with 2 jobs (k == 3 fails), then the same sweep again."""
    root = tmp_path_factory.mktemp("sweep")
    notebooks = root / "notebooks"
    write_notebook(notebooks)
    counter = root / "counter.txt"
    args = ["sweep", "--only", "01", "--notebooks", str(notebooks), "--outputs", str(root),
            "--run", "grid", "-p", "k=[1,2,3]", "-p", "mode=['a','bb']", "-p", "sleep=1.5",
            "-p", f"counter={str(counter)!r}", "--jobs", "2"]
    first_code = main(args)
    first = executions(counter)
    manifest = json.loads((root / "grid" / MANIFEST).read_text())
    table = pd.read_csv(root / "grid" / METRICS_TABLE)
    second_code = main(args)
    return dict(root=root, first_code=first_code, first=first, manifest=manifest, table=table,
                second_code=second_code, second=executions(counter)[len(first):])


# 1-based position of the raising cell in the notebook as written: markdown, parameters, then BODY
RAISING_CELL = 2 + next(i for i, src in enumerate(BODY, 1) if "raise" in src)
NAMES = [f"k={k},mode={m}" for k in (1, 2, 3) for m in ("a", "bb")]


@pytest.mark.slow
def test_sweep_runs_every_combination(swept):
    assert sorted(swept["first"]) == sorted(f"{k},{m}" for k in (1, 2, 3) for m in ("a", "bb"))
    for name in NAMES:
        assert (swept["root"] / "grid" / name / "01_tiny.ipynb").exists()
    done = {n for n, e in swept["manifest"]["combinations"].items() if e["status"] == "done"}
    assert done == {n for n in NAMES if not n.startswith("k=3")}


@pytest.mark.slow
def test_failure_is_reported_with_cell_and_error_and_the_rest_complete(swept):
    assert swept["first_code"] == 1 and swept["second_code"] == 1  # not all succeeded
    for name in ("k=3,mode=a", "k=3,mode=bb"):
        entry = swept["manifest"]["combinations"][name]
        assert entry["status"] == "failed"
        assert entry["cell"] == RAISING_CELL
        assert entry["error"] == "ValueError: k three is refused"
    assert all(swept["manifest"]["combinations"][n]["status"] == "done"
               for n in NAMES if not n.startswith("k=3"))


@pytest.mark.slow
def test_rerun_skips_finished_combinations(swept):
    assert sorted(swept["second"]) == ["3,a", "3,bb"]  # only the failed ones ran again


@pytest.mark.slow
def test_table_has_one_row_per_combination_with_parameter_columns(swept):
    table = swept["table"]
    assert list(table["combination"]) == NAMES
    assert {"k", "mode", "sleep", "counter", "status", "cell", "error", "score"} <= set(table)
    assert list(table["k"]) == [1, 1, 2, 2, 3, 3]
    assert list(table["mode"]) == ["a", "bb"] * 3
    ok = table[table["k"] != 3]
    assert list(ok["score"]) == [k * 10 + len(m) for k, m in zip(ok["k"], ok["mode"])]
    assert table.loc[table["k"] == 3, "score"].isna().all()
    assert list(table.loc[table["k"] == 3, "cell"]) == [RAISING_CELL] * 2


@pytest.mark.slow
def test_two_jobs_run_at_once_on_divided_threads(swept):
    runs = [json.loads((swept["root"] / "grid" / n / "metrics.json").read_text())
            for n in NAMES if not n.startswith("k=3")]
    threads = str(job_threads(2, cores=len(os.sched_getaffinity(0))))
    assert {r["omp"] for r in runs} == {threads} and {r["mkl"] for r in runs} == {threads}
    spans = sorted((r["start"], r["end"]) for r in runs)
    overlapping = any(a_end > b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    assert overlapping, spans


# --- slow: the real notebook 02 over the base run of notebook 01 ------------------------------

@pytest.mark.slow  # runs notebook 01 once and notebook 02 twice on the real embedded model
def test_sweep_of_notebook_02_over_a_base_run(tmp_path):
    """01's smoke stores in a base run; 02 swept over k, its dictionary metrics gathered."""
    assert main(["run", "--smoke", "--only", "01", "--run", "base",
                 "--outputs", str(tmp_path)]) == 0
    assert main(["sweep", "--only", "02", "--smoke", "--base-run", "base", "--run", "k",
                 "--outputs", str(tmp_path), "-p", "k=[4,8]", "--jobs", "2"]) == 0
    table = pd.read_csv(tmp_path / "k" / METRICS_TABLE)
    assert list(table["combination"]) == ["k=4", "k=8"] and list(table["k"]) == [4, 8]
    assert (table["status"] == "done").all()
    assert ((0 < table["l0"]) & (table["l0"] <= table["k"])).all()
    assert ((0 < table["fvu"]) & (table["fvu"] < 1)).all()
    for k in (4, 8):
        folder = tmp_path / "k" / f"k={k}"
        assert (folder / "activations").is_symlink()
        assert (folder / "activations").resolve() == (tmp_path / "base" / "activations").resolve()
        saved = list((folder / "dictionaries").rglob("sae_nb.json"))
        assert len(saved) == 1 and json.loads(saved[0].read_text())["train_config"]["k"] == k
        assert (folder / "checkpoints").is_dir()


@pytest.mark.slow  # starts a kernel that dies
def test_a_dead_kernel_is_recorded_with_the_workers_message(tmp_path):
    notebook = write_notebook(tmp_path / "notebooks")
    nb = nbformat.read(notebook, as_version=4)
    nb.cells.insert(2, nbformat.v4.new_code_cell("import os\nif k == 9:\n    os._exit(3)"))
    nbformat.write(nb, notebook)
    sweep = Sweep(notebook, tmp_path / "grid", {"k": [9]}, {"counter": str(tmp_path / "c")})
    entry = sweep.run()["k=9"]
    assert entry["status"] == "failed" and entry["cell"] is None
    assert entry["error"].startswith("exit code 1") and "kernel died" in entry["error"]
    assert sweep.gather()["status"].tolist() == ["failed"]


def test_sweep_pareto_draws_the_gathered_table(tmp_path):
    table = pd.DataFrame({"combination": list("abcd"), "status": ["done", "done", "done", "failed"],
                          "k": [8, 8, 16, 16], "seed": [0, 1, 0, 0],
                          "l0": [8.0, 8.0, 16.0, np.nan], "fvu": [0.3, 0.32, 0.2, np.nan]})
    s = sweep_pareto(table, tmp_path / "pareto.html").set_index("k")
    assert list(s.index) == [8, 16] and (s["architecture"] == "dictionary").all()
    assert s.loc[8, "fvu"] == pytest.approx(0.31) and s.loc[8, "n"] == 2  # the seeds pooled
    assert s.loc[16, "n"] == 1 and np.isnan(s.loc[16, "fvu_low"])  # the failed run left out
    assert (tmp_path / "pareto.html").stat().st_size > 0
    assert sweep_pareto(table.drop(columns=["l0"]), tmp_path / "none.html") is None
    assert not (tmp_path / "none.html").exists()
