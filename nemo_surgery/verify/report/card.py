"""MODEL_CARD.md: the Markdown section a release engineer pastes into the model card."""

from __future__ import annotations

from nemo_surgery.verify.report.attack_section import attack_card_lines
from nemo_surgery.verify.result import VerifyResult


def render_model_card(result: VerifyResult) -> str:
    """A Markdown section with the verdict, the numbers it rests on, and the provenance."""
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
        f"**Verification verdict: {result.verdict}** (exit code {result.exit_code}).",
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
    lines += attack_card_lines(result.sections.get("attack"))
    for reason in result.reasons:
        lines.append(f"- Failed: {reason}")
    lines += ["", f"Original: `{result.original}` (fingerprint `{result.inputs['original']['fingerprint'][:16]}`); "
                  f"neuron set SHA-256 `{result.inputs['neuron_set']['sha256']}`. Full numbers: `report.json`.", ""]
    return "\n".join(lines)
