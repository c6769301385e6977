"""What a graph's latents are: the tokens each promotes through the unembedding, and the
contexts of a corpus where each fires most, for the graph widget's hover text and cards.

A transcoder latent at layer ``L`` writes its decoder row into the residual stream; read
directly by the unembedding (through the final norm's weight, its scale left out) it promotes
some tokens: ``(W_dec[i] * w_norm) @ W_U.T``, the logit lens of the latent (the direct path
only; later layers may change it). Its top contexts are found by running the model over
``n_tokens`` tokens of the corpus and encoding each layer's MLP input with its transcoder.
"""

from __future__ import annotations

import torch

from sae_nb.activations.corpora import load_corpus, pack_contexts, token_strings
from sae_nb.activations.extract import resolve_sites, run_sites
from sae_nb.activations.models import Model, hf_model
from sae_nb.circuits.graph import Graph
from sae_nb.circuits.transcoder_set import TranscoderSet, in_site


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


@torch.no_grad()
def top_contexts(model: Model, transcoders: TranscoderSet, features, n_tokens: int = 8192,
                 ctx_len: int = 64, corpus: str = "sotu", n_top: int = 4, window: int = 12,
                 seed: int = 1, contexts_per_pass: int = 8
                 ) -> dict[tuple[int, int], list[dict]]:
    """``{(layer, latent): [context, ...]}``: for each latent, the ``n_top`` tokens of
    ``n_tokens`` corpus tokens (packed with document order ``seed``) where it fires most, each
    as ``{"row", "value", "center", "tokens", "acts"}``, a window of ``window`` tokens before
    and after the peak: the dicts the dashboards' context lists take. Latents silent there get
    ``[]``."""
    wanted: dict[int, list[int]] = {}
    for layer, latent in sorted({(int(f[0]), int(f[-1])) for f in features}):
        wanted.setdefault(layer, []).append(latent)
    packed = pack_contexts(load_corpus(corpus), model.tokenizer, ctx_len,
                           max(1, -(-n_tokens // ctx_len)), seed, True)
    layers = sorted(wanted)
    sites = resolve_sites(model, [in_site(layer) for layer in layers])
    best = {(L, i): [] for L in layers for i in wanted[L]}  # (act, context, position)
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
    return out
