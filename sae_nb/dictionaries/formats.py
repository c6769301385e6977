"""Load dictionaries saved by other libraries into our
:class:`~sae_nb.dictionaries.architectures.Dictionary`.

``load_dictionary(path)`` detects the format from the files (``format=`` overrides) and returns
a dictionary whose ``encode``/``decode``/``forward`` reproduce the original library's maths,
with ``dictionary.metadata = {"format", "model", "site", "hook", "path"}``: ``hook`` is the
original hook or submodule name, ``site`` our site name where it can be derived, else None.
The layouts, as each library writes them:

- ``dictionary_learning`` (saprmarks): ``ae.pt`` + ``config.json``, every ``dict_class``, also a
  ``{"ae": state_dict}`` backup. ``AutoEncoder`` weights are loaded as stored: we do NOT copy its
  loader's rescaling of decoder rows to unit norm (it leaves reconstructions unchanged and
  scales latents), so latents are in the units the dictionary was trained in.
- ``saelens``: ``cfg.json`` (v6 or pre-v6 flat keys) + ``sae_weights.safetensors``; ``standard``,
  ``topk``, ``jumprelu``, ``gated``. ``sae_nb``, our own format, is SAELens v6 + ``sae_nb.json``.
- ``sparsify`` (EleutherAI): a hookpoint folder ``cfg.json`` + ``sae.safetensors``. Assumed site
  mapping: ``layers.L`` is the output of block L (``resid_out_layerL``), ``layers.L.mlp`` the MLP
  output (``mlp_out_layerL``), ``layers.L.self_attn``/``.attention``/``.attn`` ``attn_out_layerL``.
- ``openai``: one ``.pt`` per layer (GPT-2 small); TopK ones normalise their input
  (:class:`~sae_nb.dictionaries.architectures.NormalizedTopKSAE`). The site comes from the
  published layout ``<location>[_v4|_v5_32k|_v5_128k]/autoencoders/<layer>.pt``; elsewhere pass
  ``site=``.
- ``gemma_scope``: ``params.npz`` (JumpReLU).

JumpReLU thresholds are clamped at 0: every library computes ``relu(pre) * (pre > threshold)``,
which equals our ``pre * (pre > max(threshold, 0))``. Pickles are read only with
``torch.load(weights_only=True)``; anything that would run code is refused.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sae_nb.activations.sites import canonical_site, hook_name, is_site_name
from sae_nb.dictionaries.architectures import (
    Dictionary,
    GatedSAE,
    JumpReLUSAE,
    NormalizedTopKSAE,
    ReLUSAE,
    SkipTopKSAE,
    TopKSAE,
)
from sae_nb.dictionaries.saving import (
    META_FILE,
    DictionaryFormatError,
    check_shapes,
    config_int,
    load_sae_nb,
    read_json,
    read_safetensors,
)

FORMATS = ("dictionary_learning", "saelens", "sae_nb", "sparsify", "openai", "gemma_scope")
# OpenAI's published GPT-2 small locations (``sparse_autoencoder/paths.py`` in the
# openai/sparse_autoencoder repository), as our site at layer L and the TransformerLens hook
# that repository's README names. resid_post_attn (hook_resid_mid) and
# mlp_post_act (mlp.hook_post) have no named site: they are GPT-2 module paths, the inputs of
# ln_2 and of the MLP's c_proj.
_OPENAI_LOCATIONS = {
    "resid_post_mlp": ("resid_out_layer{L}", "hook_resid_post"),
    "resid_delta_mlp": ("mlp_out_layer{L}", "hook_mlp_out"),
    "resid_delta_attn": ("attn_out_layer{L}", "hook_attn_out"),
    "resid_post_attn": ("transformer.h.{L}.ln_2:input", "hook_resid_mid"),
    "mlp_post_act": ("transformer.h.{L}.mlp.c_proj:input", "mlp.hook_post"),
}
# A release folder: the location, then nothing (v1), _v4, _v5_32k or _v5_128k.
_OPENAI_FOLDER = re.compile(r"^(" + "|".join(_OPENAI_LOCATIONS) + r")(?:_v\d+(?:_\d+k)?)?$")


def load_dictionary(path: str | Path, format: str | None = None,
                    site: str | None = None) -> Dictionary:
    """Load a dictionary file or folder of any supported format (see the module docstring).

    ``site`` sets the site the dictionary reads when its files do not say (or say wrongly).
    """
    path = Path(path)
    if not path.exists():
        raise DictionaryFormatError(f"{str(path)!r} does not exist.")
    fmt = format or detect_format(path)
    loaders = {"dictionary_learning": _load_dictionary_learning, "saelens": _load_saelens,
               "sae_nb": _load_our_format, "sparsify": _load_sparsify,
               "openai": lambda p: _load_openai(p, site), "gemma_scope": _load_gemma_scope}
    if fmt not in loaders:
        raise DictionaryFormatError(f"Unknown format {fmt!r}; supported formats: {list(FORMATS)}.")
    sae = loaders[fmt](path)
    if site is not None:
        sae.metadata["site"] = site
    sae.metadata["path"] = str(path)
    return sae.eval()


def detect_format(path: Path) -> str:
    """The format of a file or folder, from file names, files present and (for ``.pt``) keys."""
    folder = path if path.is_dir() else path.parent
    if path.is_file():
        if path.suffix == ".npz":
            return "gemma_scope"
        if path.suffix == ".pt":
            obj = _safe_torch_load(path)
            openai = isinstance(obj, dict) and "pre_bias" in obj
            return "openai" if openai else "dictionary_learning"
        if path.suffix not in (".json", ".safetensors"):
            raise DictionaryFormatError(_unknown(path))
    names = {p.name for p in folder.iterdir()}
    if META_FILE in names:
        return "sae_nb"
    if {"cfg.json", "sae_weights.safetensors"} <= names:
        return "saelens"
    if {"cfg.json", "sae.safetensors"} <= names:
        return "sparsify"
    if "ae.pt" in names:
        return "dictionary_learning"
    if "params.npz" in names:
        return "gemma_scope"
    hookpoints = sorted(p.name for p in folder.iterdir() if (p / "sae.safetensors").exists())
    if hookpoints:
        raise DictionaryFormatError(
            f"{str(folder)!r} is a sparsify run folder with one dictionary per hookpoint: pick "
            f"one, e.g. load_dictionary({str(folder / hookpoints[0])!r}). Hookpoints: "
            f"{hookpoints}.")
    raise DictionaryFormatError(_unknown(path))


def _unknown(path: Path) -> str:
    return (f"Cannot tell the dictionary format of {str(path)!r}. Supported formats: "
            f"{list(FORMATS)} (pass format=... to choose one); see the sae_nb.dictionaries.formats "
            f"docstring for the files each one needs.")


# -- reading files safely -------------------------------------------------------------------
def _safe_torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "weights_only" in str(err).lower():
            raise DictionaryFormatError(
                f"{str(path)!r} was NOT loaded: unpickling it would execute code or build "
                f"objects other than tensors, ints, strings and dicts (refused by "
                f"torch.load(weights_only=True)). Only load it if you trust its source, and "
                f"convert it to a plain state_dict. Detail: {str(err).splitlines()[0]}") from None
        raise DictionaryFormatError(f"{str(path)!r} is corrupt or truncated: {err}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise DictionaryFormatError(f"{str(path)!r} is corrupt or truncated: {err}") from None


def _take(tensors: dict, key: str, shape: tuple[int, ...], file: Path, what: str) -> torch.Tensor:
    """``tensors[key]`` as float32, after checking it exists and has ``shape``."""
    if key not in tensors or not isinstance(tensors[key], torch.Tensor):
        raise DictionaryFormatError(f"{str(file)!r} lacks tensor {key!r} (found "
                                    f"{sorted(map(str, tensors))}).")
    check_shapes({key: tuple(tensors[key].shape)}, {key: shape}, file, what)
    return tensors[key].detach().to(torch.float32)


def _build(cls: type[Dictionary], D: int, F: int, params: dict[str, torch.Tensor],
           **kw: Any) -> Dictionary:
    """``cls(D, F, **kw)`` holding ``params``. Every loader checks all tensors (``_take``) into
    ``params`` first, so nothing of a size the files only claim is ever allocated."""
    sae = cls(D, F, **kw)
    with torch.no_grad():
        for name, value in params.items():
            getattr(sae, name).copy_(value)
    return sae


def _check_k(k: Any, F: int, file: Path) -> int:
    k = int(k) if isinstance(k, float) and k.is_integer() else k  # 32.0 in some configs
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= F:
        raise DictionaryFormatError(f"{str(file)!r}: k={k!r} must be a whole number in 1..{F}.")
    return k


def _meta(fmt: str, model: str | None, site: str | None, hook: Any) -> dict:
    return {"format": fmt, "model": model, "site": site, "hook": hook}


def _site_in_path(path: Path) -> str | None:
    """A site name among the last three folders (``<model>/<site>/<set>/ae.pt``)."""
    return next((p for p in reversed(path.parts[-3:]) if is_site_name(p)), None)


# -- dictionary_learning --------------------------------------------------------------------
def _load_dictionary_learning(path: Path) -> Dictionary:
    file = path / "ae.pt" if path.is_dir() else path
    if not file.exists():
        raise DictionaryFormatError(f"{str(path)!r} has no ae.pt; not a dictionary_learning "
                                    f"folder.")
    sd = _safe_torch_load(file)
    if isinstance(sd, dict) and isinstance(sd.get("ae"), dict):
        sd = sd["ae"]  # a mid-training backup
    if not isinstance(sd, dict):
        raise DictionaryFormatError(f"{str(file)!r} holds a {type(sd).__name__}, not a state_dict.")
    folder = file.parent.parent if file.parent.name == "checkpoints" else file.parent
    cfg_file = folder / "config.json"
    trainer = read_json(cfg_file).get("trainer", {}) if cfg_file.exists() else {}
    trainer = trainer if isinstance(trainer, dict) else {}  # older releases: be lenient
    dict_class = trainer.get("dict_class") or _guess_dict_class(sd, file)
    if isinstance(sd.get("encoder.weight"), torch.Tensor) and sd["encoder.weight"].ndim == 2:
        F, D = tuple(sd["encoder.weight"].shape)
    elif isinstance(sd.get("W_enc"), torch.Tensor) and sd["W_enc"].ndim == 2:
        D, F = tuple(sd["W_enc"].shape)
    else:
        raise DictionaryFormatError(f"{str(file)!r} has neither encoder.weight nor W_enc.")
    D = config_int(trainer, "activation_dim", cfg_file) if "activation_dim" in trainer else D
    F = config_int(trainer, "dict_size", cfg_file) if "dict_size" in trainer else F
    what = f"d_in={D}, d_sae={F} ({'config.json' if trainer else 'tensor shapes'})"

    def t(key, *shape):
        return _take(sd, key, shape, file, what)

    if dict_class == "AutoEncoder":
        sae = _build(ReLUSAE, D, F, dict(W_enc=t("encoder.weight", F, D).T,
                                         b_enc=t("encoder.bias", F),
                                         W_dec=t("decoder.weight", D, F).T, b_dec=t("bias", D)))
    elif dict_class == "AutoEncoderNew":
        sae = _build(ReLUSAE, D, F, dict(W_enc=t("encoder.weight", F, D).T,
                                         b_enc=t("encoder.bias", F),
                                         W_dec=t("decoder.weight", D, F).T,
                                         b_dec=t("decoder.bias", D)), apply_b_dec_to_input=False)
    elif dict_class == "GatedAutoEncoder":
        sae = _build(GatedSAE, D, F, dict(W_enc=t("encoder.weight", F, D).T,
                                          b_gate=t("gate_bias", F), r_mag=t("r_mag", F),
                                          b_mag=t("mag_bias", F),
                                          W_dec=t("decoder.weight", D, F).T,
                                          b_dec=t("decoder_bias", D)))
    elif dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        k = int(t("k").item()) if "k" in sd else trainer.get("k", 0)
        enc = dict(W_enc=t("encoder.weight", F, D).T, b_enc=t("encoder.bias", F),
                   W_dec=t("decoder.weight", D, F).T, b_dec=t("b_dec", D))
        if dict_class == "AutoEncoderTopK":
            sae = _build(TopKSAE, D, F, enc, k=_check_k(k, F, file))
        else:  # inference uses the learned threshold: relu(pre) * (relu(pre) > threshold)
            enc["threshold"] = t("threshold").clamp_min(0).expand(F)
            sae = _build(JumpReLUSAE, D, F, enc)
            sae.k = k
    elif dict_class == "MatryoshkaBatchTopKSAE":
        sae = _build(JumpReLUSAE, D, F, dict(W_enc=t("W_enc", D, F), b_enc=t("b_enc", F),
                                             W_dec=t("W_dec", F, D), b_dec=t("b_dec", D),
                                             threshold=t("threshold").clamp_min(0).expand(F)))
        sae.k = int(t("k").item())
    elif dict_class == "JumpReluAutoEncoder":
        apply = bool(trainer.get("apply_b_dec_to_input", False))
        sae = _build(JumpReLUSAE, D, F, dict(W_enc=t("W_enc", D, F), b_enc=t("b_enc", F),
                                             W_dec=t("W_dec", F, D), b_dec=t("b_dec", D),
                                             threshold=t("threshold", F).clamp_min(0)),
                     apply_b_dec_to_input=apply)
    else:
        raise DictionaryFormatError(
            f"{str(file)!r}: unknown dictionary_learning dict_class {dict_class!r}; supported: "
            f"AutoEncoder, AutoEncoderNew, GatedAutoEncoder, AutoEncoderTopK, BatchTopKSAE, "
            f"JumpReluAutoEncoder, MatryoshkaBatchTopKSAE.")
    submodule = trainer.get("submodule_name")
    site = _site_in_path(folder) or _dl_site(submodule, trainer.get("layer"))
    sae.metadata = _meta("dictionary_learning", trainer.get("lm_name"), site, submodule)
    return sae


def _guess_dict_class(sd: dict, file: Path) -> str:
    """The dict_class from the state_dict keys alone (no or old config.json)."""
    keys = set(sd)
    if "group_sizes" in keys:
        return "MatryoshkaBatchTopKSAE"
    if {"W_enc", "threshold"} <= keys:
        return "JumpReluAutoEncoder"
    if "r_mag" in keys:
        return "GatedAutoEncoder"
    if "k" in keys:  # TopK and BatchTopK share keys: only config.json tells them apart
        warnings.warn(f"{str(file)!r}: no config.json dict_class; AutoEncoderTopK and BatchTopKSAE "
                      f"share keys, loading as AutoEncoderTopK (per-token top-k). Add a "
                      f"config.json to load a BatchTopKSAE with its threshold.", stacklevel=3)
        return "AutoEncoderTopK"
    if "bias" in keys:
        return "AutoEncoder"
    if "decoder.bias" in keys:
        return "AutoEncoderNew"
    raise DictionaryFormatError(f"{str(file)!r}: cannot tell the dictionary_learning class from "
                                f"its keys {sorted(keys)}; add a config.json with dict_class.")


def _dl_site(submodule: str | None, layer: Any) -> str | None:
    """Our site from dictionary_learning's ``submodule_name`` and ``layer`` (best effort)."""
    if not submodule:
        return None
    s = submodule.lower()
    m = re.search(r"(\d+)", s)
    layer = int(layer) if isinstance(layer, int) else (int(m.group(1)) if m else None)
    if "embed" in s:
        return "embed"
    if layer is None:
        return None
    kind = "mlp_out" if "mlp" in s else "attn_out" if "attn" in s or "attention" in s else \
        "resid_out" if "resid" in s or re.fullmatch(r".*layers?[._]?\d+", s) else None
    return f"{kind}_layer{layer}" if kind else None


