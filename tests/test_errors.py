"""One error family: every error class the package defines derives from ``SaeNbError`` and keeps
the builtin base it had before the family existed, so ``except ValueError`` still catches it."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import sae_nb
from sae_nb.util.errors import SaeNbError

# The builtin base of each error class, as each was declared before the family was introduced.
BUILTIN_BASE = {
    "CorpusError": ValueError, "ExtractionError": ValueError, "ModelLoadError": RuntimeError,
    "ShardError": RuntimeError, "SiteError": ValueError, "StoreError": RuntimeError,
    "CompareError": ValueError, "LabError": ValueError, "UncertaintyError": ValueError,
    "DictionaryFormatError": ValueError, "BackendError": RuntimeError, "RuleError": ValueError,
    "ExplanationError": ValueError, "InterventionError": ValueError, "FamilyError": ValueError,
    "FeatureStatsError": RuntimeError, "JobError": ValueError, "PipelineError": RuntimeError,
    "SweepError": RuntimeError, "ClusteringError": ValueError, "LabelError": ValueError,
    "DistributedError": ValueError, "EvaluationError": ValueError, "StreamError": ValueError,
    "TrainingError": ValueError, "LockHeld": OSError, "CircuitError": ValueError,
}


def package_exceptions() -> dict[str, type]:
    found = {}
    for info in pkgutil.walk_packages(sae_nb.__path__, "sae_nb."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException)
                    and obj.__module__ == module.__name__):
                found[name] = obj
    return found


def test_every_package_error_is_a_sae_nb_error_with_its_builtin_base():
    found = package_exceptions()
    assert set(found) == set(BUILTIN_BASE) | {"SaeNbError"}, set(found) ^ set(BUILTIN_BASE)
    wrong = [n for n, cls in found.items() if n != "SaeNbError" and not (
        issubclass(cls, SaeNbError) and issubclass(cls, BUILTIN_BASE[n]))]
    assert not wrong, wrong
    assert sae_nb.SaeNbError is SaeNbError


def test_a_notebook_catches_every_error_with_one_except(tmp_path):
    """Three errors from three folders, raised by real calls on bad input, caught as one family
    and as their builtin bases, with their messages intact."""
    with pytest.raises(SaeNbError, match="missing.csv' does not exist"):
        sae_nb.load_corpus(tmp_path / "missing.csv")
    with pytest.raises(RuntimeError) as raised:
        sae_nb.open_store(tmp_path / "nothing here", "resid_out_layer3")
    assert isinstance(raised.value, SaeNbError) and "nothing here" in str(raised.value)
    with pytest.raises(SaeNbError) as raised:
        sae_nb.load_sae_nb(tmp_path)
    assert isinstance(raised.value, ValueError) and str(tmp_path) in str(raised.value)
