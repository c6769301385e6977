"""The SAELens side of tests/test_saelens_compat.py; runs in the SAELens environment.

    python tests/saelens_side.py FOLDER

FOLDER holds one subfolder per case: a dictionary saved by our ``save_dictionary`` in
``FOLDER/<case>/sae`` and the inputs in ``FOLDER/<case>/inputs.safetensors`` (``x`` (B, D) and
``f`` (B, F)). For each case this loads the dictionary with ``sae_lens.SAE.load_from_disk``
alone and writes what SAELens holds and computes: ``FOLDER/<case>/saelens.safetensors`` (its
state dict as ``state.<name>``, ``encode`` = encode(x), ``decode`` = decode(f), ``forward`` =
forward(x)) and ``FOLDER/<case>/saelens.json`` (its class, config, warnings and log records).

It imports neither pytest nor sae_nb and checks nothing: the test compares, in our environment.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

import sae_lens
import torch
from safetensors.torch import load_file, save_file


class Records(logging.Handler):
    """Keeps every log record of SAELens's loggers."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append({"logger": record.name, "level": record.levelname,
                             "message": record.getMessage()})


def run_case(case: Path) -> str:
    handler = Records()
    logger = logging.getLogger("sae_lens")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sae = sae_lens.SAE.load_from_disk(str(case / "sae"), device="cpu")
    finally:
        logger.removeHandler(handler)
    sae.eval()

    inputs = load_file(case / "inputs.safetensors")
    with torch.no_grad():
        out = {"encode": sae.encode(inputs["x"]), "decode": sae.decode(inputs["f"]),
               "forward": sae(inputs["x"])}
    out.update({f"state.{k}": v for k, v in sae.state_dict().items()})
    save_file({k: v.contiguous() for k, v in out.items()}, case / "saelens.safetensors")

    cfg, meta = sae.cfg, sae.cfg.metadata
    report = {
        "sae_lens_version": sae_lens.__version__,
        "class": type(sae).__name__,
        "cfg": {name: getattr(cfg, name, None) for name in
                ("d_in", "d_sae", "apply_b_dec_to_input", "normalize_activations", "k",
                 "rescale_acts_by_decoder_norm", "dtype")},
        "metadata": {name: getattr(meta, name, None) for name in
                     ("model_name", "hook_name", "context_size", "dataset_path", "prepend_bos",
                      "sae_nb_site", "sae_nb_target_site")},
        "warnings": [{"category": w.category.__name__, "message": str(w.message),
                      "filename": w.filename} for w in caught],
        "logs": handler.records,
    }
    (case / "saelens.json").write_text(json.dumps(report, indent=2, default=repr))
    return type(sae).__name__


def main(folder: str) -> None:
    cases = sorted(p for p in Path(folder).iterdir() if (p / "inputs.safetensors").is_file())
    if not cases:
        raise SystemExit(f"no case folders (with inputs.safetensors) under {folder!r}")
    for case in cases:
        print(f"{case.name}: loaded as {run_case(case)}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
