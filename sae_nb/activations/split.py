"""Split one store into training rows and held-out rows that no training batch ever sees.

The held-out rows are the last whole contexts of the store, so every held-out context can also
be fed to the model for the spliced cross-entropy without it having been trained on.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from sae_nb.activations.store import ActivationStore, StoreError


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

