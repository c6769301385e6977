"""Transcoder sets trained in one streamed pass, saved as one folder, and loaded back.

:func:`train_transcoder_set` trains a transcoder at every layer, ``mlp_in_layer{L} ->
mlp_out_layer{L}``, all in lockstep from one forward pass of the model per batch
(:func:`sae_nb.training.streaming.train_sites` over an
:class:`~sae_nb.training.streaming.ActivationStream`; no store on disk), resumable from its
checkpoint, evaluates each layer on held-out contexts (the ones packed right after the training
contexts, never trained on) and saves the set:

    <folder>/layer_00/ ... layer_29/   one saved dictionary per layer (our format, site and
                                       target site recorded)
    <folder>/transcoder_set.json       the manifest: model, sites, widths, tokens, settings and
                                       per layer the held-out FVU of the MLP output, L0, dead

The manifest is written last, so a folder with it is a whole set; a rerun with the same settings
loads it instead of training, one with other settings is refused. :func:`load_transcoder_set`
reads our folders and circuit-tracer's local transcoder files.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sae_nb.activations.corpora import load_corpus, pack_contexts
from sae_nb.activations.extract import resolve_sites, run_sites
from sae_nb.activations.models import Model, hf_model, model_name
from sae_nb.activations.sites import n_layers
from sae_nb.circuits.transcoder_set import CircuitError, TranscoderSet, in_site, out_site
from sae_nb.dictionaries.architectures import Dictionary, SkipTopKSAE, TopKSAE
from sae_nb.dictionaries.saving import MACHINE_SETTINGS, load_sae_nb, save_dictionary
from sae_nb.training.streaming import ActivationStream, train_sites
from sae_nb.training.trainer import TrainConfig
from sae_nb.util.io import atomic_write_json, jsonable

MANIFEST = "transcoder_set.json"
FORMAT = "sae_nb transcoder set"
CHECKPOINT = "checkpoint"  # inside the set's folder while it trains; removed once saved


def set_name(d_sae: int | str, k: int, n_tokens: int) -> str:
    """A set's folder name from the settings that tell the usual sets apart, ``1536_k16_200k``
    (the tokens in thousands when whole): a set trained with other settings lands beside it
    instead of being refused in its place."""
    tokens = f"{n_tokens // 1000}k" if n_tokens % 1000 == 0 else str(n_tokens)
    return f"{d_sae}_k{k}_{tokens}"


def layer_folder(folder: str | Path, layer: int) -> Path:
    return Path(folder) / f"layer_{layer:02d}"


class _Bar:
    """The stream with one progress bar over all layers' steps; it keeps the stream's
    ``state_dict``/``load_state_dict`` (so the checkpoint holds the stream's position)."""

    def __init__(self, stream: ActivationStream, steps: int, progress: bool):
        self.stream, self.steps, self.progress = stream, steps, progress

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)

    def __iter__(self):
        done = self.stream.yielded
        with tqdm(total=self.steps, initial=done, disable=not self.progress, unit="step",
                  desc="transcoder set") as bar:
            for batch in self.stream:
                bar.update(1)  # counted when handed out: training may stop after the last
                yield batch


def set_settings(model: Model, layers: int, n_tokens: int, heldout_tokens: int, ctx_len: int,
                 corpus: str, batch_rows: int, buffer_rows: int, seed: int,
                 config: TrainConfig) -> dict[str, Any]:
    """What decides the set: a folder holding a set of other settings is not reused."""
    train = {k: v for k, v in jsonable(asdict(config)).items()
             if k not in (*MACHINE_SETTINGS, "metadata", "device", "log_every",
                          "checkpoint_every", "total_tokens")}
    # The rate it trains at, not just lr=None: the default may change between two runs.
    train["learning_rate"] = config.learning_rate(config.width(hf_model(model).config.hidden_size))
    return {"model": model_name(model), "layers": layers, "n_tokens": n_tokens,
            "heldout_tokens": heldout_tokens, "ctx_len": ctx_len, "corpus": corpus,
            "batch_rows": batch_rows, "buffer_rows": buffer_rows, "seed": seed, "train": train}


