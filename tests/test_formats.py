"""load_dictionary on every format of FORMATS.md, built at toy size from the documented layouts.

Each loaded dictionary is compared with an independent reference: the format's maths written
here in plain torch on the raw tensors (not our classes).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sae_nb import DictionaryFormatError, load_dictionary, load_sae_nb, save_dictionary
from sae_nb.dictionaries.architectures import TopKSAE

D, F, K = 16, 64, 4


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


def r(*shape):
    return torch.randn(*shape)


def x_batch():
    return torch.randn(8, D) * 2 + 0.5


def topk_relu(pre, k):
    """Top-k of relu(pre), dense."""
    v, i = torch.relu(pre).topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, i, v)


def check(sae, x, ref_encode, ref_decode, ref_forward=None):
    f = sae.encode(x)
    torch.testing.assert_close(f, ref_encode(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.decode(f), ref_decode(f), atol=1e-5, rtol=1e-5)
    ref_forward = ref_forward or (lambda x: ref_decode(ref_encode(x)))
    torch.testing.assert_close(sae(x), ref_forward(x), atol=1e-5, rtol=1e-5)
    assert (sae.d_in, sae.d_sae) == (D, F)


# -- dictionary_learning -------------------------------------------------------------------
def dl_state(dict_class):
    enc_w, enc_b, dec_w = r(F, D), r(F) * 0.1, r(D, F)
    if dict_class == "AutoEncoder":
        return {"bias": r(D), "encoder.weight": enc_w, "encoder.bias": enc_b,
                "decoder.weight": dec_w}
    if dict_class == "AutoEncoderNew":
        return {"encoder.weight": enc_w, "encoder.bias": enc_b, "decoder.weight": dec_w,
                "decoder.bias": r(D)}
    if dict_class == "GatedAutoEncoder":
        return {"decoder_bias": r(D), "encoder.weight": enc_w, "r_mag": r(F) * 0.1,
                "gate_bias": r(F) * 0.1, "mag_bias": r(F) * 0.1, "decoder.weight": dec_w}
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        return {"encoder.weight": enc_w, "encoder.bias": enc_b, "decoder.weight": dec_w,
                "b_dec": r(D), "k": torch.tensor(K), "threshold": torch.tensor(0.7)}
    common = {"W_enc": r(D, F), "b_enc": enc_b, "W_dec": r(F, D), "b_dec": r(D)}
    if dict_class == "JumpReluAutoEncoder":
        return {**common, "threshold": torch.rand(F)}
    return {**common, "k": torch.tensor(K), "threshold": torch.tensor(0.5),
            "group_sizes": torch.tensor([16, 48])}


def dl_reference(dict_class, s):
    """dictionary_learning's encode/decode, per FORMATS.md."""
    enc = lambda x: x @ s["encoder.weight"].T  # noqa: E731  (a bias-free Linear)
    if dict_class == "AutoEncoder":
        return (lambda x: torch.relu(enc(x - s["bias"]) + s["encoder.bias"]),
                lambda f: f @ s["decoder.weight"].T + s["bias"])
    if dict_class == "AutoEncoderNew":
        return (lambda x: torch.relu(enc(x) + s["encoder.bias"]),
                lambda f: f @ s["decoder.weight"].T + s["decoder.bias"])
    if dict_class == "GatedAutoEncoder":
        def encode(x):
            pre = enc(x - s["decoder_bias"])
            gate = (pre + s["gate_bias"] > 0).float()
            return gate * torch.relu(pre * torch.exp(s["r_mag"]) + s["mag_bias"])
        return encode, lambda f: f @ s["decoder.weight"].T + s["decoder_bias"]
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        pre = lambda x: torch.relu(enc(x - s["b_dec"]) + s["encoder.bias"])  # noqa: E731
        dec = lambda f: f @ s["decoder.weight"].T + s["b_dec"]  # noqa: E731
        if dict_class == "AutoEncoderTopK":
            return lambda x: topk_relu(pre(x), K), dec
        return lambda x: pre(x) * (pre(x) > s["threshold"]), dec
    dec = lambda f: f @ s["W_dec"] + s["b_dec"]  # noqa: E731
    if dict_class == "JumpReluAutoEncoder":
        def encode(x):
            p = x @ s["W_enc"] + s["b_enc"]
            return torch.relu(p) * (p > s["threshold"])
        return encode, dec
    relu_pre = lambda x: torch.relu((x - s["b_dec"]) @ s["W_enc"] + s["b_enc"])  # noqa: E731
    return lambda x: relu_pre(x) * (relu_pre(x) > s["threshold"]), dec