# -- SAELens and our own format -------------------------------------------------------------
def _load_saelens(path: Path) -> Dictionary:
    folder = path if path.is_dir() else path.parent
    if not (folder / "cfg.json").exists():
        raise DictionaryFormatError(f"{str(folder)!r} has no cfg.json; not a SAELens folder.")
    cfg = read_json(folder / "cfg.json")
    file = folder / "sae_weights.safetensors"
    w = read_safetensors(file)
    meta = cfg.get("metadata") or {}
    arch = cfg.get("architecture", "standard")
    act = cfg.get("activation_fn") or cfg.get("activation_fn_str") or "relu"
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if act == "topk":
        arch = "topk"
    D, F = (config_int(cfg, key, folder / "cfg.json") for key in ("d_in", "d_sae"))
    norm = cfg.get("normalize_activations", "none")
    norm = {True: "expected_average_only_in", False: "none", None: "none"}.get(norm, norm)
    if norm not in ("none", "expected_average_only_in"):
        raise DictionaryFormatError(f"{str(folder)!r}: normalize_activations={norm!r} is applied "
                                    f"at run time and is not supported; only 'none' and "
                                    f"'expected_average_only_in' (folded into the weights) are.")
    if "scaling_factor" in w:
        if not torch.all(w.pop("scaling_factor") == 1):
            raise DictionaryFormatError(f"{str(file)!r}: scaling_factor is not all ones; fold it "
                                        f"into W_dec before loading.")
    what = f"cfg.json (d_in={D}, d_sae={F})"

    def t(key, *shape):
        return _take(w, key, shape, file, what)

    kw = {"apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input", True))}
    common = dict(W_enc=t("W_enc", D, F), W_dec=t("W_dec", F, D), b_dec=t("b_dec", D))
    if arch == "gated":
        sae: Dictionary = _build(GatedSAE, D, F, dict(**common, b_gate=t("b_gate", F),
                                                      r_mag=t("r_mag", F), b_mag=t("b_mag", F)),
                                 **kw)
    elif arch in ("standard", "topk", "jumprelu"):
        if cfg.get("rescale_acts_by_decoder_norm"):
            raise DictionaryFormatError(f"{str(folder)!r}: rescale_acts_by_decoder_norm=True is "
                                        f"not supported.")
        common["b_enc"] = t("b_enc", F)
        if arch == "topk":
            sae = _build(TopKSAE, D, F, common, k=_check_k(k, F, file), **kw)
        elif arch == "jumprelu":
            sae = _build(JumpReLUSAE, D, F, {**common, "threshold": t("threshold", F).clamp_min(0)},
                         **kw)
        else:
            sae = _build(ReLUSAE, D, F, common, **kw)
    else:
        raise DictionaryFormatError(f"{str(folder)!r}: unsupported SAELens architecture {arch!r}; "
                                    f"supported: standard, topk, jumprelu, gated.")
    hook = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    model = meta.get("model_name") or cfg.get("model_name")
    sae.metadata = _meta("saelens", model, canonical_site(hook) if hook else None, hook)
    sae.metadata["normalize_activations"] = norm
    return sae