def train_transcoder_set(model: Model, folder: str | Path, config: TrainConfig | None = None,
                         n_tokens: int = 300_000, heldout_tokens: int = 8192, ctx_len: int = 128,
                         corpus: str = "sotu", batch_rows: int = 4096, buffer_rows: int = 16384,
                         seed: int = 0, save_dtype: str = "float32", progress: bool = True,
                         checkpoint_every: int = 20, **options) -> TranscoderSet:
    """A TopK transcoder at every layer of ``model``, trained on ``n_tokens`` tokens of
    ``corpus`` in one streamed pass, saved to ``folder``; or the set already there when it was
    trained with these settings. ``config``/``options``: the transcoders' training settings
    (:class:`~sae_nb.training.trainer.TrainConfig`: ``d_sae``, ``k``, ``skip_connection``,
    ``optimizer``, ...). Killed, a rerun resumes from the checkpoint in ``folder``."""
    folder = Path(folder)
    layers = n_layers(hf_model(model))
    cfg = TrainConfig(**{**(asdict(config) if config else {}), **options})
    settings = set_settings(model, layers, n_tokens, heldout_tokens, ctx_len, corpus, batch_rows,
                            buffer_rows, seed, cfg)
    if (folder / MANIFEST).exists():
        held = _read_manifest(folder)
        if held.get("settings") != settings:
            differ = sorted(k for k in settings if held.get("settings", {}).get(k) != settings[k])
            raise CircuitError(f"{str(folder)!r} holds a transcoder set trained with other "
                               f"settings ({', '.join(differ)} differ); pass another folder, "
                               f"or delete it to train this one.")
        return load_transcoder_set(folder)
    sites = [s for layer in range(layers) for s in (in_site(layer), out_site(layer))]
    stream = ActivationStream(model, sites=sites, n_tokens=n_tokens, ctx_len=ctx_len,
                              corpus=corpus, seed=seed, batch_rows=batch_rows,
                              buffer_rows=buffer_rows, buffer_seed=seed)
    rows = len(stream.contexts.tokens) * (ctx_len - int(stream.config.exclude_bos))
    steps = rows // batch_rows
    if steps < 1:
        raise CircuitError(f"n_tokens={n_tokens} gives {rows} rows, fewer than one batch of "
                           f"{batch_rows}; raise n_tokens or lower batch_rows.")
    cfg.total_tokens, cfg.checkpoint_every = steps * batch_rows, checkpoint_every
    cfg.checkpoint_dir = str(folder / CHECKPOINT)
    cfg.metadata = {**cfg.metadata, "model": model_name(model), "ctx_len": ctx_len,
                    "corpus": corpus, "exclude_bos": stream.config.exclude_bos}
    results = train_sites(_Bar(stream, steps, progress), cfg, progress=False,
                          dictionaries={f"layer{L}": (in_site(L), out_site(L))
                                        for L in range(layers)})
    transcoders = [results[f"layer{L}"].dictionary for L in range(layers)]
    heldout = heldout_metrics(model, transcoders, stream, heldout_tokens)
    per_layer = []
    for layer, tc in enumerate(transcoders):
        log = results[f"layer{layer}"].log
        metrics = {**heldout[layer], "dead": float(log["dead_frac"].iloc[-1])}
        per_layer.append({"layer": layer, **metrics})
        save_dictionary(tc, layer_folder(folder, layer), model=model_name(model),
                        site=in_site(layer), target_site=out_site(layer), context_size=ctx_len,
                        dataset=corpus, train_config=results[f"layer{layer}"].settings(),
                        metrics=metrics, dtype=save_dtype)
    first = transcoders[0]
    manifest = {"format": FORMAT, "version": 1, "model": model_name(model), "layers": layers,
                "sites": [[in_site(L), out_site(L)] for L in range(layers)],
                "d_model": first.d_in, "d_sae": first.d_sae, "k": getattr(first, "k", None),
                "skip_connection": cfg.skip_connection, "training_tokens": steps * batch_rows,
                "heldout_tokens": heldout[0]["tokens"], "settings": settings,
                "per_layer": per_layer}
    atomic_write_json(folder / MANIFEST, manifest)  # last: the set is whole
    shutil.rmtree(folder / CHECKPOINT, ignore_errors=True)
    return load_transcoder_set(folder)


