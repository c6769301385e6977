"""Site naming: named sites, TransformerLens aliases, raw module paths, and their errors."""

from __future__ import annotations

import pytest
from conftest import N_LAYERS

import sae_nb
from sae_nb import SiteError, resolve_site, valid_sites
from sae_nb.activations.models import hf_model

# Hand-written layouts: (blocks, embedding module, attention, MLP) per family.
LAYOUT = {
    "llama": ("model.layers", "model.embed_tokens", "self_attn", "mlp"),
    "gpt_neox": ("gpt_neox.layers", "gpt_neox.embed_in", "attention", "mlp"),
    "gpt2": ("transformer.h", "transformer.drop", "attn", "mlp"),
}


def expected(family: str, kind: str, layer: int) -> tuple[str, str]:
    blocks, _, attn, mlp = LAYOUT[family]
    return {"resid_out": (f"{blocks}.{layer}", "output"),
            "attn_out": (f"{blocks}.{layer}.{attn}", "output"),
            "mlp_out": (f"{blocks}.{layer}.{mlp}", "output"),
            "mlp_in": (f"{blocks}.{layer}.{mlp}", "input")}[kind]


def test_valid_sites_lists_every_layer(model):
    sites = valid_sites(hf_model(model))
    assert len(sites) == 1 + 4 * N_LAYERS
    assert sites[0] == "embed"
    assert {"resid_out_layer0", "attn_out_layer2", "mlp_out_layer1", "mlp_in_layer2"} <= set(sites)
    assert "resid_out_layer3" not in sites


def test_named_sites_resolve_to_the_right_module(model, family):
    hf = hf_model(model)
    embed = resolve_site(hf, "embed")
    assert (embed.module, embed.io, embed.layer) == (LAYOUT[family][1], "output", None)
    for layer in range(N_LAYERS):
        for kind in ("resid_out", "attn_out", "mlp_out", "mlp_in"):
            site = resolve_site(hf, f"{kind}_layer{layer}")
            assert (site.module, site.io) == expected(family, kind, layer)
            assert site.layer == layer and site.name == f"{kind}_layer{layer}"
            hf.get_submodule(site.module)  # exists


def test_transformerlens_aliases(model):
    hf = hf_model(model)
    pairs = {"blocks.0.hook_resid_pre": "embed",
             "blocks.1.hook_resid_pre": "resid_out_layer0",
             "blocks.2.hook_resid_pre": "resid_out_layer1",
             "blocks.0.hook_resid_post": "resid_out_layer0",
             "blocks.2.hook_resid_post": "resid_out_layer2",
             "blocks.1.hook_mlp_out": "mlp_out_layer1",
             "blocks.1.hook_attn_out": "attn_out_layer1"}
    for alias, name in pairs.items():
        got, want = resolve_site(hf, alias), resolve_site(hf, name)
        assert got == want, alias
        assert got.name == name


def test_raw_module_paths(model, family):
    hf = hf_model(model)
    blocks, _, _, mlp = LAYOUT[family]
    path = f"{blocks}.1.{mlp}"
    out, inp = resolve_site(hf, path), resolve_site(hf, f"{path}:input")
    assert (out.module, out.io, out.layer, out.name) == (path, "output", None, path)
    assert (inp.module, inp.io, inp.name) == (path, "input", f"{path}:input")
    assert resolve_site(hf, f"{path}:output").io == "output"
    assert resolve_site(hf, "  resid_out_layer1 ").name == "resid_out_layer1"


@pytest.mark.parametrize("bad", ["resid_layer1", "residual", "blocks.1.hook_resid_mid", "mlp_out"])
def test_unknown_site_lists_valid_sites(model, family, bad):
    with pytest.raises(SiteError) as err:
        resolve_site(hf_model(model), bad)
    msg = str(err.value)
    assert f"Unknown site {bad!r}" in msg
    for part in ("embed", "resid_out_layer{L}", "attn_out_layer{L}", "mlp_out_layer{L}",
                 "mlp_in_layer{L}", "0..2", "hook_resid_post", LAYOUT[family][0]):
        assert part in msg, part


