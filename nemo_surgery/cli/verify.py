"""`nemo-surgery verify`: thin CLI over nemo_surgery.verify.run.run_verify; flags generated from VerifyOptions."""

from __future__ import annotations

from pathlib import Path

import click

from nemo_surgery.cli.common import device_options, emit_json, json_option, quiet_option, run_command, unet_calls_text
from nemo_surgery.verify.options import VerifyOptions, option_fields


def _click_type(meta: dict):
    kind, low, high = meta["kind"], meta["low"], meta["high"]
    if kind == "path":
        return click.Path(path_type=Path)
    if kind == "int":
        return click.IntRange(low, high) if low is not None or high is not None else int
    if kind == "float":
        return click.FloatRange(low, high) if low is not None or high is not None else float
    return str


def options_from(*groups: str):
    """A decorator adding one click option per VerifyOptions field of ``groups`` (default and help from the field)."""

    def decorate(f):
        if "device" in groups:  # --device/--dtype: the helper every model-loading command shares
            f = device_options(f)
        for fld in reversed(option_fields(*(g for g in groups if g != "device"))):
            meta = fld.metadata
            flag = "--" + fld.name.replace("_", "-")
            if meta["kind"] == "flag":
                f = click.option(flag, fld.name, is_flag=True, default=fld.default, help=meta["help"])(f)
            else:
                f = click.option(flag, fld.name, type=_click_type(meta), default=fld.default,
                                 show_default=fld.default is not None, help=meta["help"])(f)
        return f

    return decorate


#: Inputs and tuning shared by verify and apply (apply's report goes to <output>/nemo_report).
verify_options = options_from("input", "tuning", "device")


def run_with_status(original, pruned, neurons, options: VerifyOptions, inputs=None):
    """Run verification with a status line on stderr; print the summary table and the verdict."""
    from nemo_surgery.console import stage_status
    from nemo_surgery.verify.run import run_verify

    with stage_status("verifying", unet_calls_text) as status:
        result = run_verify(original, pruned, neurons, options, stage=lambda text: status.update(f"verify: {text}"),
                            inputs=inputs)
    print_summary(result)
    return result


def print_summary(result) -> None:
    """Human summary on stderr: per-prompt table, controls, harm, equivalence, verdict and every reason."""
    from rich.table import Table

    from nemo_surgery.console import console, info

    t = result.copy_threshold
    table = Table(title=f"verify: per-seed copies on fresh seeds (copy = SSIM >= {t.value:.4f}, "
                        f"{'calibrated' if t.calibrated else 'NOT calibrated'})")
    for col in ("#", "prompt", "reference", "copies before", "copies after", "copy rate (95% bound)",
                "max SSIM after", "controls' max SSIM", "result"):
        table.add_column(col, overflow="fold")
    for c in result.checks:
        color = "green" if c.mitigated else "red"
        table.add_row(str(c.index), c.prompt[:40], c.copy.reference[:24], f"{c.copy.copies_before}/{c.copy.seeds_before}",
                      f"{c.copy.copies_after}/{len(c.copy.after)}", f"<= {100 * c.seeds.bound:.1f} %",
                      f"{max(c.copy.after):.3f}", ", ".join(f"{max(s):.3f}" for s in c.copy.controls) or "-",
                      f"[{color}]{c.status}[/{color}]")
    console.print(table)
    if result.undetected:
        missed = Table(title="scanned prompts that detection did not flag, against the training image you gave")
        for col in ("#", "prompt", "copies before", "copies after", "max SSIM after", "result"):
            missed.add_column(col, overflow="fold")
        for u in result.undetected:
            color = "red" if u.copies else "green"
            missed.add_row(str(u.index), u.prompt[:40], f"{u.copy.copies_before}/{u.copy.seeds_before}",
                           f"{u.copy.copies_after}/{len(u.copy.after)}", f"{max(u.copy.after):.3f}",
                           f"[{color}]{u.status}[/{color}]")
        console.print(missed)
    info(f"copy threshold source: {t.source}")
    s = result.specificity
    if s.measured:
        info(f"specificity: found set {s.found:.4f} vs controls {', '.join(f'{v:.4f}' for v in s.controls)} -> "
             f"{'specific' if s.specific else '[red]NOT specific[/red]'} (rank p {s.p_value:.3f})")
    harm = result.harm
    if harm.drift is not None:
        info(f"hold-out drift {harm.drift.drift:.4f} (controls {', '.join(f'{v:.4f}' for v in harm.drift_controls) or '-'})")
    if harm.scene_alignment is not None:
        info(harm.scene_alignment.summary())
    if harm.loss_increase is not None:
        info(f"denoising loss {harm.loss_increase:+.4f} relative (controls "
             f"{', '.join(f'{v:+.4f}' for v in harm.loss_increase_controls()) or '-'})")
    eq = result.equivalence
    info(f"equivalence: max abs diff {eq.max_abs_diff:.3g} (tolerance {eq.tolerance:.3g}) -> "
         f"{'equivalent' if eq.ok else '[red]NOT equivalent[/red]'}")
    attack = result.sections.get("attack")
    if attack is not None:
        shallow = attack["verdict"] != "robust"
        info(f"adaptive attack ({attack['settings']['steps']} steps): "
             + ("[red]shallow[/red]" if shallow else "[green]robust[/green]")
             + (" (a warning: --require-robust makes it fail)" if shallow and not attack["required"] else ""))
    for reason in result.reasons:
        info(f"[red]failed:[/red] {reason}")
    for missing in result.all_missing:
        info(f"[yellow]missing:[/yellow] {missing}")
    color = "green" if result.passed else "red"
    info(f"[{color}]{result.verdict}[/{color}] (exit {result.exit_code}); report: {result.outputs.get('report_html')}")


@click.command("verify")
@click.argument("original", type=click.Path(path_type=Path))
@click.argument("pruned", type=click.Path(path_type=Path))
@click.option("--neurons", required=True, type=click.Path(path_type=Path), help="Neuron set JSON that was applied.")
@options_from("input", "report", "tuning", "device")
@quiet_option
@json_option
@run_command
def verify_command(original, pruned, neurons, quiet, as_json, **values) -> int:
    """Verify a pruned pipeline against ORIGINAL: per-seed copies on fresh seeds, controls, harm, report.

    ORIGINAL and PRUNED are diffusers pipeline folders or single-file
    .safetensors checkpoints holding UNet, VAE and text encoder (loaded offline
    with --config DIR or the default config in the local Hugging Face cache).
    Writes report.json, report.html and MODEL_CARD.md. Exit code is the verdict:
    0 'verified': no fresh seed of any memorized prompt copies its reference,
    the set beats every random control, and harm on --holdout data is no worse
    than the controls'; 3 'NOT verified' (failing evidence) or 'unverified'
    (missing evidence: the report names the flags); 1 when the pruned
    checkpoint is not equivalent to the hooked original.
    """
    result = run_with_status(original, pruned, neurons, VerifyOptions.from_values(values))
    if as_json:
        emit_json(result.summary())
    return result.exit_code
