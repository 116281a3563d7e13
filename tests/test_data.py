"""Corpora: the embedded default corpus, reading each file type, the held-out split, bad input."""

from __future__ import annotations

import builtins
import json
import sys
from pathlib import Path

import pytest

from longcat.data import DataError, embedded_corpus, is_heldout, iter_documents, open_corpus, parse_size
from longcat.data import corpus as corpus_module

# --- embedded corpus ---------------------------------------------------------------------------------


def test_embedded_corpus_is_deterministic_and_has_no_tests():
    corpus = embedded_corpus()
    keys = [f.key for f in corpus.files]
    assert keys == sorted(keys)
    assert len(keys) > 300 and all(k.startswith("stdlib/") and k.endswith(".py") for k in keys)
    for key in keys:
        parts = key.split("/")[1:-1]
        assert not {"test", "tests", "idle_test", "site-packages"} & set(parts), key
    assert "stdlib/pydoc_data/topics.py" not in keys  # read as English topics instead
    assert "stdlib/argparse.py" in keys

    # Read only the first ~1.5 MB: the help topics, then the first library files.
    first = [d.key for d in corpus.documents(max_bytes=1_500_000)]
    second = [d.key for d in embedded_corpus().documents(max_bytes=1_500_000)]
    assert first == second
    assert first[0].startswith("pydoc_topics/") and any(k.startswith("stdlib/") for k in first)
    texts = list(iter_documents(None, max_bytes=600_000))
    assert texts == list(iter_documents(None, max_bytes=600_000))
    assert any("assert" in t for t in texts)


def test_embedded_corpus_heldout_split_is_small_and_disjoint():
    keys = [f.key for f in embedded_corpus().files]
    heldout = {k for k in keys if is_heldout(k)}
    assert 0.005 < len(heldout) / len(keys) < 0.04
    # iter_documents applies the same rule, and the two splits partition the documents.
    limit = 4_000_000
    docs = list(embedded_corpus().documents(max_bytes=limit))
    held = list(iter_documents(None, split="heldout", max_bytes=limit))
    train = list(iter_documents(None, split="train", max_bytes=limit))
    assert held == [d.text for d in docs if d.heldout] and held
    assert train == [d.text for d in docs if not d.heldout]
    assert len(train) + len(held) == len(docs)
    with pytest.raises(DataError, match="split must be one of"):
        iter_documents(None, split="validation")


# --- reading files -----------------------------------------------------------------------------------


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def test_folder_of_text_files_in_sorted_order(tmp_path):
    write(tmp_path / "b.txt", "bee\n")
    write(tmp_path / "a" / "z.md", "# heading\n")
    write(tmp_path / "a.py", "print('a')\n")
    write(tmp_path / "c.jsonl", '{"text": "one"}\n\n{"text": null}\n{"text": "two", "id": 3}\n')
    write(tmp_path / "blank.txt", "   \n\n")  # whitespace only: no document
    write(tmp_path / "notes.csv", "x,y\n")  # unsupported: ignored
    write(tmp_path / ".hidden" / "secret.txt", "hidden\n")  # hidden folder: ignored
    write(tmp_path / "bom.txt", "\ufeffwith bom\n".encode("utf-8"))
    corpus = open_corpus(tmp_path)
    docs = list(corpus.documents())
    assert [d.key for d in docs] == ["a.py", "a/z.md", "b.txt", "bom.txt", "c.jsonl#1", "c.jsonl#4"]
    assert [d.text for d in docs] == ["print('a')\n", "# heading\n", "bee\n", "with bom\n", "one", "two"]
    assert list(iter_documents(tmp_path / "c.jsonl")) == ["one", "two"]


def test_jsonl_with_another_text_field(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"content": "alpha"}\n{"content": "beta"}\n')
    assert list(iter_documents(path, text_field="content")) == ["alpha", "beta"]


def test_large_text_file_is_cut_at_blank_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_module, "DOCUMENT_CHUNK_BYTES", 100)
    monkeypatch.setattr(corpus_module, "DOCUMENT_HARD_LIMIT_BYTES", 400)
    paragraphs = [f"paragraph {i} " + "word " * 12 + "\n" for i in range(20)]
    content = "\n".join(paragraphs) + "x" * 30 + "\n" + "y" * 500 + "\n"
    path = write(tmp_path / "big.txt", content)
    docs = list(open_corpus(path).documents())
    assert len(docs) > 3
    assert "".join(d.text for d in docs) == content  # nothing lost, nothing added
    assert docs[0].key == "big.txt" and docs[1].key == "big.txt#1"
    assert all(d.text.endswith("\n\n") for d in docs[:-2])  # cut at blank lines while there are some
    assert [d.text for d in docs] == [d.text for d in open_corpus(path).documents()]


