"""Options and the error-mapping wrapper shared by every command (no torch imports here)."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any

import click

from nemo_surgery.console import console, set_quiet
from nemo_surgery.errors import EXIT_FAILURE, NemoError

#: Exit codes, documented in --help.
EXIT_HELP = """Exit codes: 0 success (verdict: mitigated), 1 failure, 2 bad input or usage,
3 verdict: memorization not (fully) mitigated."""


def quiet_option(f: Callable) -> Callable:
    """Add --quiet, which silences all human output on stderr."""
    return click.option("--quiet", "-q", is_flag=True, help="No human output on stderr.")(f)


def json_option(f: Callable) -> Callable:
    """Add --json, which prints a machine summary on stdout."""
    return click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")(f)


def device_options(f: Callable) -> Callable:
    """Add --device and --dtype (the same choices for every command that loads a model)."""
    from nemo_surgery.engine.devices import DEVICES, DTYPE_NAMES

    f = click.option("--dtype", type=click.Choice(list(DTYPE_NAMES)), default="fp32", show_default=True,
                     help="Weights and activations dtype (fp16/bf16 on GPUs).")(f)
    return click.option("--device", default="auto", show_default=True,
                        help=f"One of {', '.join(DEVICES)} (or cuda:N); auto picks cuda, then mps, then cpu.")(f)


def run_command(f: Callable[..., int | None]) -> Callable[..., None]:
    """Wrap a command body: apply --quiet, map NemoError to a one-line error and exit code."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        set_quiet(bool(kwargs.get("quiet", False)))
        try:
            code = f(*args, **kwargs) or 0
        except NemoError as exc:
            console.quiet = False
            console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            console.quiet = False
            console.print("[red]interrupted[/red]: no output was half-written; finished scan records are kept "
                          "(rerun scan with --resume)")
            sys.exit(130)
        except (MemoryError, RuntimeError) as exc:  # torch's CUDA/MPS out-of-memory errors are RuntimeErrors
            if not isinstance(exc, MemoryError) and "out of memory" not in str(exc).lower():
                raise
            console.quiet = False
            console.print("[red]error:[/red] out of memory; lower --batch-size, or use --dtype fp16 on a GPU")
            sys.exit(EXIT_FAILURE)
        sys.exit(code)

    return wrapper


def emit_json(data: Any) -> None:
    """Print machine output as JSON on stdout."""
    click.echo(json.dumps(data, indent=2))
