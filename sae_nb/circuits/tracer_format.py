"""circuit-tracer's local transcoder format: save our per-layer transcoders in it, load its
per-layer (PLT) and cross-layer (CLT) transcoder folders.

The layout, as circuit-tracer 0.5.0 reads it (``circuit_tracer.utils.caching``,
``load_transcoders_from_cache``; ``transcoder/single_layer_transcoder.py``,
``transcoder/cross_layer_transcoder.py``). A folder holds ``config.yaml``::

    model_name: HuggingFaceTB/SmolLM2-135M   # the model the set was trained on
    model_kind: transcoder_set               # or cross_layer_transcoder
    feature_input_hook: mlp.hook_in          # TransformerLens hook of block L the latents read
    feature_output_hook: mlp.hook_out        # ... and the one they write

and, for a PLT set, ``layer_{L}.safetensors`` for L = 0..n-1 with ``W_enc`` (F, D), ``W_dec``
(F, D), ``b_enc`` (F,), ``b_dec`` (D,), optionally ``W_skip`` (D, D) and
``activation_function.threshold`` (F,). A latent's activation is ``act(x @ W_enc.T + b_enc)``,
the output ``f @ W_dec + b_dec + x @ W_skip.T``; ``act`` is JumpReLU ``pre * (pre > threshold)``
where a threshold is stored, else ReLU. A CLT folder holds, for each source layer L,
``W_enc_{L}.safetensors`` (``W_enc_{L}`` (F, D), ``b_enc_{L}`` (F,), ``b_dec_{L}`` (D,),
optionally ``threshold_{L}`` (F,)) and ``W_dec_{L}.safetensors`` (``W_dec_{L}``
(F, n_layers - L, D)): a latent read at layer L writes ``W_dec_{L}[:, T - L]`` to the MLP output
of every layer T >= L, and layer T's output adds ``b_dec_{T}`` once. circuit-tracer's local CLT
loader reads no skip connection. ``TranscoderSet.to_safetensors`` and
``CrossLayerTranscoder.to_safetensors`` write these files without ``config.yaml``; such folders
load too (the hooks and model are then unknown).

TopK: circuit-tracer 0.5.0 has a ``TopK`` activation but no file key for it; its loader builds a
ReLU from any file without a threshold. We write ``activation_function: topk`` and ``top_k: k``
into ``config.yaml`` (keys circuit-tracer ignores), and ``benchmarks/circuit_tracer_side.py``
rebuilds the TopK itself. Our TopK keeps ``relu`` of the k largest pre-activations; circuit-
tracer's ``TopK`` keeps them as they are (the same whenever they are positive). A JumpReLU with a
threshold below 0 is saved with threshold 0 (our ``relu(pre) * (pre > t)`` is then ``relu(pre)``
either way) and refused on load, where circuit-tracer would let negative activations through.

Only safetensors and YAML (``yaml.safe_load``) are read: nothing here unpickles. A missing layer,
a tensor of the wrong shape, an unknown ``model_kind`` or activation function, a hub reference
and a corrupt file raise :class:`DictionaryFormatError` naming the file and the fix.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from sae_nb.dictionaries.architectures import Dictionary, JumpReLUSAE, ReLUSAE, TopKSAE
from sae_nb.dictionaries.saving import (
    DictionaryFormatError,
    check_shapes,
    read_safetensors,
    safetensors_shapes,
)
from sae_nb.util.io import atomic_folder

CONFIG_FILE = "config.yaml"
PLT_KIND, CLT_KIND = "transcoder_set", "cross_layer_transcoder"
ACTIVATIONS = ("relu", "jump_relu", "topk")
# circuit-tracer's hook names at block L and our sites reading the same tensor (Llama-like
# models: ``mlp.hook_in`` is the MLP's input, after ``post_attention_layernorm``).
_HOOK_SITES = {"mlp.hook_in": "mlp_in_layer{L}", "ln2.hook_normalized": "mlp_in_layer{L}",
               "mlp.hook_out": "mlp_out_layer{L}", "hook_mlp_out": "mlp_out_layer{L}"}
_NUMBERED = re.compile(r"^(layer|W_enc|W_dec)_(\d+)\.safetensors$")


@dataclass
class CrossLayerTranscoder:
    """A cross-layer transcoder: ``encoders[L]`` reads layer L's MLP input (its ``W_dec`` and
    ``b_dec`` are the decoder to layer L itself), ``decoders[L]`` (F, n_layers - L, D) writes the
    latents read at L into the MLP output of layers L..n-1, ``b_dec`` (n_layers, D)."""

    encoders: list[Dictionary]
    decoders: list[torch.Tensor]
    b_dec: torch.Tensor

    def __len__(self) -> int:
        return len(self.encoders)

    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """``(B, D) -> (B, F)``: the latents read at ``layer``."""
        return self.encoders[layer].encode(x)

    def reconstruct(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """``inputs[L]`` (B, D) the MLP input of each layer -> ``(n_layers, B, D)`` the predicted
        MLP outputs, ``b_dec[T] + sum over L <= T of encode(L, inputs[L]) @ decoders[L][:, T-L]``
        at layer T."""
        out = self.b_dec[:, None].repeat(1, inputs[0].shape[0], 1)  # (n_layers, B, D)
        for layer, x in enumerate(inputs):
            f = self.encode(layer, x)  # (B, F)
            out[layer:] += torch.einsum("bf,ftd->tbd", f, self.decoders[layer])
        return out


def save_tracer_transcoders(transcoders: Mapping[int, Dictionary] | Sequence[Dictionary],
                            folder: str | Path, model_name: str,
                            feature_input_hook: str = "mlp.hook_in",
                            feature_output_hook: str = "mlp.hook_out",
                            skips: Mapping[int, torch.Tensor] | None = None) -> Path:
    """Write per-layer transcoders (``transcoders[L]`` reads layer L's MLP input, predicts its
    output) as a circuit-tracer PLT folder, atomically. ``skips[L]`` (D, D) is layer L's skip
    connection (the output adds ``x @ skips[L].T``); a ``SkipTopKSAE``'s own ``W_skip`` is used
    where ``skips`` gives none. ReLU, JumpReLU and TopK transcoders can be saved."""
    by_layer = _as_layers(transcoders)
    skips = dict(skips or {})
    d_model, d_sae = by_layer[0].d_in, by_layer[0].d_sae
    files, activations, ks = {}, [], []
    for layer, tc in enumerate(by_layer):
        if (tc.d_in, tc.d_sae) != (d_model, d_sae):
            raise DictionaryFormatError(
                f"Transcoder {layer} is {tc.d_in} x {tc.d_sae} but transcoder 0 is {d_model} x "
                f"{d_sae}: circuit-tracer needs one width for every layer; save sets of equal "
                f"widths.")
        act, k = _activation_of(layer, tc)
        activations.append(act)
        ks.append(k)
        files[f"layer_{layer}.safetensors"] = _plt_tensors(layer, tc, act, skips.pop(layer, None))
    if skips:
        raise DictionaryFormatError(f"skips has layers {sorted(skips)} beyond the "
                                    f"{len(by_layer)} transcoders; give skips for layers "
                                    f"0..{len(by_layer) - 1} only.")
    config = {"model_name": str(model_name), "model_kind": PLT_KIND,
              "feature_input_hook": feature_input_hook, "feature_output_hook": feature_output_hook,
              "activation_function": activations[0] if len(set(activations)) == 1 else activations}
    if "topk" in activations:
        config["top_k"] = ks[0] if len(set(ks)) == 1 else ks
    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        for name, tensors in files.items():
            save_file(tensors, tmp / name)
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return folder


def load_tracer_transcoders(folder: str | Path) -> tuple[
        dict[int, Dictionary] | CrossLayerTranscoder, dict[int, torch.Tensor], dict]:
    """Load a circuit-tracer transcoder folder (see the module docstring).

    Returns ``(transcoders, skips, metadata)``. For a PLT set ``transcoders`` is
    ``{L: Dictionary}`` (TopK, JumpReLU or ReLU, reading ``x`` without a ``b_dec`` shift) and
    ``skips`` ``{L: W_skip (D, D)}`` for the layers that have one (their output adds
    ``x @ W_skip.T``); for a CLT ``transcoders`` is a :class:`CrossLayerTranscoder` and ``skips``
    is empty. ``metadata`` holds ``model_kind``, ``model_name``, the two hooks, ``scan``, the
    activation functions and ``path``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DictionaryFormatError(f"{str(folder)!r} is not a folder; point at the folder holding "
                                    f"circuit-tracer's config.yaml and safetensors files.")
    config = _read_config(folder)
    kind = config.get("model_kind") or _kind_from_files(folder)
    if kind not in (PLT_KIND, CLT_KIND):
        raise DictionaryFormatError(
            f"{str(folder / CONFIG_FILE)!r}: model_kind={kind!r} is not one circuit-tracer "
            f"writes; it must be {PLT_KIND!r} or {CLT_KIND!r}.")
    metadata = {"format": "circuit_tracer", "model_kind": kind, "path": str(folder),
                **{key: config.get(key) for key in
                   ("model_name", "feature_input_hook", "feature_output_hook", "scan")}}
    if kind == PLT_KIND:
        transcoders, skips, acts = _load_plt(folder, config, metadata)
        metadata["activation_function"] = acts
        return transcoders, skips, metadata
    clt = _load_clt(folder, config, metadata)
    metadata["activation_function"] = [_clt_activation(e) for e in clt.encoders]
    return clt, {}, metadata


