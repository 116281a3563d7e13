"""Text corpora: the embedded default corpus and user data in .txt/.md/.py/.jsonl/.parquet files.

A corpus is an ordered list of source files. Reading it yields documents, one at a time, in a
fixed order (sorted relative paths), so two reads of the same files give the same documents in the
same order. Nothing is loaded whole: plain-text files are read line by line, JSON Lines line by
line and Parquet one row group at a time.

What one document is:
- .txt, .md, .py: one file. A file over `DOCUMENT_CHUNK_BYTES` is cut into several documents at a
  blank line once the current one has reached that size (so a single large text file still
  streams, and still has documents to hold out).
- .jsonl: one line, the string in its text field (default "text"); blank lines and null values
  are skipped.
- .parquet: one row of the text column (needs pyarrow).

Every document has a key that names it (relative path, plus "#n" for the n-th document of a file);
the held-out split is a hash of that key (`is_heldout`), so it does not depend on the order of
reading or on which other files are in the corpus.

The embedded default corpus needs no download: the English text of the running Python's
`pydoc_data.topics` (each help topic one document), then the *.py sources of its standard library
(`sysconfig.get_paths()["stdlib"]`) without test folders, site-packages and pydoc_data itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import DataError

PLAIN_TEXT_SUFFIXES = (".txt", ".md", ".py")
SUPPORTED_SUFFIXES = PLAIN_TEXT_SUFFIXES + (".jsonl", ".parquet")

# A plain-text file larger than this is cut into documents of about this size (at blank lines).
DOCUMENT_CHUNK_BYTES = 1 << 20
# With no blank line in sight, cut at any line end once a document is this large.
DOCUMENT_HARD_LIMIT_BYTES = 4 * DOCUMENT_CHUNK_BYTES

# Held out: a document whose key hashes to 0 modulo 64 (about 1.6% of the documents).
HELDOUT_MODULUS = 64
SPLIT_RULE = f"blake2b-64(key) % {HELDOUT_MODULUS} == 0 (v1)"
SPLITS = ("all", "train", "heldout")

# Folders of the standard library that are tests or third-party code, not library source.
EMBEDDED_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
# pydoc_data/topics.py is a dict literal of the help text we already read as English documents.
EMBEDDED_EXCLUDED_FILES = frozenset({"pydoc_data/topics.py"})

UTF8_BOM = b"\xef\xbb\xbf"


def is_heldout(key: str) -> bool:
    """The split rule: True for the held-out documents (about 1 in HELDOUT_MODULUS)."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % HELDOUT_MODULUS == 0


@dataclasses.dataclass(frozen=True)
class Document:
    text: str
    key: str  # stable name: relative path, plus "#n" for the n-th document of a file

    @property
    def heldout(self) -> bool:
        return is_heldout(self.key)


@dataclasses.dataclass(frozen=True)
class SourceFile:
    path: Path
    key: str  # path relative to the corpus root, with forward slashes
    size: int
    mtime_ns: int

    @property
    def suffix(self) -> str:
        return self.path.suffix.lower()


class Corpus:
    """An ordered list of source files (plus, for the embedded corpus, the pydoc help topics)."""

    def __init__(self, files: list[SourceFile], *, text_field: str = "text", description: str,
                 with_pydoc_topics: bool = False) -> None:
        self.files = files
        self.text_field = text_field
        self.description = description
        self.with_pydoc_topics = with_pydoc_topics

    @property
    def estimated_bytes(self) -> int:
        """Total size of the source files: the text size for plain files, an upper bound otherwise."""
        topics = sum(len(t.encode("utf-8")) for t in _pydoc_topics().values()) if self.with_pydoc_topics else 0
        return topics + sum(f.size for f in self.files)

    def fingerprint(self) -> dict:
        """What the documents depend on, for cache keys: every file's key, size and mtime."""
        fp: dict = {
            "description": self.description,
            "text_field": self.text_field,
            "files": [[f.key, f.size, f.mtime_ns] for f in self.files],
            "split_rule": SPLIT_RULE,
            "chunk_bytes": DOCUMENT_CHUNK_BYTES,
        }
        if self.with_pydoc_topics:
            blob = json.dumps(sorted(_pydoc_topics().items()), ensure_ascii=False).encode("utf-8")
            fp["pydoc_topics_sha256"] = hashlib.sha256(blob).hexdigest()
        return fp

    def documents(self, *, max_bytes: int | None = None) -> Iterator[Document]:
        """All documents in order. With max_bytes, stop before the first document that starts after
        max_bytes UTF-8 bytes of text have been read (so the limit is passed by at most one document)."""
        seen_bytes = 0
        count = 0
        for doc in self._all_documents():
            if max_bytes is not None and seen_bytes >= max_bytes:
                return
            seen_bytes += len(doc.text.encode("utf-8"))
            count += 1
            yield doc
        if count == 0:
            raise DataError(f"{self.description} holds no text (every supported file is empty or blank)")

    def _all_documents(self) -> Iterator[Document]:
        if self.with_pydoc_topics:
            for name, text in sorted(_pydoc_topics().items()):
                if text.strip():
                    yield Document(text, f"pydoc_topics/{name}")
        for source in self.files:
            if source.suffix in PLAIN_TEXT_SUFFIXES:
                yield from _read_plain_text(source)
            elif source.suffix == ".jsonl":
                yield from _read_jsonl(source, self.text_field)
            elif source.suffix == ".parquet":
                yield from _read_parquet(source, self.text_field)


