"""The replacement model of one prompt: the model frozen into a map that is linear in the
transcoders' latent activations, their error terms and the token embeddings.

The local replacement model of Ameisen et al., 2025 ("Circuit tracing: revealing computational
graphs in language models"), for the Llama family (``llama``, and the ``mistral``, ``qwen2``,
``qwen3`` models that share its layout). The real model runs once on the prompt, recording each
layer's residual stream, MLP input and MLP output. Then, with ``r`` the residual stream:

- every RMSNorm (``input_layernorm``, ``post_attention_layernorm``, the final ``norm``) is
  ``x * s * w`` with its scale ``s = 1 / sqrt(mean(x^2) + eps)`` frozen at its value on the
  prompt (one number per position);
- every attention pattern is frozen, so attention is ``o_proj(P @ v_proj(a))``: linear in its
  input (queries and keys only ever entered through the pattern);
- every MLP is replaced by its transcoder's decoder at the recorded latent activations, plus
  its bias and its skip connection (linear in the MLP's input), plus the error term
  ``mlp_out - transcoder(mlp_in)``, a constant vector per (layer, position). With a cross-layer
  transcoder, layer T's MLP output is decoded from the latents of every layer L <= T
  (``cross[L][:, T - L]``), so a latent writes into every later MLP output.

The sources of the map are the active latents (``features``: layer, position, latent, with
their ``activations``), the error vectors and the token embeddings; everything else (decoder
biases, attention biases, and, at a BOS position kept out of the graph, the whole MLP output
but its skip term) is a constant. With every source at its recorded value :meth:`forward`
gives the model's own logits (checked on every build). :meth:`backward` is the transpose of
the map, written out layer by layer: one call takes a batch of targets (a latent's encoder
row at its layer's MLP input, or a logit direction at the final norm's output) to the rows of
their direct effects on every source, ``activation * (decoder row . gradient)`` for a latent,
``error . gradient`` for an error node, ``embedding . gradient`` for a token.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from sae_nb.activations.models import Model, hf_model, model_name
from sae_nb.activations.sites import LLAMA_LIKE
from sae_nb.circuits.transcoder_set import CircuitError, TranscoderSet, skip_matrix

# How far the frozen map's logits may stray from the model's own (max |difference| over the
# prompt, relative to the logits' largest magnitude) before the build refuses the model.
SELF_CHECK_TOLERANCE = 1e-3


@dataclass
class LayerWeights:
    """One block's weights as the frozen map uses them (references, float32)."""

    w_attn: torch.Tensor  # (D,) input_layernorm weight
    w_mlp: torch.Tensor  # (D,) post_attention_layernorm weight
    W_v: torch.Tensor  # (Hkv * dh, D)
    b_v: torch.Tensor | None  # (Hkv * dh,)
    W_o: torch.Tensor  # (D, H * dh)
    b_o: torch.Tensor | None  # (D,)
    W_skip: torch.Tensor | None  # (D, D): the transcoder adds m @ W_skip.T


