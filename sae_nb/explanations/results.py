"""The results cache of the language-model explainer and its scorers: one JSON-lines file per
kind of result and per identity, so that one explainer's results never replace another's.

A folder (``run_dir/explanations/<dictionary>/``) holds, for each kind (``"llm"``,
``"detection"``, ``"embedding"`` ...) and each identity (the dictionary, the store, the
backend and the settings, a JSON object), the records ``<kind>.<digest>.jsonl`` and the
identity itself ``<kind>.<digest>.identity.json``, the digest being the identity's short
sha256. Rerunning with another explainer opens another pair; going back to the first finds its
results again. ``<kind>.current.json`` names the file used last, the one
:func:`current_results` (and so :func:`sae_nb.explanations.tables.load_explanations`) reads.

Damage is handled as a cache should: a line that is not a record (a killed run's half line, a
hand edit, a foreign file) is skipped, with a warning naming the file and the line, and its
result is computed again; nothing is deleted. A damaged identity file is an error
(:class:`ExplanationError`): without it the records cannot be vouched for, and the user
decides.
Earlier versions kept one ``<kind>.jsonl`` with ``<kind>.identity.json``; such a pair whose
identity is the one asked for is renamed to the new names, any other is left as it is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from sae_nb.util.errors import SaeNbError
from sae_nb.util.io import atomic_write_json

log = logging.getLogger(__name__)

COLUMNS = ("latent", "method", "explanation", "score", "score_name", "error")
DIGEST_CHARS = 12  # hex digits of an identity's sha256 in its files' names
JSON_TYPES = {list: "an array", dict: "an object", str: "a string", int: "a number",
              float: "a number", bool: "a boolean", type(None): "null"}


class ExplanationError(SaeNbError, ValueError):
    """A table that breaks the explanation-table contract, a damaged cache key, or a missing
    embedding model (the explanations folder's error; also importable from
    :mod:`sae_nb.explanations.tables`)."""


def identity_digest(identity: dict) -> str:
    """The short sha256 of an identity (its JSON with sorted keys) that names its files."""
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_CHARS]


def record_problem(record, key: bool = True) -> str:
    """Why a parsed line is not a result record ("" when it is one): a JSON object with the
    table's columns (``latent`` an integer, ``score`` a number or null, the others strings)
    and, with ``key``, a string ``key``."""
    if not isinstance(record, dict):
        return f"it is {JSON_TYPES.get(type(record), 'not an object')}, not an object"
    need = (("key",) if key else ()) + COLUMNS
    missing = [c for c in need if c not in record]
    if missing:
        return f"it has no {', '.join(missing)}"
    if key and not isinstance(record["key"], str):
        return "its key is not a string"
    if isinstance(record["latent"], bool) or not isinstance(record["latent"], int):
        return "its latent is not an integer"
    score = record["score"]
    if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
        return "its score is not a number"
    bad = [c for c in ("method", "explanation", "score_name", "error")
           if not isinstance(record[c], str)]
    return f"its {', '.join(bad)} not text" if bad else ""


def read_result_lines(path: str | Path, key: bool = True) -> list[dict]:
    """The records of a JSON-lines results file, in order. A line that is not a record
    (:func:`record_problem`) is skipped with a warning naming the file and the line; a half
    written last line (a killed run) quietly."""
    path = Path(path)
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines) and not text.endswith("\n"):
                continue  # a line a killed run left half written
            record, why = None, "it is not JSON"
        else:
            why = record_problem(record, key)
        if why:
            log.warning("%s, line %d is not a result record (%s): skipped, and its result is "
                        "computed again (delete the line to silence this).", path, number, why)
            continue
        records.append(record)
    return records


def read_identity(path: Path, records: Path) -> dict:
    """The identity saved in ``path``; an :class:`ExplanationError` naming the fix when
    damaged."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        saved, why = None, f"{type(err).__name__}: {err}"
    else:
        why = "" if isinstance(saved, dict) else f"it holds {JSON_TYPES.get(type(saved))}"
    if why:
        raise ExplanationError(
            f"Cannot read the identity file {str(path)!r} ({why}): it says what the results "
            f"{records.name!r} beside it were computed from. Delete it to have it written again "
            f"(those results are named by the identity's digest and are kept), or delete both "
            f"files to compute the results afresh.")
    return saved


