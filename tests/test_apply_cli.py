"""`nemo-surgery apply` from the command line: once in a subprocess, error paths in-process."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.checkpoint_fixtures import DEFAULT_NEURONS, assert_patched, expected_zeroed, write_ldm_file, write_neuron_set


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("nemo-surgery")
    cmd = [exe] if exe else [sys.executable, "-c", "from nemo_surgery.cli.main import main; main()"]
    return subprocess.run([*cmd, "apply", *args], capture_output=True, text=True, timeout=120)


def test_cli_apply_end_to_end(tmp_path: Path) -> None:
    src = write_ldm_file(tmp_path / "model.safetensors", "fp16")
    ns = write_neuron_set(tmp_path / "set.json", DEFAULT_NEURONS)

    run = _cli(str(src), "--neurons", str(ns), "--json", "--quiet", "--no-verify")
    assert run.returncode == 0, run.stderr
    assert "patched" not in run.stderr and "error" not in run.stderr  # --quiet: no human output
    summary = json.loads(run.stdout)
    assert summary["ok"] and summary["output"] == str(tmp_path / "model-nemo.safetensors")
    assert_patched(src, tmp_path / "model-nemo.safetensors", expected_zeroed(DEFAULT_NEURONS, "ldm", ema=True))
    out = tmp_path / "model-nemo.safetensors"
    assert summary["files"][0]["sha256_out"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert summary["input_sha256"] is False and summary["files"][0]["sha256_in"] is None  # one digest by default


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    """Error paths in-process through the same click command (subprocess startup is slow)."""
    from click.testing import CliRunner

    from nemo_surgery.cli.main import main

    src = write_ldm_file(tmp_path / "model.safetensors", "fp16")
    ns = write_neuron_set(tmp_path / "set.json", DEFAULT_NEURONS)
    (tmp_path / "model-nemo.safetensors").write_bytes(b"x")
    runner = CliRunner()
    again = runner.invoke(main, ["apply", str(src), "--neurons", str(ns), "--no-verify"])
    assert again.exit_code == 2
    lines = [line for line in again.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "output exists; pass --force" in lines[0]

    pickle = tmp_path / "old.ckpt"
    pickle.write_bytes(b"\x80\x04")
    refused = runner.invoke(main, ["apply", str(pickle), "--neurons", str(ns)])
    assert refused.exit_code == 2 and "convert to safetensors" in refused.stderr

    dry = runner.invoke(main, ["apply", str(src), "--neurons", str(ns), "--dry-run", "--json", "--force"])
    assert dry.exit_code == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert plan["dry_run"] and plan["rows_zeroed"] == 22 and plan["layout"] == "ldm-single-file"
    assert "patch plan" in dry.stderr
    assert (tmp_path / "model-nemo.safetensors").read_bytes() == b"x"

    forced = runner.invoke(main, ["apply", str(src), "--neurons", str(ns), "--force", "--json", "-q", "--no-verify",
                                  "--input-sha256"])
    assert forced.exit_code == 0, forced.stderr
    doc = json.loads(forced.stdout)
    assert doc["ok"] is True and doc["input_sha256"] is True
    assert doc["files"][0]["sha256_in"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert f"SHA-256 in: `{doc['files'][0]['sha256_in']}`" in Path(doc["report"]["md"]).read_text()
