"""Save and load dictionaries in SAELens's on-disk format, plus our own metadata.

A dictionary is a folder ``dictionaries/<model>/<site>/<name>/``::

    cfg.json                  SAELens (v6) config: architecture, d_in, d_sae, metadata, ...
    sae_weights.safetensors   W_enc (D, F), b_enc (F,), W_dec (F, D), b_dec (D,) [, threshold]
    sparsity.safetensors      "sparsity": log10 firing frequency (F,), when known
    sae_nb.json               our training config, evaluation metrics and provenance, and each
                              file's SHA-256, size and modification time (ns) when it was saved

so ``sae_lens.SAE.load_from_disk(folder)`` reads it unchanged, and so do we.

Weights are saved in a float dtype only (:data:`SAVE_DTYPES`). A save holds a lock on its folder
(``.<name>.lock`` beside it) while it writes and swaps the folder in, so a second save into the
same folder at the same time is refused, naming the first. A load checks cfg.json and the
weights against their recorded checksums: a ``stat`` each, and a hash only when the size or
mtime differs from the record (a copy, a checkout, changed bytes) or there is none (a
dictionary saved before they were recorded, the shipped one); :func:`verify_dictionary` hashes
every file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from sae_nb.activations.sites import hook_name
from sae_nb.dictionaries.architectures import (
    ARCHITECTURES,
    BatchTopKSAE,
    Dictionary,
    TopKSAE,
)
from sae_nb.util.errors import SaeNbError
from sae_nb.util.io import (
    LockHeld,
    atomic_folder,
    changed_file,
    file_sha256,
    file_stamp,
    folder_name,
    hold_lock,
)

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
META_FILE = "sae_nb.json"
# SAELens (``handle_config_defaulting``) reads a config whose metadata carries no
# ``sae_lens_version`` (>= 6.0.0) as a pre-6.0 one: it then rebuilds ``metadata`` from top-level
# keys and drops ours (model_name, hook_name, ...). This marks the v6 layout we write; weights and
# numerics are unaffected. Checked against sae-lens 6.54.12 (tests/test_saelens_compat.py).
SAELENS_FORMAT_VERSION = "6.0.0"
# The dtypes weights may be saved in: float32 keeps them exactly; float16 and bfloat16 halve the
# files, rounding each weight once to their grid (about 3 and 2 significant digits), and read
# back (as float32) as exactly that rounding. An integer or bool dtype would round weights to
# whole numbers, float8 to one digit; float64 holds nothing float32 weights do not.
SAVE_DTYPES = ("float32", "float16", "bfloat16")
# The dictionary this repository ships for the default model; later notebooks default to it.
DEFAULT_DICTIONARY = (Path(__file__).resolve().parents[2] / "dictionaries" / "smollm2-135m"
                      / "resid_out_layer6" / "topk_4608_k32")


class DictionaryFormatError(SaeNbError, ValueError):
    """A dictionary folder is missing files, holds tensors that contradict its config, or files
    changed since they were saved; or a dictionary cannot be saved as asked."""


# Training settings that name the machine a dictionary was trained on, not the dictionary: a
# saved folder travels (the shipped one is in the repository), so they are left out.
MACHINE_SETTINGS = ("checkpoint_dir",)


def save_dictionary(dictionary: Dictionary, path: str | Path, *, model: str, site: str,
                    target_site: str | None = None, context_size: int | None = None,
                    dataset: str | None = None, density: np.ndarray | None = None,
                    train_config: dict | None = None, metrics: dict | None = None,
                    dtype: str | torch.dtype = "float32") -> Path:
    """Write ``dictionary`` to ``path`` atomically (a temporary folder renamed into place),
    its weights in ``dtype`` (one of :data:`SAVE_DTYPES`), holding the folder's save lock."""
    path = Path(path)
    dtype = _save_dtype(dtype)
    weights = {k: _cast(k, v, dtype) for k, v in dictionary.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = {**dictionary.config(), "dtype": dtype, "device": "cpu",
           "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": SAELENS_FORMAT_VERSION,
                        "sae_lens_training_version": None,
                        "model_name": model, "hook_name": hook_name(site),
                        "hook_head_index": None, "context_size": context_size,
                        "prepend_bos": True, "dataset_path": dataset,
                        "sae_nb_site": site, "sae_nb_target_site": target_site or site}}
    if isinstance(dictionary, TopKSAE):
        cfg["rescale_acts_by_decoder_norm"] = False
    meta = {"architecture": getattr(dictionary, "kind", dictionary.architecture),
            "k": getattr(dictionary, "k", None), "model": model, "site": site,
            "target_site": target_site or site,
            "train_config": {k: v for k, v in (train_config or {}).items()
                             if k not in MACHINE_SETTINGS},
            "metrics": metrics or {}}
    lock = _lock_folder(path)
    try:
        with atomic_folder(path) as tmp:
            (tmp / CFG_FILE).write_text(json.dumps(cfg, indent=2))
            save_file(weights, tmp / WEIGHTS_FILE)
            if density is not None:
                log10 = np.log10(np.asarray(density, dtype=np.float64) + 1e-10)  # (F,)
                save_file({"sparsity": torch.from_numpy(log10).float()}, tmp / SPARSITY_FILE)
            meta["checksums"] = _checksums(tmp)
            # Size and mtime, taken after the hash: a load compares them, hashing none.
            meta["stat"] = {name: file_stamp(tmp / name) for name in meta["checksums"]}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=_json_default))
    finally:
        if lock is not None:
            lock.close()
    return path