@pytest.mark.parametrize("bad", ["resid_out_layer3", "mlp_in_layer17", "blocks.5.hook_mlp_out"])
def test_layer_out_of_range_gives_the_range(model, bad):
    with pytest.raises(SiteError) as err:
        resolve_site(hf_model(model), bad)
    msg = str(err.value)
    assert "out of range" in msg and "3 layers" in msg and "0..2" in msg


def test_missing_raw_module_path(model, family):
    path = f"{LAYOUT[family][0]}.7.{LAYOUT[family][3]}"
    with pytest.raises(SiteError, match=f"Unknown site '{path}'"):
        resolve_site(hf_model(model), path)
    with pytest.raises(SiteError, match="Unknown site 'lm_head.nothing:input'"):
        resolve_site(hf_model(model), "lm_head.nothing:input")


def test_raw_path_suffix_must_be_input_or_output(llama):
    with pytest.raises(SiteError, match="'input' or 'output'"):
        resolve_site(hf_model(llama), "model.layers.1.mlp:inputs")


def test_extract_refuses_unknown_site_before_writing(llama, corpus_dir, tmp_path):
    with pytest.raises(SiteError, match="Unknown site 'resid_out_layer_1'"):
        sae_nb.extract_activations(llama, tmp_path, sites=["embed", "resid_out_layer_1"],
                                   corpus=str(corpus_dir), n_tokens=32, ctx_len=16, progress=False)
    with pytest.raises(SiteError, match="0..2"):
        sae_nb.pooled_activations(llama, ["hello"], ["mlp_in_layer9"])
    assert not (tmp_path / "activations").exists()


def test_llama_like_and_unmapped_families():
    """Qwen2 shares the Llama layout; an unmapped family takes raw paths and says so."""
    from transformers import OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM

    qwen = Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=2, hidden_size=16, intermediate_size=32,
                                        num_attention_heads=2, num_key_value_heads=1,
                                        vocab_size=64))
    assert resolve_site(qwen, "mlp_in_layer1").module == "model.layers.1.mlp"
    opt = OPTForCausalLM(OPTConfig(num_hidden_layers=2, hidden_size=16, ffn_dim=32,
                                   num_attention_heads=2, vocab_size=64, word_embed_proj_dim=16))
    assert valid_sites(opt) == []
    with pytest.raises(SiteError) as err:
        resolve_site(opt, "resid_out_layer0")
    assert "'opt'" in str(err.value) and "raw module path" in str(err.value)
    assert resolve_site(opt, "model.decoder.layers.0").module == "model.decoder.layers.0"


# Hand-written from TransformerLens's hook names (HookedTransformer, blocks.{L}.hook_*).
HOOK_PAIRS = [("embed", "blocks.0.hook_resid_pre"),
              ("resid_out_layer6", "blocks.6.hook_resid_post"),
              ("mlp_out_layer0", "blocks.0.hook_mlp_out"),
              ("attn_out_layer11", "blocks.11.hook_attn_out")]


@pytest.mark.parametrize("site,hook", HOOK_PAIRS)
def test_site_and_hook_name_map_both_ways(site, hook):
    from sae_nb.activations.sites import canonical_site, hook_name, is_site_name

    assert hook_name(site) == hook
    assert canonical_site(hook) == site and canonical_site(site) == site
    assert is_site_name(site) and not is_site_name(hook)


def test_sites_without_a_hook_twin():
    from sae_nb.activations.sites import canonical_site, hook_name, is_site_name

    assert canonical_site("blocks.4.hook_resid_pre") == "resid_out_layer3"
    assert hook_name("mlp_in_layer2") == "mlp_in_layer2" and is_site_name("mlp_in_layer2")
    assert hook_name("model.layers.1.mlp:input") == "model.layers.1.mlp:input"
    for name in ("blocks.1.hook_resid_mid", "resid_out_layer", "model.layers.1", "embeds"):
        assert canonical_site(name) is None and not is_site_name(name)
