"""Test injection points: make the process wait at a named point so a test can kill or race it.

Set ``NEMO_SURGERY_TEST_PAUSE_AT=<point>[,<point>...]`` (and optionally
``NEMO_SURGERY_TEST_PAUSE_DIR=<folder>``). Reaching a listed point, the process
creates ``<folder>/<point>.<pid>`` and sleeps until ``<folder>/<point>.<pid>.go``
appears (or for 10 minutes); without a folder it prints ``paused at <point>`` on
stderr and sleeps. Signals arrive during the sleep as they would during real
work. Unset, ``pause_at`` is one dictionary lookup: it costs nothing in production.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ENV_POINTS = "NEMO_SURGERY_TEST_PAUSE_AT"
ENV_DIR = "NEMO_SURGERY_TEST_PAUSE_DIR"
_MAX_WAIT_S = 600.0


def pause_at(point: str) -> None:
    """Wait here if the environment asks for a pause at ``point`` (test-only injection)."""
    wanted = os.environ.get(ENV_POINTS)
    if not wanted or point not in wanted.split(","):
        return
    folder = os.environ.get(ENV_DIR)
    go: Path | None = None
    if folder:
        marker = Path(folder) / f"{point}.{os.getpid()}"
        marker.write_text(str(os.getpid()))
        go = marker.with_name(marker.name + ".go")
    else:
        print(f"paused at {point}", file=sys.stderr, flush=True)
    deadline = time.monotonic() + _MAX_WAIT_S
    while time.monotonic() < deadline:
        if go is not None and go.exists():
            return
        time.sleep(0.02)
