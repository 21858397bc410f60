"""`nemo-surgery apply`: thin CLI over nemo_surgery.apply.run_apply."""

from __future__ import annotations

import click
from rich.table import Table

from .apply import ApplyFailed, ApplyResult, run_apply
from .cli import emit_json, json_option, main, quiet_option, run_command
from .console import console, info


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


@main.command("apply")
@click.argument("ckpt", type=click.Path(path_type=str))
@click.option("--neurons", "neurons", required=True, type=click.Path(path_type=str), help="Neuron set JSON from `scan`.")
@click.option("--out", "out", type=click.Path(path_type=str), default=None,
              help="Output path (default: sibling <name>-nemo folder or <stem>-nemo.safetensors).")
@click.option("--in-place", is_flag=True, help="Zero the rows inside CKPT itself (for huge files).")
@click.option("--dry-run", is_flag=True, help="Print the patch plan (files, keys, rows, bytes); write nothing.")
@click.option("--force", is_flag=True, help="Replace an existing output (atomically).")
@json_option
@quiet_option
@run_command
def apply_command(
    ckpt: str, neurons: str, out: str | None, in_place: bool, dry_run: bool, force: bool, as_json: bool, quiet: bool
) -> int:
    """Zero neuron rows directly in safetensors checkpoints, byte-exact and verified.

    CKPT is a diffusers pipeline folder, a diffusers UNet folder or file, or a
    single-file (LDM) checkpoint. Pickle files (.ckpt/.bin/.pt) are refused.
    """
    try:
        result = run_apply(ckpt, neurons, out=out, in_place=in_place, dry_run=dry_run, force=force)
    except ApplyFailed as exc:
        if as_json:
            emit_json(exc.result.to_json())
        raise
    _print_plan(result)
    if not result.dry_run:
        info(
            f"[green]ok[/green]: {result.rows_zeroed} rows zeroed in {len(result.files)} file(s) -> {result.output}; "
            f"report: {result.report_md}"
        )
    if as_json:
        emit_json(result.to_json())
    return 0
