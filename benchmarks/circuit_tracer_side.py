"""circuit-tracer side of the circuits comparison: one attribution graph by circuit-tracer 0.5.0.

Run with the circuit-tracer environment's python (``.ci/circuit-tracer-env``; it holds neither
sae_nb nor transformers 5). Given a local Hugging Face model folder (config + weights +
tokenizer), a transcoder folder in circuit-tracer's local format (what
``sae_nb.circuits.tracer_format.save_tracer_transcoders`` writes) and a prompt, it builds
circuit-tracer's ``ReplacementModel`` offline on the CPU and runs its ``attribute`` with fixed
settings, then writes into the output folder:

- ``graph.npz``: ``adjacency_matrix`` (n_nodes, n_nodes) float32, rows targets and columns
  sources, nodes ordered [selected features, errors (layer-major: layer, then position), token
  embeddings, logits]; ``active_features`` (n_active, 3) (layer, pos, feature); the
  ``activation_values`` of those features; ``selected_features`` (indices into
  ``active_features`` that the graph's feature nodes are, in node order); ``input_tokens``;
  ``logit_tokens`` and ``logit_probabilities``; ``model_logits``, the plain model's logits at the
  last position (to check the model folder loads as the workbench loads it);
- ``graph.json``: the settings, the tokens as text, the logit tokens as text, the node counts,
  circuit-tracer's replacement and completeness scores (``compute_graph_scores``),
  the wall times (model build, attribution), the attribution's CPU time (user + system, all
  threads: on a shared machine the wall time also counts waiting for a core), peak memory,
  versions, and the patches made to the model folder.

    python="$(.ci/circuit-tracer-env)"
    "$python" benchmarks/circuit_tracer_side.py --model MODEL_DIR --transcoders TC_DIR \\
        --prompt "The capital of France is" --out OUT_DIR

Offline: ``HF_HUB_OFFLINE=1`` is set before anything is imported; circuit-tracer's own
``from_pretrained`` fetches transcoders from the hub by name, so the set is loaded from files
here (``load_transcoder_set`` / ``load_clt``) and handed to
``ReplacementModel.from_pretrained_and_transcoders``.

What it adapts, and why:

- **The model folder.** A folder saved by transformers 5 (the embedded SmolLM2 and the tests'
  tiny models) keeps RoPE's base in ``rope_parameters`` and names its tokenizer class
  ``TokenizersBackend``; transformers 4.57.3 (circuit-tracer's pin) would silently use the
  default RoPE base and cannot build that tokenizer. The script links the weights into a
  temporary folder with ``rope_theta`` copied out and ``PreTrainedTokenizerFast`` named; the
  patches are listed in ``graph.json``.
- **TopK.** circuit-tracer's file loader builds ReLU (or JumpReLU) transcoders; for a set whose
  ``config.yaml`` says ``activation_function: topk`` each transcoder's activation becomes
  circuit-tracer's own ``TopK(k)`` followed by a ReLU (our TopK's maths).
- **Tokens.** ``--prompt`` is tokenized without special tokens and the tokenizer's BOS is put
  first, and the ids are passed to ``attribute``: circuit-tracer's ``ensure_tokenized`` picks its
  BOS with ``filter(None, ...)``, which skips a BOS of id 0 (SmolLM2's ``<|endoftext|>``) and
  puts the pad token first instead. ``--tokens`` gives the ids directly.
- **Backend.** circuit-tracer's nnsight backend, which loads any ``LlamaForCausalLM`` folder
  (its ``tl_nnsight_mapping`` maps ``mlp.hook_in`` / ``mlp.hook_out`` to the input and output of
  ``model.layers[L].mlp``). Its default TransformerLens backend calls
  ``HookedTransformer.from_pretrained(name)``, which refuses any name outside TransformerLens's
  official list: ``ValueError: HuggingFaceTB/SmolLM2-135M not found. Valid official model
  names ...`` (transformer-lens 3.2.1), and a folder or a tiny model built from a config has no
  such name.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never touch the hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import circuit_tracer  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import yaml  # noqa: E402
from circuit_tracer import ReplacementModel, attribute  # noqa: E402
from circuit_tracer.graph import compute_graph_scores  # noqa: E402
from circuit_tracer.transcoder.activation_functions import TopK  # noqa: E402
from circuit_tracer.transcoder.cross_layer_transcoder import load_clt  # noqa: E402
from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set  # noqa: E402

SETTINGS = {"max_n_logits": 10, "desired_logit_prob": 0.95, "batch_size": 256,
            "max_feature_nodes": None}
CPU = torch.device("cpu")


class ReLUTopK(torch.nn.Module):
    """circuit-tracer's ``TopK(k)`` then a ReLU: our TopK transcoders' activation."""

    def __init__(self, k: int):
        super().__init__()
        self.topk = TopK(k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.topk(x))


def compat_model_folder(src: Path, dst: Path) -> list[str]:
    """Link ``src``'s files into ``dst``, rewriting the config and tokenizer config fields that
    transformers 4.57 reads otherwise; returns what was changed."""
    patches = []
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.name not in ("config.json", "tokenizer_config.json") and path.is_file():
            (dst / path.name).symlink_to(path.resolve())
    config = json.loads((src / "config.json").read_text())
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" not in config:
        config["rope_theta"] = rope["rope_theta"]
        patches.append(f"config.json: rope_theta={rope['rope_theta']} from rope_parameters")
        if rope.get("rope_type", "default") != "default":
            config["rope_scaling"] = rope
            patches.append(f"config.json: rope_scaling={rope}")
    if "dtype" in config and "torch_dtype" not in config:
        config["torch_dtype"] = config["dtype"]
    (dst / "config.json").write_text(json.dumps(config, indent=1))
    tok_file = src / "tokenizer_config.json"
    if tok_file.exists():
        tok = json.loads(tok_file.read_text())
        if tok.get("tokenizer_class") == "TokenizersBackend":
            tok["tokenizer_class"] = "PreTrainedTokenizerFast"
            patches.append("tokenizer_config.json: tokenizer_class TokenizersBackend -> "
                           "PreTrainedTokenizerFast")
        (dst / "tokenizer_config.json").write_text(json.dumps(tok, indent=1))
    return patches


def load_transcoders(folder: Path):
    """The set in ``folder`` as circuit-tracer objects, TopK restored from config.yaml."""
    config = yaml.safe_load((folder / "config.yaml").read_text())
    hooks = dict(feature_input_hook=config["feature_input_hook"],
                 feature_output_hook=config["feature_output_hook"])
    scan = config.get("scan") or str(folder)
    if config["model_kind"] == "cross_layer_transcoder":
        return load_clt(str(folder), scan=scan, device=CPU, dtype=torch.float32,
                        lazy_decoder=False, lazy_encoder=False, **hooks), config
    n = len(list(folder.glob("layer_*.safetensors")))
    paths = {layer: str(folder / f"layer_{layer}.safetensors") for layer in range(n)}
    tset = load_transcoder_set(paths, scan=scan, device=CPU, dtype=torch.float32,
                               lazy_encoder=False, lazy_decoder=False, **hooks)
    acts = config.get("activation_function")
    acts = [acts] * n if not isinstance(acts, list) else acts
    ks = config.get("top_k")
    ks = [ks] * n if not isinstance(ks, list) else ks
    for layer, tc in enumerate(tset):
        if acts[layer] == "topk":
            tc.activation_function = ReLUTopK(int(ks[layer]))
    return tset, config


def build_model(model_dir: Path, transcoders):
    return ReplacementModel.from_pretrained_and_transcoders(
        str(model_dir), transcoders, backend="nnsight", device=CPU, dtype=torch.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="local HF model folder")
    parser.add_argument("--transcoders", type=Path, required=True,
                        help="transcoder folder in circuit-tracer's local format")
    parser.add_argument("--prompt", help="text; the tokenizer's BOS is put first")
    parser.add_argument("--tokens", help="JSON list of token ids (instead of --prompt)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=SETTINGS["batch_size"])
    parser.add_argument("--max-feature-nodes", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(True)

    settings = {**SETTINGS, "batch_size": args.batch_size,
                "max_feature_nodes": args.max_feature_nodes}
    tmp = Path(tempfile.mkdtemp(prefix="ct_model_"))
    try:
        patches = compat_model_folder(args.model, tmp / "model")
        t0 = time.perf_counter()
        transcoders, tc_config = load_transcoders(args.transcoders)
        model = build_model(tmp / "model", transcoders)
        build_s = time.perf_counter() - t0
        if args.tokens:
            ids = json.loads(args.tokens)
        else:
            tok = model.tokenizer
            ids = [tok.bos_token_id] + tok(args.prompt, add_special_tokens=False).input_ids
        ids = torch.tensor(ids, dtype=torch.long)
        t0, c0 = time.perf_counter(), time.process_time()
        graph = attribute(ids, model, **settings)
        attribute_s, attribute_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        with torch.no_grad():  # the plain model (no transcoders), to check the folder's patches
            model_logits = model._module(ids[None]).logits[0, -1].float()  # (vocab,)
        replacement_score, completeness_score = compute_graph_scores(graph)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    args.out.mkdir(parents=True, exist_ok=True)
    n_feat = len(graph.selected_features)
    n_pos = len(graph.input_tokens)
    np.savez(args.out / "graph.npz",
             adjacency_matrix=graph.adjacency_matrix.float().cpu().numpy(),
             active_features=graph.active_features.cpu().numpy(),
             activation_values=graph.activation_values.float().cpu().numpy(),
             selected_features=graph.selected_features.cpu().numpy(),
             input_tokens=graph.input_tokens.cpu().numpy(),
             logit_tokens=graph.logit_token_ids.cpu().numpy(),
             logit_probabilities=graph.logit_probabilities.float().cpu().numpy(),
             model_logits=model_logits.cpu().numpy())
    tok = model.tokenizer
    info = {
        "model": str(args.model), "transcoders": str(args.transcoders),
        "transcoder_config": tc_config, "backend": "nnsight", "threads": args.threads,
        "settings": settings, "prompt": args.prompt,
        "input_tokens": graph.input_tokens.tolist(),
        "input_token_strs": [tok.decode([i]) for i in graph.input_tokens.tolist()],
        "logit_token_strs": [t.token_str for t in graph.logit_targets],
        "n_layers": int(graph.cfg.n_layers), "n_pos": n_pos,
        "n_active_features": int(len(graph.active_features)), "n_feature_nodes": n_feat,
        "n_error_nodes": int(graph.cfg.n_layers) * n_pos, "n_token_nodes": n_pos,
        "n_logit_nodes": len(graph.logit_targets),
        "node_order": "features, errors (layer, pos), tokens, logits; rows target, cols source",
        "replacement_score": replacement_score, "completeness_score": completeness_score,
        "build_s": build_s, "attribute_s": attribute_s, "attribute_cpu_s": attribute_cpu_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "versions": {"circuit_tracer": circuit_tracer.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "model_folder_patches": patches,
    }
    (args.out / "graph.json").write_text(json.dumps(info, indent=1))
    print(json.dumps({k: info[k] for k in ("build_s", "attribute_s", "attribute_cpu_s",
                                           "n_active_features",
                                           "n_feature_nodes", "n_logit_nodes", "peak_rss_mb",
                                           "replacement_score", "completeness_score")}))


if __name__ == "__main__":
    main()
