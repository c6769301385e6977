"""Executable explanations (sae_nb.explanations.rules) on tiny synthetic stores, against planted
truths and a brute force.

The planted store's activations are one-hot codes of each row's token and previous token plus
small integer noise, and a ReLU dictionary reads them exactly: latent 0 fires on one token,
latent 1 on one bigram, latent 3 after one token, latent 5 on two tokens, latent 2 on noise,
latent 4 never. The random store feeds random token embeddings to a TopK dictionary with
weights in multiples of 1/8 (exact in float32, no ties within a row), so a float64 brute force
sees the very same codes.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_tokenizer
from sklearn.metrics import roc_auc_score

from sae_nb.activations.corpora import token_strings
from sae_nb.activations.split import HeldoutSplit, heldout_split
from sae_nb.activations.store import INDEX_DTYPE, ActivationStore, StoreWriter
from sae_nb.dictionaries.architectures import ReLUSAE, TopKSAE
from sae_nb.explanations import rules
from sae_nb.explanations.rules import (
    RuleError,
    apply_rule,
    count_firings,
    fit_rules,
    previous_tokens,
    rule_explanations,
)

CTX = 16  # 15 stored rows per context (BOS left out)
BOS = 300
FIRST, V = 32, 8  # the planted store's tokens are FIRST .. FIRST + V - 1
TOKEN, PREV, BIGRAM, PAIR = 35, 34, (33, 36), (37, 38)


def write_store(folder, tokens: np.ndarray, acts: np.ndarray, mode: str = "tokens"):
    """A one-shard store of ``tokens`` ``(n_contexts, CTX - 1)`` and their activations."""
    n_ctx = tokens.shape[0]
    header = {"model": "tiny", "site": "resid_out_layer1", "module": "model.layers.1",
              "io": "output", "d": acts.shape[1], "dtype": "float32", "tokenizer": "bytes",
              "mode": mode, "pool": None, "ctx_len": CTX, "corpus": "docs", "text_column": None,
              "seed": 0, "prepend_bos": True, "exclude_bos": True, "bos_token_id": BOS}
    index = np.zeros(tokens.size, dtype=INDEX_DTYPE)
    index["context"] = np.repeat(np.arange(n_ctx), CTX - 1)
    index["offset"] = np.tile(np.arange(1, CTX), n_ctx)
    index["doc"], index["pos"] = index["context"], index["offset"]
    index["token"] = tokens.reshape(-1) if mode == "tokens" else -1
    writer = StoreWriter(folder, header)
    writer.write_shard(acts.astype(np.float32), index, units_end=n_ctx)
    writer.finish(n_units_total=n_ctx)
    return ActivationStore(folder)


def with_prev(tokens: np.ndarray) -> np.ndarray:
    """The previous token of each row of ``(n_contexts, CTX - 1)`` tokens: BOS first."""
    return np.concatenate([np.full((len(tokens), 1), BOS), tokens[:, :-1]], axis=1)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    rng = np.random.default_rng(0)
    tokens = rng.integers(FIRST, FIRST + V, size=(160, CTX - 1))
    prev = with_prev(tokens)
    acts = np.zeros((tokens.size, 2 * V + 1))
    acts[np.arange(tokens.size), tokens.reshape(-1) - FIRST] = 1
    p = prev.reshape(-1)
    acts[np.flatnonzero(p != BOS), V + p[p != BOS] - FIRST] = 1
    acts[:, 2 * V] = rng.integers(0, 20, size=tokens.size)  # noise: 19 in 1 row of 20
    store = write_store(tmp_path_factory.mktemp("planted"), tokens, acts)
    return store, tokens.reshape(-1), p


def planted_dictionary() -> ReLUSAE:
    sae = ReLUSAE(2 * V + 1, 8)
    W, b = torch.zeros(2 * V + 1, 8), torch.zeros(8)
    W[TOKEN - FIRST, 0], b[0] = 1, -0.5
    W[BIGRAM[1] - FIRST, 1] = W[V + BIGRAM[0] - FIRST, 1] = 1
    b[1] = -1.5
    W[2 * V, 2], b[2] = 1, -18.5
    W[V + PREV - FIRST, 3], b[3] = 1, -0.5
    b[4] = -100
    W[PAIR[0] - FIRST, 5] = W[PAIR[1] - FIRST, 5] = 1
    b[5] = -0.5
    W[2 * V, 6], b[6] = 1, -9.5  # noise, half the rows
    W[0, 7] = W[V + 1, 7] = W[2 * V, 7] = 1
    b[7] = -10.5
    with torch.no_grad():
        sae.W_enc.copy_(W)
        sae.b_enc.copy_(b)
        sae.b_dec.zero_()
    return sae


@pytest.fixture(scope="module")
def planted_table(planted):
    store, _, _ = planted
    return rule_explanations(store, planted_dictionary(), progress=False,
                             tokenizer=make_tokenizer())


def row(table, latent: int, method: str = "rule"):
    return table[(table.latent == latent) & (table.method == method)].iloc[0]


def test_planted_token_gets_that_token_with_heldout_f1_one(planted_table):
    r = row(planted_table, 0)
    rule = json.loads(r.rule)
    assert (rule["kind"], rule["items"]) == ("tokens", [TOKEN])
    n = r.n_fired_train  # the token's training rows, all firing, smoothed by 4 prior rows
    assert rule["rates"] == [pytest.approx((n + 4 * n / 1920) / (n + 4), abs=1e-6)]
    name = token_strings(make_tokenizer(), [TOKEN])[0]
    assert r.explanation == f"token {name!r}"
    assert (r.score, r.precision, r.recall, r.auroc) == (1.0, 1.0, 1.0, 1.0)
    assert r.score_name == "f1" and r.error == "" and r.rule_kind == "tokens"


def test_planted_bigram_prev_token_and_token_set(planted_table):
    bigram, prev, pair = row(planted_table, 1), row(planted_table, 3), row(planted_table, 5)
    assert json.loads(bigram.rule)["items"] == [list(BIGRAM)] and bigram.rule_kind == "bigrams"
    assert json.loads(prev.rule)["items"] == [PREV] and prev.rule_kind == "prev_tokens"
    assert sorted(json.loads(pair.rule)["items"]) == list(PAIR) and pair.rule_kind == "tokens"
    assert bigram.score == prev.score == pair.score == 1.0
    assert " then " in bigram.explanation and prev.explanation.startswith("after ")


def test_random_latent_scores_low_and_dead_latent_is_recorded(planted_table):
    noise = row(planted_table, 2)  # fires on 1 row in 20, whatever the tokens
    assert noise.n_fired_heldout > 0 and noise.score < 0.2
    assert abs(noise.auroc - 0.5) < 0.1
    dead = row(planted_table, 4)
    assert np.isnan(dead.score) and dead.error == "never fires in the training rows"
    assert dead.explanation == "" and dead.n_fired_train == 0


def test_table_has_the_contract_columns(planted_table):
    for column in ("latent", "method", "explanation", "score", "score_name", "error",
                   "precision", "recall", "auroc", "n_fired_heldout", "rule_kind", "f1_all_rows"):
        assert column in planted_table.columns
    assert set(planted_table.method) == {"rule", "rule:control"}
    assert len(planted_table) == 2 * 8


def test_previous_tokens_follow_contexts_and_bos():
    index = np.zeros(6, dtype=INDEX_DTYPE)
    index["token"] = [5, 6, 7, 8, 9, 4]
    index["context"] = [0, 0, 0, 1, 1, 2]
    index["offset"] = [1, 2, 3, 1, 2, 0]
    assert previous_tokens(index, bos_token_id=99).tolist() == [99, 5, 6, 99, 8, -1]
    assert previous_tokens(index).tolist() == [-1, 5, 6, -1, 8, -1]


# -- a random store and a TopK dictionary, against a brute force ------------------------------
D, F, K = 8, 24, 4


@pytest.fixture(scope="module")
def random_case(tmp_path_factory):
    rng = np.random.default_rng(1)
    tokens = rng.integers(40, 52, size=(120, CTX - 1))
    prev = with_prev(tokens)
    emb = rng.integers(-3, 4, size=(BOS + 1, D))
    noise = rng.integers(-1, 2, (tokens.size, D))
    acts = emb[tokens.reshape(-1)] + emb[prev.reshape(-1)] // 2 + noise
    store = write_store(tmp_path_factory.mktemp("random"), tokens, acts)
    g = torch.Generator().manual_seed(3)
    sae = TopKSAE(D, F, k=K)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randint(-8, 9, (D, F), generator=g) / 8)
        sae.b_dec.copy_(torch.randint(-4, 5, (D,), generator=g) / 8)
        sae.b_enc.copy_(torch.randint(-8, 1, (F,), generator=g) / 8 + torch.arange(F) / 4096)
    return store, sae, tokens.reshape(-1), prev.reshape(-1)


def brute_fired(store, sae) -> np.ndarray:
    """(N, F) bool: where each latent fires, by float64 numpy."""
    x = store[:].astype(np.float64)
    pre = (x - sae.b_dec.detach().double().numpy()) @ sae.W_enc.detach().double().numpy()
    pre += sae.b_enc.detach().double().numpy()
    keep = np.zeros_like(pre, dtype=bool)
    np.put_along_axis(keep, np.argsort(-pre, axis=1)[:, :K], True, axis=1)
    return keep & (pre > 0)


def test_scores_match_a_brute_force_per_latent(random_case):
    store, sae, tokens, prev = random_case
    table = rule_explanations(store, sae, progress=False, seed=0)
    boundary = heldout_split(store, round(len(store) * 0.2), 0).boundary
    fired = brute_fired(store, sae)
    held = slice(boundary, None)
    checked = 0
    for _, r in table.iterrows():
        y = fired[held, r.latent]
        assert r.n_fired_heldout == y.sum() and r.n_fired_train == fired[:boundary, r.latent].sum()
        if not r.rule:
            continue
        score = apply_rule(json.loads(r.rule), tokens[held], prev[held])
        match = score > 0
        tp = (match & y).sum()
        assert r.score == pytest.approx(2 * tp / (match.sum() + y.sum()), abs=1e-12)
        assert r.precision == pytest.approx(tp / match.sum() if match.any() else 0.0, abs=1e-12)
        assert r.recall == pytest.approx(tp / y.sum(), abs=1e-12)
        assert r.auroc == pytest.approx(roc_auc_score(y, score), abs=1e-12)
        checked += 1
    assert checked > 30  # most latents, both methods


def test_fit_finds_the_best_token_set_of_a_brute_force():
    """Without a length cap or smoothing the token set has the best training F1 of all subsets."""
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 7, size=600)
    prev = np.r_[-1, tokens[:-1]]
    rate = rng.random((5, 7)) ** 3  # each latent fires on each token at its own rate
    fired = rng.random((600, 5)) < rate[:, tokens].T
    rows, latents = np.nonzero(fired)
    counts = count_firings(tokens, prev, rows, latents, boundary=500, n_latents=5)
    fitted = fit_rules(counts, max_items=7, min_count=1, tolerance=0.0, prior_rows=0,
                       kinds=("tokens",))
    train_tok, train_fired = tokens[:500], fired[:500]
    for f in range(5):
        best = 0.0
        for mask in range(1, 2 ** 7):
            chosen = np.isin(train_tok, [t for t in range(7) if mask >> t & 1])
            tp = (chosen & train_fired[:, f]).sum()
            best = max(best, 2 * tp / (chosen.sum() + train_fired[:, f].sum()))
        assert fitted.train_f1[f] == pytest.approx(best, abs=1e-12)


def test_control_scores_near_chance_and_below_the_rules(random_case):
    store, sae, _, _ = random_case
    table = rule_explanations(store, sae, progress=False, seed=0)
    own, ctrl = (table[table.method == m].set_index("latent") for m in ("rule", "rule:control"))
    scored = ctrl.index[np.isfinite(ctrl.score)]
    assert len(scored) > 15
    assert (ctrl.rule_latent[scored] != scored).all()
    # each control scores its donor's own rule, under the donor's description
    donors = ctrl.rule_latent[scored].to_numpy()
    assert (ctrl.rule[scored].to_numpy() == own.rule[donors].to_numpy()).all()
    assert (ctrl.explanation[scored].to_numpy() == own.explanation[donors].to_numpy()).all()
    assert abs(ctrl.auroc[scored].median() - 0.5) < 0.1
    assert own.auroc[scored].median() > 0.7
    assert own.score[scored].median() > ctrl.score[scored].median() + 0.1


def test_reproducible_with_a_seed(random_case):
    store, sae, _, _ = random_case
    a, b = (rule_explanations(store, sae, progress=False, seed=5) for _ in range(2))
    assert a.equals(b)
    c = rule_explanations(store, sae, progress=False, seed=6)
    assert a[a.method == "rule"].equals(c[c.method == "rule"])
    assert not np.array_equal(a.rule_latent[a.method == "rule:control"],
                              c.rule_latent[c.method == "rule:control"])


def test_cache_reused_for_the_same_identity_and_redone_for_another_dictionary(
        random_case, tmp_path, monkeypatch):
    store, sae, _, _ = random_case
    passes = []
    count_store = rules.count_store
    monkeypatch.setattr(rules, "count_store",
                        lambda *a, **k: passes.append(1) or count_store(*a, **k))
    first = rule_explanations(store, sae, cache=tmp_path, progress=False)
    again = rule_explanations(store, sae, cache=tmp_path, progress=False)
    assert len(passes) == 1
    assert (tmp_path / rules.TABLE_FILE).exists() and (tmp_path / rules.IDENTITY_FILE).exists()
    assert list(again.columns) == list(first.columns)
    for column in first.columns:
        if pd.api.types.is_numeric_dtype(first[column]):
            np.testing.assert_allclose(again[column], first[column], rtol=1e-12, err_msg=column)
        else:
            assert again[column].tolist() == first[column].tolist(), column
    other = TopKSAE(D, F, k=K)
    with torch.no_grad():
        other.load_state_dict(sae.state_dict())
        other.b_enc[0] += 1
    rule_explanations(store, other, cache=tmp_path, progress=False)
    assert len(passes) == 2
    rule_explanations(store, sae, cache=tmp_path, progress=False, max_items=3)
    assert len(passes) == 3


def test_bad_input_is_refused_clearly(random_case, planted, tmp_path):
    store, sae, tokens, _ = random_case
    with pytest.raises(RuleError, match="d_in=17"):
        rule_explanations(store, planted_dictionary(), progress=False)
    with pytest.raises(RuleError, match="held-out rows"):
        rule_explanations(store, sae, split=HeldoutSplit(store, len(store), np.array([])),
                          progress=False)
    with pytest.raises(RuleError, match="heldout_fraction=1.5"):
        rule_explanations(store, sae, heldout_fraction=1.5, progress=False)
    with pytest.raises(RuleError, match="not of"):
        rule_explanations(store, sae, split=heldout_split(planted[0], 300, 0), progress=False)
    sentences = write_store(tmp_path / "sentences", np.zeros((4, CTX - 1), int),
                            np.zeros((4 * (CTX - 1), D)), mode="sentences")
    with pytest.raises(RuleError, match="'sentences' mode"):
        rule_explanations(sentences, sae, progress=False)
    with pytest.raises(RuleError, match="max_items=0"):
        fit_rules(count_firings(tokens, tokens, [], [], 10, F), max_items=0)


def test_small_chunks_and_buffer_give_the_same_table(random_case, monkeypatch):
    """The pass reduces its buffer of firing keys as it fills: any chunking, same counts."""
    store, sae, _, _ = random_case
    whole = rule_explanations(store, sae, progress=False)
    monkeypatch.setattr(rules, "MAX_BUFFERED_KEYS", 50)
    pieces = rule_explanations(store, sae, progress=False, batch_size=97)
    assert pieces.equals(whole)