DL_CLASSES = ["AutoEncoder", "AutoEncoderNew", "GatedAutoEncoder", "AutoEncoderTopK",
              "BatchTopKSAE", "JumpReluAutoEncoder", "MatryoshkaBatchTopKSAE"]


def dl_config(dict_class, buffer=True):
    cfg = {"trainer": {"trainer_class": "X", "dict_class": dict_class, "lr": 1e-3, "steps": 10,
                       "activation_dim": D, "dict_size": F, "k": K, "layer": 3,
                       "lm_name": "EleutherAI/pythia-70m-deduped",
                       "submodule_name": "mlp_out_layer3", "seed": 0, "device": "cpu"}}
    if buffer:
        cfg["buffer"] = {"d_submodule": D, "io": "out", "ctx_len": 128}
    return cfg


@pytest.mark.parametrize("dict_class", DL_CLASSES)
@pytest.mark.parametrize("variant", ["buffer", "no_buffer", "backup_file", "no_config"])
def test_dictionary_learning(tmp_path, dict_class, variant):
    folder = tmp_path / "pythia-70m-deduped" / "mlp_out_layer3" / "10_32768"
    folder.mkdir(parents=True)
    s = dl_state(dict_class)
    torch.save({"ae": s, "optimizer": {}, "step": 5} if variant == "backup_file" else s,
               folder / "ae.pt")
    if variant != "no_config":
        (folder / "config.json").write_text(json.dumps(dl_config(dict_class, variant == "buffer")))
    target = folder / "ae.pt" if variant == "backup_file" else folder
    if variant == "no_config" and dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        with pytest.warns(UserWarning, match="loading as AutoEncoderTopK"):
            sae = load_dictionary(target)  # same keys as AutoEncoderTopK: read as that
        dict_class = "AutoEncoderTopK"
    else:
        sae = load_dictionary(target)
    encode, decode = dl_reference(dict_class, s)
    check(sae, x_batch(), encode, decode)
    m = sae.metadata
    assert m["format"] == "dictionary_learning" and m["site"] == "mlp_out_layer3"
    assert m["path"] == str(target)
    if variant != "no_config":
        assert m["model"] == "EleutherAI/pythia-70m-deduped" and m["hook"] == "mlp_out_layer3"


def test_dictionary_learning_checkpoint(tmp_path):
    s = dl_state("GatedAutoEncoder")
    (tmp_path / "checkpoints").mkdir()
    torch.save(s, tmp_path / "checkpoints" / "ae_100.pt")
    (tmp_path / "config.json").write_text(json.dumps(dl_config("GatedAutoEncoder")))
    sae = load_dictionary(tmp_path / "checkpoints" / "ae_100.pt")  # config.json one level up
    check(sae, x_batch(), *dl_reference("GatedAutoEncoder", s))
    assert sae.metadata["model"] == "EleutherAI/pythia-70m-deduped"


def test_dictionary_learning_site_from_submodule(tmp_path):
    s = dl_state("AutoEncoder")
    torch.save(s, tmp_path / "ae.pt")
    cfg = dl_config("AutoEncoder")
    cfg["trainer"]["submodule_name"] = "gpt_neox.layers.2.mlp"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_dictionary(tmp_path).metadata["site"] == "mlp_out_layer3"  # `layer` wins


# -- SAELens --------------------------------------------------------------------------------
def saelens_weights(arch):
    w = {"W_enc": r(D, F), "W_dec": r(F, D), "b_dec": r(D)}
    if arch == "gated":
        return {**w, "b_gate": r(F) * 0.1, "r_mag": r(F) * 0.1, "b_mag": r(F) * 0.1}
    w["b_enc"] = r(F) * 0.1
    if arch == "jumprelu":
        w["threshold"] = torch.rand(F)
    return w


