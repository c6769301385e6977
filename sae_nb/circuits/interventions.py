"""Interventions from an attribution graph: edit transcoder latents in the real model, set the
measured change of the logits beside the change the graph predicts, and generate with a
supernode steered.

**The edited model** (:func:`intervene`). The real model runs on the prompt (every layer, its
own attention and norms) with each MLP's output replaced by its transcoder's output plus the
error term measured on the clean prompt, ``y_clean - y_hat(x_clean)``, a constant per (layer,
position). The transcoders re-encode the MLP inputs of the edited run, so an edit's effect
reaches later layers through attention, the residual stream and the later latents, which their
transcoders recompute (TopK may change which latents are active), except the edited latents,
which keep their edited values. The output is computed as ``y_clean + (y_hat(f', x) -
y_hat(x_clean))``: with no edit it is the model's own MLP output, so the logits are the
model's own. This is circuit-tracer's ``feature_intervention`` with the error terms held fixed.
With a cross-layer set, layer T's output is decoded from the codes of every layer ``L <= T``
(``cross[L][:, T - L]``), so an edit at layer L changes every later MLP output directly as well
as through the residual stream.

``frozen_attention=True`` also freezes every attention pattern and every RMSNorm scale
(``input_layernorm``, ``post_attention_layernorm``, the final ``norm``) at their clean values,
as the replacement model does (:mod:`sae_nb.circuits.replacement`): the model is then linear in
the latents' activations as long as no recomputed latent switches on or off
(:attr:`InterventionResult.switched` counts those), and the measured change equals the graph's
prediction.

**Edits.** A latent at (layer, position) is set to a new value: ``ablate`` (0), ``clamp`` (a
value) or ``scale`` (a factor times its clean activation). Edits are given as

- ``(layer, position, latent, value)`` tuples (a clamp), or :class:`NodeEdit`;
- ``{"nodes": [...], "mode": "ablate" | "clamp" | "scale", "value" or "factor": x}``, feature
  nodes of ``graph`` (indices ``0..graph.n_features - 1``) edited together: a supernode;
- a list mixing these.

**The prediction** (:func:`predicted_change`). In the graph's linear model each active latent's
activation moves with its pre-activation (slope 1), errors and embeddings stay fixed. With ``A``
the adjacency and ``a`` the activations, ``J[t, s] = A[t, s] / a[s]`` is the change of target
``t``'s input per unit of source ``s``. Setting the latents of a set ``S`` to new values
(``d[S] = new - a[S]``, held there) moves the other latents by ``d[R] = J[R, S] d[S] + J[R, R]
d[R]`` (a sum over paths, finite since edges go up in layer) and each logit node by ``J[logit,
features] d``: for the ablation of ``S``, minus the sum over all paths from ``S`` to the logit
of the products of their edges, each divided by the activation of the node it leaves. A graph
built with ``max_feature_nodes`` lacks the paths through the features it left out.

**Generation** (:func:`steer_generate`), greedy by default, over the KV cache. ``where``:

- ``"prompt"``: the edits at their own prompt positions (error terms from the clean prompt);
  the new tokens run the real model and see the edited prompt through attention;
- ``"generated"``: at every generated position, each edited (layer, latent) pair that is active
  there (its transcoder's code is nonzero) gets the edit (ablate: 0, clamp: the value, scale:
  the factor times its activation there); the MLP there keeps its own output plus the change of
  the latent's decoder contribution (the error term measured live, as
  :class:`sae_nb.interventions.splice.Splice` does). The first new token is predicted from the
  prompt, so it changes only from the second on;
- ``"both"`` (the default): the two together.

Attention is never frozen in generation.

Past 500 lines: the edited forward, the graph's prediction and steered generation share the
clean run and the resolution of edits; split, each would rebuild them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from sae_nb.activations.corpora import token_strings
from sae_nb.activations.models import Model, hf_model
from sae_nb.circuits.graph import Graph
from sae_nb.circuits.replacement import ReplacementModel, build_replacement
from sae_nb.circuits.targets import make_targets
from sae_nb.circuits.transcoder_set import CircuitError, TranscoderSet
from sae_nb.interventions.attribution import as_ids
from sae_nb.interventions.effects import check_temperature, sample_with_logits
from sae_nb.interventions.splice import decoder_output
from sae_nb.util.checks import whole_number

MODES = ("ablate", "clamp", "scale")
WHERE = ("prompt", "generated", "both")


@dataclass(frozen=True)
class NodeEdit:
    """Set latent ``latent`` of layer ``layer``'s transcoder at ``position`` to 0 (``ablate``),
    ``value`` (``clamp``) or ``value`` times its clean activation (``scale``)."""

    layer: int
    position: int
    latent: int
    mode: str = "clamp"
    value: float = 0.0


# -- edits ------------------------------------------------------------------------------------
def node_edits(graph: Graph, nodes, mode: str = "ablate", factor: float | None = None
               ) -> list[NodeEdit]:
    """The feature nodes ``nodes`` (an index or a list: a supernode) of ``graph`` as edits;
    ``factor`` is the scale factor (``scale``) or the new value (``clamp``)."""
    mode, value = _mode_value(mode, factor)
    out = []
    for node in _node_list(nodes):
        if not 0 <= node < graph.n_nodes:
            raise CircuitError(f"Node {node} is not in the graph (nodes 0..{graph.n_nodes - 1}); "
                               f"give feature nodes 0..{graph.n_features - 1}.")
        if node >= graph.n_features:
            kind, name = graph.node(node)["kind"], graph.node(node)["name"]
            raise CircuitError(f"Node {node} ({name}) is {'an' if kind[0] in 'ae' else 'a'} "
                               f"{kind} node, not a feature: only feature nodes "
                               f"0..{graph.n_features - 1} can be ablated, clamped or scaled.")
        layer, pos, latent = (int(v) for v in graph.features[node])
        out.append(NodeEdit(layer, pos, latent, mode, value))
    return out


def _node_list(nodes) -> list[int]:
    items = nodes.tolist() if isinstance(nodes, (torch.Tensor, np.ndarray)) else nodes
    items = [items] if _is_int(items) else list(items) if isinstance(items, Iterable) else [items]
    bad = [n for n in items if not _is_int(n)]
    if bad or not items:
        raise CircuitError(f"Nodes {nodes!r}: {bad[0]!r} is not a node index; give a feature "
                           f"node's index or a list of them, e.g. [3, 17]." if bad else
                           "No nodes given; give a feature node's index or a list of them.")
    return [int(n) for n in items]


def _is_int(n) -> bool:
    return isinstance(n, (int, np.integer)) and not isinstance(n, bool)


def _mode_value(mode: str, factor: float | None) -> tuple[str, float]:
    if mode not in MODES:
        raise CircuitError(f"Mode {mode!r} is not one of {MODES}; ablate sets a latent to 0, "
                           f"clamp to a value, scale multiplies it by a factor.")
    if mode == "ablate":
        return mode, 0.0
    number = isinstance(factor, (int, float, np.number)) and not isinstance(factor, bool)
    if not number or not math.isfinite(factor):
        what = "the value" if mode == "clamp" else "the factor"
        raise CircuitError(f"Mode {mode!r} needs a finite number ({what}), got {factor!r}; "
                           f"e.g. factor=2.0.")
    return mode, float(factor)


def resolve_edits(edits, graph: Graph | None, n_layers: int, n_pos: int,
                  d_sae: Sequence[int]) -> list[NodeEdit]:
    """``edits`` (see the module docstring) as :class:`NodeEdit` s, checked against the model's
    layers, the prompt's positions (negative ones count from the end) and each transcoder's
    latents."""
    if edits is None:
        return []
    items = [edits] if isinstance(edits, (dict, NodeEdit)) else list(edits)
    out: list[NodeEdit] = []
    for item in items:
        if isinstance(item, dict):
            if graph is None:
                raise CircuitError("Edits given as graph nodes need the graph: pass graph=... "
                                   "(or give (layer, position, latent, value) tuples).")
            unknown = set(item) - {"nodes", "mode", "value", "factor"}
            if unknown or "nodes" not in item:
                raise CircuitError(f"Edit {item!r}: a supernode is {{'nodes': [...], 'mode': "
                                   f"'ablate' | 'clamp' | 'scale', 'value' or 'factor': x}}.")
            out += [_checked(e, n_layers, n_pos, d_sae) for e in node_edits(
                graph, item["nodes"], item.get("mode", "ablate"),
                item.get("factor", item.get("value")))]
            continue
        if isinstance(item, tuple) and len(item) == 4:
            item = NodeEdit(*item[:3], "clamp", item[3])
        if not isinstance(item, NodeEdit):
            raise CircuitError(f"Edit {item!r} is not a (layer, position, latent, value) tuple, "
                               f"a NodeEdit or a supernode dict.")
        out.append(_checked(item, n_layers, n_pos, d_sae))
    seen: dict[tuple[int, int, int], NodeEdit] = {}
    for e in out:
        key = (e.layer, e.position, e.latent)
        if key in seen and seen[key] != e:
            raise CircuitError(f"Latent {e.latent} at layer {e.layer}, position {e.position} is "
                               f"edited twice ({seen[key]} and {e}); edit each latent once.")
        seen[key] = e
    return list(seen.values())


def _checked(e: NodeEdit, n_layers: int, n_pos: int, d_sae: Sequence[int]) -> NodeEdit:
    if not all(_is_int(v) for v in (e.layer, e.position, e.latent)):
        raise CircuitError(f"Edit {e}: layer, position and latent must be whole numbers.")
    if not 0 <= e.layer < n_layers:
        raise CircuitError(f"Layer {e.layer} of edit {e} is not a layer of the model "
                           f"(0..{n_layers - 1}).")
    if not -n_pos <= e.position < n_pos:
        raise CircuitError(f"Position {e.position} of edit {e} is past the prompt's {n_pos} "
                           f"tokens; give a position in 0..{n_pos - 1} (or -1 for the last).")
    if not 0 <= e.latent < d_sae[e.layer]:
        raise CircuitError(f"Latent {e.latent} of edit {e} is out of range: transcoder "
                           f"{e.layer} has latents 0..{d_sae[e.layer] - 1}.")
    mode, value = _mode_value(e.mode, e.value)
    return NodeEdit(int(e.layer), int(e.position) % n_pos, int(e.latent), mode, value)


# -- the clean run and the hooks --------------------------------------------------------------
@dataclass
class CleanRun:
    """What every edit of one prompt reuses: the replacement model's records (MLP inputs and
    outputs, frozen patterns and norm scales, the model's logits) and each transcoder's clean
    reconstruction and active latents."""

    rm: ReplacementModel
    transcoders: TranscoderSet
    y_hat: torch.Tensor  # (L, T, D) each transcoder's output on the clean MLP input
    codes: list[torch.Tensor]  # per layer (T, F) float32: the clean codes

    @property
    def ids(self) -> torch.Tensor:
        return self.rm.tokens

    @property
    def logits(self) -> torch.Tensor:
        return self.rm.logits

    @torch.no_grad()
    def clean_code(self, layer: int, position: int, latent: int) -> float:
        tc = self.transcoders[layer]
        x = self.rm.mlp_in[layer, position:position + 1].to(tc.W_enc.device, tc.W_enc.dtype)
        return float(tc.encode(x)[0, latent])

    def new_value(self, e: NodeEdit) -> float:
        if e.mode == "scale":
            return e.value * self.clean_code(e.layer, e.position, e.latent)
        return 0.0 if e.mode == "ablate" else e.value


@torch.no_grad()
def clean_run(model: Model, transcoders: TranscoderSet, prompt: str | torch.Tensor) -> CleanRun:
    """Run the clean prompt (text with BOS prepended, or token ids) once, for many edits."""
    ids = as_ids(model, prompt)[0]
    rm = build_replacement(model, transcoders, ids)
    y_hat, codes = [], []
    for layer, tc in enumerate(transcoders.transcoders):
        f, y = tc.encode_and_reconstruct(rm.mlp_in[layer].to(tc.W_enc.device, tc.W_enc.dtype))
        y_hat.append(y.float().cpu())
        codes.append(f.float().cpu())
    return CleanRun(rm, transcoders, torch.stack(y_hat), codes)


class _Hooks:
    """The edits as hooks on the model's modules (a context manager): prompt edits at their
    positions, ``steer`` edits (``(layer, latent) -> NodeEdit``) at generated positions where
    the latent is active, frozen patterns and norm scales when ``frozen``."""

    def __init__(self, model: Model, clean: CleanRun, edits: list[NodeEdit],
                 frozen: bool = False, steer: dict | None = None):
        self.hf, self.clean, self.frozen = hf_model(model), clean, frozen
        self.steer = steer or {}
        self.by_layer: dict[int, list[tuple[int, int, float]]] = {}
        for e in edits:
            self.by_layer.setdefault(e.layer, []).append((e.position, e.latent,
                                                          clean.new_value(e)))
        self.offset, self.switched, self._handles = 0, 0, []
        # A cross-layer set: what the changed codes of the layers below add to each layer's
        # output in the current forward pass, (L, T, D), filled layer by layer.
        self.pending: torch.Tensor | None = None

    def __enter__(self) -> _Hooks:
        hf, h = self.hf, self._handles
        h.append(hf.register_forward_pre_hook(self._see_cache, with_kwargs=True))
        for layer, block in enumerate(hf.model.layers):
            h.append(block.mlp.register_forward_hook(self._mlp(layer)))
            if self.frozen:
                rm = self.clean.rm
                h.append(block.input_layernorm.register_forward_hook(
                    self._norm(rm.scale_attn[layer])))
                h.append(block.post_attention_layernorm.register_forward_hook(
                    self._norm(rm.scale_mlp[layer])))
                h.append(block.self_attn.register_forward_hook(self._attention(layer),
                                                               with_kwargs=True))
        if self.frozen:
            h.append(hf.model.norm.register_forward_hook(self._norm(self.clean.rm.scale_final)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _see_cache(self, module, args, kwargs) -> None:
        cache = kwargs.get("past_key_values")
        self.offset = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0
        self.pending = None

    def _prompt_only(self, T: int) -> None:
        if self.offset != 0 or T != self.clean.rm.n_pos:
            raise CircuitError("Frozen attention holds for the prompt's own positions only; "
                               "run the whole prompt once, without a cache.")

    def _norm(self, scale: torch.Tensor):
        def hook(module, args, output):  # x * s * w with the clean scale s (T, 1)
            x = args[0]
            self._prompt_only(x.shape[1])
            s = scale.to(x.device)
            return module.weight * (x.float() * s).to(x.dtype)
        return hook

    def _attention(self, layer: int):
        P = self.clean.rm.patterns[layer]  # (H, T, T)

        def hook(module, args, kwargs, output):  # o_proj(P @ v_proj(a)) with the clean P
            a = kwargs.get("hidden_states", args[0] if args else None)  # (1, T, D)
            T = a.shape[1]
            self._prompt_only(T)
            H = P.shape[0]
            v = module.v_proj(a).view(T, -1, module.head_dim)  # (T, Hkv, dh)
            v = v.repeat_interleave(H // v.shape[1], dim=1)  # (T, H, dh)
            z = torch.einsum("hqk,khd->qhd", P.to(v.device, v.dtype), v).reshape(1, T, -1)
            return (module.o_proj(z),) + tuple(output[1:])
        return hook

    def _mlp(self, layer: int):
        tc = self.clean.transcoders[layer]
        n_prompt = self.clean.rm.n_pos
        cross_layer = self.clean.rm.cross is not None  # its own reconstruction is not the output

        def hook(module, args, output):
            x = args[0]
            B, T, D = x.shape
            if B != 1:
                raise CircuitError(f"Graph interventions run one prompt at a time, not a batch "
                                   f"of {B}.")
            pos = self.offset + torch.arange(T)
            src = x[0].to(tc.W_enc.device, tc.W_enc.dtype)
            f, y_hat = (tc.encode(src), None) if cross_layer else tc.encode_and_reconstruct(src)
            new = f.clone()
            edited = torch.zeros_like(f, dtype=torch.bool)
            for p, latent, value in self.by_layer.get(layer, ()):
                if self.offset <= p < self.offset + T:
                    new[p - self.offset, latent] = value
                    edited[p - self.offset, latent] = True
            gen = pos >= n_prompt
            for (lay, latent), e in self.steer.items():
                if lay != layer or not gen.any():
                    continue
                on = gen.to(f.device) & (f[:, latent] != 0)
                value = {"ablate": 0.0, "clamp": e.value}.get(e.mode)
                new[on, latent] = f[on, latent] * e.value if value is None else value
            out = output[0].float().clone()  # generated positions: the live error term
            here, pp = (~gen).nonzero().flatten(), pos[~gen]  # prompt positions: the clean one
            if len(here):
                clean, fp = self.clean, f[here.to(f.device)]
                self.switched += int(((fp != 0).cpu() != (clean.codes[layer][pp] != 0))
                                     [~edited[here.to(f.device)].cpu()].sum())
            if cross_layer:
                return self._cross_layer_output(layer, src, f, new, out, here, pp
                                                ).to(output.device, output.dtype)[None]
            delta = decoder_output(tc, src[None], (new - f)[None])[0]  # (T, D)
            if len(here):
                change = y_hat[here.to(f.device)].float().cpu() - clean.y_hat[layer, pp]
                out[here] = (clean.rm.mlp_out[layer, pp] + change).to(out.device)  # exact at 0
            out = out + delta.float().to(out.device)
            return out[None].to(output.dtype)
        return hook

    def _cross_layer_output(self, layer: int, src: torch.Tensor, f: torch.Tensor,
                            new: torch.Tensor, out: torch.Tensor, here: torch.Tensor,
                            pp: torch.Tensor) -> torch.Tensor:
        """Layer ``layer``'s MLP output under a cross-layer set: the clean output (prompt
        positions) or the live one (generated positions), plus what every layer ``L <= layer``
        adds through ``cross[L][:, layer - L]`` for its codes' change (edited and recomputed
        against clean at prompt positions, edited against live at generated ones), plus the
        skip term's change at prompt positions."""
        clean, cross = self.clean, self.clean.rm.cross
        out = out.cpu()
        ref = f.float().cpu().clone()
        if len(here):
            ref[here] = clean.codes[layer][pp]
        diff = new.float().cpu() - ref  # (T, F)
        if self.pending is None:
            self.pending = out.new_zeros(len(cross), *out.shape)
        moved = diff.any(0).nonzero().flatten()  # the latents whose code changed somewhere
        if len(moved):
            self.pending[layer:] += torch.einsum("tf,fld->ltd", diff[:, moved],
                                                 cross[layer][moved])
        if len(here):
            out[here] = clean.rm.mlp_out[layer, pp]
            W_skip = clean.rm.layers[layer].W_skip
            if W_skip is not None:
                out[here] += (src[here.to(src.device)].float().cpu()
                              - clean.rm.mlp_in[layer, pp]) @ W_skip.T
        return out + self.pending[layer]


