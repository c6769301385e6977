"""Executable explanations: for every latent, the simplest token rule that predicts where it
fires, fitted on training rows and scored exactly on held-out rows it never saw.

A rule is a set of items of one kind, simplest first (``RULE_KINDS``):

- ``tokens``: the row's token is one of a set (``tokens ' tax', ' taxes'``);
- ``prev_tokens``: the token before it is one of a set (``after ' the', ' a'``);
- ``bigrams``: the (previous, current) token pair is one of a set (``' the' then ' film'``).

**One pass.** Each chunk of the store is encoded once for all latents (TopK dictionaries
sparsely); its nonzeros become keys ``(latent, previous token, token)`` counted sparsely, per
part (training rows, held-out rows). Token-pair counts come from the store's index. All that
follows is arithmetic on those counts (:class:`RuleCounts`), vectorised over latents: the top and
interval-sampled contexts of :mod:`sae_nb.latents.stats` are a subset of what the counts hold.

**Fitting** (:func:`fit_rules`, training counts only). Per latent and kind, the items occurring
at least ``min_count`` times are ranked by their training firing rate (rows where the latent
fires / rows holding the item). With no length cap, the F1-optimal set is a prefix of that
ranking (F1 = 2 TP / (P + predicted) is a ratio of sums, maximised by every item whose rate beats
a threshold); the rule is the best prefix of at most ``max_items`` items. Among all prefixes of
all kinds within ``tolerance`` of a latent's best training F1, the fewest items win, then the
simplest kind. The rate is smoothed first, ``(fired + prior_rows * base rate) / (rows +
prior_rows)``, and TP counted as rows x smoothed rate: an item seen twice and fired on twice is
then worth ~(2 + 0) / (2 + 4), not a perfect 1, so a rare latent does not get ten one-off pairs
that never recur (``prior_rows=0``: the plain training F1). ``train_f1`` is the plain one.

**Scoring** (:func:`score_rules`, held-out counts only, exact). Precision, recall and F1 of
"the rule matches the row" against "the latent fires (code > 0)". AUROC of a graded rule score
against firing: a row matching the rule scores its item's smoothed training firing rate, any
other row scores 0; ties count one half (Mann-Whitney). So the AUROC of a one-item rule is that
of its yes/no prediction, (TPR + TNR) / 2; a longer rule gains by ranking reliable items first.

Not a kind: "a token anywhere in the last w tokens". On the shipped dictionary (100k tokens of
its store) the best such single-token rule beat a latent's rule by more than 0.05 held-out F1 for
31, 21 and 14 of 4,608 latents at w = 4, 8, 16 (median F1 0.13, 0.10, 0.08).

**Control** (``rule:control`` rows): each latent with a rule is scored with the rule of another
one, drawn by a seeded random cycle over them; it should score near chance.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from sae_nb.activations.corpora import token_strings
from sae_nb.activations.split import HeldoutSplit, heldout_split
from sae_nb.activations.store import IDENTITY, ActivationStore, StoreError
from sae_nb.dictionaries.architectures import Dictionary, TopKSAE, dictionary_hash
from sae_nb.util.errors import SaeNbError
from sae_nb.util.io import atomic_write_json, folder_name, write_table
from sae_nb.util.threads import one_thread

log = logging.getLogger(__name__)

RULE_KINDS = ("tokens", "prev_tokens", "bigrams")  # simplest first
METHOD = "rule"
TABLE_FILE = "rule.csv"  # the explanation table (EXPLAIN.md)
IDENTITY_FILE = "rule.identity.json"  # what it was computed from: the cache key
RULES_VERSION = 1
MAX_BUFFERED_KEYS = 16_000_000  # raw firing keys held before they are reduced to counts
TEXT_COLUMNS = ("method", "explanation", "score_name", "error", "rule_kind", "rule")


class RuleError(SaeNbError, ValueError):
    """The store, dictionary or split cannot give executable explanations; says why."""


# -- counts ---------------------------------------------------------------------------------
def _reduce(keys: np.ndarray, counts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique ``keys`` and the summed ``counts`` (1 each when None) of each."""
    keys = np.asarray(keys, dtype=np.int64)
    if keys.size == 0:
        return keys, np.zeros(0, dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    k = keys[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    c = np.ones(len(k), dtype=np.int64) if counts is None else np.asarray(counts)[order]
    return k[starts], np.add.reduceat(c, starts).astype(np.int64)


def _lookup(keys: np.ndarray, counts: np.ndarray, query: np.ndarray) -> np.ndarray:
    """``counts`` at each ``query`` key of sorted ``keys``; 0 where absent."""
    if keys.size == 0:
        return np.zeros(np.shape(query), dtype=np.int64)
    i = np.clip(np.searchsorted(keys, query), 0, len(keys) - 1)
    return np.where(keys[i] == query, counts[i], 0)


def item_space(kind: str, width: int) -> int:
    """How many distinct items a kind has: ``width`` tokens, or ``width ** 2`` pairs."""
    if kind not in RULE_KINDS:
        raise RuleError(f"Unknown rule kind {kind!r}; pick from {RULE_KINDS}.")
    return width * width if kind == "bigrams" else width


def _item_of(pair: np.ndarray, kind: str, width: int) -> np.ndarray:
    """The item of each ``prev * width + token`` pair key."""
    return {"tokens": pair % width, "prev_tokens": pair // width, "bigrams": pair}[kind]


@dataclass
class PartCounts:
    """Counts over one part of the store (training or held-out rows)."""

    rows: int
    fired: np.ndarray  # (F,) int64: rows where each latent fires
    pair_keys: np.ndarray  # (n,) sorted int64 ``prev * W + token`` of the part's rows
    pair_counts: np.ndarray  # (n,) int64
    triple_keys: np.ndarray  # (m,) sorted int64 ``(latent * W + prev) * W + token`` of firings
    triple_counts: np.ndarray  # (m,) int64
    _memo: dict = field(default_factory=dict, repr=False)

    def items(self, kind: str, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows holding each item of ``kind``: sorted item keys and their counts."""
        if ("items", kind) not in self._memo:
            self._memo["items", kind] = _reduce(_item_of(self.pair_keys, kind, width),
                                                self.pair_counts)
        return self._memo["items", kind]

    def firings(self, kind: str, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Firing rows per (latent, item): sorted keys ``latent * item_space + item``, counts."""
        if ("firings", kind) not in self._memo:
            latent, pair = np.divmod(self.triple_keys, width * width)
            key = latent * item_space(kind, width) + _item_of(pair, kind, width)
            self._memo["firings", kind] = _reduce(key, self.triple_counts)
        return self._memo["firings", kind]


@dataclass
class RuleCounts:
    """Everything rules are fitted and scored from: firing counts per (latent, previous token,
    token), row counts per token pair, per part. Token ids lie in ``0 .. width - 2``; the id
    ``width - 1`` stands for "no previous token" (a context's first stored row, no BOS)."""

    n_latents: int
    width: int
    train: PartCounts
    heldout: PartCounts


class _Counter:
    """Accumulates the firing keys of encoded chunks, reducing them as the buffer fills."""

    def __init__(self, tokens: np.ndarray, prev: np.ndarray, boundary: int, n_latents: int,
                 width: int):
        self.tokens, self.prev, self.boundary = tokens, prev, boundary
        self.F, self.W = n_latents, width
        self.keys: dict[str, list] = {"train": [], "heldout": []}
        self.counts: dict[str, list] = {"train": [], "heldout": []}
        self.fired = {p: np.zeros(n_latents, dtype=np.int64) for p in self.keys}
        self.buffered = 0

    def add(self, rows: np.ndarray, latents: np.ndarray) -> None:
        """Count the firings at global ``rows`` of ``latents`` (both ``(M,)``)."""
        key = (latents.astype(np.int64) * self.W + self.prev[rows]) * self.W + self.tokens[rows]
        held = rows >= self.boundary
        for part, mask in (("train", ~held), ("heldout", held)):
            self.fired[part] += np.bincount(latents[mask], minlength=self.F)
            self.keys[part].append(key[mask])
            self.counts[part].append(np.ones(int(mask.sum()), dtype=np.int64))
        self.buffered += len(key)
        if self.buffered > MAX_BUFFERED_KEYS:
            self._compact()

    def _compact(self) -> None:
        for part in self.keys:
            keys, counts = _reduce(np.concatenate(self.keys[part] or [np.zeros(0, np.int64)]),
                                   np.concatenate(self.counts[part] or [np.zeros(0, np.int64)]))
            self.keys[part], self.counts[part] = [keys], [counts]
        self.buffered = sum(len(k[0]) for k in self.keys.values())

    def finish(self) -> RuleCounts:
        self._compact()
        pairs = self.prev * self.W + self.tokens
        parts = {}
        for part, rows in (("train", slice(0, self.boundary)),
                           ("heldout", slice(self.boundary, len(self.tokens)))):
            pk, pc = _reduce(pairs[rows])
            parts[part] = PartCounts(len(pairs[rows]), self.fired[part], pk, pc,
                                     self.keys[part][0], self.counts[part][0])
        return RuleCounts(self.F, self.W, parts["train"], parts["heldout"])


def _width(tokens: np.ndarray, prev: np.ndarray) -> int:
    top = max(int(tokens.max(initial=0)), int(prev.max(initial=0)))
    return top + 2  # ids 0..top, and top + 1 for "no previous token"


def _check_tokens(tokens: np.ndarray, prev: np.ndarray) -> None:
    if tokens.shape != prev.shape or tokens.ndim != 1:
        raise RuleError(f"tokens {tokens.shape} and prev_tokens {prev.shape} must be two (N,) "
                        f"arrays of the same length.")
    if tokens.size and (tokens.min() < 0 or prev.min() < -1):
        raise RuleError("Token ids must be >= 0 (and previous tokens >= -1, -1 for none); a "
                        "sentence-mode store has no tokens: extract in token mode.")


def count_firings(tokens, prev_tokens, rows, latents, boundary: int, n_latents: int
                  ) -> RuleCounts:
    """Counts from explicit firings, the pure core of the one pass (tests call it directly).

    ``tokens``, ``prev_tokens``: ``(N,)`` per store row (``-1``: no previous token);
    ``rows``, ``latents``: ``(M,)`` every (row, latent) where the latent fires; rows
    ``[0, boundary)`` are the training part, the rest the held-out part."""
    tokens, prev = np.asarray(tokens, np.int64), np.asarray(prev_tokens, np.int64)
    _check_tokens(tokens, prev)
    width = _width(tokens, prev)
    counter = _Counter(tokens, np.where(prev < 0, width - 1, prev), boundary, n_latents, width)
    counter.add(np.asarray(rows, np.int64), np.asarray(latents, np.int64))
    return counter.finish()


def previous_tokens(index: np.ndarray, bos_token_id: int | None = None) -> np.ndarray:
    """The token before each row of a store index (``ActivationStore.index()``), ``(N,)``: the
    row before in the same context; for a context's first stored row at offset 1, the BOS id
    when the contexts began with a BOS the store left out; else -1."""
    tok, ctx, off = (index[k].astype(np.int64) for k in ("token", "context", "offset"))
    prev = np.full(len(tok), -1, dtype=np.int64)
    follows = np.r_[False, (ctx[1:] == ctx[:-1]) & (off[1:] == off[:-1] + 1)]
    prev[follows] = tok[np.flatnonzero(follows) - 1]
    if bos_token_id is not None:
        prev[~follows & (off == 1)] = int(bos_token_id)
    return prev


# -- fitting --------------------------------------------------------------------------------
@dataclass
class Rules:
    """One rule per latent (F latents, rules of at most m items)."""

    width: int  # as in RuleCounts: width - 1 is "no previous token"
    kind: np.ndarray  # (F,) str, one of RULE_KINDS; "" where no rule could be fitted
    items: np.ndarray  # (F, m) int64 item keys (a token, or prev * width + token); -1 pads
    rates: np.ndarray  # (F, m) float64 each item's training firing rate; 0 pads
    train_f1: np.ndarray  # (F,) F1 of the rule on the training rows; NaN without a rule

    def rule(self, latent: int) -> dict:
        """The rule of ``latent`` as plain data: ``{"kind", "items", "rates"}``; items are token
        ids, or ``[prev, token]`` pairs for bigrams, -1 standing for "no previous token"."""
        keep = self.items[latent] >= 0
        items, rates = self.items[latent][keep], self.rates[latent][keep]
        none = self.width - 1
        tok = lambda t: -1 if t == none else int(t)  # noqa: E731
        kind = str(self.kind[latent])
        if kind == "bigrams":
            listed = [[tok(i // self.width), tok(i % self.width)] for i in items]
        else:
            listed = [tok(i) for i in items]
        return {"kind": kind, "items": listed, "rates": [round(float(r), 6) for r in rates]}


def _prefixes(counts: RuleCounts, kind: str, max_items: int, min_count: int,
              prior_rows: float) -> dict:
    """Every candidate prefix of every latent for one kind: per element (latent, rank, item,
    rate, f1, smoothed f1), the element being the last item of the prefix of length rank + 1."""
    W, part = counts.width, counts.train
    ikeys, icounts = part.items(kind, W)
    fkeys, c = part.firings(kind, W)
    latent, item = np.divmod(fkeys, item_space(kind, W))
    n = _lookup(ikeys, icounts, item)
    ok = n >= min_count
    latent, item, c, n = latent[ok], item[ok], c[ok], n[ok]
    base = part.fired[latent] / max(part.rows, 1)  # the latent's firing rate on any row
    smooth = (c + prior_rows * base) / (n + prior_rows)
    order = np.lexsort((item, -c, -smooth, latent))  # by latent, then smoothed rate, count
    latent, item, c, n, smooth = (a[order] for a in (latent, item, c, n, smooth))
    rank = np.arange(len(latent)) - np.searchsorted(latent, latent, side="left")
    keep = rank < max_items
    latent, item, c, n, smooth, rank = (a[keep] for a in (latent, item, c, n, smooth, rank))
    start = np.searchsorted(latent, latent, side="left")
    within = lambda v: np.cumsum(v) - (np.cumsum(v)[start] - v[start])  # noqa: E731
    tp, pred, expected = within(c), within(n), within(n * smooth)
    P = part.fired[latent]
    return {"latent": latent, "rank": rank, "item": item, "rate": smooth,
            "f1": 2 * tp / (P + pred), "smoothed_f1": 2 * expected / (P + pred)}


def fit_rules(counts: RuleCounts, max_items: int = 10, min_count: int = 2,
              tolerance: float = 0.01, prior_rows: float = 4.0,
              kinds: Sequence[str] = RULE_KINDS) -> Rules:
    """The rule of every latent from training counts (see the module docstring): the best
    smoothed-training-F1 prefix of each kind's ranking, at most ``max_items`` items that each
    occur ``min_count`` times in the training rows; within ``tolerance`` of the best, fewest
    items then simplest kind. ``prior_rows=0`` ranks and chooses by the plain training F1."""
    if max_items < 1 or min_count < 1 or not 0 <= tolerance < 1 or prior_rows < 0:
        raise RuleError(f"max_items={max_items} and min_count={min_count} must be >= 1, "
                        f"tolerance={tolerance} in [0, 1) and prior_rows={prior_rows} >= 0.")
    kinds = [k for k in RULE_KINDS if k in kinds]
    if not kinds:
        raise RuleError(f"kinds must name at least one of {RULE_KINDS}.")
    F = counts.n_latents
    cand = [_prefixes(counts, k, max_items, min_count, prior_rows) for k in kinds]
    kind_idx = np.concatenate([np.full(len(c["latent"]), i) for i, c in enumerate(cand)])
    latent, rank, f1 = (np.concatenate([c[a] for c in cand])
                        for a in ("latent", "rank", "smoothed_f1"))
    best = np.full(F, -np.inf)
    np.maximum.at(best, latent, f1)
    code = np.full(F, np.iinfo(np.int64).max)  # fewest items, then simplest kind
    eligible = f1 >= best[latent] - tolerance
    np.minimum.at(code, latent[eligible], rank[eligible] * len(kinds) + kind_idx[eligible])
    has = code < np.iinfo(np.int64).max
    chosen_kind, chosen_len = code % len(kinds), code // len(kinds) + 1
    items = np.full((F, max_items), -1, dtype=np.int64)
    rates = np.zeros((F, max_items))
    train_f1 = np.full(F, np.nan)
    for i, c in enumerate(cand):
        mine = has[c["latent"]] & (chosen_kind[c["latent"]] == i)
        mine &= c["rank"] < chosen_len[c["latent"]]
        lat, r = c["latent"][mine], c["rank"][mine]
        items[lat, r], rates[lat, r] = c["item"][mine], c["rate"][mine]
        last = r == chosen_len[lat] - 1
        train_f1[lat[last]] = c["f1"][mine][last]
    kind = np.where(has, np.array(kinds, dtype=object)[np.where(has, chosen_kind, 0)], "")
    width = max(int((items >= 0).sum(1).max(initial=0)), 1)
    return Rules(counts.width, kind.astype(str), items[:, :width], rates[:, :width], train_f1)


# -- scoring --------------------------------------------------------------------------------
def score_rules(counts: RuleCounts, rules: Rules, rule_of: np.ndarray | None = None
                ) -> pd.DataFrame:
    """Held-out precision, recall, F1 and AUROC (module docstring) of the rule of latent
    ``rule_of[f]`` (default ``f``) against the firing of each latent ``f``; NaN where there
    is no rule or latent ``f`` never fires in the held-out rows. Precision is 0 where the rule
    matches no held-out row. ``f1_all_rows`` is the F1 of a rule matching every held-out row,
    2 p / (1 + p) at firing density p: the F1 a dense latent gets for nothing."""
    F, W, part = counts.n_latents, counts.width, counts.heldout
    rule_of = np.arange(F) if rule_of is None else np.asarray(rule_of, dtype=np.int64)
    has = rule_of >= 0
    src = np.where(has, rule_of, 0)
    kinds = np.where(has, rules.kind[src], "")
    items, rates = rules.items[src], np.where(has[:, None], rules.rates[src], 0.0)  # (F, m)
    pos, n_item = np.zeros(items.shape, np.int64), np.zeros(items.shape, np.int64)
    for kind in RULE_KINDS:
        sel = np.flatnonzero(kinds == kind)
        if sel.size == 0:
            continue
        it = items[sel]
        valid = it >= 0
        n_item[sel] = np.where(valid, _lookup(*part.items(kind, W), it), 0)
        query = sel[:, None] * item_space(kind, W) + it
        pos[sel] = np.where(valid, _lookup(*part.firings(kind, W), query), 0)
    tp, pred = pos.sum(1), n_item.sum(1)
    P = part.fired.astype(np.float64)
    N = part.rows - P
    neg = n_item - pos
    pos0, neg0 = P - tp, N - (pred - tp)  # rows the rule does not match (score 0)
    ri, rj = rates[:, :, None], rates[:, None, :]
    wins = (pos[:, :, None] * neg[:, None, :] * ((ri > rj) + 0.5 * (ri == rj))).sum((1, 2))
    wins += (pos * neg0[:, None]).sum(1) + 0.5 * pos0 * neg0
    with np.errstate(divide="ignore", invalid="ignore"):
        scored = (kinds != "") & (P > 0)
        out = pd.DataFrame({
            "latent": np.arange(F), "rule_latent": np.where(has, rule_of, -1),
            "precision": np.where(pred > 0, tp / np.maximum(pred, 1), 0.0),
            "recall": tp / P, "f1": 2 * tp / (P + pred),
            "auroc": np.where(N > 0, wins / (P * N), np.nan),
            "n_fired_heldout": part.fired, "n_matched_heldout": pred, "n_true_positive": tp,
            "f1_all_rows": 2 * P / (P + part.rows)})
    out.loc[~scored, ["precision", "recall", "f1", "auroc"]] = np.nan
    return out


def control_latents(rules: Rules, seed: int = 0) -> np.ndarray:
    """``(F,)`` for each latent with a rule, another such latent (a seeded random cycle over
    them, so no latent draws itself); -1 for the others or when fewer than two have rules."""
    live = np.flatnonzero(rules.kind != "")
    out = np.full(len(rules.kind), -1, dtype=np.int64)
    if len(live) >= 2:
        cycle = np.random.default_rng(seed).permutation(live)
        out[cycle] = np.roll(cycle, -1)
    return out


def apply_rule(rule: dict, tokens, prev_tokens) -> np.ndarray:
    """The graded score of ``rule`` (:meth:`Rules.rule`) on rows with these tokens and previous
    tokens (-1: none): the matching item's training firing rate, 0 where it does not match.
    The rule predicts firing where the score is > 0."""
    tokens, prev = np.asarray(tokens, np.int64), np.asarray(prev_tokens, np.int64)
    score = np.zeros(len(tokens))
    for item, rate in zip(rule["items"], rule["rates"]):
        if rule["kind"] == "tokens":
            hit = tokens == item
        elif rule["kind"] == "prev_tokens":
            hit = prev == item
        else:
            hit = (prev == item[0]) & (tokens == item[1])
        score[hit] = rate
    return score


def describe_rule(rule: dict, tokenizer=None) -> str:
    """A rule as text: ``tokens ' tax', ' taxes'``, ``after ' the'``, ``' the' then ' film'``;
    token ids as ``#id`` without a tokenizer, ``<start>`` for "no previous token"."""
    flat = [t for i in rule["items"] for t in (i if isinstance(i, list) else [i])]
    known = sorted({t for t in flat if t >= 0})
    names = dict(zip(known, token_strings(tokenizer, known))) if tokenizer and known else {}
    name = lambda t: "<start>" if t < 0 else repr(names[t]) if t in names else f"#{t}"  # noqa: E731
    if rule["kind"] == "tokens":
        return ("tokens " if len(flat) > 1 else "token ") + ", ".join(map(name, flat))
    if rule["kind"] == "prev_tokens":
        return "after " + ", ".join(map(name, flat))
    if rule["kind"] == "bigrams":
        return "; ".join(f"{name(p)} then {name(t)}" for p, t in rule["items"])
    return ""


# -- the explanation table ------------------------------------------------------------------
def explanation_table(counts: RuleCounts, rules: Rules, seed: int = 0,
                      tokenizer=None) -> pd.DataFrame:
    """The explanation table (:mod:`sae_nb.explanations.tables`): per latent a ``rule`` row
    (score = held-out F1) and a ``rule:control`` row (the rule of latent ``rule_latent``,
    :func:`control_latents`, scored against this latent's firing). Extra columns: precision,
    recall, auroc, n_fired_heldout, rule_kind, rule (JSON, :meth:`Rules.rule`), train_f1..."""
    F = counts.n_latents
    rule_data = [rules.rule(f) for f in range(F)]
    texts = [describe_rule(r, tokenizer) for r in rule_data]
    own = score_rules(counts, rules)
    control_of = control_latents(rules, seed)
    ctrl = score_rules(counts, rules, control_of)
    fired_train = counts.train.fired
    error = np.where(fired_train == 0, "never fires in the training rows",
                     np.where(rules.kind == "", "no rule: each token it fires on occurs too "
                              "rarely in the training rows (min_count)",
                              np.where(own["n_fired_heldout"] == 0,
                                       "never fires in the held-out rows: nothing to score", "")))
    tables = []
    for method, scores, src in ((METHOD, own, np.arange(F)),
                                (f"{METHOD}:control", ctrl, control_of)):
        ok = src >= 0
        err = error if method == METHOD else np.where(
            ~ok, "no control: needs a rule of its own and another latent's", error)
        tables.append(pd.DataFrame({
            "latent": np.arange(F), "method": method,
            "explanation": [texts[s] if s >= 0 else "" for s in src],
            "score": scores["f1"].to_numpy(), "score_name": "f1", "error": err,
            "precision": scores["precision"].to_numpy(), "recall": scores["recall"].to_numpy(),
            "auroc": scores["auroc"].to_numpy(), "n_fired_heldout": counts.heldout.fired,
            "n_matched_heldout": scores["n_matched_heldout"].to_numpy(),
            "f1_all_rows": scores["f1_all_rows"].to_numpy(),
            "rule_kind": [str(rules.kind[s]) if s >= 0 else "" for s in src],
            "rule_latent": src, "rule": [json.dumps(rule_data[s]) if s >= 0 else "" for s in src],
            "train_f1": np.where(ok, rules.train_f1[np.maximum(src, 0)], np.nan),
            "n_fired_train": fired_train}))
    return pd.concat(tables, ignore_index=True)


# -- the one pass over a store --------------------------------------------------------------
@torch.no_grad()
def _nonzeros(dictionary: Dictionary, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(rows, latents) of the positive codes of ``x``; TopK dictionaries encoded sparsely."""
    if isinstance(dictionary, TopKSAE):
        code = dictionary.sparse_encode(x)  # (B, k) values and indices
        with one_thread():
            r, j = torch.nonzero(code.values > 0, as_tuple=True)
            return r.cpu().numpy(), code.indices[r, j].cpu().numpy()
    codes = dictionary.encode(x)  # (B, F)
    with one_thread():
        r, latent = torch.nonzero(codes > 0, as_tuple=True)
    return r.cpu().numpy(), latent.cpu().numpy()


def store_tokens(store: ActivationStore) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens, prev_tokens)`` of every row of a token-mode store (``-1``: no previous)."""
    m = store.manifest
    if m.get("mode") != "tokens":
        raise RuleError(f"The store at {str(store.path)!r} is in {m.get('mode')!r} mode: its rows "
                        f"are not tokens, so token rules cannot describe them. Use a token-mode "
                        f"store (notebook 01's default).")
    index = store.index()
    bos = m.get("bos_token_id") if m.get("prepend_bos") else None
    return index["token"].astype(np.int64), previous_tokens(index, bos)


def count_store(store: ActivationStore, dictionary: Dictionary, boundary: int,
                batch_size: int = 4096, progress: bool = True) -> RuleCounts:
    """:class:`RuleCounts` of ``dictionary`` over every row of ``store`` in one streamed pass
    (rows ``[0, boundary)`` training, the rest held out)."""
    tokens, prev = store_tokens(store)
    _check_tokens(tokens, prev)
    F, W = dictionary.d_sae, _width(tokens, prev)
    if F * W * W >= 2**62:
        raise RuleError(f"{F} latents x {W}^2 token pairs overflow 64-bit keys.")
    counter = _Counter(tokens, np.where(prev < 0, W - 1, prev), boundary, F, W)
    device, dtype = dictionary.W_enc.device, dictionary.W_enc.dtype
    total = -(-len(store) // batch_size)
    for first, array in tqdm(store.chunks(batch_size), total=total, disable=not progress,
                             desc="rule counts"):
        rows, latents = _nonzeros(dictionary, torch.from_numpy(array).to(device, dtype))
        with one_thread():
            counter.add(rows + first, latents)
    with one_thread():
        return counter.finish()


def _boundary(store: ActivationStore, split: HeldoutSplit | None, heldout_fraction: float) -> int:
    if split is not None:
        if Path(split.store.path).resolve() != Path(store.path).resolve() or \
                len(split.store) != len(store):
            raise RuleError(f"The split is of the store at {str(split.store.path)!r}, not of "
                            f"{str(store.path)!r}; pass heldout_split(store, ...) of this store.")
        boundary = int(split.boundary)
    else:
        if not 0 < heldout_fraction < 1:
            raise RuleError(f"heldout_fraction={heldout_fraction} must lie strictly between 0 "
                            f"and 1, e.g. 0.2.")
        try:
            held = max(1, round(len(store) * heldout_fraction))
            boundary = heldout_split(store, held, 0).boundary
        except StoreError as err:
            raise RuleError(f"Cannot hold out {heldout_fraction:.0%} of the {len(store)} rows in "
                            f"whole contexts ({err}); change heldout_fraction or use a larger "
                            f"store.") from None
    if not 0 < boundary < len(store):
        raise RuleError(f"The split leaves {boundary} training rows and {len(store) - boundary} "
                        f"held-out rows of {len(store)}; rules need both. Hold out fewer or more "
                        f"tokens (heldout_split's heldout_tokens).")
    return boundary


def _identity(store: ActivationStore, dictionary: Dictionary, boundary: int, settings: dict,
              tokenizer) -> dict:
    """What a cached table must agree on: the dictionary's encoder, the store's rows (identity
    fields and shard list, not its path), the split, the settings and the tokenizer."""
    m = store.manifest
    shards = json.dumps([(s["name"], s["rows"]) for s in m["shards"]])
    return {"version": RULES_VERSION, "dictionary": dictionary_hash(dictionary),
            "store_manifest": {k: m.get(k) for k in IDENTITY}, "rows": len(store),
            "shards": hashlib.sha256(shards.encode()).hexdigest()[:16], "boundary": boundary,
            "tokenizer": None if tokenizer is None else
            (getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__), **settings}


def explanations_folder(run_dir: str | Path, dictionary_name: str) -> Path:
    """Where a run caches one dictionary's explanation tables:
    ``run_dir/explanations/<name>/``."""
    return Path(run_dir) / "explanations" / folder_name(str(dictionary_name))


def read_rule_table(folder: str | Path) -> pd.DataFrame:
    """The rule table saved in ``folder`` (``rule.csv``), text columns as str ("" not NaN)."""
    table = pd.read_csv(Path(folder) / TABLE_FILE)
    for column in TEXT_COLUMNS:
        table[column] = table[column].fillna("").astype(str)
    return table


def _cached(folder: Path, identity: dict) -> pd.DataFrame | None:
    key = folder / IDENTITY_FILE
    if not (key.exists() and (folder / TABLE_FILE).exists()):
        return None
    try:
        if json.loads(key.read_text()) != json.loads(json.dumps(identity)):
            log.info("Cached rules in %s are for another dictionary, store or settings.", folder)
            return None
        return read_rule_table(folder)
    except (ValueError, KeyError, OSError) as err:
        log.warning("Cached rules in %s are unreadable (%s); recomputing.", folder, err)
        return None


def rule_explanations(store: ActivationStore, dictionary: Dictionary,
                      split: HeldoutSplit | None = None, cache: str | Path | None = None,
                      seed: int = 0, progress: bool = True, *, tokenizer=None,
                      heldout_fraction: float = 0.2, max_items: int = 10, min_count: int = 2,
                      tolerance: float = 0.01, prior_rows: float = 4.0,
                      batch_size: int = 4096) -> pd.DataFrame:
    """Executable explanations of every latent of ``dictionary`` over ``store``: the explanation
    table (:func:`explanation_table`), rules fitted on the training rows and scored on the
    held-out rows of ``split`` (default: the last ``heldout_fraction`` of the rows, whole
    contexts). ``seed`` draws the control; ``tokenizer`` names the tokens (else ``#id``).

    ``cache`` is a folder (:func:`explanations_folder`): a table saved there for the same
    dictionary weights, store, split and settings is returned as it is; otherwise it is computed
    and saved there (``rule.csv`` and its key ``rule.identity.json``)."""
    if store.d != dictionary.d_in:
        site = (getattr(dictionary, "metadata", None) or {}).get("site")
        raise RuleError(f"The store {str(store.path)!r} holds {store.d}-wide activations but the "
                        f"dictionary reads d_in={dictionary.d_in}: pick the store of the "
                        f"dictionary's site ({site!r}).")
    boundary = _boundary(store, split, heldout_fraction)
    settings = {"max_items": int(max_items), "min_count": int(min_count),
                "tolerance": float(tolerance), "prior_rows": float(prior_rows),
                "kinds": list(RULE_KINDS), "seed": int(seed)}
    identity = _identity(store, dictionary, boundary, settings, tokenizer)
    folder = None if cache is None else Path(cache)
    if folder is not None and (table := _cached(folder, identity)) is not None:
        return table
    counts = count_store(store, dictionary, boundary, batch_size, progress)
    with one_thread():
        rules = fit_rules(counts, max_items, min_count, tolerance, prior_rows)
        table = explanation_table(counts, rules, seed, tokenizer)
    if folder is not None:
        (folder / IDENTITY_FILE).unlink(missing_ok=True)  # no stale key beside a new table
        write_table(table, folder / TABLE_FILE)
        atomic_write_json(folder / IDENTITY_FILE, identity)
    return table
