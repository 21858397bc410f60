"""Options for data-parallel runs (--shard, stats --resume and --block-size), shared by stats and scan."""

from __future__ import annotations

from collections.abc import Callable

import click

SHARD_HELP = ("Do only share I of N of the prompts (I = 0..N-1), for jobs on separate machines; combine the "
              "outputs with `nemo-surgery merge`. Under `accelerate launch` shards are automatic: leave it out.")


def shard_option(f: Callable) -> Callable:
    """Add --shard I/N."""
    return click.option("--shard", "shard_spec", default=None, metavar="I/N", help=SHARD_HELP)(f)


def stats_scale_options(f: Callable) -> Callable:
    """Add --shard, --resume and --block-size to `stats`."""
    f = click.option("--block-size", default=64, show_default=True, type=click.IntRange(1),
                     help="Hold-out prompts per block: the unit of sharding, resuming and exact merging.")(f)
    f = click.option("--resume", is_flag=True,
                     help="Keep the finished blocks in <out>.parts/ and compute only the missing ones.")(f)
    return shard_option(f)


class BatchSize(click.ParamType):
    """--batch-size: a positive integer, or 'auto' (returned as 0: chosen from free GPU memory after loading)."""

    name = "N|auto"

    def convert(self, value, param, ctx):
        if value in (0, "auto"):
            return 0
        try:
            n = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a positive integer or 'auto'", param, ctx)
        if n < 1:
            self.fail(f"{n} is not a positive integer or 'auto'", param, ctx)
        return n


BATCH_HELP = ("Most UNet samples per forward call; auto: from free GPU memory (a probe forward measures the memory "
              "per sample), 32 on CPU/MPS.")


def open_shard(spec: str | None):
    """This process's shard (launcher, --shard or single); non-main processes of a launched job go quiet."""
    from nemo_surgery.console import set_quiet
    from nemo_surgery.engine.shards import current_shard

    shard = current_shard(spec)
    if shard.launched and not shard.is_main:
        set_quiet(True)
    return shard