# -- intervene --------------------------------------------------------------------------------
@dataclass
class InterventionResult:
    """The logits before and after the edits, at every prompt position."""

    edits: list[NodeEdit]
    clean_logits: torch.Tensor  # (T, V) the model's own
    logits: torch.Tensor  # (T, V) with the edits
    switched: int  # recomputed latents (not edited) that switched on or off
    table: pd.DataFrame  # the top tokens at the last position, before and after


def intervene(model: Model, transcoders: TranscoderSet, prompt: str | torch.Tensor, edits, *,
              graph: Graph | None = None, frozen_attention: bool = False, top: int = 10,
              clean: CleanRun | None = None) -> InterventionResult:
    """Run the real model on ``prompt`` with ``edits`` (module docstring): every MLP is its
    transcoder plus its clean error term. ``graph``: the graph whose node indices the edits
    name. ``clean``: a :func:`clean_run` of the same prompt, to reuse."""
    top = whole_number("top", top, 1, CircuitError)
    clean = _checked_clean(clean, model, transcoders, prompt, graph)
    ids = clean.ids
    resolved = resolve_edits(edits, graph, len(transcoders), clean.rm.n_pos,
                             [tc.d_sae for tc in transcoders.transcoders])
    hf = hf_model(model)
    with torch.no_grad(), _Hooks(model, clean, resolved, frozen_attention) as hooks:
        logits = hf(input_ids=ids[None].to(next(hf.parameters()).device)).logits[0]
    logits = logits.float().cpu()
    return InterventionResult(resolved, clean.logits, logits, hooks.switched,
                              top_tokens(model.tokenizer, clean.logits[-1], logits[-1], top))