def iter_documents(path: str | os.PathLike | None, *, text_field: str = "text", split: str = "all",
                   max_bytes: int | None = None) -> Iterator[str]:
    """The texts of a corpus in a fixed order. path None reads the embedded default corpus.

    split: "all", "train" (documents not held out) or "heldout" (see `is_heldout`).
    max_bytes: stop reading after about this many bytes of text (counted over all splits).
    """
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    corpus = open_corpus(path, text_field=text_field)  # checks the path now, not at the first next()
    want_heldout = split == "heldout"
    return (doc.text for doc in corpus.documents(max_bytes=max_bytes)
            if split == "all" or doc.heldout == want_heldout)


def open_corpus(path: str | os.PathLike | None, *, text_field: str = "text") -> Corpus:
    """Check a data path and list its files (sorted); path None is the embedded default corpus.
    Raises DataError for a missing or empty path, or a folder with no supported files."""
    if path is None:
        return embedded_corpus()
    if not text_field:
        raise DataError("the text field name is empty; pass --text-field NAME (default: text)")
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"data path {str(root)!r} does not exist; pass a file or folder of "
                        f"{', '.join(SUPPORTED_SUFFIXES)} files, or leave --data out for the embedded corpus")
    if root.is_file():
        if root.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise DataError(f"{root} is not a supported data file; use a file or folder of "
                            f"{', '.join(SUPPORTED_SUFFIXES)} files")
        files = [_source_file(root, root.name)]
        if files[0].size == 0:
            raise DataError(f"data file {root} is empty")
        description = f"data file {root}"
    elif root.is_dir():
        files, other_suffixes = _list_folder(root, excluded_dirs=frozenset({"__pycache__"}))
        if not files:
            found = f" (found only: {', '.join(sorted(other_suffixes))})" if other_suffixes else " (it is empty)"
            raise DataError(f"data folder {root} has no {', '.join(SUPPORTED_SUFFIXES)} files{found}")
        if all(f.size == 0 for f in files):
            raise DataError(f"data folder {root} has only empty files")
        description = f"data folder {root}"
    else:
        raise DataError(f"data path {root} is neither a file nor a folder")
    if any(f.suffix == ".parquet" for f in files):
        _require_pyarrow(next(f.path for f in files if f.suffix == ".parquet"))
    return Corpus(files, text_field=text_field, description=description)


