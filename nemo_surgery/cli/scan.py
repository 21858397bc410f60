"""`nemo-surgery stats` and `scan`: thin CLI over the localization engine."""

from __future__ import annotations

from pathlib import Path

import click

from nemo_surgery.cli.common import (
    MODEL_HELP,
    device_options,
    emit_json,
    json_option,
    model_config,
    model_config_option,
    quiet_option,
    run_command,
    unet_calls_text,
)
from nemo_surgery.cli.scale import BATCH_HELP, BatchSize, open_shard, shard_option, stats_scale_options


def model_options(f):
    """--model, --device, --dtype and --batch-size, shared by stats and scan."""
    f = click.option("--batch-size", default="auto", show_default=True, type=BatchSize(), help=BATCH_HELP)(f)
    f = device_options(f)
    f = model_config_option(f)
    f = click.option("--model", "-m", "model", default=None, help=MODEL_HELP)(f)
    return f


def _load(model, device, dtype):
    from nemo_surgery.console import console
    from nemo_surgery.demo.paths import DEMO_MODEL_DIR
    from nemo_surgery.engine.model import load_model

    with console.status("loading model"):
        return load_model(model if model is not None else DEMO_MODEL_DIR, device=device, dtype=dtype, config=model_config())


def _resolve_stats(stats_path: Path | None, model: str | None) -> Path:
    """--stats as given, or the demo model's statistics when neither --stats nor --model is given."""
    from nemo_surgery.demo.paths import DEMO_STATS
    from nemo_surgery.errors import InputError

    if stats_path is not None:
        return stats_path
    if model is not None:
        raise InputError("--stats is required with --model; compute it with `nemo-surgery stats HOLDOUT --model M --out STATS`")
    if not DEMO_STATS.is_file():
        raise InputError(f"the embedded demo model's statistics are missing ({DEMO_STATS}); reinstall, or pass --model and --stats")
    return DEMO_STATS


@click.command("stats")
@click.argument("holdout", type=click.Path(path_type=Path))
@model_options
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="Statistics JSON to write.")
@click.option("--column", default="prompt", show_default=True, help="Prompt column of a CSV/JSONL file.")
@click.option("--max-prompts", type=click.IntRange(2), default=None, help="Use at most this many hold-out prompts.")
@click.option("--seeds", default=10, show_default=True, type=click.IntRange(2, 16), help="Seeds per prompt.")
@click.option("--seed", default=1, show_default=True, help="Seed of the generator that draws the initial noise.")
@click.option("--steps", "inference_steps", default=50, show_default=True, type=click.IntRange(2), help="DDIM steps.")
@click.option("--timestep-index", default=1, show_default=True, type=click.IntRange(0),
              help="Which step of the DDIM schedule is scored (1 = the second, as NeMo).")
@click.option("--guidance", "guidance_scale", default=0.0, show_default=True,
              help="Guidance scale of the scored prediction; <= 1 means text-conditional only.")