def _checked_clean(clean: CleanRun | None, model: Model, transcoders: TranscoderSet,
                   prompt: str | torch.Tensor, graph: Graph | None = None) -> CleanRun:
    """``clean`` if it is of this prompt and set (a new clean run if None), and ``graph`` of
    the same prompt, else an error."""
    if clean is None:
        clean = clean_run(model, transcoders, prompt)
    elif clean.transcoders is not transcoders or not torch.equal(
            as_ids(model, prompt)[0].cpu(), clean.ids):
        raise CircuitError("The clean run is of another prompt or transcoder set; make it with "
                           "clean_run(model, transcoders, prompt).")
    if graph is not None and not torch.equal(graph.tokens.cpu(), clean.ids):
        raise CircuitError(f"The graph is of another prompt ({graph.prompt!r}); intervene on "
                           f"the graph's own prompt (graph.tokens).")
    return clean


def top_tokens(tokenizer, before: torch.Tensor, after: torch.Tensor, top: int = 10
               ) -> pd.DataFrame:
    """The ``top`` most probable tokens before and after (their union), by the larger of the
    two probabilities: probability and logit before and after, and their changes."""
    p0, p1 = torch.softmax(before.double(), -1), torch.softmax(after.double(), -1)
    ids = torch.cat([p0.topk(top).indices, p1.topk(top).indices]).unique()
    ids = ids[torch.maximum(p0[ids], p1[ids]).argsort(descending=True)].tolist()
    return pd.DataFrame({
        "token": token_strings(tokenizer, ids), "token_id": ids,
        "p_before": p0[ids].numpy(), "p_after": p1[ids].numpy(),
        "p_change": (p1[ids] - p0[ids]).numpy(),
        "logit_before": before[ids].double().numpy(), "logit_after": after[ids].double().numpy(),
        "logit_change": (after[ids] - before[ids]).double().numpy()})


