"""Command-line entry point: the click group and its commands.

Each command lives in its own module of this package and only parses options,
calls one library function and prints; the work is done in the package.
"""

from __future__ import annotations

import click

from nemo_surgery import __version__
from nemo_surgery.cli.apply import apply_command
from nemo_surgery.cli.common import EXIT_HELP
from nemo_surgery.cli.detect import detect_command
from nemo_surgery.cli.merge import merge_command
from nemo_surgery.cli.scan import scan_cmd, stats_cmd
from nemo_surgery.cli.verify import verify_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_HELP)
@click.version_option(__version__, prog_name="nemo-surgery")
def main() -> None:
    """Find and remove memorization neurons (NeMo) in Stable Diffusion models.

    \b
      nemo-surgery stats HOLDOUT --out stats.json     calibrate tau + activation statistics
      nemo-surgery detect PROMPTS --flagged f.txt     screen many prompts, write the flagged ones
      nemo-surgery scan PROMPTS --out set.json        localize neurons per prompt, merge them
      nemo-surgery apply CKPT --neurons set.json      zero those rows in safetensors files
      nemo-surgery verify ORIG PRUNED --neurons set.json   evidence: before/after report
    """


for _command in (stats_cmd, detect_command, scan_cmd, apply_command, verify_command, merge_command):
    main.add_command(_command)
