"""LLM explanations and their scores (detection, fuzzing, embedding, controls) on a planted store.

The store holds byte tokens of pseudo-sentences; its four activation dimensions are functions
of the token: x0 is 1 to 3 on "z" (0 elsewhere), x1 likewise on digits, x2 random, x3 = 1 on
a space. The ReLU
dictionary's latent 0 therefore fires exactly on "z", latent 1 on digits, latent 2 at random,
latent 3 on spaces. Fake backends answer from that truth (an oracle), at random, or fail on
cue; an OpenAI-compatible HTTP server runs in a thread. Nothing loads a real language model
except the tests marked slow.
"""

from __future__ import annotations

import math
import random
import re

import numpy as np
import pytest
import torch
from conftest import make_tokenizer
from fake_llm_server import FakeLLMServer, chat_reply, completion_reply

from sae_nb.activations.store import INDEX_DTYPE, ActivationStore, StoreWriter
from sae_nb.dictionaries.architectures import ReLUSAE
from sae_nb.explanations.autointerp import (
    ExplainSettings,
    explanation_windows,
    llm_explanations,
    marked_text,
    marked_words,
    parse_explanation,
)
from sae_nb.explanations.backends import (
    Backend,
    BackendError,
    LocalBackend,
    OpenAIBackend,
    cut_at_stop,
)
from sae_nb.explanations.scoring import (
    ScoreSettings,
    auroc,
    balanced_accuracy,
    control_donors,
    detection_scores,
    embedding_auroc,
    embedding_scores,
    fuzzing_scores,
    scoring_examples,
)
from sae_nb.latents.stats import feature_stats

CTX = 24  # 23 stored rows per context (BOS is not stored)
WORDS = ("the state of union nation people congress war peace law tax year new work zeal "
         "jazz zone 1990 2024 42 march trade power").split()
TRUTH = {"the letter z": lambda t: "z" in t, "digits": lambda t: bool(re.search(r"\d", t))}
MANY = ScoreSettings(n_positive=30, n_negative=30, before=8, after=2)


