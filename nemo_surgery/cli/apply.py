"""`nemo-surgery apply`: thin CLI over nemo_surgery.workflow.apply_and_verify."""

from __future__ import annotations

import click
from rich.table import Table

from nemo_surgery.cli.common import emit_json, json_option, quiet_option, run_command, unet_calls_text
from nemo_surgery.cli.verify import print_summary, verify_options
from nemo_surgery.console import console, info, stage_status
from nemo_surgery.surgery.apply import ApplyResult
from nemo_surgery.verify.options import VerifyOptions


def _print_plan(result: ApplyResult) -> None:
    if result.dry_run:
        title = f"patch plan (dry run, nothing written): {result.ckpt} -> {result.output} ({result.layout})"
    else:
        title = f"patched: {result.ckpt} -> {result.output} ({result.layout})"
    table = Table(title=title, title_justify="left")
    for col in ("file", "key", "rows", "bytes"):
        table.add_column(col, justify="right" if col in ("rows", "bytes") else "left")
    for f in result.files:
        for t in f.plan.tensors:
            table.add_row(str(f.plan.rel), t.key, str(len(t.rows)), str(t.bytes_zeroed))
    console.print(table)
    if not result.dry_run:
        info(
            f"[green]ok[/green]: {result.rows_zeroed} rows zeroed in {len(result.files)} file(s) -> {result.output}; "
            f"report: {result.report_md}"
        )


@click.command("apply")
@click.argument("ckpt", type=click.Path(path_type=str))
@click.option("--neurons", "neurons", required=True, type=click.Path(path_type=str), help="Neuron set JSON from `scan`.")
@click.option("--out", "-o", "out", type=click.Path(path_type=str), default=None,
              help="Output path (default: sibling <name>-nemo folder or <stem>-nemo.safetensors).")
@click.option("--in-place", is_flag=True,
              help="Zero the rows inside CKPT itself (for huge files). Not atomic: an interrupted edit leaves some rows "
                   "unzeroed, is marked by a journal file beside CKPT, and is finished by rerunning the same command.")
@click.option("--dry-run", is_flag=True, help="Print the patch plan (files, keys, rows, bytes); write nothing.")
@click.option("--force", is_flag=True, help="Replace an existing output (atomically, with its report).")
@click.option("--input-sha256", is_flag=True,
              help="Also record each patched input file's SHA-256 in the report (a second digest over the file: about "
                   "0.7 CPU-s per GB; always taken with --in-place). The output's SHA-256 is always recorded.")
@click.option("--no-verify", is_flag=True, help="Skip `verify` (run by default when CKPT is a pipeline folder or a single file "
                   "holding UNet, VAE and text encoder).")
@verify_options
@json_option
@quiet_option
@run_command
def apply_command(
    ckpt: str, neurons: str, out: str | None, in_place: bool, dry_run: bool, force: bool, as_json: bool, quiet: bool,
    no_verify: bool = False, input_sha256: bool = False, **verify_values,
) -> int:
    """Zero neuron rows directly in safetensors checkpoints, byte-exact and verified.

    CKPT is a diffusers pipeline folder (unet/, and unet_ema/ where present,
    get the rows), a diffusers UNet folder or file, or a single-file (LDM)
    checkpoint. Pickle files (.ckpt/.bin/.pt) are refused.
    A pipeline folder, or a single file holding UNet, VAE and text encoder
    (loaded with --config DIR or the default config in the local Hugging Face
    cache; refused before writing when neither is there), is then verified
    (see `verify`; report in <output>/nemo_report or <output>.nemo_report) and
    the exit code is verify's verdict; --no-verify skips it.
    """
    from nemo_surgery.workflow import apply_and_verify

    options = None if no_verify else VerifyOptions.from_values(verify_values)
    status = stage_status("verifying", unet_calls_text)
    try:
        done = apply_and_verify(ckpt, neurons, out=out, in_place=in_place, dry_run=dry_run, force=force,
                                verify=options, applied=_print_plan, input_sha256=input_sha256,
                                stage=lambda text: (status.start(), status.update(f"verify: {text}")))
    finally:  # an ApplyFailed carries its result: with --json, run_command prints it inside the error object
        status.stop()
    if done.skipped and not dry_run:
        info(f"verify skipped: {done.skipped}")
    if done.verified is not None:
        print_summary(done.verified)
        if as_json:
            emit_json({**done.applied.to_json(), "verify": done.verified.summary()})
        return done.exit_code
    if as_json:
        emit_json(done.applied.to_json())
    return 0