# -- saving -----------------------------------------------------------------------------------
def _as_layers(transcoders) -> list[Dictionary]:
    if isinstance(transcoders, Mapping):
        layers = sorted(transcoders)
        if not layers or layers != list(range(len(layers))):
            missing = sorted(set(range(max(layers, default=-1) + 1)) - set(layers))
            raise DictionaryFormatError(
                f"The transcoders cover layers {layers}: circuit-tracer needs one per layer "
                f"0..n-1 (missing {missing or 'all'}); give a transcoder for every layer.")
        transcoders = [transcoders[layer] for layer in layers]
    transcoders = list(transcoders)
    if not transcoders:
        raise DictionaryFormatError("No transcoders to save; give one per layer 0..n-1.")
    for layer, tc in enumerate(transcoders):
        if not isinstance(tc, Dictionary) or tc.folded_encoder() is None:
            raise DictionaryFormatError(
                f"Transcoder {layer} is a {type(tc).__name__}: circuit-tracer's format holds "
                f"affine encoders only; save TopK, JumpReLU or ReLU transcoders.")
    return transcoders


def _activation_of(layer: int, tc: Dictionary) -> tuple[str, int | None]:
    if isinstance(tc, TopKSAE):
        return "topk", int(tc.k)
    if isinstance(tc, JumpReLUSAE):  # BatchTopK saves as its inference-time JumpReLU
        return "jump_relu", None
    if isinstance(tc, ReLUSAE):
        return "relu", None
    raise DictionaryFormatError(f"Transcoder {layer} is a {type(tc).__name__}, whose activation "
                                f"circuit-tracer cannot express; save TopK, JumpReLU or ReLU.")