def _save_dtype(dtype: str | torch.dtype) -> str:
    """The name of a dtype weights may be saved in, or an error naming the one asked for."""
    name = str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else dtype
    if name not in SAVE_DTYPES:
        raise DictionaryFormatError(
            f"dtype={dtype!r} cannot hold a dictionary's weights: only a float dtype keeps "
            f"them (an integer or bool one rounds every weight to a whole number). Save with "
            f"dtype='float32' (exact), or 'float16' or 'bfloat16' (half the file, weights rounded "
            f"to about 3 or 2 significant digits).")
    return name


def _cast(key: str, value: torch.Tensor, dtype: str) -> torch.Tensor:
    """``value`` in ``dtype`` on the CPU, refusing a finite weight that would become infinite
    (float16 holds magnitudes up to 65504)."""
    cast = value.detach().to("cpu", getattr(torch, dtype)).contiguous()
    overflow = ~torch.isfinite(cast) & torch.isfinite(value.detach().cpu())
    if overflow.any():
        biggest = float(value.detach()[overflow.to(value.device)].abs().max())
        raise DictionaryFormatError(
            f"{key} holds a weight of magnitude {biggest:.4g}, beyond the largest finite "
            f"{dtype} ({torch.finfo(getattr(torch, dtype)).max:g}): saved as {dtype} it would "
            f"become infinite. Save with dtype='float32' or 'bfloat16'.")
    return cast


def _lock_folder(path: Path):
    """Hold the save lock of dictionary folder ``path`` (a file beside it: the folder itself is
    swapped out by the save) until the returned file is closed."""
    try:
        return hold_lock(path.parent / f".{path.name}.lock")
    except LockHeld as held:
        raise DictionaryFormatError(
            f"The dictionary folder {str(path)!r} is being saved by another save ({held.holder});"
            f" two saves into one folder would replace each other. Wait for that one to finish "
            f"and save again, or save under another name.") from None


def _checksums(folder: Path) -> dict[str, str]:
    """SHA-256 of every file of a saved dictionary but ``sae_nb.json`` (which holds them)."""
    return {name: file_sha256(folder / name) for name in (CFG_FILE, WEIGHTS_FILE, SPARSITY_FILE)
            if (folder / name).exists()}


def changed_files(path: Path, meta: dict, names, full: bool = False) -> list[str]:
    """What is wrong with each of the files ``names`` of the dictionary at ``path`` against the
    checksums its ``sae_nb.json`` (``meta``) recorded: missing or changed. A file is hashed
    when ``full``, or when its size or mtime differs from the one recorded beside the checksum
    (or none was); a file without a recorded checksum is not checked."""
    recorded, stamps = meta.get("checksums"), meta.get("stat")
    recorded = recorded if isinstance(recorded, dict) else {}
    stamps = stamps if isinstance(stamps, dict) and not full else {}
    saved_ns = (path / META_FILE).stat().st_mtime_ns if stamps else None
    problems = []
    for name in names:
        digest = recorded.get(name)
        if name not in recorded:
            continue
        if not isinstance(digest, str):
            problems.append(f"{name} has no valid checksum recorded ({digest!r})")
            continue
        problem, _ = changed_file(path / name, digest, stamps.get(name), saved_ns)
        if problem:
            problems.append(f"{name} {problem.replace('written', 'saved')}")
    return problems