# -- the planted store ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def store(tmp_path_factory, tokenizer) -> ActivationStore:
    rng = random.Random(5)
    text = " ".join(rng.choice(WORDS) for _ in range(2500))
    ids = np.array(tokenizer.encode(text, add_special_tokens=False))
    n_ctx = len(ids) // (CTX - 1)
    ids = ids[: n_ctx * (CTX - 1)]
    chars = [tokenizer.decode([int(i)]) for i in ids]
    noise = np.random.default_rng(0).normal(size=len(ids))
    strength = np.random.default_rng(1).uniform(1, 3, size=len(ids))  # graded activations
    acts = np.stack([[c == "z" for c in chars] * strength, [c.isdigit() for c in chars] * strength,
                     noise, [c == " " for c in chars]], 1).astype(np.float32)  # (N, 4)
    index = np.zeros(len(ids), dtype=INDEX_DTYPE)
    index["context"] = np.repeat(np.arange(n_ctx), CTX - 1)
    index["offset"] = np.tile(np.arange(1, CTX), n_ctx)
    index["doc"], index["pos"] = 0, np.arange(len(ids))
    index["token"] = ids
    header = {"model": "tiny-bytes", "site": "resid_out_layer1", "module": "model.layers.1",
              "io": "output", "d": 4, "dtype": "float32", "tokenizer": "bytes",
              "mode": "tokens", "pool": None, "ctx_len": CTX, "corpus": "words",
              "text_column": None, "seed": 0, "prepend_bos": True, "exclude_bos": True,
              "bos_token_id": tokenizer.bos_token_id}
    writer = StoreWriter(tmp_path_factory.mktemp("store"), header)
    half = (n_ctx // 2) * (CTX - 1)
    writer.write_shard(acts[:half], index[:half], units_end=n_ctx // 2)
    writer.write_shard(acts[half:], index[half:], units_end=n_ctx)
    writer.finish(n_units_total=n_ctx)
    return ActivationStore(writer.path)


@pytest.fixture(scope="module")
def dictionary():
    sae = ReLUSAE(4, 4)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.W_dec.copy_(torch.eye(4))
        sae.b_enc.copy_(torch.tensor([-0.5, -0.5, -1.0, -0.5]))
        sae.b_dec.zero_()
    sae.metadata = {"model": "tiny-bytes", "site": "resid_out_layer1"}
    return sae


@pytest.fixture(scope="module")
def stats(store, dictionary):
    return feature_stats(store, dictionary, n_top=8, n_quantiles=3, per_quantile=20,
                         progress=False)


# -- fake backends ----------------------------------------------------------------------------
def last_field(prompt: str, name: str) -> str:
    return re.findall(rf"^{name}: (.*)$", prompt, flags=re.MULTILINE)[-1]


class Oracle(Backend):
    """Names latent 0 and 1 from their marked words; answers Yes exactly when the text (or,
    in fuzzing prompts, every marked token) has what the description says."""

    name, supports_logprobs = "oracle", True

    def __init__(self):
        self.calls = 0

    def complete(self, prompt, max_tokens=32, stop=("\n",)):
        self.calls += 1
        words = last_field(prompt, "Marked words").split(", ")
        return " the letter z\n" if "z" in words else " digits\n" if words[0].isdigit() else ""

    def truth(self, prompt: str) -> bool:
        test = TRUTH.get(last_field(prompt, "Description"), lambda t: False)
        text = last_field(prompt, "Text")
        marked = re.findall(r"<<(.*?)>>", text)
        return all(test(m) for m in marked) if marked else test(text)

    def choice_logprobs(self, prompts, choices):
        self.calls += len(prompts)
        return np.array([[0.0, -5.0] if self.truth(p) else [-5.0, 0.0] for p in prompts])


class Coin(Oracle):
    name = "coin"

    def __init__(self, seed=0):
        super().__init__()
        self.rng = np.random.default_rng(seed)

    def choice_logprobs(self, prompts, choices):
        return self.rng.normal(size=(len(prompts), len(choices)))


class Failing(Oracle):
    """The oracle, but calls listed in ``fail`` raise ``error`` (counted from 1; by default a
    ``BackendError`` for an HTTP 500)."""

    def __init__(self, fail=(), error=None):
        super().__init__()
        self.fail = set(fail)
        self.error = BackendError("HTTP 500 from the server") if error is None else error

    def complete(self, prompt, max_tokens=32, stop=("\n",)):
        if self.calls + 1 in self.fail:
            self.calls += 1
            raise self.error
        return super().complete(prompt, max_tokens, stop)


# -- pieces -----------------------------------------------------------------------------------
def test_marked_text_keeps_the_space_outside_the_marks():
    window = {"tokens": [" the", " tax", " rate", "\n", "."], "acts": [0, 2.0, 0, 0, 1.0]}
    assert marked_text(window) == "the <<tax>> rate <<.>>"
    assert marked_text(window, [True, False, False, False, False]) == "<<the>> tax rate ."
    assert marked_words([window, window], 5) == ["tax", "."]


def test_parse_explanation_and_cut_at_stop():
    assert parse_explanation('Explanation: "Dates and times."\nmore') == "Dates and times"
    assert parse_explanation("\n  taxes") == "taxes"
    for bad in ("", "  \n ", "123 ,,", "<<>>"):
        with pytest.raises(BackendError, match="nonsense"):
            parse_explanation(bad)
    assert cut_at_stop("\n taxes\nTheme: x", ["\n"]) == "taxes"
    assert cut_at_stop("abc", []) == "abc"


def test_auroc_closed_forms_and_against_sklearn():
    from sklearn.metrics import roc_auc_score

    assert auroc([2, 3], [0, 1]) == 1.0
    assert auroc([0], [1]) == 0.0
    assert auroc([1, 1], [1]) == 0.5
    assert math.isnan(auroc([], [1])) and auroc([np.nan, 2], [1]) == 1.0
    rng = np.random.default_rng(3)
    pos, neg = rng.integers(0, 5, 40), rng.integers(1, 6, 30)  # many ties
    expected = roc_auc_score([1] * 40 + [0] * 30, np.concatenate([pos, neg]))
    assert auroc(pos, neg) == pytest.approx(expected)
    assert balanced_accuracy([1, 1, -1], [-1, 1]) == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_prompts_show_the_marked_tokens_of_the_top_contexts(store, dictionary, stats,
                                                           tokenizer):
    seen = []

    class Echo(Oracle):
        def complete(self, prompt, max_tokens=32, stop=("\n",)):
            seen.append(prompt)
            return "Explanation: the letter z" if self.chat else "letters"

    class Chat(Echo):
        chat = True

    small = llm_explanations(store, dictionary, stats, [0, 1], tokenizer, backend=Echo())
    big = llm_explanations(store, dictionary, stats, [0], tokenizer, backend=Chat())
    # the few-shot completion prompt lists the marked words (latent 1: digits, most frequent
    # first), the chat instruction each context with its firing tokens marked
    assert seen[0].endswith("Marked words: z\nTheme:")
    digits = last_field(seen[1], "Marked words").split(", ")
    assert sorted(digits) == ["0", "1", "2", "4", "9"]  # of 1990, 2024, 42
    windows = explanation_windows(store, dictionary, stats, 0, tokenizer, ExplainSettings())
    excerpts = re.findall(r"^\d+\. (.*)$", seen[2], flags=re.MULTILINE)
    assert "marked <<like this>>" in seen[2] and "Theme:" not in seen[2]
    assert len(excerpts) == len(windows) >= 8  # the 8 top rows, then interval samples
    assert all("<<z>>" in e for e in excerpts)
    assert not any(re.search(r"<<[^z]", e) for e in excerpts)  # nothing else marked
    assert small.loc[0, ["latent", "method", "explanation", "error"]].tolist() == [
        0, "llm", "letters", ""]
    assert math.isnan(small.loc[0, "score"]) and big.loc[0, "explanation"] == "the letter z"


# -- scoring ----------------------------------------------------------------------------------
def explained(store, dictionary, stats, tokenizer):
    return llm_explanations(store, dictionary, stats, [0, 1], tokenizer, backend=Oracle())


def test_oracle_detection_is_perfect_and_its_control_is_chance(store, dictionary, stats,
                                                               tokenizer):
    table = explained(store, dictionary, stats, tokenizer)
    assert table["explanation"].tolist() == ["the letter z", "digits"]
    scores = detection_scores(store, dictionary, stats, table, tokenizer, backend=Oracle(),
                              settings=MANY)
    main = scores[scores["method"] == "llm"].set_index("latent")
    control = scores[scores["method"] == "llm:control"].set_index("latent")
    assert (main["score"] == 1.0).all() and (main["balanced_accuracy"] == 1.0).all()
    assert (main["score_name"] == "detection_auroc").all() and (main["error"] == "").all()
    assert (main["n_positive"] == 30).all() and (main["n_negative"] == 30).all()
    # each control borrows the other latent's explanation and scores near chance
    assert control.loc[0, "explanation"] == "digits" and control.loc[0, "explanation_of"] == 1
    assert control.loc[1, "explanation"] == "the letter z"
    assert (abs(control["score"] - 0.5) < 0.25).all(), control["score"]


def test_random_scorer_is_near_chance(store, dictionary, stats, tokenizer):
    table = explained(store, dictionary, stats, tokenizer)
    scores = detection_scores(store, dictionary, stats, table, tokenizer, backend=Coin(),
                              settings=MANY, control=False)
    assert len(scores) == 2 and (abs(scores["score"] - 0.5) < 0.2).all(), scores["score"]


def test_calibration_cancels_a_scorers_bias_per_context(store, dictionary, stats, tokenizer):
    class Biased(Oracle):
        """The oracle's log-odds (+-1) plus a large bias of its own per context (+-6)."""

        def choice_logprobs(self, prompts, choices):
            self.calls += len(prompts)
            return np.array([[0.5 * (2 * self.truth(p) - 1)
                              + 6 * np.sin(len(last_field(p, "Text")) * 7.1), 0.0]
                             for p in prompts])

    table = explained(store, dictionary, stats, tokenizer)
    raw = detection_scores(store, dictionary, stats, table, tokenizer, backend=Biased(),
                           settings=MANY, control=False)
    assert (raw["score"] < 0.9).all(), raw["score"]
    backend = Biased()
    calibrated = ScoreSettings(**{**MANY.__dict__, "calibrate": True})
    fixed = detection_scores(store, dictionary, stats, table, tokenizer, backend=backend,
                             settings=calibrated)
    assert (fixed.loc[fixed["method"] == "llm", "score"] == 1.0).all()
    # one neutral pass per latent, shared by its explanation and its control
    assert backend.calls == 2 * 3 * 60


def test_oracle_fuzzing_is_perfect(store, dictionary, stats, tokenizer):
    table = explained(store, dictionary, stats, tokenizer)
    scores = fuzzing_scores(store, dictionary, stats, table, tokenizer, backend=Oracle(),
                            settings=MANY)
    main = scores[scores["method"] == "llm"]
    assert (main["score"] == 1.0).all() and (main["score_name"] == "fuzzing_auroc").all()


def test_scoring_contexts_are_held_out_and_seeded(store, dictionary, stats, tokenizer):
    shown = {w["row"] for w in explanation_windows(store, dictionary, stats, 0, tokenizer,
                                                   ExplainSettings())}
    a = scoring_examples(store, dictionary, stats, 0, tokenizer, MANY, seed=0)
    b = scoring_examples(store, dictionary, stats, 0, tokenizer, MANY, seed=0)
    c = scoring_examples(store, dictionary, stats, 0, tokenizer, MANY, seed=1)
    rows = lambda ex: [w["row"] for w in ex.positives + ex.negatives]  # noqa: E731
    assert rows(a) == rows(b) != rows(c)
    assert not shown & {w["row"] for w in a.positives}
    assert all(w["value"] > 0 for w in a.positives)
    assert all(max(w["acts"]) == 0 for w in a.negatives) and len(a.negatives) == 30
    table = explained(store, dictionary, stats, tokenizer)
    one = detection_scores(store, dictionary, stats, table, tokenizer, backend=Coin(0), seed=4)
    two = detection_scores(store, dictionary, stats, table, tokenizer, backend=Coin(0), seed=4)
    assert one.equals(two)


def test_a_latent_that_never_fires_gets_an_error_not_a_score(store, dictionary, stats,
                                                             tokenizer):
    import pandas as pd

    silent = ReLUSAE(4, 5)  # latent 4 never fires
    with torch.no_grad():
        silent.W_enc.copy_(torch.cat([dictionary.W_enc, torch.zeros(4, 1)], 1))
        silent.b_enc.copy_(torch.cat([dictionary.b_enc, torch.tensor([-1.0])]))
    silent_stats = feature_stats(store, silent, n_top=8, progress=False)
    table = llm_explanations(store, silent, silent_stats, [4], tokenizer, backend=Oracle())
    assert table.loc[0, "error"] == "the latent never fires in this store"
    given = pd.DataFrame({"latent": [0, 4], "method": "rule", "explanation": ["z", "z"],
                          "error": ""})
    scores = detection_scores(store, silent, silent_stats, given, tokenizer, backend=Oracle())
    assert scores.loc[scores["latent"] == 4, "error"].eq(
        "no contexts where the latent fires").all()
    assert scores.loc[scores["latent"] == 0, "error"].eq("").all()


def test_control_donors_form_a_seeded_cycle():
    import pandas as pd

    table = pd.DataFrame({"latent": range(6), "method": "llm", "explanation": list("abcde") + [""],
                          "error": [""] * 5 + ["failed"]})
    donors = control_donors(table, seed=0)
    cycle = [donors[("llm", f)] for f in range(5)]
    assert sorted(cycle) == list(range(5)) and all(d != f for f, d in enumerate(cycle))
    assert donors[("llm", 5)] in range(5)
    assert control_donors(table, seed=0) == donors != control_donors(table, seed=1)


def test_embedding_scores_with_a_fake_embedder(store, dictionary, stats, tokenizer):
    class Letters:
        """Whether a text has a z, a digit: the explanation 'zz' points at z contexts."""

        def encode(self, texts):
            return np.array([["z" in t, any(c.isdigit() for c in t)] for t in texts], float)

    import pandas as pd

    table = pd.DataFrame({"latent": [0, 1], "method": "llm", "explanation": ["zz", "42"],
                          "error": ""})
    scores = embedding_scores(store, dictionary, stats, table, tokenizer, embedder=Letters(),
                              settings=MANY)
    main = scores[scores["method"] == "llm"]
    control = scores[scores["method"] == "llm:control"]
    assert (main["score"] == 1.0).all() and (main["score_name"] == "embedding_auroc").all()
    assert (control["score"] < 0.75).all()


# -- failures and resuming --------------------------------------------------------------------
def test_a_failing_latent_is_recorded_and_the_run_goes_on(store, dictionary, stats, tokenizer):
    table = llm_explanations(store, dictionary, stats, [0, 1, 3], tokenizer,
                             backend=Failing(fail=[2]))
    assert table["error"].tolist()[:2] == ["", "HTTP 500 from the server"]
    assert table.loc[1, "explanation"] == "" and math.isnan(table.loc[1, "score"])
    # latent 3 fires on spaces: the oracle returns an empty reply, a recorded nonsense reply
    assert table.loc[2, "error"].startswith("nonsense reply")
    scores = detection_scores(store, dictionary, stats, table, tokenizer, backend=Oracle())
    failed = scores[(scores["latent"] == 1) & (scores["method"] == "llm")]
    assert failed["error"].iloc[0].startswith("no explanation to score (HTTP 500")
    # one explained latent: no other explanation to borrow for a control
    controls = scores.loc[scores["method"] == "llm:control", "error"]
    assert len(controls) == 3 and controls.str.contains("no other explained latent").all()


def test_a_rerun_resumes_where_it_stopped(store, dictionary, stats, tokenizer, tmp_path):
    latents = [0, 1, 2, 3]
    killed = Failing(fail=[3], error=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        llm_explanations(store, dictionary, stats, latents, tokenizer, backend=killed,
                         cache=tmp_path)
    assert killed.calls == 3
    rerun = Oracle()
    table = llm_explanations(store, dictionary, stats, latents, tokenizer, backend=rerun,
                             cache=tmp_path)
    assert rerun.calls == 2 and table["latent"].tolist() == latents  # latents 2 and 3 only
    assert table.loc[:1, "explanation"].tolist() == ["the letter z", "digits"]
    again = Oracle()
    assert llm_explanations(store, dictionary, stats, latents, tokenizer, backend=again,
                            cache=tmp_path).equals(table)
    assert again.calls == 0
    # failed latents (2, 3: empty replies) are retried only when asked
    llm_explanations(store, dictionary, stats, latents, tokenizer, backend=again,
                     cache=tmp_path, retry_failed=True)
    assert again.calls == 2
    # a torn last line (a run killed mid-write) is ignored, and cut so that the next record
    # starts on a line of its own; other settings start afresh
    [records] = tmp_path.glob("llm.*.jsonl")
    whole = records.read_text()
    with open(records, "a") as f:
        f.write('{"key": "0", "lat')
    fresh = Oracle()
    llm_explanations(store, dictionary, stats, latents, tokenizer, backend=fresh, cache=tmp_path)
    assert fresh.calls == 0 and records.read_text() == whole
    llm_explanations(store, dictionary, stats, latents, tokenizer, backend=fresh, cache=tmp_path,
                     settings=ExplainSettings(n_top=4))
    assert fresh.calls == 4


def test_scores_resume_too(store, dictionary, stats, tokenizer, tmp_path):
    table = explained(store, dictionary, stats, tokenizer)
    first = Oracle()
    one = detection_scores(store, dictionary, stats, table, tokenizer, backend=first,
                           cache=tmp_path)
    assert first.calls == 4 * 20  # 2 latents x (explanation + control) x 20 contexts
    second = Oracle()
    two = detection_scores(store, dictionary, stats, table, tokenizer, backend=second,
                           cache=tmp_path)
    assert second.calls == 0 and one.equals(two)
    table.loc[1, "explanation"] = "numbers"  # a changed explanation is scored afresh
    detection_scores(store, dictionary, stats, table, tokenizer, backend=second, cache=tmp_path)
    assert second.calls == 2 * 20  # latent 1's own, and latent 0's control, which borrows it


# -- the OpenAI-compatible endpoint -----------------------------------------------------------
def test_openai_backend_speaks_chat_and_completions():
    with FakeLLMServer(lambda path, body: (200, chat_reply("\n\nDates and times\nmore")
                                           if "chat" in path else
                                           completion_reply(" taxes\nTheme: x"), 0)) as server:
        chat = OpenAIBackend(server.url, "m-chat", api_key="k123")
        assert chat.complete("hi", max_tokens=7) == "Dates and times"
        plain = OpenAIBackend(server.url + "/", "m-base", chat=False)
        assert plain.complete("Theme:", max_tokens=5) == "taxes"
    (p1, h1, b1), (p2, h2, b2) = server.requests
    assert p1 == "/v1/chat/completions" and b1["messages"] == [{"role": "user", "content": "hi"}]
    assert b1["model"] == "m-chat" and b1["max_tokens"] == 7 and b1["temperature"] == 0
    assert h1["Authorization"] == "Bearer k123" and "Authorization" not in h2
    assert p2 == "/v1/completions" and b2["prompt"] == "Theme:" and b2["model"] == "m-base"
    assert "k123" not in str(chat.settings())
    with pytest.raises(ValueError, match="http"):
        OpenAIBackend("localhost:8000", "m")


@pytest.mark.parametrize("status,reply,delay,message", [
    (500, {"error": "boom"}, 0, "HTTP 500"),
    (200, chat_reply("x"), 2.0, "no reply .* within 0.3 s"),
    (200, chat_reply("   "), 0, "empty reply"),
    (200, {"choices": []}, 0, "no choices"),
    (200, b"<html>gateway</html>", 0, "not JSON"),
])
def test_openai_backend_failures_are_backend_errors(status, reply, delay, message):
    with FakeLLMServer(lambda path, body: (status, reply, delay)) as server:
        with pytest.raises(BackendError, match=message):
            OpenAIBackend(server.url, "m", timeout=0.3).complete("hi")


def test_an_unreachable_endpoint_is_a_backend_error():
    with FakeLLMServer(lambda path, body: (200, chat_reply("x"), 0)) as server:
        url = server.url
    with pytest.raises(BackendError, match="cannot reach"):
        OpenAIBackend(url, "m", timeout=2).complete("hi")


def test_endpoint_explains_and_detects_per_latent(store, dictionary, stats, tokenizer):
    calls = {"n": 0}

    def script(path, body):
        prompt = body["messages"][0]["content"]
        if "Answer Yes or No" in prompt:  # detection: yes exactly on z contexts
            text = re.search(r"Text: (.*)\n", prompt).group(1)
            return 200, chat_reply("Yes." if "z" in text else "No"), 0
        calls["n"] += 1
        if calls["n"] == 2:
            return 500, {"error": "overloaded"}, 0
        return 200, chat_reply("the letter z" if "<<z>>" in prompt else "digits"), 0

    with FakeLLMServer(script) as server:
        backend = OpenAIBackend(server.url, "m")
        table = llm_explanations(store, dictionary, stats, [0, 1, 2], tokenizer, backend=backend)
        assert table["explanation"].tolist() == ["the letter z", "", "digits"]
        assert "HTTP 500" in table.loc[1, "error"]
        scores = detection_scores(store, dictionary, stats, table, tokenizer, backend=backend)
    own = scores[scores["method"] == "llm"].set_index("latent")
    assert own.loc[0, "score"] == 1.0 and own.loc[0, "balanced_accuracy"] == 1.0
    assert own.loc[1, "error"] != "" and own.loc[2, "error"] == ""


# -- the local backend ------------------------------------------------------------------------
def test_local_backend_batches_match_single_prompts(llama):
    backend = LocalBackend(llama)
    assert backend.supports_logprobs and backend.name.startswith("local:")
    # first tokens that differ under the byte tokenizer (" Yes" and " No" both start with " ")
    choices = ["Yes", " No"]
    prompts = ["Matches:", "a much longer prompt than the first. Matches:", "xy"]
    batched = backend.choice_logprobs(prompts, choices)
    single = np.concatenate([backend.choice_logprobs([p], choices) for p in prompts])
    assert batched.shape == (3, 2)
    np.testing.assert_allclose(batched, single, atol=1e-4)
    shots = ["Description: taxes\nText: " + t + "\nMatches:" for t in ("a tax", "the war on",
                                                                       "x", "tax tax tax")]
    cached = backend.choice_logprobs(shots, choices)  # a long shared prefix
    backend.prefix_cache = False
    np.testing.assert_allclose(cached, backend.choice_logprobs(shots, choices), atol=1e-4)
    backend.prefix_cache = True
    assert LocalBackend._shared_prefix([[1, 2, 3], [1, 2, 4, 5], [1, 2]]) == 1
    assert LocalBackend._shared_prefix([[1, 2, 3], [1, 2, 3]]) == 2
    # each is the log-probability of its choice's first token after the prompt: a direct
    # forward pass of every prompt, unbatched, in float64
    tok = backend.tokenizer
    first = [tok.encode(c, add_special_tokens=False)[0] for c in choices]
    assert first[0] != first[1]
    for prompt, got in zip(prompts + shots, np.concatenate([batched, cached])):
        ids = torch.tensor([[tok.bos_token_id] + tok.encode(prompt, add_special_tokens=False)])
        with torch.no_grad():
            logp = torch.log_softmax(backend.hf(input_ids=ids).logits[0, -1].double(), -1)
        np.testing.assert_allclose(got, logp[first].numpy(), atol=1e-4, err_msg=prompt)
    text = backend.complete("the state of", max_tokens=5, stop=())
    assert isinstance(text, str) and len(tok.encode(text, add_special_tokens=False)) <= 5 * 4


# -- real models (slow) -----------------------------------------------------------------------
@pytest.mark.slow
def test_minilm_ranks_date_contexts_above_others():
    from sae_nb.explanations.meaning import embedding_model

    dates = ["on the 4th of July, 1776, the", "signed on March 3, 1990 in", "every Monday "
             "morning at nine", "in December of last year we", "by the spring of 2024 the"]
    others = ["the people of this great nation", "taxes on imported steel and", "our army "
              "and navy stand ready", "the price of wheat and corn", "freedom of speech and of"]
    embedder = embedding_model()
    assert embedding_auroc(embedder, "dates", dates, others) == 1.0
    assert embedding_auroc(embedder, "taxes and trade", dates, others) < 0.5


@pytest.mark.slow
def test_the_embedded_model_names_a_war_latent():
    from sae_nb.explanations.autointerp import completion_prompt

    backend = LocalBackend()  # the embedded SmolLM2-135M-Instruct
    reply = backend.complete(completion_prompt([], ["war", "army", "battle", "troops"]),
                             max_tokens=8)
    assert "war" in parse_explanation(reply).lower()
    prompt = "Description: taxes\nText: we cut the tax on wages\nMatches:"
    logp = backend.choice_logprobs([prompt], [" Yes", " No"])
    # the log-probabilities of the one-token answers " Yes" and " No" after the prompt, as a
    # direct forward pass of the embedded model gives them
    tok = backend.tokenizer
    yes, no = (tok.encode(c, add_special_tokens=False) for c in (" Yes", " No"))
    assert len(yes) == len(no) == 1 and yes != no
    ids = torch.tensor([[tok.bos_token_id] + tok.encode(prompt, add_special_tokens=False)])
    with torch.no_grad():
        direct = torch.log_softmax(backend.hf(input_ids=ids).logits[0, -1].double(), -1)
    np.testing.assert_allclose(logp[0], direct[[yes[0], no[0]]].numpy(), atol=1e-4)
