"""Read prompt lists: text (one per line), CSV or JSONL with a named column."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from nemo_surgery.errors import InputError


@dataclass(frozen=True)
class Prompt:
    """One prompt with its position in the list (0-based, after skipping blanks/comments)."""

    index: int
    text: str
    line: int


def _decode(path: Path) -> str:
    if not path.exists():
        raise InputError(f"{path}: prompt file not found")
    if not path.is_file():
        raise InputError(f"{path}: not a file; pass a prompt list (.txt, .csv or .jsonl)")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InputError(
            f"{path}: line {line} is not valid UTF-8 (byte {raw[exc.start]:#04x}); re-save the file as UTF-8"
        ) from None


def _from_text(text: str) -> list[tuple[int, str]]:
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            out.append((lineno, stripped))
    return out


def _from_csv(text: str, column: str, path: Path) -> list[tuple[int, str]]:
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or column not in reader.fieldnames:
        have = ", ".join(reader.fieldnames or []) or "none"
        raise InputError(f"{path}: no column {column!r} (columns: {have}); pick one with --column")
    out = []
    for row in reader:
        value = (row.get(column) or "").strip()
        if value:
            out.append((reader.line_num, value))
    return out


def _from_jsonl(text: str, column: str, path: Path) -> list[tuple[int, str]]:
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: line {lineno} is not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or column not in row:
            raise InputError(f"{path}: line {lineno} has no field {column!r}; pick one with --column")
        value = str(row[column]).strip()
        if value:
            out.append((lineno, value))
    return out


def read_prompts(path: str | Path, column: str = "prompt") -> list[Prompt]:
    """Read a prompt list; raise InputError (one line) when it is missing, undecodable or empty.

    ``.csv`` and ``.jsonl`` files take the prompt from ``column``; any other file
    is UTF-8 text with one prompt per line, blank lines and ``#`` comments skipped.
    """
    path = Path(path)
    text = _decode(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = _from_csv(text, column, path)
    elif suffix in (".jsonl", ".ndjson"):
        rows = _from_jsonl(text, column, path)
    else:
        rows = _from_text(text)
    if not rows:
        raise InputError(f"{path}: no prompts found (blank lines and # comments are skipped)")
    return [Prompt(index=i, text=t, line=ln) for i, (ln, t) in enumerate(rows)]
