"""The steps of the training notebook that are more than one library call.

Open one site's store (checking it belongs to the model the evaluation will load), split it
into training rows and held-out rows that no training batch ever sees, name a dictionary, and
find its checkpoint folder, refusing to resume a checkpoint written with other settings.

The held-out rows are the last whole contexts of the store, so every held-out context can also
be fed to the model for the spliced cross-entropy without it having been trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch

from .store import ActivationStore, StoreError, site_dirname, store_folders
from .train import CHECKPOINT, TrainConfig, TrainingError, check_resumable



def open_store(run_dir: str | Path, site: str, model: str | None = None,
               allow_partial: bool = False) -> ActivationStore:
    """The store of ``site`` under ``run_dir/activations``; ``model`` must be the one it holds.

    An incomplete store (an interrupted extraction) is refused unless ``allow_partial``.
    """
    folders = store_folders(run_dir)
    folder = folders.get(site) or next((f for f in folders.values() if f.name == site), None)
    if folder is None:
        raise StoreError(f"No store for site {site!r} under {str(Path(run_dir) / 'activations')!r};"
                         f" it holds {sorted(folders)}. Pick one of those, or add the site to "
                         f"notebook 01's sites and run it again.")
    store = ActivationStore(folder, allow_partial=allow_partial)
    if model is not None and store.manifest["model"] != model:
        raise StoreError(f"The store at {str(store.path)!r} holds activations of model "
                         f"{store.manifest['model']!r}, not {model!r}: the spliced cross-entropy "
                         f"would run the wrong model. Set model to {store.manifest['model']!r}.")
    return store


@dataclass
class HeldoutSplit:
    """Rows ``[0, boundary)`` train; rows ``[boundary, len(store))``, whole contexts, are held out.

    ``ce_contexts`` are the held-out contexts fed to the model for the spliced cross-entropy.
    """

    store: ActivationStore
    boundary: int
    ce_contexts: np.ndarray  # (n,) context ids, each lying wholly in the held-out rows

    @property
    def train_rows(self) -> slice:
        return slice(0, self.boundary)

    @property
    def heldout_rows(self) -> slice:
        return slice(self.boundary, len(self.store))

    @property
    def heldout_acts(self) -> torch.Tensor:
        """``(N_heldout, D)`` float32 activations of the held-out rows."""
        return torch.from_numpy(self.store[self.heldout_rows])

    @property
    def ce_tokens(self) -> torch.Tensor | None:
        """``(n, ctx_len)`` token ids of the cross-entropy contexts; None when there are none."""
        if len(self.ce_contexts) == 0:
            return None
        return torch.from_numpy(self.store.context_tokens(self.ce_contexts))

    @property
    def bos_token_id(self) -> int | None:
        """The BOS id when the store left BOS rows out (a dictionary trained here never sees
        BOS, so a splice keeps those positions clean); None when the store kept BOS rows."""
        m = self.store.manifest
        return m.get("bos_token_id") if m.get("exclude_bos", True) else None

    def train_batches(self, batch_size: int, seed: int = 0) -> Iterator[torch.Tensor]:
        """Endless shuffled ``(batch_size, D)`` batches of the training rows (a fresh order each
        epoch); the trainer stops at its token budget."""
        if not 0 < batch_size <= self.boundary:
            raise StoreError(f"batch_size={batch_size} does not fit the {self.boundary} training "
                             f"rows; lower batch_size or extract more tokens in notebook 01.")
        return self.store.batches(batch_size, shuffle=True, seed=seed, epochs=None,
                                  drop_last=True, rows=self.train_rows)

    def metadata(self, batch_size: int) -> dict[str, Any]:
        """What the training data was, for the train config saved with the dictionary."""
        m = self.store.manifest
        return {"model": m["model"], "site": m["site"], "corpus": m["corpus"],
                "ctx_len": m["ctx_len"], "exclude_bos": m.get("exclude_bos"),
                "bos_token_id": m.get("bos_token_id"), "train_rows": self.boundary,
                "heldout_rows": len(self.store) - self.boundary, "batch_size": batch_size}

    def summary(self) -> pd.DataFrame:
        contexts = self.store.index(slice(None))["context"]
        rows = {"train": self.train_rows, "held out": self.heldout_rows}
        return pd.DataFrame([
            {"split": split, "rows": sl.stop - sl.start,
             "contexts": len(np.unique(contexts[sl])),
             "contexts for CE": len(self.ce_contexts) if split == "held out" else 0}
            for split, sl in rows.items()
        ]).set_index("split")


def heldout_split(store: ActivationStore, heldout_tokens: int, n_contexts: int) -> HeldoutSplit:
    """Hold out the last ``heldout_tokens`` rows, widened to start at a context boundary, and
    pick the first ``n_contexts`` held-out contexts for the cross-entropy (0 for none)."""
    n = len(store)
    if not 0 < heldout_tokens < n:
        raise StoreError(f"heldout_tokens={heldout_tokens} must lie in 1..{n - 1} for a store of "
                         f"{n} rows; lower it or extract more tokens in notebook 01.")
    contexts = store.index(slice(None))["context"]  # stored in context order
    # Move the boundary back to the first row of the context it falls in, so that no context
    # is split between training and held-out rows.
    boundary = int(np.searchsorted(contexts, contexts[n - heldout_tokens], side="left"))
    if boundary == 0:
        raise StoreError(f"heldout_tokens={heldout_tokens} leaves no training rows: the store's "
                         f"{n} rows lie in too few contexts. Lower heldout_tokens.")
    heldout = np.unique(contexts[boundary:])
    if n_contexts > 0 and store.manifest["mode"] != "tokens":
        raise StoreError(f"The store at {str(store.path)!r} is in {store.manifest['mode']!r} "
                         f"mode: it has no token contexts for the cross-entropy. Set ce_contexts "
                         f"to 0.")
    if not 0 <= n_contexts <= len(heldout):
        raise StoreError(f"{n_contexts} cross-entropy contexts asked for, but the held-out rows "
                         f"hold {len(heldout)} whole contexts; raise heldout_tokens or lower "
                         f"ce_contexts.")
    return HeldoutSplit(store, boundary, heldout[:n_contexts])


def dictionary_name(config: TrainConfig, d_in: int) -> str:
    """An automatic name from the architecture, width and sparsity: ``topk_4608_k32``."""
    width = config.width(d_in)
    sparsity = {"topk": f"k{config.k}", "batchtopk": f"k{config.k}",
                "standard": f"l1_{config.l1_coefficient:g}",
                "jumprelu": f"l0_{config.l0_coefficient:g}"}[config.architecture]
    return f"{config.architecture}_{width}_{sparsity}"


def dictionary_path(root: str | Path, model: str, site: str, name: str) -> Path:
    """``root/<model>/<site>/<name>``; a model given as a local folder goes by its folder name."""
    model_dir = Path(model).name if Path(model).is_dir() else model
    return Path(root) / site_dirname(model_dir) / site_dirname(site) / site_dirname(name)


def checkpoint_dir(run_dir: str | Path, name: str, config: TrainConfig) -> str:
    """``run_dir/checkpoints/<name>``, where training resumes from an existing checkpoint.

    Raises when a checkpoint there was written with other settings than ``config``: resuming
    it would mix two runs. Delete the folder, or pick another name.
    """
    folder = Path(run_dir) / "checkpoints" / site_dirname(name)
    file = folder / CHECKPOINT
    if file.exists():  # fail here, before training starts, rather than in train_dictionary
        check_resumable(file, _checkpoint_config(file), config)
    return str(folder)


def _checkpoint_config(file: Path) -> dict:
    """The training config saved in a checkpoint. ``weights_only`` unpickles tensors and plain
    containers only, so a malicious file cannot run code; any unreadable file gets one error."""
    try:
        payload = torch.load(file, weights_only=True, map_location="cpu", mmap=True)
        saved = payload["config"]
        if not isinstance(saved, dict):
            raise TypeError(f"its config is a {type(saved).__name__}, not a dict")
    except Exception as err:  # noqa: BLE001 - truncated, random, foreign or malicious: same fix
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise TrainingError(f"Checkpoint {str(file)!r} cannot be read ({type(err).__name__}: "
                            f"{reason}); it is damaged or not an sae_nb checkpoint. Delete the "
                            f"folder {str(file.parent)!r} to train afresh, or pick another name."
                            ) from None
    return saved


def folder_files(folder: str | Path) -> pd.DataFrame:
    """The files of a folder with their sizes, e.g. a saved dictionary."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file())
    return pd.DataFrame({"file": [p.name for p in files],
                         "KB": [round(p.stat().st_size / 1024, 1) for p in files]})
