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
    """Human summary on stderr: per-prompt table, equivalence, drift, verdict and why."""
    from rich.table import Table

    from nemo_surgery.console import console, info

    table = Table(title=f"verify (tau = {result.tau:.4f}, sample agreement <= {result.max_sample_agreement:.4f})")
    for col in ("#", "prompt", "detection before", "after", "agreement before", "after", "train SSIM", "verdict"):
        table.add_column(col, overflow="fold")
    for c in result.checks:
        train = f"{max(c.train_after):.3f}" if c.train_after else "-"
        table.add_row(str(c.index), c.prompt[:40], f"{c.detection_before['mean_pairwise']:.3f}",
                      f"{c.detection_after['mean_pairwise']:.3f}", f"{c.agreement_before:.3f}",
                      f"{c.agreement_after:.3f}", train,
                      "mitigated" if c.mitigated else "[red]STILL MEMORIZED[/red]")
    console.print(table)
    eq = result.equivalence
    info(f"equivalence: max abs diff {eq.max_abs_diff:.3g} (tolerance {eq.tolerance:.3g}) -> "
         f"{'equivalent' if eq.ok else '[red]NOT equivalent[/red]'}")
    if result.drift is None:
        info("[yellow]drift NOT measured[/yellow]: pass --holdout PROMPTS to check the rest of the model")
    else:
        info(f"hold-out drift {result.drift.drift:.4f} (max {result.max_drift}), mean SSIM {result.drift.mean_ssim:.4f} "
             f"over {len(result.drift.prompts)} prompts")
    attack = result.sections.get("attack")
    if attack is not None:
        shallow = attack["verdict"] != "robust"
        info(f"adaptive attack ({attack['settings']['steps']} steps): "
             + ("[red]shallow[/red]" if shallow else "[green]robust[/green]")
             + (" (a warning: --require-robust makes it fail)" if shallow and not attack["required"] else ""))
    for reason in result.reasons:
        info(f"[red]failed:[/red] {reason}")
    verdict = "[green]verified[/green]" if result.passed else "[red]NOT verified[/red]"
    info(f"{verdict} (exit {result.exit_code}); report: {result.outputs.get('report_html')}")


@click.command("verify")
@click.argument("original", type=click.Path(path_type=Path))
@click.argument("pruned", type=click.Path(path_type=Path))
@click.option("--neurons", required=True, type=click.Path(path_type=Path), help="Neuron set JSON that was applied.")
@options_from("input", "report", "tuning", "device")
@quiet_option
@json_option
@run_command
def verify_command(original, pruned, neurons, quiet, as_json, **values) -> int:
    """Verify a pruned pipeline against ORIGINAL: re-score, sample, drift, equivalence, report.

    Writes report.json, report.html and MODEL_CARD.md. Exit code is the verdict:
    0 every memorized prompt mitigated and drift within --max-drift; 3 otherwise;
    1 when the pruned checkpoint is not equivalent to the hooked original.
    """
    result = run_with_status(original, pruned, neurons, VerifyOptions.from_values(values))
    if as_json:
        emit_json(result.summary())
    return result.exit_code