class ResultLog:
    """Finished records of one kind and identity in a folder, one JSON line each, appended and
    flushed as each finishes (see the module). The last record of a key wins (a retried
    failure replaces the failure)."""

    def __init__(self, folder: str | Path, kind: str, identity: dict):
        folder = Path(folder)
        identity = json.loads(json.dumps(identity))
        name = f"{kind}.{identity_digest(identity)}"
        self.path = folder / f"{name}.jsonl"
        self.identity_path = folder / f"{name}.identity.json"
        self.records: dict[str, dict] = {}
        folder.mkdir(parents=True, exist_ok=True)
        if self.identity_path.exists():
            saved = read_identity(self.identity_path, self.path)
            if saved != identity:
                raise ExplanationError(
                    f"The identity file {str(self.identity_path)!r} holds another identity than "
                    f"the one its name's digest was made from (edited or copied), so the "
                    f"results {self.path.name!r} beside it cannot be vouched for: delete both "
                    f"files to compute them afresh.")
        else:
            self._adopt_old_pair(folder, kind, identity)
            atomic_write_json(self.identity_path, identity)
        if self.path.exists():
            self._drop_torn_line()
            self.records = {r["key"]: r for r in read_result_lines(self.path)}
        atomic_write_json(folder / f"{kind}.current.json", {"results": self.path.name})

    def _adopt_old_pair(self, folder: Path, kind: str, identity: dict) -> None:
        """An earlier version's ``<kind>.jsonl`` of this identity takes the new name."""
        old, old_key = folder / f"{kind}.jsonl", folder / f"{kind}.identity.json"
        if self.path.exists() or not (old.exists() and old_key.exists()):
            return
        try:
            same = json.loads(old_key.read_text(encoding="utf-8")) == identity
        except (OSError, ValueError):
            return  # not ours to judge: left as it is
        if same:
            os.replace(old, self.path)
            old_key.unlink()

    def _drop_torn_line(self) -> None:
        """Cut a last line that a killed run left half written, so that the next record does
        not start on it."""
        data = self.path.read_bytes()
        if not data or data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        try:
            json.loads(data[keep:])
        except ValueError:
            log.info("%s: removing a last line that a killed run left half written.", self.path)
            os.truncate(self.path, keep)
        else:  # a whole last line without its newline (a hand edit): only the newline is added
            with open(self.path, "ab") as f:
                f.write(b"\n")

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def append(self, record: dict) -> None:
        line = json.dumps(record, allow_nan=True) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.records[record["key"]] = record


def current_results(folder: str | Path) -> list[Path]:
    """Per kind, the results file to read in ``folder``: the one ``<kind>.current.json`` names
    (the run used last), else the most recently written one (an earlier version's
    ``<kind>.jsonl``, a hand-made file)."""
    folder = Path(folder)
    kinds: dict[str, list[Path]] = {}
    for path in sorted(folder.glob("*.jsonl")):
        kinds.setdefault(path.name.split(".")[0], []).append(path)
    chosen = []
    for kind, paths in sorted(kinds.items()):
        named = _named_current(folder, kind)
        if named is not None and named in paths:
            chosen.append(named)
        else:
            chosen.append(max(paths, key=lambda p: p.stat().st_mtime_ns))
    return chosen


def _named_current(folder: Path, kind: str) -> Path | None:
    pointer = folder / f"{kind}.current.json"
    if not pointer.exists():
        return None
    try:
        name = json.loads(pointer.read_text(encoding="utf-8"))["results"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("Cannot read %s (%s); reading the newest %s results instead.", pointer, err,
                    kind)
        return None
    return folder / name if isinstance(name, str) and name == Path(name).name else None
