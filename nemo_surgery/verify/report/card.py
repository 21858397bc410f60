"""MODEL_CARD.md: the Markdown section a release engineer pastes into the model card."""

from __future__ import annotations

from nemo_surgery.verify.report.attack_section import attack_card_lines
from nemo_surgery.verify.result import VerifyResult


def render_model_card(result: VerifyResult) -> str:
    """A Markdown section with the verdict, the evidence it rests on, what it does not cover, and provenance."""
    doc = result.to_json()
    s = result.settings["sampling"]
    seeds = result.settings["seeds"]
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
        f"Judged per seed on {len(result.checks)} memorized prompt(s) x {s['seeds']} fresh seeds (generator seed "
        f"{seeds['verification']['seed']}; scan's detection seeds were seed {seeds['scan_detection']['seed']} x "
        f"{seeds['scan_detection']['count']}), DDIM {s['steps']} steps, guidance {s['guidance']}. A sample is a copy "
        f"when its SSIM to the reference reaches {result.copy_threshold.value:.4f} ({result.copy_threshold.source}).",
        "",
        "| # | prompt | reference | copies before | copies after | copy rate (95 % bound) | result |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in result.checks:
        lines.append(f"| {c.index} | {c.prompt.replace('|', '/')} | {c.copy.reference} | {c.copy.copies_before}/"
                     f"{c.copy.seeds_before} | {c.copy.copies_after}/{len(c.copy.after)} | <= "
                     f"{100 * c.seeds.bound:.1f} % | {c.status} |")
    sp = result.specificity
    lines.append("")
    if sp.measured:
        lines.append(f"- Specificity: {sp.metric} {sp.found:.4f} vs {len(sp.controls)} random sets of the same shape "
                     f"({', '.join(f'{v:.4f}' for v in sp.controls)}): {'specific' if sp.specific else 'NOT specific'} "
                     f"(rank p-value {sp.p_value:.3f}).")
    else:
        lines.append("- Specificity: **not measured** (no random controls).")
    eq = result.equivalence
    lines.append(f"- Equivalence: pruned weights vs. original with the neurons blocked at run time: max abs "
                 f"difference of noise predictions {eq.max_abs_diff:.3g} (tolerance {eq.tolerance:.3g}) -> "
                 f"{'equivalent' if eq.ok else 'NOT equivalent'}.")
    harm = result.harm
    if not harm.measured:
        lines.append("- Harm to other prompts: **not measured** (no hold-out data given).")
    if harm.drift is not None:
        lines.append(f"- Hold-out drift on {len(harm.drift.prompts)} prompts: {harm.drift.drift:.4f} (controls: "
                     f"{', '.join(f'{v:.4f}' for v in harm.drift_controls) or 'none'}).")
    if harm.loss_increase is not None:
        lines.append(f"- Denoising loss on {harm.loss_pairs} hold-out image-caption pairs: {harm.loss_increase:+.4f} "
                     f"relative (controls: {', '.join(f'{v:+.4f}' for v in harm.loss_increase_controls()) or 'none'}).")
    lines += attack_card_lines(result.sections.get("attack"))
    lines += [f"- Failed: {r}" for r in result.reasons] + [f"- Missing: {m}" for m in result.all_missing]
    lines += ["", "Not covered by this verdict: seeds beyond those sampled (see the bound), prompts other than those "
                  "listed (paraphrases, adaptive attacks), and memorization the reference does not show.", "",
              f"Original: `{result.original}` (fingerprint `{result.inputs['original']['fingerprint'][:16]}`); "
              f"neuron set SHA-256 `{result.inputs['neuron_set']['sha256']}`. Full numbers: `report.json`.", ""]
    return "\n".join(lines)
