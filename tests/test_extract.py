"""Extraction against plain PyTorch: every stored row equals what a forward hook sees.

The reference never asks sae_nb where a site lives: module paths are written out here by hand
per family, and the residual stream is also checked against ``output_hidden_states``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import FAMILIES, MID, RAW_SITES
from torch.overrides import TorchFunctionMode

import sae_nb
from sae_nb.activations.corpora import load_corpus, pack_contexts

CTX_LEN, N_TOKENS, BATCH = 24, 192, 3  # 8 contexts in batches of 3 (the last one short)

# Where each named site lives, written out by hand: (module path, "output" | "input").
EXPECTED_MODULES = {
    "llama": {
        "embed": ("model.embed_tokens", "output"),
        f"resid_out_layer{MID}": (f"model.layers.{MID}", "output"),
        f"attn_out_layer{MID}": (f"model.layers.{MID}.self_attn", "output"),
        f"mlp_out_layer{MID}": (f"model.layers.{MID}.mlp", "output"),
        f"mlp_in_layer{MID}": (f"model.layers.{MID}.mlp", "input"),
        "resid_out_layer0": ("model.layers.0", "output"),
    },
    "gpt_neox": {
        "embed": ("gpt_neox.embed_in", "output"),
        f"resid_out_layer{MID}": (f"gpt_neox.layers.{MID}", "output"),
        f"attn_out_layer{MID}": (f"gpt_neox.layers.{MID}.attention", "output"),
        f"mlp_out_layer{MID}": (f"gpt_neox.layers.{MID}.mlp", "output"),
        f"mlp_in_layer{MID}": (f"gpt_neox.layers.{MID}.mlp", "input"),
        "resid_out_layer0": ("gpt_neox.layers.0", "output"),
    },
    "gpt2": {
        "embed": ("transformer.drop", "output"),  # token + position embeddings
        f"resid_out_layer{MID}": (f"transformer.h.{MID}", "output"),
        f"attn_out_layer{MID}": (f"transformer.h.{MID}.attn", "output"),
        f"mlp_out_layer{MID}": (f"transformer.h.{MID}.mlp", "output"),
        f"mlp_in_layer{MID}": (f"transformer.h.{MID}.mlp", "input"),
        "resid_out_layer0": ("transformer.h.0", "output"),
    },
}
# The final norm: the last block's resid_out is its input (hidden_states[-1] is its output).
FINAL_NORM = {"llama": "model.norm", "gpt_neox": "gpt_neox.final_layer_norm",
              "gpt2": "transformer.ln_f"}
# The normalisation whose output is the MLP's input (what a transcoder reads).
MLP_NORM = {"llama": f"model.layers.{MID}.post_attention_layernorm",
            "gpt_neox": f"gpt_neox.layers.{MID}.post_attention_layernorm",
            "gpt2": f"transformer.h.{MID}.ln_2"}


def hooked_forward(hf, modules: dict[str, tuple[str, str]], input_ids, attention_mask=None):
    """Plain PyTorch hooks: ``({key: (B, T, d)}, hidden_states)`` for ``{key: (path, io)}``."""
    captured, handles = {}, []
    for key, (path, io) in modules.items():
        module = hf.get_submodule(path)
        if io == "output":
            def hook(mod, args, out, key=key):
                captured[key] = (out[0] if isinstance(out, tuple) else out).detach().clone()
            handles.append(module.register_forward_hook(hook))
        else:
            def pre_hook(mod, args, key=key):
                assert args, f"{key}: module called without positional input"
                captured[key] = args[0].detach().clone()
            handles.append(module.register_forward_pre_hook(pre_hook))
    try:
        with torch.no_grad():
            out = hf(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return captured, out.hidden_states


def raw_module(site: str) -> tuple[str, str]:
    path, _, io = site.partition(":")
    return path, io or "output"


@pytest.fixture(scope="module", params=FAMILIES)
def extracted(request, models, corpus_dir, tmp_path_factory):
    """One token-mode extraction per family of every site kind, and the plain-torch reference."""
    family = request.param
    model = models[family]
    sites = ["embed", f"resid_out_layer{MID}", f"attn_out_layer{MID}", f"mlp_out_layer{MID}",
             f"mlp_in_layer{MID}", "blocks.0.hook_resid_post", "blocks.0.hook_resid_pre",
             f"blocks.{MID + 1}.hook_resid_pre", "resid_out_layer2", *RAW_SITES[family]]
    run_dir = tmp_path_factory.mktemp(f"extract_{family}")
    stores = sae_nb.extract_activations(
        model, run_dir, sites=sites, corpus=str(corpus_dir), n_tokens=N_TOKENS, ctx_len=CTX_LEN,
        batch_size=BATCH, dtype="float32", shard_rows=50, progress=False)
    ctx = pack_contexts(load_corpus(str(corpus_dir)), model.tokenizer, CTX_LEN,
                        N_TOKENS // CTX_LEN, seed=0, prepend_bos=True)
    ids = torch.from_numpy(ctx.tokens.astype(np.int64))
    modules = dict(EXPECTED_MODULES[family])
    modules.update({raw: raw_module(raw) for raw in RAW_SITES[family]})
    modules["mlp_norm"] = (MLP_NORM[family], "output")
    modules["final_norm_in"] = (FINAL_NORM[family], "input")
    captured, hidden = hooked_forward(sae_nb.activations.models.hf_model(model), modules, ids,
                                      torch.ones_like(ids))
    return family, stores, ctx, captured, hidden


def rows_by_position(store, reference: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The store's rows and the reference's rows at the same (context, offset)."""
    idx = store.index()
    return store[:], reference.numpy()[idx["context"], idx["offset"]]