def saelens_reference(arch, w, apply_b_dec=True):
    def pre(x):
        return (x - w["b_dec"] if apply_b_dec else x) @ w["W_enc"]
    dec = lambda f: f @ w["W_dec"] + w["b_dec"]  # noqa: E731
    if arch == "gated":
        def encode(x):
            p = pre(x)
            return ((p + w["b_gate"] > 0).float()
                    * torch.relu(p * torch.exp(w["r_mag"]) + w["b_mag"]))
        return encode, dec
    if arch == "standard":
        return lambda x: torch.relu(pre(x) + w["b_enc"]), dec
    if arch == "topk":
        return lambda x: topk_relu(pre(x) + w["b_enc"], K), dec
    def encode(x):
        p = pre(x) + w["b_enc"]
        return torch.relu(p) * (p > w["threshold"])
    return encode, dec


def saelens_cfg(arch, generation, apply_b_dec=True):
    if generation == "v6":
        cfg = {"architecture": arch, "d_in": D, "d_sae": F, "dtype": "float32", "device": "cpu",
               "apply_b_dec_to_input": apply_b_dec, "normalize_activations": "none",
               "reshape_activations": "none",
               "metadata": {"model_name": "gpt2", "hook_name": "blocks.4.hook_mlp_out",
                            "hook_head_index": None, "context_size": 128, "prepend_bos": True,
                            "dataset_path": "x", "sae_lens_version": "6.1.0"}}
        if arch == "topk":
            cfg.update(k=K, rescale_acts_by_decoder_norm=False)
        return cfg
    cfg = {"architecture": "standard" if arch == "topk" else arch, "d_in": D, "d_sae": F,
           "dtype": "float32", "device": "cpu", "model_name": "gpt2",
           "hook_point": "blocks.4.hook_mlp_out", "hook_point_layer": 4,
           "apply_b_dec_to_input": apply_b_dec, "normalize_activations": True,
           "activation_fn_str": "relu", "activation_fn_kwargs": {}}
    if arch == "topk":
        cfg.update(activation_fn="topk", activation_fn_kwargs={"k": K})
    return cfg


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "gated"])
@pytest.mark.parametrize("generation", ["v6", "pre_v6"])
def test_saelens(tmp_path, arch, generation):
    w = saelens_weights(arch)
    apply_b_dec = arch != "jumprelu"
    (tmp_path / "cfg.json").write_text(json.dumps(saelens_cfg(arch, generation, apply_b_dec)))
    extra = {"scaling_factor": torch.ones(F)} if generation == "pre_v6" else {}
    save_file({**w, **extra}, tmp_path / "sae_weights.safetensors")
    sae = load_dictionary(tmp_path)
    check(sae, x_batch(), *saelens_reference(arch, w, apply_b_dec))
    assert sae.metadata["format"] == "saelens" and sae.metadata["model"] == "gpt2"
    assert sae.metadata["hook"] == "blocks.4.hook_mlp_out"
    assert sae.metadata["site"] == "mlp_out_layer4"


def test_saelens_scaling_factor_not_ones_refused(tmp_path):
    (tmp_path / "cfg.json").write_text(json.dumps(saelens_cfg("standard", "pre_v6")))
    save_file({**saelens_weights("standard"), "scaling_factor": torch.full((F,), 2.0)},
              tmp_path / "sae_weights.safetensors")
    with pytest.raises(DictionaryFormatError, match="scaling_factor"):
        load_dictionary(tmp_path)


def test_our_format(tmp_path):
    sae = TopKSAE(D, F, k=K)
    folder = save_dictionary(sae, tmp_path / "d", model="smollm2-135m", site="resid_out_layer6")
    back = load_dictionary(folder)
    x = x_batch()
    w = {k: v.detach() for k, v in sae.state_dict().items()}
    check(back, x, *saelens_reference("topk", w))
    assert back.metadata["format"] == "sae_nb" and back.metadata["site"] == "resid_out_layer6"
    assert back.metadata["hook"] == "blocks.6.hook_resid_post"
    assert back.metadata["model"] == "smollm2-135m"


def test_our_format_names_no_folder_of_the_training_machine(tmp_path):
    """A saved folder travels (the shipped one lives in the repository): its files keep the
    training settings but not the checkpoint folder of the machine that trained it."""
    from dataclasses import asdict

    from sae_nb.training.trainer import TrainConfig

    config = TrainConfig(architecture="topk", k=K, checkpoint_dir=str(tmp_path / "ckpt" / "x"))
    folder = save_dictionary(TopKSAE(D, F, k=K), tmp_path / "d", model="smollm2-135m",
                             site="resid_out_layer6", train_config=asdict(config))
    for file in folder.iterdir():
        if file.suffix == ".json":
            assert str(tmp_path) not in file.read_text(), file.name
    saved = json.loads((folder / "sae_nb.json").read_text())["train_config"]
    assert saved["k"] == K and saved["architecture"] == "topk" and "checkpoint_dir" not in saved