# -- what the graph predicts ------------------------------------------------------------------
def predicted_change(graph: Graph, nodes, mode: str = "ablate", factor: float | None = None
                     ) -> torch.Tensor:
    """``(n_logits,)`` float64: the change of each logit node the graph predicts when the
    feature ``nodes`` (a supernode) are ablated, clamped to ``factor`` or scaled by ``factor``
    (module docstring: direct and indirect effects through the graph's linear model)."""
    edits = node_edits(graph, nodes, mode, factor)
    n_f = graph.n_features
    S = torch.tensor(_node_list(nodes))
    a = graph.activations.double()
    new = torch.tensor([0.0 if e.mode == "ablate" else e.value for e in edits],
                       dtype=torch.float64)
    if mode == "scale":
        new = new * a[S]
    J = graph.adjacency[:, :n_f].double() / torch.where(a != 0, a, 1.0)  # (N, n_f)
    free = torch.ones(n_f, dtype=torch.bool)
    free[S] = False
    d = torch.zeros(n_f, dtype=torch.float64)
    d[S] = new - a[S]
    step = d.clone()
    for _ in range(n_f + 1):  # paths go up in layer: the walk dies out
        step = torch.where(free, J[:n_f] @ step, 0.0)
        if not step.any():
            break
        d += step
    return J[graph.logit_start:] @ d


