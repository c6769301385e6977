"""sae_nb: a notebook workbench for dictionary learning on language-model activations."""

from .catalogue import catalogue
from .codes import SentenceCodes, pooled_token_codes, sentence_codes
from .corpora import Corpus, CorpusError, load_corpus
from .dictionary import dictionary_site
from .evaluate import Evaluation, EvaluationError, evaluate_dictionary, fit_check
from .extract import (ExtractConfig, ExtractionError, extract_activations,
                      pooled_activations, run_sites)
from .formats import load_dictionary
from .intervene import InterventionError
from .models import DEFAULT_MODEL, ModelLoadError, load_model
from .saving import (DEFAULT_DICTIONARY, DictionaryFormatError, dictionary_path, folder_files,
                     load_default_dictionary, load_sae_nb, save_dictionary, save_trained,
                     verify_dictionary)
from .sites import SiteError, resolve_site, valid_sites
from .io import write_table
from .split import HeldoutSplit, heldout_split
from .store import ActivationStore, StoreError, open_store, open_stores
from .train import (TrainConfig, TrainingError, TrainResult, checkpoint_dir, dictionary_name,
                    train_dictionary)

__version__ = "0.1.0"

# What notebooks 02-08 use from the heavier modules (widgets, plotting, explanations), on
# ``sae_nb`` too but imported on first use, so ``import sae_nb`` stays light: name -> module.
LAZY = {
    "choose_output_dir": "runs", "choose_run_dir": "runs", "train_on_split": "jobs",
    "probe_features": "probing",
    "FeatureExplorer": "explorer", "latent_order": "explorer", "top_latents": "explorer",
    "feature_stats": "features", "stats_folder": "features",
    "dashboard_path": "dashboard", "dictionary_label": "dashboard",
    "export_dashboards": "dashboard", "SteeringWidget": "steering_widget",
    "best_explanations": "explanations", "explainer_backend": "explanations",
    "explanations_folder": "explanations", "meaning_index": "explanations",
    "merge_explanations": "explanations", "method_comparison": "explanations",
    "method_verdict": "explanations", "sample_latents": "explanations",
    "score_summary": "explanations", "with_explanations": "explanations",
    "rule_explanations": "rules", "llm_explanations": "autointerp",
    "ScoreSettings": "scoring", "detection_scores": "scoring", "embedding_scores": "scoring",
}


def __getattr__(name: str):
    if name in LAZY:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(LAZY))

__all__ = [
    "catalogue", "SentenceCodes", "pooled_token_codes", "sentence_codes", "dictionary_site",
    "EvaluationError", "fit_check", "save_trained", "write_table",
    "ActivationStore", "Corpus", "CorpusError", "DEFAULT_DICTIONARY", "DEFAULT_MODEL",
    "DictionaryFormatError", "load_default_dictionary",
    "Evaluation", "ExtractConfig", "ExtractionError", "HeldoutSplit", "InterventionError",
    "ModelLoadError",
    "SiteError", "StoreError",
    "TrainConfig", "TrainResult", "TrainingError", "checkpoint_dir", "dictionary_name",
    "dictionary_path", "evaluate_dictionary", "extract_activations", "folder_files",
    "heldout_split", "load_corpus", "load_dictionary", "load_model", "load_sae_nb", "open_store",
    "open_stores", "pooled_activations", "resolve_site", "run_sites", "save_dictionary",
    "train_dictionary", "valid_sites", "verify_dictionary",
]
