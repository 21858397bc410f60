"""Write the verification report: report.json, a self-contained report.html, and MODEL_CARD.md."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nemo_surgery.atomic import atomic_open, write_json
from nemo_surgery.provenance import sha256_file

if TYPE_CHECKING:
    from nemo_surgery.verify.run import VerifyResult

#: Displayed image size in the HTML (small images are enlarged with nearest-neighbour, large ones shrunk).
THUMB = 128


def png_data_uri(image: np.ndarray, size: int = THUMB) -> str:
    """Encode a float image [H, W, 3] in [0, 1] as a base64 PNG data URI, resized to ``size`` px wide."""
    from PIL import Image

    arr = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    h, w = arr.shape[:2]
    resample = Image.NEAREST if w < size else Image.LANCZOS
    img = img.resize((size, max(1, round(h * size / w))), resample)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def layer_chart_svg(layers: list[tuple[str, int, int]], width: int = 720) -> str:
    """Inline SVG bar chart: pruned neurons per value layer; ``layers`` = [(id, pruned, rows)]."""
    bar_h, gap, label_w = 18, 6, 360
    top = max((n for _, n, _ in layers), default=1) or 1
    height = len(layers) * (bar_h + gap) + gap
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="pruned neurons per layer">']
    for k, (lid, n, rows) in enumerate(layers):
        y = gap + k * (bar_h + gap)
        length = (width - label_w - 90) * n / top
        short = lid.removesuffix(".transformer_blocks.0.attn2.to_v")
        parts.append(f'<text x="0" y="{y + bar_h - 4}" font-size="12">{html.escape(short)}</text>')
        parts.append(f'<rect x="{label_w}" y="{y}" width="{length:.1f}" height="{bar_h}" fill="#c0392b"/>')
        parts.append(f'<text x="{label_w + length + 6:.1f}" y="{y + bar_h - 4}" font-size="12">{n} / {rows}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}" width="{THUMB}">'


def render_html(result: VerifyResult) -> str:
    """The self-contained HTML report (no external URL; images are data URIs)."""
    doc = result.to_json()
    verdict = doc["verdict"]
    color = "#1e8449" if result.passed else "#c0392b"
    out = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
           "<title>nemo-surgery verification report</title><style>",
           "body{font-family:sans-serif;margin:24px;max-width:1200px}table{border-collapse:collapse;margin:8px 0}",
           "td,th{border:1px solid #bbb;padding:3px 8px;font-size:13px;text-align:left}",
           "img{image-rendering:pixelated;margin:2px;border:1px solid #888}.bad{color:#c0392b;font-weight:bold}",
           ".ok{color:#1e8449;font-weight:bold}.grid td{border:none}", "</style></head><body>",
           "<h1>nemo-surgery verification report</h1>",
           f"<p style='font-size:20px;color:{color}'><b>Verdict: {html.escape(verdict)}</b> (exit {result.exit_code})</p>"]
    if result.reasons:
        out.append("<ul>" + "".join(f"<li class='bad'>{html.escape(r)}</li>" for r in result.reasons) + "</ul>")
    for note in result.notes:
        out.append(f"<p class='bad'>{html.escape(note)}</p>")
    out.append("<table>")
    for key, value in (("original", result.original), ("pruned", result.pruned), ("neuron set", result.neurons),
                       ("neurons pruned", result.neuron_set.total), ("tool version", doc["tool_version"]),
                       ("tau", result.tau), ("max sample agreement", result.max_sample_agreement),
                       ("  (source)", result.agreement_source), ("max train similarity", result.max_train_similarity),
                       ("max drift", result.max_drift)):
        out.append(f"<tr><th>{html.escape(key)}</th><td>{_fmt(value)}</td></tr>")
    out.append("</table>")
    out.append(f"<p><small>{html.escape(doc['verdict_rule'])}</small></p>")

    out.append("<h2>Memorized prompts</h2><table><tr><th>#</th><th>prompt</th><th>detection before</th>"
               "<th>detection after</th><th>agreement before</th><th>agreement after</th>"
               "<th>max SSIM to train (after)</th><th>verdict</th></tr>")
    for c in result.checks:
        train = max(c.train_after) if c.train_after else None
        cls, word = ("ok", "mitigated") if c.mitigated else ("bad", "STILL MEMORIZED")
        out.append(f"<tr><td>{c.index}</td><td>{html.escape(c.prompt)}</td>"
                   f"<td>{_fmt(c.detection_before['mean_pairwise'])}</td><td>{_fmt(c.detection_after['mean_pairwise'])}</td>"
                   f"<td>{_fmt(c.agreement_before)}</td><td>{_fmt(c.agreement_after)}</td><td>{_fmt(train)}</td>"
                   f"<td class='{cls}'>{word}</td></tr>")
    out.append("</table>")
    before, after = result.images.get("memorized_before"), result.images.get("memorized_after")
    for k, c in enumerate(result.checks):
        out.append(f"<h3>#{c.index}: {html.escape(c.prompt)}</h3><table class='grid'>")
        if before is not None:
            out.append("<tr><td>before</td><td>" + "".join(
                _img(png_data_uri(im), f"prompt {c.index} before seed {s}") for s, im in enumerate(before[k])) + "</td></tr>")
            out.append("<tr><td>after</td><td>" + "".join(
                _img(png_data_uri(im), f"prompt {c.index} after seed {s}") for s, im in enumerate(after[k])) + "</td></tr>")
        if c.train_image is not None:
            from nemo_surgery.verify.metrics import load_image

            ref = load_image(c.train_image, before.shape[2], before.shape[3])
            out.append("<tr><td>training image</td><td>" + _img(png_data_uri(ref), f"prompt {c.index} training image")
                       + "</td></tr>")
        out.append("</table>")

    out.append("<h2>Equivalence</h2><table>")
    for key, value in result.equivalence.to_json().items():
        out.append(f"<tr><th>{html.escape(key)}</th><td>{_fmt(value, 8)}</td></tr>")
    out.append("</table>")

    out.append("<h2>Hold-out drift</h2>")
    if result.drift is None:
        out.append("<p class='bad'>DRIFT NOT MEASURED (no --holdout prompts).</p>")
    else:
        d = result.drift.to_json()
        cls = "ok" if result.drift_ok else "bad"
        out.append(f"<p class='{cls}'>drift {d['drift']:.4f} (max {result.max_drift}); mean SSIM "
                   f"{d['ssim']['mean']:.4f}, std {d['ssim']['std']:.4f}, min {d['ssim']['min']:.4f}, "
                   f"median {d['ssim']['median']:.4f} over {d['prompts']} prompts</p>")
        out.append("<table><tr><th>worst prompts</th><th>SSIM before/after</th></tr>" + "".join(
            f"<tr><td>#{w['index']} {html.escape(w['prompt'])}</td><td>{w['ssim']:.4f}</td></tr>" for w in d["worst"])
            + "</table>")
        out.append("<table><tr><th>value layer</th><th>relative output change</th></tr>" + "".join(
            f"<tr><td>{html.escape(k)}</td><td>{v:.6f}</td></tr>" for k, v in d["value_change"].items()) + "</table>")
        hb, ha = result.images.get("holdout_before"), result.images.get("holdout_after")
        by_index = {p.index: i for i, p in enumerate(result.drift.prompts)}
        out.append("<table class='grid'>")
        for w in result.drift.worst():
            i = by_index[w.index]
            out.append(f"<tr><td>#{w.index} before</td><td>" + "".join(
                _img(png_data_uri(im), f"hold-out {w.index} before seed {s}") for s, im in enumerate(hb[i]))
                + f"</td></tr><tr><td>#{w.index} after</td><td>" + "".join(
                _img(png_data_uri(im), f"hold-out {w.index} after seed {s}") for s, im in enumerate(ha[i])) + "</td></tr>")
        out.append("</table>")

    out.append("<h2>Pruned neurons per layer</h2>")
    out.append(layer_chart_svg([(ln.id, len(ln.neurons), ln.rows) for ln in result.neuron_set.layers]))
    out.append("<h2>Optional metrics</h2><ul>")
    for name, value in result.optional.items():
        text = value["skipped"] if "skipped" in value else f"measured with {value.get('model')} (see report.json)"
        out.append(f"<li>{html.escape(name)}: {html.escape(text)}</li>")
    out.append("</ul></body></html>")
    return "\n".join(out)


def render_model_card(result: VerifyResult) -> str:
    """A Markdown section a release engineer can paste into the model card."""
    doc = result.to_json()
    s = result.settings["sampling"]
    lines = [
        "## Memorization mitigation (NeMo neuron pruning)",
        "",
        f"This checkpoint was pruned with **nemo-surgery {doc['tool_version']}**: "
        f"{result.neuron_set.total} value neuron(s) (rows of cross-attention `attn2.to_v` weights) were set to zero.",
        "",
        "| layer | neurons zeroed |",
        "|---|---|",
    ]
    for ln in result.neuron_set.nonempty():
        lines.append(f"| `{ln.id}` | {len(ln.neurons)} of {ln.rows}: {', '.join(map(str, ln.neurons))} |")
    lines += [
        "",
        f"**Verification verdict: {doc['verdict']}** (exit code {result.exit_code}).",
        "",
        f"Verified on {len(result.checks)} memorized prompt(s) with {s['seeds']} seeds, DDIM {s['steps']} steps, "
        f"guidance {s['guidance']}; detection threshold tau = {result.tau:.4f}; sample-agreement threshold "
        f"{result.max_sample_agreement:.4f} ({result.agreement_source}); training-image SSIM threshold "
        f"{result.max_train_similarity}.",
        "",
        "| # | prompt | detection before | detection after | sample agreement before | after "
        "| max SSIM to training image (after) | result |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in result.checks:
        train = f"{max(c.train_after):.3f}" if c.train_after else "n/a"
        lines.append(f"| {c.index} | {c.prompt.replace('|', '/')} | {c.detection_before['mean_pairwise']:.3f} | "
                     f"{c.detection_after['mean_pairwise']:.3f} | {c.agreement_before:.3f} | {c.agreement_after:.3f} | "
                     f"{train} | {'mitigated' if c.mitigated else 'STILL MEMORIZED'} |")
    eq = result.equivalence
    lines += ["", f"- Equivalence: pruned weights vs. original with the neurons blocked at run time: max abs "
                  f"difference of noise predictions {eq.max_abs_diff:.3g} (tolerance {eq.tolerance:.3g}) -> "
                  f"{'equivalent' if eq.ok else 'NOT equivalent'}."]
    if result.drift is None:
        lines.append("- Hold-out drift: **not measured** (no hold-out prompts given).")
    else:
        d = result.drift.to_json()
        change = max(d["value_change"].values(), default=0.0)
        lines.append(f"- Hold-out drift on {d['prompts']} non-memorized prompts: mean SSIM of samples before/after "
                     f"(same seeds) {d['ssim']['mean']:.4f} (min {d['ssim']['min']:.4f}); drift {d['drift']:.4f} "
                     f"(limit {result.max_drift}); largest relative change of a value layer's output {change:.4f}.")
    for reason in result.reasons:
        lines.append(f"- Failed: {reason}")
    lines += ["", f"Original: `{result.original}` (fingerprint `{result.inputs['original']['fingerprint'][:16]}`); "
                  f"neuron set SHA-256 `{result.inputs['neuron_set']['sha256']}`. Full numbers: `report.json`.", ""]
    return "\n".join(lines)


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