def embedded_corpus() -> Corpus:
    """The running Python's pydoc help topics and standard-library sources (no download)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if not stdlib.is_dir():
        raise DataError(f"the Python standard library folder {stdlib} is missing, so the embedded corpus "
                        "is unavailable; pass --data PATH")
    files, _ = _list_folder(stdlib, excluded_dirs=EMBEDDED_EXCLUDED_DIRS, suffixes=(".py",))
    files = [f for f in files if f.key not in EMBEDDED_EXCLUDED_FILES]
    # Keys start with "stdlib/" so they never collide with the pydoc topic keys.
    files = [dataclasses.replace(f, key=f"stdlib/{f.key}") for f in files]
    version = ".".join(map(str, sys.version_info[:3]))
    return Corpus(files, description=f"embedded corpus (Python {version} standard library and help topics)",
                  with_pydoc_topics=True)


# --- listing ----------------------------------------------------------------------------------------


def _list_folder(root: Path, *, excluded_dirs: frozenset[str],
                 suffixes: tuple[str, ...] = SUPPORTED_SUFFIXES) -> tuple[list[SourceFile], set[str]]:
    """Supported files under root, sorted by relative path; hidden files and folders are skipped.
    Also returns the other suffixes seen, for the error message when nothing is supported."""
    found: list[SourceFile] = []
    others: set[str] = set()

    def on_error(exc: OSError) -> None:
        raise DataError(f"cannot list folder {exc.filename}: {exc.strerror}") from exc

    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in excluded_dirs]
        for name in filenames:
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if path.suffix.lower() not in suffixes:
                others.add(path.suffix.lower() or name)
                continue
            found.append(_source_file(path, path.relative_to(root).as_posix()))
    found.sort(key=lambda f: f.key)
    return found, others


def _source_file(path: Path, key: str) -> SourceFile:
    try:
        st = path.stat()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from exc
    return SourceFile(path=path, key=key, size=st.st_size, mtime_ns=st.st_mtime_ns)


# --- readers ----------------------------------------------------------------------------------------


def _open_binary(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except PermissionError as exc:
        raise DataError(f"cannot read {path}: permission denied; "
                        "fix its permissions or leave it out of --data") from exc
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _decode(raw: bytes, path: Path, offset: int) -> str:
    """Strict UTF-8; an error names the file and the absolute byte offset of the bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start:exc.start + 4]
        raise DataError(f"{path} is not valid UTF-8: byte 0x{bad[0]:02x} at byte offset {offset + exc.start} "
                        f"({exc.reason}); convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None


def _read_plain_text(source: SourceFile) -> Iterator[Document]:
    with _open_binary(source.path) as f:
        if source.size <= DOCUMENT_CHUNK_BYTES:  # the common case: the whole file is one document
            raw = _read(f, source.path)
            start = len(UTF8_BOM) if raw.startswith(UTF8_BOM) else 0
            text = _decode(raw[start:], source.path, start)
            if text.strip():
                yield Document(text, source.key)
            return
        parts: list[str] = []
        size = 0
        offset = 0
        index = 0
        for line in _lines(f, source.path):
            start = len(UTF8_BOM) if offset == 0 and line.startswith(UTF8_BOM) else 0
            parts.append(_decode(line[start:], source.path, offset + start))
            offset += len(line)
            size += len(line)
            if (size >= DOCUMENT_CHUNK_BYTES and not line.strip()) or size >= DOCUMENT_HARD_LIMIT_BYTES:
                text = "".join(parts)
                if text.strip():
                    yield Document(text, source.key if index == 0 else f"{source.key}#{index}")
                    index += 1
                parts, size = [], 0
        text = "".join(parts)
        if text.strip():
            yield Document(text, source.key if index == 0 else f"{source.key}#{index}")


def _read_jsonl(source: SourceFile, text_field: str) -> Iterator[Document]:
    with _open_binary(source.path) as f:
        offset = 0
        for lineno, line in enumerate(_lines(f, source.path), start=1):
            start = len(UTF8_BOM) if lineno == 1 and line.startswith(UTF8_BOM) else 0
            text_line = _decode(line[start:], source.path, offset + start)
            offset += len(line)
            if not text_line.strip():
                continue
            where = f"{source.path}:{lineno}"
            try:
                record = json.loads(text_line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); "
                                "each line of a .jsonl file must be one JSON object") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object with a {text_field!r} field, "
                                f"got a JSON {type(record).__name__}")
            if text_field not in record:
                fields = ", ".join(repr(k) for k in list(record)[:10]) or "none"
                raise DataError(f"{where}: no field {text_field!r} (fields: {fields}); "
                                "name the field that holds the text with --text-field NAME")
            value = record[text_field]
            if value is None:
                continue
            if not isinstance(value, str):
                raise DataError(f"{where}: field {text_field!r} is a {type(value).__name__}, not a string; "
                                "name the field that holds the text with --text-field NAME")
            if value.strip():
                yield Document(value, f"{source.key}#{lineno}")


def _require_pyarrow(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path} is a Parquet file, but pyarrow is not installed; "
                        "run `pip install pyarrow` or convert the file to .jsonl") from None
    return pq


def _read_parquet(source: SourceFile, text_field: str) -> Iterator[Document]:
    pq = _require_pyarrow(source.path)
    import pyarrow as pa

    try:
        parquet = pq.ParquetFile(source.path)
    except PermissionError as exc:
        raise DataError(f"cannot read {source.path}: permission denied; fix its permissions") from exc
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"cannot read Parquet file {source.path}: {exc}") from exc
    names = parquet.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{source.path}: no column {text_field!r} (columns: {', '.join(map(repr, names))}); "
                        "name the column that holds the text with --text-field NAME")
    column_type = parquet.schema_arrow.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise DataError(f"{source.path}: column {text_field!r} has type {column_type}, not string; "
                        "name the column that holds the text with --text-field NAME")
    row = 0
    with parquet:
        for group in range(parquet.num_row_groups):
            try:
                values = parquet.read_row_group(group, columns=[text_field]).column(0).to_pylist()
            except (OSError, pa.ArrowException) as exc:
                raise DataError(f"cannot read row group {group} of {source.path}: {exc}") from exc
            for value in values:
                if value is not None and value.strip():
                    yield Document(value, f"{source.key}#{row}")
                row += 1


def _read(f: BinaryIO, path: Path) -> bytes:
    try:
        return f.read()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _lines(f: BinaryIO, path: Path) -> Iterator[bytes]:
    try:
        yield from f
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc


_TOPICS: dict[str, str] | None = None


def _pydoc_topics() -> dict[str, str]:
    global _TOPICS
    if _TOPICS is None:
        try:
            from pydoc_data.topics import topics
        except ImportError:
            topics = {}  # some minimal Python builds leave pydoc_data out; the sources remain
        _TOPICS = dict(topics)
    return _TOPICS
