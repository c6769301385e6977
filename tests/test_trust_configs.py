"""What a hostile user can hand the jobs: config values of the wrong type, YAML that expands
without bound, config files too large or not text, and run folders that cannot be written. Each
is refused before anything runs, naming the key or the file and the fix."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import nbformat
import pytest

import sae_nb
from sae_nb.__main__ import main
from sae_nb.running import jobs
from sae_nb.running.jobs import JobError, job_parameters, read_config_file
from sae_nb.running.notebooks import PipelineError, run_pipeline
from sae_nb.running.sweep import Sweep, SweepError

EXTRACT = dict(sites=["resid_out_layer0"], n_tokens=320, ctx_len=16, batch_size=2,
               dtype="float32", shard_rows=40)
TRAIN = dict(site="resid_out_layer0", architecture="topk", expansion=2, k=4, total_tokens=512,
             batch_size=32, heldout_tokens=64, ce_contexts=2, checkpoint_every=4)


# --- values of the wrong type ---------------------------------------------------------------

@pytest.mark.parametrize("job, values, shown, expected", [
    ("extract", {"prepend_bos": "no"}, "prepend_bos='no'", "true or false"),
    ("extract", {"exclude_bos": "false"}, "exclude_bos='false'", "true or false"),
    ("extract", {"sites": 5}, "sites=5", "a list of texts"),
    ("extract", {"corpus": ["a", "b"]}, "corpus=['a', 'b']", "a text"),
    ("extract", {"n_tokens": "1e6"}, "n_tokens='1e6'", "a whole number"),
    ("extract", {"mode": 1}, "mode=1", "one of 'tokens', 'sentences'"),  # mode='words': by
    # ExtractConfig, which says what each choice means
    ("train", {"normalize_activations": 1}, "normalize_activations=1", "true or false"),
    ("train", {"adam_betas": [0.9]}, "adam_betas=[0.9]", "a list of 2 numbers"),
    ("train", {"adam_betas": [0.9, "x"]}, "adam_betas=[0.9, 'x']", "a list of 2 numbers"),
    ("train", {"lr": "fast"}, "lr='fast'", "a number or null"),
    ("train", {"architecture": 5}, "architecture=5", "one of 'topk'"),
    ("train", {"batch_size": [4096]}, "batch_size=[4096]", "a whole number"),
    ("train", {"matryoshka_widths": "8,16"}, "matryoshka_widths='8,16'",
     "a list of whole numbers or null"),
    ("train", {"name": None}, "name=None", "a text"),
])
def test_a_config_value_of_the_wrong_type_names_the_key_and_the_type(job, values, shown,
                                                                      expected):
    with pytest.raises(JobError) as err:
        job_parameters(job, values)
    message = str(err.value)
    assert shown in message and expected in message and "config file" in message


def test_well_typed_config_values_pass_unchanged():
    good = {"n_tokens": 1.0e6, "sites": "resid_out_layer3", "shard_rows": None,
            "prepend_bos": False, "corpus": "data/x.csv", "mode": "sentences"}
    params = job_parameters("extract", good)
    assert {k: params[k] for k in good} == good
    good = {"adam_betas": [0.9, 0.99], "lr": None, "checkpoint_dir": None, "decay_start": 1,
            "matryoshka_widths": [8, 16], "save_dtype": "float16", "warmup_steps": 10}
    params = job_parameters("train", good)
    assert {k: params[k] for k in good} == good
    # the job file train_on_split writes for torchrun: every TrainConfig field, as JSON gives it
    config = sae_nb.TrainConfig(expansion=2, k=4, lr=1e-3, checkpoint_dir="/tmp/x")
    written = json.loads(json.dumps({**{k: v for k, v in asdict(config).items()
                                        if k != "metadata"},
                                     "model": "m", "site": "s", "run_dir": "/tmp", "seed": 0,
                                     "batch_size": 32, "heldout_tokens": 64, "ce_contexts": 0,
                                     "train_only": True, "result_dir": "/tmp/x/result"}))
    assert job_parameters("train", written)["adam_betas"] == [0.9, 0.999]


def test_a_command_line_value_of_the_wrong_type_names_the_option():
    with pytest.raises(JobError) as err:
        job_parameters("extract", {}, {"n_tokens": "abc"})
    assert "n_tokens='abc'" in str(err.value) and "--n-tokens" in str(err.value)


def test_a_quoted_no_in_a_yaml_config_stops_the_extract_job(model_dirs, corpus_dir, tmp_path,
                                                            capsys):
    """``prepend_bos: 'no'`` is the text 'no', which Python reads as true: refused by name."""
    run = tmp_path / "run"
    path = tmp_path / "job.yaml"
    path.write_text(f"model: {model_dirs['llama']}\ncorpus: {corpus_dir}\nrun_dir: {run}\n"
                    f"prepend_bos: 'no'\n" + "".join(f"{k}: {json.dumps(v)}\n"
                                                      for k, v in EXTRACT.items()))
    assert main(["extract", "--config", str(path), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "prepend_bos='no'" in err and "true or false" in err and str(path) in err
    assert not (run / "activations").exists()


@pytest.mark.parametrize("line, shown", [("sites: 5", "sites=5"),
                                         ("corpus: [a, b]", "corpus=['a', 'b']")])
def test_sites_5_or_a_corpus_list_in_a_config_is_an_error_naming_the_key(tmp_path, capsys,
                                                                          line, shown):
    path = tmp_path / "job.yaml"
    path.write_text(f"{line}\nrun_dir: {tmp_path / 'run'}\n")
    assert main(["extract", "--config", str(path), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert shown in err and str(path) in err and "Traceback" not in err


# --- config files that are too big, expand without bound, or are not text -------------------

def alias_bomb(levels: int = 9) -> str:
    """YAML of a few hundred bytes whose value expands to 9**levels items."""
    rows = ["sites:", "  - &a0 [x, x, x, x, x, x, x, x, x]"]
    rows += [f"  - &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join(rows) + "\n"


def test_a_yaml_alias_bomb_is_refused_at_once_naming_the_file(tmp_path, capsys):
    pytest.importorskip("yaml")
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb())
    assert path.stat().st_size < 1000
    start = time.perf_counter()
    with pytest.raises(JobError) as err:
        read_config_file(path)
    assert str(path) in str(err.value) and "alias" in str(err.value)
    assert main(["extract", "--config", str(path), "--no-progress"]) == 1
    assert str(path) in capsys.readouterr().err
    assert time.perf_counter() - start < 5


def test_a_config_file_too_large_or_not_text_is_refused_naming_the_file(tmp_path):
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"corpus": "x" * (2 << 20)}))
    with pytest.raises(JobError) as err:
        read_config_file(big)
    assert str(big) in str(err.value) and "MiB" in str(err.value)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"n_tokens: \xff\xfe\x00\x81")
    with pytest.raises(JobError) as err:
        read_config_file(binary)
    assert str(binary) in str(err.value) and "UTF-8" in str(err.value)


# --- run folders that cannot be created ------------------------------------------------------

def unwritable_folders(tmp_path: Path) -> list[Path]:
    """A folder under a plain file (for every user, root included), and /proc/x on Linux."""
    (tmp_path / "plain_file").write_text("not a folder")
    return [tmp_path / "plain_file" / "x"] + ([Path("/proc/x")] if Path("/proc").is_dir()
                                               else [])


def test_extract_refuses_a_run_dir_it_cannot_create_before_loading_the_model(
        tmp_path, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(jobs, "load_model", no_model)
    for folder in unwritable_folders(tmp_path):
        assert main(["extract", "--run-dir", str(folder), "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert f"--run-dir {str(folder)!r} cannot be created" in err and "Traceback" not in err


def test_train_refuses_folders_it_cannot_write_before_training(llama, model_dirs, corpus_dir,
                                                               tmp_path, capsys):
    run = tmp_path / "run"
    sae_nb.extract_activations(llama, run, corpus=str(corpus_dir), progress=False, **EXTRACT)
    base = ["train", "--model", str(model_dirs["llama"]), "--run-dir", str(run), "--no-progress",
            *[a for k, v in TRAIN.items() for a in (f"--{k}", str(v))]]
    for option in ("--save-dir", "--checkpoint-dir"):
        for folder in unwritable_folders(tmp_path):
            assert main([*base, option, str(folder)]) == 1
            err = capsys.readouterr().err
            assert f"{option} {str(folder)!r} cannot be created" in err
            assert not (run / "checkpoints").exists()  # refused before training


def write_notebook(folder: Path) -> Path:
    """A one-cell notebook with a run_dir parameter."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "language": "python",
                                 "display_name": "Python 3"}
    cell = nbformat.v4.new_code_cell('k = 1\nrun_dir = ""\n')
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, nbformat.v4.new_code_cell("print(k)")]
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, folder / "01_tiny.ipynb")
    return folder / "01_tiny.ipynb"


def test_run_and_sweep_refuse_a_folder_they_cannot_create(tmp_path):
    notebook = write_notebook(tmp_path / "notebooks")
    for folder in unwritable_folders(tmp_path):
        with pytest.raises(PipelineError) as err:
            run_pipeline(str(folder), notebooks_dir=notebook.parent, progress=False)
        assert f"{str(folder)!r} cannot be created" in str(err.value)
        with pytest.raises(SweepError) as err:
            Sweep(notebook, folder, {"k": [1, 2]}).run()
        assert f"{str(folder)!r} cannot be created" in str(err.value)
