"""The HTML report's sections: one function each, ``(result, report document) -> list of HTML parts``.

``SECTIONS`` is the order on the page; a new section is a function appended there.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

from nemo_surgery.verify.report.attack_section import attack_section
from nemo_surgery.verify.report.images import comparison_chart_svg, fmt, img_tag, layer_chart_svg
from nemo_surgery.verify.result import VerifyResult

Section = Callable[[VerifyResult, dict[str, Any]], list[str]]


def verdict_section(result: VerifyResult, doc: dict[str, Any]) -> list[str]:
    """The verdict, every failing and missing piece of evidence, and the thresholds with their sources."""
    color = "#1e8449" if result.passed else "#c0392b"
    out = [f"<p id='verdict' style='font-size:20px;color:{color}'><b>Verdict: {html.escape(result.verdict)}</b> "
           f"(exit {result.exit_code})</p>"]
    if result.reasons:
        out.append("<h3>Failing evidence</h3><ul>" + "".join(
            f"<li class='bad'>{html.escape(r)}</li>" for r in result.reasons) + "</ul>")
    if result.all_missing:
        out.append("<h3>Missing evidence</h3><ul>" + "".join(
            f"<li class='bad'>{html.escape(r)}</li>" for r in result.all_missing) + "</ul>")
    for note in result.notes:
        out.append(f"<p>{html.escape(note)}</p>")
    seeds = result.settings["seeds"]
    rows = [("original", result.original), ("pruned", result.pruned), ("neuron set", result.neurons),
            ("neurons pruned", result.neuron_set.total), ("tool version", doc["tool_version"]),
            ("copy threshold (SSIM)", result.copy_threshold.value), ("  source", result.copy_threshold.source),
            ("tau", result.tau), ("  source", doc["thresholds"]["tau"]["source"]),
            ("scan's detection seeds", f"seed {seeds['scan_detection']['seed']} x {seeds['scan_detection']['count']}"),
            ("verification seeds (fresh)", f"seed {seeds['verification']['seed']} x {seeds['verification']['count']}"),
            ("random controls", f"{len(result.controls)} (seed {result.settings['controls']['seed']})"),
            ("harm margins vs controls", ", ".join(f"{k} +{v}" for k, v in result.harm.margins.items()))]
    out.append("<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{fmt(v)}</td></tr>" for k, v in rows)
               + "</table>")
    out.append(f"<p><small>{html.escape(doc['verdict_rule'])}</small></p>")
    return out


def prompts_section(result: VerifyResult, doc: dict[str, Any]) -> list[str]:
    """Per memorized prompt: the numbers, then the reference beside before/after samples with per-seed SSIM."""
    out = ["<h2>Memorized prompts</h2><table><tr><th>#</th><th>prompt</th><th>scan score (in-sample)</th>"
           "<th>first-step before / after (fresh)</th><th>copies before</th><th>copies after</th>"
           "<th>copy rate bound (95%)</th><th>max SSIM after</th><th>controls' max SSIM</th><th>result</th></tr>"]
    for c in result.checks:
        rec = c.scan_record or {}
        in_sample = rec.get("final_score", rec.get("detection_score"))
        cls = "ok" if c.mitigated else "bad"
        out.append(
            f"<tr><td>{c.index}</td><td>{html.escape(c.prompt)}</td><td>{fmt(in_sample)}</td>"
            f"<td>{fmt(c.detection_before['mean_pairwise'])} / {fmt(c.detection_after['mean_pairwise'])}</td>"
            f"<td>{c.copy.copies_before} / {c.copy.seeds_before}</td><td>{c.copy.copies_after} / {len(c.copy.after)}</td>"
            f"<td>{100 * c.seeds.bound:.1f} %</td><td>{fmt(max(c.copy.after))}</td>"
            f"<td>{', '.join(fmt(max(s)) for s in c.copy.controls) or '-'}</td>"
            f"<td class='{cls}'>{html.escape(c.status)}</td></tr>")
    out.append("</table>")
    before, after = result.images.get("memorized_before"), result.images.get("memorized_after")
    refs = result.images.get("references") or []
    for k, c in enumerate(result.checks):
        out.append(f"<h3>#{c.index}: {html.escape(c.prompt)}</h3><p>{html.escape(c.seeds.sentence())}; a copy is SSIM "
                   f"&ge; {c.copy.threshold:.4f} to the {html.escape(c.copy.reference)}.</p><table class='grid'>")
        if k < len(refs):
            out.append("<tr><td>reference</td><td>" + img_tag(refs[k], f"prompt {c.index} reference",
                                                               c.copy.reference) + "</td></tr>")
        if before is not None:
            for label, stack, sims in (("before", before[k], c.copy.before), ("after", after[k], c.copy.after)):
                out.append(f"<tr><td>{label}</td><td>" + "".join(
                    img_tag(im, f"prompt {c.index} {label} seed {s}",
                            f"seed {s} SSIM {sims[s]:.3f}{' COPY' if sims[s] >= c.copy.threshold else ''}")
                    for s, im in enumerate(stack)) + "</td></tr>")
        out.append("</table>")
    return out


def controls_section(result: VerifyResult, doc: dict[str, Any]) -> list[str]:
    """Charts: the found set against the random controls for the memorization and harm metrics."""
    s = result.specificity
    out = ["<h2>Found set vs random controls</h2>"]
    if not s.measured:
        return out + ["<p class='bad'>No controls (--controls 0): specificity not measured.</p>"]
    word = "specific" if s.specific else "NOT specific"
    out.append(f"<p class='{'ok' if s.specific else 'bad'}'>{word}: beats {s.beaten} of {len(s.controls)} controls "
               f"(rank p-value {s.p_value:.3f}); test: below every control.</p>")
    out.append(comparison_chart_svg(f"memorization: {s.metric} (lower is better)", s.found, s.controls))
    harm = result.harm
    if harm.drift is not None and harm.drift_controls:
        out.append(comparison_chart_svg("hold-out drift (lower is better; dashed: limit from controls)",
                                        harm.drift.drift, harm.drift_controls, harm.drift_limit_controls))
    if harm.loss_increase is not None and harm.loss_controls:
        out.append(comparison_chart_svg("relative denoising-loss increase (dashed: limit from controls)",
                                        harm.loss_increase, harm.loss_increase_controls(), harm.loss_limit_controls))
    return out


def harm_section(result: VerifyResult, doc: dict[str, Any]) -> list[str]:
    """Hold-out drift (summary, worst prompts with samples, value-layer change) and the denoising loss."""
    out = ["<h2>Harm on hold-out data</h2>"]
    harm = result.harm
    if not harm.measured:
        return out + ["<p class='bad'>HARM NOT MEASURED (no --holdout prompts, no --holdout-images).</p>"]
    if harm.loss_before is not None:
        out.append(f"<p>denoising loss on {harm.loss_pairs} image-caption pairs: {harm.loss_before:.5f} -> "
                   f"{harm.loss_after:.5f} ({harm.loss_increase:+.4f} relative); controls "
                   f"{', '.join(f'{v:+.4f}' for v in harm.loss_increase_controls()) or '-'}</p>")
    if harm.drift is None:
        return out
    d = harm.drift.to_json()
    out.append(f"<p>drift {d['drift']:.4f}; controls {', '.join(f'{v:.4f}' for v in harm.drift_controls) or '-'}; "
               f"mean SSIM {d['ssim']['mean']:.4f}, min {d['ssim']['min']:.4f} over {d['prompts']} prompts</p>")
    out.append("<table><tr><th>value layer</th><th>relative output change</th></tr>" + "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v:.6f}</td></tr>" for k, v in d["value_change"].items()) + "</table>")
    hb, ha = result.images.get("holdout_before"), result.images.get("holdout_after")
    if hb is None:
        return out
    by_index = {p.index: i for i, p in enumerate(harm.drift.prompts)}
    out.append("<table class='grid'>")
    for w in harm.drift.worst():
        i = by_index[w.index]
        for label, stack in (("before", hb[i]), ("after", ha[i])):
            out.append(f"<tr><td>#{w.index} {label}</td><td>" + "".join(
                img_tag(im, f"hold-out {w.index} {label} seed {s}") for s, im in enumerate(stack)) + "</td></tr>")
    out.append("</table>")
    return out


def equivalence_section(result: VerifyResult, doc: dict[str, Any]) -> list[str]:
    """Pruned checkpoint vs hooked original."""
    return ["<h2>Equivalence</h2><table>"] + [
        f"<tr><th>{html.escape(k)}</th><td>{fmt(v, 8)}</td></tr>" for k, v in result.equivalence.to_json().items()
    ] + ["</table>"]


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
    return out + ["</ul>"]


SECTIONS: list[Section] = [verdict_section, prompts_section, controls_section, harm_section, attack_section,
                           equivalence_section, layers_section, optional_section]
