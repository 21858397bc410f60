"""The HTML report's sections: one function each, ``(result, report document) -> list of HTML parts``.

``SECTIONS`` is the order on the page; a new section is a function appended there.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

from nemo_surgery.verify.copies import CopyCheck
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


def _status_row(cells: list[str], status: str, ok: bool) -> str:
    """A table row of already-escaped cells, ending in the status cell coloured ok or bad."""
    return ("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells)
            + f"<td class='{'ok' if ok else 'bad'}'>{html.escape(status)}</td></tr>")


def _seed_rows(index: int, threshold: float, rows: Any) -> list[str]:
    """One table row per (label, image stack, per-seed SSIM): each seed's image, captioned COPY at the threshold."""
    return [f"<tr><td>{label}</td><td>" + "".join(
        img_tag(im, f"prompt {index} {label} seed {s}",
                f"seed {s} SSIM {sims[s]:.3f}{' COPY' if sims[s] >= threshold else ''}")
        for s, im in enumerate(stack)) + "</td></tr>" for label, stack, sims in rows]


def prompts_section(result: VerifyResult, doc: dict[str, Any]) -> list[str]:
    """Per memorized prompt: the numbers, then the reference beside before/after samples with per-seed SSIM."""
    out = ["<h2>Memorized prompts</h2><table><tr><th>#</th><th>prompt</th><th>scan score (in-sample)</th>"
           "<th>first-step before / after (fresh)</th><th>copies before</th><th>copies after</th>"
           "<th>copy rate bound (95%)</th><th>max SSIM after</th><th>controls' max SSIM</th><th>result</th></tr>"]
    for c in result.checks:
        rec = c.scan_record or {}
        in_sample = rec.get("final_score", rec.get("detection_score"))
        out.append(_status_row(
            [str(c.index), html.escape(c.prompt), fmt(in_sample),
             f"{fmt(c.detection_before['mean_pairwise'])} / {fmt(c.detection_after['mean_pairwise'])}",
             f"{c.copy.copies_before} / {c.copy.seeds_before}", f"{c.copy.copies_after} / {len(c.copy.after)}",
             f"{100 * c.seeds.bound:.1f} %", fmt(max(c.copy.after)),
             ", ".join(fmt(max(s)) for s in c.copy.controls) or "-"], c.status, c.mitigated))
    out.append("</table>")
    before, after = result.images.get("memorized_before"), result.images.get("memorized_after")
    refs = result.images.get("references") or []
    for k, c in enumerate(result.checks):
        note = (f"<p>{html.escape(c.seeds.sentence())}; a copy is SSIM &ge; {c.copy.threshold:.4f} to the "
                f"{html.escape(c.copy.reference)}.</p>")
        out += _sample_block(c.index, c.prompt, note, refs[k] if k < len(refs) else None, "reference", c.copy,
                             None if before is None else (before[k], after[k]))
    return out


def _sample_block(index: int, prompt: str, note: str, ref: Any, ref_label: str, copy: CopyCheck,
                  stacks: tuple[Any, Any] | None) -> list[str]:
    """A prompt's heading and note, its reference image, and its before/after samples with per-seed SSIM."""
    out = [f"<h3>#{index}: {html.escape(prompt)}</h3>{note}<table class='grid'>"]
    if ref is not None:
        out.append(f"<tr><td>{ref_label}</td><td>" + img_tag(ref, f"prompt {index} {ref_label}", copy.reference)
                   + "</td></tr>")
    if stacks is not None:
        out += _seed_rows(index, copy.threshold, (("before", stacks[0], copy.before), ("after", stacks[1], copy.after)))
    out.append("</table>")
    return out


def undetected_section(result: VerifyResult, doc: dict[str, Any]) -> list[str]:
    """Scanned prompts that detection did not flag, against the training images given for them (if any)."""
    if not result.undetected:
        return []
    out = ["<h2>Prompts scan did not flag (training image given)</h2><p>NeMo's first-step detection passed these "
           "prompts, so the set does not claim them; a pruned sample that copies the training image still fails "
           "the verdict.</p><table><tr><th>#</th><th>prompt</th><th>scan score (in-sample)</th><th>copies before</th>"
           "<th>copies after</th><th>max SSIM after</th><th>result</th></tr>"]
    for u in result.undetected:
        out.append(_status_row(
            [str(u.index), html.escape(u.prompt), fmt((u.scan_record or {}).get("detection_score")),
             f"{u.copy.copies_before} / {u.copy.seeds_before}", f"{u.copy.copies_after} / {len(u.copy.after)}",
             fmt(max(u.copy.after))], u.status, not u.copies))
    out.append("</table>")
    before, after = result.images.get("undetected_before"), result.images.get("undetected_after")
    refs = result.images.get("undetected_references") or []
    for k, u in enumerate(result.undetected):
        out += _sample_block(u.index, u.prompt, "", refs[k] if k < len(refs) else None, "training image", u.copy,
                             None if before is None else (before[k], after[k]))
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
    if harm.scene_alignment is not None:
        out.append(f"<p>{html.escape(harm.scene_alignment.summary())}</p>")
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


SECTIONS: list[Section] = [verdict_section, prompts_section, undetected_section, controls_section, harm_section, attack_section,
                           equivalence_section, layers_section, optional_section]
