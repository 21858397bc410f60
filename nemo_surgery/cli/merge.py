"""`nemo-surgery merge`: combine shard outputs produced on separate machines (thin CLI)."""

from __future__ import annotations

from pathlib import Path

import click

from nemo_surgery.cli.common import emit_json, json_option, quiet_option, run_command


@click.command("merge")
@click.argument("parts", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True,
              help="Merged statistics or neuron set JSON to write.")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@quiet_option
@json_option
@run_command
def merge_command(parts, out, force, quiet, as_json):
    """Merge the outputs of `stats --shard I/N` or `scan --shard I/N` jobs into one file.

    \b
    PARTS are either statistics part folders (<out>.parts/ of each stats shard):
    every block of the job must be present exactly once, and the merged statistics
    equal a single run's bit for bit (same device type, dtype and batch size);
    or neuron sets of scan shards: their union is the set one scan of all prompts
    finds. Inputs are never modified.
    """
    from nemo_surgery.console import info
    from nemo_surgery.errors import InputError

    if out.exists() and not force:
        raise InputError(f"{out}: exists; pass --force to overwrite it")
    missing = [p for p in parts if not p.exists()]
    if missing:
        raise InputError(f"{missing[0]}: not found; pass the stats shards' part folders or the scan shards' neuron sets")
    kinds = {p.is_dir() for p in parts}
    if len(kinds) > 1:
        raise InputError("merge: give either statistics part folders or neuron set files, not both")
    if kinds == {True}:
        from nemo_surgery.engine.stats_parts import merge_stats_parts

        stats = merge_stats_parts(parts, out)
        info(f"merged statistics of {stats.prompt_count} prompts from {len(parts)} part folder(s): "
             f"tau = {stats.tau:.4f} -> {out}")
        if as_json:
            emit_json({"out": str(out), "kind": "stats", "prompts": stats.prompt_count, "tau": stats.tau,
                       "fingerprint": stats.fingerprint})
        return 0
    from nemo_surgery.engine.scan_parts import merge_neuron_sets

    merged = merge_neuron_sets(parts, out)
    info(f"merged {len(parts)} neuron set(s) of {len(merged.prompts)} prompts: {merged.total} neuron(s) -> {out}")
    if as_json:
        emit_json({"out": str(out), "kind": "neurons", "prompts": len(merged.prompts), "total_neurons": merged.total,
                   "fingerprint": merged.fingerprint})
    return 0