@torch.no_grad()
def _plt_tensors(layer: int, tc: Dictionary, act: str,
                 skip: torch.Tensor | None) -> dict[str, torch.Tensor]:
    W, b = tc.folded_encoder()  # (D, F), (F,): b_dec folded in where the encoder subtracts it
    tensors = {"W_enc": W.T, "W_dec": tc.W_dec, "b_enc": b, "b_dec": tc.b_dec}
    if act == "jump_relu":
        tensors["activation_function.threshold"] = tc.threshold.clamp_min(0)
    skip = getattr(tc, "W_skip", None) if skip is None else skip
    if skip is not None:
        if tuple(skip.shape) != (tc.d_in, tc.d_in):
            raise DictionaryFormatError(f"The skip of layer {layer} has shape {tuple(skip.shape)}"
                                        f"; it must be (d_model, d_model) = {(tc.d_in, tc.d_in)}.")
        tensors["W_skip"] = skip
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}


# -- loading ----------------------------------------------------------------------------------
def _read_config(folder: Path) -> dict:
    file = folder / CONFIG_FILE
    if not file.exists():
        return {}
    try:
        config = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as err:
        raise DictionaryFormatError(f"{str(file)!r} is not plain YAML (tags that build Python "
                                    f"objects are refused): {err}") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise DictionaryFormatError(f"{str(file)!r} holds a YAML {type(config).__name__}, not "
                                    f"a mapping of settings (model_kind, hooks, ...).")
    return config


def _numbered(folder: Path, prefix: str) -> dict[int, Path]:
    found = {}
    for path in folder.iterdir():
        match = _NUMBERED.match(path.name)
        if match and match.group(1) == prefix:
            found[int(match.group(2))] = path
    return found


def _kind_from_files(folder: Path) -> str:
    if _numbered(folder, "layer"):
        return PLT_KIND
    if _numbered(folder, "W_enc"):
        return CLT_KIND
    raise DictionaryFormatError(
        f"{str(folder)!r} holds neither layer_<L>.safetensors (per-layer transcoders) nor "
        f"W_enc_<L>.safetensors (a cross-layer transcoder), nor a {CONFIG_FILE} naming "
        f"model_kind; point at a circuit-tracer transcoder folder.")