def _load_our_format(path: Path) -> Dictionary:
    folder = path if path.is_dir() else path.parent
    sae = load_sae_nb(folder)
    site = sae.metadata.get("site")
    sae.metadata = {**sae.metadata, **_meta("sae_nb", sae.metadata.get("model"), site,
                                            hook_name(site) if site else None)}
    return sae


# -- sparsify -------------------------------------------------------------------------------
def _load_sparsify(path: Path) -> Dictionary:
    folder = path if path.is_dir() else path.parent
    cfg_file, file = folder / "cfg.json", folder / "sae.safetensors"
    if not cfg_file.exists():
        detect_format(folder)  # a run folder: the error lists its hookpoints
        raise DictionaryFormatError(f"{str(folder)!r} has no cfg.json; not a sparsify hookpoint.")
    cfg, w = read_json(cfg_file), read_safetensors(file)
    if "encoder.weight" not in w or w["encoder.weight"].ndim != 2:
        raise DictionaryFormatError(f"{str(file)!r} lacks the 2-d tensor 'encoder.weight'.")
    D = config_int(cfg, "d_in", cfg_file) if cfg.get("d_in") else w["encoder.weight"].shape[1]
    F = config_int(cfg, "num_latents", cfg_file) if cfg.get("num_latents") else \
        D * config_int(cfg, "expansion_factor", cfg_file) if cfg.get("expansion_factor") else \
        w["encoder.weight"].shape[0]
    if cfg.get("activation", "topk") != "topk":
        raise DictionaryFormatError(f"{str(cfg_file)!r}: activation {cfg.get('activation')!r} is "
                                    f"not supported (only 'topk').")
    what = f"cfg.json (d_in={D}, num_latents={F})"

    def t(key, *shape):
        return _take(w, key, shape, file, what)

    skip = "W_skip" in w or bool(cfg.get("skip_connection"))
    kw = {"apply_b_dec_to_input": not cfg.get("transcode", False)}
    params = dict(W_enc=t("encoder.weight", F, D).T, b_enc=t("encoder.bias", F),
                  W_dec=t("W_dec", F, D), b_dec=t("b_dec", D))
    if skip:
        params["W_skip"] = t("W_skip", D, D)
    sae = _build(SkipTopKSAE if skip else TopKSAE, D, F, params,
                 k=_check_k(cfg.get("k", 0), F, cfg_file), **kw)
    run_cfg = folder.parent / "config.json"
    model = read_json(run_cfg).get("model") if run_cfg.exists() else None
    sae.metadata = _meta("sparsify", model, _sparsify_site(folder.name), folder.name)
    return sae