# -- sparsify -------------------------------------------------------------------------------
def sparsify_hookpoint(folder, skip=False, transcode=False, num_latents=F):
    folder.mkdir(parents=True)
    w = {"encoder.weight": r(F, D), "encoder.bias": r(F) * 0.1, "W_dec": r(F, D), "b_dec": r(D)}
    if skip:
        w["W_skip"] = r(D, D) * 0.1
    w = {k: v.to(torch.bfloat16) for k, v in w.items()}
    cfg = {"activation": "topk", "expansion_factor": F // D, "num_latents": num_latents, "k": K,
           "normalize_decoder": True, "multi_topk": False, "skip_connection": skip,
           "transcode": transcode, "d_in": D}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(w, folder / "sae.safetensors")
    return {k: v.float() for k, v in w.items()}


@pytest.mark.parametrize("hookpoint,site,skip,transcode", [
    ("layers.6", "resid_out_layer6", False, False), ("layers.6.mlp", "mlp_out_layer6", True, True),
])
def test_sparsify(tmp_path, hookpoint, site, skip, transcode):
    run = tmp_path / "run"
    w = sparsify_hookpoint(run / hookpoint, skip, transcode, num_latents=0)  # 0: D * expansion
    sparsify_hookpoint(run / "layers.7")
    with pytest.raises(DictionaryFormatError, match=r"layers\.6.*layers\.7|pick one"):
        load_dictionary(run)
    with pytest.raises(DictionaryFormatError, match=r"Hookpoints: \['layers\.6"):
        load_dictionary(run, format="sparsify")
    sae = load_dictionary(run / hookpoint)

    def encode(x):
        x_in = x if transcode else x - w["b_dec"]
        return topk_relu(x_in @ w["encoder.weight"].T + w["encoder.bias"], K)

    def decode(f):
        return f @ w["W_dec"] + w["b_dec"]

    def forward(x):
        out = decode(encode(x))
        return out + x @ w["W_skip"].mT if skip else out

    check(sae, x_batch(), encode, decode, forward)
    assert sae.W_enc.dtype == torch.float32
    assert sae.metadata["site"] == site and sae.metadata["hook"] == hookpoint
    assert sae.metadata["format"] == "sparsify"


# -- OpenAI ---------------------------------------------------------------------------------
def openai_file(path, activation):
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {"pre_bias": r(D), "encoder.weight": r(F, D), "latent_bias": r(F) * 0.1,
          "decoder.weight": r(D, F), "stats_last_nonzero": torch.zeros(F, dtype=torch.long),
          "latents_activation_frequency": torch.rand(F), "latents_mean_square": torch.rand(F),
          "activation": activation,
          "activation_state_dict": {"k": K, "postact_fn": "ReLU"} if activation == "TopK" else {}}
    torch.save(sd, path)
    return sd


def test_openai_relu(tmp_path):
    path = tmp_path / "gpt2-small" / "resid_delta_mlp" / "autoencoders" / "5.pt"  # v1
    s = openai_file(path, "ReLU")
    sae = load_dictionary(path)
    check(sae, x_batch(),
          lambda x: torch.relu((x - s["pre_bias"]) @ s["encoder.weight"].T + s["latent_bias"]),
          lambda f: f @ s["decoder.weight"].T + s["pre_bias"])
    assert sae.metadata == {"format": "openai", "model": "gpt2", "site": "mlp_out_layer5",
                            "hook": "blocks.5.hook_mlp_out", "path": str(path)}


