"""The apply report: versioned JSON for machines, Markdown for humans."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from nemo_surgery.atomic import atomic_open, public_mode, write_json

FORMAT = "nemo-surgery.apply-report"
VERSION = 1
#: The Markdown line of a patched file whose input digest was not taken (a copy without --input-sha256).
IN_NOT_TAKEN = ("- SHA-256 in: not computed (`apply --input-sha256` records it, at the cost of a second digest; "
                "every byte outside the zeroed rows was checked equal to the input's)")


def render_markdown(doc: dict[str, Any]) -> str:
    """Render a report document (``ApplyResult.to_json()``) as Markdown."""
    status = "PASSED" if doc["ok"] else "FAILED"
    lines = [
        f"# nemo-surgery apply report: {status}",
        "",
        f"- tool version: {doc['tool_version']}",
        f"- input: `{doc['input']}` ({doc['layout']})",
        f"- output: `{doc['output']}`{' (in place)' if doc['in_place'] else ''}",
        f"- neuron set: `{doc['neuron_set']['path']}` (SHA-256 `{doc['neuron_set']['sha256']}`)",
        f"- rows zeroed: {doc['rows_zeroed']} over {doc['tensors_patched']} tensors, {doc['bytes_zeroed']} bytes",
        f"- other files mirrored: {doc['mirrored_files']}",
        "",
        "## Patched files",
        "",
    ]
    for f in doc["files"]:
        lines += [
            f"### `{f['file']}`",
            "",
            f"- SHA-256 in: `{f['sha256_in']}`" if f["sha256_in"] else IN_NOT_TAKEN,
            f"- SHA-256 out: `{f['sha256_out']}`",
            f"- metadata updated: {f['metadata_updated']}",
            "",
            "| key | role | dtype | shape | rows zeroed | bytes zeroed |",
            "|---|---|---|---|---|---|",
        ]
        for t in f["tensors"]:
            lines.append(
                f"| `{t['key']}` | {t['role']} | {t['dtype']} | {t['shape']} | {t['rows_zeroed']} | {t['bytes_zeroed']} |"
            )
        lines += ["", "| check | result | detail |", "|---|---|---|"]
        for c in f["checks"]:
            lines.append(f"| {c['name']} | {'pass' if c['ok'] else '**FAIL**'} | {c['detail']} |")
        lines.append("")
    failed_mirrors = [m for m in doc.get("mirror_checks", []) if not m["ok"]]
    if failed_mirrors:
        lines += ["## Mirrored files that failed", ""]
        lines += [f"- `{m['file']}`: {m['detail']}" for m in failed_mirrors]
        lines.append("")
    if doc.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in doc["notes"]] + [""]
    return "\n".join(lines)


def write_reports(doc: dict[str, Any], json_path: Path, md_path: Path) -> None:
    """Write report.json and report.md atomically (never through an existing hard link)."""
    write_json(json_path, doc)
    with atomic_open(md_path) as fh:
        fh.write(render_markdown(doc))


def write_report_files(doc: dict[str, Any], json_path: Path, md_path: Path) -> None:
    """Write both reports to fresh paths (temps that a commit renames), fsynced, with cp's mode."""
    for path, text in ((json_path, json.dumps(doc, indent=2) + "\n"), (md_path, render_markdown(doc))):
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        public_mode(path)
