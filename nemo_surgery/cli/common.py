"""Options and the error-mapping wrapper shared by every command (no torch imports here)."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any

import click
from rich.markup import escape
from rich.text import Text

from nemo_surgery.console import console, set_quiet
from nemo_surgery.errors import EXIT_FAILURE, EXIT_USAGE, NemoError

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


_CONFIG_KEY = "nemo_surgery.model_config"

#: --help text of --model where single files are accepted.
MODEL_HELP = ("Diffusers pipeline folder, single-file .safetensors checkpoint (with --config), or hub id "
              "(read from the local Hugging Face cache only; nothing is downloaded). Default: the embedded demo model.")


def _remember_config(ctx: click.Context, _param: click.Parameter, value: Any) -> None:
    ctx.meta[_CONFIG_KEY] = value


def model_config_option(f: Callable) -> Callable:
    """Add --config DIR (diffusers config folder for a single-file --model); read it back with model_config()."""
    return click.option(
        "--config", "model_config", type=click.Path(file_okay=False, path_type=str), default=None, expose_value=False,
        callback=_remember_config,
        help="With a single-file --model: a local diffusers folder of the same model type (configs and tokenizer; "
             "weights not needed). Without it the default config must be in the local Hugging Face cache.",
    )(f)


def model_config() -> str | None:
    """The --config value of the running command (None when not given or not offered)."""
    ctx = click.get_current_context(silent=True)
    return ctx.meta.get(_CONFIG_KEY) if ctx is not None else None


def unet_calls_text() -> str:
    """Live progress text: UNet forward calls made so far in this process (all loaded models)."""
    from nemo_surgery.engine.model import LoadedModel

    return f"{LoadedModel.all_unet_calls} UNet calls"


def _fail(message: str, exit_code: int, as_json: bool, kind: str, details: dict[str, Any] | None = None) -> None:
    """Print a one-line error on stderr (and, with --json, as a JSON object on stdout); exit."""
    console.quiet = False
    console.print(message, soft_wrap=True)
    if as_json:
        error: dict[str, Any] = {"kind": kind, "message": Text.from_markup(message).plain.removeprefix("error: "), "exit_code": exit_code}
        emit_json({"error": error, **(details or {})})
    sys.exit(exit_code)


def run_command(f: Callable[..., int | None]) -> Callable[..., None]:
    """Wrap a command body: apply --quiet, map NemoError to a one-line error and exit code.

    With --json the error is also printed on stdout as ``{"error": {"kind", "message",
    "exit_code"}}`` (plus ``result`` where the failure carries one), so scripts that
    read stdout always get one JSON object.
    """

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        set_quiet(bool(kwargs.get("quiet", False)))
        as_json = bool(kwargs.get("as_json", False))
        try:
            code = f(*args, **kwargs) or 0
        except NemoError as exc:
            result = getattr(exc, "result", None)
            details = {"result": result.to_json()} if hasattr(result, "to_json") else None
            kind = "bad_input" if exc.exit_code == EXIT_USAGE else "failure"
            _fail(f"[red]error:[/red] {escape(str(exc))}", exc.exit_code, as_json, kind, details)
        except KeyboardInterrupt:
            _fail("[red]interrupted[/red]: no output was half-written; finished scan records are kept "
                  "(rerun scan with --resume)", 130, as_json, "interrupted")
        except (MemoryError, RuntimeError) as exc:  # torch's CUDA/MPS out-of-memory errors are RuntimeErrors
            if not isinstance(exc, MemoryError) and "out of memory" not in str(exc).lower():
                raise
            _fail("[red]error:[/red] out of memory; lower --batch-size, or use --dtype fp16 on a GPU",
                  EXIT_FAILURE, as_json, "out_of_memory")
        sys.exit(code)

    return wrapper


def emit_json(data: Any) -> None:
    """Print machine output as JSON on stdout."""
    click.echo(json.dumps(data, indent=2))
