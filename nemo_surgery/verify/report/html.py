"""The self-contained HTML page: a fixed head and the report sections in order."""

from __future__ import annotations

from nemo_surgery.verify.report.sections import SECTIONS
from nemo_surgery.verify.result import VerifyResult

STYLE = (
    "body{font-family:sans-serif;margin:24px;max-width:1200px}table{border-collapse:collapse;margin:8px 0}"
    "td,th{border:1px solid #bbb;padding:3px 8px;font-size:13px;text-align:left}"
    "img{image-rendering:pixelated;margin:2px;border:1px solid #888}.bad{color:#c0392b;font-weight:bold}"
    ".ok{color:#1e8449;font-weight:bold}.grid td{border:none}"
    "figure{display:inline-block;margin:2px;text-align:center}figcaption{font-size:11px}"
)


def render_html(result: VerifyResult) -> str:
    """The self-contained HTML report (no external URL; images are data URIs)."""
    doc = result.to_json()
    out = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
           f"<title>nemo-surgery verification report</title><style>{STYLE}</style></head><body>",
           "<h1>nemo-surgery verification report</h1>"]
    for section in SECTIONS:
        out.extend(section(result, doc))
    out.append("</body></html>")
    return "\n".join(out)
