"""`nemo-surgery verify`: thin CLI over nemo_surgery.verify.run.run_verify."""

from __future__ import annotations

from pathlib import Path

import click

from nemo_surgery.cli.common import device_options, emit_json, json_option, quiet_option, run_command


def verify_input_options(f):
    """--stats, --prompts, --holdout, --train-images, --column: inputs shared by verify and apply."""
    f = click.option("--column", "column", default="prompt", show_default=True,
                     help="Prompt column of CSV/JSONL prompt files.")(f)
    f = click.option("--train-images", type=click.Path(path_type=Path), default=None,
                     help="Folder of <prompt index>.png training images, or a JSON mapping (index or prompt -> image).")(f)
    f = click.option("--holdout", type=click.Path(path_type=Path), default=None,
                     help="Non-memorized prompts for drift and sample-agreement calibration (default: drift not measured).")(f)
    f = click.option("--prompts", type=click.Path(path_type=Path), default=None,
                     help="Memorized prompts to verify on (default: those the neuron set records as memorized).")(f)
    f = click.option("--stats", "stats", type=click.Path(path_type=Path), default=None,
                     help="Statistics (tau) from `nemo-surgery stats` (default: the file the neuron set records).")(f)
    return f


def verify_tuning_options(f):
    """Sampling, thresholds, optional metrics and device options of verify."""
    opts = [
        click.option("--seeds", default=4, show_default=True, type=click.IntRange(2),
                     help="Samples per prompt (same seeds before and after)."),
        click.option("--seed", default=0, show_default=True, help="Seed of the one CPU generator that draws the initial noise."),
        click.option("--steps", default=50, show_default=True, type=click.IntRange(1), help="DDIM steps of full sampling."),
        click.option("--guidance", default=7.5, show_default=True, type=float, help="Classifier-free guidance scale of full sampling."),
        click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1), help="Samples per UNet call."),
        click.option("--max-drift", default=0.1, show_default=True, type=click.FloatRange(0, 1),
                     help="Most allowed hold-out drift (1 - mean SSIM of samples before/after)."),
        click.option("--max-train-similarity", default=0.3, show_default=True, type=click.FloatRange(0, 1),
                     help="Every after-sample's SSIM to its training image must stay below this."),
        click.option("--max-sample-agreement", default=None, type=click.FloatRange(-1, 1),
                     help="Most allowed mean pairwise SSIM of a prompt's samples across seeds "
                          "(default: hold-out mean + 1 std on the original; 0.5 without --holdout)."),
        click.option("--sscd", type=click.Path(path_type=Path), default=None, help="Local TorchScript SSCD model (optional)."),
        click.option("--clip", type=click.Path(path_type=Path), default=None, help="Local CLIP model folder (optional)."),
        device_options,
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def build_options(stats, prompts, holdout, train_images, column, report=None, seeds=4, seed=0, steps=50, guidance=7.5,
                  batch_size=8, max_drift=0.1, max_train_similarity=0.3, max_sample_agreement=None, sscd=None,
                  clip=None, device="auto", dtype="fp32"):
    """Turn CLI option values into VerifyOptions."""
    from nemo_surgery.verify.run import VerifyOptions
    from nemo_surgery.verify.sampling import SampleSettings

    return VerifyOptions(
        stats=stats, prompts=prompts, holdout=holdout, train_images=train_images, report=report, column=column,
        sampling=SampleSettings(seeds=seeds, seed=seed, steps=steps, guidance=guidance, batch_size=batch_size),
        max_drift=max_drift, max_train_similarity=max_train_similarity, max_sample_agreement=max_sample_agreement,
        sscd=sscd, clip=clip, device=device, dtype=dtype,
    )


def execute_verify(original, pruned, neurons, options):
    """Run verification with a status line on stderr; print the summary table and the verdict."""
    from nemo_surgery.console import console
    from nemo_surgery.verify.run import run_verify

    with console.status("verifying") as status:
        result = run_verify(original, pruned, neurons, options, stage=lambda text: status.update(f"verify: {text}"))
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
    for reason in result.reasons:
        info(f"[red]failed:[/red] {reason}")
    verdict = "[green]verified[/green]" if result.passed else "[red]NOT verified[/red]"
    info(f"{verdict} (exit {result.exit_code}); report: {result.outputs.get('report_html')}")


@click.command("verify")
@click.argument("original", type=click.Path(path_type=Path))
@click.argument("pruned", type=click.Path(path_type=Path))
@click.option("--neurons", required=True, type=click.Path(path_type=Path), help="Neuron set JSON that was applied.")
@verify_input_options
@click.option("--report", type=click.Path(path_type=Path), default=None,
              help="Report folder (default: <PRUNED>/nemo_report).")
@verify_tuning_options
@quiet_option
@json_option
@run_command
def verify_command(original, pruned, neurons, stats, prompts, holdout, train_images, column, report, seeds, seed,
                   steps, guidance, batch_size, max_drift, max_train_similarity, max_sample_agreement, sscd, clip,
                   device, dtype, quiet, as_json) -> int:
    """Verify a pruned pipeline against ORIGINAL: re-score, sample, drift, equivalence, report.

    Writes report.json, report.html and MODEL_CARD.md. Exit code is the verdict:
    0 every memorized prompt mitigated and drift within --max-drift; 3 otherwise;
    1 when the pruned checkpoint is not equivalent to the hooked original.
    """
    options = build_options(stats, prompts, holdout, train_images, column, report, seeds, seed, steps, guidance,
                            batch_size, max_drift, max_train_similarity, max_sample_agreement, sscd, clip, device,
                            dtype)
    result = execute_verify(original, pruned, neurons, options)
    if as_json:
        emit_json(result.summary())
    return result.exit_code
