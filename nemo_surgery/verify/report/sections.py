"""The HTML report's sections: one function each, ``(result, report document) -> list of HTML parts``.

``SECTIONS`` is the order on the page; a new section is a function appended there.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

from nemo_surgery.verify.metrics import load_image
from nemo_surgery.verify.report.attack_section import attack_section
from nemo_surgery.verify.report.images import fmt, img_tag, layer_chart_svg
from nemo_surgery.verify.result import VerifyResult

Section = Callable[[VerifyResult, dict[str, Any]], list[str]]


def verdict_section(result: VerifyResult, doc: dict[str, Any]) -> list[str]:
    """The verdict, every reason it failed, notes, and the thresholds it used."""
    color = "#1e8449" if result.passed else "#c0392b"
    out = [f"<p style='font-size:20px;color:{color}'><b>Verdict: {html.escape(result.verdict)}</b> "
           f"(exit {result.exit_code})</p>"]
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
        out.append(f"<tr><th>{html.escape(key)}</th><td>{fmt(value)}</td></tr>")
    out.append("</table>")
    out.append(f"<p><small>{html.escape(doc['verdict_rule'])}</small></p>")
    return out


def prompts_section(result: VerifyResult, doc: dict[str, Any]) -> list[str]:
    """Per memorized prompt: the numbers, then before/after samples beside the training image."""
    out = ["<h2>Memorized prompts</h2><table><tr><th>#</th><th>prompt</th><th>detection before</th>"
           "<th>detection after</th><th>agreement before</th><th>agreement after</th>"
           "<th>max SSIM to train (after)</th><th>verdict</th></tr>"]
    for c in result.checks:
        train = max(c.train_after) if c.train_after else None
        cls, word = ("ok", "mitigated") if c.mitigated else ("bad", "STILL MEMORIZED")
        out.append(f"<tr><td>{c.index}</td><td>{html.escape(c.prompt)}</td>"
                   f"<td>{fmt(c.detection_before['mean_pairwise'])}</td><td>{fmt(c.detection_after['mean_pairwise'])}</td>"
                   f"<td>{fmt(c.agreement_before)}</td><td>{fmt(c.agreement_after)}</td><td>{fmt(train)}</td>"
                   f"<td class='{cls}'>{word}</td></tr>")
    out.append("</table>")
    before, after = result.images.get("memorized_before"), result.images.get("memorized_after")
    for k, c in enumerate(result.checks):
        out.append(f"<h3>#{c.index}: {html.escape(c.prompt)}</h3><table class='grid'>")
        if before is not None:
            out.append("<tr><td>before</td><td>" + "".join(
                img_tag(im, f"prompt {c.index} before seed {s}") for s, im in enumerate(before[k])) + "</td></tr>")
            out.append("<tr><td>after</td><td>" + "".join(
                img_tag(im, f"prompt {c.index} after seed {s}") for s, im in enumerate(after[k])) + "</td></tr>")
        if c.train_image is not None and before is not None:
            ref = load_image(c.train_image, before.shape[2], before.shape[3])
            out.append("<tr><td>training image</td><td>" + img_tag(ref, f"prompt {c.index} training image")
                       + "</td></tr>")
        out.append("</table>")
    return out


def equivalence_section(result: VerifyResult, doc: dict[str, Any]) -> list[str]:
    """Pruned checkpoint vs hooked original."""
    out = ["<h2>Equivalence</h2><table>"]
    for key, value in result.equivalence.to_json().items():
        out.append(f"<tr><th>{html.escape(key)}</th><td>{fmt(value, 8)}</td></tr>")
    out.append("</table>")
    return out


def drift_section(result: VerifyResult, doc: dict[str, Any]) -> list[str]:
    """Hold-out drift: summary, worst prompts with their samples, value-layer output change."""
    out = ["<h2>Hold-out drift</h2>"]
    if result.drift is None:
        out.append("<p class='bad'>DRIFT NOT MEASURED (no --holdout prompts).</p>")
        return out
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
    if hb is None:
        return out
    by_index = {p.index: i for i, p in enumerate(result.drift.prompts)}
    out.append("<table class='grid'>")
    for w in result.drift.worst():
        i = by_index[w.index]
        out.append(f"<tr><td>#{w.index} before</td><td>" + "".join(
            img_tag(im, f"hold-out {w.index} before seed {s}") for s, im in enumerate(hb[i]))
            + f"</td></tr><tr><td>#{w.index} after</td><td>" + "".join(
            img_tag(im, f"hold-out {w.index} after seed {s}") for s, im in enumerate(ha[i])) + "</td></tr>")
    out.append("</table>")
    return out


def layers_section(result: VerifyResult, doc: dict[str, Any]) -> list[str]:
    """Bar chart of pruned neurons per value layer."""
    return ["<h2>Pruned neurons per layer</h2>",
            layer_chart_svg([(ln.id, len(ln.neurons), ln.rows) for ln in result.neuron_set.layers])]


def optional_section(result: VerifyResult, doc: dict[str, Any]) -> list[str]:
    """Which optional metrics were measured or skipped."""
    out = ["<h2>Optional metrics</h2><ul>"]
    for name, value in result.optional.items():
        text = value["skipped"] if "skipped" in value else f"measured with {value.get('model')} (see report.json)"
        out.append(f"<li>{html.escape(name)}: {html.escape(text)}</li>")
    out.append("</ul>")
    return out


SECTIONS: list[Section] = [verdict_section, prompts_section, equivalence_section, drift_section, attack_section,
                           layers_section, optional_section]
