"""`nemo-surgery detect`: thin CLI over the screening engine (engine/screen.py)."""

from __future__ import annotations

from pathlib import Path

import click

from nemo_surgery.cli.common import device_options, emit_json, json_option, quiet_option, run_command


@click.command("detect")
@click.argument("prompts_file", metavar="PROMPTS", type=click.Path(path_type=Path))
@click.option("--model", "-m", "model", default=None,
              help="Diffusers pipeline folder or hub id (cache only, offline). Default: the embedded demo model.")
@device_options
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1),
              help="UNet samples per forward call (prompts per call = this / seeds); raise it on a GPU.")
@click.option("--stats", "stats_path", type=click.Path(path_type=Path), default=None,
              help="Statistics from `nemo-surgery stats` (default: the demo model's, with no --model).")
@click.option("--out", "-o", type=click.Path(path_type=Path), default=Path("detect.records.jsonl"), show_default=True,
              help="Per-prompt detection records (JSONL, appended as prompts finish).")
@click.option("--flagged", type=click.Path(path_type=Path), default=Path("flagged.txt"), show_default=True,
              help="Prompt file of the flagged prompts, for `nemo-surgery scan` (.jsonl for prompts with line breaks).")
@click.option("--column", default="prompt", show_default=True, help="Prompt column of a CSV/JSONL file.")
@click.option("--resume", is_flag=True, help="Skip prompts already in the records file and continue.")
@click.option("--force", is_flag=True, help="Overwrite existing records and flagged files.")
@quiet_option
@json_option
@run_command
def detect_command(prompts_file, model, device, dtype, batch_size, stats_path, out, flagged, column, resume, force,
                   quiet, as_json):
    """Screen PROMPTS for memorization (detection only, many prompts per UNet call).

    Applies the calibrated detection rule stored in the statistics to every
    prompt, streams one record per prompt to --out (resumable with --resume)
    and writes the flagged prompts to --flagged, the input of `scan`.
    Scores are computed in fp32 also with --dtype fp16.
    """
    from nemo_surgery.cli.scan import _load, _resolve_stats
    from nemo_surgery.console import info, progress, warn
    from nemo_surgery.engine.prompts import read_prompts
    from nemo_surgery.engine.screen import run_detect
    from nemo_surgery.engine.stats import load_stats

    prompts = read_prompts(prompts_file, column)
    stats_path = _resolve_stats(stats_path, model)
    stats = load_stats(stats_path)
    loaded = _load(model, device, dtype)
    from nemo_surgery.engine.batching import resolve_batch_size

    batch_size = resolve_batch_size(batch_size, loaded, stats.settings.guidance_scale, stats.settings.seeds)
    if stats.calibration.warning:
        warn(stats.calibration.warning)
    with progress("prompts", len(prompts)) as advance:
        summary = run_detect(loaded, stats, stats_path, prompts, out, flagged, batch_size=batch_size,
                             resume=resume, force=force, on_chunk=advance)
    info(f"rule: {summary.rule}")
    info(f"{summary.flagged} of {summary.prompts} prompt(s) flagged -> {summary.flagged_file} (records: {summary.records}; "
         f"{summary.prompts_per_second:.2f} prompts/s, {summary.samples_per_call:.1f} samples per UNet call)")
    if as_json:
        emit_json(summary.to_json())