def test_store_keys_are_canonical_site_names(extracted):
    family, stores, *_ = extracted
    # Both hook_resid_pre aliases fold into names asked for anyway: embed and resid_out_layer1.
    assert set(stores) == {"embed", f"resid_out_layer{MID}", f"attn_out_layer{MID}",
                           f"mlp_out_layer{MID}", f"mlp_in_layer{MID}", "resid_out_layer0",
                           "resid_out_layer2", *RAW_SITES[family]}


@pytest.mark.parametrize("site", ["embed", f"resid_out_layer{MID}", f"attn_out_layer{MID}",
                                  f"mlp_out_layer{MID}", f"mlp_in_layer{MID}",
                                  "resid_out_layer0"])
def test_named_site_rows_equal_forward_hook(extracted, site):
    family, stores, _, captured, _ = extracted
    stored, expected = rows_by_position(stores[site], captured[site])
    assert stored.shape == expected.shape and stored.shape[1] == 32
    np.testing.assert_allclose(stored, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", [0, 1])
def test_raw_module_path_rows_equal_forward_hook(extracted, which):
    family, stores, _, captured, _ = extracted
    raw = RAW_SITES[family][which]
    stored, expected = rows_by_position(stores[raw], captured[raw])
    assert stored.shape[1] == expected.shape[1]  # mlp down-projection inputs are 4x wider
    np.testing.assert_allclose(stored, expected, rtol=1e-5, atol=1e-5)


def test_residual_sites_equal_hidden_states(extracted):
    """resid_out_layerL is hidden_states[L+1]; embed (= hook_resid_pre.0) is hidden_states[0]."""
    _, stores, _, _, hidden = extracted
    for site, layer in [("embed", 0), ("resid_out_layer0", 1), (f"resid_out_layer{MID}", MID + 1)]:
        stored, expected = rows_by_position(stores[site], hidden[layer])
        np.testing.assert_allclose(stored, expected, rtol=1e-5, atol=1e-5, err_msg=site)


def test_last_block_resid_out_is_before_the_final_norm(extracted):
    """TransformerLens convention: hook_resid_post of the last block is not normalised, while
    transformers' hidden_states[-1] is (so the two differ there, by design)."""
    _, stores, _, captured, hidden = extracted
    stored, pre_norm = rows_by_position(stores["resid_out_layer2"], captured["final_norm_in"])
    np.testing.assert_allclose(stored, pre_norm, rtol=1e-5, atol=1e-5)
    _, post_norm = rows_by_position(stores["resid_out_layer2"], hidden[-1])
    assert np.abs(stored - post_norm).max() > 1e-2


def test_block_decomposes_into_its_sites(extracted):
    """resid_out_L = resid_out_{L-1} + attn_out_L + mlp_out_L (parallel residual included),
    and mlp_in_L is the output of the block's second norm."""
    family, stores, _, captured, _ = extracted
    total = (stores["resid_out_layer0"][:] + stores[f"attn_out_layer{MID}"][:]
             + stores[f"mlp_out_layer{MID}"][:])
    np.testing.assert_allclose(stores[f"resid_out_layer{MID}"][:], total, rtol=1e-4, atol=1e-4)
    stored, norm_out = rows_by_position(stores[f"mlp_in_layer{MID}"], captured["mlp_norm"])
    np.testing.assert_allclose(stored, norm_out, rtol=1e-5, atol=1e-5)


def test_index_names_every_non_separator_token_once(extracted, model_dirs):
    family, stores, ctx, *_ = extracted
    for store in stores.values():
        idx = store.index()
        positions = set(zip(idx["context"].tolist(), idx["offset"].tolist()))
        assert len(positions) == len(store)  # no position stored twice
        expected = {(c, o) for c, o in zip(*np.nonzero(ctx.pos != -1))}
        assert positions == expected  # BOS/separators excluded, every other token present
        np.testing.assert_array_equal(idx["token"], ctx.tokens[idx["context"], idx["offset"]])
        np.testing.assert_array_equal(idx["doc"], ctx.doc[idx["context"], idx["offset"]])
        np.testing.assert_array_equal(idx["pos"], ctx.pos[idx["context"], idx["offset"]])
        m = store.manifest
        assert m["complete"] and m["units"] == N_TOKENS // CTX_LEN and len(m["shards"]) > 1
        assert m["model"] == str(model_dirs[family])


def test_exclude_bos_false_keeps_every_position(llama, corpus_dir, tmp_path):
    stores = sae_nb.extract_activations(
        llama, tmp_path, sites=["resid_out_layer0"], corpus=str(corpus_dir), n_tokens=48,
        ctx_len=16, exclude_bos=False, dtype="float32", progress=False)
    idx = stores["resid_out_layer0"].index()
    assert len(idx) == 3 * 16
    assert (idx["token"][idx["offset"] == 0] == llama.tokenizer.bos_token_id).all()


def test_float16_store_rounds_float32_values(llama, corpus_dir, tmp_path):
    kw = dict(sites=["mlp_out_layer1"], corpus=str(corpus_dir), n_tokens=64, ctx_len=16,
              progress=False)
    half = sae_nb.extract_activations(llama, tmp_path / "a", dtype="float16", **kw)
    full = sae_nb.extract_activations(llama, tmp_path / "b", dtype="float32", **kw)
    half, full = half["mlp_out_layer1"], full["mlp_out_layer1"]
    assert half._acts[0].dtype == np.float16 and half[:].dtype == np.float32
    np.testing.assert_array_equal(half[:], full[:].astype(np.float16).astype(np.float32))


class WeightWatch(TorchFunctionMode):
    """Records which of the watched parameters any torch function touched (nnsight runs
    modules through its own wrappers, which plain forward hooks do not see during a trace)."""

    def __init__(self, params: dict[str, torch.Tensor]):
        super().__init__()
        self.names = {id(p): name for name, p in params.items()}
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for arg in (*args, *kwargs.values()):
            name = self.names.get(id(arg))
            if name is not None and name not in self.seen:
                self.seen.append(name)
        return func(*args, **kwargs)


def test_run_sites_stops_after_last_site(llama):
    """Reading layer 0 must not run layers 1-2 or the unembedding."""
    hf = sae_nb.activations.models.hf_model(llama)
    sites = sae_nb.activations.extract.resolve_sites(llama, ["resid_out_layer0"])
    paths = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj",
             "model.layers.2.mlp.down_proj", "lm_head"]
    ids = torch.tensor([[llama.tokenizer.bos_token_id, 70, 71, 72]])
    with WeightWatch({p: hf.get_submodule(p).weight for p in paths}) as full:
        with torch.no_grad():
            hf(input_ids=ids)
    assert full.seen == paths  # the watch does see a full forward pass
    with WeightWatch({p: hf.get_submodule(p).weight for p in paths}) as watch:
        (acts,) = sae_nb.run_sites(llama, sites, ids, torch.ones_like(ids))
    assert watch.seen == ["model.layers.0.mlp.down_proj"]
    assert acts.shape == (1, 4, 32)


