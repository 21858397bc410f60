"""Append-only JSONL records with a pinned header: resumable per-prompt results of scan and detect."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nemo_surgery.errors import InputError


class RecordLog:
    """Append-only JSONL of per-prompt results with a header that pins model and settings."""

    def __init__(self, path: Path, header: dict[str, Any], kind: str, parse: Callable[[dict[str, Any]], Any]):
        self.path = path
        self.header = {"type": "header", **header}
        self.kind = kind  # the "type" of the result lines (scan: "prompt", detect: "detect")
        self.parse = parse

    def load(self) -> list[Any]:
        """Read finished records for resuming; a torn last line is dropped from the file."""
        raw = self.path.read_bytes()
        good_end, results, header = 0, [], None
        for line in raw.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                doc = json.loads(line)
            except json.JSONDecodeError:
                break
            good_end += len(line)
            if doc.get("type") == "header":
                header = doc
            elif doc.get("type") == self.kind:
                results.append(self.parse(doc))
        if header is None:
            raise InputError(f"{self.path}: not a {'scan' if self.kind == 'prompt' else self.kind} records file; "
                             "remove it or choose another output")
        for key in ("fingerprint", "stats_sha256", "layers", "settings"):
            if header.get(key) != self.header.get(key):
                raise InputError(
                    f"{self.path}: records were made with a different {key.replace('_', ' ')}; "
                    "rerun without --resume and with --force to start over"
                )
        if good_end < len(raw):
            with open(self.path, "r+b") as fh:
                fh.truncate(good_end)
        return results

    def start(self) -> None:
        """Create the file with its header (replacing an old one)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(self.header) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def append(self, result: Any) -> None:
        """Append one record durably."""
        self.extend([result])

    def extend(self, results: list[Any]) -> None:
        """Append several records durably (one fsync)."""
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write("".join(json.dumps(r.to_json()) + "\n" for r in results))
            fh.flush()
            os.fsync(fh.fileno())
