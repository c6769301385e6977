"""Name the places in a model where activations are read ("sites").

Sites are named as the published dictionaries name them (dictionary_learning's Pythia-70m set):
``embed``, ``resid_out_layer{L}``, ``attn_out_layer{L}``, ``mlp_out_layer{L}``, plus
``mlp_in_layer{L}`` (the MLP's input, what transcoders read). TransformerLens hook names
(``blocks.{L}.hook_resid_post`` ...) are accepted as aliases, and a raw module path
(``model.layers.3.mlp.down_proj``, optionally ``...:input``) is the escape hatch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch

from sae_nb.util.errors import SaeNbError


class SiteError(SaeNbError, ValueError):
    """An unknown site or an out-of-range layer; the message lists the valid ones."""


@dataclass(frozen=True)
class Family:
    """Where one architecture family keeps its blocks and their parts."""

    layers: str  # ModuleList of transformer blocks
    embed: str  # module whose output is the residual stream entering block 0
    attn: str  # attention submodule of a block
    mlp: str  # MLP submodule of a block


FAMILIES = {
    "llama": Family(layers="model.layers", embed="model.embed_tokens", attn="self_attn", mlp="mlp"),
    "gpt_neox": Family(layers="gpt_neox.layers", embed="gpt_neox.embed_in", attn="attention",
                       mlp="mlp"),
    # GPT-2 adds position embeddings to token embeddings; `drop` sees the sum (hook_resid_pre.0).
    "gpt2": Family(layers="transformer.h", embed="transformer.drop", attn="attn", mlp="mlp"),
}
# model_type values that share the Llama layout (model.layers[i].self_attn / .mlp).
LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3"}


@dataclass(frozen=True)
class Site:
    """A resolved site: which module, and whether we read its input or output."""

    name: str  # canonical name, e.g. "resid_out_layer3" (or the raw module path)
    module: str  # dotted path from the transformers model root, e.g. "model.layers.3"
    io: Literal["output", "input"]
    layer: int | None  # block index (None for embed and raw paths)


_SITE_RE = re.compile(r"^(resid_out|attn_out|mlp_out|mlp_in)_layer(\d+)$")
# Our per-layer site kinds and the TransformerLens hook that reads the same tensor. Both
# directions (hook_name, canonical_site) read this one table. mlp_in has no TransformerLens
# twin (hook_mlp_in is the residual stream before ln2, not the MLP's input).
TL_HOOKS = {"resid_out": "hook_resid_post", "mlp_out": "hook_mlp_out", "attn_out": "hook_attn_out"}
_TL_KIND = {hook[len("hook_"):]: kind for kind, hook in TL_HOOKS.items()}
_TL_RE = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|" + "|".join(_TL_KIND) + r")$")


def family_of(model: torch.nn.Module) -> tuple[str, Family] | None:
    """The architecture family of a transformers model, or None when we have no mapping."""
    model_type = getattr(model.config, "model_type", "")
    key = "llama" if model_type in LLAMA_LIKE else model_type
    return (key, FAMILIES[key]) if key in FAMILIES else None


def n_layers(model: torch.nn.Module) -> int:
    return int(model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers")
               else model.config.n_layer)


def valid_sites(model: torch.nn.Module) -> list[str]:
    """Every named site of a model, for error messages and pickers."""
    if family_of(model) is None:
        return []
    layer_sites = ["resid_out", "attn_out", "mlp_out", "mlp_in"]
    return ["embed"] + [f"{k}_layer{i}" for i in range(n_layers(model)) for k in layer_sites]


def resolve_site(model: torch.nn.Module, site: str) -> Site:
    """Map a site name, a TransformerLens alias or a raw module path to a :class:`Site`."""
    site = site.strip()
    canonical = canonical_site(site)
    found = family_of(model)
    if canonical is not None and found is not None:
        try:
            return _named_site(model, found[1], canonical)
        except SiteError as err:
            if canonical == site:
                raise
            raise SiteError(f"Site {site!r} (our name {canonical!r}): {err}") from None
    raw = _raw_site(model, site)
    if raw is not None:
        return raw
    n = n_layers(model) if found else None
    hint = (
        f"Valid sites for this {found[0]} model: embed, resid_out_layer{{L}}, attn_out_layer{{L}}, "
        f"mlp_out_layer{{L}}, mlp_in_layer{{L}} with L in 0..{n - 1}, their TransformerLens "
        f"aliases blocks.{{L}}.hook_resid_post/hook_resid_pre/hook_mlp_out/hook_attn_out, "
        f"or a raw module path such as {found[1].layers}.0.mlp"
        if found else
        f"Named sites are mapped for {sorted(FAMILIES)} models only; this is "
        f"{model.config.model_type!r}. Pass a raw module path instead, e.g. one of "
        f"{[n for n, _ in list(model.named_modules())[1:6]]}"
    )
    raise SiteError(f"Unknown site {site!r}. {hint}.")


def is_site_name(name: str) -> bool:
    """True for one of our own site names (``embed``, ``resid_out_layer3``, ...), False for
    aliases, raw module paths and anything else."""
    return name == "embed" or _SITE_RE.match(name) is not None


def canonical_site(name: str) -> str | None:
    """Our site name for ``name``: itself if it is one, the site a TransformerLens hook name
    reads (``blocks.3.hook_mlp_out`` -> ``mlp_out_layer3``; ``blocks.L.hook_resid_pre`` ->
    the previous block's ``resid_out``, or ``embed`` for L = 0), else None."""
    if is_site_name(name):
        return name
    m = _TL_RE.match(name)
    if not m:
        return None
    layer, kind = int(m.group(1)), m.group(2)
    if kind == "resid_pre":  # the residual stream entering block L leaves block L-1
        return "embed" if layer == 0 else f"resid_out_layer{layer - 1}"
    return f"{_TL_KIND[kind]}_layer{layer}"


def hook_name(site: str) -> str:
    """The TransformerLens hook name of one of our sites (as SAELens's metadata stores it):
    ``resid_out_layer6`` -> ``blocks.6.hook_resid_post``, ``embed`` ->
    ``blocks.0.hook_resid_pre``. A site without a twin (``mlp_in_layer{L}``, a raw module path)
    is returned unchanged. The inverse of :func:`canonical_site`."""
    m = _SITE_RE.match(site)
    if m and m.group(1) in TL_HOOKS:
        return f"blocks.{m.group(2)}.{TL_HOOKS[m.group(1)]}"
    if site == "embed":
        return "blocks.0.hook_resid_pre"
    return site


def _named_site(model: torch.nn.Module, fam: Family, name: str) -> Site:
    if name == "embed":
        return Site(name, fam.embed, "output", None)
    kind, layer = _SITE_RE.match(name).groups()
    layer, n = int(layer), n_layers(model)
    if not 0 <= layer < n:
        raise SiteError(
            f"Layer {layer} in site {name!r} is out of range: this model has {n} layers, "
            f"so valid layers are 0..{n - 1} (e.g. {kind}_layer{n - 1})."
        )
    block = f"{fam.layers}.{layer}"
    module, io = {
        "resid_out": (block, "output"),
        "attn_out": (f"{block}.{fam.attn}", "output"),
        "mlp_out": (f"{block}.{fam.mlp}", "output"),
        "mlp_in": (f"{block}.{fam.mlp}", "input"),
    }[kind]
    return Site(name, module, io, layer)


def _raw_site(model: torch.nn.Module, site: str) -> Site | None:
    path, _, io = site.partition(":")
    io = io or "output"
    if io not in ("input", "output"):
        raise SiteError(f"Site {site!r}: the suffix after ':' must be 'input' or 'output'.")
    try:
        model.get_submodule(path)
    except AttributeError:
        return None
    if not path:
        return None
    return Site(site, path, io, None)  # type: ignore[arg-type]


def execution_order(model: torch.nn.Module, sites: list[Site]) -> list[Site]:
    """Sort sites in the order the forward pass reaches them (nnsight reads must follow it).

    Found by one forward pass on a single token with plain hooks on the sites' modules.
    """
    order: dict[str, int] = {}
    handles = []
    for module_path in {s.module for s in sites}:
        module = model.get_submodule(module_path)

        def pre(mod, args, path=module_path):
            order.setdefault(f"{path}:input", len(order))

        def post(mod, args, out, path=module_path):
            order.setdefault(f"{path}:output", len(order))

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device))
    finally:
        for h in handles:
            h.remove()
    missing = [s.name for s in sites if f"{s.module}:{s.io}" not in order]
    if missing:
        raise SiteError(f"Sites {missing} are never reached by the forward pass of this model.")
    return sorted(sites, key=lambda s: order[f"{s.module}:{s.io}"])