def test_resolve_sites_sorts_by_execution_order(llama):
    sites = sae_nb.activations.extract.resolve_sites(
        llama, ["resid_out_layer2", "mlp_in_layer1", "embed", "attn_out_layer1", "mlp_out_layer1"])
    assert [s.name for s in sites] == ["embed", "attn_out_layer1", "mlp_in_layer1",
                                       "mlp_out_layer1", "resid_out_layer2"]


# -- sentences: pooling and padding --------------------------------------------------------

SENTENCES = ["Peace.",
             "The state of the union is strong, and the people of this nation are free.",
             "We must work.",
             "Congress will pass a new law on trade this year.",
             "Tax and public power, war and peace, work and economy of the world."]
POOL_SITES = [f"resid_out_layer{MID}", f"mlp_in_layer{MID}"]


def manual_pool(model, family: str, text: str, pool: str) -> dict[str, np.ndarray]:
    """Forward one sentence alone (no padding, no mask) and pool its real tokens, not BOS."""
    tok = model.tokenizer
    sep = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    ids = torch.tensor([[sep] + tok(text, add_special_tokens=False)["input_ids"]])
    modules = {s: EXPECTED_MODULES[family][s] for s in POOL_SITES}
    captured, _ = hooked_forward(sae_nb.activations.models.hf_model(model), modules, ids)
    reduce = (lambda a: a.mean(0)) if pool == "mean" else (lambda a: a.max(0).values)
    return {s: reduce(captured[s][0, 1:]).numpy() for s in POOL_SITES}