@click.option("--fpr", default=0.05, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Target false-positive rate of the detection rule; its thresholds are calibrated on HOLDOUT for it.")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@stats_scale_options
@quiet_option
@json_option
@run_command
def stats_cmd(holdout, model, device, dtype, batch_size, out, column, max_prompts, seeds, seed,
              inference_steps, timestep_index, guidance_scale, fpr, force, shard_spec, resume, block_size, quiet, as_json):
    """Calibrate tau and neuron statistics on HOLDOUT (non-memorized prompts).

    HOLDOUT is a prompt list: UTF-8 text (one per line, # comments), or CSV/JSONL
    with --column. Runs the text encoder and value layers for the statistics and
    the UNet's first-step prediction for tau and the detection thresholds, with
    exactly the detection settings. The thresholds are calibrated for --fpr;
    the achieved hold-out false-positive rate is reported with a 95% interval.
    """
    from nemo_surgery.console import info, progress, warn
    from nemo_surgery.engine.batching import resolve_batch_size
    from nemo_surgery.engine.prompts import read_prompts
    from nemo_surgery.engine.score import ScoreSettings
    from nemo_surgery.engine.ssim import SSIMConfig
    from nemo_surgery.engine.stats_parts import run_stats
    from nemo_surgery.errors import InputError

    prompts = read_prompts(holdout, column)
    if max_prompts:
        prompts = prompts[:max_prompts]
    if len(prompts) < 2:
        raise InputError(f"{holdout}: at least 2 hold-out prompts are needed to estimate a spread")
    if out.exists() and not force:
        raise InputError(f"{out}: exists; pass --force to overwrite it")
    shard = open_shard(shard_spec)
    loaded = _load(model, shard.device(device), dtype)
    _, h, w = loaded.latent_shape
    settings = ScoreSettings(seeds=seeds, seed=seed, inference_steps=inference_steps,
                             timestep_index=timestep_index, guidance_scale=guidance_scale,
                             ssim=SSIMConfig.fit(h, w))
    batch_size = resolve_batch_size(batch_size, loaded, guidance_scale, seeds)
    with progress("hold-out prompts", len(prompts), live=unet_calls_text) as advance:
        run = run_stats(loaded, [p.text for p in prompts], settings, out, shard, batch_size, block_size, resume,
                        dtype, advance, fpr=fpr)
    if run.stats is None:
        info(f"shard {shard.index} of {shard.count}: {run.computed} block(s) computed, {run.resumed} resumed, in "
             f"{run.parts}; combine the shards' part folders with `nemo-surgery merge PARTS... --out {out}`")
        return 0
    result = run.stats
    cal = result.calibration
    lo, hi = cal.ci
    info(f"detection at target false-positive rate {fpr:g}: {cal.flagged} of {cal.holdout} hold-out prompts flagged "
         f"({cal.achieved:.3f}, 95% CI {lo:.3f}-{hi:.3f}); NeMo's rule flags {cal.nemo_flagged}")
    if cal.warning:
        warn(cal.warning)
    info(f"tau = {result.tau:.4f} from {result.pairwise.count} pairwise scores of {result.prompt_count} prompts")
    info(f"SSIM: {settings.ssim.scales} scale(s), window {settings.ssim.kernel_size} for {h}x{w} latents")
    info(f"wrote {out}")
    if as_json:
        emit_json({"out": str(out), "tau": result.tau, "prompts": result.prompt_count,
                   "holdout_flagged": cal.flagged, "detection": cal.to_json(), "fingerprint": result.fingerprint,
                   "ssim": settings.ssim.to_json()})


@click.command("scan")
@click.argument("prompts_file", metavar="PROMPTS", type=click.Path(path_type=Path))
@model_options
@click.option("--stats", "stats_path", type=click.Path(path_type=Path), default=None,
              help="Statistics from `nemo-surgery stats` (default: the demo model's, with no --model).")
@click.option("--out", "-o", type=click.Path(path_type=Path), default=Path("neurons.json"), show_default=True,
              help="Neuron set JSON to write; per-prompt records go to <out stem>.records.jsonl beside it.")
@click.option("--layers", default="default", show_default=True,
              help="'default' (down + mid blocks, as NeMo), 'all', or a comma list of layer ids or prefixes.")
@click.option("--column", default="prompt", show_default=True, help="Prompt column of a CSV/JSONL file.")
@click.option("--resume", is_flag=True, help="Skip prompts already in the records file and continue.")
@click.option("--force", is_flag=True, help="Overwrite an existing output and records file.")
@click.option("--search", default="split", show_default=True, type=click.Choice(["split", "greedy", "reference"]),
              help="Refinement: adaptive splitting (fewest UNet calls), speculative greedy, or NeMo's sequential order.")
@shard_option
@quiet_option
@json_option
@run_command
def scan_cmd(prompts_file, model, device, dtype, batch_size, stats_path, out, layers, column, resume, force,
             search, shard_spec, quiet, as_json):
    """Find the neurons that trigger memorization for each prompt in PROMPTS and merge them.

    Exit code 0 when every memorized prompt was mitigated (or none was
    memorized), 3 when some memorized prompt could not be mitigated.
    """
    from nemo_surgery.console import console, progress, warn
    from nemo_surgery.engine.batching import resolve_batch_size
    from nemo_surgery.engine.prompts import read_prompts
    from nemo_surgery.engine.scan import check_outputs
    from nemo_surgery.engine.scan_parts import run_sharded_scan
    from nemo_surgery.engine.selection import SelectionSettings
    from nemo_surgery.engine.stats import load_stats

    prompts = read_prompts(prompts_file, column)
    check_outputs(out, resume, force)
    stats_path = _resolve_stats(stats_path, model)
    stats = load_stats(stats_path)
    shard = open_shard(shard_spec)
    loaded = _load(model, shard.device(device), dtype)
    batch_size = resolve_batch_size(batch_size, loaded, stats.settings.guidance_scale, stats.settings.seeds)
    with progress("prompts", len(shard.take(prompts)), live=unet_calls_text) as advance:

        def on_result(res):
            if res.truncated:
                warn(f"prompt {res.index} is longer than {loaded.max_tokens} tokens and was truncated")
            advance()

        summary = run_sharded_scan(loaded, stats, stats_path, prompts, out, shard, layers=layers, batch_size=batch_size,
                                   resume=resume, force=force, on_result=on_result,
                                   selection=SelectionSettings(strategy=search))
    if shard.launched and not shard.is_main:
        return 0
    _print_summary(summary, console)
    if as_json:
        emit_json(summary.to_json())
    return summary.exit_code


def _print_summary(summary, console) -> None:
    from rich.table import Table

    from nemo_surgery.console import info
    from nemo_surgery.engine.detection import short_rule

    table = Table(title=f"scan (tau = {summary.tau:.4f})", show_lines=False,
                  caption=f"{short_rule()}; cluster: seeds x agreement; NeMo: its rule's verdict; "
                          "score: the final set's mitigation score (below tau = mitigated)")
    for col in ("#", "prompt", "memorized", "cluster", "NeMo", "neurons", "score", "verdict"):
        table.add_column(col, overflow="fold")
    for r in summary.results:
        verdict = "-" if not r.memorized else ("mitigated" if r.mitigated else (
            f"[red]NOT mitigated[/red] ({len(r.unmovable_seeds)} seeds unmovable; set kept as partial)" if r.partial
            else "[red]NOT mitigated[/red]"))
        det = r.detection
        cluster = f"{det['cluster_size']} x {det['cluster_agreement']:.3f}" if det.get("cluster_size") else "-"
        nemo = "yes" if det.get("nemo", {}).get("memorized") else "no"
        table.add_row(str(r.index), r.prompt[:48], "yes" if r.memorized else "no", cluster, nemo,
                      str(r.count) if r.memorized else "-",
                      f"{r.final_score:.3f}" if r.final_score is not None else "-", verdict)
    console.print(table)
    if summary.memorized == 0:
        info("no memorized prompt found: the neuron set is empty (nothing to prune)")
    if summary.not_mitigated:
        info(f"[red]{len(summary.not_mitigated)} memorized prompt(s) could not be (fully) mitigated[/red] "
             f"(prompts {summary.not_mitigated}); partial sets (some seeds mitigated) are in the set, marked "
             f"\"partial\", and verify never passes them")
    info(f"{summary.total_neurons} neuron(s) in {len(summary.neurons_per_layer)} layer(s) -> {summary.out}"
         f" (records: {summary.records}; {summary.unet_calls} UNet calls, {summary.seconds:.1f} s)")