def test_openai_topk_normalised(tmp_path):
    path = tmp_path / "gpt2-small" / "resid_post_mlp_v5_32k" / "autoencoders" / "8.pt"
    s = openai_file(path, "TopK")
    sae = load_dictionary(path)
    x = x_batch()
    # OpenAI's reference: LN without parameters (unbiased std, eps on the way in only)
    mu = x.mean(-1, keepdim=True)
    sigma = (x - mu).std(-1, keepdim=True)
    xn = (x - mu) / (sigma + 1e-5)
    pre = (xn - s["pre_bias"]) @ s["encoder.weight"].T + s["latent_bias"]
    v, i = pre.topk(K, dim=-1)
    f_ref = torch.zeros_like(pre).scatter(-1, i, torch.relu(v))
    x_hat_norm = f_ref @ s["decoder.weight"].T + s["pre_bias"]
    x_hat = x_hat_norm * sigma + mu
    f = sae.encode(x)
    torch.testing.assert_close(f, f_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae(x), x_hat, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.decode(f), x_hat_norm, atol=1e-5, rtol=1e-5)  # normalised units
    torch.testing.assert_close(sae.decode(f, mu, sigma), x_hat, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(sae(x), sae.decode(sae.encode(x)))  # the documented exception
    assert sae.metadata["site"] == "resid_out_layer8"
    assert sae.metadata["hook"] == "blocks.8.hook_resid_post"


# The layouts OpenAI published for GPT-2 small (the ``paths`` module of openai/sparse_autoencoder:
# v1, v4, v5_32k, v5_128k under az://openaipublic/sparse-autoencoder/gpt2-small/): relative path
# -> our site and its TransformerLens hook (sae_nb.activations.sites.hook_name). resid_post_attn
# (hook_resid_mid) and mlp_post_act (mlp.hook_post) have no named site: they map to GPT-2 module
# paths.
OPENAI_LAYOUTS = [
    ("resid_post_mlp_v5_32k/autoencoders/6.pt", "resid_out_layer6", "blocks.6.hook_resid_post"),
    ("resid_post_mlp_v5_128k/autoencoders/8.pt", "resid_out_layer8", "blocks.8.hook_resid_post"),
    ("resid_delta_attn_v5_128k/autoencoders/3.pt", "attn_out_layer3", "blocks.3.hook_attn_out"),
    ("resid_delta_attn_v5_32k/autoencoders/0.pt", "attn_out_layer0", "blocks.0.hook_attn_out"),
    ("resid_delta_mlp_v5_32k/autoencoders/11.pt", "mlp_out_layer11", "blocks.11.hook_mlp_out"),
    ("resid_delta_mlp_v4/autoencoders/5.pt", "mlp_out_layer5", "blocks.5.hook_mlp_out"),
    ("resid_delta_mlp/autoencoders/2.pt", "mlp_out_layer2", "blocks.2.hook_mlp_out"),
    ("resid_post_attn_v5_32k/autoencoders/10.pt", "transformer.h.10.ln_2:input",
     "blocks.10.hook_resid_mid"),
    ("mlp_post_act/autoencoders/1.pt", "transformer.h.1.mlp.c_proj:input",
     "blocks.1.mlp.hook_post"),
    ("mlp_post_act_v4/autoencoders/7.pt", "transformer.h.7.mlp.c_proj:input",
     "blocks.7.mlp.hook_post"),
]


@pytest.mark.parametrize("relative,site,hook", OPENAI_LAYOUTS)
def test_openai_published_layouts(tmp_path, relative, site, hook):
    path = tmp_path / "sparse-autoencoder" / "gpt2-small" / relative
    openai_file(path, "TopK" if "_v5_" in relative else "ReLU")
    sae = load_dictionary(path)
    assert (sae.metadata["site"], sae.metadata["hook"]) == (site, hook)


def test_openai_raw_sites_read_the_documented_activations(tmp_path):
    """resid_post_attn is hook_resid_mid (block input + attention output) and mlp_post_act is
    mlp.hook_post (gelu(c_fc(ln_2(resid_mid)))): computed here by hand on a tiny GPT-2."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from sae_nb.activations.sites import resolve_site

    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=32,
                                    vocab_size=50)).eval()
    block = hf.transformer.h[1]
    seen = {}
    hooks = [block.register_forward_pre_hook(lambda m, a: seen.__setitem__("block_in", a[0]))]
    for location in ("resid_post_attn_v5_32k", "mlp_post_act"):
        path = tmp_path / location / "autoencoders" / "1.pt"
        openai_file(path, "ReLU")
        site = resolve_site(hf, load_dictionary(path).metadata["site"])
        assert site.io == "input"
        hooks.append(hf.get_submodule(site.module).register_forward_pre_hook(
            lambda m, a, key=location: seen.__setitem__(key, a[0])))
    with torch.no_grad():
        hf(torch.tensor([[1, 2, 3, 4, 5]]))
        for h in hooks:
            h.remove()
        resid_mid = seen["block_in"] + block.attn(block.ln_1(seen["block_in"]))[0]
        post = block.mlp.act(block.mlp.c_fc(block.ln_2(resid_mid)))
    torch.testing.assert_close(seen["resid_post_attn_v5_32k"], resid_mid)
    torch.testing.assert_close(seen["mlp_post_act"], post)


def test_openai_unknown_folder_needs_a_site(tmp_path):
    path = tmp_path / "downloads" / "my_sae.pt"
    openai_file(path, "ReLU")
    with pytest.raises(DictionaryFormatError, match=r"downloads.*site="):
        load_dictionary(path)
    sae = load_dictionary(path, site="resid_out_layer4")
    assert sae.metadata["site"] == "resid_out_layer4"


# -- Gemma Scope ----------------------------------------------------------------------------
def test_gemma_scope(tmp_path):
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_12" / "width_16k" / "average_l0_82"
    folder.mkdir(parents=True)
    w = {"W_enc": np.random.randn(D, F), "W_dec": np.random.randn(F, D),
         "b_enc": np.random.randn(F) * 0.1, "b_dec": np.random.randn(D),
         "threshold": np.random.rand(F)}
    np.savez(folder / "params.npz", **{k: v.astype(np.float32) for k, v in w.items()})
    t = {k: torch.tensor(v, dtype=torch.float32) for k, v in w.items()}

    def encode(x):
        pre = x @ t["W_enc"] + t["b_enc"]
        return torch.relu(pre) * (pre > t["threshold"])

    for target in (folder, folder / "params.npz"):
        sae = load_dictionary(target)
        check(sae, x_batch(), encode, lambda f: f @ t["W_dec"] + t["b_dec"])
    assert sae.metadata["site"] == "resid_out_layer12" and sae.metadata["model"] == "gemma-2-2b"
    assert sae.metadata["format"] == "gemma_scope"


# -- safety and bad inputs ------------------------------------------------------------------
class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    folder = tmp_path / "evil"
    folder.mkdir()
    torch.save({"encoder.weight": torch.zeros(F, D), "payload": _Exploit(marker)},
               folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps(dl_config("AutoEncoder")))
    for target, fmt in ((folder, None), (folder / "ae.pt", None), (folder / "ae.pt", "openai")):
        with pytest.raises(DictionaryFormatError, match="NOT loaded.*execute code") as err:
            load_dictionary(target, format=fmt)
        assert "ae.pt" in str(err.value)
    assert not marker.exists()


def test_truncated_files(tmp_path):
    folder = tmp_path / "dl"
    folder.mkdir()
    torch.save(dl_state("AutoEncoder"), folder / "ae.pt")
    data = (folder / "ae.pt").read_bytes()
    (folder / "ae.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(DictionaryFormatError, match="ae.pt.*corrupt or truncated"):
        load_dictionary(folder)
    sl = tmp_path / "sl"
    sl.mkdir()
    (sl / "cfg.json").write_text(json.dumps(saelens_cfg("standard", "v6")))
    save_file(saelens_weights("standard"), sl / "sae_weights.safetensors")
    data = (sl / "sae_weights.safetensors").read_bytes()
    (sl / "sae_weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(DictionaryFormatError, match="sae_weights.safetensors.*corrupt"):
        load_dictionary(sl)
    gs = tmp_path / "params.npz"
    np.savez(gs, W_enc=np.zeros((D, F), np.float32))
    gs.write_bytes(gs.read_bytes()[:100])
    with pytest.raises(DictionaryFormatError, match="params.npz.*corrupt"):
        load_dictionary(gs)


def test_missing_key(tmp_path):
    s = dl_state("AutoEncoder")
    del s["bias"]
    torch.save(s, tmp_path / "ae.pt")
    (tmp_path / "config.json").write_text(json.dumps(dl_config("AutoEncoder")))
    with pytest.raises(DictionaryFormatError, match="ae.pt.*lacks tensor 'bias'"):
        load_dictionary(tmp_path)


def test_transposed_weight(tmp_path):
    w = saelens_weights("standard")
    w["W_enc"] = w["W_enc"].T.contiguous()  # (F, D) where (D, F) belongs
    (tmp_path / "cfg.json").write_text(json.dumps(saelens_cfg("standard", "v6")))
    save_file(w, tmp_path / "sae_weights.safetensors")
    with pytest.raises(DictionaryFormatError, match=r"W_enc has shape \(64, 16\).*\(16, 64\)"):
        load_dictionary(tmp_path)


def test_config_width_mismatch(tmp_path):
    torch.save(dl_state("AutoEncoderTopK"), tmp_path / "ae.pt")
    cfg = dl_config("AutoEncoderTopK")
    cfg["trainer"]["dict_size"] = 2 * F
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DictionaryFormatError, match="encoder.weight.*d_sae=128"):
        load_dictionary(tmp_path)
    sp = tmp_path / "sp" / "layers.1"
    sparsify_hookpoint(sp, num_latents=2 * F)
    with pytest.raises(DictionaryFormatError, match="sae.safetensors.*num_latents=128"):
        load_dictionary(sp)


def test_unknown_architecture_and_format(tmp_path):
    torch.save(dl_state("AutoEncoder"), tmp_path / "ae.pt")
    (tmp_path / "config.json").write_text(json.dumps(dl_config("FancyAutoEncoder")))
    with pytest.raises(DictionaryFormatError, match="unknown dictionary_learning dict_class"):
        load_dictionary(tmp_path)
    with pytest.raises(DictionaryFormatError, match="Unknown format 'nope'.*saelens"):
        load_dictionary(tmp_path, format="nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "weights.bin").write_bytes(b"\0")
    with pytest.raises(DictionaryFormatError, match="Cannot tell.*gemma_scope"):
        load_dictionary(empty)
    with pytest.raises(DictionaryFormatError, match="Cannot tell"):
        load_dictionary(empty / "weights.bin")
    with pytest.raises(DictionaryFormatError, match="does not exist"):
        load_dictionary(tmp_path / "missing")


# -- sizes are checked before anything is built --------------------------------------------
@pytest.fixture
def built(monkeypatch):
    """Every Dictionary constructed, as (d_in, d_sae); refuses (MemoryError) to construct a big
    one, so a loader that builds before checking fails here without allocating."""
    from sae_nb.dictionaries.architectures import Dictionary

    calls, original = [], Dictionary.__init__

    def spy(self, d_in, d_sae, *args, **kwargs):
        calls.append((d_in, d_sae))
        if d_in * d_sae > 10**6:
            raise MemoryError(f"test spy: a {d_in} x {d_sae} dictionary was built")
        original(self, d_in, d_sae, *args, **kwargs)

    monkeypatch.setattr(Dictionary, "__init__", spy)
    return calls


def saved_sae_nb(tmp_path, built):
    folder = save_dictionary(TopKSAE(D, F, k=K), tmp_path / "ours", model="m", site="embed")
    built.clear()  # count only what the loader builds
    return folder


def edit_json(file, **changes):
    cfg = json.loads(file.read_text())
    for key, value in changes.items():
        if value is None:
            del cfg[key]
        else:
            cfg[key] = value
    file.write_text(json.dumps(cfg))


@pytest.mark.parametrize("d_sae", [10**12, 500_000])
def test_sae_nb_huge_d_sae_refused_from_the_header(tmp_path, built, d_sae):
    folder = saved_sae_nb(tmp_path, built)
    edit_json(folder / "cfg.json", d_sae=d_sae)
    with pytest.raises(DictionaryFormatError, match=rf"W_enc has shape \(16, 64\).*d_sae={d_sae}"):
        load_dictionary(folder)
    assert built == []


@pytest.mark.parametrize("broken,match", [
    ("cfg.json", r"cfg\.json.*not valid JSON"), ("sae_nb.json", r"sae_nb\.json.*not valid JSON"),
    ("sae_weights.safetensors", r"sae_weights\.safetensors.*corrupt"),
])
def test_sae_nb_garbage_files(tmp_path, built, broken, match):
    folder = saved_sae_nb(tmp_path, built)
    (folder / broken).write_bytes(np.random.bytes(300))
    with pytest.raises(DictionaryFormatError, match=match):
        load_dictionary(folder)
    assert built == []


@pytest.mark.parametrize("change,match", [
    ({"d_sae": None}, r"cfg\.json.*lacks key 'd_sae'"),
    ({"d_in": "wide"}, r"cfg\.json.*d_in.*'wide'"),
    ({"d_sae": -3}, r"cfg\.json.*d_sae.*-3"),
    ({"k": None}, r"cfg\.json.*lacks key 'k'"),
])
def test_sae_nb_bad_config_values(tmp_path, built, change, match):
    folder = saved_sae_nb(tmp_path, built)
    edit_json(folder / "cfg.json", **change)
    for load in (load_dictionary, load_sae_nb):
        with pytest.raises(DictionaryFormatError, match=match):
            load(folder)
    assert built == []


def test_sae_nb_config_not_an_object(tmp_path, built):
    folder = saved_sae_nb(tmp_path, built)
    (folder / "cfg.json").write_text("[1, 2]")
    with pytest.raises(DictionaryFormatError, match=r"cfg\.json.*JSON object"):
        load_dictionary(folder)


def test_every_loader_checks_config_sizes_before_building(tmp_path, built):
    dl = tmp_path / "dl"
    dl.mkdir()
    torch.save(dl_state("AutoEncoder"), dl / "ae.pt")
    cfg = dl_config("AutoEncoder")
    cfg["trainer"]["dict_size"] = 10**12
    (dl / "config.json").write_text(json.dumps(cfg))
    sl = tmp_path / "sl"
    sl.mkdir()
    (sl / "cfg.json").write_text(json.dumps({**saelens_cfg("topk", "v6"), "d_sae": 10**12}))
    save_file(saelens_weights("topk"), sl / "sae_weights.safetensors")
    sp = tmp_path / "sp" / "layers.1"
    sparsify_hookpoint(sp, num_latents=10**12)
    for folder in (dl, sl, sp):
        with pytest.raises(DictionaryFormatError, match=r"has shape.*10{12}"):
            load_dictionary(folder)
    assert built == []


def test_tensor_sized_loaders_check_every_tensor_before_building(tmp_path, built):
    path = tmp_path / "resid_post_mlp_v5_32k" / "autoencoders" / "6.pt"
    s = openai_file(path, "ReLU")
    torch.save({**s, "decoder.weight": r(F, D)}, path)  # transposed
    gs = tmp_path / "params.npz"
    np.savez(gs, W_enc=np.zeros((D, F), np.float32), W_dec=np.zeros((F, D), np.float32),
             b_enc=np.zeros(F, np.float32), b_dec=np.zeros(D + 1, np.float32),
             threshold=np.zeros(F, np.float32))
    for target, match in ((path, "decoder.weight has shape"), (gs, "b_dec has shape")):
        with pytest.raises(DictionaryFormatError, match=match):
            load_dictionary(target)
    assert built == []


# -- integrity ------------------------------------------------------------------------------
def test_verify_dictionary_catches_changed_bytes(tmp_path):
    import hashlib

    from sae_nb import verify_dictionary

    folder = save_dictionary(TopKSAE(D, F, k=K), tmp_path / "d", model="m", site="embed",
                             density=np.random.rand(F))
    checked = verify_dictionary(folder)
    assert checked == {name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
                       for name in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors")}
    weights = folder / "sae_weights.safetensors"
    data = bytearray(weights.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")  # the tensors follow the JSON header
    middle = (start + len(data)) // 2
    data[middle:middle + 16] = np.random.bytes(16)
    weights.write_bytes(bytes(data))
    with pytest.raises(DictionaryFormatError, match=r"sae_weights\.safetensors has changed"):
        load_dictionary(folder)  # its size or mtime changed: the load hashes it
    with pytest.raises(DictionaryFormatError, match=r"sae_weights\.safetensors has changed"):
        verify_dictionary(folder)


def test_verify_dictionary_missing_file_or_no_checksums(tmp_path):
    from sae_nb import verify_dictionary

    folder = save_dictionary(TopKSAE(D, F, k=K), tmp_path / "d", model="m", site="embed",
                             density=np.random.rand(F))
    (folder / "sparsity.safetensors").unlink()
    with pytest.raises(DictionaryFormatError, match=r"sparsity\.safetensors is missing"):
        verify_dictionary(folder)
    edit_json(folder / "sae_nb.json", checksums=None)
    with pytest.raises(DictionaryFormatError, match=r"records no checksums.*save_dictionary"):
        verify_dictionary(folder)
    (folder / "sae_nb.json").unlink()
    with pytest.raises(DictionaryFormatError, match=r"no sae_nb\.json"):
        verify_dictionary(folder)