def _layer_paths(folder: Path, config: dict, prefix: str) -> list[Path]:
    """The files ``prefix_0 .. prefix_{n-1}``: from config.yaml's ``transcoders`` list if it has
    one (local paths, relative to the folder), else every numbered file in the folder."""
    listed = config.get("transcoders") if prefix == "layer" else None
    if listed is not None:
        if not isinstance(listed, list) or not all(isinstance(p, str) for p in listed):
            raise DictionaryFormatError(f"{str(folder / CONFIG_FILE)!r}: transcoders must be a "
                                        f"list of file paths, one per layer.")
        for p in listed:
            if p.startswith("hf://"):
                raise DictionaryFormatError(
                    f"{str(folder / CONFIG_FILE)!r} names hub file {p!r}: download the set first "
                    f"(circuit_tracer.utils.caching.save_transcoders_to_cache, where the hub is "
                    f"reachable) and load the cache folder it writes.")
            if not p.endswith(".safetensors"):
                raise DictionaryFormatError(
                    f"{str(folder / CONFIG_FILE)!r} names {p!r}: only .safetensors transcoder "
                    f"files are read (for a Gemma Scope params.npz use "
                    f"sae_nb.load_dictionary(path, format='gemma_scope')).")
        return [folder / p for p in listed]
    found = _numbered(folder, prefix)
    if not found:
        raise DictionaryFormatError(f"{str(folder)!r} holds no {prefix}_<L>.safetensors file; "
                                    f"point at a circuit-tracer transcoder folder.")
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        raise DictionaryFormatError(
            f"{str(folder)!r} lacks {', '.join(f'{prefix}_{m}.safetensors' for m in missing)}: "
            f"a set needs one file per layer 0..{max(found)}; restore the missing files.")
    return [found[layer] for layer in sorted(found)]


def _activations(config: dict, n_layers: int, file: Path) -> tuple[list, list]:
    """The per-layer activation names (None: decided by the files) and TopK ``k``s."""
    acts = config.get("activation_function")
    acts = [acts] * n_layers if acts is None or isinstance(acts, str) else acts
    ks = config.get("top_k")
    ks = [ks] * n_layers if not isinstance(ks, list) else ks
    if not isinstance(acts, list) or len(acts) != n_layers or len(ks) != n_layers:
        raise DictionaryFormatError(f"{str(file)!r}: activation_function and top_k must be one "
                                    f"value or a list of {n_layers} (one per layer).")
    for act in acts:
        if act is not None and act not in ACTIVATIONS:
            raise DictionaryFormatError(f"{str(file)!r}: activation_function={act!r} is "
                                        f"unknown; use one of {list(ACTIVATIONS)}.")
    return acts, ks


def _site(hook: str | None, layer: int) -> str | None:
    return _HOOK_SITES[hook].format(L=layer) if hook in _HOOK_SITES else None


def _dictionary(act: str, k, D: int, F: int, params: dict, file: Path) -> Dictionary:
    if act == "topk":
        if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= F:
            raise DictionaryFormatError(f"{str(file)!r}: top_k={k!r} must be a whole number in "
                                        f"1..{F} for a TopK transcoder.")
        tc = TopKSAE(D, F, k=k, apply_b_dec_to_input=False)
    elif act == "jump_relu":
        threshold = params["threshold"]
        if (threshold < 0).any():
            raise DictionaryFormatError(
                f"{str(file)!r}: {(threshold < 0).sum().item()} JumpReLU thresholds are below 0, "
                f"where circuit-tracer lets negative activations through and we do not; clamp "
                f"them at 0 if that is what the set means.")
        tc = JumpReLUSAE(D, F, apply_b_dec_to_input=False)
    else:
        tc = ReLUSAE(D, F, apply_b_dec_to_input=False)
    with torch.no_grad():
        for name, value in params.items():
            getattr(tc, name).copy_(value.expand_as(getattr(tc, name)))
    return tc.eval()


def _tensors(file: Path, expected: dict[str, tuple], optional: dict[str, tuple],
             what: str) -> dict[str, torch.Tensor]:
    """The tensors of ``file`` as float32, shapes checked from the header before reading."""
    shapes = safetensors_shapes(file)
    present = {k: v for k, v in optional.items() if k in shapes}
    check_shapes(shapes, {**expected, **present}, file, what)
    tensors = read_safetensors(file)
    return {k: tensors[k].to(torch.float32) for k in (*expected, *present)}