@dataclass
class ReplacementModel:
    """The frozen linear model of one prompt (build it with :func:`build_replacement`)."""

    tokens: torch.Tensor  # (T,) token ids
    logits: torch.Tensor  # (T, V) the model's own logits
    embeds: torch.Tensor  # (T, D) token embeddings: sources
    features: torch.Tensor  # (n, 3) long: layer, position, latent of each active latent
    activations: torch.Tensor  # (n,) their activations: sources
    errors: torch.Tensor  # (L, T, D) MLP output minus transcoder output: sources
    constants: torch.Tensor  # (L, T, D) the rest of each MLP's output but the skip term
    mlp_in: torch.Tensor  # (L, T, D) recorded MLP inputs
    mlp_out: torch.Tensor  # (L, T, D) recorded MLP outputs
    scale_attn: torch.Tensor  # (L, T, 1) frozen input_layernorm scales
    scale_mlp: torch.Tensor  # (L, T, 1) frozen post_attention_layernorm scales
    scale_final: torch.Tensor  # (T, 1) frozen final norm scale
    patterns: torch.Tensor  # (L, H, T, T) frozen attention patterns
    layers: list[LayerWeights]
    w_final: torch.Tensor  # (D,)
    W_U: torch.Tensor  # (V, D) unembedding
    b_U: torch.Tensor | None  # (V,)
    decoders: list[torch.Tensor]  # (F, D) per layer: W_dec
    cross: list[torch.Tensor] | None  # (F, L - l, D) per source layer l: a CLT's decoders
    encoders: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (W (D, F), bias (F,))
    transcoders: TranscoderSet
    zeroed_bos: bool  # position 0 holds no latent and no error node
    model_name: str

    # -- shapes and node layout ------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_pos(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.features.shape[0])

    @property
    def n_sources(self) -> int:
        """Columns of a row of direct effects: features, errors (layer-major), embeddings."""
        return self.n_features + (self.n_layers + 1) * self.n_pos

    def error_index(self, layer: int, position: int) -> int:
        return self.n_features + layer * self.n_pos + position

    def embed_index(self, position: int) -> int:
        return self.n_features + self.n_layers * self.n_pos + position

    def encoder_rows(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """``(n, D)``: each feature's encoder column ``W_enc[:, latent]`` (the gradient of its
        pre-activation with respect to its layer's MLP input)."""
        feats = self.features if index is None else self.features[index]
        out = self.embeds.new_empty(len(feats), self.embeds.shape[1])
        for layer in feats[:, 0].unique().tolist():
            here = feats[:, 0] == layer
            out[here] = self.encoders[layer][0][:, feats[here, 2]].T
        return out

    def to(self, dtype: torch.dtype) -> ReplacementModel:
        """A copy whose floating tensors are ``dtype`` (float64 for exact checks)."""
        def cast(value):
            if isinstance(value, torch.Tensor):
                return value.to(dtype) if value.is_floating_point() else value
            if isinstance(value, (list, tuple)):
                return type(value)(cast(v) for v in value)
            if isinstance(value, LayerWeights):
                return LayerWeights(*(cast(getattr(value, f.name)) for f in fields(value)))
            return value
        return replace(self, **{f.name: cast(getattr(self, f.name)) for f in fields(self)
                                if f.name != "transcoders"})

    # -- the frozen map --------------------------------------------------------------------
    def forward(self, activations: torch.Tensor | None = None, errors: torch.Tensor | None = None,
                embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mlp_in (L, T, D), logits (T, V))`` of the frozen map at the given sources (the
        recorded ones where None). Exactly affine in the sources."""
        acts = self.activations if activations is None else activations
        errors = self.errors if errors is None else errors
        r = (self.embeds if embeds is None else embeds).clone()  # (T, D)
        mlp_in = []
        for layer, w in enumerate(self.layers):
            a = r * self.scale_attn[layer] * w.w_attn
            r = r + self._attention(layer, a)
            m = r * self.scale_mlp[layer] * w.w_mlp  # (T, D)
            mlp_in.append(m)
            out = self.constants[layer] + errors[layer] + self._decode(layer, acts)
            if w.W_skip is not None:
                out = out + m @ w.W_skip.T
            r = r + out
        logits = (r * self.scale_final * self.w_final) @ self.W_U.T  # (T, V)
        if self.b_U is not None:
            logits = logits + self.b_U
        return torch.stack(mlp_in), logits

    def _attention(self, layer: int, a: torch.Tensor) -> torch.Tensor:
        w, P = self.layers[layer], self.patterns[layer]  # P (H, T, T)
        n_heads, T = P.shape[0], a.shape[0]
        v = a @ w.W_v.T + (0 if w.b_v is None else w.b_v)  # (T, Hkv * dh)
        v = v.view(T, -1, w.W_o.shape[1] // n_heads)  # (T, Hkv, dh)
        v = v.repeat_interleave(n_heads // v.shape[1], dim=1)  # (T, H, dh)
        z = torch.einsum("hqk,khd->qhd", P, v).reshape(T, -1)  # (T, H * dh)
        return z @ w.W_o.T + (0 if w.b_o is None else w.b_o)

    def writers(self, layer: int) -> torch.Tensor:
        """The features that write layer ``layer``'s MLP output: those read at that layer, or
        with a cross-layer transcoder at that layer or below."""
        here = self.features[:, 0] <= layer if self.cross is not None else \
            self.features[:, 0] == layer
        return here.nonzero().flatten()

    def written(self, layer: int, index: torch.Tensor) -> torch.Tensor:
        """``(n, D)``: what each feature in ``index`` writes into layer ``layer``'s MLP output
        per unit of activation (its decoder row to that layer)."""
        feats = self.features[index]
        out = self.embeds.new_empty(len(index), self.embeds.shape[1])
        for source in feats[:, 0].unique().tolist():
            mine = feats[:, 0] == source
            out[mine] = (self.decoders[source][feats[mine, 2]] if self.cross is None
                         else self.cross[source][feats[mine, 2], layer - source])
        return out

    def _decode(self, layer: int, acts: torch.Tensor) -> torch.Tensor:
        here = self.writers(layer)
        rows = acts[here, None] * self.written(layer, here)  # (n, D)
        return torch.zeros_like(self.embeds).index_add_(0, self.features[here, 1], rows)

    # -- its transpose ---------------------------------------------------------------------
    def prepare_backward(self) -> None:
        """Per layer, each position's active latents padded to one width: their columns and
        their scaled decoder rows ``activation * W_dec[latent]``, for one batched product."""
        T, D = self.n_pos, self.embeds.shape[1]
        self._pad_cols, self._pad_dec = [], []
        for layer in range(self.n_layers):
            here = self.writers(layer)
            here = here[self.features[here, 1].argsort(stable=True)]  # grouped by position
            pos = self.features[here, 1]
            counts = torch.bincount(pos, minlength=T)
            width = max(int(counts.max()) if len(here) else 0, 1)
            cols = torch.full((T, width), self.n_sources, dtype=torch.long)  # dummy column
            dec = self.embeds.new_zeros(T, width, D)
            slot = torch.arange(len(here)) - torch.cumsum(counts, 0)[pos] + counts[pos]
            cols[pos, slot] = here
            dec[pos, slot] = self.activations[here, None] * self.written(layer, here)
            self._pad_cols.append(cols)
            self._pad_dec.append(dec)
        # The frozen norms as one factor per position, and the patterns by key-value group
        # and key position: (L, Hkv, T_k, rep, T_q).
        self._f_mlp = self.scale_mlp * torch.stack([w.w_mlp for w in self.layers])[:, None]
        self._f_attn = self.scale_attn * torch.stack([w.w_attn for w in self.layers])[:, None]
        L, H = self.patterns.shape[:2]
        n_kv = self.layers[0].W_v.shape[0] * H // self.layers[0].W_o.shape[1]
        self._grouped_patterns = self.patterns.view(L, n_kv, H // n_kv, T, T).permute(
            0, 1, 4, 2, 3).contiguous()

    @torch.no_grad()
    def backward(self, layers: torch.Tensor, positions: torch.Tensor,
                 vectors: torch.Tensor) -> torch.Tensor:
        """``(B, n_sources)`` direct effects of every source on each of ``B`` targets.

        Target ``b`` is ``vectors[b] . x`` with ``x`` the MLP input of layer ``layers[b]`` at
        ``positions[b]``, or, where ``layers[b] == n_layers``, the final norm's output there
        (what the unembedding reads). Target ``b``'s gradient is zero above its layer and after
        its position (causality), so the matrix products run over the live (position, target)
        rows only: a row costs its own layers and positions, whatever the batch holds."""
        if not hasattr(self, "_pad_cols"):
            self.prepare_backward()
        B, T, L, D = len(layers), int(positions.max()) + 1, self.n_layers, self.embeds.shape[1]
        vectors = vectors.to(self.embeds.dtype)
        rows = self.embeds.new_zeros(B, self.n_sources + 1)
        b = torch.arange(B)
        g = self.embeds.new_zeros(T, B, D)  # d target / d residual stream, position-major
        top = layers == L
        if top.any():
            g[positions[top], b[top]] = vectors[top] * self.w_final * self.scale_final[
                positions[top]]
        after = torch.arange(T)[:, None] <= positions[None, :]  # (T, B): at or before target
        err0 = self.error_index(0, 0)
        for layer in range(min(int(layers.max()), L - 1), -1, -1):
            w, f_mlp, f_attn = self.layers[layer], self._f_mlp[layer, :T], self._f_attn[layer, :T]
            # Sources at this layer write the MLP output, after its input: read them first.
            edges = torch.bmm(g, self._pad_dec[layer][:T].transpose(1, 2))  # (T, B, width)
            cols, edges = self._pad_cols[layer][:T].flatten(), edges.transpose(0, 1).reshape(B, -1)
            if self.cross is None:  # each feature writes one layer: its whole edge is here
                rows[:, cols] = edges
            else:  # a sum over the layers it writes
                rows.index_add_(1, cols, edges)
            rows[:, err0 + layer * self.n_pos:err0 + layer * self.n_pos + T] = torch.bmm(
                g, self.errors[layer, :T, :, None])[..., 0].T
            live = (after & (layers >= layer)[None, :]).flatten().nonzero().flatten()
            gm = None if w.W_skip is None else _live_matmul(g, w.W_skip, live)  # d / d MLP in
            here = layers == layer
            if gm is not None:
                g.addcmul_(gm, f_mlp[:, None])
            if here.any():
                g[positions[here], b[here]] += vectors[here] * f_mlp[positions[here]]
            self._attention_backward(layer, g, live, f_attn)
        e0 = self.embed_index(0)
        rows[:, e0:e0 + T] = torch.bmm(g, self.embeds[:T, :, None])[..., 0].T
        return rows[:, :-1]

    def _attention_backward(self, layer: int, g: torch.Tensor, live: torch.Tensor,
                            factor: torch.Tensor) -> None:
        """Add attention's transpose applied to ``g`` ``(T, B, D)``, times the frozen norm
        ``factor`` ``(T, D)``, to ``g`` in place."""
        w = self.layers[layer]
        T, B, D = g.shape
        P = self._grouped_patterns[layer][:, :T, :, :T]  # (Hkv, T_k, rep, T_q)
        n_kv, rep = P.shape[0], P.shape[2]
        go = _live_matmul(g, w.W_o, live).view(T, B, n_kv, rep, -1)  # d / d heads
        # gv[k, b, g] = sum over the group's heads r and queries q of P[h, q, k] go[q, b, h]
        gv = torch.einsum("gkrq,qbgrd->kbgd", P, go).reshape(T * B, -1)  # (T * B, Hkv * dh)
        g.view(T * B, D).index_add_(0, live, (gv.index_select(0, live) @ w.W_v)
                                    * factor[live // B])


def _live_matmul(x: torch.Tensor, W: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """``x @ W`` for ``x`` ``(T, B, n)`` computed on the flat rows ``live`` only (the others
    are zero in ``x``, so they stay zero)."""
    T, B, _ = x.shape
    if len(live) == T * B:
        return x @ W
    out = x.new_zeros(T * B, W.shape[1])
    out.index_copy_(0, live, x.reshape(T * B, -1).index_select(0, live) @ W)
    return out.view(T, B, -1)


def check_family(model: Model) -> None:
    """Refuse models outside the Llama layout the replacement model knows."""
    config = hf_model(model).config
    if getattr(config, "model_type", "") not in LLAMA_LIKE:
        raise CircuitError(
            f"Model {model_name(model)!r} is a {config.model_type!r} model; the replacement model "
            f"covers the Llama family ({sorted(LLAMA_LIKE)}) so far: load one of those, e.g. "
            f"sae_nb.load_model() for the embedded SmolLM2-135M.")


@torch.no_grad()
def build_replacement(model: Model, transcoders: TranscoderSet, ids: torch.Tensor,
                      zero_bos: bool = True) -> ReplacementModel:
    """Run ``model`` on ``ids`` (``(T,)`` token ids), record what the frozen map needs, and
    build it. ``zero_bos``: when position 0 holds a special token (BOS), it gets no latent and
    no error node (its MLP output is a constant), as circuit-tracer does: BOS activations are
    huge and explain nothing about the prompt."""
    check_family(model)
    transcoders.check(model)
    hf = hf_model(model)
    ids = ids.reshape(-1).to(next(hf.parameters()).device)
    rec = _record(hf, ids)
    T, L = ids.shape[0], len(hf.model.layers)
    zeroed = bool(zero_bos and int(ids[0]) in set(model.tokenizer.all_special_ids))

    layers, scale_attn, scale_mlp, patterns = [], [], [], []
    feats, acts, errors, constants, all_codes = [], [], [], [], []
    # A cross-layer transcoder's decoders as float32 on the CPU, once: every layer reads them.
    cross = [_f32(w) for w in transcoders.cross] if transcoders.is_cross_layer else None
    for layer, block in enumerate(hf.model.layers):
        attn = block.self_attn
        scale_attn.append(_rms_scale(block.input_layernorm, rec["attn_in"][layer]))
        scale_mlp.append(_rms_scale(block.post_attention_layernorm, rec["mlp_resid"][layer]))
        patterns.append(_pattern(hf, attn, block.input_layernorm(
            rec["attn_in"][layer].to(ids.device, hf.dtype))))
        tc = transcoders[layer]
        W_skip = skip_matrix(tc)
        layers.append(LayerWeights(
            _f32(block.input_layernorm.weight), _f32(block.post_attention_layernorm.weight),
            _f32(attn.v_proj.weight), _f32(attn.v_proj.bias), _f32(attn.o_proj.weight),
            _f32(attn.o_proj.bias), _f32(W_skip)))
        x, y = rec["mlp_in"][layer], rec["mlp_out"][layer]  # (T, D) each
        codes, y_hat = (t.float().cpu() for t in tc.encode_and_reconstruct(
            x.to(tc.W_enc.device, tc.W_enc.dtype)))
        if cross is not None:  # layer T's output is decoded from layers <= T
            all_codes.append(codes.clone())  # before position 0 is zeroed below
            y_hat = _f32(tc.b_dec) + sum(c @ cross[source][:, layer - source]
                                         for source, c in enumerate(all_codes))
            if W_skip is not None:
                y_hat = y_hat + x @ _f32(W_skip).T
        const = _f32(tc.b_dec).expand(T, -1).clone()
        err = y - y_hat
        if zeroed:
            codes[0] = 0
            err[0] = 0
            const[0] = y[0] - (0 if W_skip is None else x[0] @ _f32(W_skip).T)
        pos, lat = codes.nonzero(as_tuple=True)
        feats.append(torch.stack([torch.full_like(pos, layer), pos, lat], 1))
        acts.append(codes[pos, lat])
        errors.append(err)
        constants.append(const)

    rm = ReplacementModel(
        tokens=ids.cpu(), logits=rec["logits"], embeds=rec["embeds"], features=torch.cat(feats),
        activations=torch.cat(acts), errors=torch.stack(errors), constants=torch.stack(constants),
        mlp_in=torch.stack(rec["mlp_in"]), mlp_out=torch.stack(rec["mlp_out"]),
        scale_attn=torch.stack(scale_attn), scale_mlp=torch.stack(scale_mlp),
        scale_final=_rms_scale(hf.model.norm, rec["final"]), patterns=torch.stack(patterns),
        layers=layers, w_final=_f32(hf.model.norm.weight), W_U=_f32(hf.lm_head.weight),
        b_U=_f32(getattr(hf.lm_head, "bias", None)),
        decoders=[_f32(tc.W_dec) for tc in transcoders.transcoders],
        cross=cross,
        encoders=[tuple(_f32(t) for t in tc.folded_encoder()) for tc in transcoders.transcoders],
        transcoders=transcoders,
        zeroed_bos=zeroed, model_name=model_name(model))
    _self_check(rm, T, L)
    return rm


def _self_check(rm: ReplacementModel, T: int, L: int) -> None:
    """The frozen map at the recorded sources must give the model's logits: else the model
    computes something this layout does not describe (a sliding window, extra norms)."""
    _, logits = rm.forward()
    gap = float((logits - rm.logits).abs().max()) / max(float(rm.logits.abs().max()), 1e-6)
    if gap > SELF_CHECK_TOLERANCE:
        raise CircuitError(
            f"The replacement model of {rm.model_name!r} does not reproduce its logits (relative "
            f"gap {gap:.2e} over {T} tokens and {L} layers): this model's blocks differ from the "
            f"Llama layout (input_layernorm, attention, post_attention_layernorm, MLP) the "
            f"replacement model assumes; use a Llama-family model such as the embedded one.")


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().float().cpu()


def _rms_scale(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(T, 1)``: the RMSNorm's scale ``1 / sqrt(mean(x^2) + eps)`` at each position."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    return torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)


def _pattern(hf: torch.nn.Module, attn: torch.nn.Module, a: torch.Tensor) -> torch.Tensor:
    """``(H, T, T)``: the attention pattern of one layer on its normed input ``a`` (T, D), as
    the model's eager attention computes it (rotary positions, causal mask, float32 softmax)."""
    if getattr(attn, "sliding_window", None):
        raise CircuitError("This model's attention uses a sliding window, which the "
                           "replacement model does not reproduce; use a model without one.")
    T = a.shape[0]
    q = attn.q_proj(a).view(1, T, -1, attn.head_dim)
    k = attn.k_proj(a).view(1, T, -1, attn.head_dim)
    if hasattr(attn, "q_norm"):  # Qwen3 normalises each head's queries and keys
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # (1, H, T, dh), (1, Hkv, T, dh)
    cos, sin = hf.model.rotary_emb(a[None], torch.arange(T, device=a.device)[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)).float() * attn.scaling  # (1, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=a.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    return torch.softmax(scores, dim=-1)[0].cpu()


def _record(hf: torch.nn.Module, ids: torch.Tensor) -> dict:
    """One forward pass of the real model with hooks: the embeddings, each block's residual
    stream before its attention and before its MLP, each MLP's input and output, the final
    norm's input and the logits, all ``(T, D)`` float32 on the CPU (lists over layers)."""
    L = len(hf.model.layers)
    rec = {key: [None] * L for key in ("attn_in", "mlp_resid", "mlp_in", "mlp_out")}

    def value(t):
        return (t[0] if isinstance(t, tuple) else t)[0].detach().float().cpu()

    def store(key, layer):
        def put(v):
            if layer is None:
                rec[key] = v
            else:
                rec[key][layer] = v
        return put

    def reads_input(put):
        return lambda mod, args, kwargs: put(value(args[0] if args else
                                                   next(iter(kwargs.values()))))

    def reads_output(put):
        return lambda mod, args, kwargs, out: put(value(out))

    handles = []
    try:
        handles.append(hf.model.embed_tokens.register_forward_hook(
            reads_output(store("embeds", None)), with_kwargs=True))
        for layer, block in enumerate(hf.model.layers):
            for module, key in ((block.input_layernorm, "attn_in"),
                                (block.post_attention_layernorm, "mlp_resid"),
                                (block.mlp, "mlp_in")):
                handles.append(module.register_forward_pre_hook(
                    reads_input(store(key, layer)), with_kwargs=True))
            handles.append(block.mlp.register_forward_hook(
                reads_output(store("mlp_out", layer)), with_kwargs=True))
        handles.append(hf.model.norm.register_forward_pre_hook(
            reads_input(store("final", None)), with_kwargs=True))
        rec["logits"] = hf(input_ids=ids[None]).logits[0].detach().float().cpu()
    finally:
        for h in handles:
            h.remove()
    return rec