def logit_vectors(graph: Graph, logits: torch.Tensor, tokenizer, targets=None) -> torch.Tensor:
    """``(n_logits, V)``: each logit node's direction over the vocabulary (a token's is its
    demeaned logit, ``e_t - 1/V``); custom targets (a pair, a vector, a function) are remade from
    ``targets``, the spec the graph was built with, else NaN."""
    V = logits.shape[-1]
    out = torch.full((graph.n_logits, V), float("nan"), dtype=torch.float64)
    made = make_targets(logits[-1], tokenizer, targets) if targets is not None else None
    for k, token in enumerate(graph.logit_tokens):
        if made is not None and k < len(made):
            out[k] = made[k].vocab.double()
        elif token is not None:
            out[k] = -1.0 / V
            out[k, token] += 1.0
    return out


class GraphIntervener:
    """``intervene(nodes, mode, factor) -> DataFrame`` for one graph (the graph widget's
    callable): the clean run is made once. Each call gives one row per logit node: ``token``,
    ``before`` and ``after`` (its probability; NaN for a custom target), ``predicted change``
    (:func:`predicted_change`) and ``measured change`` (of the node's value, ``vocab . logits``
    at the last position: for a token its logit minus the mean logit)."""

    def __init__(self, model: Model, transcoders: TranscoderSet, graph: Graph, *,
                 frozen_attention: bool = False, targets=None, clean: CleanRun | None = None):
        self.model, self.transcoders, self.graph = model, transcoders, graph
        self.frozen_attention = frozen_attention
        # the graph's clean run, given when another intervener of this graph already made it
        self.clean = clean if clean is not None else clean_run(model, transcoders, graph.tokens)
        self.vocab = logit_vectors(graph, self.clean.logits, model.tokenizer, targets)
        self.last: InterventionResult | None = None

    def __call__(self, nodes, mode: str = "ablate", factor: float | None = None
                 ) -> pd.DataFrame:
        edit = {"nodes": _node_list(nodes), "mode": mode, "factor": factor}
        result = intervene(self.model, self.transcoders, self.graph.tokens, edit,
                           graph=self.graph, frozen_attention=self.frozen_attention,
                           clean=self.clean)
        self.last = result
        before, after = result.clean_logits[-1].double(), result.logits[-1].double()
        p0, p1 = torch.softmax(before, -1), torch.softmax(after, -1)
        toks = self.graph.logit_tokens
        nan = float("nan")
        return pd.DataFrame({
            "token": self.graph.logit_names,
            "before": [nan if t is None else float(p0[t]) for t in toks],
            "after": [nan if t is None else float(p1[t]) for t in toks],
            "predicted change": predicted_change(self.graph, nodes, mode, factor).numpy(),
            "measured change": (self.vocab @ (after - before)).numpy()})