def _sparsify_site(hookpoint: str) -> str | None:
    m = re.fullmatch(r"(?:.*\.)?layers\.(\d+)(?:\.(mlp|self_attn|attention|attn))?", hookpoint)
    if not m:
        return None
    kind = {None: "resid_out", "mlp": "mlp_out"}.get(m.group(2), "attn_out")
    return f"{kind}_layer{m.group(1)}"


# -- OpenAI and Gemma Scope -----------------------------------------------------------------
def _load_openai(path: Path, site: str | None = None) -> Dictionary:
    if path.is_dir():
        raise DictionaryFormatError(f"{str(path)!r} is a folder; pass the OpenAI .pt file itself.")
    sd = _safe_torch_load(path)
    if not isinstance(sd, dict) or not isinstance(sd.get("encoder.weight"), torch.Tensor) \
            or sd["encoder.weight"].ndim != 2:
        raise DictionaryFormatError(f"{str(path)!r} is not an OpenAI autoencoder dict (needs "
                                    f"pre_bias, encoder.weight, latent_bias, decoder.weight).")
    F, D = tuple(sd["encoder.weight"].shape)
    what = f"encoder.weight (d_in={D}, d_sae={F})"

    def t(key, *shape):
        return _take(sd, key, shape, path, what)

    params = dict(W_enc=t("encoder.weight", F, D).T, b_enc=t("latent_bias", F),
                  W_dec=t("decoder.weight", D, F).T, b_dec=t("pre_bias", D))
    act = sd.get("activation", "ReLU")
    if act == "TopK":
        activation = sd.get("activation_state_dict")
        k = activation.get("k", 0) if isinstance(activation, dict) else 0
        sae: Dictionary = _build(NormalizedTopKSAE, D, F, params, k=_check_k(k, F, path))
    elif act == "ReLU":
        sae = _build(ReLUSAE, D, F, params)
    else:
        raise DictionaryFormatError(f"{str(path)!r}: unsupported activation {act!r} "
                                    f"(ReLU or TopK).")
    found = _openai_site(path)
    if found is None and site is None:
        raise DictionaryFormatError(
            f"{str(path)!r}: cannot tell which GPT-2 activations this OpenAI dictionary reads: "
            f"the folder {str(path.parent)!r} is not one of OpenAI's published layouts, "
            f"<location>[_v4|_v5_32k|_v5_128k]/autoencoders/<layer>.pt with location one of "
            f"{list(_OPENAI_LOCATIONS)}. Pass the site, e.g. load_dictionary({str(path)!r}, "
            f"site='resid_out_layer6') (resid_post_mlp is resid_out_layer<L>, resid_delta_mlp "
            f"mlp_out_layer<L>, resid_delta_attn attn_out_layer<L>).")
    found_site, hook = found or (site, hook_name(site))
    sae.metadata = _meta("openai", "gpt2", found_site, hook)
    return sae