def verify_dictionary(path: str | Path) -> dict[str, str]:
    """Check a saved dictionary's files against the SHA-256 sums ``save_dictionary`` recorded in
    ``sae_nb.json``, reading every byte of every file (sparsity.safetensors too). A load
    checks only the files it reads, and trusts a file whose size and mtime are the recorded
    ones; call this before publishing figures made with a dictionary, or after a disk error.

    Returns ``{file name: sha256}`` when every file matches; raises
    :class:`DictionaryFormatError` listing each file that changed or is missing.
    """
    path = Path(path)
    meta_file = path / META_FILE
    if not meta_file.exists():
        raise DictionaryFormatError(f"{str(path)!r} has no {META_FILE}: only dictionaries written "
                                    f"by save_dictionary carry checksums.")
    recorded = read_json(meta_file).get("checksums")
    if not isinstance(recorded, dict) or not recorded:
        raise DictionaryFormatError(
            f"{str(meta_file)!r} records no checksums (saved before sae_nb recorded them): load "
            f"the dictionary and write it again with save_dictionary to add them.")
    problems = changed_files(path, {"checksums": recorded}, list(recorded), full=True)
    if problems:
        raise DictionaryFormatError(
            f"{str(path)!r} failed verification: {'; '.join(problems)}. Its numbers cannot be "
            f"trusted: restore the folder from a good copy, or train and save it again.")
    return dict(recorded)


def _json_default(value: Any):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (tuple, set)):
        return list(value)
    return str(value)


# -- reading dictionary files: every fault becomes a DictionaryFormatError naming the file ----
def read_json(file: str | Path) -> dict:
    """The JSON object in ``file``."""
    file = Path(file)
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DictionaryFormatError(f"{str(file)!r} is not valid JSON: {err}") from None
    except OSError as err:
        raise DictionaryFormatError(f"{str(file)!r} cannot be read: {err}") from None
    if not isinstance(value, dict):
        raise DictionaryFormatError(f"{str(file)!r} holds a JSON {type(value).__name__}, not a "
                                    f"JSON object of settings.")
    return value


def config_int(cfg: dict, key: str, file: str | Path, minimum: int = 1) -> int:
    """``cfg[key]`` as a whole number of at least ``minimum``."""
    if key not in cfg:
        raise DictionaryFormatError(f"{str(file)!r} lacks key {key!r}.")
    value = cfg[key]
    try:
        number = int(value) if isinstance(value, (int, float, str)) \
            and not isinstance(value, bool) else None
    except (ValueError, OverflowError):
        number = None
    if number is None or number != float(value) or number < minimum:
        raise DictionaryFormatError(f"{str(file)!r}: {key}={value!r} must be a whole number "
                                    f">= {minimum}.")
    return number


def safetensors_shapes(file: str | Path) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in a safetensors file, from its header alone (no tensor read)."""
    file = Path(file)
    if not file.exists():
        raise DictionaryFormatError(f"{str(file)!r} is missing.")
    try:
        with safe_open(file, framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise DictionaryFormatError(f"{str(file)!r} is corrupt or truncated: {err}") from None


def read_safetensors(file: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file."""
    file = Path(file)
    if not file.exists():
        raise DictionaryFormatError(f"{str(file)!r} is missing.")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise DictionaryFormatError(f"{str(file)!r} is corrupt or truncated: {err}") from None


def check_shapes(shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]],
                 file: str | Path, what: str) -> None:
    """Each ``expected`` key is in ``shapes`` with that shape; ``what`` names the source of the
    expected sizes in the error (e.g. "cfg.json (d_in=576, d_sae=4608)")."""
    for key, shape in expected.items():
        if key not in shapes:
            raise DictionaryFormatError(f"{str(file)!r} lacks tensor {key!r} (found "
                                        f"{sorted(shapes)}).")
        if tuple(shapes[key]) != tuple(shape):
            raise DictionaryFormatError(
                f"{str(file)!r}: {key} has shape {tuple(shapes[key])}, but {what} implies "
                f"{tuple(shape)} (a transposed weight, or a config that does not match the "
                f"tensors).")


# What our format loads: the trainable architectures by their saved names ("relu" is an alias).
_OUR_CLASSES = {name: cls for name, cls in ARCHITECTURES.items() if name != "relu"}


