"""apply killed or raced for real: SIGKILL/SIGTERM/SIGINT at injected points, two writers on one output.

Each run is a real subprocess calling ``run_apply`` (a few hundred ms to start;
the CLI's own message path is covered once through ``nemo-surgery``). Pauses
come from ``NEMO_SURGERY_TEST_PAUSE_AT`` (``surgery.testhooks``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nemo_surgery.provenance import sha256_file
from nemo_surgery.surgery.journal import commit_path, journal_path, pending_edit
from tests.checkpoint_fixtures import (
    DEFAULT_NEURONS,
    REAL_LAYER,
    assert_patched,
    expected_zeroed,
    write_ldm_file,
    write_neuron_set,
)

DRIVER = """
import sys
from nemo_surgery.errors import NemoError
from nemo_surgery.surgery.apply import run_apply
ckpt, neurons, out, in_place, force = sys.argv[1], sys.argv[2], sys.argv[3] or None, sys.argv[4] == "1", sys.argv[5] == "1"
try:
    run_apply(ckpt, neurons, out=out, in_place=in_place, force=force)
except NemoError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(exc.exit_code)
"""

OTHER_SET = {REAL_LAYER: [10, 11], "mid_block.attentions.0.transformer_blocks.0.attn2.to_v": [7]}


def _start(tmp: Path, ckpt: Path, neurons: Path, out: Path | None = None, in_place: bool = False,
           pause: str | None = None, force: bool = False) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env.pop("NEMO_SURGERY_TEST_PAUSE_AT", None)
    if pause:
        env["NEMO_SURGERY_TEST_PAUSE_AT"] = pause
        env["NEMO_SURGERY_TEST_PAUSE_DIR"] = str(tmp / "pauses")
        (tmp / "pauses").mkdir(exist_ok=True)
    args = [str(ckpt), str(neurons), str(out or ""), "1" if in_place else "0", "1" if force else "0"]
    return subprocess.Popen([sys.executable, "-c", DRIVER, *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parents[1])


def _run(tmp: Path, ckpt: Path, neurons: Path, **kw) -> tuple[int, str]:
    proc = _start(tmp, ckpt, neurons, **kw)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def _wait_paused(tmp: Path, proc: subprocess.Popen[str], point: str) -> Path:
    marker = tmp / "pauses" / f"{point}.{proc.pid}"
    deadline = time.monotonic() + 60
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {point}: {proc.stderr.read()}")
        assert time.monotonic() < deadline, f"never reached {point}"
        time.sleep(0.02)
    return marker


def _kill_at(tmp: Path, proc: subprocess.Popen[str], point: str, sig: int) -> tuple[int, str]:
    _wait_paused(tmp, proc, point)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".nemo-" in p.name)


@pytest.fixture()
def ckpt(tmp_path: Path) -> tuple[Path, Path]:
    return write_ldm_file(tmp_path / "m.safetensors", "fp16"), write_neuron_set(tmp_path / "set.json", DEFAULT_NEURONS)


def test_sigkill_mid_copy_leaves_a_temp_that_the_next_run_sweeps(tmp_path: Path, ckpt: tuple[Path, Path]) -> None:
    src, ns = ckpt
    code, _ = _kill_at(tmp_path, _start(tmp_path, src, ns, pause="copy-streaming"), "copy-streaming", signal.SIGKILL)
    assert code == -signal.SIGKILL
    out = tmp_path / "m-nemo.safetensors"
    assert not out.exists()
    assert [n for n in _leftovers(tmp_path) if "nemo-tmp" in n], "the killed run left its temp (as kill -9 must)"
    code, err = _run(tmp_path, src, ns)
    assert code == 0, err
    assert _leftovers(tmp_path) == [], "stale temps and lock files are gone after the next run"
    report = json.loads((tmp_path / "m-nemo.safetensors.report.json").read_text())
    assert any("temp file(s) of an earlier interrupted run" in n for n in report["notes"])
    assert report["files"][0]["sha256_out"] == sha256_file(out)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_mid_copy_remove_the_temp(tmp_path: Path, ckpt: tuple[Path, Path], sig: int) -> None:
    src, ns = ckpt
    before = sha256_file(src)
    code, err = _kill_at(tmp_path, _start(tmp_path, src, ns, pause="copy-streaming"), "copy-streaming", sig)
    assert code == 130, err
    assert "nothing was written to" in err and "input is unchanged" in err
    assert _leftovers(tmp_path) == [] and not (tmp_path / "m-nemo.safetensors").exists()
    assert sha256_file(src) == before


def test_sigint_during_in_place_zeroing_says_so_and_the_rerun_finishes(tmp_path: Path, ckpt: tuple[Path, Path]) -> None:
    src, ns = ckpt
    original = tmp_path / "original.safetensors"
    shutil.copyfile(src, original)
    code, err = _kill_at(tmp_path, _start(tmp_path, src, ns, in_place=True, pause="in-place-zeroing"),
                         "in-place-zeroing", signal.SIGINT)
    assert code == 130
    assert "some rows may still be unzeroed" in err and "not atomic" in err and "no output was half-written" not in err
    pending = pending_edit(src)
    assert pending is not None and pending.neuron_set_sha256 == sha256_file(ns)
    assert pending.sha256_before["m.safetensors"] == sha256_file(original)
    assert journal_path(src).exists()
    code, err = _run(tmp_path, src, ns, in_place=True)
    assert code == 0, err
    assert pending_edit(src) is None
    assert_patched(original, src, expected_zeroed(DEFAULT_NEURONS, "ldm", ema=True))
    report = json.loads((tmp_path / "m.safetensors.report.json").read_text())
    assert report["files"][0]["sha256_before_interrupted_edit"] == sha256_file(original)
    assert any("finished an interrupted --in-place apply" in n for n in report["notes"])


def test_sigkill_in_place_leaves_a_journal_that_blocks_other_sets(tmp_path: Path, ckpt: tuple[Path, Path]) -> None:
    src, ns = ckpt
    code, _ = _kill_at(tmp_path, _start(tmp_path, src, ns, in_place=True, pause="in-place-zeroing"),
                       "in-place-zeroing", signal.SIGKILL)
    assert code == -signal.SIGKILL and pending_edit(src) is not None
    other = write_neuron_set(tmp_path / "other.json", OTHER_SET)
    code, err = _run(tmp_path, src, other, in_place=True)
    assert code == 2 and "interrupted --in-place apply" in err and "finish that one first" in err
    code, err = _run(tmp_path, src, ns)  # a copy of a half-edited checkpoint is refused too
    assert code == 2 and "finish it first" in err
    code, err = _run(tmp_path, src, ns, in_place=True)
    assert code == 0, err
    assert pending_edit(src) is None and _leftovers(tmp_path) == []


def test_one_writer_per_output(tmp_path: Path, ckpt: tuple[Path, Path]) -> None:
    src, ns = ckpt
    other = write_neuron_set(tmp_path / "other.json", OTHER_SET)
    out = tmp_path / "shared.safetensors"
    first = _start(tmp_path, src, ns, out=out, pause="copy-streaming")
    marker = _wait_paused(tmp_path, first, "copy-streaming")
    code, err = _run(tmp_path, src, other, out=out, force=True)
    assert code == 1 and "another nemo-surgery apply is writing it" in err and f"pid {first.pid}" in err
    assert [n for n in _leftovers(tmp_path) if "nemo-tmp" in n], "a live run's temp is never swept"
    in_place = _run(tmp_path, src, other, in_place=True)  # the input is share-locked by the copy
    assert in_place[0] == 1 and "another nemo-surgery apply is reading or editing it" in in_place[1]
    marker.with_name(marker.name + ".go").touch()
    _, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    report = json.loads((tmp_path / "shared.safetensors.report.json").read_text())
    assert report["neuron_set"]["sha256"] == sha256_file(ns)
    assert report["files"][0]["sha256_out"] == sha256_file(out)


def test_kill_between_output_and_report_is_rolled_forward(tmp_path: Path, ckpt: tuple[Path, Path]) -> None:
    src, ns = ckpt
    out = tmp_path / "m-nemo.safetensors"
    code, _ = _kill_at(tmp_path, _start(tmp_path, src, ns, pause="commit-payload-renamed"),
                       "commit-payload-renamed", signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert out.exists() and not (tmp_path / "m-nemo.safetensors.report.json").exists() and commit_path(out).exists()
    code, err = _run(tmp_path, src, ns)  # the next run on this output publishes the report, then refuses to overwrite
    assert code == 2 and "output exists" in err
    report = json.loads((tmp_path / "m-nemo.safetensors.report.json").read_text())
    assert report["files"][0]["sha256_out"] == sha256_file(out)
    assert _leftovers(tmp_path) == []


def test_force_replacement_never_pairs_an_old_report_with_a_new_output(tmp_path: Path, ckpt: tuple[Path, Path]) -> None:
    src, ns = ckpt
    other = write_neuron_set(tmp_path / "other.json", OTHER_SET)
    assert _run(tmp_path, src, ns)[0] == 0
    code, _ = _kill_at(tmp_path, _start(tmp_path, src, other, force=True, pause="commit-payload-renamed"),
                       "commit-payload-renamed", signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert not (tmp_path / "m-nemo.safetensors.report.json").exists(), "the old set's report is gone with the old output"
    assert _run(tmp_path, src, other, force=True)[0] == 0
    report = json.loads((tmp_path / "m-nemo.safetensors.report.json").read_text())
    assert report["neuron_set"]["sha256"] == sha256_file(other)


def test_cli_ctrl_c_during_in_place_prints_the_truth(tmp_path: Path, ckpt: tuple[Path, Path]) -> None:
    """Through the real `nemo-surgery apply`: exit 130 and one true line (issue 16: it claimed nothing was half-written)."""
    src, ns = ckpt
    env = {**os.environ, "NEMO_SURGERY_TEST_PAUSE_AT": "in-place-zeroing", "NEMO_SURGERY_TEST_PAUSE_DIR": str(tmp_path / "pauses")}
    (tmp_path / "pauses").mkdir()
    exe = shutil.which("nemo-surgery")
    cmd = [exe] if exe else [sys.executable, "-m", "nemo_surgery"]
    proc = subprocess.Popen([*cmd, "apply", str(src), "--neurons", str(ns), "--in-place"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    code, err = _kill_at(tmp_path, proc, "in-place-zeroing", signal.SIGINT)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 130, err
    assert "no output was half-written" not in err
    assert "some rows may still be unzeroed" in err and "rerun the same command" in " ".join(lines)
    assert pending_edit(src) is not None


def test_signal_during_publish_waits_for_the_renames(tmp_path: Path, ckpt: tuple[Path, Path]) -> None:
    src, ns = ckpt
    proc = _start(tmp_path, src, ns, pause="commit-journaled")
    marker = _wait_paused(tmp_path, proc, "commit-journaled")
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert proc.poll() is None, "a signal in the middle of the renames is held until they are done"
    marker.with_name(marker.name + ".go").touch()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "were published; nothing to redo" in err
    out = tmp_path / "m-nemo.safetensors"
    report = json.loads((tmp_path / "m-nemo.safetensors.report.json").read_text())
    assert report["files"][0]["sha256_out"] == sha256_file(out)
    assert _leftovers(tmp_path) == []