# -- generation -------------------------------------------------------------------------------
@dataclass
class Steered:
    """Clean and steered continuations of one prompt."""

    prompt: str
    where: str
    clean_tokens: torch.Tensor  # (n,)
    steered_tokens: torch.Tensor  # (n,)
    clean: str
    steered: str
    first_logits: torch.Tensor  # (V,) the steered next-token logits after the prompt

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([{"prompt": self.prompt, "where": self.where, "clean": self.clean,
                              "steered": self.steered}])


def steer_generate(model: Model, transcoders: TranscoderSet, prompt: str | torch.Tensor, edits,
                   max_new_tokens: int = 20, *, graph: Graph | None = None,
                   where: str = "both", temperature: float = 0.0, seed: int = 0,
                   clean: CleanRun | None = None) -> Steered:
    """Continue ``prompt`` clean and with ``edits`` (a supernode) steered at ``where``
    (``"prompt"``, ``"generated"`` or ``"both"``; module docstring), greedy unless a
    ``temperature`` is given (sampled with ``seed``; both runs share their random numbers)."""
    if where not in WHERE:
        raise CircuitError(f"where={where!r}; give one of {WHERE}.")
    check_temperature(temperature)
    clean = _checked_clean(clean, model, transcoders, prompt, graph)
    ids = clean.ids[None]
    resolved = resolve_edits(edits, graph, len(transcoders), clean.rm.n_pos,
                             [tc.d_sae for tc in transcoders.transcoders])
    at_prompt = resolved if where in ("prompt", "both") else []
    steer = {(e.layer, e.latent): e for e in resolved} if where != "prompt" else {}
    base, _ = sample_with_logits(model, ids, max_new_tokens, temperature, seed)
    with _Hooks(model, clean, at_prompt, steer=steer):
        new, first = sample_with_logits(model, ids, max_new_tokens, temperature, seed)
    decode = model.tokenizer.decode
    text = prompt if isinstance(prompt, str) else decode(ids[0])
    return Steered(text, where, base[0], new[0], decode(base[0]), decode(new[0]), first[0])
