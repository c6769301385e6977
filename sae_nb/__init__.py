"""sae_nb: a notebook workbench for dictionary learning on language-model activations."""

from sae_nb.activations.corpora import Corpus, CorpusError, load_corpus
from sae_nb.activations.extract import (
    ExtractConfig,
    ExtractionError,
    extract_activations,
    pooled_activations,
    run_sites,
)
from sae_nb.activations.models import DEFAULT_MODEL, ModelLoadError, load_model
from sae_nb.activations.sites import SiteError, resolve_site, valid_sites
from sae_nb.activations.split import HeldoutSplit, heldout_split
from sae_nb.activations.store import ActivationStore, StoreError, open_store, open_stores
from sae_nb.dictionaries.architectures import dictionary_site
from sae_nb.dictionaries.catalogue import catalogue
from sae_nb.dictionaries.formats import load_dictionary
from sae_nb.dictionaries.saving import (
    DEFAULT_DICTIONARY,
    DictionaryFormatError,
    dictionary_path,
    folder_files,
    load_default_dictionary,
    load_sae_nb,
    save_dictionary,
    save_trained,
    verify_dictionary,
)
from sae_nb.interventions.splice import InterventionError
from sae_nb.texts.codes import SentenceCodes, pooled_token_codes, sentence_codes
from sae_nb.training.evaluate import Evaluation, EvaluationError, evaluate_dictionary, fit_check
from sae_nb.training.trainer import (
    TrainConfig,
    TrainingError,
    TrainResult,
    checkpoint_dir,
    dictionary_name,
    train_dictionary,
)
from sae_nb.util.errors import SaeNbError
from sae_nb.util.io import write_table

__version__ = "0.1.0"

# What notebooks 02-08 use from the heavier modules (widgets, plotting, explanations), on
# ``sae_nb`` too but imported on first use, so ``import sae_nb`` stays light: name -> module.
LAZY = {
    "choose_output_dir": "running.run_dir", "choose_run_dir": "running.run_dir",
    "train_on_split": "running.jobs",
    "probe_features": "texts.probing",
    "FeatureExplorer": "views.explorer", "latent_order": "views.explorer",
    "top_latents": "views.explorer",
    "feature_stats": "latents.stats", "logit_effects": "latents.logit_effects",
    "stats_folder": "latents.stats",
    "dashboard_path": "views.dashboard", "dictionary_label": "views.dashboard",
    "export_dashboards": "views.dashboard", "SteeringWidget": "views.steering_widget",
    "best_explanations": "explanations.tables", "explainer_backend": "explanations.tables",
    "explanations_folder": "explanations.tables", "meaning_index": "explanations.meaning",
    "merge_explanations": "explanations.tables", "method_comparison": "explanations.tables",
    "method_verdict": "explanations.tables", "sample_latents": "explanations.tables",
    "score_summary": "explanations.tables", "with_explanations": "explanations.tables",
    "rule_explanations": "explanations.rules", "llm_explanations": "explanations.autointerp",
    "ScoreSettings": "explanations.scoring", "detection_scores": "explanations.scoring",
    "embedding_scores": "explanations.scoring",
}


def __getattr__(name: str):
    if name in LAZY:
        # here, not at the top: there it would join the names dir(sae_nb) offers a notebook
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(LAZY))


__all__ = [
    "SaeNbError",
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
