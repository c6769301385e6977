"""The explainer endpoint against a real OpenAI-compatible server: transformers' own.

``transformers serve`` (the pinned transformers, with its ``[serving]`` extra: fastapi, uvicorn,
openai) serves the embedded SmolLM2-135M-Instruct folder on 127.0.0.1, offline. The same
latents of the planted store (``test_autointerp``: latent 0 fires on "z", latent 1 on digits)
are labelled and detection-scored through HTTP (:class:`OpenAIBackend`) and in this process
(:class:`LocalBackend`), both greedy, and the results must be the same.

What the server can and cannot do decides how they are compared:

- It ignores ``logprobs`` (its completions carry none), so over HTTP detection is scored from
  Yes/No answers in text. The in-process backend is asked the same way for the comparison
  (``supports_logprobs`` off); its default, the log-odds of " Yes" against " No", has no
  counterpart on this server.
- Its ``/v1/completions`` tokenizes the prompt without adding a BOS token, where
  :class:`LocalBackend` starts every prompt with one; ``prompt_prefix="<|endoftext|>"`` (SmolLM2's
  BOS as text, which its tokenizer reads as the special token) gives the server the same tokens.
- ``/v1/models`` answers 500 for a served folder; readiness is read from ``/health``.

Without the serving extra the server tests skip (they fail under ``CI``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import test_autointerp as planted
from fake_llm_server import FakeLLMServer, chat_reply, completion_reply
from jupyter_browser import free_port
from transformers.utils.import_utils import is_serve_available

from sae_nb.activations.models import ensure_default_model
from sae_nb.explanations.autointerp import ExplainSettings, completion_prompt, llm_explanations
from sae_nb.explanations.backends import LocalBackend, OpenAIBackend
from sae_nb.explanations.scoring import ScoreSettings, detection_scores

# the planted store's fixtures, shared with test_autointerp
store, dictionary, stats = planted.store, planted.dictionary, planted.stats
tokenizer = planted.tokenizer

LATENTS = [0, 1]
# Labels are a few words; the server is not sent the stop string (the backend cuts the reply
# itself), so it always generates max_tokens tokens: keep them few (chat prompts get 3x).
SHORT = ExplainSettings(max_tokens=6)
FEW = ScoreSettings(n_positive=2, n_negative=2)  # enough to compare; each context is a prompt
READY_S = 180.0  # the server starts in ~12 s on 2 idle cores (imports, then the model)


# -- the server -------------------------------------------------------------------------------
def serving_command() -> list[str]:
    """The virtual environment's ``transformers`` command; skips (fails under ``CI``) when the
    serving extra is missing."""
    script = Path(sys.executable).parent / "transformers"
    if not is_serve_available() or not script.exists():
        why = ("transformers' serving extra is not installed (fastapi, uvicorn, openai): "
               "pip install -r requirements.txt")
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return [str(script), "serve"]


def get_json(url: str, body: dict | None = None, timeout: float = 10.0) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()  # uvicorn shuts down on SIGTERM
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@pytest.fixture(scope="module")
def embedded() -> LocalBackend:
    """The embedded SmolLM2-135M-Instruct in this process."""
    return LocalBackend()


@pytest.fixture(scope="module")
def served(request, tmp_path_factory) -> tuple[str, str]:
    """``(base_url, model)`` of ``transformers serve`` on the embedded model's folder, on
    127.0.0.1 and a free port, offline, one thread (as this process's torch); stopped when the
    module's tests are done. The in-process model loads while the server starts."""
    command = serving_command()
    folder = str(ensure_default_model())
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "transformers_serve.log"
    command += [folder, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
                "--dtype", "float32"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    request.addfinalizer(lambda: stop(process))
    request.getfixturevalue("embedded")  # load the in-process model meanwhile
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"`{' '.join(command)}` exited ({process.returncode}):\n"
                        f"{log.read_text()[-3000:]}")
        try:
            if get_json(f"{base}/health", timeout=5).get("status") == "ok":
                return f"{base}/v1", folder  # the model is loaded before the app starts
        except (OSError, ValueError):
            time.sleep(0.5)
    pytest.fail(f"`{' '.join(command)}` did not answer /health within {READY_S:g} s:\n"
                f"{log.read_text()[-3000:]}")


def answering_in_text(backend: LocalBackend) -> LocalBackend:
    """``backend`` asked for a Yes/No answer in text, as an endpoint without
    log-probabilities is (:func:`sae_nb.explanations.scoring.judge`)."""
    backend.supports_logprobs = False
    return backend


class Recording:
    """A backend that keeps every ``(prompt, reply)`` of ``complete``; all else is
    ``backend``'s."""

    def __init__(self, backend):
        self.backend, self.replies = backend, []

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def complete(self, prompt, max_tokens=32, stop=("\n",)):
        reply = self.backend.complete(prompt, max_tokens=max_tokens, stop=stop)
        self.replies.append((prompt, reply))
        return reply


# -- the prefix, on the fake server -----------------------------------------------------------
def test_the_prompt_prefix_goes_before_completion_prompts_only():
    with FakeLLMServer(lambda path, body: (200, chat_reply("x") if "chat" in path
                                           else completion_reply(" y"), 0)) as server:
        assert OpenAIBackend(server.url, "m", chat=False,
                             prompt_prefix="<s>").complete("Theme:") == "y"
        OpenAIBackend(server.url, "m", chat=True, prompt_prefix="<s>").complete("hi")
    (_, _, plain), (_, _, chat) = server.requests
    assert plain["prompt"] == "<s>Theme:"
    assert chat["messages"] == [{"role": "user", "content": "hi"}]
    # part of the cache identity when set, absent otherwise (earlier caches stay valid)
    assert "prompt_prefix" not in OpenAIBackend(server.url, "m").settings()
    assert OpenAIBackend(server.url, "m", prompt_prefix="<s>").settings()["prompt_prefix"] == "<s>"


# -- the real server --------------------------------------------------------------------------
@pytest.mark.slow
def test_the_server_reads_the_tokens_the_local_backend_reads(served, embedded):
    url, model = served
    tok = embedded.tokenizer
    prompt = completion_prompt([], ["tax", "tariff"])
    local_ids = [tok.bos_token_id] + tok.encode(prompt, add_special_tokens=False)
    # the server tokenizes the text it is sent with tokenizer(text): the BOS text becomes the
    # BOS token, and nothing is added
    assert tok(tok.bos_token + prompt)["input_ids"] == local_ids
    counts = [get_json(f"{url}/completions", {"model": model, "prompt": p, "max_tokens": 1,
                                              "temperature": 0}, timeout=120)
              ["usage"]["prompt_tokens"] for p in (tok.bos_token + prompt, prompt)]
    assert counts == [len(local_ids), len(local_ids) - 1]


@pytest.mark.slow
@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
def test_labels_and_detection_scores_match_through_http(served, embedded, store, dictionary,
                                                       stats, tokenizer, chat):
    """Few-shot completion prompts (the embedded model's) and chat instructions (the
    endpoint's default): the same labels and the same detection scores over HTTP."""
    url, model = served
    http = Recording(OpenAIBackend(url, model, chat=chat, timeout=120,
                                   prompt_prefix=embedded.tokenizer.bos_token))
    local = Recording(answering_in_text(LocalBackend(embedded.model, chat=chat)))
    labels = {b.name: llm_explanations(store, dictionary, stats, LATENTS, tokenizer, backend=b,
                                       settings=SHORT) for b in (http, local)}
    same = ["latent", "explanation", "reply", "error", "shown_rows"]
    pd.testing.assert_frame_equal(labels[http.name][same], labels[local.name][same])
    assert (labels[local.name]["error"] == "").all(), labels[local.name]["error"]
    scores = {b.name: detection_scores(store, dictionary, stats, labels[b.name], tokenizer,
                                       backend=b, settings=FEW, control=False)
              for b in (http, local)}
    # Exactly equal, no tolerance: every reply is text, and the two sides run the same float32
    # weights on the same tokens, greedy; float rounding between model.generate (the server)
    # and the backend's own decoding loop could only flip a near-tie of the two top logits,
    # which none of these prompts has. A difference is a real one (tokens, chat template,
    # decoding, stopping), not noise.
    n_prompts = len(LATENTS) * (1 + FEW.n_positive + FEW.n_negative)  # a label, then contexts
    assert len(local.replies) == n_prompts
    assert http.replies == local.replies  # the same prompts, answered alike, in order
    columns = ["latent", "explanation", "score", "balanced_accuracy", "n_positive",
               "n_negative", "n_failed", "error"]
    pd.testing.assert_frame_equal(scores[http.name][columns], scores[local.name][columns])
    if not chat:
        # The 135M model answers No to every context of these few-shot prompts (so chance
        # scores), and not one answer fails. Its chat replies are mostly neither Yes nor No
        # ("The text contains"): failed answers, compared above like the rest.
        assert (scores[local.name]["error"] == "").all(), scores[local.name]["error"]
        assert (scores[local.name]["n_failed"] == 0).all()