@pytest.mark.parametrize("pool", ["mean", "max"])
def test_pooled_activation_equals_manual_and_ignores_batch(model, family, pool):
    alone = {i: sae_nb.pooled_activations(model, [s], POOL_SITES, pool=pool)
             for i, s in enumerate(SENTENCES)}
    together = sae_nb.pooled_activations(model, SENTENCES, POOL_SITES, pool=pool, batch_size=5)
    pairs = sae_nb.pooled_activations(model, SENTENCES[::-1], POOL_SITES, pool=pool, batch_size=2)
    n = len(SENTENCES)
    for i, text in enumerate(SENTENCES):
        manual = manual_pool(model, family, text, pool)
        for site in POOL_SITES:
            assert together[site].shape == (n, 32)
            for got in (alone[i][site][0], together[site][i], pairs[site][n - 1 - i]):
                np.testing.assert_allclose(got.numpy(), manual[site], atol=1e-5, rtol=1e-5)
    # The comparison is sensitive: different sentences are far apart at this tolerance.
    spread = torch.cdist(together[POOL_SITES[0]], together[POOL_SITES[0]])
    assert spread[~torch.eye(n, dtype=bool)].min() > 1e-2


def test_pooled_mean_excludes_bos(llama):
    text, site, hf = SENTENCES[1], "resid_out_layer1", sae_nb.activations.models.hf_model(llama)
    pooled = sae_nb.pooled_activations(llama, [text], [site])[site][0]
    tokens = llama.tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[llama.tokenizer.bos_token_id] + tokens])
    captured, _ = hooked_forward(hf, {"r": ("model.layers.1", "output")}, ids)
    assert not torch.allclose(pooled, captured["r"][0].mean(0), atol=1e-3)  # BOS would show
    # prepend_bos=False: no BOS at all, every token pooled
    no_bos = sae_nb.pooled_activations(llama, [text], [site], prepend_bos=False)[site][0]
    captured, _ = hooked_forward(hf, {"r": ("model.layers.1", "output")}, ids[:, 1:])
    np.testing.assert_allclose(no_bos.numpy(), captured["r"][0].mean(0).numpy(),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pool", ["mean", "max"])
def test_sentence_mode_rows_equal_pooled_activations(model, family, pool, sentences_csv, tmp_path):
    stores = sae_nb.extract_activations(
        model, tmp_path, sites=POOL_SITES, corpus=str(sentences_csv), mode="sentences", pool=pool,
        ctx_len=64, batch_size=4, dtype="float32", shard_rows=5, progress=False)
    texts = pd.read_csv(sentences_csv)["sentence"].tolist()
    expected = sae_nb.pooled_activations(model, texts, POOL_SITES, pool=pool, max_len=64)
    for site in POOL_SITES:
        store = stores[site]
        assert len(store) == len(texts) and len(store.manifest["shards"]) > 1
        assert store.manifest["mode"] == "sentences" and store.manifest["pool"] == pool
        idx = store.index()
        np.testing.assert_array_equal(idx["doc"], np.arange(len(texts)))
        np.testing.assert_array_equal(idx["context"], np.arange(len(texts)))
        np.testing.assert_allclose(store[:], expected[site].numpy(), atol=1e-5, rtol=1e-5)


# -- settings the model or Python cannot take ----------------------------------------------------

def test_ctx_len_beyond_the_models_positions_is_refused(model, family, corpus_dir, sentences_csv,
                                                        model_dirs, tmp_path):
    import json

    saved = json.loads((model_dirs[family] / "config.json").read_text())
    limit = saved.get("max_position_embeddings") or saved["n_positions"]
    assert limit == 256  # conftest's configs
    for corpus, mode in ((corpus_dir, "tokens"), (sentences_csv, "sentences")):
        with pytest.raises(sae_nb.ExtractionError) as err:
            sae_nb.extract_activations(model, tmp_path, sites=["embed"], corpus=str(corpus),
                                       mode=mode, ctx_len=limit + 44, n_tokens=600,
                                       progress=False)
        assert f"ctx_len={limit + 44}" in str(err.value) and f"{limit} positions" in str(err.value)
        assert f"ctx_len={limit}" in str(err.value)  # the fix: the largest value that works
    assert not (tmp_path / "activations").exists()  # refused before anything is written


def test_ctx_len_at_the_models_positions_is_accepted(llama, corpus_dir, tmp_path):
    stores = sae_nb.extract_activations(llama, tmp_path, sites=["embed"], corpus=str(corpus_dir),
                                        ctx_len=256, n_tokens=256, progress=False)
    assert stores["embed"].manifest["ctx_len"] == 256 and len(stores["embed"]) >= 250


@pytest.mark.parametrize("name, value", [
    ("n_tokens", "abc"), ("n_tokens", "1000"), ("n_tokens", 1000.5), ("n_tokens", float("nan")),
    ("n_tokens", True), ("n_tokens", None), ("ctx_len", [128]), ("batch_size", 2.5),
    ("seed", "0"), ("shard_rows", 1.5),
])
def test_settings_that_are_not_whole_numbers_are_refused(name, value):
    with pytest.raises(sae_nb.ExtractionError) as err:
        sae_nb.ExtractConfig(**{name: value})
    assert f"{name}={value!r}" in str(err.value) and "whole number" in str(err.value)


def test_integral_floats_are_whole_numbers():
    """1e3 (what ``-p n_tokens=1e3`` passes) is taken as 1000, an int everywhere after."""
    config = sae_nb.ExtractConfig(n_tokens=1e3, ctx_len=64.0, batch_size=np.int64(4), seed=2.0)
    assert (config.n_tokens, config.ctx_len, config.batch_size, config.seed) == (1000, 64, 4, 2)
    assert all(type(v) is int for v in (config.n_tokens, config.ctx_len, config.batch_size,
                                        config.seed))
