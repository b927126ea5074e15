"""Rows of a user's table file (CSV, TSV or JSON lines) with their line numbers, for the generic
source; every malformed byte, line or cell is a DatasetError naming the file and line.

The format comes from the name: `.csv` (comma, double-quote quoting), `.tsv` (tab, no quoting:
a quote is part of the value), `.jsonl` (one JSON object a line); `--delimiter` reads any other
name as delimited text (quoting as CSV). Text is UTF-8 (a leading byte-order mark is dropped).
Blank lines (and delimited rows whose every cell is blank) are skipped anywhere.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from s3rec.data.format import DatasetError
from s3rec.strict_load import no_constant, unique_keys

BOM = b"\xef\xbb\xbf"
DELIMITERS = {".csv": ",", ".tsv": "\t"}
ALIASES = {"\\t": "\t", "tab": "\t"}   # a tab is awkward to type on a command line


def file_format(path: Path, delimiter: str | None) -> str | None:
    """None for JSON lines, else the delimiter."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return None
    if delimiter is not None:
        delimiter = ALIASES.get(delimiter, delimiter)
        if len(delimiter) != 1:
            raise DatasetError(f"--delimiter {delimiter!r}: expected one character (or \\t, tab)")
        return delimiter
    if suffix in DELIMITERS:
        return DELIMITERS[suffix]
    raise DatasetError(f"{path}: cannot tell the format from the name; name it .csv, .tsv or "
                       f".jsonl, or give --delimiter")


def read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{path}: not found") from None
    data = data[len(BOM):] if data.startswith(BOM) else data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DatasetError(f"{path}:{line}: not UTF-8 text (byte {e.start + 1} of the file: "
                           f"{e.reason})") from None


def read_table(path: Path, delimiter: str | None, required: list[str]
               ) -> tuple[list[str] | None, list[tuple[int, dict]]]:
    """(the header's columns, or None for JSON lines; [(line number, {column: value})]).
    Delimited values are stripped strings; JSON values are as parsed. `required` columns must be
    in the header (JSON lines: the caller checks each line's keys)."""
    sep = file_format(path, delimiter)
    text = read_text(path)
    if not text.strip():
        raise DatasetError(f"{path}: empty file (expected "
                           + ("a header line naming the columns " + ", ".join(required)
                              if sep is not None else "one JSON object a line") + ")")
    if sep is None:
        return None, json_rows(path, text)
    return delimited_rows(path, text, sep, required)


def delimited_rows(path: Path, text: str, sep: str, required: list[str]):
    quoting = csv.QUOTE_NONE if sep == "\t" and path.suffix.lower() == ".tsv" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep, quoting=quoting, strict=True)
    header, rows = None, []
    try:
        for cells in reader:
            cells = [c.strip() for c in cells]
            if not any(cells):
                continue
            if header is None:
                header = check_header(path, reader.line_num, cells, required)
                continue
            if len(cells) != len(header):
                raise DatasetError(f"{path}:{reader.line_num}: {len(cells)} columns, the header "
                                   f"has {len(header)} ({', '.join(header)})")
            rows.append((reader.line_num, dict(zip(header, cells))))
    except csv.Error as e:
        raise DatasetError(f"{path}:{reader.line_num}: malformed line: {e}") from None
    if not rows:
        raise DatasetError(f"{path}: no rows after the header")
    return header, rows


def check_header(path: Path, lineno: int, cells: list[str], required: list[str]) -> list[str]:
    for k, name in enumerate(cells, 1):
        if not name:
            raise DatasetError(f"{path}:{lineno}: column {k} of the header has no name")
        if name in cells[:k - 1]:
            raise DatasetError(f"{path}:{lineno}: column {name!r} twice in the header")
    for name in required:
        if name not in cells:
            raise DatasetError(f"{path}:{lineno}: no column {name!r} in the header (columns: "
                               f"{', '.join(map(repr, cells))}); the first line must name the "
                               f"columns")
    return cells


def json_rows(path: Path, text: str) -> list[tuple[int, dict]]:
    rows = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line, object_pairs_hook=unique_keys, parse_constant=no_constant)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{lineno}: not valid JSON (column {e.colno}: {e.msg})"
                               ) from None
        except ValueError as e:           # from the hooks
            raise DatasetError(f"{path}:{lineno}: {e}") from None
        if not isinstance(obj, dict):
            raise DatasetError(f"{path}:{lineno}: expected a JSON object {{\"key\": value, ...}}, "
                               f"got {type(obj).__name__}")
        rows.append((lineno, obj))
    return rows


def is_finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
