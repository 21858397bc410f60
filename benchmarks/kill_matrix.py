"""Kill and concurrency matrix for `apply` on an SD-shaped single file (issue 16's figures).

Builds a ~1 GB SD 1.x-shaped fp16 checkpoint (benchmarks/bench_apply.py), then runs
the real CLI (`python -m nemo_surgery apply`) and kills it with SIGKILL, SIGTERM
or SIGINT, at random times and at the injected pause points
(``NEMO_SURGERY_TEST_PAUSE_AT``), in copy mode and ``--in-place``; and races two
applies with different neuron sets on one output. After every case it checks:

- the message: an exit-130 line must describe the disk (nothing written / edit
  unfinished with a journal / published) and the disk must agree;
- the input of a copy is unchanged (SHA-256);
- the next run (same command, --force for copies) exits 0, after which no temp,
  lock, commit journal or in-place journal is left;
- every output present has a report whose ``sha256_out`` is the output's
  SHA-256 and whose neuron set is the one in the output's header metadata
  (report/output mismatches); for in-place, no journal means a finished edit.

Prints one JSON summary line per case and the totals.
Usage: python benchmarks/kill_matrix.py [--gb 1.0] [--dir /tmp] [--random 6] [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_apply import build_checkpoint, neuron_set_doc  # noqa: E402

from nemo_surgery.surgery.safetensors_file import read_header  # noqa: E402

COPY_POINTS = ["locked", "copy-streaming", "before-publish", "commit-journaled", "commit-payload-renamed"]
IN_PLACE_POINTS = ["in-place-zeroing", "in-place-before-report"]
SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM, "INT": signal.SIGINT}


def sha(path: Path) -> str:
    """SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(16 << 20):
            h.update(block)
    return h.hexdigest()


def leftovers(folder: Path) -> list[str]:
    """Our hidden working files left in a folder."""
    marks = (".nemo-tmp-", ".nemo-lock", ".nemo-commit", ".nemo-journal")
    return sorted(p.name for p in folder.iterdir() if any(m in p.name for m in marks))


