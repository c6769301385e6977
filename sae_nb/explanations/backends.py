"""Language-model backends for automated interpretability: one small interface, two kinds.

A backend answers two questions. ``complete(prompt, max_tokens, stop)`` returns the text a
model continues ``prompt`` with (greedy), for writing explanations. ``choice_logprobs(prompts,
choices)`` returns, for each prompt, the log-probability of each candidate next answer
(``" Yes"``, ``" No"``), for scoring explanations with an AUROC; a backend that cannot
(``supports_logprobs = False``) is asked for a yes/no answer in text instead.

- :class:`LocalBackend`: a local transformers causal LM, by default the embedded
  SmolLM2-135M-Instruct (loaded by :func:`sae_nb.activations.models.load_model`, nothing
  downloaded), or any local model folder or already loaded model.
- :class:`OpenAIBackend`: an OpenAI-compatible HTTP endpoint (vLLM, llama.cpp's server,
  ``transformers serve``, ...) spoken to with ``urllib`` from the standard library.

Every failure of a backend (HTTP error, timeout, a reply that is empty or not JSON) is a
:class:`BackendError`; the callers in :mod:`sae_nb.explanations.autointerp` and
:mod:`sae_nb.explanations.scoring` record it per latent and go on.
"""

from __future__ import annotations

import copy
import json
import socket
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sae_nb.activations.models import (
    DEFAULT_MODEL,
    Model,
    hf_model,
    load_model,
    model_fingerprint,
    model_name,
)
from sae_nb.util.errors import SaeNbError


class BackendError(SaeNbError, RuntimeError):
    """A backend gave no usable answer (HTTP error, timeout, empty or malformed reply)."""


