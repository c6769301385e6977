"""Shared fixtures: seeded RNGs, tiny random models of three families, small corpora.

Nothing here downloads. Each model is built from a config at toy size, saved with its
tokenizer into a temporary folder, and loaded back through ``sae_nb.load_model(folder)``, the
same local-folder path a user takes. The tokenizer is byte-level (256 byte tokens plus
specials), so any text tokenizes and the model's vocabulary covers every id.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never touch the hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

# Toy models gain nothing from intra-op threads; on a busy 2-core machine threads make every
# forward pass ~50x slower. Notebook kernels run in their own processes and are unaffected.
torch.set_num_threads(1)

FAMILIES = ("llama", "gpt_neox", "gpt2")
N_LAYERS = 3
MID = 1  # the middle layer the site tests read
D_MODEL = 32
# Raw module paths per family, as a user would type them: an output and an ":input".
RAW_SITES = {
    "llama": ("model.layers.2.post_attention_layernorm", "model.layers.1.mlp.down_proj:input"),
    "gpt_neox": ("gpt_neox.layers.2.post_attention_layernorm",
                 "gpt_neox.layers.1.mlp.dense_4h_to_h:input"),
    "gpt2": ("transformer.h.2.ln_2", "transformer.h.1.mlp.c_proj:input"),
}
WORDS = ("the state of union nation people congress war peace law tax year new work "
         "government American world free great public right time power economy trade "
         "we must will can all our "
         "a an and but for not with from").split()


@pytest.fixture(autouse=True)
def seed_everything():
    """Every test starts from the same RNG state (torch, numpy, random)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


class ArrayStore:
    """A token-mode store's reading surface over arrays: rows (as ``dtype`` when given, as a
    store reads float16 rows into float32), and their token ids."""

    def __init__(self, acts, tokens, dtype=None):
        self.acts, self.tokens, self.dtype = acts, tokens, dtype

    def __len__(self):
        return len(self.acts)

    def __getitem__(self, rows):
        rows = self.acts[rows]
        return rows if self.dtype is None else rows.astype(self.dtype)

    def index(self, rows):
        return {"token": self.tokens[rows]}


def make_tokenizer(with_bos: bool = True):
    """A byte-level tokenizer with no merges; ``with_bos=False`` is GPT-2 style (EOS only)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    specials = ["<bos>", "<eos>", "<pad>"] if with_bos else ["<|endoftext|>"]
    vocab = {ch: i for i, ch in enumerate(alphabet + specials)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    if with_bos:
        return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>",
                                       eos_token="<eos>", pad_token="<pad>")
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


def make_config(family: str, tokenizer):
    """A tiny config of ``family`` whose vocabulary covers ``tokenizer``."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    vocab = len(tokenizer)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = dict(vocab_size=vocab, bos_token_id=bos, eos_token_id=tokenizer.eos_token_id)
    # initializer_range 0.2 (not 0.02) keeps activations O(1), so a mix-up between positions,
    # sentences or sites shows far above the test tolerances.
    if family == "llama":
        return LlamaConfig(num_hidden_layers=N_LAYERS, hidden_size=D_MODEL, intermediate_size=64,
                           num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=256, initializer_range=0.2, **ids)
    if family == "gpt_neox":
        return GPTNeoXConfig(num_hidden_layers=N_LAYERS, hidden_size=D_MODEL,
                             intermediate_size=64, num_attention_heads=4,
                             max_position_embeddings=256, initializer_range=0.2, **ids)
    if family == "gpt2":
        return GPT2Config(n_layer=N_LAYERS, n_embd=D_MODEL, n_head=4, n_positions=256,
                          initializer_range=0.2, **ids)
    raise ValueError(family)


@pytest.fixture(params=["kernels", "torch"])
def kernel_path(request, monkeypatch) -> str:
    """A test of the training kernels, run once with the compiled kernels
    (``sae_nb/training/kernels.c``) and once with torch's ops in their place."""
    from sae_nb.training import kernels  # here: only the kernels' tests need it

    if request.param == "torch":
        monkeypatch.setitem(kernels._loaded, "lib", None)
    elif kernels.library() is None:
        pytest.skip("no C compiler here for the kernels")
    return request.param


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """``{family: folder}`` with a saved tiny random model and its tokenizer."""
    from transformers import AutoModelForCausalLM

    dirs = {}
    for i, family in enumerate(FAMILIES):
        tokenizer = make_tokenizer(with_bos=family != "gpt2")
        torch.manual_seed(100 + i)
        hf = AutoModelForCausalLM.from_config(make_config(family, tokenizer))
        folder = tmp_path_factory.mktemp(f"model_{family}")
        hf.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        dirs[family] = folder
    return dirs


@pytest.fixture(scope="session")
def models(model_dirs):
    """``{family: nnsight model}`` loaded through ``sae_nb.load_model(folder)`` on the CPU."""
    import sae_nb

    return {f: sae_nb.load_model(str(folder), device="cpu") for f, folder in model_dirs.items()}


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def model(models, family):
    return models[family]


@pytest.fixture(scope="session")
def llama(models):
    return models["llama"]


def make_documents(n_docs: int, seed: int) -> list[str]:
    """Short pseudo-sentences of varied length (byte tokens: about 20-200 per document)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))).capitalize()
                     + "." for _ in range(rng.randint(1, 4))]
        docs.append(" ".join(sentences))
    return docs


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A folder of .txt documents, the token-mode corpus (about 2,500 byte tokens)."""
    folder = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(make_documents(30, seed=1)):
        (folder / f"doc_{i:02d}.txt").write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def sentences_csv(tmp_path_factory) -> Path:
    """A CSV with a ``sentence`` column (and a distractor column) of varied lengths."""
    rng = random.Random(2)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(23)]
    path = tmp_path_factory.mktemp("csv") / "sentences.csv"
    pd.DataFrame({"id": range(len(texts)), "sentence": texts}).to_csv(path, index=False)
    return path


def identity_like(d: int, site: str | None = "resid_out_layer1"):
    """A perfect dictionary, exact in floats: codes ``[relu(x), relu(-x)]`` (2d latents) and
    the decoder ``[I; -I]`` that undoes them, since ``relu(x) - relu(-x) == x``."""
    from sae_nb.dictionaries.architectures import ReLUSAE

    sae = ReLUSAE(d, 2 * d)
    with torch.no_grad():
        eye = torch.eye(d)
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    sae.metadata = {"site": site} if site else {}
    return sae


def plain_model_io(lm, ids: torch.Tensor):
    """The model run on token ids ``(B, T)`` with plain torch hooks on the Hugging Face modules
    (not the nnsight sites the package reads): its logits ``(B, T, V)``, the final norm's input
    ``(B, T, D)`` and each layer's MLP ``(input, output)``, ``(B, T, D)`` each."""
    from sae_nb.activations.models import hf_model

    hf = hf_model(lm)
    seen = {}
    handles = [hf.model.norm.register_forward_pre_hook(
        lambda mod, args: seen.__setitem__("final", args[0].detach().clone()))]
    handles += [block.mlp.register_forward_hook(
        lambda mod, args, out, i=i: seen.__setitem__(i, (args[0].detach().clone(),
                                                        out.detach().clone())))
        for i, block in enumerate(hf.model.layers)]
    try:
        with torch.no_grad():
            logits = hf(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    return logits, seen["final"], [seen[i] for i in range(len(hf.model.layers))]
