"""Readers: a data file or folder -> raw records, each with where it comes from (`file:line`; JSON arrays:
`file[index]`). JSON lines and JSON (an array, or one object) today; other readers (csv, parquet, `datasets`) go
here. A file that cannot be read at all raises DataError; a bad line is yielded as a problem, for the validator
(formats.py) to report with the record's others.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from chattune.errors import DataError

SPLIT_NAMES = {
    "train": ("train",),
    "eval": ("validation", "valid", "dev", "eval"),
    "test": ("test",),
}
BOM = b"\xef\xbb\xbf"


class _Invalid(Exception):
    """One problem with one field of a record (a reader yields one for a line it cannot parse)."""

    def __init__(self, field_name: str, message: str, reason: str = "invalid value"):
        super().__init__(f"{field_name}: {message}")
        self.field_name, self.message, self.reason = field_name, message, reason


def _type_name(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


# ---------------------------------------------------------------- files


def find_split(path: str | Path, split: str) -> Path:
    """A file is used as is; a folder must hold a file for `split` (train / validation|dev|eval / test)."""
    path = Path(path)
    if not path.exists():
        raise DataError([f"{path}: (path): file or folder not found"],
                        "fix: check the path in data.train / data.eval (relative paths start where you run chattune)")
    if path.is_file():
        return path
    for stem in SPLIT_NAMES[split]:
        for ext in (".jsonl", ".json"):
            if (path / f"{stem}{ext}").is_file():
                return path / f"{stem}{ext}"
    names = " or ".join(f"{stem}.jsonl/.json" for stem in SPLIT_NAMES[split])
    present = sorted(p.name for p in path.iterdir() if p.suffix in (".json", ".jsonl"))
    found = f"; it holds {', '.join(present)}" if present else "; it holds no .json/.jsonl file"
    raise DataError([f"{path}: (folder): no {split} split: expected {names}{found}"],
                    f"fix: name the {split} file {SPLIT_NAMES[split][0]}.jsonl, or point the setting at the file itself")


def _decode(path: Path, raw: bytes) -> tuple[str, list[tuple[int, str]]]:
    """The text of the file, and (line, problem) for every line holding bytes that are not UTF-8 (those lines
    are left out of the text, so a JSON-lines file can still skip them)."""
    try:
        return raw.decode("utf-8"), []
    except UnicodeDecodeError:
        pass
    lines, bad, offset = [], [], 0
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            column = len(line[: e.start].decode("utf-8", errors="replace")) + 1
            bad.append((lineno, f"not UTF-8: byte {line[e.start]:#04x} at byte offset {offset + e.start} "
                                f"(column {column}); re-save the file as UTF-8"))
            lines.append("")
        offset += len(line) + 1
    return "\n".join(lines), bad


def iter_raw_records(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield (location, parsed JSON value or `_Invalid`) for every record; raises DataError on unreadable files.

    A `.jsonl` file (or any file not starting with `[`) holds one record per line; a file starting with `[` is a
    JSON array; a `.json` file may also hold one object. A UTF-8 byte order mark (as Windows editors write it) is
    accepted at the start of the file and at the start of a line (files joined with `cat`)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError([f"{path}: (file): cannot read: {e.strerror}"], "fix: check the file's permissions") from None
    if raw.startswith(BOM):
        raw = raw[len(BOM):]
    if not raw.strip():
        what = "the file is empty" if not raw else f"the file holds only whitespace ({len(raw)} bytes)"
        raise DataError([f"{path}: (file): {what}"],
                        "fix: point the setting at a file with records (JSON lines: one object per line)")
    text, bad_lines = _decode(path, raw)
    stripped = text.lstrip()
    if path.suffix == ".json" and not bad_lines and stripped[:1] not in ("[", "{"):
        try:
            scalar = json.loads(text)
        except json.JSONDecodeError:
            pass  # not one JSON value: read it as JSON lines below
        else:
            raise DataError([f"{path}:1: (file): expected a JSON array of records (or one record object), got "
                             f"{_type_name(scalar)}"], "fix: a .json file holds [{...}, {...}]; a .jsonl file holds "
                            "one {...} record per line")
    if stripped.startswith("[") or (path.suffix == ".json" and stripped.startswith("{")):
        if bad_lines:  # one JSON document: a bad byte anywhere spoils all of it
            raise DataError([f"{path}:{line}: (file): {msg}" for line, msg in bad_lines],
                            "fix: re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 IN > OUT`)")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if stripped.startswith("{"):
                first = next(line for line in text.splitlines() if line.strip())
                if _is_json(first):  # a .json file that is really JSON lines
                    yield from _iter_jsonl(path, text, [])
                    return
            closer = "]" if stripped.startswith("[") else "}"
            cut = f"; the file does not end with `{closer}`: cut off?" if not text.rstrip().endswith(closer) else ""
            raise DataError([f"{path}:{e.lineno}: (file): invalid JSON: {_json_error(e)}{cut}"],
                            "fix: repair the JSON (or re-export the file); `python -m json.tool FILE` shows "
                            "where it breaks") from None
        if isinstance(data, dict):
            data = [data]
        for i, rec in enumerate(data):
            yield f"{path}[{i}]", rec
    else:
        yield from _iter_jsonl(path, text, bad_lines)


def _json_error(e: json.JSONDecodeError) -> str:
    """`Expecting value (column 3)`; `Unterminated string starting at column 3`."""
    return f"{e.msg} column {e.colno}" if e.msg.endswith(" at") else f"{e.msg} (column {e.colno})"


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:
        return False


def _iter_jsonl(path: Path, text: str, bad_lines: list[tuple[int, str]]) -> Iterator[tuple[str, Any]]:
    bad = dict(bad_lines)
    for lineno, line in enumerate(text.split("\n"), 1):
        loc = f"{path}:{lineno}"
        if lineno in bad:
            yield loc, _Invalid("(line)", bad[lineno], "not UTF-8")
            continue
        line = line.lstrip("\ufeff")
        if not line.strip():
            continue
        try:
            yield loc, json.loads(line)
        except json.JSONDecodeError as e:
            yield loc, _Invalid("(line)", f"invalid JSON: {_json_error(e)}", "invalid JSON")