def load_sae_nb(path: str | Path) -> Dictionary:
    """Load a dictionary saved by :func:`save_dictionary` (or any SAELens v6 standard, topk or
    jumprelu folder). The sizes in cfg.json are checked against the weights file's header before
    anything is allocated, then cfg.json and the weights against the checksums in sae_nb.json
    (hashing only a file whose size or mtime is not the recorded one); every fault raises
    :class:`DictionaryFormatError`."""
    path = Path(path)
    for name in (CFG_FILE, WEIGHTS_FILE):
        if not (path / name).exists():
            raise DictionaryFormatError(f"{str(path)!r} has no {name}; not a saved dictionary.")
    cfg_file, weights_file = path / CFG_FILE, path / WEIGHTS_FILE
    cfg = read_json(cfg_file)
    meta = read_json(path / META_FILE) if (path / META_FILE).exists() else {}
    d_in, d_sae = config_int(cfg, "d_in", cfg_file), config_int(cfg, "d_sae", cfg_file)
    arch = meta.get("architecture") or cfg.get("architecture")
    if arch not in _OUR_CLASSES:
        raise DictionaryFormatError(f"{str(path)!r}: unknown architecture {arch!r}; supported: "
                                    f"{list(_OUR_CLASSES)}.")
    kw: dict[str, Any] = {"apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input", True))}
    if issubclass(_OUR_CLASSES[arch], TopKSAE | BatchTopKSAE):  # SAELens has no batchtopk:
        kw["k"] = config_int(cfg, "k", cfg_file) if arch != "batchtopk" else \
            config_int(meta, "k", path / META_FILE)  # its k lives in sae_nb.json
        if kw["k"] > d_sae:
            raise DictionaryFormatError(f"{str(path)!r}: k={kw['k']} exceeds d_sae={d_sae}.")
    what = f"cfg.json (d_in={d_in}, d_sae={d_sae})"
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if arch == "topk_skip":
        shapes["W_skip"] = (d_in, d_in)
    check_shapes(safetensors_shapes(weights_file), shapes, weights_file, what)
    changed = changed_files(path, meta, (CFG_FILE, WEIGHTS_FILE))
    if changed:
        raise DictionaryFormatError(
            f"{str(path)!r}: {'; '.join(changed)}. Its numbers cannot be trusted: restore the "
            f"folder from a good copy, or train and save it again.")
    weights = read_safetensors(weights_file)
    sae: Dictionary = _OUR_CLASSES[arch](d_in, d_sae, **kw)
    expected = {k: tuple(v.shape) for k, v in sae.state_dict().items()}
    check_shapes({k: tuple(v.shape) for k, v in weights.items()}, expected, weights_file, what)
    sae.load_state_dict({k: weights[k].float() for k in expected})
    sae.metadata = {"format": "sae_nb", "path": str(path),
                    **{k: meta.get(k) for k in ("model", "site", "target_site", "metrics",
                                                "train_config")}}
    return sae.eval()


def load_default_dictionary() -> Dictionary:
    """The shipped TopK dictionary of the default model at ``resid_out_layer6``."""
    if not (DEFAULT_DICTIONARY / CFG_FILE).exists():
        raise DictionaryFormatError(f"The shipped dictionary is missing at "
                                    f"{str(DEFAULT_DICTIONARY)!r}; see dictionaries/README.md "
                                    f"for the command that trains it.")
    return load_sae_nb(DEFAULT_DICTIONARY)


def dictionary_path(root: str | Path, model: str, site: str, name: str) -> Path:
    """``root/<model>/<site>/<name>``; a model given as a local folder goes by its folder name."""
    model_dir = Path(model).name if Path(model).is_dir() else model
    return Path(root) / folder_name(model_dir) / folder_name(site) / folder_name(name)


def save_trained(result, root: str | Path, name: str, store, evaluation=None,
                 dtype: str | torch.dtype = "float32") -> Path:
    """Save a :class:`~sae_nb.training.trainer.TrainResult` as notebook 02 does, at
    ``root/<model>/<site>/<name>``: the store it was trained on names the model, site, context
    size and corpus; ``evaluation`` (an :class:`~sae_nb.training.evaluate.Evaluation`) adds its
    metrics and the firing densities."""
    m = store.manifest
    metrics = density = None
    if evaluation is not None:
        metrics, density = evaluation.metrics.to_dict("records")[0], evaluation.density
    return save_dictionary(
        result.dictionary, dictionary_path(root, m["model"], m["site"], name), model=m["model"],
        site=m["site"], context_size=m.get("ctx_len"), dataset=m.get("corpus"), density=density,
        train_config=result.settings(), metrics=metrics, dtype=dtype)


def folder_files(folder: str | Path) -> pd.DataFrame:
    """The files of a folder with their sizes, e.g. a saved dictionary."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file())
    return pd.DataFrame({"file": [p.name for p in files],
                         "KB": [round(p.stat().st_size / 1024, 1) for p in files]})
