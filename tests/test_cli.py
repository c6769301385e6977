"""The command line: ``-p NAME=VALUE`` parsing (no notebook runs here), and the extract and train
jobs against the functions the notebooks call."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

import sae_nb
from sae_nb.__main__ import main
from sae_nb.running.jobs import job_defaults, train_on_split
from sae_nb.running.notebooks import NOTEBOOKS_DIR, PipelineError, parse_parameter


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


# --- the extract and train jobs: the notebooks' parameters as options --------------------------

EXTRACT = dict(sites=["resid_out_layer0", "mlp_out_layer1"], n_tokens=320, ctx_len=16,
               batch_size=2, dtype="float32", shard_rows=40)
TRAIN = dict(site="resid_out_layer0", architecture="topk", expansion=2, k=4, total_tokens=512,
             batch_size=32, heldout_tokens=64, ce_contexts=2, checkpoint_every=4, seed=0)


def as_options(params: dict) -> list[str]:
    """``--name value`` pairs, half of them spelled with dashes as a shell user would."""
    argv = []
    for i, (name, value) in enumerate(params.items()):
        flag = "--" + (name.replace("_", "-") if i % 2 else name)
        argv += [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    return argv


def store_state(run_dir):
    """Per site: rows, index and manifest as bytes and values, for comparing two stores."""
    return {site: (s[:].tobytes(), s.index().tobytes(), s.manifest)
            for site, s in sae_nb.open_stores(run_dir).items()}


def test_extract_and_train_jobs_equal_the_notebook_functions(llama, model_dirs, corpus_dir,
                                                             tmp_path, capsys):
    folder = str(model_dirs["llama"])
    cli, direct = tmp_path / "cli", tmp_path / "direct"
    assert main(["extract", "--model", folder, "--corpus", str(corpus_dir), "--run-dir",
                 str(cli), "--no-progress", *as_options(EXTRACT)]) == 0
    assert "resid_out_layer0: 297 rows" in capsys.readouterr().out
    sae_nb.extract_activations(llama, direct, corpus=str(corpus_dir), progress=False, **EXTRACT)
    assert store_state(cli) == store_state(direct)

    assert main(["train", "--model", folder, "--run-dir", str(cli), "--no-progress",
                 *as_options(TRAIN)]) == 0
    saved = capsys.readouterr().out.strip().removeprefix("Saved ")
    # Notebook 02's cells, in order, on the directly extracted store.
    store = sae_nb.open_store(direct, TRAIN["site"], folder)
    split = sae_nb.heldout_split(store, TRAIN["heldout_tokens"], TRAIN["ce_contexts"])
    config = sae_nb.TrainConfig(architecture="topk", expansion=2, k=4, total_tokens=512, seed=0,
                                checkpoint_every=4, log_every=1, metadata=split.metadata(32))
    name = sae_nb.dictionary_name(config, store.d)
    config.checkpoint_dir = sae_nb.checkpoint_dir(direct, name, config)
    result = sae_nb.train_dictionary(split.train_batches(32, 0), config, progress=False)
    evaluation = sae_nb.evaluate_dictionary(result.dictionary, split.heldout_acts, llama,
                                            store.site, split.ce_tokens,
                                            bos_token_id=split.bos_token_id)
    want = sae_nb.save_trained(result, direct / "dictionaries", name, store, evaluation)
    assert saved == str(cli / "dictionaries" / "model_llama0" / "resid_out_layer0" / name) or \
        saved.endswith(str(want.relative_to(direct)))
    got, expected = sae_nb.load_sae_nb(saved), sae_nb.load_sae_nb(want)
    for key, value in expected.state_dict().items():
        assert torch.equal(got.state_dict()[key], value), key
    got_meta, want_meta = (json.loads((Path(f) / "sae_nb.json").read_text()) for f in (saved, want))
    assert got_meta["metrics"] == pytest.approx(want_meta["metrics"], rel=1e-6)
    assert got_meta["train_config"]["total_tokens"] == 512


def test_a_config_file_gives_the_parameters_and_options_override_it(llama, model_dirs,
                                                                   corpus_dir, tmp_path):
    yaml = pytest.importorskip("yaml")
    config = {"model": str(model_dirs["llama"]), "corpus": str(corpus_dir),
              **{k: v for k, v in EXTRACT.items() if k != "n_tokens"},
              "n-tokens": 10_000, "run_dir": str(tmp_path / "yaml")}  # either spelling
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "job.json").write_text(json.dumps({**config, "run_dir": str(tmp_path / "json")}))
    for kind in ("yaml", "json"):  # the file says 10,000 tokens; the option 320
        assert main(["extract", "--config", str(tmp_path / f"job.{kind}"), "--n_tokens", "320",
                     "--no-progress"]) == 0
    reference = tmp_path / "direct"
    sae_nb.extract_activations(llama, reference, corpus=str(corpus_dir), progress=False,
                               **EXTRACT)
    assert store_state(tmp_path / "yaml") == store_state(tmp_path / "json") == \
        store_state(reference)


@pytest.mark.parametrize("argv, message", [
    (["extract", "--sites", "resid_out_layer99"], "resid_out_layer99"),
    (["extract", "--n-tokens", "abc"], "n_tokens='abc'"),
    (["extract", "--mode", "words"], "mode='words'"),
    (["train", "--site", "resid_out_layer0"], "No activation stores under"),
    (["train", "--architecture", "sparse"], "Unknown architecture 'sparse'"),
])
def test_job_errors_name_the_value_and_the_fix(model_dirs, corpus_dir, tmp_path, capsys, argv,
                                               message):
    base = ["--model", str(model_dirs["llama"]), "--run-dir", str(tmp_path / "run")]
    base += ["--corpus", str(corpus_dir)] if argv[0] == "extract" else []
    assert main([*argv, *base, "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "error: " in err and message in err and "Traceback" not in err


def test_unknown_options_and_config_keys_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--n-latents", "64"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --n-latents" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # no prefix guessing: --run is not --run-dir
        main(["extract", "--run", "x"])
    capsys.readouterr()
    (tmp_path / "job.json").write_text(json.dumps({"n_tokens": 100, "n_tokenz": 5}))
    assert main(["extract", "--config", str(tmp_path / "job.json")]) == 1
    err = capsys.readouterr().err
    assert "n_tokenz" in err and "Valid names" in err and "n_tokens" in err
    (tmp_path / "list.json").write_text("[1, 2]")
    assert main(["train", "--config", str(tmp_path / "list.json")]) == 1
    assert "mapping of parameter names" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('{"n_tokens": 100,')
    assert main(["extract", "--config", str(tmp_path / "bad.json")]) == 1
    assert "bad.json' cannot be read" in capsys.readouterr().err


def test_every_notebook_parameter_is_a_job_option_with_its_default(capsys):
    """The jobs take notebooks 01 and 02's parameters under the same names and defaults
    (run_dir aside: the notebooks' is relative to notebooks/, the jobs' the main job's)."""
    for job, notebook in (("extract", "01_extract"), ("train", "02_train")):
        with pytest.raises(SystemExit):
            main([job, "--help"])
        shown = capsys.readouterr().out
        defaults = job_defaults(job)
        nb = json.loads((NOTEBOOKS_DIR / f"{notebook}.ipynb").read_text())
        cell = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
        for node in ast.parse("".join(cell["source"])).body:
            name = node.targets[0].id
            if name in ("run_dir", "world_size"):  # world_size: torchrun's, not an option
                continue
            assert f"--{name.replace('_', '-')} " in shown, f"{notebook}'s {name}: no option"
            value, default = ast.literal_eval(node.value), defaults[name]
            assert default == value or (isinstance(default, tuple) and list(default) == value), \
                f"{notebook}'s {name}: {value!r}, the job's default {default!r}"


@pytest.mark.slow  # torchrun and two interpreters
def test_notebook_02_with_world_size_2_trains_under_torchrun_and_loads_the_result(
        llama, corpus_dir, tmp_path, capfd):
    sae_nb.extract_activations(llama, tmp_path, corpus=str(corpus_dir), progress=False,
                               **EXTRACT)
    store = sae_nb.open_store(tmp_path, "resid_out_layer0")
    split = sae_nb.heldout_split(store, 64, 2)
    results = {}
    for world_size in (1, 2):
        config = sae_nb.TrainConfig(expansion=2, k=4, total_tokens=512, checkpoint_every=4,
                                    log_every=1, metadata=split.metadata(32))
        config.checkpoint_dir = sae_nb.checkpoint_dir(tmp_path, f"world{world_size}", config)
        results[world_size] = train_on_split(split, config, 32, 0, world_size)
    shown = capfd.readouterr().out
    assert "Rank 1 of 2" in shown and "train topk" in shown  # the job's output, as it came
    one, two = results[1], results[2]
    for key, value in one.dictionary.state_dict().items():
        torch.testing.assert_close(two.dictionary.state_dict()[key], value, rtol=1e-5,
                                   atol=1e-5)
    assert two.scale == pytest.approx(one.scale, rel=1e-6)
    assert len(two.log) == len(one.log) == 16
    assert two.log["fvu"].to_numpy() == pytest.approx(one.log["fvu"].to_numpy(), abs=1e-4)
    assert two.dictionary.metadata == one.dictionary.metadata == split.metadata(32)
