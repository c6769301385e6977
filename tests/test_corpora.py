"""Corpora: reading CSV/txt/folders with clear errors, packing contexts, sentence batches."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_documents, make_tokenizer

from sae_nb.activations.corpora import (
    Corpus,
    CorpusError,
    document_separator,
    load_corpus,
    pack_contexts,
    sentence_batches,
)


@pytest.fixture(scope="module")
def tok():
    tokenizer = make_tokenizer(with_bos=True)
    return tokenizer


@pytest.fixture(scope="module")
def eos_only():
    tokenizer = make_tokenizer(with_bos=False)
    tokenizer.pad_token = tokenizer.eos_token  # what load_model does for GPT-2 style tokenizers
    return tokenizer


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- reading --------------------------------------------------------------------------------

def test_csv_txt_and_folder_corpora(tmp_path, sentences_csv):
    corpus = load_corpus(sentences_csv)
    assert corpus.texts == pd.read_csv(sentences_csv)["sentence"].tolist()
    assert corpus.sources[:2] == ["row 0", "row 1"]
    tsv = write(tmp_path, "s.tsv", "label\ttext\n1\tHello, world.\n0\tGoodbye.\n")
    assert load_corpus(tsv, text_column="text").texts == ["Hello, world.", "Goodbye."]
    txt = write(tmp_path, "one.txt", "A single document.\nTwo lines.")
    assert load_corpus(txt).texts == ["A single document.\nTwo lines."]
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    write(folder, "b.txt", "Second.")
    write(folder / "sub", "a.txt", "Nested.")
    write(folder, "ignored.md", "Not a txt.")
    corpus = load_corpus(folder)
    assert corpus.texts == ["Second.", "Nested."] and corpus.sources == ["b.txt", "sub/a.txt"]


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(CorpusError) as err:
        load_corpus(missing)
    assert str(missing) in str(err.value) and "does not exist" in str(err.value)
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus(str(tmp_path / "typo_sotu"))


def test_empty_csv(tmp_path):
    path = write(tmp_path, "empty.csv", "")
    with pytest.raises(CorpusError) as err:
        load_corpus(path)
    assert "empty.csv" in str(err.value) and "is empty" in str(err.value)
    assert "'sentence'" in str(err.value)


def test_header_only_csv(tmp_path):
    path = write(tmp_path, "header.csv", "sentence,label\n")
    with pytest.raises(CorpusError, match="header but no rows"):
        load_corpus(path)


def test_missing_column_lists_the_columns(tmp_path):
    path = write(tmp_path, "cols.csv", "text,label\nHello there.,1\n")
    with pytest.raises(CorpusError) as err:
        load_corpus(path)
    msg = str(err.value)
    assert "no column 'sentence'" in msg and "['text', 'label']" in msg and "text_column=" in msg
    assert load_corpus(path, text_column="text").texts == ["Hello there."]


def test_non_text_rows_are_named_by_file_line(tmp_path):
    path = write(tmp_path, "bad.csv",
                 "id,sentence\n1,Hello there.\n2,42\n3,\n4,   \n5,Fine.\n6,-3.5e2\n")
    with pytest.raises(CorpusError) as err:
        load_corpus(path)
    msg = str(err.value)
    assert "4 row(s)" in msg and "line(s) 3, 4, 5, 7" in msg and "'sentence'" in msg


def test_line_numbers_survive_blank_lines_and_multiline_fields(tmp_path):
    """pandas skips blank lines and quoted fields span lines: the message still names the
    line a user sees in an editor."""
    path = write(tmp_path, "odd.csv", 'sentence\nHello there.\n\n"Two\nlines."\n12\n\nok\n7\n')
    with pytest.raises(CorpusError, match=r"line\(s\) 6, 9\."):
        load_corpus(path)


def test_many_bad_rows_are_abbreviated(tmp_path):
    path = write(tmp_path, "numbers.csv", "sentence\n" + "".join(f"{i}\n" for i in range(15)))
    first_ten = ", ".join(str(line) for line in range(2, 12))
    with pytest.raises(CorpusError, match=rf"15 row\(s\).*line\(s\) {first_ten} \.\.\."):
        load_corpus(path)


def test_empty_text_corpora(tmp_path):
    with pytest.raises(CorpusError, match="holds no text"):
        load_corpus(write(tmp_path, "blank.txt", "  \n\n"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CorpusError, match="holds no .txt files"):
        load_corpus(tmp_path / "empty_dir")


def test_shipped_sentences_csv_loads(models):
    path = Path(__file__).resolve().parents[1] / "data" / "sentences.csv"
    corpus = load_corpus(path)
    assert len(corpus.texts) >= 20 and all(t.strip() for t in corpus.texts)
    batches = list(sentence_batches(corpus.texts, models["llama"].tokenizer, 64))
    assert sum(len(rows) for rows, _, _ in batches) == len(corpus.texts)


# -- document separator -----------------------------------------------------------------------

def test_document_separator_falls_back_to_eos(tok, eos_only):
    assert tok.bos_token_id is not None
    assert document_separator(tok) == tok.bos_token_id
    assert eos_only.bos_token_id is None
    eos = eos_only.convert_tokens_to_ids("<|endoftext|>")
    assert document_separator(eos_only) == eos_only.eos_token_id == eos


def test_document_separator_needs_bos_or_eos():
    tokenizer = make_tokenizer(with_bos=False)
    tokenizer.eos_token = None
    with pytest.raises(CorpusError, match="neither a BOS nor an EOS"):
        document_separator(tokenizer)


def test_eos_only_model_opens_contexts_with_eos(models):
    gpt2 = models["gpt2"]
    assert gpt2.tokenizer.bos_token_id is None
    corpus = Corpus("c", make_documents(6, seed=3), [str(i) for i in range(6)])
    ctx = pack_contexts(corpus, gpt2.tokenizer, 16, 4)
    assert (ctx.tokens[:, 0] == gpt2.tokenizer.eos_token_id).all()


# -- packing ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus() -> Corpus:
    docs = make_documents(12, seed=5)
    return Corpus("docs", docs, [f"d{i}" for i in range(len(docs))])


@pytest.mark.parametrize("prepend_bos", [True, False])
def test_pack_contexts_tracks_every_token(corpus, tok, prepend_bos):
    ctx = pack_contexts(corpus, tok, ctx_len=16, n_contexts=10, seed=1, prepend_bos=prepend_bos)
    sep = tok.bos_token_id
    assert ctx.tokens.shape == ctx.doc.shape == ctx.pos.shape == (10, 16)
    if prepend_bos:
        assert (ctx.tokens[:, 0] == sep).all() and (ctx.doc[:, 0] == -1).all()
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in corpus.texts]
    real = ctx.pos >= 0
    assert ((ctx.tokens == sep) == ~real).all()  # every separator, and only they, have pos -1
    for t, d, p in zip(ctx.tokens[real], ctx.doc[real], ctx.pos[real]):
        assert ids[d][p] == t
    # The contexts (without their openers) are one stream: documents in the seeded order, each
    # after a separator, except the very first, which the first context's opener already opens.
    order = np.random.default_rng(1).permutation(len(corpus.texts))
    stream = np.concatenate([[sep] + ids[d] for d in order])[1 if prepend_bos else 0:]
    body = ctx.tokens[:, 1:] if prepend_bos else ctx.tokens
    np.testing.assert_array_equal(body.ravel(), stream[: body.size])


def test_pack_contexts_is_prefix_stable_and_seeded(corpus, tok):
    few = pack_contexts(corpus, tok, 16, 4, seed=0)
    many = pack_contexts(corpus, tok, 16, 12, seed=0)
    np.testing.assert_array_equal(many.tokens[:4], few.tokens)
    np.testing.assert_array_equal(many.doc[:4], few.doc)
    other = pack_contexts(corpus, tok, 16, 4, seed=1)
    assert not np.array_equal(other.tokens, few.tokens)


def test_pack_contexts_short_corpus(tok, caplog):
    corpus = Corpus("tiny", ["Just a few words here."], ["x"])  # 22 tokens
    with caplog.at_level(logging.WARNING):
        ctx = pack_contexts(corpus, tok, 8, 10)
    assert len(ctx.tokens) == 3  # 22 tokens / 7 per context after the opening BOS
    assert "3 contexts of 8 instead of 10" in caplog.text
    with pytest.raises(CorpusError, match="fewer than one context of ctx_len=64"):
        pack_contexts(corpus, tok, 64, 1)
    with pytest.raises(CorpusError, match="ctx_len=1 is too short"):
        pack_contexts(corpus, tok, 1, 1)


# -- sentence batches -------------------------------------------------------------------------

def test_sentence_batches_pad_right_and_cover_all(tok):
    texts = ["A long sentence with many words in it.", "Hi.", "Medium length one.", "Ok"]
    seen = []
    for rows, ids, mask in sentence_batches(texts, tok, batch_size=3, max_len=64):
        assert ids.shape == mask.shape and ids.shape[0] == len(rows) <= 3
        for j, r in enumerate(rows):
            expected = [tok.bos_token_id] + tok(texts[r], add_special_tokens=False)["input_ids"]
            n = len(expected)
            assert ids[j, :n].tolist() == expected and mask[j, :n].all()
            assert (mask[j, n:] == 0).all() and (ids[j, n:] == tok.pad_token_id).all()
        lengths = mask.sum(1)
        assert (np.diff(lengths) >= 0).all()  # grouped by length
        seen += list(rows)
    assert sorted(seen) == [0, 1, 2, 3]


def test_sentence_batches_truncate_and_keep_order(tok, eos_only):
    texts = ["x" * 50, "short"]
    (rows, ids, mask), = sentence_batches(texts, tok, 8, max_len=10, sort_by_length=False)
    assert rows.tolist() == [0, 1] and ids.shape == (2, 10) and mask[0].sum() == 10
    (rows, ids, mask), = sentence_batches(texts, eos_only, 8, max_len=10, prepend_bos=False)
    assert rows.tolist() == [1, 0] and ids[0, 0] != eos_only.eos_token_id
    assert (ids[0, 5:] == eos_only.eos_token_id).all()  # pad falls back to EOS


def test_sentence_batches_refuse_texts_without_tokens(tok):
    with pytest.raises(CorpusError,
                       match=r"Texts at positions \[1\] \(0-based, of 2\) produce no tokens"):
        list(sentence_batches(["fine", ""], tok, 4))


# -- one CSV text loader behind corpora, probing and clustering ------------------------------

def _loaders():
    from sae_nb.texts import clustering, probing

    return {
        "corpus": lambda p, **kw: load_corpus(p, text_column="text", **kw).texts,
        "probing": lambda p, **kw: probing.load_labeled(p, "text", "label", **kw)["text"].tolist(),
        "clustering": lambda p, **kw: clustering.load_texts(p, "text", "label",
                                                            **kw)["text"].tolist(),
    }


LOADERS = ("corpus", "probing", "clustering")


def raises_corpus_error(load, path, *needles, **kw):
    with pytest.raises(CorpusError) as err:
        load(path, **kw)
    msg = str(err.value)
    for needle in (str(path), *needles):
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


@pytest.mark.parametrize("loader", LOADERS)
def test_csv_non_utf8_bytes_name_file_line_and_encoding(tmp_path, loader):
    load = _loaders()[loader]
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\nA fine day.,a\nCaf\xe9 au lait.,b\n".encode("latin-1"))
    offset = len(b"text,label\nA fine day.,a\nCaf")  # the byte 0xe9
    raises_corpus_error(load, path, "not UTF-8", "line 3", f"byte {offset}", "encoding=")
    assert load(path, encoding="latin-1") == ["A fine day.", "Caf\xe9 au lait."]


@pytest.mark.parametrize("loader", LOADERS)
def test_csv_empty_and_header_only(tmp_path, loader):
    load = _loaders()[loader]
    raises_corpus_error(load, write(tmp_path, "empty.csv", ""), "is empty", "'text'")
    raises_corpus_error(load, write(tmp_path, "blank.csv", "\n  \n"), "is empty")
    raises_corpus_error(load, write(tmp_path, "header.csv", "text,label\n"),
                        "header but no rows")


@pytest.mark.parametrize("loader", LOADERS)
def test_csv_missing_column_lists_the_columns(tmp_path, loader):
    load = _loaders()[loader]
    path = write(tmp_path, "cols.csv", "sentence,topic\nHello there.,a\nBye now.,b\n")
    raises_corpus_error(load, path, "'text'", "['sentence', 'topic']", "_column=")


@pytest.mark.parametrize("loader", LOADERS)
def test_csv_blank_and_number_rows_named_by_file_line(tmp_path, loader):
    load = _loaders()[loader]
    path = write(tmp_path, "rows.csv", 'text,label\nHello there.,a\n,b\n"   ",a\nFine.,b\n'
                                       '42,a\n"Two\nlines.",b\nok,a\n')
    msg = raises_corpus_error(load, path, "3 row(s)", "line(s) 3, 4, 6.")
    assert "row 1" not in msg and "[1" not in msg  # file lines, not 0-based indices
    good = write(tmp_path, "good.csv", 'text,label\nHello there.,a\n"Two\nlines.",b\n'
                                       'ok,a\nfine,b\n')
    assert load(good) == ["Hello there.", "Two\nlines.", "ok", "fine"]


@pytest.mark.parametrize("loader", ("probing", "clustering"))
def test_csv_missing_labels_named_by_file_line(tmp_path, loader):
    load = _loaders()[loader]
    path = write(tmp_path, "labels.csv", "text,label\nHello there.,a\nBye.,\nOk.,b\nNo.,\n")
    raises_corpus_error(load, path, "2 row(s)", "'label'", "line(s) 3, 5.")


def test_token_strings_decode_each_token_alone(tok, eos_only):
    from sae_nb.activations.corpora import token_strings

    for tokenizer in (tok, eos_only):
        ids = tokenizer(" a\nb", add_special_tokens=False)["input_ids"]  # byte tokens
        assert token_strings(tokenizer, np.asarray(ids)) == [" ", "a", "\n", "b"]
        assert token_strings(tokenizer, []) == []
    assert token_strings(tok, [tok.bos_token_id]) == ["<bos>"]


def test_token_labels_show_a_character_fragment_as_its_bytes(tok):
    from sae_nb.activations.corpora import token_labels, token_strings

    ids = tok("é→ a", add_special_tokens=False)["input_ids"]  # one token per byte
    assert token_strings(tok, ids)[:5] == ["\ufffd"] * 5  # what a logit table showed
    expected = [f"\\x{b:02x}" for b in "é→".encode()] + [" ", "a"]
    assert token_labels(tok, ids) == expected
    assert token_labels(tok, [tok.bos_token_id]) == ["<bos>"]

    class SentencePiece:  # byte-fallback tokens are spelled <0xNN> in the vocabulary
        def batch_decode(self, ids):
            return ["\ufffd" for _ in ids]

        def convert_ids_to_tokens(self, token_id):
            return {5: "<0xE2>", 6: "▁odd"}[token_id]

    assert token_labels(SentencePiece(), [5, 6]) == ["\\xe2", "\ufffd"]  # unknown: kept