def cli(args: list[str], pause: str | None, pause_dir: Path) -> subprocess.Popen[str]:
    """Start the real CLI (optionally pausing at an injected point)."""
    env = dict(os.environ)
    env.pop("NEMO_SURGERY_TEST_PAUSE_AT", None)
    if pause:
        env.update(NEMO_SURGERY_TEST_PAUSE_AT=pause, NEMO_SURGERY_TEST_PAUSE_DIR=str(pause_dir))
    # a shell starts background jobs with SIGINT ignored, and children inherit that: restore the default
    return subprocess.Popen([sys.executable, "-m", "nemo_surgery", "apply", *args, "--quiet", "--no-verify"], env=env,
                            text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            cwd=Path(__file__).resolve().parents[1],
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_marker(pause_dir: Path, point: str, proc: subprocess.Popen[str], timeout: float = 600) -> bool:
    """Wait until proc pauses at point (False if it exited first)."""
    marker = pause_dir / f"{point}.{proc.pid}"
    end = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def report_consistent(output: Path, set_sha: dict[str, str]) -> tuple[bool, str]:
    """Output present -> its report exists, matches its SHA-256 and its set; returns (ok, why)."""
    report = output.with_name(output.name + ".report.json")
    if not output.exists():
        return (not report.exists(), "report without output" if report.exists() else "")
    if not report.exists():
        return False, "output without report"
    doc = json.loads(report.read_text())
    meta = read_header(output).metadata or {}
    if doc["files"][0]["sha256_out"] != sha(output):
        return False, "report sha256_out differs from the output"
    if meta.get("nemo_surgery.neuron_set_sha256") != doc["neuron_set"]["sha256"]:
        return False, "report names another neuron set than the output holds"
    return True, ""


def check_message(code: int, err: str, in_place: bool, out: Path, ckpt: Path, original_sha: str) -> tuple[bool, str]:
    """Is an exit-130 message true of the disk?"""
    if code != 130:
        return True, ""
    line = err.strip().splitlines()[-1] if err.strip() else ""
    journal = ckpt.with_name(f".{ckpt.name}.nemo-journal.json")
    if "no output was half-written" in err:
        return False, "generic message"
    if in_place:
        if "before the in-place edit began" in line:
            return (sha(ckpt) == original_sha and not journal.exists()), line
        if "some rows may still be unzeroed" in line:
            return journal.exists(), line
        return False, line
    if "nothing was written" in line:
        temps = [n for n in leftovers(out.parent) if "nemo-tmp" in n]
        return (not temps and not out.exists()), line
    if "were published; nothing to redo" in line:
        return report_consistent(out, {})[0], line
    return False, line


def run_case(work: Path, ckpt0: Path, sets: list[Path], mode: str, sig: str, point: str | None, delay: float | None,
             original_sha: str, expected: dict[str, str]) -> dict:
    """One kill case and its follow-up run."""
    case = work / "case"
    shutil.rmtree(case, ignore_errors=True)
    case.mkdir()
    pause_dir = case / "pauses"
    pause_dir.mkdir()
    in_place = mode == "in-place"
    if in_place:
        ckpt = case / "m.safetensors"
        shutil.copyfile(ckpt0, ckpt)
    else:
        ckpt = ckpt0
    out = case / "out.safetensors"
    args = [str(ckpt), "--neurons", str(sets[0])] + (["--in-place"] if in_place else ["--out", str(out), "--force"])
    proc = cli(args, point, pause_dir)
    reached = True
    if point:
        reached = wait_marker(pause_dir, point, proc)
    else:
        time.sleep(delay or 0)
    if proc.poll() is None:
        proc.send_signal(SIGNALS[sig])
    if point and reached and sig != "KILL":
        time.sleep(1.0)  # inside the publish renames a signal is held: let the paused run go on
        if proc.poll() is None:
            (pause_dir / f"{point}.{proc.pid}.go").touch()
    _, err = proc.communicate(timeout=600)
    code = proc.returncode
    msg_ok, line = check_message(code, err, in_place, out, ckpt, original_sha)
    input_ok = in_place or sha(ckpt0) == original_sha
    follow = cli(args, None, pause_dir)
    _, err2 = follow.communicate(timeout=900)
    left = leftovers(case) + leftovers(ckpt0.parent)
    left = [n for n in left if not n.startswith(".pauses")]
    target = ckpt if in_place else out
    pair_ok, why = report_consistent(target, {}) if not in_place else (not leftovers(case), "")
    correct = follow.returncode == 0 and sha(target) == expected[mode]
    return {"output_correct_after_rerun": correct,
            "mode": mode, "signal": sig, "point": point, "delay": round(delay, 2) if delay else None, "reached": reached,
            "exit": code, "message_true": msg_ok, "message": line[:160], "input_intact": input_ok,
            "rerun_exit": follow.returncode, "rerun_error": err2.strip()[-200:] if follow.returncode else "",
            "leftovers_after_rerun": left, "report_output_consistent": pair_ok, "why": why}


def race(work: Path, ckpt0: Path, sets: list[Path], in_place: bool) -> dict:
    """Two applies with different sets on one output (or both in place on one checkpoint), started together."""
    case = work / "race"
    shutil.rmtree(case, ignore_errors=True)
    case.mkdir()
    ckpt = case / "m.safetensors" if in_place else ckpt0
    if in_place:
        shutil.copyfile(ckpt0, ckpt)
    out = case / "out.safetensors"
    procs = []
    for s in sets:
        args = [str(ckpt), "--neurons", str(s)] + (["--in-place"] if in_place else ["--out", str(out), "--force"])
        procs.append(cli(args, None, case))
    results = [(p.wait(timeout=900), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in results)
    target = ckpt if in_place else out
    meta = read_header(target).metadata or {}
    ok, why = report_consistent(target, {})
    if in_place:
        report = json.loads(target.with_name(target.name + ".report.json").read_text())
        ok = ok if not in_place else report["neuron_set"]["sha256"] in (sha(sets[0]), sha(sets[1]))
    return {"mode": "race-in-place" if in_place else "race-copy", "exits": codes,
            "one_winner": codes.count(0) == 1 or (codes == [0, 0]),
            "errors": [e.strip().splitlines()[-1][:160] for c, e in results if c],
            "report_output_consistent": ok, "why": why, "set_in_output": meta.get("nemo_surgery.neuron_set_sha256", "")[:12],
            "leftovers": leftovers(case)}


def main() -> None:
    """Build, run the matrix, print per-case lines and totals."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--random", type=int, default=6, help="random-time kills per mode and signal")
    ap.add_argument("--races", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip", type=int, default=0, help="skip the first N cases (resume a cut run; same seed)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="nemo-kill-", dir=args.dir))
    try:
        src = work / "src" / "sd15.safetensors"
        src.parent.mkdir()
        neurons = build_checkpoint(src, args.gb)
        set_a, set_b = work / "a.json", work / "b.json"
        set_a.write_text(json.dumps(neuron_set_doc(neurons)))
        other = {lid: sorted({(r + 7) % 320 for r in rows}) for lid, rows in neurons.items()}
        set_b.write_text(json.dumps(neuron_set_doc(other)))
        original = sha(src)
        t0 = time.perf_counter()
        probe = cli([str(src), "--neurons", str(set_a), "--out", str(work / "probe.safetensors")], None, work)
        probe.communicate()
        t_full = time.perf_counter() - t0
        expected = {"copy": sha(work / "probe.safetensors")}
        for p in [work / "probe.safetensors", work / "probe.safetensors.report.json", work / "probe.safetensors.report.md"]:
            p.unlink(missing_ok=True)
        probe_ckpt = work / "probe-in-place.safetensors"
        shutil.copyfile(src, probe_ckpt)
        cli([str(probe_ckpt), "--neurons", str(set_a), "--in-place"], None, work).communicate()
        expected["in-place"] = sha(probe_ckpt)
        probe_ckpt.unlink()
        print(json.dumps({"file_gb": round(src.stat().st_size / 1e9, 2), "uninterrupted_cli_s": round(t_full, 1)}), flush=True)
        cases = []
        for mode in ("copy", "in-place"):
            for sig in SIGNALS:
                for _ in range(args.random if sig == "KILL" else max(1, args.random // 2)):
                    cases.append((mode, sig, None, rng.uniform(0.3, t_full)))
            for point in COPY_POINTS if mode == "copy" else IN_PLACE_POINTS:
                for sig in SIGNALS:
                    cases.append((mode, sig, point, None))
        rows = []
        for mode, sig, point, delay in cases[args.skip:]:
            row = run_case(work, src, [set_a, set_b], mode, sig, point, delay, original, expected)
            rows.append(row)
            print(json.dumps(row), flush=True)
        races = [race(work, src, [set_a, set_b], in_place=k % 2 == 1) for k in range(args.races)]
        for r in races:
            print(json.dumps(r), flush=True)
        total = {
            "cases": len(rows), "races": len(races),
            "exit_130": sum(r["exit"] == 130 for r in rows), "killed_9": sum(r["exit"] == -9 for r in rows),
            "untrue_messages": sum(not r["message_true"] for r in rows),
            "input_modified": sum(not r["input_intact"] for r in rows),
            "rerun_failures": sum(r["rerun_exit"] != 0 for r in rows),
            "wrong_output_after_rerun": sum(not r["output_correct_after_rerun"] for r in rows),
            "leaked_after_rerun": sum(bool(r["leftovers_after_rerun"]) for r in rows),
            "report_output_mismatches": sum(not r["report_output_consistent"] for r in rows)
            + sum(not r["report_output_consistent"] for r in races),
            "races_with_two_winners_or_leftovers": sum(not r["one_winner"] or bool(r["leftovers"]) for r in races),
        }
        print(json.dumps({"totals": total}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