def _load_plt(folder: Path, config: dict, metadata: dict):
    paths = _layer_paths(folder, config, "layer")
    acts, ks = _activations(config, len(paths), folder / CONFIG_FILE)
    transcoders, skips, used = {}, {}, []
    D = None
    for layer, file in enumerate(paths):
        F, d = safetensors_shapes(file).get("W_enc", (None, None))
        if F is None:
            raise DictionaryFormatError(f"{str(file)!r} lacks tensor 'W_enc' (F, D).")
        D = d if D is None else D
        what = f"W_enc {(F, d)} (d_transcoder, d_model) and layer 0's d_model {D}"
        t = _tensors(file, {"W_enc": (F, D), "W_dec": (F, D), "b_enc": (F,), "b_dec": (D,)},
                     {"W_skip": (D, D), "activation_function.threshold": (F,)}, what)
        threshold = t.get("activation_function.threshold")
        act = acts[layer] or ("jump_relu" if threshold is not None else "relu")
        if act == "jump_relu" and threshold is None:
            raise DictionaryFormatError(
                f"{str(file)!r}: activation_function is jump_relu but the file has no "
                f"'activation_function.threshold' ({F},); add the thresholds or name the right "
                f"activation function in {CONFIG_FILE}.")
        params = {"W_enc": t["W_enc"].T, "W_dec": t["W_dec"], "b_enc": t["b_enc"],
                  "b_dec": t["b_dec"], **({"threshold": threshold} if act == "jump_relu" else {})}
        tc = _dictionary(act, ks[layer], D, F, params, file)
        tc.metadata = {"format": "circuit_tracer", "model": metadata["model_name"],
                       "site": _site(metadata["feature_input_hook"], layer),
                       "target_site": _site(metadata["feature_output_hook"], layer),
                       "hook": f"blocks.{layer}.{metadata['feature_input_hook']}",
                       "path": str(file)}
        transcoders[layer] = tc
        if "W_skip" in t:
            skips[layer] = t["W_skip"]
        used.append(act)
    return transcoders, skips, used


def _load_clt(folder: Path, config: dict, metadata: dict) -> CrossLayerTranscoder:
    enc_paths = _layer_paths(folder, config, "W_enc")
    n = len(enc_paths)
    dec_found = _numbered(folder, "W_dec")
    missing = [f"W_dec_{layer}.safetensors" for layer in range(n) if layer not in dec_found]
    if missing:
        raise DictionaryFormatError(f"{str(folder)!r} lacks {', '.join(missing)}: a cross-layer "
                                    f"transcoder needs a decoder file per source layer.")
    acts, _ = _activations(config, n, folder / CONFIG_FILE)
    encoders, decoders, b_decs = [], [], []
    F, D = safetensors_shapes(enc_paths[0]).get("W_enc_0", (None, None))
    if F is None:
        raise DictionaryFormatError(f"{str(enc_paths[0])!r} lacks tensor 'W_enc_0' (F, D).")
    for layer, file in enumerate(enc_paths):
        what = f"W_enc_0 {(F, D)} (d_transcoder, d_model) and {n} layers"
        t = _tensors(file, {f"W_enc_{layer}": (F, D), f"b_enc_{layer}": (F,),
                            f"b_dec_{layer}": (D,)}, {f"threshold_{layer}": (F,)}, what)
        act = acts[layer] or ("jump_relu" if f"threshold_{layer}" in t else "relu")
        if act == "topk" or (act == "jump_relu") != (f"threshold_{layer}" in t):
            raise DictionaryFormatError(
                f"{str(file)!r}: activation_function={act!r} does not match the file (a "
                f"cross-layer transcoder is ReLU, or JumpReLU with threshold_{layer}).")
        dec = _tensors(dec_found[layer], {f"W_dec_{layer}": (F, n - layer, D)}, {}, what)
        decoder = dec[f"W_dec_{layer}"]  # (F, n - layer, D)
        params = {"W_enc": t[f"W_enc_{layer}"].T, "b_enc": t[f"b_enc_{layer}"],
                  "W_dec": decoder[:, 0], "b_dec": t[f"b_dec_{layer}"]}
        if act == "jump_relu":
            params["threshold"] = t[f"threshold_{layer}"]
        tc = _dictionary(act, None, D, F, params, file)
        tc.metadata = {"format": "circuit_tracer", "model": metadata["model_name"],
                       "site": _site(metadata["feature_input_hook"], layer),
                       "target_site": _site(metadata["feature_output_hook"], layer),
                       "hook": f"blocks.{layer}.{metadata['feature_input_hook']}",
                       "path": str(file)}
        encoders.append(tc)
        decoders.append(decoder)
        b_decs.append(t[f"b_dec_{layer}"])
    return CrossLayerTranscoder(encoders, decoders, torch.stack(b_decs))


def _clt_activation(tc: Dictionary) -> str:
    return "jump_relu" if isinstance(tc, JumpReLUSAE) else "relu"
