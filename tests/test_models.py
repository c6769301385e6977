"""Model loading from local folders and its errors; configuration errors of extraction."""

from __future__ import annotations

import os
import threading

import pytest
import torch

import sae_nb
from sae_nb import ExtractConfig, ModelLoadError
from sae_nb.activations.models import hf_model, model_name


def test_local_folders_load_with_their_tokenizers(models, model_dirs, family):
    model = models[family]
    hf = hf_model(model)
    assert model_name(model) == str(model_dirs[family])
    assert not hf.training and next(hf.parameters()).dtype == torch.float32
    assert hf.config.model_type == family
    tok = model.tokenizer
    # (padding_side is nnsight's business: sae_nb pads its own batches, on the right.)
    assert tok.pad_token_id is not None
    assert hf.config.vocab_size >= len(tok)
    if family == "gpt2":  # GPT-2 style: EOS only, reused for padding
        assert tok.bos_token is None and tok.pad_token_id == tok.eos_token_id
    else:
        assert tok.bos_token == "<bos>" and tok.pad_token == "<pad>"


def test_prebuilt_model_needs_its_tokenizer(models):
    with pytest.raises(ValueError, match="tokenizer="):
        sae_nb.load_model(hf_model(models["llama"]))


def load_with_deadline(name, seconds: float = 60.0):
    """Call load_model in a thread; fail (not hang) when it takes longer than ``seconds``."""
    result = {}

    def target():
        try:
            sae_nb.load_model(name, device="cpu")
        except Exception as err:  # noqa: BLE001 - handed to the test thread
            result["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"load_model({name!r}) hung for {seconds} s offline"
    return result.get("error")


@pytest.mark.parametrize("name", ["no-such-model-anywhere", "someone/some-model"])
def test_unknown_model_name_says_what_to_use(name):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    err = load_with_deadline(name)
    assert isinstance(err, ModelLoadError)
    msg = str(err)
    assert repr(name) in msg and "'smollm2-135m'" in msg and "local transformers folder" in msg


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    err = load_with_deadline(str(tmp_path))
    assert isinstance(err, ModelLoadError)
    assert f"model folder {str(tmp_path)!r}" in str(err)


@pytest.mark.parametrize("options, message", [
    ({"sites": []}, "sites is empty"),
    ({"mode": "words"}, "mode='words'"),
    ({"pool": "sum"}, "pool='sum'"),
    ({"dtype": "bfloat16"}, "dtype='bfloat16'"),
    ({"n_tokens": 0}, "n_tokens=0"),
    ({"ctx_len": -1}, "ctx_len=-1"),
    ({"shard_rows": 0}, "shard_rows=0"),
])
def test_extract_config_errors_name_the_value(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ExtractConfig(**options)


def test_extract_config_accepts_a_single_site_string():
    assert ExtractConfig(sites="embed").sites == ("embed",)


def test_extract_reports_bad_corpus_before_writing(llama, tmp_path):
    with pytest.raises(sae_nb.CorpusError, match="missing.csv"):
        sae_nb.extract_activations(llama, tmp_path, sites=["embed"],
                                   corpus=str(tmp_path / "missing.csv"), progress=False)
    assert not (tmp_path / "activations").exists()


def test_unreachable_hub_uses_only_the_local_cache(monkeypatch):
    """Without the hub, a hub name is looked up in the local cache only: no minute of retries."""
    import transformers

    from sae_nb.activations import models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    seen = []

    def fake_from_pretrained(name, **kwargs):
        seen.append(kwargs)
        raise OSError(f"{name} is not in the cache")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_from_pretrained)
    with pytest.raises(ModelLoadError, match="smollm2-135m"):
        sae_nb.load_model("EleutherAI/pythia-70m-deduped")
    assert seen == [{"local_files_only": True}]


def test_hub_counts_as_unreachable_when_offline_is_set(monkeypatch):
    from sae_nb.activations import models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert models._hub_reachable() is False
