"""sae_nb: a notebook workbench for dictionary learning on language-model activations."""

from .corpora import Corpus, CorpusError, load_corpus
from .extract import ExtractConfig, extract_activations, pooled_activations, run_sites
from .models import DEFAULT_MODEL, ModelLoadError, load_model
from .sites import SiteError, resolve_site, valid_sites
from .store import ActivationStore, StoreError, open_stores

__version__ = "0.1.0"

__all__ = [
    "ActivationStore", "Corpus", "CorpusError", "DEFAULT_MODEL", "ExtractConfig",
    "ModelLoadError", "SiteError", "StoreError", "extract_activations", "load_corpus",
    "load_model", "open_stores", "pooled_activations", "resolve_site", "run_sites", "valid_sites",
]
