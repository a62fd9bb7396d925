"""Calibration / evaluation text from local files: ``.txt``, ``.jsonl``, ``.json``, ``.parquet``.

* ``.txt`` (also ``.text`` / ``.md``): with ``text_unit="auto"`` (default) documents are separated by blank lines
  (one sample per paragraph block); a file without blank lines gives one sample per non-empty line (the
  one-document-per-line corpus layout). ``"paragraph"``, ``"line"`` and ``"file"`` (the whole file is one sample)
  force a layout.
* ``.jsonl`` (also ``.ndjson``): one JSON object per line, read streaming; the text is taken as hf_ptq does (see
  :mod:`jaxquant.data.records`: ``messages`` joined with "\\n", ``prompt``+answer, ``text``, ``input``+``output``)
  or from an explicit ``field``. Blank lines are ignored.
* ``.json``: a list of records (objects or strings), or an object holding such a list under ``field`` / ``data`` /
  ``rows`` / ``examples`` / ``train`` / ``samples`` / ``text``.
* ``.parquet``: read with ``pyarrow`` (not a jaxquant dependency: ``pip install pyarrow``), in row batches.

``.gz`` / ``.bz2`` / ``.xz`` compressed variants of the text formats are read transparently. Samples are returned in
file order (first N, no shuffle, like hf_ptq); empty samples are skipped and do not count towards N.
"""

from __future__ import annotations

import bz2
import gzip
import importlib.util
import json
import lzma
import re
from collections.abc import Iterator
from pathlib import Path

from jaxquant.data.records import record_text
from jaxquant.errors import DataError

TEXT_EXTS = (".txt", ".text", ".md")
JSONL_EXTS = (".jsonl", ".ndjson")
JSON_EXTS = (".json",)
PARQUET_EXTS = (".parquet",)
COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
SUPPORTED_EXTS = TEXT_EXTS + JSONL_EXTS + JSON_EXTS + PARQUET_EXTS
TEXT_UNITS = ("auto", "paragraph", "line", "file")
_JSON_LIST_KEYS = ("data", "rows", "examples", "train", "samples", "text")
_RE_BLANK = re.compile(r"\n[ \t]*\n")


def file_kind(path: str | Path) -> tuple[str, str | None] | None:
    """``(kind, compression_suffix)`` for a supported file name, else None. kind: txt / jsonl / json / parquet."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    comp = None
    if suffixes and suffixes[-1] in COMPRESSED:
        comp = suffixes.pop()
    if not suffixes:
        return None
    ext = suffixes[-1]
    if ext in TEXT_EXTS:
        return "txt", comp
    if ext in JSONL_EXTS:
        return "jsonl", comp
    if ext in JSON_EXTS:
        return "json", comp
    if ext in PARQUET_EXTS and comp is None:
        return "parquet", None
    return None


def looks_like_path(spec: str) -> bool:
    """True when a dataset spec is meant as a file path (exists, has a path separator, or a known extension)."""
    return (
        Path(spec).exists()
        or "/" in spec
        or "\\" in spec
        or spec.startswith(("~", "."))
        or file_kind(spec) is not None
    )


def _open_text(path: Path, comp: str | None):
    opener = COMPRESSED[comp] if comp else open
    return opener(path, "rt", encoding="utf-8", errors="replace")


def _iter_txt(path: Path, comp: str | None, text_unit: str) -> Iterator[str]:
    if text_unit not in TEXT_UNITS:
        raise DataError(f"{path}: text_unit must be one of {', '.join(TEXT_UNITS)}, got {text_unit!r}.")
    with _open_text(path, comp) as f:
        content = f.read().replace("\r\n", "\n").replace("\r", "\n")
    if text_unit == "file":
        yield content.strip()
        return
    if text_unit == "auto":
        text_unit = "paragraph" if _RE_BLANK.search(content.strip()) else "line"
    if text_unit == "paragraph":
        for block in _RE_BLANK.split(content):
            yield block.strip()
    else:
        for line in content.split("\n"):
            yield line.strip()


def _iter_jsonl(path: Path, comp: str | None, field: str | None) -> Iterator[str]:
    with _open_text(path, comp) as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {lineno}: invalid JSON ({e.msg}); each line must be one JSON object.")
            yield record_text(obj, field, where=f"{path}, line {lineno}")


def _iter_json(path: Path, comp: str | None, field: str | None) -> Iterator[str]:
    try:
        with _open_text(path, comp) as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        hint = " (one object per line? name the file .jsonl)" if "Extra data" in e.msg else ""
        raise DataError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}{hint}.")
    records = None
    if isinstance(obj, list):
        records = obj
    elif isinstance(obj, dict):
        for key in ((field,) if field else ()) + _JSON_LIST_KEYS:
            if isinstance(obj.get(key), list):
                records = obj[key]
                if key == field or (key == "text" and all(isinstance(r, str) for r in records)):
                    field = None  # a column of strings
                break
        if records is None:
            records = [obj]
    else:
        raise DataError(f"{path}: expected a JSON list of records or an object, got {type(obj).__name__}.")
    for i, rec in enumerate(records):
        yield record_text(rec, field, where=f"{path}, record {i}")


def _iter_parquet(path: Path, field: str | None) -> Iterator[str]:
    if importlib.util.find_spec("pyarrow") is None:
        raise DataError(
            f"{path}: reading .parquet files needs pyarrow, which is not installed (it is not a jaxquant "
            "dependency). Install it with `pip install pyarrow`, or convert the file to .jsonl."
        )
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError subclasses
        raise DataError(f"{path}: not a readable parquet file ({e}).")
    row = 0
    for batch in pf.iter_batches(batch_size=256):
        for rec in batch.to_pylist():
            yield record_text(rec, field, where=f"{path}, row {row}")
            row += 1


def iter_file_texts(
    path: str | Path, field: str | None = None, text_unit: str = "auto"
) -> Iterator[str]:
    """Stream the (possibly empty) texts of a local dataset file in file order."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(
            f"dataset file {str(path)!r} does not exist. Pass an existing .txt / .jsonl / .json / .parquet file, "
            "a built-in dataset name (lee_news, wikipedia) or a Hugging Face dataset name."
        )
    if p.is_dir():
        raise DataError(
            f"{p} is a directory; pass a file (.txt / .jsonl / .json / .parquet) inside it. Hugging Face dataset "
            "folders need the `datasets` package: use hf:<path>."
        )
    kind = file_kind(p)
    if kind is None:
        raise DataError(
            f"{p}: unsupported file type {''.join(p.suffixes) or '(no extension)'!r}; use one of "
            f"{', '.join(SUPPORTED_EXTS)} (text formats may be .gz/.bz2/.xz compressed)."
        )
    k, comp = kind
    if k == "txt":
        yield from _iter_txt(p, comp, text_unit)
    elif k == "jsonl":
        yield from _iter_jsonl(p, comp, field)
    elif k == "json":
        yield from _iter_json(p, comp, field)
    else:
        yield from _iter_parquet(p, field)


def load_file_texts(
    path: str | Path, n: int | None = None, field: str | None = None, text_unit: str = "auto"
) -> list[str]:
    """The first ``n`` non-empty texts of a local file (all when ``n`` is None). DataError if there are none."""
    out: list[str] = []
    if n is not None and n <= 0:
        return out
    for text in iter_file_texts(path, field=field, text_unit=text_unit):
        if text and text.strip():
            out.append(text)
            if n is not None and len(out) >= n:
                break
    if not out:
        raise DataError(f"{Path(path).expanduser()}: the file holds no text (empty file or only empty samples).")
    return out