def _openai_site(path: Path) -> tuple[str, str] | None:
    """(our site, TransformerLens hook) of a file in OpenAI's layout ``<location>[_<version>]/
    autoencoders/<layer>.pt``, e.g. ``resid_post_mlp_v5_32k/autoencoders/6.pt``; else None."""
    folder = path.parent.parent if path.parent.name == "autoencoders" else path.parent
    m = _OPENAI_FOLDER.match(folder.name)
    if m is None or not path.stem.isdigit():
        return None
    layer = int(path.stem)
    site, hook = _OPENAI_LOCATIONS[m.group(1)]
    return site.format(L=layer), f"blocks.{layer}.{hook}"


def _load_gemma_scope(path: Path) -> Dictionary:
    file = path / "params.npz" if path.is_dir() else path
    if not file.exists():
        raise DictionaryFormatError(f"{str(path)!r} has no params.npz; not a Gemma Scope folder.")
    try:
        with np.load(file, allow_pickle=False) as npz:
            w = {k: torch.from_numpy(np.asarray(npz[k], dtype=np.float32)) for k in npz.files}
    except Exception as err:  # BadZipFile, EOFError, ValueError... from a damaged archive
        raise DictionaryFormatError(f"{str(file)!r} is corrupt or truncated: {err}") from None
    if "W_enc" not in w or w["W_enc"].ndim != 2:
        raise DictionaryFormatError(f"{str(file)!r} lacks the 2-d tensor 'W_enc' (found "
                                    f"{sorted(w)}).")
    D, F = tuple(w["W_enc"].shape)
    what = f"W_enc (d_in={D}, d_sae={F})"

    def t(key, *shape):
        return _take(w, key, shape, file, what)

    sae = _build(JumpReLUSAE, D, F, dict(W_enc=t("W_enc", D, F), b_enc=t("b_enc", F),
                                         W_dec=t("W_dec", F, D), b_dec=t("b_dec", D),
                                         threshold=t("threshold", F).clamp_min(0)),
                 apply_b_dec_to_input=False)
    text = str(file)
    m = re.search(r"layer_(\d+)", text)
    kind = next((v for key, v in (("-res", "resid_out"), ("-mlp", "mlp_out"), ("-att", "attn_out"))
                 if key in text), None)
    site = f"{kind}_layer{m.group(1)}" if m and kind else None
    model = re.search(r"gemma-scope-(\d+b)", text)
    sae.metadata = _meta("gemma_scope", f"gemma-2-{model.group(1)}" if model else None, site,
                         hook_name(site) if site else None)
    return sae
