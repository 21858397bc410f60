"""Write the verification report: report.json, a self-contained report.html, and MODEL_CARD.md.

The HTML is a list of sections (``sections.SECTIONS``); a new section is one
function added there (or in its own module and listed there).
"""

from __future__ import annotations

from pathlib import Path

from nemo_surgery.atomic import atomic_open, write_json
from nemo_surgery.provenance import sha256_file
from nemo_surgery.verify.report.card import render_model_card
from nemo_surgery.verify.report.html import render_html
from nemo_surgery.verify.result import VerifyResult

__all__ = ["render_html", "render_model_card", "write_reports"]


def write_reports(result: VerifyResult, folder: Path) -> dict[str, str]:
    """Write report.html, MODEL_CARD.md, then report.json (with both files' SHA-256), atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    html_path, card_path, json_path = folder / "report.html", folder / "MODEL_CARD.md", folder / "report.json"
    with atomic_open(html_path) as fh:
        fh.write(render_html(result))
    with atomic_open(card_path) as fh:
        fh.write(render_model_card(result))
    result.outputs = {
        "report_json": str(json_path),
        "report_html": str(html_path),
        "model_card": str(card_path),
        "report_html_sha256": sha256_file(html_path),
        "model_card_sha256": sha256_file(card_path),
    }
    write_json(json_path, result.to_json())
    return result.outputs