@torch.no_grad()
def heldout_metrics(model: Model, transcoders: list[Dictionary], stream: ActivationStream,
                    heldout_tokens: int, contexts_per_pass: int = 8) -> list[dict[str, float]]:
    """Each layer's held-out FVU of the MLP output (squared error over the variance around the
    mean), L0 and fraction of latents never active, on the ``heldout_tokens`` tokens packed
    right after the stream's training contexts (same corpus order; BOS rows left out as the
    stream leaves them out)."""
    cfg = stream.config
    n_train = len(stream.contexts.tokens)
    n_held = max(1, -(-heldout_tokens // cfg.ctx_len))
    packed = pack_contexts(load_corpus(cfg.corpus, cfg.text_column), model.tokenizer,
                           cfg.ctx_len, n_train + n_held, cfg.seed, cfg.prepend_bos)
    tokens, pos = packed.tokens[n_train:], packed.pos[n_train:]
    if len(tokens) == 0:
        raise CircuitError(f"The corpus {cfg.corpus!r} has no text left after the "
                           f"{n_train} training contexts to hold out; lower n_tokens.")
    sites = resolve_sites(model, [s for L in range(len(transcoders))
                                  for s in (in_site(L), out_site(L))])
    sums = [{"err": 0.0, "sq": torch.zeros(()), "sum": None, "n": 0, "l0": 0.0,
             "fired": torch.zeros(tc.d_sae, dtype=torch.bool)} for tc in transcoders]
    for lo in range(0, len(tokens), contexts_per_pass):
        ids = torch.from_numpy(tokens[lo:lo + contexts_per_pass].astype("int64"))
        keep = torch.from_numpy(pos[lo:lo + contexts_per_pass] != -1) if cfg.exclude_bos \
            else torch.ones(ids.shape, dtype=torch.bool)
        acts = run_sites(model, sites, ids, torch.ones_like(ids))
        for layer, tc in enumerate(transcoders):
            x = acts[2 * layer][keep.to(acts[0].device)].float().cpu()
            y = acts[2 * layer + 1][keep.to(acts[0].device)].float().cpu()
            codes, y_hat = tc.encode_and_reconstruct(x)
            s = sums[layer]
            s["err"] += float((y - y_hat).pow(2).sum())
            s["sq"] = s["sq"] + y.double().pow(2).sum()
            s["sum"] = y.double().sum(0) if s["sum"] is None else s["sum"] + y.double().sum(0)
            s["n"] += len(y)
            s["l0"] += float((codes != 0).sum())
            s["fired"] |= (codes != 0).any(0)
    out = []
    for s in sums:
        variance = float(s["sq"] - s["sum"].pow(2).sum() / s["n"])  # sum |y - mean|^2
        out.append({"fvu": s["err"] / max(variance, 1e-12), "l0": s["l0"] / s["n"],
                    "silent": float((~s["fired"]).float().mean()), "tokens": s["n"]})
    return out


def _read_manifest(folder: Path) -> dict:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        raise CircuitError(f"{str(folder / MANIFEST)!r} cannot be read ({err}); restore it or "
                           f"train the set again into an empty folder.") from err
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != FORMAT:
        raise CircuitError(f"{str(folder / MANIFEST)!r} is not a transcoder set manifest "
                           f"(format {found!r}, not {FORMAT!r}); train the set again.")
    return manifest


def load_transcoder_set(folder: str | Path) -> TranscoderSet:
    """The transcoder set saved in ``folder``: ours (``transcoder_set.json`` and one dictionary
    per layer), or circuit-tracer's local per-layer or cross-layer transcoder files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CircuitError(f"No transcoder set at {str(folder)!r}: the folder does not exist. "
                           f"Train one with python -m sae_nb transcoders --folder {folder}.")
    if not (folder / MANIFEST).exists():
        return _load_tracer_set(folder)
    manifest = _read_manifest(folder)
    layers = int(manifest["layers"])
    missing = [L for L in range(layers) if not layer_folder(folder, L).is_dir()]
    if missing:
        raise CircuitError(f"The transcoder set at {str(folder)!r} lists {layers} layers but "
                           f"layers {missing} have no folder ({layer_folder(folder, missing[0])}"
                           f"); restore them or train the set again.")
    transcoders = [load_sae_nb(layer_folder(folder, L)) for L in range(layers)]
    meta = {k: v for k, v in manifest.items() if k != "settings"}
    return TranscoderSet(transcoders, model_name=manifest.get("model"),
                         metadata={**meta, "path": str(folder)})


def _with_skip(layer: int, tc: Dictionary, W_skip: torch.Tensor, folder: Path) -> Dictionary:
    """A TopK transcoder of a circuit-tracer folder with its skip connection, as our
    ``SkipTopKSAE`` (its reconstruction adds ``x @ W_skip.T``)."""
    if type(tc) is not TopKSAE:
        raise CircuitError(
            f"Layer {layer} of {str(folder)!r} is a {type(tc).__name__} transcoder with a skip "
            f"connection (W_skip); sae_nb models skip connections on TopK transcoders only so "
            f"far. Use the set without its skips (load_tracer_transcoders gives the parts), or "
            f"a TopK set.")
    out = SkipTopKSAE(tc.d_in, tc.d_sae, k=tc.k, apply_b_dec_to_input=False)
    with torch.no_grad():
        out.load_state_dict({**tc.state_dict(), "W_skip": W_skip})
    out.metadata = dict(tc.metadata)
    return out.eval()


def _load_tracer_set(folder: Path) -> TranscoderSet:
    """circuit-tracer's local transcoder files, through :mod:`sae_nb.circuits.tracer_format`."""
    # Imported here: only a folder without our manifest needs the circuit-tracer reader.
    from sae_nb.circuits.tracer_format import load_tracer_transcoders

    transcoders, skips, metadata = load_tracer_transcoders(folder)
    for layer, W_skip in skips.items():  # a per-layer set's skip connections
        transcoders[layer] = _with_skip(layer, transcoders[layer], W_skip, folder)
    # A cross-layer transcoder: its encoders (each with its decoder to its own layer) and the
    # decoders to every later layer.
    cross = getattr(transcoders, "decoders", None)
    return TranscoderSet(getattr(transcoders, "encoders", transcoders),
                         model_name=(metadata or {}).get("model_name"),
                         metadata={"format": "circuit-tracer", "path": str(folder)}, cross=cross)