def test_parquet_by_row_groups(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"body": ["first", None, "second", "third", "  "], "n": [1, 2, 3, 4, 5]})
    path = tmp_path / "d.parquet"
    pq.write_table(table, path, row_group_size=2)
    assert pq.ParquetFile(path).num_row_groups == 3
    docs = list(open_corpus(path, text_field="body").documents())
    assert [(d.key, d.text) for d in docs] == [("d.parquet#0", "first"), ("d.parquet#2", "second"),
                                                ("d.parquet#3", "third")]
    with pytest.raises(DataError, match=r"no column 'text'.*'body'.*--text-field"):
        list(iter_documents(path))
    with pytest.raises(DataError, match=r"column 'n' has type int64, not string"):
        list(iter_documents(path, text_field="n"))


def test_heldout_split_of_a_folder(tmp_path):
    for i in range(300):
        write(tmp_path / f"doc{i:03d}.txt", f"document number {i}\n")
    keys = [d.key for d in open_corpus(tmp_path).documents()]
    held = list(iter_documents(tmp_path, split="heldout"))
    train = list(iter_documents(tmp_path, split="train"))
    assert 0 < len(held) < 15
    assert sorted(held + train) == sorted(iter_documents(tmp_path))
    assert held == [f"document number {int(k[3:6])}\n" for k in keys if is_heldout(k)]


def test_max_bytes_stops_early(tmp_path):
    for i in range(10):
        write(tmp_path / f"{i}.txt", "x" * 100)
    assert len(list(iter_documents(tmp_path, max_bytes=250))) == 3  # passes the limit by at most one document
    assert len(list(iter_documents(tmp_path))) == 10


# --- bad input ---------------------------------------------------------------------------------------


def test_missing_and_empty_paths(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        iter_documents(tmp_path / "nope")
    with pytest.raises(DataError, match="is empty"):
        iter_documents(write(tmp_path / "empty.txt", ""))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match=r"has no \.txt.*files \(it is empty\)"):
        iter_documents(tmp_path / "empty_dir")
    write(tmp_path / "other" / "a.csv", "1,2\n")
    write(tmp_path / "other" / "b.json", "{}")
    with pytest.raises(DataError, match=r"found only: \.csv, \.json"):
        iter_documents(tmp_path / "other")
    with pytest.raises(DataError, match="not a supported data file"):
        iter_documents(tmp_path / "other" / "a.csv")
    write(tmp_path / "zeros" / "a.txt", "")
    with pytest.raises(DataError, match="only empty files"):
        iter_documents(tmp_path / "zeros")
    write(tmp_path / "blank" / "a.txt", "  \n\n")
    with pytest.raises(DataError, match="holds no text"):
        list(iter_documents(tmp_path / "blank"))


def test_unreadable_file(tmp_path, monkeypatch):
    path = write(tmp_path / "locked.txt", "secret\n")
    real_open = builtins.open

    def open_denied(file, *args, **kwargs):  # root ignores chmod 000, so deny the read here
        if Path(file) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_denied)
    with pytest.raises(DataError, match=r"cannot read .*locked\.txt: permission denied"):
        list(iter_documents(tmp_path))


def test_invalid_utf8_names_file_and_offset(tmp_path, monkeypatch):
    path = write(tmp_path / "bad.txt", b"good line\nabc\xff\xfedef\n")
    with pytest.raises(DataError, match=r"bad\.txt is not valid UTF-8: byte 0xff at byte offset 13"):
        list(iter_documents(path))
    # The same offset when the file is read line by line (large files).
    monkeypatch.setattr(corpus_module, "DOCUMENT_CHUNK_BYTES", 4)
    with pytest.raises(DataError, match=r"byte 0xff at byte offset 13"):
        list(iter_documents(path))
    jsonl = write(tmp_path / "bad.jsonl", b'{"text": "ok"}\n{"text": "\xc3"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl is not valid UTF-8: byte 0xc3 at byte offset 25"):
        list(iter_documents(jsonl))


def test_bad_jsonl_lines(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid JSON"):
        list(iter_documents(path))
    path = write(tmp_path / "e.jsonl", '{"text": "ok"}\n\n{"body": "x", "id": 1}\n')
    with pytest.raises(DataError, match=r"e\.jsonl:3: no field 'text' \(fields: 'body', 'id'\).*--text-field"):
        list(iter_documents(path))
    path = write(tmp_path / "f.jsonl", '["a", "b"]\n')
    with pytest.raises(DataError, match=r"f\.jsonl:1: expected a JSON object with a 'text' field, got a JSON list"):
        list(iter_documents(path))
    path = write(tmp_path / "g.jsonl", json.dumps({"text": 5}) + "\n")
    with pytest.raises(DataError, match=r"g\.jsonl:1: field 'text' is a int, not a string"):
        list(iter_documents(path))


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    path = write(tmp_path / "d.parquet", b"PAR1 not really")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"d\.parquet is a Parquet file, but pyarrow is not installed"):
        iter_documents(tmp_path)


def test_parse_size():
    assert parse_size("20M") == 20_000_000
    assert parse_size("512KiB") == 512 * 1024
    assert parse_size("1.5mb") == 1_500_000
    assert parse_size("1234") == 1234
    with pytest.raises(DataError, match="cannot read 'lots'"):
        parse_size("lots")
