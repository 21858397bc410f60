"""The report's adaptive-attack section: verdict and rule, similarity-vs-step chart, numbers, attacked samples."""

from __future__ import annotations

import html
from typing import Any

from nemo_surgery.verify.report.images import fmt, img_tag
from nemo_surgery.verify.result import VerifyResult

#: Line colours of the three attacks in the chart.
COLORS = {"pruned": "#c0392b", "original": "#2c3e50", "control": "#1e8449"}
LABELS = {"pruned": "pruned model, memorized prompt", "original": "original model, memorized prompt",
          "control": "pruned model, control target"}


def similarity_chart_svg(case: dict[str, Any], threshold: float, width: int = 560, height: int = 260) -> str:
    """Inline SVG: best similarity over the probe seeds vs attack step, one line per attack, copy threshold dashed."""
    left, right, top, bottom = 48, 200, 12, 32
    pw, ph = width - left - right, height - top - bottom
    steps = case["pruned"]["checkpoints"]
    last = max(steps[-1], 1)
    values = [v for name in COLORS for c in case[name]["checkpoint_similarity"] for v in c] + [threshold]
    lo, hi = min(0.0, min(values)), max(1.0, max(values))

    def xy(step: float, value: float) -> str:
        return f"{left + pw * step / last:.1f},{top + ph * (hi - value) / (hi - lo):.1f}"

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="similarity to the target vs attack step">',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>']
    for tick in (lo, (lo + hi) / 2, hi):
        x, y = xy(0, tick).split(",")
        parts.append(f'<text x="{left - 6}" y="{float(y) + 4:.1f}" font-size="11" text-anchor="end">{tick:.2f}</text>')
    for step in steps:
        x, _ = xy(step, lo).split(",")
        parts.append(f'<text x="{x}" y="{height - bottom + 14}" font-size="11" text-anchor="middle">{step}</text>')
    parts.append(f'<text x="{left + pw / 2:.1f}" y="{height - 4}" font-size="11" text-anchor="middle">attack step</text>')
    a, b = xy(0, threshold), xy(last, threshold)
    parts.append(f'<polyline points="{a} {b}" fill="none" stroke="#999" stroke-dasharray="5,4"/>')
    parts.append(f'<text x="{left + pw + 6}" y="{float(b.split(",")[1]) + 4:.1f}" font-size="11">copy threshold '
                 f'{threshold:.3g}</text>')
    for k, (name, color) in enumerate(COLORS.items()):
        best = [max(c) for c in case[name]["checkpoint_similarity"]]
        points = " ".join(xy(s, v) for s, v in zip(steps, best))
        parts.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="2"/>')
        parts.extend(f'<circle cx="{p.split(",")[0]}" cy="{p.split(",")[1]}" r="3" fill="{color}"/>'
                     for p in points.split())
        y = top + 24 + 18 * k
        parts.append(f'<line x1="{left + pw + 6}" y1="{y}" x2="{left + pw + 22}" y2="{y}" stroke="{color}" '
                     f'stroke-width="2"/><text x="{left + pw + 26}" y="{y + 4}" font-size="11">'
                     f'{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def attack_section(result: VerifyResult, doc: dict[str, Any]) -> list[str]:
    """Adaptive-attack robustness probe (only when verify ran with --attack)."""
    probe = doc.get("attack")
    if probe is None:
        return []
    robust = probe["verdict"] == "robust"
    cls = "ok" if robust else "bad"
    effect = ("fails the verification (--require-robust)" if probe["required"] and not robust else
              "a warning: the verdict above does not depend on it (pass --require-robust to make it)")
    s = probe["settings"]
    out = ["<h2>Adaptive attack (robustness probe)</h2>",
           f"<p class='{cls}'>Robustness: {html.escape(probe['verdict'])}"
           f"{'' if robust else ' &mdash; ' + html.escape(effect)}</p>",
           f"<p><small>{html.escape(probe['rule'])} Copy threshold {fmt(probe['copy_threshold'])} "
           f"({html.escape(probe['copy_threshold_source'])}). Attack: {s['steps']} Adam steps, lr {s['lr']}, "
           f"{s['batch']} noises/timesteps per step, on the text-encoder output; chart: best of the first "
           f"{s['probe_seeds']} verification seeds every {s['checkpoint_every']} steps. "
           f"{probe['seconds']:.1f} s.</small></p>"]
    for note in probe["notes"]:
        out.append(f"<p class='bad'>{html.escape(note)}</p>")
    out.append("<table><tr><th>#</th><th>attack</th><th>start prompt</th><th>loss before</th><th>loss after</th>"
               "<th>similarity before (max)</th><th>after (max)</th><th>embedding change</th></tr>")
    for case in probe["prompts"]:
        for name in COLORS:
            t = case[name]
            out.append(f"<tr><td>{case['index']}</td><td>{LABELS[name]}</td><td>{html.escape(t['prompt'])}</td>"
                       f"<td>{fmt(t['fixed_loss']['before'])}</td><td>{fmt(t['fixed_loss']['after'])}</td>"
                       f"<td>{fmt(max(t['similarity_before']))}</td><td>{fmt(t['max_similarity_after'])}</td>"
                       f"<td>{fmt(t['embedding_change'])}</td></tr>")
    out.append("</table>")
    for case in probe["prompts"]:
        i = case["index"]
        word_cls = "ok" if case["verdict"] == "robust" else "bad"
        out.append(f"<h3>#{i}: {html.escape(case['prompt'])} &mdash; "
                   f"<span class='{word_cls}'>{html.escape(case['verdict'])}</span></h3>")
        out.append(similarity_chart_svg(case, probe["copy_threshold"]))
        out.append("<table class='grid'>")
        for key, label in (("train_image", "training image"), ("control_target", "control target (never memorized)")):
            image = result.images.get(f"attack/{i}/{key}")
            if image is not None:
                out.append(f"<tr><td>{label}</td><td>{img_tag(image, f'prompt {i} {label}')}</td></tr>")
        for name in COLORS:
            images = result.images.get(f"attack/{i}/{name}")
            if images is not None:
                sims = case[name]["similarity_after"]
                out.append(f"<tr><td>{LABELS[name]}, after the attack</td><td>" + "".join(
                    img_tag(im, f"prompt {i} {name} attacked seed {s}", f"seed {s}: {v:.3f}")
                    for s, (im, v) in enumerate(zip(images, sims))) + "</td></tr>")
        out.append("</table>")
    return out


def attack_card_lines(probe: dict[str, Any] | None) -> list[str]:
    """The model card's line on the adaptive attack (empty when verify ran without --attack)."""
    if probe is None:
        return []
    s = probe["settings"]
    best = "; ".join(f"prompt {c['index']}: {c['verdict']} (best SSIM after the attack: pruned "
                     f"{c['pruned']['max_similarity_after']:.3f}, original {c['original']['max_similarity_after']:.3f}, "
                     f"control {c['control']['max_similarity_after']:.3f})" for c in probe["prompts"])
    effect = "" if probe["verdict"] == "robust" else (" — counted as a failure (--require-robust)" if probe["required"]
                                                       else " — a warning, not part of the verdict")
    return [f"- Adaptive attack ({s['steps']} Adam steps on the prompt's text-encoder output, lr {s['lr']}, "
            f"batch {s['batch']}; copy threshold {probe['copy_threshold']:.3f}): **{probe['verdict']}**{effect}. "
            f"{best}."]