class Backend:
    """The interface every backend implements (subclass it, or duck-type these members)."""

    name: str = "backend"  # a short label for tables ("local:smollm2-135m", "openai:<model>")
    chat: bool = False  # prompts are chat instructions (capable models), else few-shot completions
    supports_logprobs: bool = False  # whether choice_logprobs works

    def complete(self, prompt: str, max_tokens: int = 32, stop: Sequence[str] = ("\n",)) -> str:
        """The model's greedy continuation of ``prompt``, leading whitespace dropped, cut before
        the first ``stop`` string after it (see :func:`cut_at_stop`)."""
        raise NotImplementedError

    def choice_logprobs(self, prompts: Sequence[str], choices: Sequence[str]) -> np.ndarray:
        """``(len(prompts), len(choices))`` log-probabilities of each choice's first token as
        the next token after each prompt."""
        raise NotImplementedError(f"{type(self).__name__} gives no log-probabilities.")

    def settings(self) -> dict[str, Any]:
        """What decides this backend's answers (part of every cache key); never secrets."""
        return {"name": self.name, "chat": self.chat}


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` without its leading whitespace, up to (not including) the earliest of the
    ``stop`` strings after that: a small model often opens ``Theme:`` with a newline."""
    text = text.lstrip()
    cut = min((i for s in stop if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


class LocalBackend(Backend):
    """A local transformers causal LM, greedy, on the CPU by default.

    ``model`` is ``"smollm2-135m"`` (the embedded default), a local model folder, or an
    already loaded nnsight model from :func:`sae_nb.load_model` (the model a notebook already
    holds; it is reused, not copied). ``chat=True`` wraps prompts in the tokenizer's chat
    template: for a capable instruct model; the 135M default needs few-shot completions.
    """

    supports_logprobs = True
    prefix_cache = True  # run the prompts' shared prefix once (False: every prompt in full)

    def __init__(self, model: Model | str | Path = DEFAULT_MODEL, device: str = "cpu",
                 chat: bool = False, batch_size: int = 8):
        if isinstance(model, (str, Path)):
            model = load_model(str(model), device=device)
        self.model = model
        self.hf = hf_model(model)  # the transformers module
        self.tokenizer = model.tokenizer
        self.chat = bool(chat)
        self.batch_size = int(batch_size)
        self.name = f"local:{model_name(model)}"
        self._fingerprint = model_fingerprint(model)

    def settings(self) -> dict[str, Any]:
        return {"name": self.name, "model": self._fingerprint, "chat": self.chat}

    def _ids(self, prompt: str) -> list[int]:
        tok = self.tokenizer
        if self.chat:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
            return tok.encode(text, add_special_tokens=False)
        ids = tok.encode(prompt, add_special_tokens=False)
        return ([tok.bos_token_id] if tok.bos_token_id is not None else []) + ids

    @torch.no_grad()
    def complete(self, prompt: str, max_tokens: int = 32, stop: Sequence[str] = ("\n",)) -> str:
        device = next(self.hf.parameters()).device
        ids = torch.tensor([self._ids(prompt)], device=device)  # (1, T)
        out = self.hf(input_ids=ids, use_cache=True)
        new: list[int] = []
        text = ""
        for _ in range(max_tokens):
            token = int(out.logits[0, -1].argmax())
            if token == self.tokenizer.eos_token_id:
                break
            new.append(token)
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            if any(s and s in text.lstrip() for s in stop):
                break
            out = self.hf(input_ids=torch.tensor([[token]], device=device),
                          past_key_values=out.past_key_values, use_cache=True)
        return cut_at_stop(text, stop)

    @torch.no_grad()
    def choice_logprobs(self, prompts: Sequence[str], choices: Sequence[str]) -> np.ndarray:
        """As :meth:`Backend.choice_logprobs`, in batches of ``batch_size`` right-padded
        prompts. The token prefix all prompts share (the few-shot examples of a scoring
        prompt, ~3/4 of its tokens) runs once and its key/value cache is reused."""
        choice_ids = [self._first_token(c) for c in choices]
        device = next(self.hf.parameters()).device
        ids = [self._ids(p) for p in prompts]
        if not ids:
            return np.empty((0, len(choices)))
        shared = self._shared_prefix(ids) if self.prefix_cache else 0
        prefix = None
        if shared:
            prefix = self.hf(input_ids=torch.tensor([ids[0][:shared]], device=device),
                             use_cache=True).past_key_values
        out = np.empty((len(prompts), len(choices)), dtype=np.float64)
        for start in range(0, len(prompts), self.batch_size):
            batch = [b[shared:] for b in ids[start : start + self.batch_size]]
            logp = self._last_logprobs(batch, prefix, shared, device)[:, choice_ids]  # (B, C)
            out[start : start + len(batch)] = logp.cpu().numpy()
        return out

    def _last_logprobs(self, batch: list[list[int]], prefix, shared: int,
                       device) -> torch.Tensor:
        """Next-token log-probabilities after each token list of ``batch`` (B, V), each list
        continuing the ``shared`` cached prefix tokens (none when ``prefix`` is None)."""
        pad = self.tokenizer.pad_token_id or 0
        lengths = torch.tensor([len(b) for b in batch], device=device)
        ids = torch.full((len(batch), int(lengths.max())), pad, dtype=torch.long, device=device)
        mask = torch.zeros((len(batch), shared + ids.shape[1]), dtype=torch.long, device=device)
        mask[:, :shared] = 1
        for i, b in enumerate(batch):  # right padding: each row's last real token is intact
            ids[i, : len(b)] = torch.tensor(b, device=device)
            mask[i, shared : shared + len(b)] = 1
        past = None
        if prefix is not None:
            past = copy.deepcopy(prefix)
            past.batch_repeat_interleave(len(batch))
        logits = self.hf(input_ids=ids, attention_mask=mask, past_key_values=past,
                         use_cache=past is not None).logits  # (B, T, V)
        last = logits[torch.arange(len(batch), device=device), lengths - 1]  # (B, V)
        return torch.log_softmax(last.float(), dim=-1)

    @staticmethod
    def _shared_prefix(ids: list[list[int]]) -> int:
        """Tokens every list starts with, leaving each at least one token of its own."""
        n = min(len(b) for b in ids) - 1
        first = ids[0]
        for b in ids[1:]:
            n = min(n, next((i for i in range(n) if b[i] != first[i]), n))
        return max(n, 0)

    def _first_token(self, choice: str) -> int:
        ids = self.tokenizer.encode(choice, add_special_tokens=False)
        if not ids:
            raise ValueError(f"The choice {choice!r} encodes to no token.")
        return ids[0]


class OpenAIBackend(Backend):
    """An OpenAI-compatible endpoint: ``base_url`` like ``"http://127.0.0.1:8000/v1"``.

    ``chat=True`` posts to ``/chat/completions`` (instruction prompts), ``chat=False`` to
    ``/completions`` (the few-shot prompts, for a base model behind the server). The API key,
    when one is given, is sent as a bearer token and never written to a cache.

    ``prompt_prefix`` is put before every ``/completions`` prompt: the model's BOS token as
    text (``"<|endoftext|>"`` for SmolLM2) where the server's tokenizer adds none, as
    transformers' own server does not, so that the model reads the tokens
    :class:`LocalBackend` gives it. Chat prompts get the server's chat template instead.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 timeout: float = 60.0, chat: bool = True, prompt_prefix: str = ""):
        if not str(base_url).startswith(("http://", "https://")):
            raise ValueError(f"base_url={base_url!r} must start with http:// or https://, e.g. "
                             f"'http://127.0.0.1:8000/v1'.")
        self.base_url = str(base_url).rstrip("/")
        self.model = model
        self.api_key = api_key
        self.timeout = float(timeout)
        self.chat = bool(chat)
        self.prompt_prefix = str(prompt_prefix)
        self.name = f"openai:{model}"

    def settings(self) -> dict[str, Any]:
        out = {"name": self.name, "base_url": self.base_url, "model": self.model,
               "chat": self.chat}
        if self.prompt_prefix:  # only when set: the caches of endpoints without one stay valid
            out["prompt_prefix"] = self.prompt_prefix
        return out

    def complete(self, prompt: str, max_tokens: int = 32, stop: Sequence[str] = ("\n",)) -> str:
        body: dict[str, Any] = {"model": self.model, "max_tokens": int(max_tokens),
                                "temperature": 0.0}
        if self.chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:  # stop strings are applied here, after the reply's leading whitespace
            body["prompt"] = self.prompt_prefix + prompt
        reply = self._post("/chat/completions" if self.chat else "/completions", body)
        try:
            choice = reply["choices"][0]
            text = choice["message"]["content"] if self.chat else choice["text"]
        except (KeyError, IndexError, TypeError) as err:
            raise BackendError(f"{self.name}: the reply has no choices[0] text: "
                               f"{json.dumps(reply)[:200]}") from err
        if not isinstance(text, str) or not text.strip():
            raise BackendError(f"{self.name}: empty reply.")
        return cut_at_stop(text, stop)

    def _post(self, path: str, body: dict) -> dict:
        url = self.base_url + path
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers,
                                         method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            detail = err.read()[:200].decode(errors="replace")
            raise BackendError(f"{self.name}: HTTP {err.code} from {url}: {detail}") from err
        except TimeoutError as err:
            raise BackendError(f"{self.name}: no reply from {url} within {self.timeout:g} s "
                               f"(raise timeout=...)") from err
        except urllib.error.URLError as err:
            if isinstance(err.reason, (TimeoutError, socket.timeout)):
                raise BackendError(f"{self.name}: no reply from {url} within "
                                   f"{self.timeout:g} s (raise timeout=...)") from err
            raise BackendError(f"{self.name}: cannot reach {url}: {err.reason}") from err
        try:
            return json.loads(raw)
        except ValueError as err:
            raise BackendError(f"{self.name}: the reply from {url} is not JSON: "
                               f"{raw[:200]!r}") from err
